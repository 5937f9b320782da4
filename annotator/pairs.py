"""Frame store and training-pair building (the library behind build_pairs.py).

On disk, one folder per movie under DATA_ROOT:

    DATA_ROOT/<movie_id>/frames/000000.jpg ...   frames resized for training, in order
    DATA_ROOT/<movie_id>/similarity.npy          float32 (N, 2*window+1): [i, window+d] = sim(i, i+d),
                                                 1 on d = 0, NaN outside the movie
    DATA_ROOT/<movie_id>/meta.json               source, fps, frame count, sizes, metric, window, ...
    DATA_ROOT/.partial/<movie_id>/               a movie being built (never read as a movie)
    DATA_ROOT/.partial/<movie_id>.lock           locked by the run building it (see _movie_lock)

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
import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import threading
import time
import unicodedata
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from annotator.similarity import (
    METRICS, SIM_SIZE, SSIM_C1, SSIM_C2, SSIM_RADIUS, SSIM_SIGMA, NeighbourTable, fast_resize, small_gray,
)
from annotator.video import FrameSourceError, iter_frames, probe
from atomicio import sync_folder, sync_tree
from cliutil import one_line

try:
    import fcntl  # POSIX: the per-movie build lock
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT_VERSION = 1
PARTIAL_DIR = ".partial"
DEFAULT_WINDOW = 19
DEFAULT_LOW, DEFAULT_HIGH, DEFAULT_MIN_GAP = 0.94, 0.97, 3
IMAGE_FORMATS = ("jpg", "png")


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


def load_meta(movie_dir: str | os.PathLike) -> dict:
    return json.loads((Path(movie_dir) / "meta.json").read_text())


def load_similarity(movie_dir: str | os.PathLike) -> np.ndarray:
    return np.load(Path(movie_dir) / "similarity.npy")


def pair_mask(sim: np.ndarray, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH,
              min_gap: int = DEFAULT_MIN_GAP) -> np.ndarray:
    """Boolean (N, 2W+1): entry [i, W+d] is True iff (i, i+d) is a training pair.

    A pair is valid iff low < sim < high (strictly) and |d| >= min_gap; NaN (outside the
    movie) is never valid. The mask is symmetric: [i, W+d] == [i+d, W-d].
    """
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
    size: int = 512  # short side of the stored frames (multiple of 8); 0 keeps the source size
    window: int = DEFAULT_WINDOW
    metric: str = "ssim"
    sim_size: int = SIM_SIZE
    image_format: str = "jpg"
    quality: int = 95  # JPEG quality; PNG uses compression level 1
    threads: int = 0  # resize/encode/write threads inside one movie; 0 = cpu_count // workers
    # FFmpeg decoder threads; 0 = auto: 1 when the movie has <= 2 threads (one decoder thread
    # costs the least CPU per frame), else FFmpeg's default (faster on many cores)
    decode_threads: int = 0

    def validate(self) -> None:
        if self.size < 0 or self.size % 8:
            raise ValueError(f"--size must be 0 or a positive multiple of 8 (got {self.size})")
        if self.threads < 0 or self.decode_threads < 0:
            raise ValueError(f"--threads and --decode-threads must be >= 0 "
                             f"(got {self.threads}, {self.decode_threads})")
        if self.window < 1:
            raise ValueError(f"--window must be >= 1 (got {self.window})")
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {', '.join(METRICS)} (got {self.metric!r})")
        if self.sim_size < 2 * SSIM_RADIUS + 2:
            raise ValueError(f"--sim-size must be >= {2 * SSIM_RADIUS + 2} (got {self.sim_size})")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(IMAGE_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100 (got {self.quality})")


def movie_id_for(source: str | os.PathLike) -> str:
    """Folder name under DATA_ROOT: the file stem or folder name, letters and digits of any
    script kept, other characters -> '_'. NFC first, so that a name typed on one machine and
    read from a macOS disk (decomposed accents) on another gives the same id, as shards need."""
    p = Path(source)
    name = unicodedata.normalize("NFC", (p.name if p.is_dir() else p.stem) or p.resolve().name)
    return re.sub(r"[^\w.-]", "_", name).lstrip(".") or "movie"


def stored_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the stored frames: short side = short_side, long side rounded to a
    multiple of 8 (so the VAE's 8x downsampling lines up); 0 keeps the source size."""
    if short_side == 0:
        return width, height
    short, long_ = sorted((width, height))
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
    with _movie_lock(root, movie_id) as locked:
        if not locked:
            raise FileExistsError(f"{source}: another run is building this movie in {root / PARTIAL_DIR / movie_id}")
        return _build_movie(source, root, movie_id, options, progress, warn)


