import cv2
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from annotator.similarity import METRICS, NeighbourTable, fast_resize, similarity_table, small_gray, ssim
from tests.annotator.clips import panning_clip


def reference_ssim(a, b):
    """Independent SSIM: scipy Gaussian (sigma 1.5, radius 5), valid area, K1/K2 = 0.01/0.03."""
    f = lambda x: gaussian_filter(x, 1.5, truncate=5 / 1.5)[5:-5, 5:-5]  # noqa: E731
    a, b = a.astype(np.float64), b.astype(np.float64)
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean()


def reference(metric, a, b):
    if metric == "ssim":
        return reference_ssim(a, b)
    if metric == "ncc":
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]
    return 1 - np.abs(a.astype(np.float64) - b).mean()


@pytest.mark.parametrize("metric", METRICS)
def test_table_matches_brute_force(metric):
    smalls = [small_gray(f) for f in panning_clip(24, cuts=(15,))]
    w = 6
    table = similarity_table(smalls, w, metric)
    assert table.shape == (24, 2 * w + 1) and table.dtype == np.float32
    for i in range(24):
        for d in range(-w, w + 1):
            j = i + d
            if not 0 <= j < 24:
                assert np.isnan(table[i, w + d])
            elif d == 0:
                assert table[i, w] == 1.0
            else:
                assert table[i, w + d] == pytest.approx(reference(metric, smalls[i], smalls[j]), abs=2e-5)
                assert table[i, w + d] == table[j, w - d]  # each pair computed once, stored twice


def test_streaming_equals_batch_and_window_longer_than_clip():
    smalls = [small_gray(f) for f in panning_clip(5)]
    t = NeighbourTable(8)
    for s in smalls:
        t.push(s)
    np.testing.assert_array_equal(t.table(), similarity_table(smalls, 8))
    assert np.isnan(t.table()[0, :8]).all() and np.isnan(t.table()[4, 8 + 1 :]).all()
    assert NeighbourTable(3).table().shape == (0, 7)


def test_known_motion_and_cut():
    """Panning 1 px/frame with a cut at 20: similarity falls with distance inside a scene and
    is low across the cut (the cut 'falls out' without a detector)."""
    frames = panning_clip(40, cuts=(20,))
    table = similarity_table([small_gray(f) for f in frames], 5)
    inside = table[5:15, 5 + 1 : 5 + 6]  # d = 1..5 within scene 0
    assert (np.diff(inside, axis=1) < 0).all()
    assert inside[:, 0].min() > 0.8
    across = [table[i, 5 + d] for i in range(15, 20) for d in range(1, 6) if i + d >= 20]
    assert max(across) < 0.3


def test_ssim_identity_and_plain_function():
    rng = np.random.default_rng(0)
    a = rng.random((40, 50))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-9)


def test_small_gray_is_bt601_and_fixed_size():
    frame = np.zeros((90, 160, 3), np.uint8)
    frame[..., 0] = 255  # pure red
    g = small_gray(frame)
    assert g.shape == (64, 64) and g.dtype == np.float32
    # BT.601 weights, gray rounded to 8 bits: 0.299 * 255 = 76.2 -> 76
    np.testing.assert_allclose(g, 76 / 255, atol=1e-6)
    np.testing.assert_allclose(small_gray(frame[:, :, ::-1], bgr=True), 76 / 255, atol=1e-6)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (128, 192, 3), dtype=np.uint8)
    exact = cv2.resize(img.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]) / 255, (96, 64),
                       interpolation=cv2.INTER_AREA)  # exact halving: a plain 2x2 mean
    exact = cv2.resize(exact, (64, 64), interpolation=cv2.INTER_LINEAR)
    # three 8-bit roundings (gray, halving, bilinear step), each at most half a level
    np.testing.assert_allclose(small_gray(img), exact, atol=1.5 / 255)
    assert np.abs(small_gray(img) - exact).mean() < 0.5 / 255


