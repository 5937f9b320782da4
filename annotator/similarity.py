"""Frame-to-neighbour similarity for choosing training pairs.

Every frame is compared with each neighbour up to `window` frames away. Doing that at full
resolution costs one full-size SSIM per pair (~40 per frame); instead each frame is reduced
once to a small gray image - its BT.601 luma (8-bit), downscaled to SIM_SIZE x SIM_SIZE =
64 x 64 regardless of aspect by exact 2x halvings (pixel averaging) while it is at least twice
the target, then one bilinear step (see fast_resize) - and a new frame is scored against all
of its earlier neighbours in one batched operation. Scene cuts come out as low similarity, so
no separate cut detector is needed.

The table layout is shared with the frame store: row i, column window + d holds
sim(i, i + d) for d in [-window, window]; column `window` (d = 0) is 1 and entries outside
the movie are NaN.

Metrics (higher = more similar, 1 = identical):
- "ssim": mean SSIM (Wang et al. 2004): 11 x 11 Gaussian window, sigma 1.5, K1 = 0.01,
  K2 = 0.03, data range 1, averaged over the "valid" area (no padding; 54 x 54 at 64 x 64).
- "ncc": Pearson correlation of the two small gray images.
- "l1": 1 - mean absolute difference of the two small gray images.
"""
from __future__ import annotations


import cv2
import numpy as np


SIM_SIZE = 64
SSIM_SIGMA, SSIM_RADIUS = 1.5, 5
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
METRICS = ("ssim", "ncc", "l1")

_GAUSS = cv2.getGaussianKernel(2 * SSIM_RADIUS + 1, SSIM_SIGMA, cv2.CV_64F)
_GAUSS32 = _GAUSS.astype(np.float32)


