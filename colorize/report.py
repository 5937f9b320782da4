"""Write an evaluation report: numbers (JSON, CSV) and pictures (metric plots, a frame strip).

Files written to `out_dir` (all to temporary names first, renamed once every one is written,
so a failed write leaves no half report and an earlier one as it was):
  metrics.json    definitions, frame names, per-frame values and means per method, the
                  ground truth's own temporal metrics (the level a method is compared with)
                  and the frames left out of scoring (evaluate.py --exclude); per method
                  also the settings its frames record (made_with), where they record any
  per_frame.csv   method,frame,psnr,ssim,colourfulness,warp_error
  summary.csv     method,psnr,ssim,colourfulness,warp_error,cdc (means; a ground_truth row)
  psnr.png        PSNR over time (x: frame number), one line per method
  warp_error.png  warp error over time (flicker, drift), one line per method
  strip.png       gray | reference | each method | ground truth, for a few frames (optional)
Undefined values (warp error of the first frame, NaN) are null in JSON and empty in CSV.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
# Figures are made as Figure objects, not through pyplot: no backend is chosen or changed (a
# notebook importing this keeps its own), and savefig renders PNGs with Agg either way.
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont, get_font
from matplotlib.textpath import TextToPath
from matplotlib.ticker import MaxNLocator

from annotator.color import to_uint8
from atomicio import publish, removed_if_left_empty, temp_beside
from cliutil import signals_deferred
from colorize import metrics as M

SUMMARY_KEYS = (*M.PER_FRAME_KEYS, "cdc")  # a metric added: also DEFINITIONS and evaluate.py's COLUMNS
DEFINITIONS = {
    "psnr": f"dB over RGB, data range 255, capped at {M.PSNR_CAP_DB:g}; a clip's: the mean of its frames' dB",
    "ssim": f"Wang et al. 2004, Gaussian {M.SSIM_WINDOW}x{M.SSIM_WINDOW} sigma {M.SSIM_SIGMA}, "
    f"K1={M.SSIM_K1}, K2={M.SSIM_K2}, per RGB channel then averaged",
    "colourfulness": "Hasler & Suesstrunk 2003 on 0..255 RGB",
    "warp_error": "mean |pred(t) - warp(pred(t-1))| in 0..255 levels (an L1 error, not the mean squared "
    "warping error of Lai et al. 2018), DIS flow of the ground truth, forward-backward occlusion mask; "
    "per frame t>=1",
    "cdc": f"Jensen-Shannon divergence in nats (natural log; x 1/ln 2 = 1.4427 for log2/bits as some "
    f"published scripts use) of {M.HIST_BINS}-bin RGB channel histograms, frames t and t+s, "
    f"s in {list(M.CDC_STRIDES)}, averaged",
}
# {kind: file name} of what write_report writes (the strip only when asked for)
REPORT_FILES = {"json": "metrics.json", "per_frame_csv": "per_frame.csv", "summary_csv": "summary.csv",
                "psnr_plot": "psnr.png", "warp_plot": "warp_error.png", "strip": "strip.png"}
TILE_HEIGHT = 216  # px of one image in the strip (less for frames wider than MAX_TILE_WIDTH allows)
MIN_TILE_WIDTH = 224  # px: a tile's caption fits (a portrait frame is centred on white)
MAX_TILE_WIDTH = 640  # px: a 1920x180 frame's tiles were 2300 px wide, the strip 11568
FONT = 12
MIN_SPAN = {"psnr": 1.0, "warp_error": 0.5}  # a plot's least y range: 0.01 dB drawn full height looked a collapse
LINE_STYLES = ("-", "--", ":", "-.")  # a new one for every 10 methods, when matplotlib's 10 colours come round


@dataclass
class Strip:
    """The images of the side-by-side strip: one row per chosen frame.

    `indices` are positions in the evaluated frame list (they pick each method's PSNR for
    the captions); each list below has one image per row. `reference` may be None.
    """

    indices: list[int]
    gray: list[np.ndarray]
    gt: list[np.ndarray]
    methods: dict[str, list[np.ndarray]]
    reference: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)  # row labels, default frame names


def strip_indices(n_frames: int, count: int = 3) -> list[int]:
    """`count` frames spread evenly from first to last (first, middle, last for 3)."""
    if n_frames <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, min(count, n_frames))})


def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _cell(x: float) -> str:
    return f"{x:.6g}" if x is not None and math.isfinite(x) else ""


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white")
    return buf.getvalue()


def line_with_gaps(positions: Sequence[int], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) to plot a per-frame series at its frames' positions, with a NaN (a break in the
    line) wherever frames were left out between two scored ones: a line joining them would
    draw values that were never measured."""
    x = np.asarray(positions, dtype=float)
    y = np.asarray(y, dtype=float)
    gaps = np.flatnonzero(np.diff(x) > 1) + 1
    return np.insert(x, gaps, x[gaps - 1] + 1), np.insert(y, gaps, np.nan)


