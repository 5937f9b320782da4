"""Which reference a frame uses, and how a chain of outputs is held to its reference's colours.

Several references: each frame takes the most similar one, by SSIM of 64x64 gray thumbnails
(annotator/similarity.py, as pair mining). Anchored mode: before an output becomes the next
frame's reference, its Lab chroma statistics are pulled back to the original reference's.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from annotator.color import lab_to_rgb, rgb_to_gray, rgb_to_lab, to_float, transfer_luma
from annotator.similarity import SIM_SIZE, fast_resize, ssim


def _thumb(gray: np.ndarray) -> np.ndarray:
    """A float gray frame as pair mining's 64x64 thumbnail, without its rounding to 8 bits (a
    16-bit input keeps its precision)."""
    return fast_resize(np.ascontiguousarray(gray, dtype=np.float32), SIM_SIZE, SIM_SIZE)


class ReferenceChooser:
    """Most similar reference for a gray frame: SSIM of 64x64 gray thumbnails (_thumb)."""

    def __init__(self, references: Sequence[np.ndarray]):
        self.thumbs = [_thumb(rgb_to_gray(to_float(r)[..., :3])) for r in references]

    def scores(self, gray: np.ndarray) -> list[float]:
        t = _thumb(gray)
        return [ssim(t, r) for r in self.thumbs]

    def __call__(self, gray: np.ndarray) -> int:
        return 0 if len(self.thumbs) == 1 else int(np.argmax(self.scores(gray)))


def most_similar_frames(grays: Iterable[np.ndarray], references: Sequence[np.ndarray]) -> list[int]:
    """For each reference, the position in `grays` of the frame most like it (the first on a tie).

    Streams: one pass, thumbnails only. Used to anchor a reference image in the clip.
    """
    choose = ReferenceChooser(references)
    best = [(-math.inf, 0)] * len(references)
    for t, gray in enumerate(grays):
        for k, score in enumerate(choose.scores(gray)):
            if score > best[k][0]:
                best[k] = (score, t)
    return [t for _, t in best]


def chroma_stats(rgb: np.ndarray) -> np.ndarray:
    """(2, 2): mean and std of Lab a and b."""
    ab = rgb_to_lab(rgb)[..., 1:].reshape(-1, 2)
    return np.stack([ab.mean(0), ab.std(0)])


def anchor_colours(image: np.ndarray, stats: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Pull `image`'s Lab a/b mean and std towards `stats` (a reference's), luma unchanged.

    Recursive drift shows up first as a shift of these statistics (a tint spreading, colour
    fading or saturating); matching them before an output becomes the next reference keeps
    the chain's palette on the original reference's. strength 0 = unchanged, 1 = matched.
    """
    if strength == 0:
        return image
    lab = rgb_to_lab(image)
    ab = lab[..., 1:]
    mean, std = ab.reshape(-1, 2).mean(0), ab.reshape(-1, 2).std(0)
    matched = (ab - mean) * (stats[1] / np.maximum(std, 1.0)) + stats[0]
    lab[..., 1:] = ab + strength * (matched - ab)
    return transfer_luma(lab_to_rgb(lab), rgb_to_gray(image))