@contextlib.contextmanager
def _movie_lock(root: Path, movie_id: str):
    """Try to lock DATA_ROOT/.partial/<id>.lock for the building of one movie; yields whether
    this process got it (never waits).

    Two runs on one DATA_ROOT (or two machines on a shared one) must not build the same movie:
    the second would empty the first one's .partial folder as "left by a killed run", and the
    first would then publish a movie with frames missing. A lock dies with its process, so a
    killed run's leftovers are taken over. The lock file is removed on the way out, while still
    held; whoever locked it meanwhile sees that it is gone (another inode, or none, at the path)
    and tries again. A regular file opened for writing, because NFS maps flock to POSIX locks,
    which need that. Without fcntl (not POSIX) nothing is locked.
    """
    if fcntl is None:
        yield True
        return
    path = root / PARTIAL_DIR / f"{movie_id}.lock"
    for _ in range(5):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        except FileNotFoundError:  # .partial removed by a run ending in between (see build_all): again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # unlinked by its previous holder after we opened it: again
    else:
        raise OSError(f"{path}: keeps changing; is another run building {movie_id}?")
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _build_movie(source: Path, root: Path, movie_id: str, options: BuildOptions, progress, warn) -> dict:
    tmp, final = root / PARTIAL_DIR / movie_id, root / movie_id
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run (a running one would hold the lock)
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
        buf.tofile(tmp / "frames" / f"{i:06d}{ext}")
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
        sim = table.table()
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
            "window": options.window,
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


def _metric_params(options: BuildOptions) -> dict:
    p = {"input": "8-bit BT.601 gray of the stored frame, downscaled by exact 2x pixel-averaging halvings "
                  "then one bilinear step", "sim_size": [options.sim_size] * 2}
    if options.metric == "ssim":
        p.update(gaussian_sigma=SSIM_SIGMA, window=2 * SSIM_RADIUS + 1, c1=SSIM_C1, c2=SSIM_C2,
                 data_range=1.0, border="valid")
    return p


# ----------------------------------------------------------------------------- many movies


@dataclass
class Summary:
    built: list[dict] = field(default_factory=list)  # meta of each movie built in this run
    existing: list[str] = field(default_factory=list)  # ids already finished before this run
    skipped: list[str] = field(default_factory=list)  # one line per skipped input
    warnings: list[str] = field(default_factory=list)  # one line per movie kept despite a problem
    not_built: list[str] = field(default_factory=list)  # ids left unbuilt because --strict stopped the run
    not_in_shard: int = 0
    seconds: float = 0.0
    stopped: bool = False  # --strict stopped the run

    @property
    def frames(self) -> int:
        return sum(m["frame_count"] for m in self.built)

    @property
    def pairs(self) -> int:
        return sum(m["default_band"]["pairs"] for m in self.built)

    def text(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"built {len(self.built)} movie(s): {self.frames} frames, {self.pairs} pairs in the default band "
            f"({DEFAULT_LOW} < sim < {DEFAULT_HIGH}, gap >= {DEFAULT_MIN_GAP}), "
            f"{self.seconds:.1f} s, {fps:.1f} frames/s",
            f"already built (skipped): {len(self.existing)}",
            f"bad input (skipped): {len(self.skipped)}",
        ]
        lines += [f"  {line}" for line in self.skipped]
        other = sorted({m["metric"] for m in self.built} - {"ssim"})
        if other:
            lines.append(f"note: the default band was chosen for SSIM; for {', '.join(other)} similarities "
                         f"its pair count means little: choose --low/--high for training")
        if self.warnings:
            lines.append(f"built with a warning: {len(self.warnings)}")
            lines += [f"  {line}" for line in self.warnings]
        if self.not_in_shard:
            lines.append(f"left to other shards: {self.not_in_shard}")
        if self.stopped:
            lines.append("stopped early because of --strict"
                         + (f"; not built: {', '.join(self.not_built)}" if self.not_built else ""))
        return "\n".join(lines)


