"""Frame store and training pairs: the on-disk layout, the pair band, and building one movie
(many movies in one run: annotator/build_many.py).

On disk, one folder per movie under DATA_ROOT:

    DATA_ROOT/<movie_id>/frames/000000.jpg ...   frames resized for training, in order
    DATA_ROOT/<movie_id>/similarity.npy          float32 (N, 2*window+1): [i, window+d] = sim(i, i+d),
                                                 1 on d = 0, NaN outside the movie; window is
                                                 capped at max(1, N - 1) (meta.json has the one stored)
    DATA_ROOT/<movie_id>/meta.json               source, fps, frame count, sizes, metric, window, ...
    DATA_ROOT/.partial/<movie_id>/               a movie being built (never read as a movie)
    DATA_ROOT/.partial/<movie_id>.lock           locked by the run building it (see movie_lock)

A movie is written under .partial and renamed into place only when complete, so a folder
DATA_ROOT/<movie_id> always holds a finished movie: that is what makes runs resumable, and a
killed run leaves at most a .partial folder that the next run given that movie deletes and
rebuilds. Every file is fsynced before the rename, so a power cut cannot publish a movie of
empty frames either. A lock per movie keeps two runs on one DATA_ROOT from building the same one. An
interrupted or --strict-stopped run removes the .partial folders of the movies it stopped,
and a run that ends removes .partial itself when it is empty.

The raw similarities are stored, not the accepted pairs: the band (low < sim < high, at
least min_gap frames apart) is applied at load time by `pair_mask`, so changing it needs
no rebuild.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import time
import unicodedata
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from annotator.similarity import (
    METRICS, SIM_SIZE, SSIM_C1, SSIM_C2, SSIM_RADIUS, SSIM_SIGMA, NeighbourTable, fast_resize, small_gray,
)
from annotator.video import FrameSourceError, iter_frames, probe, shown_path
from atomicio import sync_folder, sync_tree, try_lock

FORMAT_VERSION = 1
PARTIAL_DIR = ".partial"
DEFAULT_WINDOW = 19
DEFAULT_LOW, DEFAULT_HIGH, DEFAULT_MIN_GAP = 0.94, 0.97, 3
IMAGE_FORMATS = ("jpg", "png")
# Upper bounds, so that a typo is refused before any work rather than failing on every movie:
# stored frames are for training at 512-768 (an 8K film's short side is 4320), and the
# similarity's ring of `window` frames grows with sim_size squared (SSIM at 512: 4 MB a frame).
MAX_SIZE, MAX_SIM_SIZE = 4320, 512
MAX_STORED_SIDE = 65500  # JPEG holds at most 65535 a side; PNG frames keep the same bound
MIN_SIM_SIZE = 2 * SSIM_RADIUS + 2  # SSIM's 11x11 "valid" window leaves a 2x2 area


# ----------------------------------------------------------------------------- reading


def frame_path(movie_dir: str | os.PathLike, index: int, fmt: str = "jpg") -> Path:
    return Path(movie_dir) / "frames" / f"{index:06d}.{fmt}"


def is_finished(movie_dir: str | os.PathLike) -> bool:
    return (Path(movie_dir) / "meta.json").is_file()


def list_movies(data_root: str | os.PathLike) -> list[str]:
    """Ids of the finished movies under DATA_ROOT, sorted."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and is_finished(p))


