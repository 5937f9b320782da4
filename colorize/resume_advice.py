"""Where a stopped colorize_inference.py run goes on: the --frames range whose outputs, added to
those already written, are the uninterrupted run's, and the one line the run stops with (an
error's, stopped_by; Ctrl-C's or SIGTERM's, where_it_stopped): what is written, and that
advice. The advice names the CLI's flags and takes its parsed arguments.

The count of outputs written and the next frame come from colorize.outputs.OrderedWriter: the
outputs are written in clip order, so those written are the range's first `written`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from annotator.video import TruncatedVideoError
from atomicio import file_identity
from cliutil import one_line, out_of_memory
from colorize import outputs as O

if TYPE_CHECKING:
    import torch


def counted(n: int, noun: str = "output") -> str:
    """'1 output' / '3 outputs'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def outputs(n: int, kind: str = "", before: str = "") -> str:
    """'1 new output is' / '3 new outputs are' (`before`: words between the noun and its verb)."""
    words = [counted(n, f"{kind}output"), before, "is" if n == 1 else "are"]
    return " ".join(w for w in words if w)


@dataclass(frozen=True)
class RunPlan:
    """What a run was asked for, as far as where it goes on depends on it."""
    method: str  # --method
    mode: str  # --mode: fixed mode batches
    batch: int  # --batch
    frames: slice  # --frames: its start is the clip index of the first output
    reference_frames: Sequence[int] = ()  # --reference-frame: flow walks from them
    video: bool = False  # --video given
    total: int | None = None  # outputs of the range; None where the input does not say how many
    clip: int | None = None  # frames of the whole input (known where `total` is); None where it does not say


def frames_it_holds(plan: RunPlan, decoded: int, written: int, next_frame: int, start: int,
                    again: str = "") -> str | None:
    """The range from `start` that colourises the frames a cut-off file still holds (its first
    `decoded`) after the last output (None if it holds none). `again`: the range's flag to make
    outputs written again (" --overwrite")."""
    if decoded <= next_frame:
        return None
    if plan.method == "flow" and (past := [i for i in plan.reference_frames if i >= decoded]):
        return f"it ends before flow's reference frame {min(past)}"  # which a range must hold
    return (f"--frames {start}:{decoded}{again}{' without --video' if plan.video else ''} colourises the "
            f"{'rest of the ' if written else ''}frames it holds")


def where_to_continue(plan: RunPlan, written: int, next_frame: int, error: BaseException | None = None) -> str:
    """The advice for a run stopped (by `error`, or Ctrl-C) after `written` outputs, the next
    being frame `next_frame`."""
    if plan.total is not None and written == plan.total:  # the video failed after the last frame, or a stop
        # came while the last PNGs were written
        if not plan.video:
            return "that is all of them"
        if plan.clip is None:  # a RunPlan made without the clip's length: the whole range again
            return "only --video is missing: rerun with --overwrite"
        # the range from the clip's end colourises nothing and writes the video from the outputs in --out
        # (which a --video run with a range that is part of the clip checked were all there, up front)
        return (f"only --video is missing: rerun with --frames {plan.clip}: (it writes the video from the "
                f"{counted(plan.clip)} in --out)")
    start, again, why = next_frame, "", ""
    if plan.method == "flow" and any(i < start for i in plan.reference_frames):
        # flow walks from its reference frames, which a range must hold (methods.flow_start_indices): it
        # goes on from the first of them, making the outputs since again. The same ones (the walks are
        # deterministic and each frame's reference is its own choice), but for one corner: if that
        # frame chose another reference than its own, its run walks from the run's first frame,
        # which in the original range may lie before it
        start = min(plan.reference_frames)
        again, why = " --overwrite", f" (flow walks again from its reference frame {start})"
    elif plan.method == "model" and plan.mode == "fixed" and (into := (start - plan.frames.start) % plan.batch):
        # stopped part-way through writing a batch (Ctrl-C, a full disk): a run from the next frame
        # would batch the frames otherwise, and a frame sampled in another batch can differ by float
        # rounding (an 8-bit level); from the batch's first frame the batches, so the frames, are this run's
        start -= into
        again = " --overwrite"
        why = " (from the start of the batch it stopped in: the frames of an uninterrupted run)"
    # A cut-off file ends at frame error.decoded: going on from next_frame in it ends in this error again.
    held = frames_it_holds(plan, error.decoded, written, next_frame, start, again) \
        if isinstance(error, TruncatedVideoError) else None  # held: a batch being made when it ran out, say
    if held is not None and held.startswith("--frames"):
        # the copy's range then goes over the outputs of the held range, if that was run first: refused
        # without --overwrite, and in fixed mode made again in this run's batches (a frame sampled in the
        # held range's short batch can differ by float rounding)
        again = " --overwrite"
    go_on = f"--frames {start}:{plan.frames.stop if plan.frames.stop is not None else ''}{again} continues{why}"
    if not isinstance(error, TruncatedVideoError):
        return go_on
    return f"{held or 'it holds no more frames'}; with a complete copy of the file, {go_on}"