def plan(sources: Sequence[str | os.PathLike], data_root, shard: tuple[int, int] = (0, 1),
         options: BuildOptions | None = None):
    """Split the inputs into (to_build [(id, path, frame estimate)], existing ids, skipped lines,
    notes, number left to other shards). Shards take every n-th movie id in sorted order, so
    all machines must be given the same inputs. A finished movie built with other options
    is kept (and noted): delete its folder to rebuild it."""
    root = Path(data_root)
    by_id: dict[str, Path] = {}
    skipped: list[str] = []
    for s in sources:
        p = Path(s)
        mid = movie_id_for(p)
        if mid in by_id:
            skipped.append(f"{p}: movie id '{mid}' is also used by {by_id[mid]}; rename one of them")
            continue
        by_id[mid] = p
    ids = sorted(by_id)
    index, count = shard
    mine = ids[index::count]
    todo, existing, notes = [], [], []
    for mid in mine:
        p = by_id[mid]
        if is_finished(root / mid):
            try:
                meta = load_meta(root / mid)
            except (OSError, ValueError) as e:
                skipped.append(f"{root / mid / 'meta.json'}: unreadable ({one_line(e, with_type=True)}); delete "
                               f"{root / mid} to rebuild it")
                continue
            old = meta.get("source")
            if old and Path(old) != p.resolve():
                skipped.append(f"{p}: movie id '{mid}' was already built from {old}; rename this input "
                               f"or delete {root / mid}")
                continue
            existing.append(mid)
            if options is not None:
                diff = option_changes(meta, options)
                if diff:
                    notes.append(f"{root / mid}: kept, but it was built with {', '.join(diff)}; "
                                 f"delete it to rebuild")
            continue
        try:
            info = probe(p)
        except FrameSourceError as e:
            skipped.append(str(e))
            continue
        todo.append((mid, p, info.frame_count or 0))
    return todo, existing, skipped, notes, len(ids) - len(mine)


def option_changes(meta: dict, options: BuildOptions) -> list[str]:
    """'name recorded (now new)' for each build option that differs from a movie's meta.json."""
    was = {**meta, "sim_size": (meta.get("metric_params") or {}).get("sim_size", [None])[0]}
    now = {"short_side": options.size, "window": options.window, "metric": options.metric,
           "image_format": options.image_format, "sim_size": options.sim_size,
           "quality": options.quality if options.image_format == "jpg" else None}
    return [f"{k} {was.get(k)} (now {v})" for k, v in now.items() if was.get(k) != v]


