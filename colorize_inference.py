"""Colourise a grayscale clip (frame folder or video) from one or more colour references.

    python colorize_inference.py --input frames/ --reference ref.png --ckpt model.safetensors --out out/
    python colorize_inference.py --input clip.mp4 --reference-frame 0 --gt colour/ --ckpt v2-1_512.safetensors \\
        --control control.safetensors --mode anchored --out out/ --video out.mp4
    python colorize_inference.py --input frames/ --reference ref.png --method flow --out out/   # no model

Writes one PNG per input frame (same name stem; 16-bit where the input frame is 16-bit),
at the input's size. Luminance-true by default: only the colour comes from the model, the
lightness is the input's exactly. Modes and when to use which: docs/INFERENCE.md.

If a run stops (at a bad frame, say), every output it wrote is complete (each is written
under a temporary name and renamed), and its last line names the --frames N: that continues
it: not always the bad frame (in fixed mode, the first frame of its batch). Rerun with that
range (fixed mode and the reinhard baselines then give exactly the result of an uninterrupted
run; fixed mode stopped part-way through writing a batch is told its first frame, with
--overwrite; recursive/anchored restart their chain and flow its walk at frame N; flow from a
--reference-frame before N is told to go on from that frame, with --overwrite), or rerun the
whole range with --overwrite. With --video, a --frames range that is only part of the clip
still gives the whole clip's video: the frames outside the range are taken from --out
(refused up front if any is missing there). So --frames N: --video V, N the number of input
frames, colourises nothing and writes V from the N outputs in --out: what a run whose PNGs
are all written but whose video is not (a full disk, a stop during the encode) is told to do.
Where the input says how many frames it has, this loads no model and reads no reference (the
flags are still asked for, as for the run it finishes). The video keeps the input film's
sound (colorize/audio.py; --audio FILE, --no-audio).

Exit status: 0 done, 2 bad arguments or unusable input (one line on stderr), 130 / 143
stopped by Ctrl-C / SIGTERM (the frames written so far are kept; continue as above).
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from contextlib import closing
from pathlib import Path
from typing import Sequence

from cliutil import (OneLineParser, Terminated, config_override, exit_quietly, file_problem, ignore_stop_signals,
                     out_file_problem, out_folder_problem, out_of_memory, path_arg, quiet_opencv,
                     quiet_startup_signals, run_cli, seed_arg, signals_noted)

quiet_opencv()
if __name__ == "__main__":
    quiet_startup_signals()

import cv2  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from annotator.video import FrameSourceError, SourceInfo, decode_image, list_frame_files, probe  # noqa: E402
from atomicio import remove_stale_temps  # noqa: E402
from cldm import weights_config  # noqa: E402
from cldm.checkpoint import CheckpointError, check_checkpoint_file  # noqa: E402
from cldm.config import ConfigError  # noqa: E402
from colorize import loading as L, pipeline as P  # noqa: E402
from colorize import audio as A, methods as M, outputs as O, provenance, resume_advice as R  # noqa: E402
from colorize.frames_io import even_size, progress_bar, write_video_atomic  # noqa: E402

PROG = "colorize_inference.py"
METHODS = ("model", "reinhard", "reinhard-bands", "flow")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")
DEFAULT_FOLDER_FPS = 25.0


def parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = OneLineParser(prog=PROG, description="\n\n".join([doc[0], doc[3]]),
                      epilog="Exit status: 0 done, 2 bad arguments or unusable input, 130 / 143 stopped by "
                             "Ctrl-C / SIGTERM (frames written so far are kept). See docs/INFERENCE.md.",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", type=path_arg, required=True, metavar="DIR|VIDEO",
                    help="grayscale frames: a folder of images (natural order; 8/16-bit gray, gray+alpha, RGB or "
                         "RGBA: alpha is ignored, EXIF orientation applied, colour frames are reduced to their "
                         "BT.601 luma, with a note) or a video file")
    io.add_argument("--reference", type=path_arg, action="append", default=[], metavar="IMAGE",
                    help="colour reference image; repeat for several (each frame then uses the most "
                         "similar one, e.g. one per scene)")
    io.add_argument("--reference-frame", action="append", type=int, default=[], metavar="N",
                    help="use frame N (from 0) of the colour ground truth (--gt) as a reference; repeatable")
    io.add_argument("--gt", type=path_arg, metavar="DIR|VIDEO",
                    help="colour version of the clip that --reference-frame reads from (default: --input, "
                         "which then must be colour)")
    io.add_argument("--frames", metavar="A:B",
                    help="only frames A..B-1 (python slice, e.g. 0:16, 100:); frames outside are not read. "
                         "Indices keep counting from the clip start, so names and per-frame seeds are those of "
                         "a full run (and resuming after an error is --frames N:). With --video, N: where N is "
                         "the number of input frames writes only the video, from the outputs in --out")
    io.add_argument("--out", type=path_arg, required=True, metavar="DIR",
                    help="output folder (created), one PNG per input frame with the input's name stem")
    io.add_argument("--video", type=path_arg, metavar="OUT.mp4",
                    help="also write the result as an MPEG-4 video, its frames at a video input's own times (a "
                         "variable frame rate too: in step with its sound) or at --fps (an odd width or height is "
                         "padded to even by repeating the last column/row; the PNGs keep the input size). Always "
                         "of the whole clip: with a --frames range that is only part of it, the other frames are "
                         "read from --out (to finish an interrupted run), which must hold them all; with "
                         "--frames N:, N the number of input frames, only the video is made (no model loaded)")
    io.add_argument("--audio", type=path_arg, metavar="FILE",
                    help="take the sound of --video from FILE's first audio stream (default: the input video's, "
                         "if it has one); copied where MP4 can hold it, else re-encoded to AAC")
    io.add_argument("--no-audio", action="store_true", help="--video without sound")
    io.add_argument("--fps", type=float, metavar="F",
                    help=f"frame rate of --video for frame-folder input (default: {DEFAULT_FOLDER_FPS:g}; "
                         "video input keeps its own)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace existing outputs (default: refuse to start if any output exists); "
                         "also the way to redo a range after an error")
    io.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    io.add_argument("--raw", action="store_true",
                    help="write the model's decoded image as is, instead of its colour on the input's lightness")

    m = p.add_argument_group("method and model")
    m.add_argument("--method", choices=METHODS, default="model",
                   help="model: the diffusion model (needs --ckpt). Baselines, no checkpoint needed: reinhard: "
                        "Reinhard et al. 2001 global Lab mean/std transfer (on gray input: the reference's mean "
                        "colour over the input's lightness); reinhard-bands: the reference's mean colour per "
                        "lightness band (shadows and highlights keep their own tints); flow: reference colours "
                        "warped along optical flow. A baseline takes none of the model and sampling flags, nor --raw "
                        "(default: model)")
    m.add_argument("--ckpt", type=path_arg, metavar="FILE",
                   help="full checkpoint (.safetensors or .ckpt), or the SD2.1 file when --control is given")
    m.add_argument("--control", type=path_arg, metavar="FILE",
                   help="trained ControlNet export (control.safetensors) to load on top of --ckpt")
    m.add_argument("--config", type=path_arg, metavar="YAML",
                   help="model config (default: a .yaml beside --control or --ckpt with the same stem, else "
                        "the config the checkpoint file records, else models/cldm_v21_color.yaml)")
    m.add_argument("--set", action="append", type=config_override, default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.color_variant=v3; repeatable")
    m.add_argument("--allow-pickle", action="store_true",
                   help="fully unpickle a .ckpt that needs it (runs code from the file: trusted files only)")
    m.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda, or cuda:N for the N-th GPU (from 0) "
                        "(default: auto)")
    m.add_argument("--precision", default="auto", choices=["auto", *L.PRECISIONS],
                   help="autocast precision: auto = fp16 on CUDA, fp32 on CPU; with fp16/bf16 the weights "
                        "are held in it too (norms in fp32): the same result, half the memory (default: auto)")
    m.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each denoising step from a captured CUDA graph: same result, "
                        "several times faster at small batches, where launching kernels from Python "
                        "is the bottleneck (default: on; ignored on CPU)")

    m.add_argument("--compile", action="store_true",
                   help="torch.compile ControlNet, UNet and VAE decoder before the first frame: inductor "
                        "fuses the many small memory-bound kernels of eager mode. The first batch waits for "
                        "compiling (about 2.5 min for SD2.1 at batch 8 on an H200; a short last batch is "
                        "padded so it compiles nothing new), later ones run ~1.4x faster, so it pays off "
                        "for long clips only; results differ from eager by float rounding (default: off)")

    s = p.add_argument_group("sampling")
    s.add_argument("--mode", choices=P.MODES, default="fixed",
                   help="fixed: every frame from the reference (batched); recursive: each frame from the previous "
                        "output; anchored: recursive with drift control (see --anchor-*) (default: fixed)")
    s.add_argument("--anchor-every", type=int, default=8, metavar="N",
                   help="anchored: use the original reference again every N frames (0: never) (default: 8)")
    s.add_argument("--anchor-strength", type=float, default=1.0, metavar="S",
                   help="anchored: pull the propagated frame's colour mean/std back to the reference's, "
                        "0 (not at all) to 1 (fully) (default: 1)")
    s.add_argument("--steps", type=int, default=20,
                   help="DDIM steps, at most half the model's noise schedule (500 for SD2.1's 1000); spaced as in "
                        "the reference DDIM (every T // N-th timestep), so a count that does not divide T runs a "
                        "few more (30 -> 31), or many (400 -> 500) (default: 20)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default: 0)")
    s.add_argument("--seed", type=seed_arg, default=0, help="noise seed, 0..2**64-1 (default: 0)")
    s.add_argument("--noise", choices=P.NOISES, default="shared",
                   help="shared: every frame starts from the same noise (and, with --eta > 0, gets the same "
                        "noise at every step), drawn from --seed alone, so colours do not flicker from noise; "
                        "per-frame: frame i's noise is drawn from (seed, i). Either way a frame's noise does "
                        "not depend on --batch or --frames, and its result only by float rounding (an 8-bit level "
                        "at most) where its batch holds other frames (default: shared)")
    s.add_argument("--size", type=int, default=512,
                   help="short side of the frames the model sees; both sides are rounded to multiples of 64 "
                        "(of 128 or more for a config whose UNet downsamples more than SD2.1's) and the output "
                        "is resized back to the input size (default: 512)")
    s.add_argument("--batch", type=int, default=4, help="frames per model call in fixed mode (default: 4)")
    s.add_argument("--ref-guidance", type=float, default=1.0, metavar="S",
                   help="EXPERIMENTAL: reference guidance scale, >1 pushes away from the prediction with a black "
                        "reference. Only meaningful for a model trained with the reference sometimes dropped "
                        "(blacked out); this project's training has no such reference dropout, so its models "
                        "never saw a black reference and the result is not validated. 1 = off, no extra cost "
                        "(default: 1)")
    return p


# What only --method model uses, and what only one of its modes uses: a run given one it does not
# use would silently ignore it (--mode recursive with flow, --anchor-every with recursive)
MODEL_ONLY = ("ckpt", "control", "config", "set", "allow_pickle", "device", "precision", "cuda_graph", "compile",
              "mode", "anchor_every", "anchor_strength", "steps", "eta", "seed", "noise", "size", "batch",
              "ref_guidance", "raw")
MODE_ONLY = {"batch": ("fixed", "batches (it goes frame by frame)"), "anchor_every": ("anchored", "anchoring"),
             "anchor_strength": ("anchored", "anchoring")}


class UsageError(Exception):
    """Bad arguments; str(e) is one line."""


def given_flags(argv: Sequence[str] | None) -> set[str]:
    """The dests of MODEL_ONLY that `argv` names, whatever their values: a flag typed with its
    default value (--anchor-every 8 in recursive mode) is as unused as any other. Found by
    parsing again with a default no command line can give (an object: argparse converts string
    defaults); --set appends to its default, so it is given when it holds anything."""
    p, unset = parser(), object()
    p.set_defaults(**{dest: unset for dest in MODEL_ONLY if dest != "set"})
    args = p.parse_args(argv)
    return {dest for dest in MODEL_ONLY if (bool(args.set) if dest == "set" else getattr(args, dest) is not unset)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line, with `given`: the flags of MODEL_ONLY it names (given_flags)."""
    args = parser().parse_args(argv)
    args.given = given_flags(argv)
    return args


