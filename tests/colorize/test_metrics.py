"""Metrics against values worked out by hand on tiny arrays."""
import math

import cv2
import numpy as np
import pytest

from colorize import metrics as M


def smooth_rgb(h, w, seed=0, lo=20, hi=200):
    """Smooth random colour texture in [lo, hi] (uint8), textured enough for optical flow."""
    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 2.0)
    x = (x - x.min()) / (x.max() - x.min())
    return (lo + x * (hi - lo) + 0.5).astype(np.uint8)


# ---- PSNR ----------------------------------------------------------------------------

def test_psnr_constant_offset_of_10():
    gt = smooth_rgb(20, 30)
    assert M.psnr(gt + np.uint8(10), gt) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)


def test_psnr_one_wrong_pixel_and_float_input():
    gt = np.zeros((4, 5, 3), np.uint8)
    pred = gt.copy()
    pred[1, 2, 0] = 60  # MSE = 60^2 / 60 values = 60
    assert M.psnr(pred, gt) == pytest.approx(10 * math.log10(255**2 / 60), abs=1e-9)
    assert M.psnr(pred / 255.0, gt.astype(np.float32)) == pytest.approx(M.psnr(pred, gt), abs=1e-6)


def test_psnr_identical_is_capped_and_shape_checked():
    gt = smooth_rgb(8, 8)
    assert M.psnr(gt, gt) == M.PSNR_CAP_DB
    near = gt / 255.0  # float64, 1e-7 off: an MSE of ~6.5e-10 levels^2 would be ~140 dB uncapped
    assert M.psnr(near + 1e-7, near) == M.PSNR_CAP_DB
    with pytest.raises(ValueError, match="shape"):
        M.psnr(gt, gt[:, :7])


def test_a_nan_pixel_is_refused_not_scored_as_the_cap():
    """min(cap, nan) is the cap: one NaN pixel scored a frame 100 dB (26 -> 44.5 dB for a
    4-frame clip), and its NaN SSIM was left out of the mean without a word."""
    gt = smooth_rgb(16, 16) / 255.0
    bad = gt.copy()
    bad[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="^an image holds NaN or infinite values$"):
        M.psnr(bad, gt)
    with pytest.raises(ValueError, match="^an image holds NaN or infinite values$"):
        M.psnr(gt, np.where(bad == bad, bad, np.inf))
    clip = [gt, gt, gt]
    with pytest.raises(ValueError, match=r"^model: b holds NaN or infinite values$"):
        M.evaluate_clips(clip, {"model": [gt, bad, gt]}, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"^ground truth: c holds NaN or infinite values$"):
        M.evaluate_clips([gt, gt, bad], {"model": clip}, ["a", "b", "c"])


# ---- SSIM ----------------------------------------------------------------------------

def test_ssim_identical_is_one():
    x = smooth_rgb(24, 40)
    assert M.ssim(x, x) == pytest.approx(1.0, abs=1e-6)


def test_ssim_of_constant_images_is_the_luminance_term():
    # sigma = 0 everywhere, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) at every pixel.
    a, b = 100.0, 130.0
    c1 = (0.01 * 255) ** 2
    x = np.full((16, 16, 3), a, np.uint8)
    y = np.full((16, 16, 3), b, np.uint8)
    assert M.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6)


def test_ssim_of_images_under_11_px_a_side_is_the_whole_map():
    """No valid interior under 11 px on a side (either side): the whole reflect-padded map is averaged."""
    for h, w in [(10, 10), (8, 40), (40, 8)]:
        x, y = smooth_rgb(h, w, seed=1), smooth_rgb(h, w, seed=2)
        m = M.ssim_map(x, y)
        assert M.ssim(x, y) == pytest.approx(m.astype(np.float64).mean(), abs=1e-6), (h, w)
    x, y = smooth_rgb(11, 12, seed=1), smooth_rgb(11, 12, seed=2)  # 11 px: the 1x2 valid interior
    assert M.ssim(x, y) == pytest.approx(M.ssim_map(x, y)[5:6, 5:7].astype(np.float64).mean(), abs=1e-6)


