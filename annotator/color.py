"""Colour-space helpers shared by the dataset, inference and evaluation.

Gray is BT.601 luma (Y' = 0.299 R + 0.587 G + 0.114 B) on gamma-encoded RGB: the same
definition everywhere in the repo, so "the input's lightness" has one meaning.
All functions take HWC (or ...HWC) float arrays in [0, 1] unless stated otherwise.
"""
from __future__ import annotations

import numpy as np

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# BT.601 YCbCr (analogue form, Cb/Cr in [-0.5, 0.5]).
_KB, _KR = 0.114, 0.299


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float image -> float32 in [0, 1]. Any other type (a 32-bit integer TIFF)
    is a ValueError "unsupported pixel type ...", as annotator.video's 8-bit reading says it: its
    scale is unknown, and taken as floats in [0, 1] its frame came out nearly white."""
    if img.dtype in (np.uint8, np.uint16):
        out = img.astype(np.float32)
        out /= np.float32(255 if img.dtype == np.uint8 else 65535)  # in place: no second full-frame array
        return out
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"unsupported pixel type {img.dtype}")
    return img.astype(np.float32, copy=False)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8, rounded; the arithmetic in place on the clipped copy (one temporary, not three)."""
    out = np.clip(img, 0.0, 1.0)
    out *= 255.0
    out += 0.5
    return out.astype(np.uint8)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image (...HW3) -> (...HW), float32."""
    return to_float(rgb) @ LUMA_WEIGHTS


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    rgb = to_float(rgb)
    y = rgb @ LUMA_WEIGHTS
    cb = (rgb[..., 2] - y) / (2.0 * (1.0 - _KB))
    cr = (rgb[..., 0] - y) / (2.0 * (1.0 - _KR))
    return np.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    y, cb, cr = ycc[..., 0], ycc[..., 1], ycc[..., 2]
    r = y + 2.0 * (1.0 - _KR) * cr
    b = y + 2.0 * (1.0 - _KB) * cb
    g = (y - _KR * r - _KB * b) / (1.0 - _KR - _KB)
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0,1] -> CIE Lab (L in [0,100], D65) via OpenCV's float path.

    That path interpolates tables: against the exact formulas it is off by up to 0.22 in L
    and 0.5 in a and b (0.08 on average; grays get |a|, |b| up to 0.125), measured on 100k
    random colours with OpenCV 5.0. No metric uses Lab; the reinhard baseline and anchored
    mode match a/b statistics in it (on the demo, anchored mode's a/b means and stds moved by
    about 0.1 against an exact conversion)."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(to_float(rgb)), cv2.COLOR_RGB2Lab)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab -> sRGB in [0,1] via OpenCV's float path, which clamps out-of-gamut colours to the
    cube itself (before its gamma table, whose ends are exactly 0 and 1): no clip needed here."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(lab, dtype=np.float32), cv2.COLOR_Lab2RGB)


def transfer_luma(color: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """Keep the chroma of `color` (HW3) and take the luma from `gray` (HW), both in [0,1].

    Works in BT.601 YCbCr, which is linear in RGB, so the result's luma equals `gray`
    exactly. Where luma + chroma would leave the RGB cube, the chroma is scaled down per
    pixel (towards gray) instead of clipping each channel, because channel clipping would
    change the luma again.

    The largest scale that stays inside is min over channels of (1 - y) / offset (offset > 0)
    and -y / offset (offset < 0); division being monotonic, that is (1 - y) / max(offset) and
    -y / min(offset), so only two HW divisions are needed. Everything is done plane by plane:
    numpy's arithmetic and reductions over a length-3 last axis are many times slower (the
    reductions alone took this function from 43.7 to 11.4 ms on a 720x720 frame, the arithmetic
    from 32 to 19 ms on a 1280x720 one, each time with identical results).
    """
    import cv2

    color, gray = to_float(color), to_float(gray)
    if color.shape[:-1] != gray.shape:
        raise ValueError(f"colour {color.shape[:-1]} and gray {gray.shape} differ in size")
    luma = color @ LUMA_WEIGHTS
    planes = [np.subtract(color[..., c], luma) for c in range(3)]  # chroma as an RGB offset with zero luma
    r, g, b = planes
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    y = np.clip(gray, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(hi > 0, (1.0 - y) / hi, np.inf)
        down = np.where(lo < 0, -y / lo, np.inf)
    scale = np.clip(np.minimum(up, down), 0.0, 1.0)
    for p in planes:  # in place: no temporaries
        p *= scale
        p += y
        np.clip(p, 0.0, 1.0, out=p)
    planes = [p.astype(np.float32, copy=False) for p in planes]
    return cv2.merge(planes) if color.ndim == 3 and color.size else np.stack(planes, axis=-1)  # batches too
