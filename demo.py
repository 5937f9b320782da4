#!/usr/bin/env python3
"""The main job on an embedded default: colourise the sample clip's held-out frames and score them.

    python demo.py                       # about 2 minutes on 2 idle CPU cores, nothing downloaded
    OMP_NUM_THREADS=1 python demo.py     # on a busy machine: competing OpenMP threads make it 10x+ slower

Takes the frames the toy model never saw in training (100-131 of data/sample/bigbuckbunny.mp4),
gives every method the colour of the first of them (frame 100) as the only reference, and
colourises the grayscale version of all of them with colorize_inference.py: the toy model in
fixed, recursive and anchored mode, and the baselines that need no model (reinhard,
reinhard-bands, flow).
Then evaluate.py scores frames 101-131 against the ground truth, with the gray input itself
as a floor. Everything goes under --out: the frames per method, an mp4 per method, the report
(metrics.json, summary.csv, per_frame.csv, psnr.png, warp_error.png) and strip.png, a
side-by-side picture.

The toy model is tiny and trained on 100 frames of one clip (models/toy/, recipe in
tools/make_toy_model.py): it shows the pipeline end to end, not what SD2.1 can do.

Exit status: 0 done, 2 bad arguments or unusable input (one line on stderr), 130 / 143 stopped
by Ctrl-C / SIGTERM (what was written is kept; rerun with --overwrite).
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Sequence

from cliutil import (OneLineParser, Terminated, exit_quietly, file_problem, one_line, out_folder_problem, path_arg,
                     quiet_opencv, quiet_startup_signals, run_cli)

quiet_opencv()
if __name__ == "__main__":
    quiet_startup_signals()

import colorize_inference  # noqa: E402
import evaluate  # noqa: E402
from annotator.color import rgb_to_gray, to_uint8  # noqa: E402
from annotator.video import FrameRangeError, FrameSourceError, iter_frames, probe  # noqa: E402
from atomicio import folder_lock  # noqa: E402
from cldm.checkpoint import CheckpointError  # noqa: E402
from cldm.config import ConfigError  # noqa: E402
from colorize import loading  # noqa: E402
from colorize.gray import to_gray  # noqa: E402
from colorize.metrics import check_flow_size  # noqa: E402
from colorize.pipeline import InferenceError, OptionError, Options, reference_frame  # noqa: E402
from colorize.report import REPORT_FILES  # noqa: E402
from colorize.frames_io import write_image_atomic  # noqa: E402

PROG = "demo.py"
REPO = Path(__file__).resolve().parent
SAMPLE = REPO / "data" / "sample" / "bigbuckbunny.mp4"
TOY = REPO / "models" / "toy" / "toy_color_v2.safetensors"
MODEL_MODES = ("fixed", "recursive", "anchored")
MODEL_DEFAULTS = {"ckpt": str(TOY), "size": 64, "steps": 20, "device": "auto"}  # flags of the model's methods
BASELINES = ("reinhard", "reinhard-bands", "flow")
METHODS = MODEL_MODES + BASELINES
GRAY_LABEL = "gray input"


class DemoError(Exception):
    """A step of the demo failed; str(e) is one line."""


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      epilog="Exit status: 0 done, 2 bad arguments or unusable input, 130 / 143 stopped by "
                             "Ctrl-C / SIGTERM.")
    p.add_argument("--out", type=path_arg, default=str(REPO / "demo_out"), metavar="DIR",
                   help="folder for everything the demo writes (default: %(default)s)")
    p.add_argument("--clip", type=path_arg, default=str(SAMPLE), metavar="VIDEO|DIR",
                   help="colour clip whose frames are held out (default: the bundled sample)")
    p.add_argument("--frames", default="100:132", metavar="A:B",
                   help="frames A..B-1 of --clip to colourise; frame A is the reference, A+1..B-1 are scored "
                        "(default: %(default)s, the frames the toy model never saw)")
    p.add_argument("--ckpt", type=path_arg, metavar="FILE",
                   help="model checkpoint, its config a .yaml of the same stem beside it (default: the toy model); "
                        "this flag, --size, --steps and --device are for the model's methods (fixed, recursive, "
                        "anchored) and refused without one")
    p.add_argument("--size", type=int,
                   help=f"short side the model works at; the toy model was trained at 64 (default: "
                        f"{MODEL_DEFAULTS['size']})")
    p.add_argument("--steps", type=int, help=f"DDIM steps (default: {MODEL_DEFAULTS['steps']})")
    p.add_argument("--methods", default=",".join(METHODS), metavar="LIST",
                   help="comma-separated methods to run, from %(default)s (default: all six)")
    p.add_argument("--device", help=f"auto, cpu, cuda, ... (default: {MODEL_DEFAULTS['device']})")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the files an earlier demo run wrote in --out (the frames in data/ and in each "
                        "method's folder, data/reference.png, each method's mp4, the report's files; of every "
                        "method, also those --methods leaves out) before this one writes its own; nothing else "
                        "there is touched")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (for logs; where stderr is no terminal they update every 30 s anyway)")
    return p


def parse_frames(spec: str) -> tuple[int, int]:
    """--frames A:B as (A, B); its messages quote the value, as colorize_inference.parse_range's do."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise DemoError(f"--frames {spec!r}: expected A:B with whole numbers, e.g. 100:132") from None
    if not 0 <= a or b < a + 2:
        raise DemoError(f"--frames {spec!r}: need 0 <= A and at least two frames (the reference and one to score)")
    return a, b


