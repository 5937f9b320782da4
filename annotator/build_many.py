"""Building many movies in one run (the library behind build_pairs.py; one movie is
annotator.pairs.build_movie).

`plan` turns the inputs into movie ids, drops clashes and finished movies, and takes this
machine's shard; `build_all` builds the rest, in this process or in one spawned worker
process per movie (`workers`), with an overall progress bar and one per movie, and returns
a `Summary`. Bad input is one line and a skip (or the end of the run under `strict`); a
full, over-quota, read-only or unwritable DATA_ROOT is no fault of the movie and stops the run
(`OutputError`), as every later movie would fail the same way.
Ctrl-C and SIGTERM stop the movies being built and remove their partial output; workers die
with the parent, even a parent killed by SIGKILL, so none writes on into .partial.
"""
from __future__ import annotations

import ctypes
import errno
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field, replace
from multiprocessing import resource_tracker
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from typing import Callable, Sequence

import cv2

from annotator.pairs import (
    DEFAULT_HIGH, DEFAULT_LOW, DEFAULT_MIN_GAP, PARTIAL_DIR, BuildOptions, MovieBusy, build_movie, is_finished,
    list_movies, load_meta, movie_id_for, movie_lock, refuse_linked_partial,
)
from annotator.video import FrameSourceError, probe, shown_path
from atomicio import locks_work
from cliutil import HELD_SIGNALS, bar_options, is_terminal, one_line, out_of_memory, signals_deferred


# Writes that fail with these say nothing about the movie being built, only about DATA_ROOT (EACCES: a
# folder without write permission; EPERM: an immutable folder, some network file systems; unreadable
# inputs, with these errnos too, are FrameSourceErrors, never an OSError here)
REFUSED_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, *REFUSED_ERRNOS)


class OutputError(OSError):
    """DATA_ROOT takes no more data (disk full, quota, read-only): the run stops, after the
    usual clean-up, instead of skipping every remaining movie as bad input. `where`: the folder
    named (DATA_ROOT, or the one in it that refused the write)."""

    def __init__(self, code: int, where: str | os.PathLike):
        reason = os.strerror(code)
        self.where = str(where)
        super().__init__(code, f"{reason[:1].lower()}{reason[1:]} ({where}); finished movies are kept, "
                               f"rerun to resume")

    def __str__(self) -> str:
        return self.strerror


class RunOutOfMemory(OSError):
    """The run ran out of RAM building a movie: it stops (the next would too, and a skip called
    it bad input, which --strict stopped on as such; with one process it was a traceback)."""

    def __init__(self, line: str):
        super().__init__(line)
        self.errno = errno.ENOMEM


STOPS_THE_RUN = (OutputError, RunOutOfMemory)  # a worker's result that stops the run, not a skip


def memory_line(path, e: BaseException) -> str:
    return (f"out of memory (RAM) building {shown_path(path)} ({one_line(e)}): lower --workers, --size or "
            "--sim-size; finished movies are kept, rerun to resume")


def raise_if_output_error(e: OSError, data_root) -> None:
    """A full disk is DATA_ROOT's; a refused write names where it was refused (the file, or the
    folder it was to be made in): only DATA_ROOT/.partial read-only, say, and DATA_ROOT itself
    writable, a line naming DATA_ROOT sent the user to look in the wrong place."""
    if e.errno in OUTPUT_ERRNOS:
        where = data_root
        if e.errno in REFUSED_ERRNOS and e.filename:
            path = Path(os.fsdecode(e.filename))
            where = path if path.exists() else path.parent
        raise OutputError(e.errno, where) from e


@dataclass
class Summary:
    built: list[dict] = field(default_factory=list)  # meta of each movie built in this run
    existing: list[str] = field(default_factory=list)  # ids already finished before this run
    by_others: list[str] = field(default_factory=list)  # ids another run was building, and finished
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
            f"({DEFAULT_LOW} < sim < {DEFAULT_HIGH}, gap >= {DEFAULT_MIN_GAP}; {2 * self.pairs} (reference, target) "
            f"pairs, as training counts them), {self.seconds:.1f} s, {fps:.1f} frames/s",
            f"already built (skipped): {len(self.existing)}",
            *([f"built by another run meanwhile: {len(self.by_others)}"] if self.by_others else []),
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