def brute_force_ssim(x, y):
    """Wang et al. 2004 by its definition: explicit 11x11 Gaussian window, valid windows only."""
    g = cv2.getGaussianKernel(11, 1.5)
    w = (g @ g.T).astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for c in range(x.shape[2]):
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px = x[i:i + 11, j:j + 11, c].astype(np.float64)
                py = y[i:i + 11, j:j + 11, c].astype(np.float64)
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return np.mean(vals)


def test_ssim_matches_the_definition_on_a_noisy_pair():
    x = smooth_rgb(18, 23, seed=1, lo=0, hi=255)
    rng = np.random.default_rng(2)
    y = np.clip(x.astype(int) * 0.7 + 30 + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    got = M.ssim(x, y)
    assert got == pytest.approx(brute_force_ssim(x, y), abs=1e-5)
    assert 0.2 < got < 0.95
    assert M.ssim(y, x) == pytest.approx(got, abs=1e-6)


# ---- colourfulness -------------------------------------------------------------------

def test_colourfulness_of_gray_is_zero():
    g = smooth_rgb(10, 12)[..., :1].repeat(3, axis=-1)
    assert M.colourfulness(g) == pytest.approx(0.0, abs=1e-9)


def test_colourfulness_by_hand():
    img = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)  # a red and a blue pixel
    # rg = [255, 0]: mean 127.5, std 127.5;  yb = [127.5, -255]: mean -63.75, std 191.25
    expected = math.hypot(127.5, 191.25) + 0.3 * math.hypot(127.5, -63.75)
    assert M.colourfulness(img) == pytest.approx(expected, abs=1e-9)
    assert M.colourfulness(img / 255.0) == pytest.approx(expected, abs=1e-6)


# ---- CDC -----------------------------------------------------------------------------

def test_js_divergence_by_hand():
    p, q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    m = np.array([0.75, 0.25])
    expected = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert M.js_divergence(p, q) == pytest.approx(expected, abs=1e-12)
    assert M.js_divergence(p, p) == 0.0
    assert m.sum() == 1.0


def test_channel_histograms_one_bin_per_level():
    img = np.array([[[0, 10, 255], [0, 11, 255]]], np.uint8)
    h = M.channel_histograms(img)
    assert h.shape == (3, 256)
    np.testing.assert_allclose(h.sum(1), 1.0)
    assert h[0, 0] == 1.0 and h[1, 10] == 0.5 and h[1, 11] == 0.5 and h[2, 255] == 1.0


def test_cdc_zero_for_identical_frames_positive_for_different():
    f = smooth_rgb(12, 16)
    assert M.cdc([f] * 5) == 0.0
    assert M.cdc([f, f, smooth_rgb(12, 16, seed=3)]) > 0.01


def test_cdc_strides_by_hand():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    # Disjoint histograms: JS = ln 2 on every channel.
    assert M.cdc([a, b]) == pytest.approx(math.log(2))  # only stride 1 fits in 2 frames
    # a b a b a: stride 1 -> ln 2, stride 2 -> 0, stride 4 -> 0
    assert M.cdc([a, b, a, b, a]) == pytest.approx(math.log(2) / 3)
    assert math.isnan(M.cdc([a]))


# ---- warp error ----------------------------------------------------------------------

def test_frames_of_16_pixels_a_side_are_enough_for_flow():
    M.check_flow_size((16, 16, 3))
    for shape in [(15, 200), (200, 15)]:
        with pytest.raises(ValueError, match="at least 16 pixels a side"):
            M.check_flow_size(shape)


def test_warp_error_zero_for_a_static_clip():
    gt = smooth_rgb(48, 64)
    pred = smooth_rgb(48, 64, seed=5)  # any colouring, as long as it does not change
    errs = M.warp_errors([pred] * 4, [gt] * 4)
    assert errs.shape == (3,)
    np.testing.assert_allclose(errs, 0.0, atol=1e-6)


