"""annotator.color: BT.601 luma, and transfer_luma (luminance-true recombination)."""
import numpy as np
import pytest

from annotator.color import (LUMA_WEIGHTS, lab_to_rgb, rgb_to_gray, rgb_to_lab, rgb_to_ycbcr, to_float, to_uint8,
                             transfer_luma, ycbcr_to_rgb)


def transfer_luma_per_channel(color, gray):
    """The definition, channel by channel: the largest chroma scale in [0, 1] that keeps every
    channel of y + scale * offset inside [0, 1]."""
    color, gray = to_float(color), to_float(gray)
    offset = color - (color @ LUMA_WEIGHTS)[..., None]
    y = np.clip(gray, 0.0, 1.0)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(offset > 0, (1.0 - y) / offset, np.inf)
        down = np.where(offset < 0, -y / offset, np.inf)
    scale = np.clip(np.minimum(up, down).min(axis=-1, keepdims=True), 0.0, 1.0)
    return np.clip(y + scale * offset, 0.0, 1.0).astype(np.float32)


def test_gray_is_bt601_luma():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    np.testing.assert_allclose(rgb_to_gray(rgb), [[0.299, 0.587, 0.114, 1.0]], rtol=0, atol=1e-6)


def test_transfer_luma_equals_the_per_channel_definition_bit_for_bit():
    rng = np.random.default_rng(0)
    color = rng.random((37, 53, 3), dtype=np.float32)
    color[:3] = 0.4                       # gray pixels: no chroma
    color[3:6] = [1.0, 0.0, 0.0]          # saturated: out of gamut for most target lumas
    gray = rng.random((37, 53), dtype=np.float32)
    gray[6:8] = 0.0
    gray[8:10] = 1.0
    assert np.array_equal(transfer_luma(color, gray), transfer_luma_per_channel(color, gray))


def test_transfer_luma_takes_the_luma_and_keeps_in_gamut_chroma():
    rng = np.random.default_rng(1)
    color = 0.4 + 0.2 * rng.random((16, 16, 3), dtype=np.float32)  # mild colours
    gray = 0.45 + 0.1 * rng.random((16, 16), dtype=np.float32)    # lumas that keep them in gamut
    out = transfer_luma(color, gray)
    np.testing.assert_allclose(rgb_to_gray(out), gray, rtol=0, atol=2e-7)  # float32 rounding
    chroma = lambda x: x - rgb_to_gray(x)[..., None]  # noqa: E731
    np.testing.assert_allclose(chroma(out), chroma(color), rtol=0, atol=5e-7)


def test_transfer_luma_scales_out_of_gamut_chroma_towards_gray():
    red = np.full((1, 1, 3), [1.0, 0.0, 0.0], np.float32)
    out = transfer_luma(red, np.full((1, 1), 0.9, np.float32))[0, 0]
    # luma 0.9 with red's full offset would put R at 1.601: scale = 0.1 / 0.701
    offset = np.array([0.701, -0.299, -0.299], np.float32)
    np.testing.assert_allclose(out, 0.9 + (0.1 / 0.701) * offset, rtol=0, atol=1e-6)
    assert out.max() <= 1.0 and abs(float(out @ LUMA_WEIGHTS) - 0.9) < 1e-6


@pytest.mark.parametrize("gray_shape", [(5, 4), (4, 1), (4, 6), (1, 5)])
def test_size_mismatch_is_an_error(gray_shape):
    """Any side that differs is refused: a (4, 1) or (1, 5) gray would broadcast silently."""
    with pytest.raises(ValueError, match=r"^colour \(4, 5\) and gray \(\d, \d\) differ in size$"):
        transfer_luma(np.zeros((4, 5, 3), np.float32), np.zeros(gray_shape, np.float32))


def test_lab_round_trip():
    """OpenCV's float Lab path interpolates its gamma curves: the round trip is close, not exact
    (measured max error 1.9e-3 on random colours); bound 3e-3, 1/255 being 3.9e-3."""
    rgb = np.random.default_rng(2).random((8, 8, 3), dtype=np.float32)
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, rtol=0, atol=3e-3)


def test_lab_to_rgb_stays_in_the_cube_without_a_clip_of_its_own():
    """OpenCV's float Lab -> RGB clamps out-of-gamut colours (and the gamma table's ends are
    exactly 0 and 1), so lab_to_rgb does not clip again. Lab far outside the gamut (anchor_colours
    shifts a/b freely), every L of the neutral axis and the cube's corners stay in [0, 1]: fails
    if an OpenCV version stops clamping (then restore np.clip in lab_to_rgb)."""
    rng = np.random.default_rng(0)
    wild = rng.uniform((-50, -500, -500), (200, 500, 500), (300, 300, 3)).astype(np.float32)
    near = rng.uniform((0, -128, -128), (100, 127, 127), (300, 300, 3)).astype(np.float32)
    axis = np.zeros((1, 100001, 3), np.float32)
    axis[..., 0] = np.linspace(0, 100, 100001, dtype=np.float32)
    corners = rgb_to_lab(np.array([[[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)]], np.float32))
    for lab in (wild, near, axis, corners, corners + np.float32(1e-3), corners - np.float32(1e-3)):
        rgb = lab_to_rgb(lab)
        assert rgb.dtype == np.float32 and rgb.min() >= 0.0 and rgb.max() <= 1.0, (rgb.min(), rgb.max())
    assert (lab_to_rgb(wild) == 0).any() and (lab_to_rgb(wild) == 1).any()  # clamped, not scaled