def fast_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Anti-aliased resize that stays fast at any ratio.

    OpenCV's INTER_AREA is slow for non-integer ratios (16 ms for 1280x720 -> 912x512);
    exact halvings with INTER_AREA are cheap, and bilinear is alias-free enough for the
    remaining factor in [0.5, 1). Upscaling uses bicubic.
    """
    h, w = img.shape[:2]
    while w >= 2 * width and h >= 2 * height:
        img = cv2.resize(img[: h - h % 2, : w - w % 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    up = width > w or height > h
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC if up else cv2.INTER_LINEAR)


def small_gray(frame: np.ndarray, size: int = SIM_SIZE, bgr: bool = False) -> np.ndarray:
    """HWC uint8 frame -> (size, size) float32 BT.601 gray in [0, 1], the similarity input.

    Gray first (OpenCV's fixed-point BT.601 weights, rounded to 8 bits like every averaging
    step after it), then downscaled: a third of the pixels to average, ~40 % less time than
    downscaling the colour frame first.
    """
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    return fast_resize(gray, size, size).astype(np.float32) * np.float32(1 / 255)


def _blur_valid(stack: np.ndarray) -> np.ndarray:
    """Gaussian-filter a (B, H, W) stack, keeping only the 'valid' (unpadded) area.

    The images are filtered as one tall (B*H, W) image: rows that mix with the image above or
    below lie within SSIM_RADIUS of an edge, which the valid crop removes anyway.
    """
    b, h, w = stack.shape
    r = SSIM_RADIUS
    k = _GAUSS32 if stack.dtype == np.float32 else _GAUSS
    out = cv2.sepFilter2D(stack.reshape(b * h, w), -1, k, k)
    return out.reshape(b, h, w)[:, r : h - r, r : w - r]


class NeighbourTable:
    """Streaming builder of the (N, 2*window+1) similarity table.

    push() the small gray frames in order. Only the last `window` frames are kept (in ring
    buffers, with their partner-independent SSIM terms precomputed), so a feature film
    needs a few MB; each pair is computed once. Per frame only its similarities to earlier
    frames are kept (both rows are laid out by table()), and the ring grows as frames come,
    so a window far longer than the clip costs no more than one as long as the clip.
    """

    def __init__(self, window: int, metric: str = "ssim"):
        if window < 1:
            raise ValueError("window must be >= 1")
        if metric not in METRICS:
            raise ValueError(f"unknown similarity metric {metric!r}; choose from {', '.join(METRICS)}")
        self.window, self.metric = window, metric
        self._back: list[np.ndarray] = []  # [k][d - 1] = sim(k, k - d), d = 1..min(k, window)
        self._ring: dict[str, np.ndarray] = {}  # per-frame arrays, slot = frame index % window

    def _features(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.metric == "ssim":  # the terms of SSIM that depend on one frame only
            mu, ex2 = _blur_valid(np.stack([x, x * x]))
            return {"x": x, "mu": mu, "mu2c": mu * mu + SSIM_C1 / 2, "varc": ex2 - mu * mu + SSIM_C2 / 2}
        if self.metric == "ncc":
            z = x - x.mean(dtype=np.float64)
            return {"x": (z / max(float(np.sqrt((z * z).sum(dtype=np.float64))), 1e-12)).astype(np.float32)}
        return {"x": x}

    def _compare(self, f: dict[str, np.ndarray], n: int) -> np.ndarray:
        """Similarity of the new frame with the n frames in ring slots 0..n-1."""
        xs = self._ring["x"][:n]
        if self.metric == "ssim":  # in place: this runs ~window times per frame
            r = self._ring
            mumu = r["mu"][:n] * f["mu"]
            cov = _blur_valid(xs * f["x"])
            cov -= mumu
            cov *= 2
            cov += SSIM_C2  # 2 cov + C2
            mumu *= 2
            mumu += SSIM_C1  # 2 mu_x mu_y + C1
            mumu *= cov
            den = r["mu2c"][:n] + f["mu2c"]  # mu_x^2 + mu_y^2 + C1
            den *= r["varc"][:n] + f["varc"]  # var_x + var_y + C2
            mumu /= den
            return mumu.mean(axis=(1, 2), dtype=np.float64)
        if self.metric == "ncc":
            return (xs * f["x"]).sum(axis=(1, 2), dtype=np.float64)
        return 1.0 - np.abs(xs - f["x"]).mean(axis=(1, 2), dtype=np.float64)

    def push(self, small: np.ndarray) -> None:
        w, k = self.window, len(self._back)
        feats = self._features(np.asarray(small, dtype=np.float32))
        n = min(k, w)
        back = np.empty(n, dtype=np.float32)
        if n:
            distance = (k - 1 - np.arange(n)) % w + 1  # slot s holds frame k - distance[s], 1 <= distance <= w
            back[distance - 1] = self._compare(feats, n)
        self._grow_ring(feats, k)
        for name, a in feats.items():
            self._ring[name][k % w] = a
        self._back.append(back)

    def _grow_ring(self, feats: dict[str, np.ndarray], k: int) -> None:
        """Room for slot k % window: the ring doubles up to `window` slots while the clip is
        shorter than the window (until then slot k is k, so the copy keeps every slot)."""
        size = len(next(iter(self._ring.values()))) if self._ring else 0
        if k % self.window < size:
            return
        size = min(self.window, max(64, 2 * size))
        for name, a in feats.items():
            ring = np.empty((size, *a.shape), np.float32)
            if name in self._ring:
                ring[: k] = self._ring[name][: k]
            self._ring[name] = ring

    def __len__(self) -> int:
        return len(self._back)

    def table(self, trim: bool = False) -> np.ndarray:
        """The (N, 2*window+1) table; with `trim` the window is cut to N - 1 (at least 1), the
        farthest neighbour there is, so a window longer than the clip stores no NaN columns."""
        n = len(self._back)
        w = max(1, min(self.window, n - 1)) if trim else self.window
        out = np.full((n, 2 * w + 1), np.nan, dtype=np.float32)
        out[:, w] = 1.0
        for k, back in enumerate(self._back):
            d = np.arange(1, min(len(back), w) + 1)
            out[k, w - d] = back[d - 1]  # sim(k, k - d)
            out[k - d, w + d] = back[d - 1]  # the same pair in the earlier frame's row
        return out


def similarity_table(smalls, window: int, metric: str = "ssim") -> np.ndarray:
    """The full table for a sequence of small gray frames (convenience over NeighbourTable)."""
    t = NeighbourTable(window, metric)
    for s in smalls:
        t.push(s)
    return t.table()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Plain single-pair SSIM of two gray images in [0, 1] (same constants as "ssim").

    Any size; this is what a naive full-resolution pipeline computes for every pair.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu_a, mu_b = _blur_valid(a[None])[0], _blur_valid(b[None])[0]
    var_a = _blur_valid((a * a)[None])[0] - mu_a**2
    var_b = _blur_valid((b * b)[None])[0] - mu_b**2
    cov = _blur_valid((a * b)[None])[0] - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return float((num / den).mean())