def check_used(args) -> None:
    """Refuse a flag that this run would not use: one of `args.given` (parse_args)."""
    for dest in MODEL_ONLY if args.method != "model" else MODE_ONLY:
        value = getattr(args, dest)
        if dest not in args.given:
            continue
        flag = "--" + ("no-" if value is False else "") + dest.replace("_", "-")
        if args.method != "model":
            raise UsageError(f"{flag} is for --method model; --method {args.method} uses no model: leave it out")
        mode, what = MODE_ONLY[dest]
        if args.mode != mode:
            raise UsageError(f"{flag} is for --mode {mode}; --mode {args.mode} takes no {what}: leave it out")


def parse_range(spec: str | None) -> slice:
    """--frames A:B as a slice. Its messages quote the value: in "--frames -1:: expected ..." a value
    ending in ':' ran into the message's own ': '."""
    if spec is None:
        return slice(0, None)
    try:
        a, _, b = spec.partition(":")
        start, stop = int(a) if a else 0, int(b) if b else None
    except ValueError:
        raise UsageError(f"--frames {spec!r}: expected A:B with whole numbers, e.g. 0:16") from None
    if ":" not in spec or start < 0 or (stop is not None and stop <= start):
        raise UsageError(f"--frames {spec!r}: expected A:B with 0 <= A < B, e.g. 0:16 or 100:")
    return slice(start, stop)


