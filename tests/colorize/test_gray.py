"""colorize.gray: the gray of any frame and the (subsampled) colour test, against the full-frame definition."""
from pathlib import Path

import numpy as np
import pytest

from annotator.color import rgb_to_gray, to_float
from annotator.video import iter_frames
from colorize.frames_io import write_video_atomic
from colorize.gray import COLOUR_TOL, TINT_TOL, array_problem, pixel_spread, to_gray

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "bigbuckbunny.mp4"


def full_spread(rgb: np.ndarray) -> float:
    """The definition, on every pixel: mean of max(R, G, B) - min(R, G, B)."""
    f = to_float(rgb)[..., :3].astype(np.float64)
    return float((f.max(-1) - f.min(-1)).mean())


def test_the_subsampled_spread_is_the_full_frame_spread_on_real_frames():
    for i, _, rgb in iter_frames(SAMPLE, stop=132, check_count=False):
        if i % 30:
            continue
        full = full_spread(rgb)  # 720p: looked at on every 4th row and column
        assert abs(pixel_spread(to_float(rgb)).mean() - full) < 0.02 * full + 1e-4, i
        gray, colour = to_gray(rgb)
        assert colour and full > TINT_TOL, i
        np.testing.assert_array_equal(gray, rgb_to_gray(to_float(rgb)))  # the gray itself is untouched


def test_small_frames_are_looked_at_whole():
    rgb = np.zeros((300, 300, 3), np.float32)
    rgb[7, 13] = (1.0, 0.0, 0.0)  # one coloured pixel, off every stride grid but k = 1
    assert pixel_spread(rgb).mean() == np.float32(1.0) / np.float32(300 * 300)


def test_the_stride_is_the_rounded_square_root_of_pixels_per_sample():
    """k = round(sqrt(pixels / 65536)), not its floor: 720p (sqrt 14.06 = 3.75) is looked at on
    every 4th row and column, 400x400 (sqrt 2.44 = 1.56) on every 2nd, 380x380 (1.48) whole."""
    assert pixel_spread(np.zeros((720, 1280, 3), np.float32)).shape == (180, 320)
    assert pixel_spread(np.zeros((400, 400, 3), np.float32)).shape == (200, 200)
    assert pixel_spread(np.zeros((380, 380, 3), np.float32)).shape == (380, 380)


def test_the_thresholds_on_a_720p_frame():
    """A channel offset of d levels: colour above COLOUR_TOL (2 levels; exactly 2 is float rounding)
    where it varies over the frame; a uniform one only above TINT_TOL (8 levels)."""
    base = np.random.default_rng(0).integers(0, 245, (720, 1280), dtype=np.uint8)
    half = np.zeros_like(base)
    half[:, :640] = 1  # the offset on the left half only: spread d or 0, mean and deviation d / 2
    for d, offset, colour in ((1, 1, False), (3, 1, False), (7, 1, False), (9, 1, True),
                              (3, half, False), (6, half, True)):
        rgb = np.dstack([base + d * offset, base, base])
        assert to_gray(rgb)[1] is colour, (d, np.ndim(offset))
        assert to_gray(np.dstack([rgb, np.full_like(base, 255)]))[1] is colour, d  # RGBA
    assert to_gray(np.dstack([base, base, base]))[1] is False


def test_a_gray_frame_with_a_small_coloured_logo_stays_gray():
    """0.5 % of the pixels pure red (a channel logo) on a gray frame: the mean spread is 0.005,
    below COLOUR_TOL, so gray, however much the spread deviates from its mean there (0.0099);
    ten times the logo, 5 % (mean 0.05), is colour."""
    frame = np.full((200, 200, 3), 0.5, np.float32)
    frame[:10, :20] = (1.0, 0.0, 0.0)  # 200 of 40000 pixels
    spread = pixel_spread(frame)
    assert spread.mean() == np.float32(0.005) and np.abs(spread - spread.mean()).mean() > COLOUR_TOL
    assert to_gray(frame)[1] is False
    frame[:100, :20] = (1.0, 0.0, 0.0)
    assert to_gray(frame)[1] is True


def test_a_gray_clip_through_the_mpeg4_writer_stays_gray(tmp_path):
    """OpenCV's MPEG-4 round trip casts gray frames (G 3 levels above B, the same everywhere)."""
    frames = [to_float(rgb) for _, _, rgb in iter_frames(SAMPLE, stop=3, check_count=False)]
    grays = [np.repeat(rgb_to_gray(f)[..., None], 3, axis=2) for f in frames]
    write_video_atomic(tmp_path / "gray.mp4", iter(grays), 24)
    write_video_atomic(tmp_path / "colour.mp4", iter(frames), 24)
    decoded = [rgb for _, _, rgb in iter_frames(tmp_path / "gray.mp4", check_count=False)]
    assert len(decoded) == 3 and max(pixel_spread(to_float(f)).mean() for f in decoded) > COLOUR_TOL  # the cast
    assert not any(to_gray(f)[1] for f in decoded)
    assert all(to_gray(f)[1] for _, _, f in iter_frames(tmp_path / "colour.mp4", check_count=False))


def test_gray_plus_alpha_takes_the_gray_channel():
    ga = np.stack([np.full((4, 5), 100, np.uint8), np.full((4, 5), 255, np.uint8)], axis=-1)  # gray 100, opaque
    gray, colour = to_gray(ga)
    assert not colour and gray.shape == (4, 5)
    np.testing.assert_array_equal(gray, np.float32(100 / 255))


def test_an_rgba_frame_has_the_gray_of_its_rgb_bit_for_bit():
    """The alpha is dropped into a contiguous copy: numpy's matmul over a strided RGB view takes
    another summation path and differs by an ulp (6e-8 on 37x53 random floats here), so the
    same picture with and without alpha would give different grays, and different outputs."""
    rgba = np.random.default_rng(4).random((37, 53, 4), dtype=np.float32)
    gray, colour = to_gray(rgba)
    want, want_colour = to_gray(rgba[..., :3].copy())
    np.testing.assert_array_equal(gray, want)
    assert colour == want_colour


RGB = np.full((6, 8, 3), 0.5, np.float32)


@pytest.mark.parametrize("img, reference, problem", [
    (RGB, True, None), (RGB[..., 0], False, None), (np.zeros((6, 8, 4), np.uint16), True, None),
    (RGB * 1.02 - 0.01, True, None),  # a resampler's overshoot: clipped later, as before
    (RGB[..., 0], True, "gray (6x8): a reference needs colours"),
    (RGB.transpose(2, 0, 1), True, "expected an HxWx3 (or x4) RGB image, got shape (3, 6, 8)"),
    (np.zeros((2, 6, 8, 3)), False, "expected an HxW gray or HxWxC image (C = 1 to 4), got shape (2, 6, 8, 3)"),
    (RGB * 255, False, "float pixels are taken as [0, 1], these range over [128, 128] (0-255 values? pass them "
                       "as uint8)"),
    (RGB * 2 - 1.6, True, "float pixels are taken as [0, 1], these range over [-0.6, -0.6] ([-1, 1]? map them "
                          "to [0, 1])"),
    (np.where(np.arange(8) == 3, np.nan, 0.5)[None], False, "has NaN or infinite pixels"),
    ([[0.5]], False, "expected a numpy array, got list"),
])
def test_arrays_given_to_the_library_are_checked_for_layout_and_scale(img, reference, problem):
    """A CHW reference came out as stripes and 0-255 floats as white, without a word."""
    assert array_problem(img, reference) == problem