def read_json(path: Path) -> dict:
    """A JSON file's contents; ValueError naming the file if it is not JSON (empty, cut short),
    where json's own message ("Expecting value: line 1 column 1") names none."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{shown_path(path)}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:  # a ValueError too, but one that names no file
        raise ValueError(f"{shown_path(path)}: not valid JSON (not UTF-8 text: byte {e.start})") from None
    if not isinstance(data, dict):  # callers read keys: "'list' object has no attribute 'get'" names nothing
        raise ValueError(f"{shown_path(path)}: not a JSON object (it holds a {type(data).__name__})")
    return data


META_KEYS = ("frame_count", "size", "image_format")  # what the dataset and the latent cache read


def load_meta(movie_dir: str | os.PathLike) -> dict:
    """A movie's meta.json; ValueError naming it if it lacks what readers need, or holds another
    kind of value there (a KeyError, or the TypeError of "3" + 1, names no file)."""
    path = Path(movie_dir) / "meta.json"
    meta = read_json(path)
    if missing := [k for k in META_KEYS if k not in meta]:
        raise ValueError(f"{shown_path(path)}: no {missing[0]!r} entry (not a meta.json written by build_pairs.py)")
    n, size = meta["frame_count"], meta["size"]
    whole = lambda v: type(v) is int and v >= 1  # noqa: E731 (bool is an int too)
    for key, fits, want in [("frame_count", whole(n), "a whole number >= 1"),
                            ("size", isinstance(size, list) and len(size) == 2 and all(map(whole, size)),
                             "[width, height] in whole pixels"),
                            # frames are read at frames/NNNNNN.<image_format>: a path there would reach anywhere
                            ("image_format", meta["image_format"] in IMAGE_FORMATS,
                             " or ".join(map(repr, IMAGE_FORMATS)))]:
        if not fits:
            shown = json.dumps(meta[key])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ValueError(f"{shown_path(path)}: its {key!r} holds {shown}, not {want} (not a meta.json written by "
                             "build_pairs.py)")
    return meta


def load_similarity(movie_dir: str | os.PathLike) -> np.ndarray:
    """A movie's similarity table, float (N, 2W+1) with N the frame count of its meta.json;
    ValueError naming the file for anything else (empty, cut short, not a .npy file, another
    shape, a table of another build with another frame count, whose rows would pair the wrong
    frames or frames that do not exist), where numpy's errors name none or mislead (a text
    file "contains pickled data"). Mapped, then copied: a header that claims more data than
    the file holds is a ValueError, not an allocation of what it claims."""
    path = Path(movie_dir) / "similarity.npy"
    try:
        sim = np.array(np.lib.format.open_memmap(path, mode="r"))
    except ValueError:
        why = "empty, cut short or not a .npy file"
    else:
        if sim.ndim == 2 and sim.shape[0] and sim.shape[1] % 2 and sim.dtype.kind == "f":
            frames = load_meta(movie_dir)["frame_count"]
            if sim.shape[0] == frames:
                return sim
            raise ValueError(f"{shown_path(path)}: {sim.shape[0]} rows, but {shown_path(path.parent / 'meta.json')} "
                             f"says {frames} frames (files of two different builds); delete {shown_path(path.parent)} "
                             "and rebuild it with build_pairs.py")
        why = f"it holds a {sim.dtype} array of shape {sim.shape}, not (frames, 2 x window + 1) floats"
    raise ValueError(f"{shown_path(path)}: not a whole similarity table ({why}); delete {shown_path(path.parent)} and "
                     "rebuild it with build_pairs.py")


def pair_mask(sim: np.ndarray, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH,
              min_gap: int = DEFAULT_MIN_GAP) -> np.ndarray:
    """Boolean (N, 2W+1): entry [i, W+d] is True iff (i, i+d) is a training pair.

    A pair is valid iff low < sim < high (strictly) and |d| >= min_gap; NaN (outside the
    movie) is never valid. The mask is symmetric: [i, W+d] == [i+d, W-d].
    """
    if low != low or high != high:  # NaN: "must be < high" would not say what is wrong
        raise ValueError(f"band ends must be numbers (low={low}, high={high})")
    if not low < high:
        raise ValueError(f"band is empty: low={low} must be < high={high}")
    if min_gap < 1:
        raise ValueError(f"min_gap must be >= 1 (got {min_gap})")
    w = (sim.shape[1] - 1) // 2
    gap_ok = np.abs(np.arange(-w, w + 1)) >= min_gap
    with np.errstate(invalid="ignore"):
        return (sim > low) & (sim < high) & gap_ok


def count_pairs(sim: np.ndarray, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH,
                min_gap: int = DEFAULT_MIN_GAP) -> int:
    """Number of unordered pairs {i, j} in the band."""
    return int(pair_mask(sim, low, high, min_gap).sum()) // 2


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class BuildOptions:
    size: int = 512  # short side of the stored frames (multiple of 8); 0: the source's, rounded down to one
    window: int = DEFAULT_WINDOW
    metric: str = "ssim"
    sim_size: int = SIM_SIZE
    image_format: str = "jpg"
    quality: int = 95  # JPEG quality; PNG uses compression level 1
    # resize/encode/write threads inside one movie; 0: build_all makes it cpu_count // workers,
    # build_movie alone takes 0 as 1
    threads: int = 0
    # FFmpeg decoder threads; 0 = auto: 1 when the movie has <= 2 threads (one decoder thread
    # costs the least CPU per frame), else FFmpeg's default (faster on many cores)
    decode_threads: int = 0

    def validate(self) -> None:
        if not 0 <= self.size <= MAX_SIZE or self.size % 8:
            raise ValueError(f"--size must be 0 or a multiple of 8 up to {MAX_SIZE} (got {self.size})")
        if self.threads < 0 or self.decode_threads < 0:
            raise ValueError(f"--threads and --decode-threads must be >= 0 "
                             f"(got {self.threads}, {self.decode_threads})")
        if self.window < 1:
            raise ValueError(f"--window must be >= 1 (got {self.window})")
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {', '.join(METRICS)} (got {self.metric!r})")
        if not MIN_SIM_SIZE <= self.sim_size <= MAX_SIM_SIZE:
            raise ValueError(f"--sim-size must be in {MIN_SIM_SIZE}..{MAX_SIM_SIZE} (got {self.sim_size})")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(IMAGE_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100 (got {self.quality})")


def movie_id_for(source: str | os.PathLike) -> str:
    """Folder name under DATA_ROOT: the file stem or folder name with letters and digits of any
    script, '_', '-' and '.' kept, any other character -> '_', leading dots dropped (a hidden
    folder is no movie to list_movies); "movie" if nothing is left. NFC first, so that a name typed
    on one machine and read from a macOS disk (decomposed accents) on another gives the same id,
    as shards need."""
    p = Path(source)
    name = unicodedata.normalize("NFC", (p.name if p.is_dir() else p.stem) or p.resolve().name)
    return re.sub(r"[^\w.-]", "_", name).lstrip(".") or "movie"


def stored_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the stored frames: short side = short_side, long side rounded to a
    multiple of 8 (so the VAE's 8x downsampling lines up); 0: the source's short side rounded
    down to a multiple of 8 (a source already on the 8-grid is kept as it is)."""
    short, long_ = sorted((width, height))
    short_side = short_side or max(8, short // 8 * 8)
    new_long = max(8, int(round(long_ * short_side / short / 8)) * 8)
    return (new_long, short_side) if width >= height else (short_side, new_long)


def build_movie(
    source: str | os.PathLike,
    data_root: str | os.PathLike,
    movie_id: str | None = None,
    options: BuildOptions = BuildOptions(),
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Decode one movie, store its frames and similarity table; return its meta.

    Streams the source: frames are resized/encoded/written by `options.threads` threads
    while the main thread decodes and scores each frame against its earlier neighbours.
    Raises FrameSourceError for bad input; nothing is left under DATA_ROOT/<movie_id> then.
    `warn` gets one line for a video that decoded a few frames fewer than it claims.
    """
    options.validate()
    source = Path(source)
    movie_id = movie_id or movie_id_for(source)
    root = Path(data_root)
    refuse_linked_partial(root)
    with movie_lock(root, movie_id) as locked:
        if not locked:
            raise MovieBusy(f"{source}: another run is building this movie in {root / PARTIAL_DIR / movie_id}")
        return _build_movie(source, root, movie_id, options, progress, warn)


def refuse_linked_partial(root: Path) -> None:
    """A link at DATA_ROOT/.partial (a shared data root can hold one) would have the removal of
    a killed run's leftovers, .partial/<id>, delete a folder wherever it points."""
    if (root / PARTIAL_DIR).is_symlink():
        raise ValueError(f"{shown_path(root / PARTIAL_DIR)}: a link, not a folder; unfinished movies are built and "
                         "removed there, so it must be DATA_ROOT's own folder: remove the link, then rerun")


class MovieBusy(FileExistsError):
    """Another process holds the movie's lock: it is building it now."""


def movie_lock(root: Path, movie_id: str, wait: bool = False):
    """Try to lock DATA_ROOT/.partial/<id>.lock for the building of one movie; a context manager
    that yields whether this process got it (never waits unless `wait`; see atomicio.try_lock).

    Two runs on one DATA_ROOT (or two machines on a shared one) must not build the same movie:
    the second would empty the first one's .partial folder as "left by a killed run", and the
    first would then publish a movie with frames missing.
    """
    return try_lock(root / PARTIAL_DIR / f"{movie_id}.lock", make_parent=True, wait=wait)


def _build_movie(source: Path, root: Path, movie_id: str, options: BuildOptions, progress, warn) -> dict:
    tmp, final = root / PARTIAL_DIR / movie_id, root / movie_id
    if final.exists():
        raise FileExistsError(f"{shown_path(final)} already exists")
    try:
        shutil.rmtree(tmp)  # left by a killed run (a running one would hold the lock)
    except FileNotFoundError:
        pass
    except OSError as e:  # not ignored: the mkdir below would fail with a bare "[Errno 17] File exists: .../frames"
        raise FileExistsError(f"{shown_path(tmp)}: left by an interrupted run, and it cannot be removed "
                              f"({e.strerror or e}); remove it, then rerun") from None
    t0 = time.perf_counter()
    ext = "." + options.image_format
    params = ([cv2.IMWRITE_JPEG_QUALITY, options.quality] if options.image_format == "jpg"
              else [cv2.IMWRITE_PNG_COMPRESSION, 1])
    table = NeighbourTable(options.window, options.metric)
    decode_threads = options.decode_threads or (1 if options.threads <= 2 else 0)
    dims: dict = {}

    def store(i: int, frame: np.ndarray) -> np.ndarray:
        w, h = dims["out"]
        img = frame if (frame.shape[1], frame.shape[0]) == (w, h) else fast_resize(frame, w, h)
        ok, buf = cv2.imencode(ext, img, params)
        if not ok:
            raise OSError(f"cannot encode frame {i} as {options.image_format}")
        write_file(tmp / "frames" / f"{i:06d}{ext}", buf)
        return small_gray(img, options.sim_size, bgr=True)

    try:
        info = probe(source)
        (tmp / "frames").mkdir(parents=True)
        with cf.ThreadPoolExecutor(max(1, options.threads)) as pool:
            pending: deque[cf.Future] = deque()
            try:
                for i, _name, frame in iter_frames(source, bgr=True, decode_threads=decode_threads, warn=warn):
                    if not dims:
                        dims["src"] = (frame.shape[1], frame.shape[0])
                        dims["out"] = stored_size(*dims["src"], options.size)
                        if max(dims["out"]) > MAX_STORED_SIDE:  # else "cannot encode frame 0", as if the disk were at fault
                            (w, h), (ow, oh) = dims["src"], dims["out"]
                            raise FrameSourceError(source, f"frames of {w}x{h} would be stored at {ow}x{oh} (short "
                                                           f"side {min(ow, oh)}), over {MAX_STORED_SIDE} pixels a "
                                                           "side: too narrow a picture for training crops")
                    pending.append(pool.submit(store, i, frame))
                    while len(pending) > 2 * max(1, options.threads):
                        table.push(pending.popleft().result())
                        if progress:
                            progress(1)
                while pending:
                    table.push(pending.popleft().result())
                    if progress:
                        progress(1)
            finally:
                for f in pending:
                    f.cancel()
        sim = table.table(trim=True)  # no NaN columns beyond the movie's last frame
        np.save(tmp / "similarity.npy", sim)
        meta = {
            "format_version": FORMAT_VERSION,
            "movie_id": movie_id,
            "source": str(source.resolve()),
            "kind": info.kind,
            "fps": info.fps,
            "frame_count": len(sim),
            "source_size": list(dims["src"]),
            "size": list(dims["out"]),
            "short_side": options.size,
            "image_format": options.image_format,
            "quality": options.quality if options.image_format == "jpg" else None,
            "window": (sim.shape[1] - 1) // 2,  # options.window, capped at frame_count - 1
            "metric": options.metric,
            "metric_params": _metric_params(options),
            "default_band": {"low": DEFAULT_LOW, "high": DEFAULT_HIGH, "min_gap": DEFAULT_MIN_GAP,
                             "pairs": count_pairs(sim)},
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        sync_tree(tmp, max(1, options.threads))  # on disk before the rename publishes the movie
        os.rename(tmp, final)  # the atomic "finished" marker
        sync_folder(root)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: Path, data) -> None:
    """Write a buffer through a Python file, not ndarray.tofile: its OSError carries the errno
    (tofile's "N requested and 0 written" does not), which tells a full disk from a bad movie."""
    with open(path, "wb") as f:
        f.write(data)


def _metric_params(options: BuildOptions) -> dict:
    p = {"input": "8-bit BT.601 gray of the frame as resized for storing (before it is encoded: JPEG's loss is "
                  "not scored), downscaled by exact 2x pixel-averaging halvings then one bilinear step",
         "sim_size": [options.sim_size] * 2}
    if options.metric == "ssim":
        p.update(gaussian_sigma=SSIM_SIGMA, window=2 * SSIM_RADIUS + 1, c1=SSIM_C1, c2=SSIM_C2,
                 data_range=1.0, border="valid")
    return p
