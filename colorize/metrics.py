"""Image and clip metrics for colourisation, shared by evaluate.py and the tests.

Conventions (one meaning everywhere, so numbers are comparable between runs):
- Images are RGB, HWC. uint8 is taken as is, uint16 is scaled to 0..255, float as [0, 1]
  and scaled to 0..255; every metric below works on those 0..255 values (float32 pixels
  where that is exact or harmless, with double-precision sums).
- PSNR: over all pixels and the three RGB channels, data range 255, per frame; a clip's
  is the mean of its frames' dB (not the PSNR of the clip's mean squared error, which
  weighs the worst frames more and comes out lower). Identical images would be +inf; PSNR
  is capped at `PSNR_CAP_DB` so a clip mean stays finite when one frame is reproduced
  exactly (typically the reference frame itself). Such a frame still inflates the mean:
  evaluate.py notes it, and `--exclude` leaves it out.
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  L = 255, population (not sample) statistics, computed on each RGB channel and averaged.
  Not on luma: luminance-true outputs copy the input's luma, so luma SSIM would be ~1 for
  every method and measure nothing about colour. The SSIM map is averaged over the "valid"
  interior (5 px from each border, as MATLAB's filter2 'valid'); images under 11 px on a side
  use the whole reflect-padded map. No automatic downsampling (unlike Wang's MATLAB script).
- Colourfulness: Hasler & Suesstrunk 2003, M = sqrt(std_rg^2 + std_yb^2)
  + 0.3 sqrt(mean_rg^2 + mean_yb^2) with rg = R - G, yb = (R + G) / 2 - B, population std.
- CDC (colour distribution consistency, Liu et al. 2021, TCVC; strides 1, 2, 4): Jensen-Shannon
  divergence, natural log (so in [0, ln 2]), between per-channel RGB histograms with
  `HIST_BINS` = 256 bins (one per 8-bit level, range 0..255, normalised to sum 1) of
  frames t and t+s; mean over channels and frames, then mean over s in `CDC_STRIDES`
  (strides with no frame pair in a short clip are left out). Units: nats. Implementations
  with log2 (bits) give values 1/ln 2 = 1.4427 times larger: multiply ours by 1.4427 to
  compare with them. Ones that report the Jensen-Shannon *distance* (the square root, e.g.
  scipy's `jensenshannon`) are not comparable directly.
- Warp error: flow from ground-truth frame t+1 to t (OpenCV DIS, medium preset, on the
  8-bit BT.601 gray), used to warp the *prediction* of frame t onto frame t+1 (bilinear);
  mean absolute difference with the prediction of t+1, in 0..255 levels, averaged over
  channels and over the valid pixels. Valid = the warped position lies inside the frame
  and the forward-backward check of Sundaram et al. 2010 holds:
  |w_b + w_f(x + w_b)|^2 <= 0.01 (|w_b|^2 + |w_f(x + w_b)|^2) + 0.5.
  Flow comes from the ground truth, so all methods are judged along the same motion. It is
  a per-frame value for frames 1..T-1 (NaN for frame 0). Real footage is not zero here
  (lighting, flow errors), so evaluate_stream also reports the ground truth's own value.
  Note: this is a mean *L1* error in 0..255 levels, not the warping error of Lai et al.
  2018 ("Learning blind video temporal consistency"), which is a mean *squared* (L2)
  difference on [0, 1] images; the two are not convertible into each other.
- Frames left out (evaluate.py --exclude, or missing from a prediction) leave a gap: the
  temporal metrics only pair frames that are really t and t+1 (t+s for CDC) in the clip,
  given by `positions`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

import cv2
import numpy as np
from scipy.special import rel_entr

from annotator.color import rgb_to_gray

PSNR_CAP_DB = 100.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
HIST_BINS = 256
CDC_STRIDES = (1, 2, 4)
PER_FRAME_KEYS = ("psnr", "ssim", "colourfulness", "warp_error")


def to_255(img: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """uint8 / uint16 / float-in-[0,1] image -> float (default float64) on the 0..255 scale."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img.astype(dtype)
    if img.dtype == np.uint16:
        return img.astype(dtype) / dtype(257.0)
    if np.issubdtype(img.dtype, np.floating):
        return img.astype(dtype) * dtype(255.0)
    raise TypeError(f"unsupported image dtype {img.dtype}")


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB over all pixels and channels, data range 255, capped at PSNR_CAP_DB."""
    _check_pair(pred, gt)
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.dtype == gt.dtype == np.uint8:  # exact integer sum, no float copies
        mse = cv2.norm(np.ascontiguousarray(pred), np.ascontiguousarray(gt), cv2.NORM_L2SQR) / pred.size
    else:
        mse = float(np.mean((to_255(pred) - to_255(gt)) ** 2))
    if not np.isfinite(mse):  # min(cap, nan) is the cap: a NaN frame scored as a perfect one
        raise ValueError("an image holds NaN or infinite values")
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * np.log10(255.0**2 / mse))


def _blur(x: np.ndarray) -> np.ndarray:
    k = SSIM_WINDOW
    return cv2.GaussianBlur(x, (k, k), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)


class _GtStats(NamedTuple):
    """The ground truth's half of SSIM, computed once per frame and shared by all methods."""

    y: np.ndarray  # centred: y - c
    c: np.ndarray  # per-channel image mean
    mu: np.ndarray  # local mean of the centred y
    var: np.ndarray


