"""Files that appear whole or not at all: written to a temporary file beside the target, then renamed;
and the lock that keeps two runs from writing the same thing (try_lock).

os.replace within one folder is atomic, so a reader (or a run killed half-way through a
write) only ever sees the previous file or the complete new one under the final name.
Temporary names start with '.' and contain '.tmp'. They are created like any file that
`open(path, "w")` makes (mode 0o666, less the umask and any default ACL), so the renamed file
gets the usual permissions, e.g. 0644; tempfile.mkstemp would make it 0600. Each name holds
its writer's machine (a hash of the host name and PID namespace) and process id, so that what
a writer killed mid-write left behind can be told from what a live one is writing
(remove_stale_temps).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Iterator

try:
    import fcntl  # POSIX: try_lock
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["temp_beside", "temp_glob", "remove_stale_temps", "atomic_path", "write_bytes_atomic", "publish",
           "sync_tree", "sync_folder", "locks_work", "try_lock", "folder_lock", "removed_if_left_empty"]


def _host_id() -> str:
    """Who can ask after a process id: the host name and, on Linux, the PID namespace (two
    containers of one host can share a host name, but not their process ids)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:6]


_HOST = _host_id()  # in temporary names: whose they are
_STALE_CANDIDATE = re.compile(r"^\..*\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(\.[^.]+)?$")


def _temp_name(path: Path, keep_suffix: bool, token: str) -> str:
    return f".{path.stem}.{token}.tmp{path.suffix}" if keep_suffix else f".{path.name}.{token}.tmp"


def temp_glob(path: str | os.PathLike, keep_suffix: bool = True) -> str:
    """The glob pattern (relative to path's folder) of every name temp_beside(path, keep_suffix)
    makes: what a writer killed mid-write (SIGKILL, a power cut) can leave behind."""
    path = Path(path)
    return (path.parent / _temp_name(path, keep_suffix, "*")).as_posix()