def shifted_clip(n, dx, dy, h=64, w=80, seed=0):
    """Content moving right by dx and down by dy px per frame (dx, dy >= 0)."""
    big = smooth_rgb(h + n * dy, w + n * dx, seed=seed)
    return [np.ascontiguousarray(big[(n - i) * dy:(n - i) * dy + h, (n - i) * dx:(n - i) * dx + w]) for i in range(n)]


def test_warp_error_follows_motion_and_measures_flicker():
    gt = shifted_clip(4, 2, 1)
    flow = M.gt_flow(gt[0], gt[1])
    assert flow.valid.mean() > 0.9
    inner = np.s_[8:-8, 8:-8]
    np.testing.assert_allclose(flow.map_x[inner] - np.arange(80)[8:-8], -2, atol=0.25)
    np.testing.assert_allclose(flow.map_y[inner] - np.arange(64)[8:-8, None], -1, atol=0.25)
    assert np.nanmax(M.warp_errors(gt, gt)) < 1.0  # colours that move with the content
    flicker = [np.clip(f.astype(int) + (20 if i % 2 else 0), 0, 255).astype(np.uint8) for i, f in enumerate(gt)]
    np.testing.assert_allclose(M.warp_errors(flicker, gt), 20, atol=1.0)


# ---- whole clip ----------------------------------------------------------------------

def test_evaluate_clips_shares_flow_and_reports_everything():
    gt = shifted_clip(5, 1, 0)
    off = [f + np.uint8(10) for f in gt]
    ev = M.evaluate_clips(gt, {"same": gt, "offset": off}, [f"f{i}" for i in range(5)])
    assert ev.frames == ["f0", "f1", "f2", "f3", "f4"]
    same, offset = ev.methods["same"], ev.methods["offset"]
    np.testing.assert_allclose(offset.per_frame["psnr"], 20 * math.log10(25.5), atol=1e-9)
    np.testing.assert_allclose(same.per_frame["ssim"], 1.0, atol=1e-6)
    assert math.isnan(same.per_frame["warp_error"][0])
    np.testing.assert_allclose(same.per_frame["warp_error"][1:], offset.per_frame["warp_error"][1:], atol=1e-4)
    assert same.cdc == pytest.approx(ev.ground_truth["cdc"])
    assert same.means()["warp_error"] == pytest.approx(ev.ground_truth["warp_error"])
    assert set(same.means()) == {"psnr", "ssim", "colourfulness", "warp_error", "cdc"}
    with pytest.raises(ValueError, match="offset: f1 has shape"):
        M.evaluate_clips(gt, {"offset": [off[0], off[1][:, :-1]] + off[2:]}, [f"f{i}" for i in range(5)])
    with pytest.raises(ValueError, match="short: no prediction for frame 2"):
        M.evaluate_clips(gt, {"short": gt[:2]})