def test_lab_to_rgb_takes_float64_and_strided_lab():
    """OpenCV's Lab -> RGB takes contiguous float32 only: a float64 Lab or a view of one is made so
    first, giving float32 RGB equal to that of the float32 copy."""
    lab = rgb_to_lab(np.random.default_rng(1).uniform(0, 1, (8, 10, 3)).astype(np.float32))
    want = lab_to_rgb(np.ascontiguousarray(lab[:, ::-1]))
    got = lab_to_rgb(lab.astype(np.float64)[:, ::-1])
    assert got.dtype == np.float32 and got.shape == (8, 10, 3) and np.array_equal(got, want)

def test_ycbcr_by_hand_and_round_trip():
    """BT.601 YCbCr with Cb, Cr in [-0.5, 0.5]: pure red is (0.299, -0.1687, 0.5), pure blue
    (0.114, 0.5, -0.0813); back to RGB within float32 rounding (used by tools/make_toy_model.py)."""
    ycc = rgb_to_ycbcr(np.array([[1.0, 0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]], np.float32))
    np.testing.assert_allclose(ycc, [[0.299, -0.168736, 0.5], [0.114, 0.5, -0.081312], [0.5, 0, 0]], atol=1e-6)
    rgb = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    ycc = rgb_to_ycbcr(rgb)
    assert np.array_equal(ycc[..., 0], rgb_to_gray(rgb))
    np.testing.assert_allclose(ycbcr_to_rgb(ycc), rgb, atol=2e-6)


def test_to_float_and_to_uint8_scale_by_the_top_level_and_round():
    assert to_float(np.array([0, 65535], np.uint16)).tolist() == [0.0, 1.0]  # 16-bit white is 1.0
    assert to_float(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    levels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(to_float(levels)), levels)  # round trip
    # rounded, not truncated: 0.5 / 255 -> 1, just under -> 0; clipped outside [0, 1]
    assert to_uint8(np.array([0.5 / 255 + 1e-6, 0.5 / 255 - 1e-6, -0.2, 1.3], np.float32)).tolist() == [1, 0, 0, 255]


def test_float64_input_gives_float32():
    x = np.random.default_rng(3).random((2, 3, 3))
    assert to_float(x).dtype == np.float32 and ycbcr_to_rgb(x).dtype == np.float32
    np.testing.assert_allclose(to_float(x), x, rtol=0, atol=1e-7)


def test_lab_of_8_bit_rgb_is_on_the_float_scale():
    """L in [0, 100], a and b signed (not OpenCV's 8-bit Lab, L * 255 / 100 and a, b + 128):
    white (100, 0, 0), black (0, 0, 0), pure red (53.24, 80.09, 67.20) by the sRGB/D65
    definition (OpenCV's interpolated curves: within 0.02)."""
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8)
    lab = rgb_to_lab(rgb)
    np.testing.assert_allclose(lab[0], [[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20]], rtol=0, atol=0.02)
    np.testing.assert_array_equal(lab, rgb_to_lab(rgb / np.float32(255)))


def test_transfer_luma_of_black_takes_the_gray_at_both_ends():
    """Black has no chroma (offset exactly 0): the result is the gray itself, also at 0 and 1
    where the gamut bound divides 0 by 0."""
    out = transfer_luma(np.zeros((1, 3, 3), np.float32), np.array([[0.0, 0.3, 1.0]], np.float32))
    np.testing.assert_array_equal(out[0], np.float32([[0.0] * 3, [0.3] * 3, [1.0] * 3]))


def test_transfer_luma_takes_8_bit_inputs_on_the_0_1_scale():
    rng = np.random.default_rng(4)
    color, gray = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(transfer_luma(color, gray),
                                  transfer_luma(color / np.float32(255), gray / np.float32(255)))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int16, np.uint32, np.bool_])
def test_to_float_refuses_pixels_of_unknown_scale(dtype):
    """A 32-bit integer TIFF's int32 was passed through as floats in [0, 1]: a frame nearly white."""
    with pytest.raises(ValueError, match=f"^unsupported pixel type {np.dtype(dtype)}$"):
        to_float(np.zeros((2, 2), dtype))
    for ok in (np.uint8, np.uint16, np.float16, np.float32, np.float64):  # inputs are 8/16-bit or float
        assert to_float(np.ones((2, 2), ok)).dtype == np.float32


def test_transfer_luma_of_a_batch_is_that_of_each_frame():
    """The plane-by-plane version merged with cv2.merge, which made a batch (N, H, 3W)."""
    rng = np.random.default_rng(3)
    colour, gray = rng.random((2, 5, 7, 3), dtype=np.float32), rng.random((2, 5, 7), dtype=np.float32)
    batch = transfer_luma(colour, gray)
    assert batch.shape == (2, 5, 7, 3) and all(np.array_equal(batch[i], transfer_luma(colour[i], gray[i]))
                                              for i in range(2))
    assert transfer_luma(np.zeros((0, 4, 3), np.float32), np.zeros((0, 4), np.float32)).shape == (0, 4, 3)

