"""Baselines by construction: exact luma, reference chroma statistics, known motion."""
import errno
import io
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotator.color import rgb_to_gray, rgb_to_lab, to_uint8
from colorize.baselines import (
    _Held, _fit, _pack, flow_propagate, iter_baseline, iter_flow, luma_band_chroma, reinhard, reinhard_bands, run_baseline,
)
from colorize.metrics import psnr

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "bigbuckbunny.mp4"
# Outputs of the baselines as they were before they streamed (commit 065e2c6, when `reinhard`
# was today's `reinhard-bands`), on frames 0-5 of the sample clip at 71x40 (inputs included):
# float outputs as round(x * 65535), CLI outputs as the 8-bit PNGs it wrote.
EXPECTED = Path(__file__).resolve().parent / "baselines_expected.npz"


def colour_texture(h, w, seed=0):
    """Smooth random colours with luma texture (float32 RGB in [0, 1])."""
    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 3.0)
    return (x - x.min()) / (x.max() - x.min())


def moving_clip(n, dx, dy, h=96, w=128, seed=0):
    """RGB uint8 frames whose content moves (dx, dy) >= 0 px per frame."""
    big = to_uint8(colour_texture(h + n * dy, w + n * dx, seed))
    return [np.ascontiguousarray(big[(n - i) * dy:(n - i) * dy + h, (n - i) * dx:(n - i) * dx + w]) for i in range(n)]


@pytest.mark.parametrize("method", [reinhard, reinhard_bands])
def test_reinhard_keeps_luma_and_follows_reference_chroma(method):
    ref = colour_texture(40, 70, seed=1) * 0.6 + np.array([0.3, 0.15, 0.05], np.float32)  # warm, in gamut
    gray = rgb_to_gray(ref)
    out = method([gray, to_uint8(gray)], ref)
    assert len(out) == 2 and out[0].shape == (40, 70, 3) and out[0].dtype == np.float32
    np.testing.assert_allclose(rgb_to_gray(out[0]), gray, atol=2e-6)
    np.testing.assert_allclose(rgb_to_gray(out[1]), to_uint8(gray) / 255.0, atol=2e-6)
    # The target is the reference's own gray, so its lightness histogram is the reference's
    # and the mean chroma must come back (the band means average to the global mean).
    ref_ab = rgb_to_lab(ref)[..., 1:].reshape(-1, 2).mean(0)
    out_ab = rgb_to_lab(out[0])[..., 1:].reshape(-1, 2).mean(0)
    np.testing.assert_allclose(out_ab, ref_ab, atol=1.0)
    assert np.abs(ref_ab).max() > 10  # the test reference is clearly tinted


def test_reinhard_transfers_chroma_per_lightness_band():
    # Reference: dark pixels blue, bright pixels yellow. A target of another size and aspect
    # ratio gets blue shadows and yellow highlights.
    ref = np.zeros((10, 40, 3), np.float32)
    ref[:, :20] = (0.1, 0.15, 0.45)
    ref[:, 20:] = (0.85, 0.8, 0.3)
    pos, ab = luma_band_chroma(ref)
    assert len(pos) == 2 and ab[0, 1] < -20 and ab[1, 1] > 20  # Lab b: blue, then yellow
    target = np.tile(np.linspace(0.0, 1.0, 30, dtype=np.float32), (17, 1))
    out = reinhard_bands([target], ref)[0]
    b = rgb_to_lab(out)[..., 2]
    dark, bright = target < 0.15, target > 0.8
    assert (b[dark & (target > 0.02)] < -5).all() and (b[bright & (target < 0.98)] > 5).all()
    np.testing.assert_allclose(rgb_to_gray(out), target, atol=2e-6)


def test_white_falls_in_the_top_band():
    """32 bands over [0, 1], the last closed: white (luma 1) shares band 31 with a pale yellow
    (luma 0.977), one node at their mean luma, not a 33rd band of its own."""
    ref = np.ones((4, 4, 3), np.float32)
    ref[2:] = (1.0, 1.0, 0.8)
    pos, ab = luma_band_chroma(ref)
    assert pos.shape == (1,) and pos[0] == pytest.approx((1.0 + 0.9772) / 2, abs=1e-4)
    assert ab[0, 1] == pytest.approx(rgb_to_lab(ref)[..., 2].mean(), abs=1e-3)  # half the yellow's Lab b


