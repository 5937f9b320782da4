"""Score colourised clips against the colour ground truth and write a report.

    python evaluate.py --pred fixed=out/fixed --pred flow=out/flow --gt frames/ --out report/

Frames are matched by file name without extension (pred 0001.png <-> gt 0001.jpg), in the
ground truth's natural order; ground-truth frames missing from any prediction are left
out (with a note), as are frames named with --exclude. Per frame: PSNR, SSIM,
colourfulness, warp error; per clip: CDC (definitions: colorize/metrics.py; warp error is
a mean L1 error, CDC is in nats). Temporal metrics never pair frames across a frame left
out. Prints a table of means, and a note where a frame is identical to the ground truth
(it scores the 100 dB PSNR cap and inflates the mean: the reference frame itself, say)
or where the ground truth is gray (the gray input given as --gt, say); with --out also
writes metrics.json, per_frame.csv, summary.csv, psnr.png, warp_error.png and strip.png,
all or none (a write failing on a full disk leaves no half report, and an earlier one as
it was); a report already there is kept unless --overwrite. The settings that
colorize_inference.py records in each frame go into metrics.json per method, and a method
whose frames record different ones (a run continued with another seed, say) gets a note.

Exit status: 0 done, 2 bad arguments or unusable input (one line on stderr), 130 / 143 stopped by
Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cliutil import (OneLineParser, exit_quietly, file_problem, out_folder_problem, path_arg, quiet_opencv,
                     quiet_startup_signals, run_cli)

quiet_opencv()
if __name__ == "__main__":
    quiet_startup_signals()

import numpy as np  # noqa: E402

from annotator.color import rgb_to_gray, to_uint8  # noqa: E402
from annotator.video import VIDEO_EXTS  # noqa: E402
from atomicio import remove_stale_temps  # noqa: E402
from colorize.frames_io import FrameSourceError, list_frame_files, prefetch, progress_bar, read_image  # noqa: E402
from colorize.metrics import PSNR_CAP_DB, ClipEvaluation, check_flow_size, evaluate_stream  # noqa: E402
from colorize import provenance  # noqa: E402
from colorize.report import REPORT_FILES, Strip, strip_indices, write_report  # noqa: E402

PROG = "evaluate.py"


class UsageError(Exception):
    """Bad input; str(e) is the one line printed after 'evaluate.py: error: '."""


def parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = OneLineParser(prog=PROG, description="\n\n".join([doc[0], doc[2]]), epilog=doc[3],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", type=path_arg, action="append", required=True, metavar="[NAME=]DIR",
                   help="folder of predicted frames (e.g. colorize_inference.py's --out); repeat for several "
                        "methods. NAME labels the method (default: the folder's name); the report's own names "
                        "(ground_truth, reference, ...) are refused")
    p.add_argument("--gt", type=path_arg, required=True, metavar="DIR",
                   help="folder of colour ground-truth frames (image files, matched to the predictions' by name; "
                        "not a video file)")
    p.add_argument("--out", type=path_arg, metavar="REPORT_DIR",
                   help="write the report (JSON, CSV, plots, strip) into this folder (created if missing); "
                        "checked before scoring")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report already in --out (default: refuse before scoring)")
    p.add_argument("--reference", type=path_arg, metavar="IMAGE",
                   help="the colour reference the methods used, shown as a column of the strip")
    p.add_argument("--strip-frames", type=int, default=3, metavar="N",
                   help="frames shown in strip.png, spread evenly over the clip (default: 3; 0: no strip)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME",
                   help="leave the frame NAME (file name with or without extension, e.g. frame_0100) out of "
                        "the scoring, e.g. the reference frame, which a method may reproduce exactly; frame "
                        "pairs that include it count for no temporal metric either. Repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# What the report calls its other rows and strip columns (table, summary.csv, strip.png): a
# method of such a name would read as one of them, in a row or column of the same name.
RESERVED_NAMES = ("(ground truth)", "ground_truth", "ground truth", "input (gray)", "reference")


def parse_preds(specs: list[str]) -> dict[str, Path]:
    """'NAME=DIR' or 'DIR' -> {name: dir}. An existing folder wins over a NAME= reading."""
    preds: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        is_folder = Path(spec).is_dir()
        if sep and not name and not is_folder:  # else read as the folder "=DIR", named by its last part
            raise UsageError(f"--pred {spec}: empty NAME before '=' (give NAME=DIR, or DIR alone)")
        if not sep or is_folder:  # (an empty NAME is a folder's by now)
            folder, name = spec, Path(spec.rstrip("/\\")).name or spec
        if not folder:  # `--pred NAME=$DIR` with DIR unset: else the current folder
            raise UsageError(f"--pred {spec}: empty path after '='")
        if name in preds:
            raise UsageError(f"two predictions are named {name!r}; label them with NAME=DIR")
        if name.casefold() in RESERVED_NAMES:
            raise UsageError(f"--pred {spec}: {name!r} names a row or column of the report's own (the ground truth, "
                             "the gray input, the reference); label the prediction with NAME=DIR")
        preds[name] = Path(folder)
    return preds


def _not_a_folder(folder: Path, what: str) -> UsageError:
    if not folder.exists():
        return UsageError(f"{what} {folder}: no such folder")
    video = folder.suffix.lower() in VIDEO_EXTS
    return UsageError(f"{what} {folder} is a {'video ' if video else ''}file; --gt and --pred take folders of frames "
                      "(one image per frame, matched by name, as colorize_inference.py's --out)"
                      + (": extract its frames into a folder first" if video else ""))


def _frames_by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise _not_a_folder(folder, what)
    try:
        files = list_frame_files(folder)
    except FrameSourceError as e:
        raise UsageError(f"{what} {e}") from None
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise UsageError(f"{what} {folder}: {by_stem[f.stem].name} and {f.name} have the same name")
        by_stem[f.stem] = f
    return by_stem


@dataclass
class Matched:
    gt_files: list[Path]  # the frames to score, in the ground truth's order
    pred_files: dict[str, list[Path]]  # each prediction's files for them
    notes: list[str]
    positions: list[int]  # each frame's position in the whole ground truth (gaps: frames left out)
    excluded: list[str]  # stems left out by --exclude


def match_frames(gt_dir: Path, preds: dict[str, Path], exclude: list[str] = ()) -> Matched:
    """The ground-truth frames every prediction has, less `exclude` (stems or file names)."""
    gt = _frames_by_stem(gt_dir, "--gt")
    pred_files = {m: _frames_by_stem(d, f"--pred {m}:") for m, d in preds.items()}
    stems = list(gt)  # natural order of the ground truth
    position = {s: i for i, s in enumerate(stems)}
    dropped = {}
    for name in exclude:
        stem = name if name in gt else Path(name).stem
        if stem not in gt:
            raise UsageError(f"--exclude {name}: no ground-truth frame has that name (they are like "
                             f"{gt[stems[0]].stem})")
        dropped[stem] = None
    if dropped:
        stems = [s for s in stems if s not in dropped]
        if not stems:
            raise UsageError("--exclude leaves no frame to score")
    notes = []
    for m, files in pred_files.items():
        have = [s for s in stems if s in files]
        if not have:
            raise UsageError(
                f"no matching frames: --pred {m} ({preds[m]}) has none of the {len(stems)} ground-truth "
                f"frame names (e.g. gt {gt[stems[0]].name}, pred {next(iter(files.values())).name})")
        if len(have) < len(stems):
            notes.append(f"--pred {m} lacks {len(stems) - len(have)} of {len(stems)} ground-truth frames "
                         f"(e.g. {next(s for s in stems if s not in files)})")
        extra = [s for s in files if s not in gt]
        if extra:
            notes.append(f"--pred {m} has {len(extra)} frame(s) the ground truth lacks, not scored "
                         f"(e.g. {files[extra[0]].name})")
    common = [s for s in stems if all(s in f for f in pred_files.values())]
    if not common:
        raise UsageError("no matching frames: no ground-truth frame name is in every --pred folder")
    if len(common) < len(stems):
        notes.append(f"evaluating the {len(common)} of {len(stems)} ground-truth frames that every prediction has")
    return Matched([gt[s] for s in common], {m: [f[s] for s in common] for m, f in pred_files.items()}, notes,
                   [position[s] for s in common], list(dropped))


def _read(path: Path, what: str, keep_16bit: bool = True) -> np.ndarray:
    """RGB at the file's own depth (8 or 16 bits: the metrics take both on the 0..255 scale).
    `what`: the flag the file came from ("--gt", "--pred NAME:"), named in an error."""
    try:
        return read_image(path, keep_16bit=keep_16bit)
    except FrameSourceError as e:
        raise UsageError(f"{what} {e}") from None


def _size_error(pred: Path, img: np.ndarray, gt: Path, ref: np.ndarray) -> UsageError:
    return UsageError(f"size mismatch: {pred} is {img.shape[1]}x{img.shape[0]}, ground truth {gt.name} "
                      f"is {ref.shape[1]}x{ref.shape[0]}")


def load_steps(gt_files: list[Path], pred_files: dict[str, list[Path]]):
    """(gt, {method: pred}) per frame, read lazily, every size checked against the truth's first."""
    first = None
    for t, gt_path in enumerate(gt_files):
        gt = _read(gt_path, "--gt")
        first = first or (gt_path, gt.shape)
        if gt.shape[:2] != first[1][:2]:
            raise UsageError(f"ground-truth frames differ in size: {gt_path} is {gt.shape[1]}x{gt.shape[0]}, "
                             f"{first[0].name} is {first[1][1]}x{first[1][0]} (a clip's frames share one size)")
        cur = {}
        for m, files in pred_files.items():
            img = _read(files[t], f"--pred {m}:")
            if img.shape != gt.shape:
                raise _size_error(files[t], img, gt_path, gt)
            cur[m] = img
        yield gt, cur