def prepare_frames(clip: str | os.PathLike, first: int, stop: int, data: Path) -> Path:
    """Write the clip's frames first..stop-1 as the demo's inputs; returns the reference image.

    data/gray: every frame's BT.601 luma (the input, reference frame included so that the
    flow baseline and the recursive modes start from it); data/colour: every frame in colour
    (the ground truth; the reference frame is left out of scoring with evaluate.py --exclude);
    data/reference.png: frame `first` in colour.
    """
    gray_dir, colour_dir = data / "gray", data / "colour"
    gray_dir.mkdir(parents=True, exist_ok=True)
    colour_dir.mkdir(parents=True, exist_ok=True)
    reference, n = data / "reference.png", 0
    try:
        for i, _, rgb in iter_frames(clip, start=first, stop=stop):
            name = f"frame_{i:04d}.png"
            write_image_atomic(gray_dir / name, to_uint8(rgb_to_gray(rgb)))
            write_image_atomic(colour_dir / name, rgb)
            if i == first:
                write_image_atomic(reference, rgb)
            n += 1
    except FrameRangeError as e:
        n = e.frames - first
    if n < stop - first:
        raise DemoError(f"{clip}: has only {first + n} frames, --frames asks for frames {first}..{stop - 1}")
    return reference


INTERRUPTED = "interrupted; what was written so far is kept: rerun with --overwrite to start again"


def _call(main, argv: list[str], what: str) -> None:
    """A sub-tool's entry point; a failure is a DemoError, and a sub-tool stopped by Ctrl-C or
    SIGTERM stops the demo the same way (exit 130 or 143), not as a failure, in one line: the
    sub-tool's own (how to continue it alone) would not apply to the demo."""
    try:
        rc = main(argv, stop_line=False)
    except KeyboardInterrupt as e:
        stop = Terminated if isinstance(e, Terminated) else KeyboardInterrupt
        raise stop(f"interrupted during {what}; what was written so far is kept: rerun with "
                   "--overwrite to start again") from None
    if rc != 0:  # its message may say how to go on with that tool alone (--frames N:), not with the demo
        raise DemoError(f"{what} failed (exit status {rc}; its message is above); once that is mended, rerun the "
                        "demo with --overwrite")