def check_args(args) -> tuple[P.Options, Path | DictConfig | None]:
    """Refuse bad arguments before any work; returns the sampling settings and, for --method
    model, the model config's source (weights_config.resolve_config's choice: found once, for the
    step check, the "config: ..." line and the load).

    The sampling values are checked where the library checks them (pipeline.Options), each
    message naming its flag.
    """
    check_used(args)
    try:
        options = P.Options(size=args.size, steps=args.steps, eta=args.eta, seed=args.seed, noise=args.noise,
                            ref_guidance=args.ref_guidance, raw=args.raw, precision=args.precision,
                            anchor_every=args.anchor_every, anchor_strength=args.anchor_strength, batch=args.batch,
                            cuda_graph=args.cuda_graph, pad_batches=args.compile)
    except P.OptionError as e:
        raise UsageError(f"--{e.field.replace('_', '-')} {e.problem}") from None
    if args.fps is not None and not 0.01 <= args.fps <= 1000:  # also NaN and inf, which hang OpenCV's writer
        raise UsageError(f"--fps must be between 0.01 and 1000 (got {args.fps})")
    if args.fps is not None and not args.video:  # else taken and silently unused
        raise UsageError("--fps is the frame rate of --video: give --video too")
    if args.fps is not None and Path(args.input).is_file():  # a video's own rate is its sound's: kept in step
        raise UsageError(f"--fps is for frame-folder input: --input {args.input} is a video, whose own frame rate "
                         "--video keeps (so that its sound stays in step)")
    out = Path(args.out)
    if problem := out_folder_problem("--out", out):
        raise UsageError(problem)
    if args.video:
        video = Path(args.video)
        if problem := out_file_problem("--video", video):
            raise UsageError(problem)
        # PNG folders hold frames only (evaluate.py, --input); realpath: Path.resolve raises on a symlink loop
        if Path(os.path.realpath(out)) in Path(os.path.realpath(video)).parents:
            raise UsageError(f"--video {video} is inside --out {out}; write it elsewhere, as a frame folder "
                             "holds frames only")
    if not args.reference and not args.reference_frame:
        raise UsageError("no reference: give --reference IMAGE or --reference-frame N")
    if args.method == "model" and not args.ckpt:
        raise UsageError("--method model needs --ckpt (or use a baseline that needs none: --method reinhard, "
                         "reinhard-bands or flow)")
    if args.control:
        check_weights_file("--control", args.control)
        from cldm.resume import read_training_checkpoint
        if read_training_checkpoint(args.control) is not None:  # "no control_model.* tensors" would follow
            raise UsageError(f"--control {args.control}: a training checkpoint, not an export; make one with "
                             "tutorial_train_sd21_color_v2.py ... --export, or pass the run's OUT/control.safetensors")
    if args.video and Path(args.video).suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(f"--video {args.video}: use a {'/'.join(VIDEO_SUFFIXES)} file name")
    if args.audio is not None:
        if not args.video or args.no_audio:
            raise UsageError("--audio is the sound of --video: " + ("give --video too" if not args.video else
                                                                      "leave out --audio or --no-audio"))
        if problem := file_problem(args.audio):
            raise UsageError(f"--audio {args.audio}: {problem}")
        if audio_codec(args.audio) is None:
            raise UsageError(f"--audio {args.audio}: no audio stream found in it")
    if args.method != "model":
        return options, None
    source = weights_config.resolve_config(args.ckpt, args.config, args.control)
    # the schedule is the config's: known before the weights are loaded
    steps_option(options.steps, L.schedule_length(args.ckpt, args.control, args.config, args.set, source))
    return options, source