def frame_numbers(frames: Sequence[str], positions: Sequence[int] | None = None) -> tuple[np.ndarray, bool]:
    """(x of each frame in the plots, whether it is the number in the frames' names).

    Where every name ends in a number and the numbers step as the positions do (a clip numbered
    frame by frame: frame_0101, frame_0102, ...), x is that number, so the plot reads as the
    file names do; otherwise it is the position (`positions`, default 0..n-1).
    """
    pos = np.arange(len(frames)) if positions is None else np.asarray(positions, dtype=int)
    found = [re.search(r"(\d+)$", f) for f in frames]
    if frames and all(found):
        numbers = np.array([int(m.group(1)) for m in found])
        if np.all(numbers - pos == numbers[0] - pos[0]):
            return numbers, True
    return pos, False


def drawable(text: str) -> str:
    """`text` with each character that no font of matplotlib's font.family has written as its
    escape ('東' -> '\\u6771'): matplotlib draws such a character as a box and warns on stderr,
    one line per glyph (DejaVu Sans, its default, has no CJK)."""
    charmaps = [get_font(findfont(FontProperties(family=[f]))).get_charmap() for f in FontProperties().get_family()]
    return "".join(c if any(ord(c) in m for m in charmaps) else ascii(c)[1:-1] for c in text)


def text_width(text: str, fontsize: float, dpi: float, weight: str = "normal") -> float:
    """Pixels `text` takes drawn at `fontsize` points and `dpi` (matplotlib's default font)."""
    w, _, _ = TextToPath().get_text_width_height_descent(text, FontProperties(size=fontsize, weight=weight),
                                                          ismath=False)
    return w * dpi / 72


def shortened(text: str, max_px: float, fontsize: float, dpi: float, weight: str = "normal") -> str:
    """`text`, or as much of its start and end as fits in `max_px` with a '\u2026' between: a
    long method name ran into its neighbours' headers; its two ends are what tell names apart."""
    if text_width(text, fontsize, dpi, weight) <= max_px:
        return text
    for keep in range(len(text) - 1, 0, -1):
        short = f"{text[:(keep + 1) // 2]}\u2026{text[len(text) - keep // 2:]}"
        if text_width(short, fontsize, dpi, weight) <= max_px:
            return short
    return "\u2026"


MAX_POINTS = 1000  # about the plot's width in pixels: a longer clip is drawn as bins of frames