def test_reinhard_is_the_global_lab_statistics_transfer():
    """Reinhard et al. 2001 on a gray target: a and b have zero spread, so (x - mean_t) * std_r / std_t
    + mean_r leaves the reference's global mean a, b on every pixel; the lightness is the input's."""
    ref = np.zeros((10, 40, 3), np.float32)  # the blue/yellow reference above
    ref[:, :20] = (0.1, 0.15, 0.45)
    ref[:, 20:] = (0.85, 0.8, 0.3)
    mean_ab = rgb_to_lab(ref)[..., 1:].reshape(-1, 2).mean(0)
    target = np.tile(np.linspace(0.3, 0.7, 30, dtype=np.float32), (17, 1))  # mid-tones: no gamut clipping
    out = reinhard([target], ref)[0]
    ab = rgb_to_lab(out)[..., 1:].reshape(-1, 2)
    np.testing.assert_allclose(ab, np.broadcast_to(mean_ab, ab.shape), atol=0.3)  # one tint everywhere
    np.testing.assert_allclose(rgb_to_gray(out), target, atol=2e-6)
    assert np.abs(mean_ab).max() > 5  # a real tint, the same in shadows and highlights (unlike the bands)


def test_flow_reproduces_a_translated_pattern():
    gt = moving_clip(6, 3, 2)
    gray = [rgb_to_gray(f) for f in gt]
    out = flow_propagate(gray, gt[0])
    inner = np.s_[16:-16, 20:-20]  # away from the strip that enters the frame
    for t in range(6):
        np.testing.assert_allclose(rgb_to_gray(out[t]), gray[t], atol=2e-6)
        assert psnr(to_uint8(out[t])[inner], gt[t][inner]) > 40, t  # ~17-22 dB without motion
    assert psnr(to_uint8(out[0]), gt[0]) > 45  # the reference frame itself


def test_flow_refuses_frames_too_small_for_optical_flow():
    """OpenCV's DIS flow crashes the process on some 12-15 pixel high frames (14x200 here)."""
    gt = [np.random.default_rng(i).integers(0, 255, (14, 200, 3), dtype=np.uint8) for i in range(2)]
    with pytest.raises(ValueError, match="frames of 200x14 pixels are too small for optical flow"):
        flow_propagate([rgb_to_gray(f) for f in gt], gt[0])


def test_flow_from_a_middle_reference_and_from_several():
    gt = moving_clip(7, 2, 1, seed=3)
    gray = [to_uint8(rgb_to_gray(f)) for f in gt]  # uint8 input works too
    inner = np.s_[16:-16, 20:-20]
    out = flow_propagate(gray, gt[3], reference_index=3)
    assert all(psnr(to_uint8(o)[inner], g[inner]) > 30 for o, g in zip(out, gt))
    # Two references: frames 0..2 come from frame 0's, 3..6 from frame 5's. A reference whose
    # colours are swapped (R<->B) shows where each frame took its colour from.
    swapped = np.ascontiguousarray(gt[5][..., ::-1])
    out = run_baseline("flow", gray, [gt[0], swapped], reference_indices=[0, 5])
    for t, o in enumerate(out):
        want = gt[t] if t <= 2 else gt[t][..., ::-1]
        assert psnr(to_uint8(o)[inner][..., [0, 2]], want[inner][..., [0, 2]]) > 25, t


def cut_clip():
    """RGB uint8 frames of two shots (each moving 1 px right and down per frame), cut 0-2 | 3-5 | 6-7:
    the second is another texture upside down with R and B swapped; 6-7 are the first shot's
    frames 1-2 again (shot, reverse shot, shot)."""
    a = moving_clip(3, 1, 1, h=48, w=64, seed=0)
    b = [np.ascontiguousarray(f[::-1, :, ::-1]) for f in moving_clip(3, 1, 1, h=48, w=64, seed=5)]
    return a + b + a[1:]


