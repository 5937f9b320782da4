#!/usr/bin/env python3
"""Draw the documentation's diagrams: docs/figures/idea.png (reference + gray target -> colour, and
what v1/v2/v3 feed the nets) or docs/figures/modes.png (which reference each frame uses in fixed,
recursive and anchored mode).

The idea figure uses two real frames of the bundled sample clip, so it shows the actual task.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cliutil import (DefaultsFormatter, OneLineParser, exit_quietly, out_file_problem, path_arg,  # noqa: E402
                     quiet_startup_signals, run_cli)

PROG = "tools/make_idea_figure.py"
if __name__ == "__main__":  # Ctrl-C while matplotlib and OpenCV load: one line, not an import traceback
    quiet_startup_signals(PROG)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from annotator.color import rgb_to_gray  # noqa: E402
from annotator.video import iter_frames  # noqa: E402
from atomicio import write_bytes_atomic  # noqa: E402


def frames(path: Path, wanted: tuple[int, ...]) -> dict[int, np.ndarray]:
    return {i: rgb for i, _, rgb in iter_frames(path) if i in wanted}


def box(ax, xy, w, h, text, color, fontsize=9):
    ax.add_patch(FancyBboxPatch(xy, w, h, boxstyle="round,pad=0.01,rounding_size=0.015", fc=color, ec="#333",
                                lw=0.8, transform=ax.transAxes))
    ax.text(xy[0] + w / 2, xy[1] + h / 2, text, ha="center", va="center", fontsize=fontsize, transform=ax.transAxes)


def arrow(ax, a, b):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, lw=1.2, color="#333",
                                 transform=ax.transAxes))


def draw(out: Path = REPO / "docs" / "figures" / "idea.png") -> None:
    f = frames(REPO / "data" / "sample" / "bigbuckbunny.mp4", (100, 120))
    ref, target = f[100], f[120]
    gray = rgb_to_gray(target)
    fig = plt.figure(figsize=(11, 5.6), dpi=110)
    for k, (img, title, cmap) in enumerate([(ref, "colour reference\n(frame 100)", None),
                                            (gray, "grayscale target\n(frame 120)", "gray"),
                                            (target, "colour result\n(here: the ground truth)", None)]):
        ax = fig.add_axes([0.02 + k * 0.335, 0.52, 0.29, 0.40])
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1 if cmap else None)
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    ax = fig.add_axes([0, 0, 1, 0.5])
    ax.axis("off")
    ax.text(0.5, 0.93,
            "hint = reference RGB (3) + target gray (1), image size  ->  ControlNet hint block (all variants)",
            ha="center", fontsize=10, transform=ax.transAxes)
    rows = [("v1", [("noisy latent\n4", "#dde8f5")], "4 ch"),
            ("v2 (default)", [("noisy latent\n4", "#dde8f5"), ("VAE latent of\nreference 4", "#f5e3c8"),
                              ("gray, area-avg\nto latent 1", "#e6e6e6")], "9 ch"),
            ("v3", [("noisy latent\n4", "#dde8f5"), ("VAE latent of\nreference 4", "#f5e3c8"),
                    ("VAE latent of\ngray 4", "#e6e6e6")], "12 ch")]
    for r, (name, parts, total) in enumerate(rows):
        y = 0.66 - r * 0.27
        ax.text(0.06, y + 0.09, name, ha="right", va="center", fontsize=11, weight="bold", transform=ax.transAxes)
        for j, (label, color) in enumerate(parts):
            box(ax, (0.08 + j * 0.175, y), 0.15, 0.18, label, color)
        arrow(ax, (0.59, y + 0.09), (0.66, y + 0.09))
        note = "(plain SD input)" if total == "4 ch" else "(new UNet input channels start at zero)"
        box(ax, (0.67, y), 0.31, 0.18, f"{total} into ControlNet and UNet\n{note}", "#e3f1e0")
    buf = io.BytesIO()  # drawn in memory and renamed into place: a failed or stopped run leaves the old picture
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_bytes_atomic(out, buf.getvalue())}")


def draw_modes(out: Path = REPO / "docs" / "figures" / "modes.png", frames: int = 9, every: int = 4) -> None:
    """Frames 0..frames-1 of a clip in each mode, each with an arrow from what conditions it: the
    reference R, or the previous output (anchored: pulled to R's colour statistics on the way;
    R itself every `every` frames). The rules drawn are colorize/pipeline.py's (INFERENCE.md)."""
    fig, ax = plt.subplots(figsize=(11, 4.4), dpi=110)
    ax.set_xlim(-2.1, frames + 0.2)
    ax.set_ylim(-0.5, 3.35)
    ax.axis("off")
    rows = [("fixed", "every frame from R: independent, batched (--batch)"),
            ("recursive", "each frame from the previous output: colours follow motion, mistakes are copied on"),
            (f"anchored\n--anchor-every {every}", f"from the previous output pulled to R's colour statistics "
                                                     f"(--anchor-strength); from R again every {every} frames")]
    for r, (name, note) in enumerate(rows):
        y = 2.45 - r * 1.1
        ax.text(-2.05, y + 0.21, name, ha="left", va="center", fontsize=10.5, weight="bold")
        ax.text(-0.05, y + 0.72, note, ha="left", va="center", fontsize=9, color="#333")
        for t in range(frames):
            from_r = r == 0 or t == 0 or (r == 2 and t % every == 0)
            ax.add_patch(FancyBboxPatch((t + 0.05, y), 0.62, 0.42, boxstyle="round,pad=0.02", fc="#e3f1e0", ec="#333",
                                        lw=0.8))
            ax.text(t + 0.36, y + 0.21, f"frame {t}", ha="center", va="center", fontsize=8)
            if from_r:  # a chip R above-left of the frame, arrow into it
                ax.text(t - 0.12, y + 0.52, "R", ha="center", va="center", fontsize=8.5, weight="bold",
                        bbox=dict(boxstyle="round,pad=0.15", fc="#f5e3c8", ec="#a86"))
                ax.add_patch(FancyArrowPatch((t - 0.05, y + 0.47), (t + 0.12, y + 0.36), arrowstyle="-|>",
                                             mutation_scale=9, lw=1.0, color="#a86"))
            else:  # the previous output, pulled towards R's colours in anchored mode
                anchored = r == 2
                ax.add_patch(FancyArrowPatch((t - 0.3, y + 0.21), (t + 0.03, y + 0.21), arrowstyle="-|>",
                                             mutation_scale=10, lw=1.6 if anchored else 1.2,
                                             color="#b5651d" if anchored else "#333"))
    ax.text(-2.05, -0.45, "R = the colour reference (with several: each frame's most similar one; in recursive and "
            "anchored mode a switch of\nreference restarts the chain there). Arrow = what conditions the frame; brown: "
            "pulled to R's colour statistics on the way.", fontsize=8.5, color="#333", va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_bytes_atomic(out, buf.getvalue())}")


def run(args) -> int:
    out = args.out or REPO / "docs" / "figures" / f"{args.figure}.png"
    if problem := out_file_problem("--out", out):
        raise ValueError(problem)
    (draw if args.figure == "idea" else draw_modes)(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: every argument was ignored, so `--help` (or a mistyped --out) redrew the
    tracked docs/figures/idea.png."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--figure", choices=("idea", "modes"), default="idea",
                   help="idea: reference + gray -> colour and the v1/v2/v3 inputs; modes: which reference each "
                        "frame uses in fixed, recursive and anchored mode")
    p.add_argument("--out", type=lambda t: Path(path_arg(t)), default=None,
                   help="the PNG to write (its folder is made if need be; default docs/figures/FIGURE.png)")
    return run_cli(PROG, run, p.parse_args(argv), (ValueError, OSError))


if __name__ == "__main__":
    exit_quietly(main())