def binned_series(positions: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """(x, mean, min, max) per bin of `size` frame positions (bins from the first position, so a
    gap leaves its bins out), NaN ignored (NaN where all are), with a NaN row wherever bins are
    missing between two: a break in the line, as line_with_gaps makes one for frames."""
    x, y = np.asarray(positions, float), np.asarray(y, float)
    key = ((x - x[0]) // size).astype(np.int64)
    keys, starts = np.unique(key, return_index=True)  # positions increase: each bin one run
    ends = np.append(starts[1:], len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bin: NaN, as meant
        rows = np.array([(x[a:b].mean(), np.nanmean(y[a:b]), np.nanmin(y[a:b]), np.nanmax(y[a:b]))
                         for a, b in zip(starts, ends)])
    gaps = np.flatnonzero(np.diff(keys) > 1) + 1
    rows = np.insert(rows, gaps, np.nan, axis=0)
    return tuple(rows.T)


def over_time_figure(results: Mapping[str, M.MethodMetrics], key: str, frames: Sequence[str], ylabel: str,
                     title: str, positions: Sequence[int] | None = None):
    """One line per method of a per-frame metric against the frame number (`frame_numbers`), on
    whole-number ticks, broken where frames were left out. Beyond MAX_POINTS frames each point
    is the mean of a bin of frames, shaded from their lowest to their highest value (one line
    point per frame packed a film's 150k frames 125 to a pixel column: one blob per method)."""
    fig = Figure(figsize=(10, 4.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    # A frame reproduced exactly (the reference frame, say) sits at the PSNR cap and would
    # squash every other line; draw such points as triangles on the top edge instead.
    ys = {name: np.asarray(res.per_frame[key], dtype=float) for name, res in results.items()}
    capped = key == "psnr" and any((y >= M.PSNR_CAP_DB).any() for y in ys.values())
    pos, numbered = frame_numbers(frames, positions)
    if capped:
        rest = np.concatenate([y[np.isfinite(y) & (y < M.PSNR_CAP_DB)] for y in ys.values()])
        top = (rest.max() if rest.size else 50.0) + 3.0
        bottom = (rest.min() if rest.size else 0.0) - 3.0
    size = -(-len(pos) // MAX_POINTS)
    for i, (name, y) in enumerate(ys.items()):
        mean = f"{np.mean(y[np.isfinite(y)]):.3g}" if np.isfinite(y).any() else "n/a"
        at_cap = capped & (y >= M.PSNR_CAP_DB)
        if size > 1:
            x, shown, low, high = binned_series(pos, np.where(at_cap, np.nan, y), size)
        else:
            x, shown = line_with_gaps(pos, np.where(at_cap, np.nan, y))
        line, = ax.plot(x, shown, marker="o" if len(y) <= 30 else None, ms=3.5, lw=1.6,
                        ls=LINE_STYLES[i // 10 % len(LINE_STYLES)],
                        label=f"{shortened(drawable(name), 320, FONT - 1, fig.dpi)} (mean {mean})")
        if size > 1:
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
        if at_cap.any():
            at = pos[at_cap]
            ax.plot(at, np.full(at.shape, top), "^", color=line.get_color(), ms=8, clip_on=False)
        if at_cap.all():  # drawn as triangles only: its legend entry one too
            line.set(ls="none", marker="^", ms=8)
    finite = np.concatenate([np.empty(0), *(y[np.isfinite(y) & ~(capped & (y >= M.PSNR_CAP_DB))] for y in ys.values())])
    if capped:
        ax.set_ylim(bottom, top)
        ax.plot([], [], "^", color="#666666", ms=8, label=f"identical to the ground truth ({M.PSNR_CAP_DB:g} dB)")
    elif finite.size and finite.max() - finite.min() < MIN_SPAN.get(key, 0.0):
        low = max(0.0, (finite.max() + finite.min() - MIN_SPAN[key]) / 2)  # both metrics are >= 0
        ax.set_ylim(low, low + MIN_SPAN[key])
    if size > 1:
        ax.fill_between([], [], [], color="#666666", alpha=0.15, lw=0,
                        label=f"each point the mean of {size} frames,\nshaded from their lowest to highest")
    if not finite.size and not capped:
        ax.text(0.5, 0.5, "no values" + (" (a warp error needs two consecutive frames)" if key == "warp_error" else ""),
                transform=ax.transAxes, ha="center", va="center", fontsize=FONT, color="#666666")
    if len(pos):  # whole frames at the ends: one frame's axis read -0.045 ... 0.045
        ax.set_xlim(pos[0] - 0.5, pos[-1] + 0.5)
    what = "frame number" if numbered else "frame index"
    ax.set_xlabel(f"{what} ({frames[0]} \u2026 {frames[-1]})" if frames else what, fontsize=FONT)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # 1 frame: one tick, not 0.1 steps
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.set_title(title, fontsize=FONT + 1, pad=12)  # above the capped frames' triangles
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=FONT - 1)
    if ys or capped:
        ax.legend(fontsize=FONT - 1, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # off the data
    return fig


def _fit_tile(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize to fit (w, h) keeping the aspect ratio, centred on white."""
    img = to_uint8(img) if img.dtype != np.uint8 else img
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    s = min(w / img.shape[1], h / img.shape[0])
    nw, nh = max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    small = cv2.resize(np.ascontiguousarray(img[..., :3]), (nw, nh), interpolation=interp)
    tile = np.full((h, w, 3), 255, np.uint8)
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    tile[y0:y0 + nh, x0:x0 + nw] = small
    return tile


def strip_figure(strip: Strip, results: Mapping[str, M.MethodMetrics] | None = None,
                 frames: Sequence[str] | None = None):
    """The strip: a header row of column names, then per frame a row of tiles with a caption
    under each (frame name; per-method PSNR/SSIM when `results` are given)."""
    h0, w0 = strip.gt[0].shape[:2]
    th = min(TILE_HEIGHT, max(48, round(MAX_TILE_WIDTH * h0 / w0)))
    tw = min(MAX_TILE_WIDTH, max(MIN_TILE_WIDTH, round(th * w0 / h0)))
    columns = [("input (gray)", strip.gray)]
    if strip.reference is not None:
        columns.append(("reference", [strip.reference] * len(strip.indices)))
    columns += [(name, imgs) for name, imgs in strip.methods.items()]
    columns.append(("ground truth", strip.gt))
    pad, head, cap = 8, 34, 26
    rows = len(strip.indices)
    width = pad + len(columns) * (tw + pad)
    height = head + rows * (th + cap + pad)
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    labels = strip.labels or [frames[i] if frames else f"frame {i}" for i in strip.indices]
    for c, (title, imgs) in enumerate(columns):
        x = pad + c * (tw + pad)
        fig.text((x + tw / 2) / width, 1 - (head / 2) / height,
                 shortened(drawable(title), tw, FONT + 1, dpi, "bold"), ha="center", va="center",
                 fontsize=FONT + 1, fontweight="bold")
        for r, idx in enumerate(strip.indices):
            y = head + r * (th + cap + pad)  # from the top
            ax = fig.add_axes((x / width, 1 - (y + th) / height, tw / width, th / height))
            ax.imshow(_fit_tile(imgs[r], tw, th), interpolation="nearest")
            ax.set_axis_off()
            caption = ""
            if c == 0:
                caption = drawable(labels[r])
            elif results is not None and title in results:
                pf = results[title].per_frame
                caption = (f"PSNR {pf['psnr'][idx]:.2f} dB  SSIM {pf['ssim'][idx]:.3f}"
                           if pf["psnr"][idx] < M.PSNR_CAP_DB else f"PSNR \u2265 {M.PSNR_CAP_DB:g} dB (identical)")
            if caption:
                fig.text((x + tw / 2) / width, 1 - (y + th + cap / 2 + 1) / height,
                         shortened(caption, tw, FONT - 1, dpi),
                         ha="center", va="center", fontsize=FONT - 1, color="#222222")
    return fig


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _publish(out: Path, files: Mapping[Path, bytes], stale: Sequence[Path] = (), replace: bool = True) -> None:
    """Write `files` (all in `out`) whole or not at all: each to a temporary name, renamed only
    once every one is written, and only where nothing at their names is in the way (a
    folder, which no rename replaces). The renames, and the removal of `stale` (an earlier
    report's files this one does not replace), run with Ctrl-C and SIGTERM held: a stop in
    between left an earlier report partly replaced, or partly removed (a strip that cannot
    be removed stays). A failed write (a full disk) removes the temporary files and any
    folder made here, so an earlier report stays as it was and no half report is left for
    the next run to refuse as "a report already"; a rename failing after others (which no
    check can foresee) removes the files renamed before it. Its OSError names the file (or
    folder) that could not be written, which the bare "[Errno 28] No space left on device"
    does not, and says what became of the report."""
    with removed_if_left_empty(out):  # a failed write leaves none of the folders made for it
        temps: list[Path] = []
        renamed: list[Path] = []
        replaced = [t for t in files if os.path.lexists(t)]  # an earlier report's files
        target, published = out, False
        try:
            for target in files:
                if target.is_dir() and not target.is_symlink():  # a link is replaced, not its folder
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
            out.mkdir(parents=True, exist_ok=True)
            for target, data in files.items():
                temps.append(temp_beside(target))
                _write_file(temps[-1], data)
            with signals_deferred():
                for tmp, target in zip(temps, files):
                    publish(tmp, target, replace)  # without `replace`, not over another run's file made meanwhile
                    renamed.append(target)
                published = True
                for path in stale:  # the new report is whole: one that cannot go stays, and is no reason to undo it
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
        except BaseException as e:
            if published:  # a Ctrl-C or SIGTERM held during the renames, raised now: the report is whole
                raise
            for path in temps + renamed:
                path.unlink(missing_ok=True)
            if not isinstance(e, OSError):
                raise
            reason = e.strerror or str(e) or type(e).__name__
            if e.errno == errno.EEXIST and not replace:
                reason = "another run wrote it meanwhile; pass --overwrite to replace it"
            lost = ", ".join(t.name for t in renamed if t in replaced)
            error = OSError(f"{target}: cannot write the report ({reason}); "
                            + ("nothing of it is left" if renamed else "nothing of it was written")
                            + (f"; the earlier report's {lost}, which it had replaced, are gone" if lost else ""))
            error.errno = e.errno
            raise error from e


def write_report(
    results: Mapping[str, M.MethodMetrics],
    out_dir: str | os.PathLike,
    *,
    frames: Sequence[str] | None = None,
    ground_truth: Mapping[str, float] | None = None,
    strip: Strip | None = None,
    excluded: Sequence[str] = (),
    positions: Sequence[int] | None = None,
    replace: bool = True,
    made_with: Mapping[str, dict | None] | None = None,
) -> dict[str, Path]:
    """Write the files listed in the module docstring; returns {kind: path}. `positions`:
    each frame's index in the whole clip, increasing, when some were left out (the plots
    leave a gap there). Without `replace`, a file of the report that another run wrote since
    it was checked is kept: an OSError, and nothing of this report is left. `made_with`: the
    settings recorded in a method's frames (colorize.provenance), kept in metrics.json.
    """
    out = Path(out_dir)
    if not results:
        raise ValueError("no results to report")
    n = len(next(iter(results.values())).per_frame["psnr"])
    frames = list(frames) if frames is not None else [str(i) for i in range(n)]
    for name, res in results.items():
        if any(len(v) != len(frames) for v in res.per_frame.values()):
            raise ValueError(f"{name}: per-frame metrics do not match the {len(frames)} frames")
    if positions is not None and (len(positions) != len(frames)
                                  or any(b <= a for a, b in zip(positions, positions[1:]))):
        raise ValueError(f"positions must be {len(frames)} increasing frame indices")
    keys = list(M.PER_FRAME_KEYS)
    means = {name: res.means() for name, res in results.items()}
    doc = {
        "definitions": DEFINITIONS,
        "frames": frames,
        "methods": {
            name: {"mean": means[name], "per_frame": {k: res.per_frame[k] for k in keys},
                   **({"made_with": made_with[name]} if (made_with or {}).get(name) else {})}
            for name, res in results.items()
        },
        "ground_truth": dict(ground_truth or {}),
        "excluded_frames": list(excluded),
    }
    paths = {kind: out / name for kind, name in REPORT_FILES.items() if kind != "strip"}
    files = {paths["json"]: (json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n").encode("utf-8")}
    rows = [["method", "frame", *keys]]
    for name, res in results.items():
        for t, frame in enumerate(frames):
            rows.append([name, frame, *(_cell(float(res.per_frame[k][t])) for k in keys)])
    files[paths["per_frame_csv"]] = _csv(rows).encode("utf-8")
    rows = [["method", *SUMMARY_KEYS]]
    rows += [[name, *(_cell(m[k]) for k in SUMMARY_KEYS)] for name, m in means.items()]
    if ground_truth:
        rows.append(["ground_truth", *(_cell(ground_truth[k]) if k in ground_truth else "" for k in SUMMARY_KEYS)])
    files[paths["summary_csv"]] = _csv(rows).encode("utf-8")
    files[paths["psnr_plot"]] = _png(over_time_figure(results, "psnr", frames, "PSNR (dB)",
                                                      "PSNR against the ground truth", positions))
    files[paths["warp_plot"]] = _png(over_time_figure(results, "warp_error", frames, "warp error (0..255 levels)",
                                                      "Temporal warp error (lower = steadier colours)", positions))
    strip_path = out / REPORT_FILES["strip"]
    if strip is not None:
        paths["strip"] = strip_path
        files[strip_path] = _png(strip_figure(strip, results, frames))
    # without a strip, an earlier run's (of other frames or methods) is not this report's
    _publish(out, files, stale=[strip_path] if strip is None and strip_path.is_file() else [], replace=replace)
    return paths