def sound_source(args, info: SourceInfo | None) -> tuple[Path | None, str | None]:
    """(whose audio --video gets, its codec): --audio, else the input video's own if it has some,
    else (None, None)."""
    if not args.video or args.no_audio or (args.audio is None and info is None):
        return None, None
    source = Path(args.audio if args.audio is not None else args.input)
    codec = audio_codec(source)
    return (source, codec) if codec is not None else (None, None)


def audio_codec(path) -> str | None:
    """colorize.audio.audio_codec, with one line if PyAV is missing (an older install)."""
    try:
        return A.audio_codec(path)
    except ImportError:
        raise UsageError("--video takes the input's sound with PyAV, which is not installed: pip install -r "
                         "requirements.txt, or pass --no-audio") from None


def steps_option(steps: int, num_timesteps: int) -> None:
    try:
        P.check_steps(num_timesteps, steps)
    except P.OptionError as e:
        raise UsageError(f"--steps {e.problem}") from None


def check_inputs_kept(args) -> None:
    """Refuse outputs that land on an input: --out as the --input or --gt folder (--overwrite would
    replace the frames of the same name), --video as the input or --gt video or the --audio file
    (replaced, even without --overwrite's intent to touch inputs) or inside their frame folder (a
    video file there makes the folder unreadable as frames)."""
    real = os.path.realpath  # not Path.resolve(), which raises on a symlink loop
    out, video = real(args.out), real(args.video) if args.video else None
    for what, path in [("input", Path(args.input)), ("--gt", Path(args.gt) if args.gt else None),
                       ("--audio", Path(args.audio) if args.audio else None)]:
        if path is None or not path.exists():
            continue
        if path.is_dir() and out == real(path):
            raise UsageError(f"--out {Path(args.out)} is the {what} folder; write the outputs elsewhere")
        if video == real(path):
            raise UsageError(f"--video {Path(args.video)} is the {what} {'file' if what == '--audio' else 'video'}; "
                             "write it elsewhere")
        if video is not None and path.is_dir() and os.path.dirname(video) == real(path):
            raise UsageError(f"--video {Path(args.video)} is inside the {what} folder; write it elsewhere, as a frame "
                             "folder holds frames only")