# the printed table's (header, format) of each of report.SUMMARY_KEYS, in its order
COLUMNS = {"psnr": ("PSNR dB", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"), "colourfulness": ("colourful.", "{:.1f}"),
           "warp_error": ("warp err", "{:.3f}"), "cdc": ("CDC", "{:.5f}")}


def format_table(ev: ClipEvaluation) -> str:
    head = ["method", *(h for h, _ in COLUMNS.values())]

    def cells(values: dict) -> list[str]:
        return [f.format(values[k]) if k in values and math.isfinite(values[k]) else "-"
                for k, (_, f) in COLUMNS.items()]

    rows = [[name, *cells(res.means())] for name, res in ev.methods.items()]
    rows.append(["(ground truth)", *cells(ev.ground_truth)])
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width)))
    return "\n".join([line(head), *map(line, rows)])


def capped_notes(ev: ClipEvaluation) -> list[str]:
    """One note per method with frames at the PSNR cap: identical to the ground truth, or within
    rounding of it (a few levels off in a few pixels of a large frame also reach the cap)."""
    notes = []
    for m, res in ev.methods.items():
        capped = [ev.frames[t] for t in np.flatnonzero(res.per_frame["psnr"] >= PSNR_CAP_DB)]
        if capped:
            notes.append(f"--pred {m}: {len(capped)} frame(s) identical or nearly identical to the ground truth "
                         f"(e.g. {capped[0]}) score the {PSNR_CAP_DB:g} dB PSNR cap and inflate its mean PSNR; if "
                         f"they are not predictions "
                         f"(the reference frame, say) leave them out with --exclude {capped[0]}")
    return notes


