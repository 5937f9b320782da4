"""Streaming frames out of video files and folders of frames.

One interface for both kinds of source so that dataset building and inference never hold
a whole film in memory: `probe(path)` says what a source is, `iter_frames(path)` yields its
frames one at a time as RGB uint8 HWC arrays. Anything wrong with a source (unreadable,
truncated, empty folder, a non-image file, frames of mixed sizes) raises `FrameSourceError`
with a one-line message that names the file, so a CLI can print it and move on.

Videos that decode fewer frames than their container claims: container counts are often
off by one or two, so up to COUNT_SLACK missing frames pass silently; more, up to one second
of frames (or a tenth of the claimed count for clips shorter than ten seconds), give one
warning line naming the file and the frames are kept; more than that is a truncated file,
unless the decoded frames' own times reach the container's end. That is a variable frame
rate: MKV and WebM store no frame count, and FFmpeg's estimate (duration x nominal rate)
is too high when frames last longer than the nominal 1/rate; or frames missing inside the
file. Either way it was read to its end, so the frames are kept, with one warning line.
Where frames are missing is not known (OpenCV's position counts delivered frames, and
AVI frames carry no time of their own), so the warnings do not claim they are at the end.

Frame folders: the images directly inside the folder, sorted naturally ("f2" < "f10");
hidden files (".*") and sub-folders are ignored, any other non-image file is an error, and so is
an image name that is not a regular file (a named pipe would block the reader for ever).
8/16-bit, gray, gray+alpha, RGB and RGBA images all come out as RGB uint8 (16-bit is
rounded to 8-bit, alpha is dropped, float images are taken as [0, 1]) unless asked for at
their own depth (`read_image_native`, `iter_frames(keep_depth=True)`). An EXIF orientation
tag is applied, as photo viewers do: a phone photo used as a reference comes out upright.
So is a video's rotation (the display matrix of a portrait phone video: OpenCV's FFmpeg
backend applies it by default, CAP_PROP_ORIENTATION_AUTO, which a test pins).

A range of frames (`iter_frames(start=, stop=)`) costs nothing outside it that can be
avoided: folder files outside it are never read, video frames before it are skipped with
grab() (no colour conversion; inter-frame codecs still decode them) and reading stops at
its end.
"""
from __future__ import annotations

import os
import re
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from cliutil import NOT_REGULAR, not_utf8

VIDEO_EXTS = frozenset(
    {".mp4", ".mkv", ".avi", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts"}
)
IMAGE_EXTS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".jp2"}
)
COUNT_SLACK = 2  # missing frames (vs the container's claim) that pass without a word
FALLBACK_FPS = 25.0  # for "one second of frames" when a video does not state its rate


def shown_path(path: str | os.PathLike) -> str:
    """`path` with bytes that are not UTF-8 as \\xNN: printed as it is, a name's surrogate
    escapes are an encoding error on a strict stdout."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class FrameSourceError(Exception):
    """A video file or frame folder that cannot be read; str(e) is one line naming the file
    (shown_path)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{shown_path(self.path)}: {problem}")


class FrameRangeError(FrameSourceError):
    """A range starts past the end of its source; `frames` is how many frames the source has."""

    def __init__(self, path: str | os.PathLike, frames: int, start: int):
        self.frames = frames
        kind = "folder" if Path(path).is_dir() else "video"
        super().__init__(path, f"{kind} has only {frames} frames (counting from 0, frame {start} was asked for)")


class TruncatedVideoError(FrameSourceError):
    """A video that decodes clearly fewer frames than its container claims: `decoded` is how many
    it holds, so a caller knows no frame from there on can be read from this file."""

    def __init__(self, path: str | os.PathLike, decoded: int, claimed: int):
        self.decoded, self.claimed = decoded, claimed
        super().__init__(path, f"truncated or corrupt: decoded {decoded} of {claimed} frames")