def planned_outputs(args, frames: slice,
                    info: SourceInfo | None = None) -> tuple[Path, list[str] | None, int | None]:
    """The output folder, the range's file names and the number of frames of the whole input (None,
    None where the input does not say); refuses to start where outputs exist (unless --overwrite).
    A range that starts at the clip's end has no names: with --video it writes only the video,
    from the outputs in --out (video_only). `info`: the input video's probe(), if already made."""
    out = Path(args.out)
    source = Path(args.input)
    check_inputs_kept(args)
    names = P.output_names(source, info)
    clip = None if names is None else len(names)
    if names is not None:
        if not names[frames] and not (args.video and frames.start == clip > 0):
            # from the clip's end (without --video): say what the range is for
            hint = f"; with --video V it writes only the video from the {R.counted(clip)} in --out" \
                if frames.start == clip > 0 else ""
            raise UsageError(f"--frames {args.frames} starts past the input's {R.counted(clip, 'frame')}{hint}")
        names = names[frames]
    if not args.overwrite:
        taken = [out / n for n in names or [] if (out / n).exists()]
        # a run stopped without a word (SIGKILL, a power cut) leaves the range's first k outputs
        first_k = len(taken) if taken == [out / n for n in (names or [])[:len(taken)]] else 0
        if args.video and Path(args.video).exists():
            taken.append(Path(args.video))
        if taken:
            go_on = f"--frames {frames.start + first_k}:{'' if frames.stop is None else frames.stop} continues a " \
                "run stopped there, or " if 0 < first_k == len(taken) < len(names) else ""
            raise UsageError(f"{taken[0]} exists ({len(taken)} output(s) already there); "
                             f"{go_on}pass --overwrite to replace them")
    return out, names, clip


def video_rate(fps: float, times: A.FrameTimes | None, frames: int, stated: float | None) -> str:
    """How the frame rate of a --video of `frames` frames written at `fps` is said: where the
    input video's own frame `times` were kept (write_video_atomic), a rate it does not state
    is their average, and a variable one is called so; variable times that could not be kept
    are said too (the sound may drift)."""
    if times is None:
        return f"{fps:g} fps"
    if len(times.pts) != frames:
        return f"{fps:g} fps" + ("" if times.uniform() else
                                 f"; the input's frame rate varies, but its {len(times.pts)} frame times do not "
                                 f"match the {frames} frames: the sound may drift")
    if not times.uniform():
        return f"the input's variable frame rate, {times.fps():.4g} fps on average"
    return f"{stated:g} fps" if stated else f"{times.fps():.4g} fps"