def temp_beside(path: str | os.PathLike, keep_suffix: bool = True) -> Path:
    """A new, unique, empty file next to `path`.

    With `keep_suffix` it ends in path's extension (`.NAME.HOST-PID-1a2b3c4d.tmp.png`), for
    writers that pick the format by extension; else in '.tmp' (`.NAME.png.HOST-PID-1a2b3c4d.tmp`),
    for folders where anything ending in the real extension would count as finished (checkpoints).
    """
    path = Path(path)
    for _ in range(100):
        tmp = path.parent / _temp_name(path, keep_suffix, f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
        except FileExistsError:
            continue
        except OSError:  # not made
            raise
        except BaseException:  # SIGTERM's or Ctrl-C's exception can come once the file is made: not left behind
            tmp.unlink(missing_ok=True)
            raise
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's, or not ours to ask: taken as running
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Remove the temporary files (temp_beside's) in `folder` whose writer, a process of this
    machine, no longer runs: SIGKILL or a power cut left them, hidden, for ever (a whole
    checkpoint's size, or a video's). Another machine's (a shared folder) and those of names
    without a writer (earlier versions') are kept. Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _STALE_CANDIDATE.match(entry.name)
        if m is None or m["host"] != _HOST or _running(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
    return removed


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path, replace: bool = True) -> None:
    """Rename the finished `tmp` to `path`, never over a named pipe, socket or device (OSError;
    as root, an output named /dev/null replaced the device). Without `replace`, a file there (made
    by another run since its absence was checked) is kept and FileExistsError raised: a hard link,
    which never replaces, then the temporary name removed. Where links are not to be had (some
    network and FUSE file systems), a check just before an ordinary rename does it, which leaves
    a moment in which a file made by another run would be replaced."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):  # as root, /dev/null
        raise OSError(errno.EINVAL, "a named pipe, socket or device is there; not replaced", str(path))
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False, keep_suffix: bool = True,
                replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success rename it over `path` (without
    `replace`: FileExistsError if a file is there by then, which is kept; see publish).

    For writers that take a file name (torch.save, safetensors' save_file, an encoder). A
    writer that replaces the file instead of writing into it (safetensors does, with mode
    0600) gets the temporary file's original mode back. Any exception (Ctrl-C included)
    deletes the temporary file and leaves `path` as it was. With
    `fsync` the data reach the disk before the rename and the rename itself is made durable,
    so even a power cut leaves the old or the new file (for checkpoints worth the wait).
    """
    path = Path(path)
    tmp = None
    try:
        tmp = temp_beside(path, keep_suffix)  # inside: a signal's exception right after it still removes it
        mode = tmp.stat().st_mode & 0o7777  # what the umask (and a default ACL) made of 0o666
        yield tmp
        if tmp.stat().st_mode & 0o7777 != mode:
            os.chmod(tmp, mode)
        if fsync:
            _fsync(tmp, os.O_RDWR)
        publish(tmp, path, replace)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        try:
            _fsync(path.parent, os.O_RDONLY)
        except OSError:  # file systems (and platforms) that cannot sync a folder
            pass


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = False, replace: bool = True) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (without
    `replace`: FileExistsError if a file is there by then; see publish)."""
    path = Path(path)
    with atomic_path(path, fsync=fsync, replace=replace) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def file_identity(path) -> tuple[int, int, int, int] | None:
    """What tells a file from the one there before it (an os.replace puts a new inode there): None
    where there is none (or no path)."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


# Windows flushes a file only through a handle that may write (FlushFileBuffers); POSIX syncs any.
_FILE_SYNC = os.O_RDWR if os.name == "nt" else os.O_RDONLY


def sync_folder(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it, say) durable; a no-op where folders cannot
    be synced (some file systems, Windows)."""
    try:
        _fsync(Path(path), os.O_RDONLY)
    except OSError:
        pass


def sync_tree(folder: str | os.PathLike, threads: int = 1) -> None:
    """fsync every file below `folder`, then every folder, deepest first: the step before a
    rename that publishes the folder, so that a power cut after it cannot leave a published
    folder of empty files. Files are synced on `threads` threads; most of their pages have
    been written back by then, so this costs ~0.2 ms per small file on ext4."""
    folder = Path(folder)
    files, folders = [], []
    for dirpath, _dirs, names in os.walk(folder):
        folders.append(Path(dirpath))
        files += [Path(dirpath) / n for n in names]
    if threads > 1 and len(files) > 1:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda f: _fsync(f, _FILE_SYNC), files))
    else:
        for f in files:
            _fsync(f, _FILE_SYNC)
    for d in reversed(folders):
        sync_folder(d)


def locks_work() -> bool:
    """Whether try_lock locks anything here (POSIX); elsewhere it always says it got the lock."""
    return fcntl is not None


@contextlib.contextmanager
def try_lock(path: str | os.PathLike, make_parent: bool = False, wait: bool = False) -> Iterator[bool]:
    """Try to lock the file `path` (created if need be); yield whether this process got it
    (never waits, unless `wait`: then until the holder lets go, and it is always got).

    A lock dies with its process, so what a killed run left is taken over by the next one. The
    file is removed on the way out, while still held; whoever locked it meanwhile sees that it
    is gone (another inode, or none, at the path) and tries again. A regular file opened for
    writing, because NFS maps flock to POSIX locks, which need that. `make_parent`: create the
    folder, again if it is removed in between. Without fcntl (not POSIX) nothing is locked.
    """
    if fcntl is None:
        yield True
        return
    path = Path(path)
    for _ in range(5):
        try:
            if make_parent:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileNotFoundError:
            if make_parent:  # the folder removed by a run ending in between: again
                continue
            raise
        except OSError as e:  # not through a link planted at the name: it would make (and remove) a file anywhere
            if e.errno == errno.ELOOP and path.is_symlink():
                raise OSError(errno.ELOOP, f"{path}: a link where a lock file goes; remove it, then rerun") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        except BaseException:  # no locks here (ENOLCK), Ctrl-C while waiting, ...: not left open
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # unlinked by its previous holder after we opened it: again
    else:
        raise OSError(f"{path}: keeps changing; is another run using it?")
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def removed_if_left_empty(folder: str | os.PathLike) -> Iterator[None]:
    """On the way out, remove again the folders on the way to `folder` (itself included) that did
    not exist on the way in, deepest first, as far as they are left empty: what a run that wrote
    nothing there (refused, failed) made for its output."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.absolute().parents) if not p.exists()]  # deepest first
    try:
        yield
    finally:
        for p in made:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str) -> Iterator[bool]:
    """try_lock on `folder`/`name` for a whole run that writes into `folder` (made if need be):
    yields whether this process got it. The folders made for the lock alone (the parents too) are
    removed again if the run leaves them empty (refused on its input, say)."""
    with removed_if_left_empty(folder), try_lock(Path(folder) / name, make_parent=True) as mine:
        yield mine