@pytest.mark.parametrize("method", ["reinhard", "reinhard-bands"])
def test_reinhard_takes_the_most_similar_reference_not_the_nearest(method):
    """Frame 2 is nearer frame 3 (the other shot's reference) than frame 0: it still takes frame
    0's colours, with or without the references' indices, as frames 6-7 do."""
    clip = cut_clip()
    gray = [rgb_to_gray(f) for f in clip]
    refs = [clip[0], clip[3]]
    alone = [run_baseline(method, gray, r) for r in refs]
    for idx in (None, [0, 3]):
        for t, out in enumerate(run_baseline(method, gray, refs, idx)):
            np.testing.assert_array_equal(out, alone[1 if 3 <= t <= 5 else 0][t], err_msg=f"frame {t}, {idx}")


@pytest.mark.parametrize("refs, idx", [
    ((0, 3), [0, 3]),  # frame 2 is nearer frame 3; frames 6-7 walk from flow straight to frame 0's colours
    ((6, 4), [6, 4]),  # frames 0-2 wait for frame 6, but the cut comes first: they start from straight flow
])
def test_flow_takes_the_most_similar_reference_and_never_walks_across_a_cut(refs, idx):
    clip = cut_clip()
    gray = [rgb_to_gray(f) for f in clip]
    out = run_baseline("flow", gray, [clip[r] for r in refs], idx)
    inner = np.s_[8:-8, 10:-10]  # away from the strip that enters the frame
    score = [psnr(to_uint8(o)[inner], f[inner]) for o, f in zip(out, clip, strict=True)]
    assert min(score) > 30, np.round(score, 1)  # ~10-15 dB from the other shot's reference
    for t in idx:
        assert score[t] > 45, (t, score[t])  # a reference frame itself


def test_flow_frames_waiting_for_a_reference_frame_past_the_end_raise_unyielded():
    """A run whose reference frame lies past the clip's end: its frames wait to the end, and
    iter_flow raises there (after the other runs' frames), so no frame is left waiting after the
    check (iter_flow's trailing `yield from direct(waiting)` was unreachable and is gone)."""
    clip = cut_clip()[:6]  # shot a (frames 0-2), shot b (frames 3-5)
    gray = [rgb_to_gray(f) for f in clip]
    got = []
    with pytest.raises(ValueError, match=r"reference index 9 outside the clip \(0\.\.5\)"):
        for out in iter_flow(gray, [clip[0], clip[3]], [0, 9]):
            got.append(out)
    assert len(got) == 3  # shot a only; shot b's frames were waiting for frame 9
    with pytest.raises(ValueError, match=r"reference index 3 outside the clip \(0\.\.2\)"):
        next(iter_flow(gray[:3], [clip[0]], [3]))  # every frame waiting: nothing yielded



def test_flow_of_an_empty_clip_yields_nothing():
    """No frames: nothing waits, so no reference index is checked against the clip (n = 0)."""
    clip = cut_clip()[:1]
    assert list(iter_flow([], [clip[0]], [0])) == []

def test_reference_of_another_size_is_resized():
    gt = moving_clip(3, 1, 1)
    big_ref = cv2.resize(gt[0], (256, 192), interpolation=cv2.INTER_CUBIC)
    out = flow_propagate([rgb_to_gray(f) for f in gt], big_ref)
    assert out[2].shape == gt[2].shape
    assert psnr(to_uint8(out[0]), gt[0]) > 35