def colourise(method: str, data: Path, reference: Path, out: Path, args, fps: float | None = None) -> None:
    """One method through colorize_inference.py's own entry point: frames and an mp4 at the
    clip's `fps` (its frames are a folder by now; None: a folder's default, 25)."""
    argv = ["--input", str(data / "gray"), "--reference", str(reference), "--out", str(out / method),
            "--video", str(out / f"{method}.mp4"), *(["--fps", repr(fps)] if fps else [])]
    if method in MODEL_MODES:
        argv += ["--method", "model", "--mode", method, "--ckpt", args.ckpt, "--size", str(args.size),
                 "--steps", str(args.steps), "--device", args.device]
    else:
        argv += ["--method", method]
    if args.overwrite:
        argv.append("--overwrite")
    if args.no_progress:
        argv.append("--no-progress")
    _call(colorize_inference.main, argv, f"colorize_inference.py --method {method}")


FRAME_NAME = re.compile(r"frame_\d{4,}\.png")  # prepare_frames's names, so every method's outputs' too


def planned_outputs(out: Path, methods: list[str]) -> list[Path]:
    """Where the demo writes under --out: the frames it extracts, per method a folder and an mp4,
    and the report (strip.png inside)."""
    return [out / "data", *(out / m for m in methods), *(out / f"{m}.mp4" for m in methods), out / "report"]


def frame_folders(out: Path, methods: Sequence[str]) -> list[Path]:
    """The folders the demo fills with frames (FRAME_NAME), each read back whole as a clip."""
    return [out / "data" / "gray", out / "data" / "colour", *(out / m for m in methods)]


def own_files(out: Path, methods: Sequence[str]) -> list[Path]:
    """The demo's files outside its frame folders."""
    return [out / "data" / "reference.png", *(out / f"{m}.mp4" for m in methods),
            *(out / "report" / f for f in REPORT_FILES.values())]


def earlier_outputs(out: Path, methods: Sequence[str]) -> tuple[list[Path], list[str]]:
    """(the files an earlier demo run wrote where this one writes: what --overwrite removes, and
    nothing else; what else is in the way, each said as "PATH is/holds ...").

    In the way: a file the demo did not write in one of its frame folders (it would be read as a
    frame, or refused as none), or anything but a folder or a file at one of the demo's names.
    Hidden files and sub-folders of a frame folder (no frames to a reader), and whatever else
    lies in --out, data/ or report/ (data/sample/, notes), are no business of the demo's."""
    mine, other = [], []
    for folder in [out / "data", out / "report", *frame_folders(out, methods)]:
        if os.path.lexists(folder) and not folder.is_dir():
            other.append(f"{folder} is {_what_is(folder)}, where the demo makes a folder")
    for folder in frame_folders(out, methods):
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if FRAME_NAME.fullmatch(p.name) and p.is_file():
                mine.append(p)
            elif not (p.name.startswith(".") or p.is_dir()):
                other.append(f"{folder} holds {p.name}, which the demo did not write (it reads the folder back as "
                             "a clip of its frames)")
    for f in own_files(out, methods):
        if f.is_file():
            mine.append(f)
        elif os.path.lexists(f):
            other.append(f"{f} is {_what_is(f)}, where the demo writes a file")
    return mine, other


def _what_is(path: Path) -> str:
    if not path.exists():
        return "a broken symbolic link"
    return "a folder" if path.is_dir() else "a file" if path.is_file() else "a named pipe, socket or device"


def remove_earlier_outputs(out: Path, methods: Sequence[str], files: list[Path]) -> None:
    """--overwrite: remove `files` (earlier_outputs'), then those of the demo's folders left empty."""
    for f in files:
        f.unlink()
    for folder in [*frame_folders(out, methods), out / "data", out / "report"]:
        try:
            folder.rmdir()
        except OSError:  # not there, or holds what the demo did not write
            pass


def model_flags(args, methods: Sequence[str]) -> bool:
    """Whether `methods` run the model; its flags (MODEL_DEFAULTS) set to their defaults where not
    given, and refused where given without a model method (a mistake, not a no-op: a missing
    --ckpt ran the demo's baselines and exited 0)."""
    model = any(m in MODEL_MODES for m in methods)
    for key, default in MODEL_DEFAULTS.items():
        if getattr(args, key) is not None and not model:
            raise DemoError(f"--{key} is for the model's methods ({', '.join(MODEL_MODES)}), which --methods "
                            f"{','.join(methods)} leaves out; leave it out")
        if getattr(args, key) is None:
            setattr(args, key, default)
    return model


