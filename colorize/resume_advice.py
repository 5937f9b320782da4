"""Where a stopped colorize_inference.py run goes on: the --frames range whose outputs, added to
those already written, are the uninterrupted run's. The advice names the CLI's flags; the
script appends it to its error and Ctrl-C lines.

The count of outputs written and the next frame come from colorize.outputs.OrderedWriter: the
outputs are written in clip order, so those written are the range's first `written`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from annotator.video import TruncatedVideoError


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
                f"{plan.clip} output{'' if plan.clip == 1 else 's'} in --out)")
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