def stopped_by(e: BaseException, args, device: torch.device | None, writer: O.OrderedWriter, plan: RunPlan) -> str:
    """The one line for an error that stopped the run: the error, then what is written and where
    to go on."""
    message = one_line(e)
    if out_of_memory(e):
        message = (f"out of memory on {device or 'the CPU'} at --size {args.size}, --batch {args.batch}: lower them"
                   if plan.method == "model" else  # the baselines work at the frames' own size, one at a time
                   f"out of memory on the CPU: --method {plan.method} works on the frames at their own size; "
                   "downscale them first")
    mend = None
    if isinstance(e, O.EarlierOutputError) and (i := e.unreadable) is not None:  # that frame made again mends it
        mend = f"colourise frame {i} again with --frames {i}:{i + 1} --overwrite without --video"
    if writer.count == 0:
        if isinstance(e, TruncatedVideoError) and (
                holds := frames_it_holds(plan, e.decoded, writer.count, writer.next_frame, plan.frames.start)):
            message += f" (nothing was written; {holds})"
        elif mend:
            message += f" (nothing was written; {mend}, then rerun)"
        return message
    if isinstance(e, O.EarlierOutputError):  # a frame outside the range, read after the new ones
        then = f": {mend}, then --frames {plan.clip}: writes the video" if mend and plan.clip else ""
        return f"{message} (the {outputs(writer.count, 'new ')} written and complete; only --video is missing{then})"
    go_on = where_to_continue(plan, writer.count, writer.next_frame, e)
    batch = batch_not_written(plan, writer.count, writer.next_frame, e)
    before = "before it" if batch is None else f"before its batch, frames {batch[0]}-{batch[1]},"
    return f"{message} (the {outputs(writer.count, before=before)} written and complete; {go_on})"


def batch_not_written(plan: RunPlan, written: int, next_frame: int, e: BaseException) -> tuple[int, int] | None:
    """The first and last frame of the fixed-mode batch that `e` (not a write's error) stopped
    before any of its outputs was written, where it has more than one: the frame `e` names can
    be any of them, so not every frame before it has an output. None elsewhere."""
    if plan.method != "model" or plan.mode != "fixed" or isinstance(e, (OSError, O.OutputError)) \
            or (next_frame - plan.frames.start) % plan.batch or written == plan.total:
        return None
    stop = plan.frames.stop if plan.total is None else plan.frames.start + plan.total
    last = next_frame + plan.batch - 1 if stop is None else min(next_frame + plan.batch, stop) - 1
    return (next_frame, last) if last > next_frame else None


def where_it_stopped(args, frames: slice, out: Path, writer: O.OrderedWriter, plan: RunPlan, only_video: bool,
                     finished: bool, video_was) -> str | None:
    """The line of a run stopped by Ctrl-C or SIGTERM: what is written and where to go on (None:
    nothing is, run_cli's own line says so)."""
    if not finished and args.video and file_identity(args.video) not in (None, video_was):
        # stopped once the video was renamed into place (in its os.replace, or on the way back): as the
        # video takes each frame once its PNG is written, the run is complete
        finished = True
    if finished and writer.count == 0:  # only the video was made (video_only, or an input of unknown length
        # with no frames left in the range)
        return f"interrupted as it finished; {args.video} is written and complete" if args.video else None
    if only_video:
        return (f"interrupted; {args.video} is not written (the outputs in {out} are untouched): "
                f"--frames {frames.start}: writes it")
    if finished:  # in the last lines: nothing is missing
        video = f" and {args.video}" if args.video else ""
        done = f"all {writer.count} outputs" if writer.count != 1 else "the 1 output"
        are = "is" if writer.count == 1 and not args.video else "are"
        return f"interrupted as it finished; {done}{video} {are} written and complete"
    if writer.count == 0:
        return None
    go_on = where_to_continue(plan, writer.count, writer.next_frame)
    return f"interrupted; the {outputs(writer.count, before='written so far')} complete: {go_on}"
