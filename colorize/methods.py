"""A clip colourised by any of colorize_inference.py's methods, as one stream of outputs.

The model's modes (colorize/pipeline.py) and the baselines (colorize/baselines.py) take their
frames and references in their own ways; `colourised` gives every method's outputs as (output
name, bit depth, RGB) in clip order, which is what colorize/outputs.py writes. Streams: the
frames are read once (plus a scan for reference images with flow) and, but for frames waiting
for a flow reference (in a temporary file past FLOW_RAM bytes), only the current one is held.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cliutil import is_terminal
from colorize import pipeline as P
from colorize.baselines import iter_baseline
from colorize.frames_io import progress_bar
from colorize.references import most_similar_frames


class MethodError(Exception):
    """A method refuses the references or frames it is given; str(e) is one line naming the flag."""


@dataclasses.dataclass(frozen=True)
class References:
    """A run's colour references, in the order of their flags."""
    images: list[np.ndarray]
    frames: list[int | None]  # the clip frame each is the colour version of (--reference-frame); None: an image
    labels: list[str]  # each as the messages name it: "--reference PATH", "--reference-frame N"


def flow_start_indices(source: str | Path, refs: References, frames: slice, total: int | None,
                       note: Callable[[str], None], show_progress: bool = True) -> list[int]:
    """Positions (in the range being colourised) of the frames the references are colour
    versions of: where flow's walks start.

    A --reference image is anchored at its most similar frame (SSIM of gray thumbnails),
    which takes one extra pass over the range; that pass keeps nothing but scores.
    """
    images = [k for k, i in enumerate(refs.frames) if i is None]
    found = {}
    if images:
        # a second bar below the main one: on a terminal only (in a log, its cursor moves are
        # stray escape codes)
        scan = progress_bar(total, "finding the reference images' frames", leave=False,
                            disable=not show_progress or not is_terminal(sys.stderr),
                            iterable=P.iter_gray_frames(source, frames.start, frames.stop, note))
        try:
            found = dict(zip(images, most_similar_frames((f.gray for f in scan), [refs.images[k] for k in images])))
        finally:
            scan.close()
    indices = []
    for k, i in enumerate(refs.frames):
        if i is None:
            indices.append(found[k])
            continue
        end = None if total is None else frames.start + total
        if i < frames.start or (end is not None and i >= end):
            # before the range: what continuing a stopped flow run with --frames N: meets
            stop = "" if frames.stop is None else frames.stop
            go_on = f"; to continue a stopped run, start at it: --frames {i}:{stop} --overwrite" \
                if i < frames.start else ""
            raise MethodError(f"--reference-frame {i} lies outside the frames being colourised (flow starts from "
                              f"it){go_on}")
        indices.append(i - frames.start)
    for k, i in enumerate(indices):  # named here by clip frame and flag (baselines.py counts from the range)
        if (first := indices.index(i)) < k:
            how = " (a --reference image is placed at its most similar frame)" if None in \
                (refs.frames[first], refs.frames[k]) else ""
            raise MethodError(f"--method flow: {refs.labels[first]} and {refs.labels[k]} are both frame "
                              f"{frames.start + i}{how}; flow takes one reference per frame")
    return indices


FLOW_RAM = 2**30  # bytes of frames waiting for their reference's that flow holds in RAM; the rest in a file


def flow_held_bytes(waiting: int, shape: tuple[int, ...], depth: int, colour: bool = False) -> int:
    """Memory flow holds for `waiting` frames before their reference's frame (baselines.iter_flow):
    each one's gray, packed (1 byte a pixel for 8-bit gray frames, 2 for 16-bit; the float32 luma
    of colour frames, 4), then its output (float32 RGB, 12 bytes a pixel), all of them at once
    before the first is given out."""
    return waiting * math.prod(shape[:2]) * ((4 if colour else {8: 1, 16: 2}.get(depth, 4)) + 12)


def colourised(source: str | Path, refs: References, frames: slice, total: int | None, note: Callable[[str], None],
               progress: Callable[[int], object], method: str = "model", model=None, mode: str = "fixed",
               options: P.Options | None = None, show_progress: bool = True,
               spill_to: str | Path | None = None) -> Iterator[tuple[str, int, np.ndarray]]:
    """(output name, bit depth, RGB float output) in clip order of the frames `frames` of
    `source`, by `method`: "model" (`model` in `mode` with `options`) or a baseline. `total`: how
    many frames the range has, if known. `note(msg)` is told what the user should know (colour
    frames, a stretched reference); `progress(1)` is called as each frame is colourised. Flow's
    frames that wait for a reference frame go to a temporary file in `spill_to` (None: the
    system's temporary folder) past FLOW_RAM bytes."""
    seen = deque()  # (name, depth) of frames read but not yet output
    indices = flow_start_indices(source, refs, frames, total, note, show_progress) if method == "flow" else None

    def selected():
        for k, f in enumerate(P.iter_gray_frames(source, frames.start, frames.stop, note)):
            if f.colour:
                note(f"{source}: frames are colour; colourising their BT.601 luma")
            if k == 0 and indices and (held := flow_held_bytes(max(indices), f.gray.shape, f.depth,
                                                               f.colour)) > FLOW_RAM:
                where = spill_to or tempfile.gettempdir()
                note(f"--method flow: up to {max(indices)} frames before a reference's frame wait until it comes "
                     f"(their gray, then their outputs: about {held / 2**30:.1f} GiB at this frame size); past "
                     f"{FLOW_RAM / 2**30:.1f} GiB they are held in a temporary file in {where}, deleted as the run "
                     "ends; a reference from nearer the start of the frames needs less")
            if k == 0 and method in ("model", "flow"):  # a clip's frames share one size
                for ref in refs.images:  # resized to the frames' shape, whatever its own
                    (h, w), (rh, rw) = f.gray.shape[:2], ref.shape[:2]
                    if abs(math.log((rw / rh) / (w / h))) > 0.02:
                        note(f"a reference of {rw}x{rh} is stretched to the frames' {w}x{h} shape; crop it to "
                             "their aspect ratio for undistorted colours")
            seen.append((f.name, f.depth))
            yield f

    if model is not None:
        settings = dataclasses.asdict(options)
        batch = settings.pop("batch")
        outputs = P.colorize(model, selected(), refs.images, mode, batch=batch, start=frames.start, **settings)
        for out in outputs:
            progress(1)
            yield (*seen.popleft(), out)
        return
    try:
        for out in iter_baseline(method, (f.gray for f in selected()), refs.images, indices, progress, FLOW_RAM,
                                 spill_to):
            yield (*seen.popleft(), out)
    except ValueError as e:
        raise MethodError(f"--method {method}: {e}") from None