def test_streamed_cdc_keeps_only_the_last_frames_and_equals_the_pairwise_definition():
    """A whole film's histograms were kept per method (6 KB a frame; evaluate.py grew 45 KB a
    frame): the stream keeps max(strides) + 1 frames' at most, and gives the definition, per
    stride the mean over pairs s apart of the channel-mean JS divergence, then the mean."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(40)]
    hists = [M.channel_histograms(f) for f in frames]
    acc = M.CDC()
    for t, h in enumerate(hists):
        acc.add(h, t)
        assert len(acc.recent) == min(t + 1, max(M.CDC_STRIDES) + 1)
    want = np.mean([np.mean([M.js_divergence(hists[t], hists[t + s]).mean() for t in range(40 - s)])
                    for s in M.CDC_STRIDES])
    assert acc.value() == pytest.approx(want, rel=1e-12) and want > 0.1
    assert M.cdc(frames) == acc.value()
    with pytest.raises(ValueError, match="positions must increase"):
        acc.add(hists[0], 39)


def cdc_from_histograms(hists, positions=None) -> float:
    """The CDC of frames with these histograms at these clip positions (default 0..T-1)."""
    acc = M.CDC()
    for p, h in zip(range(len(hists)) if positions is None else positions, hists):
        acc.add(h, p)
    return acc.value()


def test_cdc_pairs_no_frames_across_a_gap():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    hists = np.stack([M.channel_histograms(f) for f in (a, b, a, b)])
    assert cdc_from_histograms(hists, positions=[0, 1, 2, 3]) == cdc_from_histograms(hists)
    # frames 0, 1, 3, 4 of a clip (frame 2 left out): stride 1 pairs (0,1) and (3,4), both
    # a->b: ln 2; stride 2 pairs (1,3) b->a: ln 2; stride 4 pairs (0,4) a->b: ln 2. Read as
    # consecutive frames a b a b, stride 2 would be 0 and the mean ln 2 / 2.
    assert cdc_from_histograms(hists, positions=[0, 1, 3, 4]) == pytest.approx(math.log(2))
    assert cdc_from_histograms(hists) == pytest.approx(math.log(2) / 2)
    assert math.isnan(cdc_from_histograms(hists[:2], positions=[0, 9]))  # no pair at 1, 2 or 4 apart


def test_evaluate_stream_leaves_gaps_out_of_the_warp_error():
    gt = shifted_clip(5, 1, 0)
    off = [f + np.uint8(10) for f in gt]
    keep = [0, 1, 3, 4]  # frame 2 left out
    steps = [(gt[i], {"offset": off[i]}) for i in keep]
    ev = M.evaluate_stream(steps, ["offset"], [f"f{i}" for i in keep], positions=keep)
    full = M.evaluate_clips(gt, {"offset": off})
    w, w_full = ev.methods["offset"].per_frame["warp_error"], full.methods["offset"].per_frame["warp_error"]
    assert np.isnan(w[0]) and np.isnan(w[2])  # frame 3 follows no scored frame
    np.testing.assert_allclose(w[[1, 3]], w_full[[1, 4]], rtol=0, atol=1e-9)  # the same pairs as in the full clip
    np.testing.assert_allclose(ev.methods["offset"].per_frame["psnr"], 20 * math.log10(25.5), atol=1e-9)
    gt_pairs = [M.warp_errors(gt[i - 1:i + 1], gt[i - 1:i + 1])[0] for i in (1, 4)]  # the truth's own
    assert ev.ground_truth["warp_error"] == pytest.approx(np.mean(gt_pairs), abs=1e-9)
    with pytest.raises(ValueError, match="positions must increase"):
        M.evaluate_stream(steps, ["offset"], positions=[0, 2, 1, 3])


def test_warp_error_counts_only_the_valid_pixels():
    """Identity flow trusted on the left half only: a change confined to the right half (an
    occlusion, say) costs nothing; the same change on the left costs its size."""
    h, w = 16, 32
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    valid = np.zeros((h, w), bool)
    valid[:, : w // 2] = True
    flow = M.FlowField(xs, ys, valid)
    prev = np.full((h, w, 3), 0.5, np.float32)
    right, left = prev.copy(), prev.copy()
    right[:, w // 2 :] = 1.0
    left[:, : w // 2] += 10 / 255
    assert M.warp_error_pair(prev, right, flow) == 0.0
    assert M.warp_error_pair(prev, left, flow) == pytest.approx(10.0, abs=1e-4)


def _uniform(h, w, dx, dy):
    return np.broadcast_to(np.array([dx, dy], np.float32), (h, w, 2)).copy()


def test_flow_is_trusted_where_it_lands_inside_the_frame():
    """Content moving 2 px left and 1 px up: pixel (x, y) of frame t+1 comes from (x + 2,
    y + 1), which is outside frame t for the last 2 columns and the last row; landing
    exactly on the last column or row counts as inside."""
    h, w = 16, 24
    f = M.checked_flow(back=_uniform(h, w, 2, 1), fwd=_uniform(h, w, -2, -1))
    np.testing.assert_array_equal(f.map_x[0], np.arange(w) + 2)
    np.testing.assert_array_equal(f.map_y[:, 0], np.arange(h) + 1)
    expected = np.zeros((h, w), bool)
    expected[: h - 1, : w - 2] = True
    np.testing.assert_array_equal(f.valid, expected)
    left_up = M.checked_flow(back=_uniform(h, w, -3, -2), fwd=_uniform(h, w, 3, 2))
    expected = np.zeros((h, w), bool)
    expected[2:, 3:] = True
    np.testing.assert_array_equal(left_up.valid, expected)


@pytest.mark.parametrize("motion, error, trusted", [  # each side of the bound, by hand:
    (2.0, 0.74, True),  # 0.5476 <= 0.01 * (4 + 1.5876) + 0.5 = 0.5559
    (2.0, 0.75, False),  # 0.5625 > 0.01 * (4 + 1.5625) + 0.5 = 0.5556
    (20.0, 2.72, True),  # 7.3984 <= 0.01 * (400 + 298.60) + 0.5 = 7.4860: the relative term counts
    (20.0, 2.75, False),  # 7.5625 > 0.01 * (400 + 297.56) + 0.5 = 7.4756
    (0.0, 0.71066904, True),  # e^2 == 0.01 e^2 + 0.5 exactly in float32: on the bound is trusted
    (0.0, 0.7106691, False),  # the next float32 up
])
def test_forward_backward_check_threshold(motion, error, trusted):
    """Forward flow that undoes the backward flow up to `error` px: trusted exactly when
    |b + f|^2 <= 0.01 (|b|^2 + |f|^2) + 0.5 (Sundaram et al. 2010), worked out by hand."""
    h, w = 16, 64
    f = M.checked_flow(back=_uniform(h, w, motion, 0), fwd=_uniform(h, w, -motion + error, 0))
    inside = np.arange(w) + motion <= w - 1
    assert f.valid[:, inside].all() == trusted
    assert not f.valid[:, ~inside].any()


def test_histograms_round_float_images_to_the_nearest_level():
    """A float frame is binned at its nearest 8-bit level (as to_uint8 writes it), not truncated."""
    img = np.full((4, 4, 3), (37 - 0.001) / 255, np.float32)
    h = M.channel_histograms(img)
    assert h[:, 37].tolist() == [1.0, 1.0, 1.0]


def test_16_bit_images_are_on_the_8_bit_scale():
    """65535 is 255, as 255 is: a 16-bit prediction scores like its 8-bit twin; optical flow's
    8-bit gray keeps 16-bit white white."""
    assert M.to_255(np.array([0, 257, 65535], np.uint16)).tolist() == [0.0, 1.0, 255.0]
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (16, 16, 3), np.uint8)
    pred8 = np.clip(gt.astype(int) + rng.integers(-9, 10, gt.shape), 0, 255).astype(np.uint8)
    pred16 = pred8.astype(np.uint16) * 257
    assert M.psnr(pred16, gt) == pytest.approx(M.psnr(pred8, gt), abs=1e-9)
    assert M.psnr(pred8, gt.astype(np.uint16) * 257) == pytest.approx(M.psnr(pred8, gt), abs=1e-9)  # either side 16-bit
    g16 = np.array([[0, 128, 129, 65535]], np.uint16)
    assert M.gray_u8(g16).tolist() == [[0, 0, 1, 255]]


# ---- dtypes, small and gray images, clip edges ---------------------------------------

def test_to_255_refuses_an_integer_type_it_does_not_know():
    with pytest.raises(TypeError, match=r"^unsupported image dtype int32$"):
        M.to_255(np.zeros((2, 2, 3), np.int32))


def scipy_ssim_map(x, y):
    """SSIM map by the module doc with scipy's Gaussian (sigma 1.5, radius 5) and its 'reflect'
    border (d c b a | a b c d, OpenCV's BORDER_REFLECT), per channel, in float64."""
    from scipy.ndimage import gaussian_filter

    f = lambda a: gaussian_filter(a, 1.5, mode="reflect", truncate=5 / 1.5, axes=(0, 1))  # noqa: E731
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_of_a_small_image_pads_by_reflection():
    """Under 11 px a side the whole map counts, so the border's padding does: 'reflect', the
    edge pixel repeated (not reflect-101)."""
    x, y = smooth_rgb(8, 10, seed=1, lo=0, hi=255), smooth_rgb(8, 10, seed=2, lo=0, hi=255)
    assert M.ssim(x, y) == pytest.approx(scipy_ssim_map(x, y).mean(), abs=1e-5)


def test_ssim_of_gray_hw_images():
    """HW images: one channel, centred on its own mean (a flat 200 vs 201 pair exact to 1e-6),
    and the luminance term's C1 = (0.01 * 255)^2 where it matters (dark: 0 vs 5)."""
    c1 = (0.01 * 255) ** 2
    for a, b in [(200.0, 201.0), (0.0, 5.0)]:
        x, y = np.full((16, 16), a, np.uint8), np.full((16, 16), b, np.uint8)
        assert M.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6), (a, b)
    x = smooth_rgb(18, 23, seed=1, lo=0, hi=255)[..., 0]
    y = np.clip(x * 0.7 + 30 + np.random.default_rng(2).normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    assert M.ssim(x, y) == pytest.approx(brute_force_ssim(x[..., None], y[..., None]), abs=1e-5)


def test_ssim_of_float_images_equals_that_of_their_8_bit_values():
    x, y = smooth_rgb(16, 20, seed=1, lo=0, hi=255), smooth_rgb(16, 20, seed=2, lo=0, hi=255)
    assert M.ssim(x / np.float32(255), y / np.float32(255)) == pytest.approx(M.ssim(x, y), abs=1e-6)
    a, b = 0.3931, 0.5127  # between 8-bit levels: taken at full float32 precision (1e-6 here is ~4e-4 levels)
    c1 = (0.01 * 255) ** 2
    want = (2 * a * b * 255**2 + c1) / ((a * a + b * b) * 255**2 + c1)
    flat = lambda v: np.full((16, 16, 3), v, np.float32)  # noqa: E731
    assert M.ssim(flat(a), flat(b)) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        M.ssim(x, y[:, :-1])


def test_histograms_clip_float_images_outside_0_1():
    img = np.array([[[1.2, -0.1, 1.0]]], np.float32)
    h = M.channel_histograms(img)
    assert h[0, 255] == h[1, 0] == h[2, 255] == 1.0


def test_cdc_takes_the_strides_given():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    clip = [a, b, a, b, a]
    assert M.cdc(clip, strides=(2,)) == 0.0
    assert M.cdc(clip, strides=(1,)) == pytest.approx(math.log(2))
    assert M.cdc(clip, strides=(1, 4)) == pytest.approx(math.log(2) / 2)


def test_gray_u8_is_rgb_bt601_rounded_and_clipped():
    """8-bit red: 0.299 * 255 = 76 (read as BGR it would be blue's 29); floats rounded (0.5 is
    level 127.5 -> 128) and clipped."""
    assert M.gray_u8(np.array([[[255, 0, 0]]], np.uint8)).tolist() == [[76]]
    assert M.gray_u8(np.full((1, 1, 3), 0.5, np.float32)).tolist() == [[128]]
    assert M.gray_u8(np.array([[0.5, 1.5, -0.5]], np.float32)).tolist() == [[128, 255, 0]]


def test_forward_flow_is_read_between_pixels_bilinearly():
    """Backward flow +0.5 px: the forward flow is read half-way between two columns that
    alternate -0.5 + 1 and -0.5 - 1; their mean -0.5 undoes the backward flow exactly (either
    column alone would be 1 px off, beyond the 0.5 bound)."""
    h, w = 16, 24
    fwd = _uniform(h, w, -0.5, 0)
    fwd[:, 0::2, 0] += 1
    fwd[:, 1::2, 0] -= 1
    f = M.checked_flow(back=_uniform(h, w, 0.5, 0), fwd=fwd)
    assert f.valid[:, : w - 1].all() and not f.valid[:, w - 1].any()


def test_warp_error_pair_bilinear_gray_frames_and_no_valid_pixel():
    """A half-pixel flow on a ramp of 10 levels a column lands on the mean of two columns;
    HW frames are one channel; no trusted pixel is NaN; frames of two shapes are refused."""
    h, w = 4, 8
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = np.repeat(xs[..., None] * 10, 3, axis=-1).astype(np.uint8)
    valid = xs + 0.5 <= w - 1
    flow = M.FlowField(xs + 0.5, ys, valid)
    assert M.warp_error_pair(ramp, (ramp.astype(int) + 5).astype(np.uint8), flow) == pytest.approx(0, abs=1e-4)
    still = M.FlowField(xs, ys, np.ones((h, w), bool))
    gray = ramp[..., 0]
    assert M.warp_error_pair(gray, gray + np.uint8(10), still) == pytest.approx(10.0, abs=1e-4)
    assert math.isnan(M.warp_error_pair(ramp, ramp, M.FlowField(xs, ys, np.zeros((h, w), bool))))
    with pytest.raises(ValueError, match="differ in shape"):
        M.warp_error_pair(ramp, ramp[:, :-1], still)


def test_clips_of_other_lengths_and_frame_names_are_named():
    gt = shifted_clip(3, 1, 0, h=16, w=16)
    with pytest.raises(ValueError, match="zip"):
        M.warp_errors(gt[:2], gt)
    with pytest.raises(ValueError, match=r"^long: more frames than the ground truth$"):
        M.evaluate_clips(gt[:2], {"long": gt})
    with pytest.raises(ValueError, match=r"^short: no prediction for frame 2$"):  # past the names given
        M.evaluate_clips(gt, {"short": gt[:2]}, ["a", "b"])
    with pytest.raises(ValueError, match=r"^the ground truth has no frames$"):
        M.evaluate_clips([], {"m": []})
    with pytest.raises(ValueError, match="positions must increase"):
        M.evaluate_stream([(g, {"m": g}) for g in gt], ["m"], positions=[0, 1, 1])
    assert M.evaluate_clips(gt, {"m": gt}).frames == ["00000", "00001", "00002"]
    assert M.evaluate_clips(gt[:2], {"m": gt[:2]}, ["a", "b", "c"]).frames == ["a", "b"]


def test_the_ground_truths_own_colourfulness_and_cdc():
    """Gray predictions: colourfulness 0 and CDC 0 for the method; the ground truth's own values
    are those of its frames (colourfulness and cdc, pinned by hand above)."""
    gt = shifted_clip(3, 1, 0, h=16, w=16)
    gray = [np.full_like(g, 128) for g in gt]
    ev = M.evaluate_clips(gt, {"gray": gray})
    np.testing.assert_array_equal(ev.methods["gray"].per_frame["colourfulness"], 0.0)
    assert ev.methods["gray"].cdc == 0.0
    assert ev.ground_truth["colourfulness"] == pytest.approx(np.mean([M.colourfulness(g) for g in gt]), abs=1e-9)
    assert ev.ground_truth["colourfulness"] > 1 and ev.ground_truth["cdc"] == pytest.approx(M.cdc(gt), abs=1e-12)


def test_evaluate_stream_cdc_pairs_no_frames_across_a_gap():
    """Frames 0, 1, 3, 4 = a b a b: every pair 1, 2 or 4 apart is a and b, ln 2 (read as
    consecutive it would be ln 2 / 2), for the method and the ground truth."""
    a, b = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)
    ev = M.evaluate_stream([(f, {"m": f}) for f in (a, b, a, b)], ["m"], positions=[0, 1, 3, 4])
    assert ev.methods["m"].cdc == pytest.approx(math.log(2)) and ev.ground_truth["cdc"] == pytest.approx(math.log(2))


def test_ground_truth_warp_error_leaves_out_a_pair_without_trusted_pixels(monkeypatch):
    gt = shifted_clip(3, 1, 0)
    real = M.gt_flow
    calls = []

    def first_untrusted(prev, cur, dis=None):
        flow = real(prev, cur, dis)
        calls.append(1)
        return flow._replace(valid=np.zeros_like(flow.valid)) if len(calls) == 1 else flow

    monkeypatch.setattr(M, "gt_flow", first_untrusted)
    ev = M.evaluate_clips(gt, {"m": gt})
    assert np.isnan(ev.methods["m"].per_frame["warp_error"][:2]).all()
    want = M.warp_error_pair(gt[1], gt[2], real(gt[1], gt[2]))
    assert ev.ground_truth["warp_error"] == pytest.approx(want, abs=1e-9)