def video_only(frames: slice, names: list[str] | None) -> bool:
    """Whether the run colourises nothing and writes --video from the outputs in --out: a range
    that starts at the clip's end (planned_outputs lets one through with --video only)."""
    return names == [] and frames.start > 0


def frames_outside(args, frames: slice, info: SourceInfo | None, out: Path,
                   only_video: bool = False) -> tuple[list[str], list[str]]:
    """The output names before and after a --frames range that is only part of the clip, which
    --video takes from --out (a stopped run is continued with --frames N: and still gives the
    whole clip's video); refused up front if any of them is not there. ([], []) without --video
    or for a whole-clip range. `only_video`: the range starts at the clip's end (video_only)."""
    if not args.video or (frames.start == 0 and frames.stop is None):
        return [], []
    every = P.output_names(Path(args.input), info)
    if every is None:  # a video that does not say how long it is
        if frames.stop is not None:
            raise UsageError(f"--video with --frames {args.frames}: {args.input} does not say how many frames it "
                             f"has, so the frames after {frames.stop - 1} cannot be checked in --out; use "
                             f"--frames {frames.start}: or make the video without --frames")
        every = [f"{i:06d}.png" for i in range(frames.start)]
    stop = len(every) if frames.stop is None else min(frames.stop, len(every))
    before, after = every[:frames.start], every[stop:]
    missing = [(i, n) for i, n in [*enumerate(before), *enumerate(after, stop)] if not (out / n).is_file()]
    if missing and only_video:
        i, name = missing[0]
        raise UsageError(f"--video with --frames {args.frames} writes the video from the {R.counted(len(every))} in "
                         f"--out, but {out / name} (frame {i}) is missing ({len(missing)} of the {len(every)}): "
                         "colourise the missing frames first")
    if missing:
        i, name = missing[0]
        raise UsageError(f"--video with --frames {args.frames} makes the whole clip's video, taking the other "
                         f"frames from --out, but {out / name} (frame {i}) is missing ({len(missing)} of the "
                         f"{len(before) + len(after)} outside the range): colourise them first, or run without "
                         "--frames, or without --video")
    return before, after


def other_settings_kept(out: Path, names: list[str] | None, record: dict) -> str | None:
    """The note for a run that leaves frames of --out in place (outside its --frames, or of
    another clip) of which one was made with other settings than its own `record`
    (colorize.provenance; an earlier version's frames have none), or None. Each such frame's
    first bytes are read (about a second for 100k frames). `names`: this run's outputs (None: a
    video of unknown length, not checked)."""
    if names is None or not out.is_dir():
        return None
    mine = set(names)
    kept = (p for p in sorted(out.glob("*.png")) if p.name not in mine and not p.name.startswith("."))
    for path, earlier in provenance.recorded(kept):
        if diff := provenance.differences(earlier, record):
            return (f"{out} keeps frames this run does not replace (e.g. {path.name}) made with other settings: "
                    f"{'; '.join(diff)}; the clip mixes them (rerun it whole with --overwrite for one look)")
    return None


def input_size(source, info: SourceInfo | None, start: int) -> tuple[int, int]:
    """(height, width) of the input's frames from `start` on, which the outputs have: a video's
    (`info`, its probe()), or a folder's frame `start` (the range's frames share its size)."""
    if info is not None:
        return info.height, info.width
    return decode_image(list_frame_files(source)[start]).shape[:2]


def load_references(args) -> M.References:
    """Reference images, for --reference-frame ones their frame index in the clip, and each
    one's flag, which messages name it by."""
    refs, indices = [], []
    for path in args.reference:
        refs.append(P.read_reference(path))
        if not P.to_gray(refs[-1])[1]:
            raise UsageError(f"--reference {path} is gray: it has no colours to give")
        indices.append(None)
    source = args.gt or args.input
    for n in args.reference_frame:
        if n < 0:
            raise UsageError(f"--reference-frame {n}: frame numbers start at 0")
        what = "--gt" if args.gt else "--input, as no --gt is given"
        try:  # --gt's first read: its errors name the flag
            ref = P.reference_frame(source, n)
        except FrameSourceError as e:
            raise UsageError(f"{'--gt' if args.gt else '--input'} {e}") from None
        except P.NoSuchFrame as e:
            raise UsageError(f"--reference-frame {n}: {source} ({what}) has no frame {n} (counting from 0; it has "
                             f"{e.count})") from None
        if not P.to_gray(ref)[1]:
            raise UsageError(f"--reference-frame {n}: frame {n} of {source} ({what}) is gray, not colour")
        refs.append(ref)
        indices.append(n)
    labels = [*(f"--reference {p}" for p in args.reference), *(f"--reference-frame {n}" for n in args.reference_frame)]
    return M.References(refs, indices, labels)