GRAY_GT_COLOURFULNESS = 2.0  # mean colourfulness below which the ground truth counts as gray: gray is
# 0, a gray video's decoding cast (a few levels) about 1, real colour footage 10 and more


def gray_gt_note(ev: ClipEvaluation, gt: Path) -> list[str]:
    """A note when the ground truth is gray: every score then measures against no colour at all
    (the gray input or a gray output folder given for --gt)."""
    m = ev.ground_truth.get("colourfulness", math.nan)
    if not m < GRAY_GT_COLOURFULNESS:
        return []
    return [f"--gt {gt} is gray (mean colourfulness {m:.1f}): the scores compare the predictions with no colour at "
            "all; --gt takes the colour ground truth, not the gray input"]


def build_strip(ev: ClipEvaluation, gt_files: list[Path], pred_files: dict[str, list[Path]],
                reference: np.ndarray | None, count: int) -> Strip | None:
    idx = strip_indices(len(gt_files), count)
    if not idx:
        return None
    gt = [_read(gt_files[i], "--gt", keep_16bit=False) for i in idx]  # pictures: 8 bits
    gray = [to_uint8(rgb_to_gray(g)) for g in gt]
    methods = {m: [_read(files[i], f"--pred {m}:", keep_16bit=False) for i in idx] for m, files in pred_files.items()}
    return Strip(idx, gray, gt, methods, reference, [ev.frames[i] for i in idx])