def test_run_baseline_dispatch_and_errors():
    gt = moving_clip(3, 1, 0)
    gray = [rgb_to_gray(f) for f in gt]
    np.testing.assert_array_equal(run_baseline("reinhard", gray, gt[0])[1], reinhard(gray, gt[0])[1])
    np.testing.assert_array_equal(run_baseline("reinhard-bands", gray, gt[0])[1], reinhard_bands(gray, gt[0])[1])
    np.testing.assert_array_equal(run_baseline("flow", gray, gt[0])[2], flow_propagate(gray, gt[0])[2])
    # Several references: reinhard takes the most similar (SSIM of gray thumbnails), not the darkened copy.
    dark = (gt[0] * 0.3).astype(np.uint8)
    tinted = np.clip(gt[0].astype(int) + (40, 0, -40), 0, 255).astype(np.uint8)
    picked = run_baseline("reinhard-bands", gray, [dark, tinted])
    np.testing.assert_array_equal(picked[0], reinhard_bands(gray[:1], tinted)[0])
    with pytest.raises(ValueError, match="unknown baseline 'nope'; choose from reinhard, reinhard-bands, flow"):
        run_baseline("nope", gray, gt[0])
    with pytest.raises(ValueError, match="needs their frame indices"):
        run_baseline("flow", gray, [gt[0], gt[1]])
    with pytest.raises(ValueError, match="outside the clip"):
        flow_propagate(gray, gt[0], reference_index=3)
    with pytest.raises(ValueError, match=r"reference index -1 outside the clip \(indices start at 0\)"):
        flow_propagate(gray, gt[0], reference_index=-1)  # not "the last frame", nor a run without its frame
    with pytest.raises(ValueError, match="two references for frame 1"):
        run_baseline("flow", gray, [gt[0], gt[1]], [1, 1])
    assert flow_propagate([], gt[0]) == []


def test_flow_takes_the_colour_of_an_rgba_reference_and_drops_its_alpha():
    """A reference read with its alpha channel (an RGBA PNG) colours as its RGB: _fit keeps the
    first three channels, bit for bit (a 4-channel warp would not fit the frame's 3 colours)."""
    gt = moving_clip(3, 1, 1, h=48, w=64)
    gray = [rgb_to_gray(f) for f in gt]
    rgba = np.concatenate([gt[0], np.full((48, 64, 1), 7, np.uint8)], -1)
    for a, b in zip(flow_propagate(gray, rgba), flow_propagate(gray, gt[0])):
        np.testing.assert_array_equal(a, b)


def test_reinhard_bands_takes_an_rgba_reference_as_its_rgb_bit_for_bit():
    """The band table of an RGBA reference is its RGB's: the gray of a strided RGB view differed in
    the last float32 bit (numpy's matmul over it sums in another order), moving pixels across
    band edges."""
    gt = moving_clip(2, 1, 1, h=48, w=64)
    gray = [rgb_to_gray(f) for f in gt]
    rgba = np.concatenate([gt[0], np.full((48, 64, 1), 7, np.uint8)], -1)
    for got, want in zip(luma_band_chroma(rgba), luma_band_chroma(gt[0])):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(reinhard_bands(gray, rgba)[1], reinhard_bands(gray, gt[0])[1])


