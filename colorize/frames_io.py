"""Frame I/O for the colourisation CLIs: write outputs safely, show progress, prefetch reads.

Outputs are encoded to a temporary file in the destination folder and renamed over the
final name (os.replace, atomic on one file system), so an interrupted run never leaves a
half-written PNG or MP4 under a name that looks finished. Reading goes through
annotator/video.py, so folders are listed, ordered (natural sort) and decoded one way in
the whole repo.
"""
from __future__ import annotations

import math
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from annotator.color import to_uint8
from annotator.video import FrameSourceError, list_frame_files, natural_key, read_image, shown_path
from atomicio import temp_beside as _temp_beside, write_bytes_atomic  # noqa: F401 (write_bytes_atomic: public API)
from cliutil import bar_options, not_utf8, one_line, signals_deferred
from colorize.audio import FrameTimes, remux

__all__ = [
    "FrameSourceError", "natural_key", "list_frame_files", "read_image", "prefetch", "write_bytes_atomic",
    "write_image_atomic", "write_video_atomic", "even_size", "progress_bar",
]
# frames/s always (tqdm's default {rate_fmt} flips to s/frame below 1 frame/s)
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
BAR_FORMAT_OPEN = "{desc}: {n_fmt} [{elapsed}, {rate_noinv_fmt}{postfix}]"  # total unknown


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Yield `items` in order while a background thread produces up to `depth` ahead.

    For decoding frames while the caller computes (image decoders release the GIL). An
    exception in the producer is re-raised here, at the item where it happened; closing the
    generator early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer
            put((done, e))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item, err = q.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def progress_bar(total: int | None, desc: str, **kw) -> tqdm:
    """A tqdm bar over frames on stderr that always shows frames/s (e.g. "0.31 frame/s"): the
    average since the start (smoothing 0), since frames come in batches and a burst of 4 frames
    read as the latest rate shows several times the real speed."""
    kw.setdefault("file", sys.stderr)
    kw.setdefault("smoothing", 0)
    kw.setdefault("dynamic_ncols", True)
    kw.update(bar_options(kw["file"], kw.get("disable", False)))  # a log file: an update every 30 s
    return tqdm(total=total, desc=desc, unit=" frame", unit_scale=False,
                bar_format=BAR_FORMAT if total else BAR_FORMAT_OPEN, **kw)