def check_args(args, first: int, stop: int, methods: list[str]) -> float | None:
    """Refuse, before anything is written, what a sub-tool would only refuse after the frames are
    extracted (its message then follows a half-made --out): sampling settings, device, clip
    and its length, the checkpoint and outputs of an earlier run. Returns the clip's frame rate
    (None for a frame folder)."""
    model = model_flags(args, methods)
    if model and (problem := file_problem(args.ckpt)):
        raise DemoError(f"--ckpt {args.ckpt}: {problem}")
    try:  # checked as colorize_inference.py checks them
        Options(size=args.size, steps=args.steps)
        colorize_inference.resolve_device(args.device)
    except OptionError as e:
        raise DemoError(f"--{e.field} {e.problem}") from None
    except colorize_inference.UsageError as e:
        raise DemoError(str(e)) from None
    if model:
        check_model(args.ckpt, args.steps)
    try:
        info = probe(args.clip)
    except FrameSourceError as e:  # a missing or unreadable clip
        raise DemoError(f"--clip {e}") from None
    try:  # the report's warp error, and the flow baseline, need optical flow on the clip's frames
        check_flow_size((info.height, info.width))
    except ValueError as e:
        raise DemoError(f"--clip {args.clip}: {e}") from None
    count = info.frame_count
    if count is not None and stop > count:  # a video's claimed count; prepare_frames checks what decodes
        raise DemoError(f"{args.clip}: has only {count} frames, --frames asks for frames {first}..{stop - 1}")
    check_reference(args.clip, first)
    out = Path(args.out)
    if problem := out_folder_problem("--out", out):  # else a raw "[Errno 20] Not a directory"
        raise DemoError(problem)
    check_clip_kept(Path(args.clip), out, methods)
    mine, other = earlier_outputs(out, methods)
    if other:  # --overwrite or not: neither the demo's to remove nor anything it can write around
        raise DemoError(f"{other[0]}; move it or choose another --out")
    taken = [p for p in planned_outputs(out, methods) if any(f == p or p in f.parents for f in mine)]
    if taken and not args.overwrite:
        raise DemoError(f"{taken[0]} exists from an earlier run ({len(taken)} output(s) already there); "
                        "pass --overwrite or another --out")
    return info.fps


def check_clip_kept(clip: Path, out: Path, methods: list[str]) -> None:
    """Refuse a --clip among the demo's outputs: --overwrite would remove it before its frames are read
    (a rerun on an earlier run's data/colour), and as --out itself it would get the mp4s among its frames.
    A clip elsewhere under data/ or report/ (data/sample/) is safe: the demo writes only its own files there."""
    clip = Path(os.path.realpath(clip))  # not Path.resolve(), which raises on a symlink loop
    if clip == Path(os.path.realpath(out)):
        raise DemoError(f"--out {out} is the --clip folder; write the demo's outputs elsewhere")
    for p in [out / "data", out / "report", *frame_folders(out, methods), *own_files(out, methods)]:
        real = Path(os.path.realpath(p))
        if real == clip or (real in clip.parents and p not in (out / "data", out / "report")):
            raise DemoError(f"--clip {clip} lies in {p}, where the demo writes (and --overwrite removes) its "
                            "outputs; copy the clip elsewhere or choose another --out")


def check_reference(clip: str, first: int) -> None:
    """Frame `first`, every method's reference, has colours to give: colorize_inference.py
    would refuse a gray one only after the frames are extracted (one frame read, milliseconds)."""
    try:
        colour = to_gray(reference_frame(clip, first))[1]
    except FrameSourceError as e:
        raise DemoError(f"--clip {e}") from None
    except InferenceError as e:  # fewer frames than the video claims
        raise DemoError(str(e)) from None
    if not colour:
        raise DemoError(f"--clip {clip}: frame {first} (the reference frame) is gray, not colour")