def check_out(out: Path, keep_report: bool) -> None:
    """Refuse an --out the report cannot go to, or (with `keep_report`) one holding a report
    already, before the scoring rather than after it."""
    if problem := out_folder_problem("--out", out):
        raise UsageError(problem)
    # lexists: a broken link there too (the report is published without replacing what is there)
    report = [out / f for f in REPORT_FILES.values() if os.path.lexists(out / f)] if out.is_dir() else []
    for path in report:  # no rename replaces a folder: found now, not after the scoring (nor --overwrite advised)
        if path.is_dir() and not path.is_symlink():
            raise UsageError(f"--out {out}: {path} is a folder, where the report writes a file; move it away")
    if report and keep_report:
        raise UsageError(f"--out {out} holds a report already ({report[0].name}); pass --overwrite to replace it, "
                         "or choose another folder")


def check_not_a_frame_folder(out: Path, gt: Path, preds: dict[str, Path]) -> None:
    """Refuse an --out that is the --gt or a --pred folder: the report's files (JSON, CSV, PNG plots)
    would land among its frames, and every later run would refuse the folder or score the plots."""
    for what, folder in [("--gt", gt), *((f"--pred {m}", d) for m, d in preds.items())]:
        if folder.is_dir() and os.path.realpath(out) == os.path.realpath(folder):
            raise UsageError(f"--out {out} is the {what} folder; write the report elsewhere, as a frame folder "
                             "holds frames only")


def run(args: argparse.Namespace) -> int:
    """The evaluation; a report already in --out is refused unless --overwrite."""
    preds = parse_preds(args.pred)
    if args.strip_frames < 0:
        raise UsageError(f"--strip-frames must be >= 0 (got {args.strip_frames})")
    if args.out:
        check_out(Path(args.out), not args.overwrite)
        check_not_a_frame_folder(Path(args.out), Path(args.gt), preds)
        remove_stale_temps(args.out)  # a killed run's hidden report files
    reference = None
    if args.reference:
        if problem := file_problem(args.reference, folder="a folder, not an image"):
            raise UsageError(f"--reference {args.reference}: {problem}")
        reference = _read(Path(args.reference), "--reference", keep_16bit=False)
    matched = match_frames(Path(args.gt), preds, args.exclude)
    gt_files, pred_files = matched.gt_files, matched.pred_files
    for note in matched.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    first = _read(gt_files[0], "--gt")
    for m, files in pred_files.items():  # fail before the long loop on a wholesale size mismatch
        img = _read(files[0], f"--pred {m}:")
        if img.shape != first.shape:
            raise _size_error(files[0], img, gt_files[0], first)
    if len(gt_files) > 1:  # the warp error's optical flow
        try:
            check_flow_size(first.shape)
        except ValueError as e:
            raise UsageError(f"{gt_files[0]}: {e}") from None
    made_with = {}  # what made each method's frames (colorize_inference.py records it in each)
    for m, files in pred_files.items():
        made_with[m], mixed = provenance.common_record(files)
        if mixed:
            print(f"{PROG}: note: --pred {m}: {mixed}: its scores mix them", file=sys.stderr)
    names = [p.stem for p in gt_files]
    # tqdm advances as each frame has been dealt with (when the next one is asked for)
    bar = progress_bar(len(gt_files), "evaluating", disable=args.no_progress,
                       iterable=prefetch(load_steps(gt_files, pred_files)))
    try:
        ev = evaluate_stream(bar, list(preds), names, matched.positions)
    finally:
        bar.close()
    paths = None
    if args.out:  # before the table: a reader of stdout that goes after it (`| head -1`) must not cost the report
        strip = build_strip(ev, gt_files, pred_files, reference, args.strip_frames)
        paths = write_report(ev.methods, args.out, frames=ev.frames, ground_truth=ev.ground_truth, strip=strip,
                             excluded=matched.excluded, positions=matched.positions, replace=args.overwrite,
                             made_with=made_with)
    print(format_table(ev))
    for note in capped_notes(ev) + gray_gt_note(ev, Path(args.gt)):
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if paths is not None:
        print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv: list[str] | None = None, stop_line: bool = True) -> int:
    """`stop_line=False`: Ctrl-C and SIGTERM propagate to the calling tool (demo.py), which says them."""
    return run_cli(PROG, run, parser().parse_args(argv), (UsageError, OSError),
                   interrupted="interrupted" if stop_line else None, needs=("opencv",))


if __name__ == "__main__":
    exit_quietly(main())
