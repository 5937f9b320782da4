#!/usr/bin/env python3
"""Draw the demo's pictures in README.md from a finished `python demo.py` run.

    python demo.py && python tools/make_demo_figures.py demo_out

docs/figures/demo_strip.jpg: gray input | reference | the toy's three modes | flow | ground
truth, at the first and the last scored frame, scaled down to a page's width (JPEG).
docs/figures/demo_psnr.png: PSNR per frame of the same methods and the gray input (the floor).
Both come from evaluate.py run on a subset of the demo's outputs (the full report, with every
baseline, is DEMO_OUT/report), so the numbers in them are the demo's.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cliutil import (DefaultsFormatter, OneLineParser, exit_quietly, out_file_problem,  # noqa: E402
                     out_folder_problem, path_arg, positive_int, quiet_startup_signals, run_cli)

PROG = "tools/make_demo_figures.py"
if __name__ == "__main__":  # Ctrl-C while OpenCV and torch load: one line, not an import traceback
    quiet_startup_signals(PROG)

import cv2  # noqa: E402

import evaluate  # noqa: E402
from annotator.video import list_frame_files, read_image  # noqa: E402
from atomicio import write_bytes_atomic  # noqa: E402
from demo import GRAY_LABEL  # noqa: E402

METHODS = ("fixed", "recursive", "anchored", "flow")
FIGURES = ("demo_strip.jpg", "demo_psnr.png")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("demo_out", type=lambda t: Path(path_arg(t)), metavar="DEMO_OUT",
                   help="the --out folder of a finished demo.py run")
    p.add_argument("--figures", type=lambda t: Path(path_arg(t)), default=REPO / "docs" / "figures",
                   help="where the two pictures go")
    p.add_argument("--width", type=positive_int, default=1600, help="width of demo_strip.jpg in pixels")
    return p


def _evaluate(demo_out: Path, preds: list[str], out: str, strip_frames: int) -> bool:
    """evaluate.py on the demo's data, its table kept off stdout (it names a temporary report);
    False if it refused (it said why, in one line on stderr)."""
    data = demo_out / "data"
    first = list_frame_files(data / "colour")[0].stem  # the reference frame: not scored (a killed run's
    # temporary .frame_NNNN.*.tmp.png sorted first among the folder's names)
    argv = [a for p in preds for a in ("--pred", p)] + [
        "--gt", str(data / "colour"), "--exclude", first, "--reference", str(data / "reference.png"),
        "--strip-frames", str(strip_frames), "--out", out, "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate.main(argv, stop_line=False) == 0


def make(demo_out: Path, figures: Path, width: int = 1600) -> list[Path]:
    """Score the demo's outputs again and write the two pictures; [] if evaluate.py refused them."""
    data = demo_out / "data"
    needed = (data / "colour", data / "gray", data / "reference.png", *(demo_out / m for m in METHODS))
    if missing := [f for f in needed if not f.exists()]:
        raise ValueError(f"{demo_out}: not a finished demo.py run ({missing[0]} is missing)")
    preds = [f"{m}={demo_out / m}" for m in METHODS]
    with tempfile.TemporaryDirectory() as strip_dir, tempfile.TemporaryDirectory() as plot_dir:
        # the strip has its own gray column; the plot shows the gray input as the floor
        if not (_evaluate(demo_out, preds, strip_dir, 2)
                and _evaluate(demo_out, preds + [f"{GRAY_LABEL}={data / 'gray'}"], plot_dir, 0)):
            return []
        strip = read_image(Path(strip_dir) / "strip.png", bgr=True)  # not cv2.imread: Windows paths of any name
        scale = min(1.0, width / strip.shape[1])
        # at least 1 px high: a narrow --width of a wide strip rounded its height to 0 (cv2.error)
        size = (round(strip.shape[1] * scale), max(1, round(strip.shape[0] * scale)))
        jpg = cv2.imencode(".jpg", cv2.resize(strip, size, interpolation=cv2.INTER_AREA),
                           [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        figures.mkdir(parents=True, exist_ok=True)
        return [write_bytes_atomic(figures / FIGURES[0], jpg.tobytes()),
                write_bytes_atomic(figures / FIGURES[1], (Path(plot_dir) / "psnr.png").read_bytes())]


def run(args) -> int:
    # before the two evaluate.py runs: a file in the way was a raw "[Errno 17] File exists" after
    # them, a folder at a picture's name an error naming the temporary file beside it
    if problem := out_folder_problem("--figures", args.figures):
        raise ValueError(problem)
    if problem := next(filter(None, (out_file_problem("--figures", args.figures / n) for n in FIGURES)), None):
        raise ValueError(problem)
    paths = make(args.demo_out, args.figures, args.width)
    for path in paths:
        print(f"wrote {path}")
    return 0 if paths else 2


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, run, parser().parse_args(argv), (ValueError, OSError))


if __name__ == "__main__":
    exit_quietly(main())
