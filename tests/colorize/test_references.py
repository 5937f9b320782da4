"""colorize.references: choosing a reference per frame, and anchoring a chain's colours to it."""
from pathlib import Path

import numpy as np
import pytest

from annotator.color import rgb_to_gray, rgb_to_lab
from annotator.video import iter_frames
from colorize import references as R
from colorize.gray import to_gray

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "bigbuckbunny.mp4"
LUMA_TOL = 1e-5  # float32 rounding of the YCbCr recombination


@pytest.fixture(scope="module")
def clip():
    """Colour frames 0, 3, 120 and 125 of the sample clip at 1/9 size (80x143)."""
    keep = {0, 3, 120, 125}
    return {i: np.ascontiguousarray(rgb[::9, ::9]) for i, _, rgb in iter_frames(SAMPLE, stop=126, check_count=False)
            if i in keep}


def test_anchor_colours_matches_statistics_and_keeps_luma(clip):
    img = clip[0].astype(np.float32) / 255 * 0.6 + 0.2  # mid-tones: no gamut clipping
    ref = clip[125].astype(np.float32) / 255 * 0.6 + 0.2
    stats = R.chroma_stats(ref)
    matched = R.anchor_colours(img, stats, 1.0)
    assert np.abs(R.chroma_stats(matched) - stats).max() < 0.5  # Lab units
    assert np.abs(rgb_to_gray(matched) - rgb_to_gray(img)).max() < LUMA_TOL
    assert np.array_equal(R.anchor_colours(img, stats, 0.0), img)
    half = R.anchor_colours(img, stats, 0.5)
    assert 0.3 < np.abs(half - img).mean() / np.abs(matched - img).mean() < 0.7


def test_anchor_strength_moves_the_chroma_statistics_linearly(clip):
    """Any strength in (0, 1], not only 0.5 and 1, moves the a/b mean and std that fraction of the
    way to the target (target: mean +6/-6 Lab, std x0.7). Luma recombination and float32 Lab cost
    up to 0.04 Lab units (measured); 0.2 allowed, and 0.1 x 6 = 0.6 to miss."""
    img = clip[0].astype(np.float32) / 255 * 0.6 + 0.2  # mid-tones: no gamut clipping
    own = R.chroma_stats(img)
    stats = np.stack([own[0] + [6.0, -6.0], own[1] * 0.7])
    for s in (0.1, 0.25, 0.75):
        got = R.chroma_stats(R.anchor_colours(img, stats, s))
        np.testing.assert_allclose(got, own + s * (stats - own), rtol=0, atol=0.2, err_msg=f"strength {s}")


def test_chroma_stats_are_the_population_mean_and_std_of_lab_ab():
    """Two colours, each on two of four pixels: mean = their midpoint, std = half their distance
    (the population std anchor_colours matches against; a sample std would be 2/sqrt(3) of it)."""
    p, q = np.float32([0.7, 0.3, 0.2]), np.float32([0.2, 0.4, 0.6])
    img = np.stack([p, q, p, q])[None]  # 1x4 RGB
    ab_p, ab_q = rgb_to_lab(p[None, None])[0, 0, 1:], rgb_to_lab(q[None, None])[0, 0, 1:]
    want = np.stack([(ab_p + ab_q) / 2, np.abs(ab_p - ab_q) / 2])
    assert np.abs(ab_p - ab_q).min() > 10  # distinct in a and b, so a wrong std shows by > 1 Lab unit
    np.testing.assert_allclose(R.chroma_stats(img), want, rtol=1e-5, atol=1e-4)  # float32 Lab


def test_anchor_colours_does_not_blow_up_a_nearly_gray_image():
    """The a/b std is divided by at least 1 Lab unit: a nearly gray output (std ~0.2) gets its
    chroma noise scaled by 10 for a reference std of 10, not by 50 to the reference's whole std."""
    img = 0.5 + np.random.default_rng(0).normal(0, 0.001, (16, 16, 3)).astype(np.float32)
    stats = np.array([[5.0, -5.0], [10.0, 10.0]])
    got = R.chroma_stats(R.anchor_colours(img, stats, 1.0))
    assert np.abs(got[0] - stats[0]).max() < 0.1  # means matched
    assert np.abs(got[1] - 10 * R.chroma_stats(img)[1]).max() < 0.1  # measured 2.15, 2.01 vs 2.12, 2.00


def test_most_similar_frames_takes_the_first_of_equals(clip):
    gray = to_gray(clip[3])[0]
    other = to_gray(clip[120])[0]
    assert R.most_similar_frames([other, gray, gray, other], [clip[3]]) == [1]
    # negative SSIM is still a score: of two inverted frames (-0.62, -0.58) the second is nearer
    assert R.most_similar_frames([1 - gray, 1 - to_gray(clip[0])[0]], [clip[3]]) == [1]
