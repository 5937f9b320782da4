"""Any frame -> its gray, and whether it was colour: the one reduction the pipeline and the
baselines share (BT.601 luma, annotator.color.rgb_to_gray)."""
from __future__ import annotations

import math

import numpy as np

from annotator.color import rgb_to_gray, to_float

COLOUR_TOL = 2.0 / 255  # mean channel spread above which a 3-channel frame counts as colour...
TINT_TOL = 8.0 / 255  # ...unless it is this small and the same everywhere: a gray video's decoding cast
COLOUR_SAMPLE = 1 << 16  # pixels the colour test looks at, at most about (a strided grid)


def to_gray(frame: np.ndarray) -> tuple[np.ndarray, bool]:
    """Any frame (HW, HW1, HW2 gray+alpha, HW3 RGB, HW4 RGBA; uint8/uint16/float) -> (gray, colour).

    gray is float32 HW in [0, 1] at the input's precision; 3/4-channel frames become their
    BT.601 luma, and `colour` says whether they were really colour: the mean spread
    max(R, G, B) - min(R, G, B) is above COLOUR_TOL, and either above TINT_TOL or varying over
    the frame (its mean absolute deviation above COLOUR_TOL). A gray clip written by OpenCV's
    MPEG-4 writer decodes with G 3 levels above B everywhere: a uniform cast, not colour.
    The spread is averaged over every k-th
    row and column, k = round(sqrt(pixels / COLOUR_SAMPLE)) (frames up to ~150k pixels are
    looked at whole; 720p at k = 4), with element-wise maxima of the channel planes: the
    full-frame reduction over the length-3 channel axis took ~80 ms on a 720p frame, about
    25 times its decode.
    """
    f = to_float(np.asarray(frame))
    if f.ndim == 3 and f.shape[2] in (1, 2):
        f = f[..., 0]
    if f.ndim == 2:
        return np.ascontiguousarray(f, dtype=np.float32), False
    if f.ndim != 3 or f.shape[2] not in (3, 4):
        raise ValueError(f"unsupported frame shape {f.shape}")
    # RGBA: a contiguous copy, so the luma comes out of the same matmul kernel as for RGB (a
    # strided view takes another summation path on some CPUs and differs by an ulp)
    rgb = f if f.shape[2] == 3 else np.ascontiguousarray(f[..., :3])
    spread = pixel_spread(rgb)
    mean = float(spread.mean())
    colour = mean > COLOUR_TOL and (mean > TINT_TOL or float(np.abs(spread - mean).mean()) > COLOUR_TOL)
    return rgb_to_gray(rgb), colour


def pixel_spread(rgb: np.ndarray) -> np.ndarray:
    """max(R, G, B) - min(R, G, B) of a float HW3 image, on a strided grid of ~COLOUR_SAMPLE pixels."""
    k = max(1, round(math.sqrt(rgb.shape[0] * rgb.shape[1] / COLOUR_SAMPLE)))
    r, g, b = (rgb[::k, ::k, c] for c in range(3))
    return np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)


def array_problem(img, reference: bool = False) -> str | None:
    """What is wrong with a frame (or, `reference`, a colour reference) handed to the library as an
    array, in one phrase, or None. The layout: HW gray or HWC with 1-4 channels, a reference HW3
    or HW4 (a CHW array came out as stripes). The scale of float pixels, taken as [0, 1]: 0-255
    or [-1, 1] floats, NaN or inf came out wrong without a word (a little outside [0, 1], as HDR
    images or a resampler's overshoot, is clipped as before)."""
    if not isinstance(img, np.ndarray):
        return f"expected a numpy array, got {type(img).__name__}"
    if reference and img.ndim == 2:
        return f"gray ({img.shape[0]}x{img.shape[1]}): a reference needs colours"
    if reference and (img.ndim != 3 or img.shape[2] not in (3, 4)):
        return f"expected an HxWx3 (or x4) RGB image, got shape {img.shape}"
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] > 4):
        return f"expected an HxW gray or HxWxC image (C = 1 to 4), got shape {img.shape}"
    if img.dtype not in (np.uint8, np.uint16) and not np.issubdtype(img.dtype, np.floating):
        return f"pixel type {img.dtype}: pass uint8, uint16 or float in [0, 1]"
    if np.issubdtype(img.dtype, np.floating) and img.size:
        lo, hi = float(img.min()), float(img.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return "has NaN or infinite pixels"
        if hi > 2 or lo < -0.5:
            return (f"float pixels are taken as [0, 1], these range over [{lo:.3g}, {hi:.3g}]"
                    + (" (0-255 values? pass them as uint8)" if hi > 2 else " ([-1, 1]? map them to [0, 1])"))
    return None