@dataclass(frozen=True)
class SourceInfo:
    path: str
    kind: str  # "video" | "folder"
    fps: float | None  # None for folders and videos that do not say
    frame_count: int | None  # exact for folders; the container's claim for videos (None if unknown)
    width: int
    height: int
    lead: float = 0.0  # seconds of a video before its first decodable frame (lead_line): frame 0 is that one


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value: frame2 < frame10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _special(entry: os.DirEntry) -> bool:
    """A named pipe, socket or device (through a link too): reading one can block for ever."""
    try:
        return not stat.S_ISREG(entry.stat().st_mode)
    except OSError:  # a dangling link: the reader names it
        return False


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a frame folder in natural order (ties by name); raises on non-image files
    or none."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise FrameSourceError(folder, f"cannot list folder ({e.strerror or e})") from None
    images, videos = [], 0
    for entry in entries:
        if entry.name.startswith(".") or entry.is_dir():
            continue
        ext = os.path.splitext(entry.name)[1].lower()
        if ext in IMAGE_EXTS:
            if _special(entry):
                raise FrameSourceError(entry.path, "not a regular file (a named pipe, socket or device; inside a "
                                                   "frame folder)")
            images.append(Path(entry.path))
        elif ext in VIDEO_EXTS:
            videos += 1
        else:
            raise FrameSourceError(entry.path, "not an image file (inside a frame folder)")
    if not images:
        hint = f" (it holds {videos} video file(s): pass those instead)" if videos else ""
        raise FrameSourceError(folder, f"folder contains no image frames{hint}")
    if videos:
        raise FrameSourceError(folder, f"frame folder also holds {videos} video file(s); keep them apart")
    images.sort(key=lambda p: (natural_key(p.name), p.name))  # names equal to natural_key (f1, f01, F1): by name,
    return images  # not in the order the file system lists them


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as OpenCV decodes it: its own depth, gray HW or colour BGR HW3, turned
    upright by its EXIF orientation. Alpha is dropped here: nothing uses it, and OpenCV
    ignores the orientation of any decode that keeps it (IMREAD_UNCHANGED). A float image with
    NaN or infinite pixels is refused, naming the file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise FrameSourceError(path, f"cannot read file ({e.strerror or e})") from None
    readable = data.size and not png_damaged(data)
    try:
        img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if readable else None
    except cv2.error as e:  # raised, not None, for an image over OpenCV's size limits
        if "CV_IO_MAX_IMAGE" not in str(e):
            raise FrameSourceError(path, f"not a readable image ({str(e).strip().splitlines()[-1]})") from None
        raise FrameSourceError(path, "image too large for OpenCV to decode: its limits are by default 2**30 "
                                     "pixels and 2**20 a side, and the environment variable "
                                     "OPENCV_IO_MAX_IMAGE_PIXELS raises the first") from None
    if img is None:
        raise FrameSourceError(path, "not a readable image")
    if img.dtype.kind == "f" and not np.isfinite(img).all():  # taken as black, NaN was colourised and scored
        raise FrameSourceError(path, "has NaN or infinite pixels")
    return img


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_damaged(data: np.ndarray) -> bool:
    """Whether `data` (a file's bytes) is a PNG cut short (no IEND chunk) or with a critical chunk
    that fails its CRC; False for any other file. libpng, inside OpenCV, prints such a file's error
    straight to stderr ("libpng error: PNG input buffer is incomplete"), a second line before ours.
    A PNG cut short, by a crash or a partial copy, is how frames are usually damaged; a deflate
    stream damaged under a valid CRC is not caught (only decompressing would tell)."""
    buf = memoryview(data).cast("B")
    if bytes(buf[:8]) != PNG_SIGNATURE:
        return False
    pos, n = 8, len(buf)
    while pos + 12 <= n:
        length, kind = struct.unpack_from(">I4s", buf, pos)
        end = pos + 8 + length
        if end + 4 > n:
            return True
        # critical chunks (IHDR, PLTE, IDAT, IEND) have an upper-case first letter; libpng only warns
        # about an ancillary chunk's CRC (decoding goes on), so those are left to it
        if kind[0] < 0x60 and zlib.crc32(buf[pos + 4:end]) != struct.unpack_from(">I", buf, end)[0]:
            return True
        if kind == b"IEND":
            return False
        pos = end + 4
    return True