def check_weights_file(flag: str, path: str) -> None:
    """A missing, unreadable, foreign or cut-short weights file as one line naming its flag, before
    the "config:" line and the load (the file's header or zip directory is read, not its tensors)."""
    if problem := file_problem(path):
        raise UsageError(f"{flag} {path}: {problem}")
    try:
        check_checkpoint_file(path)
    except CheckpointError as e:
        raise UsageError(f"{flag} {e}") from None


def resolve_device(name: str) -> torch.device:
    try:
        return L.resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_model(args, source: Path | DictConfig, device: torch.device, info: SourceInfo | None,
               start: int) -> P.ControlLDM:
    """The model ready to sample: loaded (saying which config it found), held in the autocast
    dtype, compiled with --compile. `info`, `start`: as input_size takes them."""
    try:  # model frames too large: said before the weights load (a frame it cannot read: said in turn)
        P.checked_model_size(input_size(args.input, info, start), args.size)
    except FrameSourceError:
        pass
    check_weights_file("--ckpt", args.ckpt)  # here, not up front: a run that only writes --video reads no weights
    if args.config is None:  # say which config it found: beside or in the weights, or SD2.1's
        print(f"config: {source if isinstance(source, Path) else f'the one {args.control or args.ckpt} records'}")
    model = L.load_model(args.ckpt, args.control, args.config, args.set, device, args.allow_pickle, source,
                         note=lambda msg: print(f"{PROG}: note: {msg}", file=sys.stderr))
    dtype = L.compute_dtype(args.precision, model.betas.device)
    if dtype != torch.float32:  # autocast would cast every weight at every step
        L.cast_weights(model, dtype)
    if args.compile:
        model.compile_denoiser(vae_decoder=True, dynamic=False)
    return model