def test_baselines_on_the_sample_clip():
    """Real footage, 12 frames at 160x90: flow beats Reinhard, which beats gray."""
    cap = cv2.VideoCapture(str(SAMPLE))
    gt = []
    while len(gt) < 12:
        ok, f = cap.read()
        assert ok
        gt.append(cv2.cvtColor(cv2.resize(f, (160, 90), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    gray = [rgb_to_gray(f) for f in gt]
    score = {m: np.mean([psnr(to_uint8(o), g) for o, g in zip(run_baseline(m, gray, gt[0])[1:], gt[1:])])
             for m in ("reinhard", "reinhard-bands", "flow")}
    score["gray"] = np.mean([psnr(to_uint8(np.repeat(g[..., None], 3, -1)), f) for g, f in zip(gray[1:], gt[1:])])
    assert score["flow"] > 30 and score["flow"] > score["reinhard-bands"] > score["gray"], score
    assert score["reinhard"] > score["gray"], score


# ---- streaming: same outputs as before, bounded memory ---------------------------------------

def _q(outs):
    return np.stack([(np.clip(o, 0, 1) * 65535 + 0.5).astype(np.uint16) for o in outs])


def test_streamed_baselines_give_the_outputs_of_the_in_memory_ones():
    e = np.load(EXPECTED)
    gray, col, ref_b = list(e["gray"]), e["colour"], e["ref_b"]
    cases = {
        "reinhard_single": ("reinhard-bands", col[0], None),
        "reinhard_multi_hist": ("reinhard-bands", [col[0], ref_b], None),
        # indices are not used by reinhard: each frame takes the most similar reference (here
        # always col[0]; the in-memory version took ref_b, the nearest, for frames 3-5)
        "reinhard_multi_hist@idx": ("reinhard-bands", [col[0], ref_b], [0, 4]),
        "flow_mid": ("flow", col[3], 3),
        "flow_two": ("flow", [col[1], np.ascontiguousarray(col[4][..., ::-1])], [1, 4]),
    }
    for key, (method, refs, idx) in cases.items():
        got = _q(iter_baseline(method, iter(gray), refs, idx))  # a one-pass iterator
        key = key.split("@")[0]
        # Bit-identical on the machine that wrote EXPECTED; other CPUs take other SIMD paths in
        # OpenCV's resize/DIS and round a few float32 values the other way: 1/65535 allowed,
        # on at most 0.2 % of the values (seen: 35 of 51,120 on a second x86_64 machine).
        diff = np.abs(got.astype(int) - e[key])
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.002, (key, diff.max(), (diff > 0).sum())


class Feed:
    """Frames that count how many have been taken."""

    def __init__(self, frames):
        self.frames, self.taken = frames, 0

    def __iter__(self):
        for f in self.frames:
            self.taken += 1
            yield f


@pytest.mark.parametrize("method", ["reinhard", "reinhard-bands", "flow"])
def test_baselines_stream_frame_by_frame(method):
    gray = [to_uint8(rgb_to_gray(f)) for f in moving_clip(6, 2, 1, h=48, w=64)]
    ref = moving_clip(6, 2, 1, h=48, w=64)[0]
    feed, done = Feed(gray), []
    taken = []
    for out in iter_baseline(method, feed, ref, 0, progress=done.append):
        taken.append(feed.taken)
        assert out.shape == (48, 64, 3)
    assert taken == [1, 2, 3, 4, 5, 6]  # output t comes as soon as frame t is read
    assert done == [1] * 6  # progress counts processing


def test_flow_frames_before_the_reference_wait_packed():
    gray = [to_uint8(rgb_to_gray(f)) for f in moving_clip(6, 2, 1, h=48, w=64)]
    ref = moving_clip(6, 2, 1, h=48, w=64)[3]
    feed, done, taken = Feed(gray), [], []
    for _ in iter_baseline("flow", feed, ref, 3, progress=done.append):
        taken.append((feed.taken, len(done)))
    # frames 0-2 wait for frame 3 (all four processed when the first comes out), then it streams
    assert taken == [(4, 4), (4, 4), (4, 4), (4, 4), (5, 5), (6, 6)]
    g = gray[0] / np.float32(255)
    assert _pack(g).dtype == np.uint8 and np.array_equal(_pack(g) / np.float32(255), g)
    g16 = np.full((4, 4), 1000 / 65535, np.float32)
    assert _pack(g16).dtype == np.uint16
    luma = rgb_to_gray(moving_clip(1, 0, 0, h=8, w=8)[0] / 255)  # the luma of a colour frame: kept as is
    assert _pack(luma) is luma



def test_held_frames_come_back_bit_for_bit_from_ram_and_from_a_temporary_file(tmp_path):
    """_Held keeps arrays in RAM up to its budget, then moves all of them into an anonymous file in
    its folder (nothing named there, nothing left once closed); each dtype and shape comes back
    exactly, in either mode, by index, iteration and pop."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (5, 7), dtype=np.uint8), rng.integers(0, 65535, (5, 7), dtype=np.uint16),
              rng.random((5, 7), dtype=np.float32), rng.random((3, 4, 3), dtype=np.float32)]
    budget = arrays[0].nbytes + arrays[1].nbytes  # the first two fit; the third spills them all
    held = _Held(budget, tmp_path)
    for k, a in enumerate(arrays):
        held.append(a)
        assert (held.file is None) == (k < 2) and len(held) == k + 1
        assert held.in_ram == (sum(x.nbytes for x in arrays[:k + 1]) if k < 2 else 0)
    assert all(isinstance(x, tuple) for x in held.items)  # in the file: only where each lies
    assert list(tmp_path.iterdir()) == []  # unlinked as made
    for got, want in [*zip(held, arrays), (held[2], arrays[2])]:
        assert got.dtype == want.dtype and np.array_equal(got, want)
    last = held.pop()
    assert np.array_equal(last, arrays[3]) and len(held) == 3 and last.flags.writeable
    held.close()
    assert len(held) == 0 and held.file is None
    unlimited = _Held()
    for a in arrays:
        unlimited.append(a)
    assert unlimited.file is None and all(x is a for x, a in zip(unlimited, arrays))


def test_a_full_disk_under_held_frames_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    """The temporary file has no name, so the OSError of a full disk would name none."""
    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda dir: Full())
    held = _Held(0, tmp_path)
    with pytest.raises(OSError) as e:
        held.append(np.zeros(3, np.uint8))
    assert str(e.value) == f"cannot hold flow's waiting frames in a temporary file in {tmp_path}: No space left on device"


def test_flow_holds_frames_before_a_late_reference_in_a_temporary_file_past_its_ram(tmp_path):
    """Frames waiting for a reference frame 30 frames in (their gray, then their outputs) go to a
    temporary file past `ram` (0 here): the outputs are bit for bit those held in RAM, while the
    memory traced at the peak (numpy's arrays) drops from 13 bytes a pixel for each waiting frame
    to what the walk itself holds. Nothing is left in the folder."""
    import tracemalloc
    clip = moving_clip(34, 1, 0, h=48, w=64)
    gray = [to_uint8(rgb_to_gray(f)) for f in clip]

    want = list(iter_flow(gray, [clip[30]], [30]))

    def peak(**kw):  # the outputs checked as they come, none kept
        tracemalloc.start()
        try:
            n = 0
            for n, out in enumerate(iter_flow(gray, [clip[30]], [30], **kw), 1):
                assert np.array_equal(out, want[n - 1])
            assert n == 34
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak_ram, peak_file = peak(), peak(ram=0, spill_to=tmp_path)
    frame = 48 * 64 * 13
    # measured: 38 frames' worth and 9.4 (the walk's own arrays: reference, maps, grids)
    assert peak_ram > 30 * frame and peak_file < 15 * frame, (peak_ram / frame, peak_file / frame)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["reinhard", "flow"])
def test_colour_frames_are_taken_as_their_luma(method):
    """The baselines reduce frames as the pipeline does (colorize.gray.to_gray): RGB and RGBA
    frames give exactly the outputs of their BT.601 luma."""
    clip = moving_clip(3, 2, 1, h=48, w=64)
    ref = clip[0]
    rgba = [np.dstack([f, np.full(f.shape[:2], 255, np.uint8)]) for f in clip]
    gray = run_baseline(method, [rgb_to_gray(f) for f in clip], ref)
    for frames in (clip, rgba):
        assert max_abs(run_baseline(method, frames, ref), gray) == 0.0


def max_abs(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_a_reference_of_another_size_is_area_averaged_down_and_bilinear_up():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (40, 60, 3), np.uint8)
    f = ref.astype(np.float32) / 255
    np.testing.assert_array_equal(_fit(ref, (20, 30)), cv2.resize(f, (30, 20), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(_fit(ref, (80, 120)), cv2.resize(f, (120, 80), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(_fit(ref, (40, 60)), f)



@pytest.mark.parametrize("method", ["reinhard", "reinhard-bands", "flow"])
def test_frames_and_references_given_as_arrays_are_checked(method):
    """0-255 float frames came out white and NaN frames as NaN, without a word (the references
    were checked; the frames were not)."""
    ref = np.full((16, 24, 3), 0.5, np.float32)
    for frame, says in [(np.full((16, 24), 200.0), r"^frame: float pixels are taken as \[0, 1\]"),
                        (np.full((16, 24), np.nan), "^frame: has NaN or infinite pixels$")]:
        with pytest.raises(ValueError, match=says):
            list(iter_baseline(method, [frame] * 2, ref, 0))
    with pytest.raises(ValueError, match=r"^reference: expected an HxWx3 \(or x4\) RGB image, got shape \(3, 16, 24\)$"):
        list(iter_baseline(method, [np.full((16, 24), 0.5, np.float32)] * 2, ref.transpose(2, 0, 1), 0))
