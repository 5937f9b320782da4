"""A run's output PNGs, written in clip order and counted, and the frames of its --video.

Each PNG is encoded on a worker thread (OpenCV lets go of the GIL) while the next frames are
made: encoding a 720p frame takes ~35 ms, as long as a baseline's colouring, and the main
thread also feeds the GPU. Each is written under a temporary name and renamed, one after the
other in clip order, so the outputs counted are exactly those complete on disk, the first so
many of the range: what a stopped run continues from (colorize/resume_advice.py).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from annotator.video import FrameSourceError, read_image
from cliutil import one_line, signals_deferred
from colorize.frames_io import encode_png, write_bytes_atomic
from colorize.provenance import with_record

PNG_THREADS = min(4, os.cpu_count() or 1)  # PNGs encoded at once, while the next frames are made


class OutputError(Exception):
    """An output the run cannot write or use; str(e) is one line naming it."""


class OutputExistsError(OutputError):
    """An output is there already and --overwrite was not given (found as it is made: a video
    whose length was unknown up front)."""


class EarlierOutputError(OutputError):
    """A frame of --out outside --frames that --video cannot use (unreadable, another size).
    `unreadable`: the clip index of an output that cannot be read, which colourising that frame
    again mends (None for one of another size: --out is then another clip's)."""

    def __init__(self, message: str, unreadable: int | None = None):
        super().__init__(message)
        self.unreadable = unreadable


class OrderedWriter:
    """Writes a run's outputs into `out` in clip order. `count` outputs are written and complete,
    and `next_frame` is the clip index of the first that is not; `start`: the range's first."""

    def __init__(self, out: Path, start: int, overwrite: bool = False, keep_rgb: bool = False,
                 record: dict | None = None):
        self.out, self.overwrite, self.keep_rgb, self.record = Path(out), overwrite, keep_rgb, record
        self.count = 0
        self.next_frame = start
        self._trying: Path | None = None  # the output being written: done again after a stop, it may replace its own

    def _encode(self, rgb: np.ndarray, depth: int) -> bytes:
        """The PNG of an output, carrying `record` (colorize.provenance: what made it)."""
        png = encode_png(rgb, depth)
        return png if self.record is None else with_record(png, self.record)

    def _write_first(self, pending: deque) -> np.ndarray | None:
        """Write the first of `pending` (target, its PNG being encoded, rgb); taken off once written,
        so a stop inside leaves it first."""
        target, png, rgb = pending[0]
        data = png.result()
        # a stop between the rename and the count (a second Ctrl-C, while a stop drains the pending
        # outputs) left a complete output uncounted, so the --frames N: advised was refused: it exists
        with signals_deferred():
            try:  # never over a file another run made since the check at its start (not this run's to replace)
                replace, self._trying = self.overwrite or target == self._trying, target
                write_bytes_atomic(target, data, replace=replace)
            except FileExistsError:  # another run's: this one stops before it, as at an output there already
                self._trying = None
                pending.clear()  # the frames after it are not written either (the outputs stay the first so many)
                raise OutputExistsError(f"{target} exists; pass --overwrite to replace it") from None
            except OSError as e:  # a full disk's error names no file
                raise OSError(f"cannot write {target}: {e.strerror or one_line(e)}") from None
            pending.popleft()
            self.count += 1
            self.next_frame += 1
        return rgb

    def written(self, make: Callable[[], Iterable[tuple[str, int, np.ndarray]]],
                on_first: Callable[[np.ndarray], None] | None = None) -> Iterator[np.ndarray | None]:
        """The outputs of `make()` ((file name, bit depth, RGB) in clip order), each yielded once its
        PNG is written: the RGB with `keep_rgb` (for --video), else None. `on_first(rgb)` is called
        at the first, once `out` exists (created only then: a run refused at its first frame leaves
        no folder).

        Frames made before an error are written before it is raised, as if in turn. `make` is
        called here, not passed as an iterator, so that the loop holds the only reference to what
        it returns: a stop while writing closes it (and what it holds) before that drain."""
        pending = deque()  # (target, its PNG being encoded, rgb for --video: else not held)
        with ThreadPoolExecutor(PNG_THREADS) as pool:
            try:
                for name, depth, rgb in make():
                    if self.count == 0 and not pending:
                        self.out.mkdir(parents=True, exist_ok=True)
                        if on_first is not None:
                            on_first(rgb)
                    target = self.out / name
                    if os.path.lexists(target) and not self.overwrite:  # a broken link too: not replaced
                        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
                    pending.append((target, pool.submit(self._encode, rgb, depth), rgb if self.keep_rgb else None))
                    if len(pending) > PNG_THREADS:
                        yield self._write_first(pending)
                while pending:  # inside: a stop here (one just after a rename, say) is drained too
                    yield self._write_first(pending)
            except GeneratorExit:  # the video stopped taking frames (its caller closes it): its error is
                try:  # being reported, and the frames made are worth keeping unless the disk refuses them
                    while pending:
                        self._write_first(pending)
                except OSError:
                    pass
                raise
            except BaseException:
                while pending:
                    self._write_first(pending)
                raise


def video_frames(new: Iterable[np.ndarray], out: Path, before: list[str], after: list[str],
                 frame_size: Callable[[], tuple[int, int]]) -> Iterator[np.ndarray]:
    """The whole clip for --video: the outputs named `before` and `after` the range read from
    `out`, the `new` ones between as they are made. Those read must have the input's size
    (height, width): `frame_size()`, asked before the first is read (not before the video writer
    starts), so that the frame of `out` that differs is named, whichever comes first."""
    size = frame_size() if before or after else None

    def earlier(names, first: int):  # first: the clip index of names[0]
        for i, name in enumerate(names, first):
            try:
                rgb = read_image(out / name)
            except FrameSourceError as e:
                raise EarlierOutputError(f"--video: {e}", unreadable=i) from None
            if rgb.shape[:2] != size:
                raise EarlierOutputError(f"--video: {out / name} is {rgb.shape[1]}x{rgb.shape[0]}, the input's "
                                         f"frames {size[1]}x{size[0]}: --out holds frames of another clip or size")
            yield rgb

    yield from earlier(before, 0)
    made = 0
    for rgb in new:
        made += 1
        yield rgb
    yield from earlier(after, len(before) + made)
