#!/usr/bin/env python3
"""Draw docs/figures/idea.png: reference + gray target -> colour, and what v1/v2/v3 feed the nets.

Uses two real frames of the bundled sample clip, so the picture shows the actual task.
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


def run(args) -> int:
    if problem := out_file_problem("--out", args.out):
        raise ValueError(problem)
    draw(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: every argument was ignored, so `--help` (or a mistyped --out) redrew the
    tracked docs/figures/idea.png."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--out", type=lambda t: Path(path_arg(t)), default=REPO / "docs" / "figures" / "idea.png",
                   help="the PNG to write (its folder is made if need be)")
    return run_cli(PROG, run, p.parse_args(argv), (ValueError, OSError))


if __name__ == "__main__":
    exit_quietly(main())