def bgr_to_rgb(img: np.ndarray) -> np.ndarray:
    """OpenCV's BGR(A) channel order -> RGB(A); gray (HW, HW1) and gray+alpha (HW2) as they are."""
    if img.ndim == 3 and img.shape[2] >= 3:
        # cvtColor (its types), not a numpy copy of img[..., ::-1]: the same bytes, ~20x faster
        if img.dtype in (np.uint8, np.uint16, np.float32):
            return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(img[..., [2, 1, 0, 3][: img.shape[2]]])
    return img


def read_image(path: str | os.PathLike, *, bgr: bool = False, keep_16bit: bool = False) -> np.ndarray:
    """Any 8/16-bit or float, gray/colour, with or without alpha image -> RGB (or BGR) uint8 HWC
    (uint16 for a 16-bit file with `keep_16bit`)."""
    return _to_rgb8(decode_image(path), path, want_bgr=bgr, keep_16bit=keep_16bit)


def read_image_native(path: str | os.PathLike) -> np.ndarray:
    """An image file at its own depth: gray HW or RGB HW3 (alpha dropped; gray+alpha files
    come out as HW3 with equal channels), uint8, uint16 or float. For callers that keep
    16-bit precision (`read_image` rounds to 8-bit RGB)."""
    return bgr_to_rgb(decode_image(path))