def _as_uint8_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"expected uint8 or float [0, 1] pixels, got {img.dtype}")
        img = to_uint8(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return img
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HW or HW3 image, got shape {img.shape}")
    return img


def write_image_atomic(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB (or gray) image, uint8 or float in [0, 1], format from the extension.

    The file appears under `path` complete or not at all; an existing file is replaced.
    """
    path = Path(path)
    img = _as_uint8_rgb(rgb)
    ok, data = cv2.imencode(path.suffix or ".png", img if img.ndim == 2 else img[..., ::-1])
    if not ok:
        raise OSError(f"{path}: cannot encode image as {path.suffix or '?'}")
    return write_bytes_atomic(path, data.tobytes())


def encode_png(rgb: np.ndarray, depth: int) -> bytes:
    """An RGB float image in [0, 1] as PNG bytes of `depth` (8 or 16) bits per channel: a 16-bit
    input frame gets a 16-bit output, whose lightness keeps all its levels."""
    img = to_uint8(rgb) if depth == 8 else (np.clip(rgb, 0, 1) * 65535 + 0.5).astype(np.uint16)
    ok, data = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))  # ~14x faster than a numpy flip
    if not ok:
        raise OSError("cannot encode PNG")
    return data.tobytes()


def even_size(width: int, height: int) -> tuple[int, int]:
    """The (width, height) write_video_atomic writes: odd sides padded up by one pixel."""
    return width + width % 2, height + height % 2


def check_video(tmp: Path, frames: int, path: Path) -> None:
    """OpenCV's writer reports no write errors: a disk that fills leaves a video without its
    index (the moov atom, written last), which nothing can play. So read the header back."""
    cap = cv2.VideoCapture(str(tmp))
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    finally:
        cap.release()
    if count != frames:
        raise OSError(f"{path}: the video was not written completely (is the disk full?)")


def write_video_atomic(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float,
                       audio_from: str | os.PathLike | None = None,
                       times: FrameTimes | Callable[[], FrameTimes | None] | None = None, lead: float = 0.0) -> int:
    """Encode RGB frames (uint8 or float [0, 1], all one size) as MPEG-4 Part 2 ('mp4v').

    Streams: frames may be a generator. Returns the number of frames written. The video
    appears under `path` only once it is complete, with the sound of `audio_from` (a file
    with an audio stream) if given, and its frames at `times` (the source video's, from
    colorize/audio.py's frame_times; or a function giving them, called once the frames are
    written, as reading a film's times is a pass over its file) instead of at `fps` if those
    are one time per frame written (a source whose times cannot be matched to its frames gets
    `fps`, as a frame folder does); `lead`: the seconds of the source before its first
    decodable frame, the first written, which the sound skips too (remux). MPEG-4 (4:2:0
    chroma) needs even sides and the encoder would silently crop an odd one, so an odd-sized
    frame gets one more column and/or row, a copy of its last (edge replication, see
    `even_size`): nothing of the image is lost.
    """
    path = Path(path)
    if not (fps and 0 < fps < math.inf):  # NaN fails the test too; OpenCV hangs on inf
        raise ValueError(f"{path}: fps must be a positive finite number, got {fps}")
    if not_utf8(path.absolute()):  # OpenCV's binding would crash the process on it
        raise OSError(f"{shown_path(path)}: OpenCV cannot write a video whose path is not UTF-8: rename it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, writer, size, n = None, None, None, 0
    try:
        tmp = _temp_beside(path)  # inside: a stop right after it still removes it
        for frame in frames:
            img = _as_uint8_rgb(frame)
            bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR)
            if bgr.shape[0] % 2 or bgr.shape[1] % 2:
                bgr = cv2.copyMakeBorder(bgr, 0, bgr.shape[0] % 2, 0, bgr.shape[1] % 2, cv2.BORDER_REPLICATE)
            if writer is None:
                size = (bgr.shape[1], bgr.shape[0])
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), size)
                if not writer.isOpened():
                    raise OSError(f"{path}: cannot open an mp4v video writer (is the folder writable, the disk "
                                  "not full?)")
            elif (bgr.shape[1], bgr.shape[0]) != size:
                raise ValueError(f"{path}: frame {n} is {bgr.shape[1]}x{bgr.shape[0]}, "
                                 f"earlier frames {size[0]}x{size[1]}")
            writer.write(bgr)
            n += 1
        if writer is None:
            raise ValueError(f"{path}: no frames to write")
        writer.release()
        writer = None
        check_video(tmp, n, path)
        if callable(times):
            times = times()
        if times is not None and len(times.pts) != n:
            times = None
        if audio_from is not None or times is not None:
            _remux(tmp, path, audio_from, times, lead)
        os.replace(tmp, path)
    except BaseException:
        with signals_deferred():  # a second Ctrl-C as the writer is released (the encoder flushed) left tmp
            if writer is not None:
                writer.release()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    return n


def _remux(video: Path, path: Path, audio_from: str | os.PathLike | None, times: FrameTimes | None,
           lead: float = 0.0) -> None:
    """`video` (a temporary file) replaced by itself with the sound of `audio_from` and/or its
    frames at `times` (colorize/audio.py's remux)."""
    import av

    muxed = None
    try:
        muxed = _temp_beside(path)  # inside: a stop right after it still removes it
        remux(video, muxed, audio_from, times, lead)
        os.replace(muxed, video)
    except (av.FFmpegError, ValueError) as e:
        if audio_from is None:
            raise OSError(f"{path}: cannot give the video the input's frame times ({one_line(e)})") from None
        raise OSError(f"{path}: cannot add the sound of {audio_from} ({one_line(e)}); leave it out with --no-audio") \
            from None
    finally:
        if muxed is not None:
            muxed.unlink(missing_ok=True)