def build_all(
    sources: Sequence[str | os.PathLike],
    data_root: str | os.PathLike,
    options: BuildOptions = BuildOptions(),
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    strict: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Summary:
    """Build every input (one movie each) that is not finished yet; see build_pairs.py --help.

    Bad input is reported through `log` (one line naming the file) and skipped, or with
    `strict` stops the run after the first one. `workers` processes build movies in parallel;
    each movie also gets cpu_count // workers encoder threads unless options.threads is set.
    A KeyboardInterrupt stops the movies being built (their partial output is removed) and
    propagates; finished movies are kept.
    """
    from tqdm import tqdm

    options.validate()
    t0 = time.perf_counter()
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: tqdm.write(line, file=sys.stderr))
    todo, existing, skipped, notes, others = plan(sources, root, shard, options)
    summary = Summary(existing=existing, skipped=list(skipped), not_in_shard=others)
    for line in notes:
        say(f"note: {line}")
    for line in skipped:
        say(f"skipped: {line}")
    if strict and skipped:
        summary.stopped, summary.not_built = True, [mid for mid, _, _ in todo]
        summary.seconds = time.perf_counter() - t0
        return summary
    workers = max(1, min(workers, len(todo)))
    if options.threads == 0:
        options = replace(options, threads=max(1, (os.cpu_count() or 1) // workers))

    bars = _Bars(todo, progress)
    ended: set[str] = set()

    def warn(line: str) -> None:
        summary.warnings.append(line)
        say(f"warning: {line}")

    def finish(mid: str, result: dict | str) -> bool:
        """Record a movie's outcome; False if it was skipped."""
        ended.add(mid)
        bars.finish(mid)
        if isinstance(result, dict):
            summary.built.append(result)
            return True
        summary.skipped.append(result)
        say(f"skipped: {result}")
        return False

    try:
        if workers == 1:
            for mid, path, _ in todo:
                result = _build_one(mid, path, root, options, lambda n, m=mid: bars.advance(m, n), warn)
                if not finish(mid, result) and strict:
                    summary.stopped = True
                    break
        else:
            _build_parallel(todo, root, options, workers, strict, bars, warn, finish, summary)
        summary.not_built = [mid for mid, _, _ in todo if mid not in ended]
        for mid in summary.not_built:
            bars.finish(mid)  # so the overall bar ends at 100 %
    finally:
        bars.close()
        try:  # os.rmdir: only if empty, so a movie another run is building there is never touched
            (root / PARTIAL_DIR).rmdir()
        except OSError:
            pass
    summary.seconds = time.perf_counter() - t0
    return summary


class _Bars:
    """The overall progress bar and one bar per movie being built.

    Totals start from the frame counts the sources claim and are corrected when a movie ends
    (built: its real count; skipped or not started: what it had done), so the overall bar
    ends at 100 %. No bar when nothing is to be built; the per-movie bars only on a terminal
    (elsewhere, in a log file, their cursor moves are stray escape codes).
    """

    def __init__(self, todo, enabled: bool):
        from tqdm import tqdm

        enabled = enabled and bool(todo)
        self._tqdm, self.enabled = tqdm, enabled
        self.per_movie = enabled and sys.stderr.isatty()
        self.estimate = {mid: n for mid, _, n in todo}
        self.done: dict[str, int] = {}
        self.bars: dict[str, object] = {}
        self.overall = tqdm(total=sum(self.estimate.values()), unit="frame", desc="all movies",
                            disable=not enabled, position=0, dynamic_ncols=True)

    def advance(self, mid: str, n: int) -> None:
        if mid not in self.bars:
            used = {bar.pos for bar in self.bars.values()}
            slot = next(k for k in range(1, len(self.bars) + 2) if k not in used and -k not in used)
            self.bars[mid] = self._tqdm(unit="frame", desc=mid, disable=not self.per_movie, leave=False,
                                        total=self.estimate.get(mid) or None, position=slot, dynamic_ncols=True)
        self.bars[mid].update(n)
        self.done[mid] = self.done.get(mid, 0) + n
        self.overall.update(n)

    def finish(self, mid: str) -> None:
        bar = self.bars.pop(mid, None)
        if bar is not None:
            bar.close()
        self.overall.total += self.done.get(mid, 0) - self.estimate.pop(mid, 0)
        self.overall.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


def _build_one(mid, path, data_root, options, progress, warn=None) -> dict | str:
    """Build one movie; return its meta, or the one-line reason it was skipped."""
    try:
        return build_movie(path, data_root, mid, options, progress, warn)
    except (FrameSourceError, FileExistsError) as e:  # their messages name the input or folder
        return str(e)
    except (OSError, ValueError, cv2.error) as e:
        return f"{path}: {one_line(e, with_type=True)}"


# ----------------------------------------------------------------------------- worker processes


@dataclass
class _Worker:
    mid: str
    path: Path
    proc: mp.process.BaseProcess
    conn: object  # read end of the pipe the worker reports on
    result: dict | str | None = None
    ended: bool = False  # sent its result, or closed the pipe (exited or died)


def _build_parallel(todo, root: Path, options, workers, strict, bars, warn, finish, summary) -> None:
    """Movies in up to `workers` spawned processes (one per movie, started as slots free up);
    the main process owns the progress bars and the summary.

    Under `strict` the first skipped movie stops the run: nothing new starts, and the movies
    still running are stopped and their partial output removed. A KeyboardInterrupt (Ctrl-C,
    or SIGTERM as build_pairs.py maps it) does the same, then propagates. Workers ignore
    SIGINT and die with the parent, so they never outlive the run.
    """
    ctx = mp.get_context("spawn")  # fork after threads (OpenCV, ffmpeg) is unsafe
    waiting = deque(todo)
    running: list[_Worker] = []
    try:
        while waiting or running:
            while waiting and len(running) < workers and not summary.stopped:
                mid, path, _ = waiting.popleft()
                with _signals_deferred(ignore_sigint=True):
                    running.append(_start_worker(ctx, mid, path, root, options))
            if not running:
                break
            wait_for_any([w.conn for w in running], timeout=0.5)
            for w in list(running):
                _read_messages(w, bars, warn)
                if not w.ended:
                    continue
                running.remove(w)
                w.proc.join(10)
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join()
                w.conn.close()
                result = w.result if w.result is not None else (
                    f"{w.path}: the worker process died (exit code {w.proc.exitcode}) while building it")
                if not finish(w.mid, result) and strict:
                    summary.stopped = True
            if summary.stopped:
                break
    finally:
        with _signals_deferred():
            _stop_workers(running, root)
            for w in running:  # one that finished just before it was stopped counts as built
                if is_finished(root / w.mid) and w.result is None:
                    w.result = load_meta(root / w.mid)
    for w in running:
        if isinstance(w.result, dict):
            finish(w.mid, w.result)


def _start_worker(ctx, mid: str, path, root: Path, options: BuildOptions) -> _Worker:
    read, write = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_main, args=(write, mid, str(path), str(root), options, os.getpid()),
                       name=f"build_pairs[{mid}]", daemon=True)
    proc.start()
    write.close()  # the worker holds the only write end, so its exit shows as EOF here
    return _Worker(mid, Path(path), proc, read)


def _read_messages(w: _Worker, bars, warn) -> None:
    while not w.ended:
        try:
            if not w.conn.poll():
                return
            kind, value = w.conn.recv()
        except (EOFError, OSError):
            w.ended = True  # the worker exited without a result: it died
            return
        if kind == "progress":
            bars.advance(w.mid, value)
        elif kind == "warning":
            warn(value)
        else:
            w.result, w.ended = value, True


def _stop_workers(running: list[_Worker], root: Path) -> None:
    """Kill the workers still running, reap them and remove their partial output."""
    for w in running:
        if w.proc.is_alive():
            w.proc.kill()  # nothing to clean up inside: the worker only writes below .partial
    for w in running:
        w.proc.join()
        w.conn.close()
        with _movie_lock(root, w.mid) as locked:  # not if another run has taken the movie over since
            if locked:
                shutil.rmtree(root / PARTIAL_DIR / w.mid, ignore_errors=True)


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _signals_deferred(ignore_sigint: bool = False):
    """Hold SIGINT and SIGTERM for the duration (they are delivered afterwards, not lost).

    Used while starting a worker - with `ignore_sigint`, so the worker starts with Ctrl-C
    ignored and blocked until it has set itself up (no traceback from a half-started
    worker; the parent alone stops the run) - and while stopping the workers, so a second
    Ctrl-C cannot cut the clean-up short.
    """
    main = threading.current_thread() is threading.main_thread()
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore_sigint and main else None
    try:
        yield
    finally:
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _worker_main(conn, mid: str, path: str, data_root: str, options: BuildOptions, parent_pid: int) -> None:
    """A worker process: build one movie, sending ("progress", frames), ("warning", line) and
    finally ("result", meta or the one-line reason it was skipped) through `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    _exit_with_parent(parent_pid)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # blocked by the parent around start()
    cv2.setNumThreads(1)  # parallelism comes from the processes and the encoder threads
    pending = [0]

    def report(n: int) -> None:
        pending[0] += n
        if pending[0] >= 8:
            conn.send(("progress", pending[0]))
            pending[0] = 0

    try:
        result = _build_one(mid, path, data_root, options, report, lambda line: conn.send(("warning", line)))
    except Exception as e:  # a bug, not bad input: still one line, and the run goes on
        result = f"{path}: {one_line(e, with_type=True)}"
    if pending[0]:
        conn.send(("progress", pending[0]))
    conn.send(("result", result))
    conn.close()


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _exit_with_parent(parent_pid: int, use_prctl: bool = True) -> None:
    """Make this worker die with its parent, even a parent killed by SIGKILL, so no orphan
    keeps writing into .partial. Linux: the kernel sends SIGKILL when the parent dies (prctl
    PR_SET_PDEATHSIG); everywhere, and as a backstop, a daemon thread exits the process once
    getppid() no longer names the parent (checked every 0.2 s)."""
    if use_prctl and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the request above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
