"""Baselines by construction: exact luma, reference chroma statistics, known motion."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotator.color import rgb_to_gray, rgb_to_lab, to_uint8
from colorize.baselines import flow_propagate, luma_band_chroma, reinhard, run_baseline
from colorize.metrics import psnr

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "bigbuckbunny.mp4"


def colour_texture(h, w, seed=0):
    """Smooth random colours with luma texture (float32 RGB in [0, 1])."""
    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 3.0)
    return (x - x.min()) / (x.max() - x.min())


def moving_clip(n, dx, dy, h=96, w=128, seed=0):
    """RGB uint8 frames whose content moves (dx, dy) >= 0 px per frame."""
    big = to_uint8(colour_texture(h + n * dy, w + n * dx, seed))
    return [np.ascontiguousarray(big[(n - i) * dy:(n - i) * dy + h, (n - i) * dx:(n - i) * dx + w]) for i in range(n)]


def test_reinhard_keeps_luma_and_follows_reference_chroma():
    ref = colour_texture(40, 70, seed=1) * 0.6 + np.array([0.3, 0.15, 0.05], np.float32)  # warm, in gamut
    gray = rgb_to_gray(ref)
    out = reinhard([gray, to_uint8(gray)], ref)
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
    out = reinhard([target], ref)[0]
    b = rgb_to_lab(out)[..., 2]
    dark, bright = target < 0.15, target > 0.8
    assert (b[dark & (target > 0.02)] < -5).all() and (b[bright & (target < 0.98)] > 5).all()
    np.testing.assert_allclose(rgb_to_gray(out), target, atol=2e-6)


def test_flow_reproduces_a_translated_pattern():
    gt = moving_clip(6, 3, 2)
    gray = [rgb_to_gray(f) for f in gt]
    out = flow_propagate(gray, gt[0])
    inner = np.s_[16:-16, 20:-20]  # away from the strip that enters the frame
    for t in range(6):
        np.testing.assert_allclose(rgb_to_gray(out[t]), gray[t], atol=2e-6)
        assert psnr(to_uint8(out[t])[inner], gt[t][inner]) > 40, t  # ~17-22 dB without motion
    assert psnr(to_uint8(out[0]), gt[0]) > 45  # the reference frame itself


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
    np.testing.assert_array_equal(run_baseline("flow", gray, gt[0])[2], flow_propagate(gray, gt[0])[2])
    # Several references, no indices: reinhard takes the one whose luma histogram is closest.
    dark = (gt[0] * 0.3).astype(np.uint8)
    tinted = np.clip(gt[0].astype(int) + (40, 0, -40), 0, 255).astype(np.uint8)
    picked = run_baseline("reinhard", gray, [dark, tinted])
    np.testing.assert_array_equal(picked[0], reinhard(gray[:1], tinted)[0])
    with pytest.raises(ValueError, match="unknown baseline 'nope'; choose from reinhard, flow"):
        run_baseline("nope", gray, gt[0])
    with pytest.raises(ValueError, match="needs their frame indices"):
        run_baseline("flow", gray, [gt[0], gt[1]])
    with pytest.raises(ValueError, match="outside the clip"):
        flow_propagate(gray, gt[0], reference_index=3)
    assert flow_propagate([], gt[0]) == []


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
             for m in ("reinhard", "flow")}
    score["gray"] = np.mean([psnr(to_uint8(np.repeat(g[..., None], 3, -1)), f) for g, f in zip(gray[1:], gt[1:])])
    assert score["flow"] > 30 and score["flow"] > score["reinhard"] > score["gray"], score