def _centred(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Statistics are taken in float32 around the image mean: variances and covariances do
    # not depend on the offset, and centring keeps E[x^2] - mu^2 from cancelling
    # catastrophically (uncentred, a flat 8-bit image is off by ~1e-4 in SSIM).
    x = to_255(img, np.float32)
    means = cv2.mean(x)  # per channel, double precision
    c = np.array(means[: x.shape[2]] if x.ndim == 3 else means[0], np.float32)
    x -= c
    return x, c


def _gt_stats(gt: np.ndarray) -> _GtStats:
    y, c = _centred(gt)
    mu = _blur(y)
    var = _blur(y * y)
    var -= mu * mu
    return _GtStats(y, c, mu, var)


def _ssim_map(pred: np.ndarray, g: _GtStats) -> np.ndarray:
    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    x, cx = _centred(pred)
    mx = _blur(x)
    sxy = _blur(x * g.y)
    sxy -= mx * g.mu
    x *= x
    sxx = _blur(x)
    sxx -= mx * mx
    sxx += g.var
    sxx += c2  # sigma_x^2 + sigma_y^2 + C2
    mx += cx  # local means, uncentred, for the luminance term
    my = g.mu + g.c
    lum = mx * my
    lum *= 2
    lum += c1
    mx *= mx
    mx += my * my
    mx += c1  # mu_x^2 + mu_y^2 + C1
    sxy *= 2
    sxy += c2
    lum *= sxy
    mx *= sxx
    lum /= mx
    return lum


def ssim_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (HW or HWC, per channel), before cropping and averaging."""
    _check_pair(pred, gt)
    return _ssim_map(pred, _gt_stats(gt))


def _ssim_mean(m: np.ndarray) -> float:
    r = SSIM_WINDOW // 2
    if m.shape[0] > 2 * r and m.shape[1] > 2 * r:
        m = m[r:-r, r:-r]
    channels = m.shape[2] if m.ndim == 3 else 1
    return float(np.mean(cv2.mean(m)[:channels]))  # double accumulation


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean SSIM over the valid interior, averaged over RGB channels (see module doc)."""
    return _ssim_mean(ssim_map(pred, gt))


def colourfulness(img: np.ndarray) -> float:
    """Hasler & Suesstrunk 2003 colourfulness M on 0..255 RGB (0 for any gray image)."""
    x = to_255(img, np.float32)  # exact for 8-bit input; OpenCV accumulates in double
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    mean, std = cv2.meanStdDev(cv2.merge([rg, yb]))
    return float(np.hypot(*std.ravel()) + 0.3 * np.hypot(*mean.ravel()))


def channel_histograms(img: np.ndarray) -> np.ndarray:
    """(3, HIST_BINS) per-channel RGB histograms of the 8-bit image, each summing to 1."""
    x = np.asarray(img)
    if x.dtype != np.uint8:
        x = np.clip(to_255(x) + 0.5, 0, 255).astype(np.uint8)
    n = x.shape[0] * x.shape[1]
    hists = [cv2.calcHist([x], [c], None, [HIST_BINS], [0, 256]).ravel() for c in range(3)]
    return np.stack(hists).astype(np.float64) / n


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (natural log) between distributions along the last axis."""
    m = 0.5 * (p + q)
    return 0.5 * rel_entr(p, m).sum(-1) + 0.5 * rel_entr(q, m).sum(-1)


class CDC:
    """Colour distribution consistency, streamed: `add` each frame's histograms in clip order,
    then `value()`. Only the last max(strides) + 1 frames' histograms are kept, so memory does not
    grow with the clip (keeping every frame's took 6 KB a frame per method: gigabytes for a
    whole film). Per stride s, the mean JS divergence over the frame pairs s apart in the clip
    (each pair's the mean of its 3 channels'); the CDC is the mean over the strides with a pair
    (NaN without any)."""

    def __init__(self, strides: Iterable[int] = CDC_STRIDES):
        self.strides = tuple(int(s) for s in strides)
        self.recent: dict[int, np.ndarray] = {}
        self.sums = dict.fromkeys(self.strides, 0.0)
        self.counts = dict.fromkeys(self.strides, 0)
        self.last: int | None = None

    def add(self, hists: np.ndarray, position: int) -> None:
        """A frame's (3, bins) histograms at `position` in the clip (a gap pairs nothing across it)."""
        if self.last is not None and position <= self.last:
            raise ValueError("positions must increase")
        for s in self.strides:
            earlier = self.recent.get(position - s)
            if earlier is not None:
                self.sums[s] += float(js_divergence(earlier, hists).mean())
                self.counts[s] += 1
        self.recent[position] = hists
        keep = max(self.strides, default=0)
        self.recent = {p: h for p, h in self.recent.items() if p >= position - keep}
        self.last = position

    def value(self) -> float:
        per_stride = [self.sums[s] / self.counts[s] for s in self.strides if self.counts[s]]
        return float(np.mean(per_stride)) if per_stride else float("nan")


def cdc(frames: Iterable[np.ndarray], strides: Iterable[int] = CDC_STRIDES) -> float:
    """Colour distribution consistency of a clip (lower = steadier colours)."""
    acc = CDC(strides)
    for t, f in enumerate(frames):
        acc.add(channel_histograms(f), t)
    return acc.value()


class FlowField(NamedTuple):
    """Where each pixel of frame t+1 comes from in frame t, and whether to trust it."""

    map_x: np.ndarray  # (H, W) float32, x coordinate in frame t
    map_y: np.ndarray
    valid: np.ndarray  # (H, W) bool


def gray_u8(img: np.ndarray) -> np.ndarray:
    """BT.601 gray of an RGB image (or a gray image as is) as 8-bit, for optical flow."""
    img = np.asarray(img)
    if img.ndim == 3 and img.dtype == np.uint8:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)  # BT.601, fixed point
    g = rgb_to_gray(img) if img.ndim == 3 else img
    if g.dtype == np.uint8:
        return g
    if np.issubdtype(g.dtype, np.floating):
        return (np.clip(g, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return (g.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)


# OpenCV's DIS flow fails on frames under 12 pixels a side, and crashes the process (segfault,
# opencv-python 4.x) on some 12-15 pixel high frames (12x200); 16 and up ran at every size tried.
MIN_FLOW_SIDE = 16


def check_flow_size(shape: tuple[int, ...]) -> None:
    """Raise ValueError for frames too small for DIS optical flow (see MIN_FLOW_SIDE)."""
    if min(shape[:2]) < MIN_FLOW_SIDE:
        raise ValueError(f"frames of {shape[1]}x{shape[0]} pixels are too small for optical flow "
                         f"(at least {MIN_FLOW_SIDE} pixels a side)")


def make_dis() -> cv2.DISOpticalFlow:
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)


def gt_flow(gt_prev: np.ndarray, gt_next: np.ndarray, dis: cv2.DISOpticalFlow | None = None) -> FlowField:
    """Backward flow (t+1 -> t) of the ground truth with a forward-backward occlusion mask."""
    check_flow_size(gt_prev.shape)
    dis = dis or make_dis()
    g0, g1 = gray_u8(gt_prev), gray_u8(gt_next)
    return checked_flow(back=dis.calc(g1, g0, None), fwd=dis.calc(g0, g1, None))


def checked_flow(back: np.ndarray, fwd: np.ndarray) -> FlowField:
    """The backward flow (g1(x) ~ g0(x + back(x))) as a sampling map, trusted where it lands
    inside the frame and agrees with the forward flow (the module doc's check)."""
    h, w = back.shape[:2]
    map_x = np.arange(w, dtype=np.float32)[None, :] + back[..., 0]
    map_y = np.arange(h, dtype=np.float32)[:, None] + back[..., 1]
    fwd_at = cv2.remap(fwd, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    diff = (back + fwd_at) ** 2
    mag = back**2 + fwd_at**2
    valid = diff.sum(-1) <= 0.01 * mag.sum(-1) + 0.5
    valid &= (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return FlowField(map_x, map_y, valid)


def warp_error_pair(pred_prev: np.ndarray, pred_next: np.ndarray, flow: FlowField) -> float:
    """Mean |pred(t+1) - warp(pred(t))| in 0..255 levels over valid pixels (NaN if none)."""
    _check_pair(pred_prev, pred_next)
    if not flow.valid.any():
        return float("nan")
    prev = to_255(pred_prev, np.float32)
    warped = cv2.remap(prev, flow.map_x, flow.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    err = cv2.absdiff(to_255(pred_next, np.float32), warped)
    channels = err.shape[2] if err.ndim == 3 else 1
    return float(np.mean(cv2.mean(err, flow.valid.view(np.uint8))[:channels]))


def warp_errors(pred_frames: Iterable[np.ndarray], gt_frames: Iterable[np.ndarray]) -> np.ndarray:
    """Warp error of each consecutive pair (length T-1), flow taken from the ground truth."""
    dis, out, prev = make_dis(), [], None
    for pred, gt in zip(pred_frames, gt_frames, strict=True):
        if prev is not None:
            out.append(warp_error_pair(prev[0], pred, gt_flow(prev[1], gt, dis)))
        prev = (pred, gt)
    return np.array(out, dtype=np.float64)


@dataclass
class MethodMetrics:
    """Per-frame metrics of one method (arrays of length T; warp_error[0] is NaN) and CDC."""

    per_frame: dict[str, np.ndarray]
    cdc: float

    def means(self) -> dict[str, float]:
        """Mean of each per-frame metric over the frames where it is defined, plus CDC."""
        out = {}
        for key, values in self.per_frame.items():
            finite = values[np.isfinite(values)]
            out[key] = float(finite.mean()) if finite.size else float("nan")
        out["cdc"] = self.cdc
        return out


@dataclass
class ClipEvaluation:
    """Everything evaluate.py reports: methods' metrics and the ground truth's own temporal
    metrics: the level a method should be compared with (real footage changes a little too;
    washed-out outputs can score below it)."""

    frames: list[str]
    methods: dict[str, MethodMetrics]
    ground_truth: dict[str, float] = field(default_factory=dict)


def evaluate_clips(
    gt_frames: Iterable[np.ndarray],
    preds: Mapping[str, Iterable[np.ndarray]],
    frame_names: list[str] | None = None,
) -> ClipEvaluation:
    """Every metric for every method; the iterables are consumed in step, frame by frame."""
    names = list(preds)
    iters = [iter(preds[m]) for m in names]
    missing = object()

    def steps():
        for t, gt in enumerate(gt_frames):
            cur = {m: next(it, missing) for m, it in zip(names, iters)}
            for m, p in cur.items():
                if p is missing:
                    raise ValueError(f"{m}: no prediction for {_label(frame_names, t)}")
            yield gt, cur
        for m, it in zip(names, iters):
            if next(it, missing) is not missing:
                raise ValueError(f"{m}: more frames than the ground truth")

    return evaluate_stream(steps(), names, frame_names)


def _label(frame_names: list[str] | None, t: int) -> str:
    return frame_names[t] if frame_names and t < len(frame_names) else f"frame {t}"


def evaluate_stream(
    steps: Iterable[tuple[np.ndarray, Mapping[str, np.ndarray]]],
    methods: Iterable[str],
    frame_names: list[str] | None = None,
    positions: list[int] | None = None,
) -> ClipEvaluation:
    """Stream over the clip once: `steps` yields (ground truth, {method: prediction}) per frame.

    Only the previous frame of each method is held, and each ground-truth flow is computed
    once and shared by all methods. `frame_names` labels the result and error messages.
    `positions` (increasing): each step's frame number in the clip, when frames were left
    out; a frame whose predecessor is missing gets no warp error (NaN) and CDC pairs no
    frames across the gap.
    """
    if positions is not None and any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError("positions must increase")
    names = list(methods)
    dis = make_dis()
    rows = {m: {k: [] for k in PER_FRAME_KEYS} for m in names}
    cdcs = {m: CDC() for m in names}
    gt_cdc, gt_warp, gt_colour = CDC(), [], []
    prev_gt, prev = None, {}
    # The flow (the costliest step, and the only one that needs the previous frame) runs in a
    # worker thread while this one scores the frame; OpenCV releases the GIL.
    with ThreadPoolExecutor(max_workers=1) as pool:
        for t, (gt, cur) in enumerate(steps):
            for m, img in (("ground truth", gt), *cur.items()):
                if img.dtype.kind == "f" and not np.isfinite(img).all():  # PSNR would be the cap, SSIM left out
                    raise ValueError(f"{m}: {_label(frame_names, t)} holds NaN or infinite values")
            for m in names:
                if cur[m].shape != gt.shape:
                    raise ValueError(f"{m}: {_label(frame_names, t)} has shape {cur[m].shape}, ground truth {gt.shape}")
            follows = prev_gt is not None and (positions is None or positions[t] == positions[t - 1] + 1)
            job = pool.submit(gt_flow, prev_gt, gt, dis) if follows else None
            gt_colour.append(colourfulness(gt))
            at = t if positions is None else positions[t]
            gt_cdc.add(channel_histograms(gt), at)
            stats = _gt_stats(gt)
            for m in names:
                r, p = rows[m], cur[m]
                r["psnr"].append(psnr(p, gt))
                r["ssim"].append(_ssim_mean(_ssim_map(p, stats)))
                r["colourfulness"].append(colourfulness(p))
                cdcs[m].add(channel_histograms(p), at)
            flow = job.result() if job is not None else None
            if flow is not None:
                gt_warp.append(warp_error_pair(prev_gt, gt, flow))
            for m in names:
                error = warp_error_pair(prev[m], cur[m], flow) if flow is not None else float("nan")
                rows[m]["warp_error"].append(error)
            prev_gt, prev = gt, cur
    if prev_gt is None:
        raise ValueError("the ground truth has no frames")
    n = len(gt_colour)
    results = {
        m: MethodMetrics({k: np.array(v, dtype=np.float64) for k, v in rows[m].items()}, cdcs[m].value())
        for m in names
    }
    finite_warp = [w for w in gt_warp if np.isfinite(w)]
    ground_truth = {
        "colourfulness": float(np.mean(gt_colour)),
        "warp_error": float(np.mean(finite_warp)) if finite_warp else float("nan"),
        "cdc": gt_cdc.value(),
    }
    labels = list(frame_names)[:n] if frame_names else [f"{i:05d}" for i in range(n)]
    return ClipEvaluation(labels, results, ground_truth)