def _to_rgb8(img: np.ndarray, path, want_bgr: bool = False, keep_16bit: bool = False) -> np.ndarray:
    """OpenCV's decoded `img` (BGR order, any depth) as 8-bit RGB, or BGR with `want_bgr`."""
    if img.dtype == np.uint16 and not keep_16bit:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif img.dtype not in (np.uint8, np.uint16):
        raise FrameSourceError(path, f"unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim != 3 or img.shape[2] not in (2, 3, 4):
        raise FrameSourceError(path, f"unsupported image shape {img.shape}")
    if img.shape[2] == 2:  # gray + alpha
        return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
    if not want_bgr:  # read_image's decode_image output: never alpha (dropped at decode), so BGR
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # the same bytes as a numpy copy of img[..., ::-1], ~20x faster
    return np.ascontiguousarray(img[:, :, :3])  # BGRA here only from a video capture (iter_frames' guard)


def _kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise FrameSourceError(path, "no such file or folder")
    if not path.is_file():  # a source is opened more than once (probe, then the frames); a pipe blocks
        raise FrameSourceError(path, NOT_REGULAR)
    if path.suffix.lower() in VIDEO_EXTS:
        return "video"
    raise FrameSourceError(
        path, f"not a video file ({', '.join(sorted(VIDEO_EXTS))}) or a folder of frames"
    )


def _open_video(path: Path, threads: int = 0) -> cv2.VideoCapture:
    """An opened capture of `path`; a path that is not UTF-8 is refused: OpenCV's binding crashes
    the process (SIGSEGV) on the surrogate escapes Python reads such a name into."""
    if not os.access(path, os.R_OK):
        raise FrameSourceError(path, "file is not readable (permission denied)")
    if not_utf8(path):
        raise FrameSourceError(path, "OpenCV cannot open a file name that is not UTF-8: rename it")
    params = [cv2.CAP_PROP_N_THREADS, threads] if threads > 0 else []
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise FrameSourceError(path, "cannot open video (unreadable, truncated or not a video)")
    return cap


def probe(path: str | os.PathLike) -> SourceInfo:
    """What a source is, without decoding it all: kind, fps, frame count, frame size.

    Decodes the first frame (videos) or reads the first image (folders) so a source that
    cannot deliver a single frame fails here, before any work is done on it.
    """
    path = Path(path)
    if _kind(path) == "folder":
        files = list_frame_files(path)
        first = read_image(files[0])
        return SourceInfo(str(path), "folder", None, len(files), first.shape[1], first.shape[0])
    cap = _open_video(path)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        count = int(round(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        ok, frame = cap.read()
        lead = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000  # the first frame's time from the stream's start
    finally:
        cap.release()
    if not ok or frame is None:
        raise FrameSourceError(path, "video has no decodable frame")
    return SourceInfo(
        str(path), "video", fps if fps and fps > 0 else None, count if count > 0 else None,
        frame.shape[1], frame.shape[0], max(0.0, lead),
    )


def lead_frames(lead_s: float, fps: float | None) -> int:
    """How many frames at the nominal `fps` fit before a first decodable frame `lead_s` seconds
    into the stream: 0 for a stream that starts with one."""
    return int(round(lead_s * fps)) if fps and fps > 0 and lead_s > 0 else 0


def lead_line(path, lead_s: float, fps: float | None) -> str | None:
    """The warning for a video whose first frames cannot be decoded (a stream that starts without
    a key frame: cut without re-encoding, a recording joined mid-stream), or None. FFmpeg skips
    them without a word and the rest are counted from 0, so the frame numbers, and where the
    sound starts, must come from that first decodable frame."""
    k = lead_frames(lead_s, fps)
    if k < 1:
        return None
    return (f"{path}: its first {k} frame(s) ({lead_s:.2f} s) cannot be decoded (the stream starts without a key "
            "frame, as a cut made without re-encoding does); frames are counted from the first decodable one")


def shortfall_verdict(path: str | os.PathLike, decoded: int, claimed: int, fps: float | None,
                      last_time: float | None = None, start: float = 0.0) -> str | None:
    """Judge a video that decoded `decoded` of the `claimed` frames (see the module doc).

    `last_time`: the last decoded frame's time in seconds from the first's, if known; `start`:
    the first frame's time in the file. At the nominal `fps` the last frame is frame
    last_time * fps, counted from the first frame, or from the file's 0 (a container's
    duration may count from either: MKV's from 0), so the frames reach the container's end
    when either count is within the tolerance of `claimed`.
    Returns None (fine), or a warning line naming the file; raises TruncatedVideoError for a
    truncated file.
    """
    missing = claimed - decoded
    if claimed <= 0 or missing <= COUNT_SLACK:
        return None
    per_second = int(round(fps)) if fps and fps > 0 else int(FALLBACK_FPS)
    limit = max(COUNT_SLACK, min(per_second, claimed // 10))
    if last_time is not None and fps and fps > 0:
        spanned = last_time * fps + 1  # frames the decoded ones' times span at the nominal rate
        for t0 in (0.0, start) if 0 < start * fps < claimed else (0.0,):
            expected = claimed - t0 * fps  # the container's count from the first frame, if it counts from t0
            if abs(expected - spanned) > limit:  # the times end elsewhere (or jump past the end: an
                continue  # MPEG-TS discontinuity): not this reading
            if decoded >= expected - COUNT_SLACK:  # a count from the file's 0, and the frames all there
                return None
            if spanned - decoded > COUNT_SLACK:
                return (f"{path}: decoded {decoded} frames, not the {claimed} its container claims or implies "
                        f"(at {fps:g} fps nominal), but their times reach its end: its frame rate varies "
                        f"({decoded / (last_time + 1 / fps):.4g} fps on average), or frames are missing inside "
                        f"it; the decoded frames are kept")
    if missing > limit:
        raise TruncatedVideoError(path, decoded, claimed)
    # Not "at the end": frames the demuxer drops mid-video (a corrupt chunk) leave no trace in
    # OpenCV's CAP_PROP_POS_FRAMES, which counts the frames delivered, nor in an AVI's POS_MSEC
    # (frames delivered / nominal rate), so where they are missing cannot be told, and the
    # frames after such a gap come out numbered early.
    return (f"{path}: decoded {decoded} of the {claimed} frames its container claims ({missing} missing, up to "
            f"{limit} tolerated; where is unknown, so frames after a gap may be numbered early); the decoded "
            f"frames are kept")


def film_stream(container):
    """The film's video stream of an opened PyAV container: the first that is not a cover (an
    attached picture: an MP3's, M4A's or MKV's), which has no time of its own (FFmpeg gives it
    the sound's start: an MP3's encoder delay); None if there is none."""
    import av

    return next((s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic),
                None)


def _video_start(path: Path) -> float:
    """The time in seconds of the first frame of `path`'s video stream, from its header (PyAV:
    OpenCV's frame times count from that frame); 0.0 where it is not known."""
    try:
        import av
    except ImportError:  # an older install: the count rule decides as it did
        return 0.0
    try:
        with av.open(str(path)) as c:
            s = film_stream(c)
            return float(s.start_time * s.time_base) if s is not None and s.start_time else 0.0
    except (av.FFmpegError, OSError, ValueError):
        return 0.0


def iter_frames(
    path: str | os.PathLike, *, start: int = 0, stop: int | None = None, bgr: bool = False,
    keep_depth: bool = False, check_count: bool = True, decode_threads: int = 0,
    warn: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, str, np.ndarray]]:
    """Yield (index, name, frame) for frames start..stop-1 (stop None: to the end) in order;
    frame is HWC uint8, RGB (BGR with bgr=True).

    `index` counts from the source's first frame. Nothing outside the range is read (folders)
    or converted (videos: earlier frames are grab()bed). A range starting past the last frame
    raises FrameRangeError; one starting just after it yields nothing.
    `keep_depth`: folder frames as `read_image_native` gives them (own bit depth and
    channels, RGB(A) order) instead of RGB uint8; video frames are 8-bit RGB either way.
    `decode_threads` > 0 caps the video decoder's threads (0: FFmpeg's default); one thread
    costs the least CPU per frame, which pays when other work runs alongside.
    `name` is the image file name for folders and the zero-padded index for videos.
    Raises FrameSourceError when a frame cannot be read or differs in size from the range's
    first, and - with `check_count`, for a video read to its end - when it ends clearly before
    the frame count its container claims (a truncated file), after the frames it did decode
    were yielded. A smaller shortfall (see shortfall_verdict) is reported as one line through
    `warn` (default: warnings.warn), with `check_count` so is a video whose first frames cannot
    be decoded (lead_line), at its first frame.
    """
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"bad frame range {start}:{stop}")
    if keep_depth and bgr:
        raise ValueError("keep_depth frames are RGB(A); bgr=True is for 8-bit frames")
    path = Path(path)
    if _kind(path) == "folder":
        files = list_frame_files(path)
        if start > len(files):
            raise FrameRangeError(path, len(files), start)
        size = None
        for i in range(start, len(files) if stop is None else min(stop, len(files))):
            f = files[i]
            img = read_image_native(f) if keep_depth else read_image(f, bgr=bgr)
            size = size or img.shape[:2]
            if img.shape[:2] != size:
                raise FrameSourceError(
                    f, f"frame is {img.shape[1]}x{img.shape[0]}, earlier frames are {size[1]}x{size[0]}"
                )
            yield i, f.name, img
        return

    def say(line: str | None) -> None:
        if line is not None and warn is None:
            warnings.warn(line, stacklevel=3)
        elif line is not None:
            warn(line)

    cap = _open_video(path, decode_threads)
    try:
        claimed = int(round(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        fps = cap.get(cv2.CAP_PROP_FPS)
        lead_ms = None  # the first frame's time, from the stream's start (AVI: frames / nominal fps)
        for i in range(start):
            if not cap.grab():
                raise FrameRangeError(path, i, start)
            if i == 0:  # said wherever the range starts, as a whole run says it
                lead_ms = max(0.0, cap.get(cv2.CAP_PROP_POS_MSEC))
                say(lead_line(path, lead_ms / 1000, fps) if check_count else None)
        size, i, last_ms = None, start, None
        while stop is None or i < stop:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            last_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            if i == 0:
                lead_ms = max(0.0, last_ms)
                say(lead_line(path, lead_ms / 1000, fps) if check_count else None)
            if frame.ndim != 3 or frame.shape[2] != 3:
                frame = _to_rgb8(frame, path, want_bgr=True)
            size = size or frame.shape[:2]
            if frame.shape[:2] != size:
                raise FrameSourceError(
                    path, f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, earlier frames are {size[1]}x{size[0]}"
                )
            yield i, f"{i:06d}", (frame if bgr else bgr_to_rgb(frame))
            i += 1
    finally:
        cap.release()
    if i == 0 and stop != 0:
        raise FrameSourceError(path, "video has no decodable frame")
    if check_count and (stop is None or i < stop):  # it ran out, so it has i frames in all
        lead_ms = lead_ms or 0.0
        claimed -= lead_frames(lead_ms / 1000, fps)  # those before the first decodable frame: said above
        late = last_ms is not None and claimed - i > COUNT_SLACK  # then the first frame's time may count
        say(shortfall_verdict(path, i, claimed, fps, None if last_ms is None else (last_ms - lead_ms) / 1000,
                              _video_start(path) if late else 0.0))