def check_model(ckpt: str, steps: int) -> None:
    """The step count against the model's noise schedule, and the checkpoint against its config,
    as colorize_inference.py checks them (by loading the weights once: 0.2 s for the toy model;
    the config found once for both, as there: without a YAML beside the weights that reads them)."""
    try:
        source = loading.resolve_config(ckpt)
        colorize_inference.steps_option(steps, loading.schedule_length(ckpt, source=source))
        loading.load_model(ckpt, source=source)
    except colorize_inference.UsageError as e:
        raise DemoError(str(e)) from None
    except (CheckpointError, ConfigError) as e:
        raise DemoError(f"--ckpt {one_line(e)}") from None


def run_demo(args) -> dict:
    """The whole demo; returns the paths it wrote, by kind."""
    first, stop = parse_frames(args.frames)
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))  # once each
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise DemoError(f"--methods: unknown method {unknown[0] if unknown else '(none given)'}; "
                        f"choose from {','.join(METHODS)}")
    fps = check_args(args, first, stop, methods)
    out = Path(args.out)
    report = out / "report"
    if args.overwrite:  # an earlier run's frames outside this --frames range would be scored too, and the
        # outputs of a method this run leaves out would lie beside a report that does not score them
        remove_earlier_outputs(out, METHODS, earlier_outputs(out, METHODS)[0])
    t0 = time.time()
    print(f"[1/3] held-out frames {first}-{stop - 1} of {args.clip}: reference = frame {first} in colour")
    reference = prepare_frames(args.clip, first, stop, out / "data")
    for k, method in enumerate(methods, 1):
        print(f"[2/3] colourising with {method} ({k}/{len(methods)})", flush=True)
        colourise(method, out / "data", reference, out, args, fps)
    print(f"[3/3] scoring frames {first + 1}-{stop - 1} against the ground truth", flush=True)
    preds = [f"{m}={out / m}" for m in methods] + [f"{GRAY_LABEL}={out / 'data' / 'gray'}"]
    _call(evaluate.main, [a for p in preds for a in ("--pred", p)] + [
        "--gt", str(out / "data" / "colour"), "--exclude", f"frame_{first:04d}", "--reference", str(reference),
        "--out", str(report), "--no-progress"], "evaluate.py")
    return {"seconds": time.time() - t0, "data": out / "data", "reference": reference,
            "frames": [out / m for m in methods],
            "videos": [out / f"{m}.mp4" for m in methods], "report": report,
            "report_files": [report / f for kind, f in REPORT_FILES.items() if kind != "strip"],
            "strip": report / REPORT_FILES["strip"], "plot": report / REPORT_FILES["psnr_plot"]}


DEMO_LOCK = ".demo.lock"  # in --out, held while a demo writes there


def run(args) -> int:
    """The demo, then where its results are. A second demo into the same --out is refused while
    the first runs: both would pass the check for earlier outputs, then mix their frames."""
    out = Path(args.out)
    if problem := out_folder_problem("--out", out):  # before the lock makes the folder
        raise DemoError(problem)
    with folder_lock(out, DEMO_LOCK) as mine:
        if not mine:
            raise DemoError(f"--out {out} is in use by another demo run (it holds {out / DEMO_LOCK}); wait for it "
                            "to end, or give another --out")
        paths = run_demo(args)
    rel = lambda p: os.path.relpath(p) if Path(p).resolve().is_relative_to(Path.cwd()) else str(p)  # noqa: E731
    print(f"\ndemo done in {paths['seconds']:.0f} s; everything is under {rel(out)}/")
    data = paths["data"]
    print(f"  inputs:        {rel(data / 'gray')}/ (gray), {rel(data / 'colour')}/ (ground truth), "
          f"{rel(paths['reference'])}")
    print(f"  frames:        {', '.join(rel(p) + '/' for p in paths['frames'])}")
    print(f"  videos:        {', '.join(rel(p) for p in paths['videos'])}")
    print(f"  report:        {rel(paths['report'])}/ ({', '.join(p.name for p in paths['report_files'])})")
    print(f"  side by side:  {rel(paths['strip'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, run, parser().parse_args(argv), (DemoError, FrameSourceError, OSError),
                   interrupted=INTERRUPTED, needs=("opencv", "av", "open_clip"))


if __name__ == "__main__":
    exit_quietly(main())