def test_fast_resize_sizes_and_smoothness():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    for w, h in [(912, 512), (112, 64), (64, 64), (1280, 720), (2000, 1125)]:
        assert fast_resize(img, w, h).shape == (h, w, 3)
    # anti-aliased: white noise averages out instead of aliasing through
    assert fast_resize(img, 64, 36).std() < 10
    # up: bicubic (sharper than bilinear for frames smaller than --size); down by less than 2: bilinear
    small = img[:90, :160]
    cubic = cv2.resize(small, (228, 128), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(fast_resize(small, 228, 128), cubic)
    np.testing.assert_array_equal(fast_resize(img, 912, 512), cv2.resize(img, (912, 512), interpolation=cv2.INTER_LINEAR))
    # 720p -> 64x64: halvings while both sides are at least twice the target (160x90), then bilinear
    halved = img
    for _ in range(3):
        halved = cv2.resize(halved, (halved.shape[1] // 2, halved.shape[0] // 2), interpolation=cv2.INTER_AREA)
    assert halved.shape == (90, 160, 3)
    bilinear = cv2.resize(halved, (64, 64), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(fast_resize(img, 64, 64), bilinear)
    # one side up, the other down: bicubic (any upscaling)
    tall = img[:90, :40]
    np.testing.assert_array_equal(fast_resize(tall, 64, 64), cv2.resize(tall, (64, 64), interpolation=cv2.INTER_CUBIC))


def test_window_far_longer_than_the_clip_costs_what_the_clip_needs():
    """The ring grows with the frames pushed (not 10**7 slots up front, 160 GB), and trim
    cuts the table to the farthest neighbour there is."""
    smalls = [small_gray(f) for f in panning_clip(4)]
    t = NeighbourTable(10**7)
    for s in smalls:
        t.push(s)
    trimmed = t.table(trim=True)
    assert trimmed.shape == (4, 7)
    np.testing.assert_array_equal(trimmed, similarity_table(smalls, 3))
    assert NeighbourTable(5).table(trim=True).shape == (0, 3)


def test_the_ring_keeps_every_frame_when_it_grows():
    """Past 64 frames the ring doubles (here to the window, 100): the frames already in it are
    copied over, so frame 69 still sees frame 1. l1 against brute force (float32 sums: 1e-6)."""
    smalls = np.random.default_rng(0).random((70, 16, 16), dtype=np.float32)
    table = similarity_table(smalls, 100, "l1")
    for i, j in [(69, 1), (64, 0), (65, 63), (40, 2)]:
        want = 1 - np.abs(smalls[i].astype(np.float64) - smalls[j]).mean()
        assert table[i, 100 + j - i] == pytest.approx(want, abs=1e-6), (i, j)


def test_halvings_drop_an_odd_row_and_column_first():
    """9x5 -> 4x2: one exact halving of the even 8x4 part (the 255 border row and column
    dropped), each output pixel the mean of its 2x2 block, here constant."""
    blocks = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], np.uint8)
    img = np.full((5, 9), 255, np.uint8)
    img[:4, :8] = blocks.repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(fast_resize(img, 4, 2), blocks)


def test_small_gray_takes_the_gray_before_averaging():
    """Columns alternating black and (1, 255, 1): gray 0 and round(150.098) = 150, averaged to
    75 exactly. Averaging the colour first would give (1, 128, 1) (0.5 and 127.5 rounded up),
    whose gray is round(75.55) = 76."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[:, 1::2] = (1, 255, 1)
    np.testing.assert_allclose(small_gray(img), 75 / 255, rtol=0, atol=1e-7)


def test_ncc_of_a_flat_frame_is_zero_not_nan():
    """A flat frame has no variation to correlate: its NCC with any frame is 0 (NaN is kept for
    outside the movie)."""
    flat = np.full((16, 16), 0.5, np.float32)
    textured = small_gray(panning_clip(1, 16, 16)[0], 16)
    table = similarity_table([flat, textured, flat], 2, "ncc")
    np.testing.assert_array_equal(table[0], [np.nan, np.nan, 1, 0, 0])
    np.testing.assert_array_equal(table[1, 1:4], [0, 1, 0])


def test_neighbour_table_refuses_a_zero_window_and_an_unknown_metric():
    with pytest.raises(ValueError, match=r"^window must be >= 1$"):
        NeighbourTable(0)
    with pytest.raises(ValueError, match=r"^unknown similarity metric 'psnr'; choose from ssim, ncc, l1$"):
        NeighbourTable(3, "psnr")


# Mutation round 11: upscaling in either side, 8-bit rounding of every averaging step, window 1.

def test_a_frame_upscaled_in_height_only_is_bicubic():
    """40 high x 90 wide -> 64 x 64: the width shrinks but the height grows, so bicubic (any
    upscaling), not bilinear (kills testing only the width)."""
    img = np.random.default_rng(2).integers(0, 256, (40, 90), dtype=np.uint8)
    want = cv2.resize(img, (64, 64), interpolation=cv2.INTER_CUBIC)
    assert not np.array_equal(want, cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(fast_resize(img, 64, 64), want)


def test_small_gray_rounds_each_halving_to_8_bits():
    """128 x 128 -> 64 x 64 is one exact halving of the 8-bit gray: 2x2 blocks of gray 0, 0, 0, 1
    average to 0.25, stored as 0; blocks of 1, 1, 1, 0 to 0.75, stored as 1 (kills resizing the
    gray as floats, which keeps 0.25 / 255 and 0.75 / 255)."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[::2, ::2] = 1                # top-left of every block: gray 1, the other three 0
    img[64:] = 1
    img[64::2, ::2] = 0              # lower half: three 1s and one 0 per block
    g = small_gray(img)
    np.testing.assert_array_equal(g[:32], 0)
    np.testing.assert_array_equal(g[32:], np.float32(1 / 255))


def test_window_1_stores_each_pair_in_both_rows():
    """window = 1: row k holds sim(k, k - 1) left of the 1 and sim(k, k + 1) right of it. Flat
    frames 0.2 and 0.5: l1 = 1 - 0.3 = 0.7, in both rows (kills a table that fills only one side
    at window 1)."""
    a, b = np.full((16, 16), 0.2, np.float32), np.full((16, 16), 0.5, np.float32)
    table = similarity_table([a, b], 1, "l1")
    np.testing.assert_allclose(table, [[np.nan, 1, 0.7], [0.7, 1, np.nan]], atol=1e-6)
    t = NeighbourTable(10, "l1")  # trimmed to the one neighbour there is
    for s in (a, b):
        t.push(s)
    np.testing.assert_allclose(t.table(trim=True), [[np.nan, 1, 0.7], [0.7, 1, np.nan]], atol=1e-6)