def run(args) -> int:
    options, source = check_args(args)
    frames = parse_range(args.frames)
    device = resolve_device(args.device) if args.method == "model" else None
    # A folder is checked by listing it (reading any frame could hit one outside --frames);
    # a video by decoding its first frame. Their errors name the flag, as other flags' do.
    try:
        info = None if Path(args.input).is_dir() else probe(args.input)
        out, names, clip_length = planned_outputs(args, frames, info)  # lists a folder
    except FrameSourceError as e:
        raise UsageError(f"--input {e}") from None
    # --frames N: at the clip's end with --video: only the video, from the outputs in --out (the
    # references and the model are not read: nothing is colourised)
    only_video = video_only(frames, names)
    before, after = frames_outside(args, frames, info, out, only_video)
    for folder in {out, *([Path(args.video).parent] if args.video else [])}:
        remove_stale_temps(folder)  # a killed run's hidden temporary PNGs and videos
    refs = None if only_video else load_references(args)
    fps = args.fps or (info and info.fps) or DEFAULT_FOLDER_FPS
    # a video's own frame times, read (a pass over its file) once its frames are written
    times = functools.cache(lambda: A.frame_times(args.input, info.lead)) if args.video and info is not None \
        else None
    sound, codec = sound_source(args, info)
    size_from = frames.start - 1 if only_video else frames.start  # a frame of the input (a folder's: read)
    model = load_model(args, source, device, info, frames.start) if args.method == "model" and not only_video \
        else None
    notes = set()
    total = len(names) if names else None
    bar = progress_bar(total, args.mode if args.method == "model" else args.method,
                       disable=args.no_progress or only_video)
    record = provenance.settings(args, source)
    writer = O.OrderedWriter(out, frames.start, overwrite=args.overwrite, keep_rgb=bool(args.video), record=record)
    plan = R.RunPlan(args.method, args.mode, args.batch, frames, tuple(args.reference_frame), bool(args.video), total,
                     clip_length)

    def note(msg):
        if msg not in notes:
            notes.add(msg)
            bar.write(f"{PROG}: note: {msg}", file=sys.stderr)

    def note_odd_size(height: int, width: int):
        if args.video and (width, height) != even_size(width, height):
            w, h = even_size(width, height)
            note(f"--video: frames are {width}x{height} and MPEG-4 needs even sides, "
                 f"so the video is {w}x{h} (last column/row repeated); the PNGs keep the input size")

    if not only_video and (mixed := other_settings_kept(out, names, record)):
        note(mixed)

    def make():
        if only_video:  # nothing to colourise
            return iter(())
        # flow's frames waiting for a late reference frame, past 1 GiB: beside the outputs, on their disk
        spill_to = next(p for p in (out, *out.absolute().parents) if p.is_dir())
        return M.colourised(args.input, refs, frames, total, note, bar.update, args.method, model, args.mode, options,
                            show_progress=not args.no_progress, spill_to=spill_to)

    def make_all() -> int:
        if only_video:  # no new frame to tell the size by
            note_odd_size(*input_size(args.input, info, size_from))
        new = writer.written(make, on_first=lambda rgb: note_odd_size(*rgb.shape[:2]))
        with closing(new):  # a stop between two outputs (outside the writer) drains it before its count is said
            if not args.video:
                return sum(1 for _ in new)
            clip = O.video_frames(new, out, before, after, lambda: input_size(args.input, info, size_from))
            with closing(clip):  # closed before its error is handled, so the PNGs made get written
                return write_video_atomic(args.video, clip, fps, audio_from=sound, times=times,
                                          lead=info.lead if info is not None else 0.0)

    finished = False
    video_was = R.file_identity(args.video)  # --overwrite's old video, if any: a new one there is this run's
    try:
        try:
            with signals_noted() as stops:
                n = make_all()
            finished = True
        except (O.OutputError, M.MethodError, P.InferenceError, FrameSourceError, OSError, MemoryError, RuntimeError,
                cv2.error) as e:
            if stops:  # Ctrl-C or SIGTERM, turned into its own error by a library's C code it came in: a stop,
                # whose line says where to go on (run_cli's own would say that nothing was written)
                raise (Terminated if signal.SIGTERM in stops else KeyboardInterrupt)() from None
            if isinstance(e, (RuntimeError, cv2.error)) and not out_of_memory(e):
                raise
            raise UsageError(R.stopped_by(e, args, device, writer, plan)) from None
        finally:
            bar.close()
        # the run is complete: a Ctrl-C or SIGTERM from here has nothing to stop. One as it returned (its
        # objects freed: a model, a while) or in run_cli before it did ended it with "interrupted before any
        # output was written", exit 130 (the rerun it advises is refused: the outputs exist), or a traceback
        # from tqdm's __del__
        ignore_stop_signals()
        earlier = f"{n} frames, {len(before) + len(after)} of them already in {out}, " if before or after else ""
        count = R.counted(writer.count, "frame")
        sound_line = "" if sound is None else \
            f"sound of {sound} ({codec}{' copied' if A.copied(codec, args.video) else ' re-encoded to AAC'}), "
        rate = video_rate(fps, times and times(), n, info and info.fps)
        if args.video and writer.count == 0:  # only the video (or an unknown-length input with no frames left)
            print(f"wrote {args.video} from the {R.counted(n)} in {out} ({sound_line}{rate})")
        else:
            print(f"wrote {count} to {out}" + (f" and {args.video} ({earlier}{sound_line}{rate})"
                                               if args.video else ""))
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (run_cli's Terminated): say where to continue
        # a second Ctrl-C while that is worked out (a stat of --video), or after it before run_cli says it,
        # ended it with run_cli's "interrupted before any output was written", whose rerun is refused: the
        # outputs exist. It stops nothing more
        ignore_stop_signals()
        said = R.where_it_stopped(args, frames, out, writer, plan, only_video, finished, video_was)
        if said is None:
            raise
        raise type(e)(said) from None


INTERRUPTED = "interrupted before any output was written"  # once frames are written, run() says where to go on


def main(argv: list[str] | None = None, stop_line: bool = True) -> int:
    """`stop_line=False`: Ctrl-C and SIGTERM propagate to the calling tool, which says how its
    own run continues (this script's `--frames N:` advice would not apply there)."""
    return run_cli(PROG, run, parse_args(argv),
                   (UsageError, P.InferenceError, FrameSourceError, CheckpointError, ConfigError, OSError),
                   interrupted=INTERRUPTED if stop_line else None, needs=("opencv", "av", "open_clip"))


if __name__ == "__main__":
    exit_quietly(main())