def folds_case(folder: Path) -> bool:
    """Whether the file system at `folder` takes "A" and "a" for one name (macOS's and Windows'
    defaults do; Linux's do not): found by a file made there, False where none can be."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".case-probe-") as f:
            name = Path(f.name)
            return (name.parent / name.name.upper()).exists()
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def plan(sources: Sequence[str | os.PathLike], data_root, shard: tuple[int, int] = (0, 1),
         options: BuildOptions | None = None):
    """Split the inputs into (to_build [(id, path, frame estimate)], existing ids, skipped lines,
    notes, number left to other shards). Shards take every n-th movie id in sorted order, so
    all machines must be given the same inputs. A finished movie built with other options
    is kept (and noted): delete its folder to rebuild it."""
    root = Path(data_root)
    by_id: dict[str, Path] = {}
    folded: dict[str, str] | None = {} if folds_case(root) else None  # ids by lower case, where "A" and "a" are one
    skipped: list[str] = []
    for s in sources:
        p = Path(s)
        mid = movie_id_for(p)
        if mid in by_id:
            # one input named twice (a glob and its name, "a" and "a/"); realpath: Path.resolve raises on a loop
            if os.path.realpath(p) == os.path.realpath(by_id[mid]):
                continue
            skipped.append(f"{shown_path(p)}: movie id '{mid}' is also used by {shown_path(by_id[mid])}; "
                           f"rename one of them")
            continue
        if folded is not None and (other := folded.get(mid.lower())) is not None:
            if _same_file(p, by_id[other]):  # one input named twice in two cases ("Film.mp4", "film.mp4")
                continue
            skipped.append(f"{shown_path(p)}: movie id '{mid}' differs from '{other}' of {shown_path(by_id[other])} "
                           f"only in case, and {shown_path(root)} holds one folder for both; rename one of them")
            continue
        by_id[mid] = p
        if folded is not None:
            folded[mid.lower()] = mid
    notes = []
    by_file: dict[tuple[int, int], list[str]] = {}  # one file under several names (links): built once
    for mid in sorted(by_id):
        with suppress(OSError):
            st = os.stat(by_id[mid])
            by_file.setdefault((st.st_dev, st.st_ino), []).append(mid)
    for first, *others in (ids for ids in by_file.values() if len(ids) > 1):  # the least id, whatever the order
        for mid in others:
            notes.append(f"{shown_path(by_id.pop(mid))}: the same file as {shown_path(by_id[first])}, built once "
                         f"as '{first}'")
    ids = sorted(by_id)
    index, count = shard
    mine = ids[index::count]
    todo, existing = [], []
    built_from: dict[str, str] | None = None  # source -> id of every finished movie, read when first needed
    for mid in mine:
        p = by_id[mid]
        kept = mid  # the folder that holds this input: its id's, or one an earlier version's id rule named
        if not is_finished(root / mid):
            if built_from is None:
                built_from = _built_from(root)
            if (kept := built_from.get(os.path.realpath(p), mid)) != mid:  # else built again: it trains twice
                notes.append(f"{shown_path(p)}: already built as '{kept}' ({shown_path(root / kept)}, an "
                             f"earlier version's name for it); kept")
        if is_finished(root / kept):
            try:
                meta = load_meta(root / kept)
            except (OSError, ValueError) as e:  # the ValueError names the file, as "F: not valid JSON (...)"
                what = str(e) if isinstance(e, ValueError) else \
                    f"{shown_path(root / kept / 'meta.json')}: unreadable ({one_line(e, with_type=True)})"
                skipped.append(f"{what}; delete {shown_path(root / kept)} to rebuild it")
                continue
            old = meta.get("source")
            if old and Path(old) != Path(os.path.realpath(p)):
                skipped.append(f"{shown_path(p)}: movie id '{mid}' was already built from {shown_path(old)}; "
                               f"rename this input or delete {shown_path(root / mid)}")
                continue
            existing.append(kept)
            if options is not None:
                diff = option_changes(meta, options)
                if diff:
                    notes.append(f"{shown_path(root / kept)}: kept, but it was built with {', '.join(diff)}; "
                                 f"delete it to rebuild")
            continue
        try:
            info = probe(p)
        except FrameSourceError as e:
            skipped.append(str(e))
            continue
        todo.append((mid, p, info.frame_count or 0))
    return todo, existing, skipped, notes, len(ids) - len(mine)


def _built_from(root: Path) -> dict[str, str]:
    """The source (real path) of each finished movie under root, to its id; a movie whose
    meta.json cannot be read is left out (plan names it when its own input comes)."""
    sources = {}
    for mid in list_movies(root):
        with suppress(OSError, ValueError):
            if isinstance(source := load_meta(root / mid).get("source"), str):
                sources[source] = mid
    return sources


def option_changes(meta: dict, options: BuildOptions) -> list[str]:
    """'name recorded (now new)' for each build option that differs from a movie's meta.json.
    The window is compared as stored: capped at the movie's frame count - 1."""
    was = {**meta, "sim_size": (meta.get("metric_params") or {}).get("sim_size", [None])[0]}
    window = min(options.window, max(1, meta.get("frame_count", options.window + 1) - 1))
    now = {"short_side": options.size, "window": window, "metric": options.metric,
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
    propagates; finished movies are kept. So does an OutputError (DATA_ROOT full or read-only).
    A movie another run is building (its lock held) is left to the end, then waited for and
    taken as that run left it: finished (Summary.by_others), or built here if that run died.
    """
    from tqdm import tqdm

    options.validate()
    t0 = time.perf_counter()
    root = Path(data_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_if_output_error(e, root)
        raise
    refuse_linked_partial(root)
    say = log or (lambda line: tqdm.write(line, file=sys.stderr))
    todo, existing, skipped, notes, others = plan(sources, root, shard, options)
    for mid in existing:  # a run killed between publishing a movie and unlocking it left the lock
        if (root / PARTIAL_DIR / f"{mid}.lock").exists():
            with suppress(OSError), movie_lock(root, mid):  # removed if not held (atomicio.try_lock)
                pass
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

    busy: list[str] = []

    def finish(mid: str, result: dict | str) -> bool:
        """Record a movie's outcome; False if it was skipped."""
        ended.add(mid)
        bars.finish(mid)
        if isinstance(result, dict):
            summary.built.append(result)
            return True
        if isinstance(result, Busy):  # not bad input: no skip, and no --strict stop
            ended.discard(mid)  # not yet: a --strict stop before the wait lists it as not built
            busy.append(mid)
            say(f"later: {result}; this run waits for it at the end")
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
        paths = {mid: (path, n) for mid, path, n in todo}
        while busy and not summary.stopped:  # finished by the other run, or left unfinished (it died): built here
            mid = busy.pop(0)
            with movie_lock(root, mid, wait=True):
                pass
            again, _, skip, notes, _ = plan([paths[mid][0]], root, options=options)  # as a rerun would see it
            for line in notes:
                say(f"note: {line}")
            if skip:
                finish(mid, skip[0])
                summary.stopped = strict
            elif not again:
                ended.add(mid)
                summary.by_others.append(mid)
            else:
                bars.again(mid, paths[mid][1])
                result = _build_one(mid, paths[mid][0], root, options, lambda n, m=mid: bars.advance(m, n), warn)
                summary.stopped = not finish(mid, result) and strict
        summary.not_built = [mid for mid, _, _ in todo if mid not in ended]
        for mid in summary.not_built:
            bars.finish(mid)  # so the overall bar ends at 100 %
    finally:
        bars.close()
        _drop_orphans(root)
        try:  # os.rmdir: only if empty, so a movie another run is building there is never touched
            (root / PARTIAL_DIR).rmdir()
        except OSError:
            pass
    summary.seconds = time.perf_counter() - t0
    return summary


def _drop_orphans(root: Path) -> None:
    """Remove the partial movies of DATA_ROOT/.partial that no run holds the lock of: left by a
    killed run for a movie no later run builds (its input gone, or now built under another
    id), they stayed for ever, gigabytes of frames at 512 px. One another run is building is
    locked, and kept; where nothing can be locked (not POSIX), none is removed."""
    if not locks_work():
        return
    try:
        partial = [d for d in (root / PARTIAL_DIR).iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return
    for d in partial:
        with suppress(OSError), movie_lock(root, d.name) as mine:
            if mine:
                shutil.rmtree(d, ignore_errors=True)


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
        self.per_movie = enabled and is_terminal(sys.stderr)  # stderr closed (2>&-): no bars, not AttributeError
        self.estimate = {mid: n for mid, _, n in todo}
        self.done: dict[str, int] = {}
        self.bars: dict[str, object] = {}
        self.overall = tqdm(total=sum(self.estimate.values()), unit="frame", desc="all movies", position=0,
                            dynamic_ncols=True, **bar_options(disable=not enabled))

    def advance(self, mid: str, n: int) -> None:
        if mid not in self.bars:
            used = {bar.pos for bar in self.bars.values()}
            slot = next(k for k in range(1, len(self.bars) + 2) if k not in used and -k not in used)
            self.bars[mid] = self._tqdm(unit="frame", desc=mid, disable=not self.per_movie, leave=False,
                                        total=self.estimate.get(mid) or None, position=slot, dynamic_ncols=True)
        self.bars[mid].update(n)
        self.done[mid] = self.done.get(mid, 0) + n
        self.overall.update(n)

    def again(self, mid: str, estimate: int) -> None:
        """A movie finished as busy (another run had it) is now built here after all."""
        self.estimate[mid] = estimate
        self.done.pop(mid, None)
        self.overall.total += estimate
        self.overall.refresh()

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


class Busy(str):
    """_build_one's result for a movie another run is building: the line that says so."""


def _build_one(mid, path, data_root, options, progress, warn=None) -> dict | str:
    """Build one movie; return its meta, the one-line reason it was skipped, or Busy."""
    try:
        return build_movie(path, data_root, mid, options, progress, warn)
    except MovieBusy as e:
        return Busy(e)
    except (FrameSourceError, FileExistsError) as e:  # their messages name the input or folder
        return str(e)
    except OSError as e:
        raise_if_output_error(e, data_root)
        return f"{shown_path(path)}: {one_line(e, with_type=True)}"
    except (ValueError, cv2.error, MemoryError) as e:
        if out_of_memory(e):  # numpy's, or OpenCV's "Insufficient memory"
            raise RunOutOfMemory(memory_line(path, e)) from None
        return f"{shown_path(path)}: {one_line(e, with_type=True)}"


# ----------------------------------------------------------------------------- worker processes


@dataclass
class _Worker:
    mid: str
    path: Path
    proc: mp.process.BaseProcess
    conn: object  # read end of the pipe the worker reports on
    result: dict | str | OutputError | RunOutOfMemory | None = None
    ended: bool = False  # sent its result, or closed the pipe (exited or died)


def _build_parallel(todo, root: Path, options, workers, strict, bars, warn, finish, summary) -> None:
    """Movies in up to `workers` spawned processes (one per movie, started as slots free up);
    the main process owns the progress bars and the summary.

    Under `strict` the first skipped movie stops the run: nothing new starts, and the movies
    still running are stopped and their partial output removed. A KeyboardInterrupt (Ctrl-C,
    or SIGTERM as build_pairs.py maps it) does the same, then propagates. Workers ignore
    SIGINT and die with the parent, so they never outlive the run; each starts with SIGINT and
    SIGTERM blocked (the mask of the thread that starts it), so a Ctrl-C that reaches it while
    Python boots stays pending until `_worker_main` ignores it.
    """
    ctx = _spawn_context()
    waiting = deque(todo)
    running: list[_Worker] = []
    try:
        while waiting or running:
            while waiting and len(running) < workers and not summary.stopped:
                mid, path, _ = waiting.popleft()
                with signals_deferred():
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
                if isinstance(w.result, STOPS_THE_RUN):
                    raise w.result  # the finally below stops the other workers and removes their output
                result = w.result if w.result is not None else (
                    f"{shown_path(w.path)}: the worker process died (exit code {w.proc.exitcode}) while building it")
                if not finish(w.mid, result) and strict:
                    summary.stopped = True
            if summary.stopped:
                break
    finally:
        with signals_deferred():
            _stop_workers(running, root)
            for w in running:  # one that finished just before it was stopped counts as built
                if is_finished(root / w.mid) and w.result is None:
                    w.result = load_meta(root / w.mid)
    for w in running:
        if isinstance(w.result, dict):
            finish(w.mid, w.result)


def _spawn_context():
    """Spawn (fork after threads - OpenCV, ffmpeg - is unsafe), its resource tracker already running.

    The tracker starts with a process's first spawned child, and that start unblocks SIGINT and
    SIGTERM in the thread that makes it (CPython's multiprocessing.resource_tracker), so the
    first worker, started inside `signals_deferred`, would boot with them unblocked."""
    ctx = mp.get_context("spawn")
    if os.name == "posix":  # Windows has no tracker process to start (its start imports _posixsubprocess)
        resource_tracker.ensure_running()
    return ctx


def _start_worker(ctx, mid: str, path, root: Path, options: BuildOptions) -> _Worker:
    read, write = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_main, args=(write, mid, str(path), str(root), options, os.getpid()),
                       name=f"build_pairs[{mid}]", daemon=True)
    try:
        proc.start()
    except BaseException:  # out of file descriptors, say: not two more held while the others are cleaned up
        read.close()
        raise
    finally:
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
        elif kind == "output-error":
            w.result, w.ended = OutputError(*value), True
        elif kind == "out-of-memory":
            w.result, w.ended = RunOutOfMemory(value), True
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
    for w in running:  # after every pipe is closed: a run out of file descriptors can lock then
        try:
            with movie_lock(root, w.mid) as locked:  # not if another run has taken the movie over since
                if locked:
                    shutil.rmtree(root / PARTIAL_DIR / w.mid, ignore_errors=True)
        except OSError:  # no lock can be made (.partial read-only, say): nor anything removed there; the
            pass  # error that stops the run (or Ctrl-C) is the one to report, and the other workers still reaped


def _worker_main(conn, mid: str, path: str, data_root: str, options: BuildOptions, parent_pid: int) -> None:
    """A worker process: build one movie, sending ("progress", frames), ("warning", line) and
    finally ("result", meta or the one-line reason it was skipped), or ("output-error", (errno,
    the folder it names)) when DATA_ROOT is full or read-only, or ("out-of-memory", line), through
    `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    _exit_with_parent(parent_pid)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # blocked by the parent around start()
    cv2.setNumThreads(1)  # parallelism comes from the processes and the encoder threads
    pending = [0]

    def report(n: int) -> None:
        pending[0] += n
        if pending[0] >= 8:
            conn.send(("progress", pending[0]))
            pending[0] = 0

    try:
        result = _build_one(mid, path, data_root, options, report, lambda line: conn.send(("warning", line)))
    except OutputError as e:
        conn.send(("output-error", (e.errno, e.where)))
        conn.close()
        return
    except Exception as e:  # a bug, not bad input: still one line, and the run goes on
        if out_of_memory(e) or isinstance(e, RunOutOfMemory):
            conn.send(("out-of-memory", str(e) if isinstance(e, RunOutOfMemory) else memory_line(path, e)))
            conn.close()
            return
        result = f"{shown_path(path)}: {one_line(e, with_type=True)}"
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
