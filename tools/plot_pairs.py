#!/usr/bin/env python3
"""Draw which frame pairs a similarity band selects in one movie built by build_pairs.py.

    python tools/plot_pairs.py data/films/film1 --low 0.94 --high 0.97 --out band.png

Left: the stored similarity of every frame (rows) to each neighbour (columns, offset -W..W),
the pairs inside the band in red. Right: how the similarities at offsets >= --min-gap are
spread, the band shaded. To pick a band before training: too high and partners are near
copies of the reference, too low and they share little with it (scene cuts sit at the bottom).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cliutil import (DefaultsFormatter, OneLineParser, exit_quietly, out_file_problem, path_arg,  # noqa: E402
                     positive_int, quiet_startup_signals, run_cli)

PROG = "tools/plot_pairs.py"
if __name__ == "__main__":  # Ctrl-C while matplotlib loads: one line, not an import traceback
    quiet_startup_signals(PROG)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from annotator.pairs import (  # noqa: E402
    DEFAULT_HIGH, DEFAULT_LOW, DEFAULT_MIN_GAP, frame_path, is_finished, list_movies, load_meta, load_similarity,
    pair_mask,
)
from atomicio import write_bytes_atomic  # noqa: E402
from colorize.report import drawable  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("movie", type=lambda t: Path(path_arg(t)), metavar="MOVIE_DIR",
                   help="DATA_ROOT/<movie id> of build_pairs.py")
    p.add_argument("--low", type=float, default=DEFAULT_LOW, help="pairs: similarity above this")
    p.add_argument("--high", type=float, default=DEFAULT_HIGH, help="pairs: similarity below this")
    p.add_argument("--min-gap", type=positive_int, default=DEFAULT_MIN_GAP, help="pairs: at least this many frames apart")
    p.add_argument("--out", type=lambda t: Path(path_arg(t)), default=Path("pairs.png"),
                   help="the picture to write, in the format of its extension (.png, .jpg, .pdf, .svg, ...; PNG "
                        "without one)")
    return p


MAX_ROWS = 400  # about the left panel's height in pixels: beyond, rows are binned, not dropped by the drawing


def binned(rows: np.ndarray, size: int, how: str) -> np.ndarray:
    """`rows` in consecutive groups of `size`, each one row: its "any" (pairs) or NaN-mean
    (similarity; NaN where all are); the last group may be short."""
    pad = -len(rows) % size
    if how == "any":
        return np.pad(rows, ((0, pad), (0, 0))).reshape(-1, size, rows.shape[1]).any(1)
    full = np.pad(rows.astype(np.float64), ((0, pad), (0, 0)), constant_values=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN group: NaN, as meant
        return np.nanmean(full.reshape(-1, size, rows.shape[1]), axis=1)


def band_figure(sim: np.ndarray, low: float, high: float, min_gap: int, title: str):
    """The two panels for a similarity table (N, 2W+1), as a matplotlib Figure. A long movie's
    rows are binned to MAX_ROWS on the left (a bin is red if any of its frames has that pair,
    its gray the mean similarity): drawn one row per frame, all but one row in N / 400 fell
    between the pixels, and with them most pairs."""
    mask = pair_mask(sim, low, high, min_gap)
    n, w = sim.shape[0], (sim.shape[1] - 1) // 2
    size = -(-n // MAX_ROWS)
    shown_sim, shown_mask = (binned(sim, size, "mean"), binned(mask, size, "any")) if size > 1 else (sim, mask)
    far = sim[:, np.abs(np.arange(-w, w + 1)) >= min_gap]
    far = far[np.isfinite(far)]
    ends = [float(far.min())] if far.size else []
    ends += [low] if np.isfinite(low) else []  # an open band (-inf) is drawn from the lowest similarity
    floor = min(ends, default=0.0)  # every similarity on both panels
    cmap = plt.get_cmap("gray").with_extremes(bad="#9ec5e8")  # NaN: the neighbour would lie outside the movie
    # each row `size` frames tall, the last bin's too: the frames past the movie's end are cut off below
    extent = (-w - 0.5, w + 0.5, len(shown_mask) * size - 0.5, -0.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1, 1.2]})
    shown = left.imshow(np.ma.masked_invalid(shown_sim), aspect="auto", cmap=cmap, vmin=floor, vmax=1,
                        interpolation="nearest", extent=extent)
    left.imshow(np.ma.masked_where(~shown_mask, shown_mask), aspect="auto", cmap=ListedColormap(["red"]), alpha=0.8,
                interpolation="nearest", extent=extent)
    left.set_ylim(n - 0.5, -0.5)
    fig.colorbar(shown, ax=left, label="similarity")
    left.set(xlabel="neighbour offset (frames)", ylabel="frame", title="pairs in the band: red; outside the movie: blue")
    right.hist(far, bins=np.linspace(floor, 1, 81), color="0.45")
    right.axvspan(max(low, floor), min(high, 1.0), color="red", alpha=0.2,  # an open band (+-inf) to the panel's edge
                  label=f"band {low} < sim < {high}")
    right.set(xlabel="similarity", ylabel="frame pairs (each counted twice)",
              title=f"offsets >= {min_gap}: {int(mask.sum()) // 2} pairs, {int(mask.any(1).sum())} of {n} "
                    "frames have a partner")
    right.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def picture_format(out: Path) -> str:
    """matplotlib's name of the format of --out's extension: savefig draws into memory (for the
    atomic write), where it has no file name to take the format from, so a band.jpg held a PNG."""
    fmt = out.suffix.lower().removeprefix(".") or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"--out {out}: cannot draw .{fmt} pictures; use one of {', '.join(sorted(formats))}")
    return fmt


def run(args) -> int:
    if not is_finished(args.movie):
        movies = list_movies(args.movie)  # a DATA_ROOT given for one of its movies
        hint = f" but a data root: give one of its movie folders, e.g. {Path(args.movie) / movies[0]}" if movies else ""
        raise ValueError(f"{args.movie}: not a movie folder finished by build_pairs.py{hint}")
    pair_mask(np.zeros((1, 1)), args.low, args.high, args.min_gap)  # a bad band: its one line, before reading
    # checked here: the OSError of the write names its temporary file, never given
    if problem := out_file_problem("--out", args.out, new_folders=False):
        raise ValueError(problem)
    # the movie's other files are no pictures (picture_format refuses them); its frames are
    if Path(os.path.realpath(frame_path(args.movie, 0).parent)) in Path(os.path.realpath(args.out)).parents:
        raise ValueError(f"--out {args.out} is in the frames folder of {args.movie}; write the picture elsewhere")
    fmt = picture_format(args.out)
    meta = load_meta(args.movie)
    title = f"{drawable(args.movie.name)}: {meta['frame_count']} frames, {meta['metric']} of the gray frames"
    fig = band_figure(load_similarity(args.movie), args.low, args.high, args.min_gap, title)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100)
    plt.close(fig)
    print(f"wrote {write_bytes_atomic(args.out, buf.getvalue())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, run, parser().parse_args(argv), (ValueError, OSError))


if __name__ == "__main__":
    exit_quietly(main())
