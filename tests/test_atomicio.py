"""atomicio: temp file beside the target, then rename; permissions of an ordinary new file."""
import errno
import fcntl
import os
import re
import threading

import pytest

import atomicio
from atomicio import atomic_path, sync_tree, temp_beside, temp_glob, try_lock, write_bytes_atomic
from tests.helpers import ended_pid


@pytest.fixture
def umask():
    """Set the umask for one test, then restore it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_temp_names_keep_the_extension_or_end_in_tmp(tmp_path):
    a, b = temp_beside(tmp_path / "clip.mp4"), temp_beside(tmp_path / "clip.mp4")
    assert a != b and a.parent == tmp_path and a.stat().st_size == 0
    assert re.fullmatch(r"\.clip\.[0-9a-f]{6}-\d+-[0-9a-f]{8}\.tmp\.mp4", a.name)  # encoders pick the format by extension
    c = temp_beside(tmp_path / "step=00000005.ckpt", keep_suffix=False)
    assert re.fullmatch(r"\.step=00000005\.ckpt\.[0-9a-f]{6}-\d+-[0-9a-f]{8}\.tmp", c.name)  # never looks like a .ckpt


def test_temp_glob_matches_the_temp_names_and_not_the_targets(tmp_path):
    """What a cleanup globs for: every name temp_beside makes for the target (either form, in a
    subfolder too), and neither the finished file nor another target's temporary name."""
    for target, keep in (("control.safetensors", False), ("control.yaml", True), ("images/step-00000005.png", True)):
        (tmp_path / target).parent.mkdir(exist_ok=True)
        tmp = temp_beside(tmp_path / target, keep_suffix=keep)
        (tmp_path / target).touch()
        assert sorted(tmp_path.glob(temp_glob(target, keep))) == [tmp], target
    assert temp_glob("images/step-*.png") == "images/.step-*.*.tmp.png"
    assert list(tmp_path.glob(temp_glob("config.yaml"))) == []


def test_atomic_path_renames_on_success_and_cleans_up_on_any_exception(tmp_path):
    path = tmp_path / "out.bin"
    with atomic_path(path) as tmp:
        assert not path.exists()
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    for exc in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"half")
                raise exc
        assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def synced_paths(monkeypatch) -> list[str]:
    """The paths atomicio fsyncs, in order (Linux: named through /proc/self/fd)."""
    synced, real = [], os.fsync
    monkeypatch.setattr(atomicio.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real(fd))
    return synced


def test_fsync_syncs_the_file_then_the_folder_only_when_asked(tmp_path, monkeypatch):
    """The temporary file's data before the rename (syncing the final name after it would let a
    power cut publish a short file), then the folder's entry; every byte written, the path returned."""
    synced = synced_paths(monkeypatch)
    data = bytes(range(256)) * 4
    assert write_bytes_atomic(tmp_path / "a", data) == tmp_path / "a"
    assert synced == []
    assert write_bytes_atomic(tmp_path / "b", data, fsync=True) == tmp_path / "b"
    assert len(synced) == 2 and synced[1] == str(tmp_path)
    assert os.path.dirname(synced[0]) == str(tmp_path)
    assert re.fullmatch(r"\.b\.[0-9a-f]{6}-\d+-[0-9a-f]{8}\.tmp", os.path.basename(synced[0])), synced
    assert (tmp_path / "a").read_bytes() == data and (tmp_path / "b").read_bytes() == data


def test_atomic_path_by_default_keeps_the_extension_and_syncs_nothing(tmp_path, monkeypatch):
    """Encoders given the temporary name pick the format by its extension; syncing every image
    would slow writers down, so only fsync=True syncs."""
    synced = synced_paths(monkeypatch)
    with atomic_path(tmp_path / "f.png") as tmp:
        assert re.fullmatch(r"\.f\.[0-9a-f]{6}-\d+-[0-9a-f]{8}\.tmp\.png", tmp.name)
        tmp.write_bytes(b"png")
    with atomic_path(tmp_path / "g.ckpt", keep_suffix=False) as tmp:
        assert re.fullmatch(r"\.g\.ckpt\.[0-9a-f]{6}-\d+-[0-9a-f]{8}\.tmp", tmp.name)
        tmp.write_bytes(b"ckpt")
    assert synced == [] and sorted(os.listdir(tmp_path)) == ["f.png", "g.ckpt"]


@pytest.mark.parametrize("threads", [1, 3])
def test_sync_tree_syncs_every_file_then_the_folders_deepest_first(tmp_path, monkeypatch, threads):
    (tmp_path / "m" / "frames").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "m" / "frames" / f"{i}.jpg").write_bytes(b"x")
    (tmp_path / "m" / "meta.json").write_text("{}")
    synced = synced_paths(monkeypatch)
    sync_tree(tmp_path / "m", threads)
    files = {str(tmp_path / "m" / "frames" / f"{i}.jpg") for i in range(5)} | {str(tmp_path / "m" / "meta.json")}
    assert set(synced[:6]) == files and len(synced) == 8
    assert synced[6:] == [str(tmp_path / "m" / "frames"), str(tmp_path / "m")]


def test_sync_tree_syncs_files_on_its_threads_and_raises_their_errors(tmp_path, monkeypatch):
    """threads=2 with two files: both syncs run at once (a barrier of two would time out on one
    thread); threads=1 (the default) syncs on the calling thread; a failed sync is raised, not lost."""
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x")
    barrier, threads, real = threading.Barrier(2, timeout=5), [], atomicio._fsync

    def meeting(path, flags):
        if not os.path.isdir(path):
            threads.append(threading.current_thread())
            barrier.wait()
        real(path, flags)
    monkeypatch.setattr(atomicio, "_fsync", meeting)
    sync_tree(tmp_path, threads=2)
    assert len(threads) == 2 and threading.main_thread() not in threads

    def on_main(path, flags):
        threads.append(threading.current_thread())
        real(path, flags)
    monkeypatch.setattr(atomicio, "_fsync", on_main)
    threads.clear()
    sync_tree(tmp_path)
    sync_tree(tmp_path, threads=1)
    assert len(threads) == 6 and set(threads) == {threading.main_thread()}

    def fails(path, flags):
        if path.name == "b":
            raise OSError(5, "Input/output error")
        real(path, flags)
    monkeypatch.setattr(atomicio, "_fsync", fails)
    with pytest.raises(OSError, match="Input/output error"):
        sync_tree(tmp_path, threads=2)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_0666_less_the_umask(tmp_path, umask, mask, mode):
    """Not mkstemp's 0600; also when the writer replaces the temp file with its own 0600 file
    (safetensors' save_file does), and when an existing file of another mode is replaced."""
    umask(mask)
    write_bytes_atomic(tmp_path / "a.json", b"{}")
    with atomic_path(tmp_path / "b.safetensors") as tmp:
        replacement = tmp.with_name("writer's own temp")
        fd = os.open(replacement, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.replace(replacement, tmp)
    (tmp_path / "c.png").write_bytes(b"old")
    os.chmod(tmp_path / "c.png", 0o600)
    write_bytes_atomic(tmp_path / "c.png", b"new")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # what open() makes, for comparison
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == dict.fromkeys(
        ["a.json", "b.safetensors", "c.png", "plain"], mode)


def test_temp_beside_skips_a_taken_name_and_never_reuses_it(tmp_path, monkeypatch):
    mine = f"{atomicio._HOST}-{os.getpid()}"
    taken = tmp_path / f".clip.{mine}-aaaaaaaa.tmp.mp4"
    taken.write_bytes(b"another writer's")
    tokens = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(atomicio.secrets, "token_hex", lambda n: next(tokens))
    assert temp_beside(tmp_path / "clip.mp4").name == f".clip.{mine}-bbbbbbbb.tmp.mp4"
    assert taken.read_bytes() == b"another writer's"  # O_EXCL: an existing file is not opened
    monkeypatch.setattr(atomicio.secrets, "token_hex", lambda n: "aaaaaaaa")
    with pytest.raises(FileExistsError, match="no free temporary name for clip.mp4"):
        temp_beside(tmp_path / "clip.mp4")


def test_a_signal_right_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM's handler (or Ctrl-C) raises at the first check after the open() that made the
    file; the name was then known only inside temp_beside, and the file stayed. A refusal by
    open() itself is raised as it was."""
    real = os.close

    def stopped(fd):
        real(fd)
        raise KeyboardInterrupt
    monkeypatch.setattr(atomicio.os, "close", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(tmp_path / "a.png", b"x")
    monkeypatch.setattr(atomicio.os, "close", real)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        temp_beside(tmp_path / "missing" / "a.png")


def test_temp_beside_and_atomic_path_leave_no_descriptor_open(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        write_bytes_atomic(tmp_path / f"{i}.bin", b"x", fsync=True)
        temp_beside(tmp_path / f"{i}.png")
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_folder_that_cannot_be_synced_is_not_an_error(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a folder (EINVAL); the write itself still happened."""
    real = atomicio._fsync

    def no_folder_sync(path, flags):
        if os.path.isdir(path):
            raise OSError(22, "Invalid argument")
        real(path, flags)
    monkeypatch.setattr(atomicio, "_fsync", no_folder_sync)
    write_bytes_atomic(tmp_path / "a", b"x", fsync=True)
    atomicio.sync_folder(tmp_path)
    sync_tree(tmp_path)
    assert (tmp_path / "a").read_bytes() == b"x"


def _held_elsewhere(path) -> bool:
    """Whether another open file description of `path` cannot take the lock."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_try_lock_is_exclusive_never_waits_and_removes_its_file(tmp_path):
    path = tmp_path / "m.lock"
    with try_lock(path) as got:
        assert got and _held_elsewhere(path)
        with try_lock(path) as second:
            assert second is False
        assert path.exists() and _held_elsewhere(path)  # the refused one left the holder's lock alone
    assert not path.exists()
    with try_lock(path) as again:
        assert again


def test_try_lock_takes_over_a_lock_file_its_killed_holder_left(tmp_path):
    path = tmp_path / "m.lock"
    path.write_bytes(b"")  # no process holds it
    with try_lock(path) as got:
        assert got and _held_elsewhere(path)
    assert not path.exists()


def test_try_lock_retries_when_its_file_was_replaced_before_it_locked(tmp_path, monkeypatch):
    """The previous holder removed the file between our open and our flock; a third run made a
    new one: the lock on the old inode protects nothing, so try again on the new file."""
    path = tmp_path / "m.lock"
    real, calls = fcntl.flock, []

    def flock(fd, op):
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            path.unlink()
            path.write_bytes(b"")
        return real(fd, op)

    monkeypatch.setattr(atomicio.fcntl, "flock", flock)
    with try_lock(path) as got:
        monkeypatch.setattr(atomicio.fcntl, "flock", real)
        assert got and len(calls) == 2 and calls[1] == path.stat().st_ino and _held_elsewhere(path)


def test_try_lock_makes_its_folder_only_when_asked(tmp_path):
    with pytest.raises(FileNotFoundError):
        with try_lock(tmp_path / "new" / "m.lock"):
            pass
    with try_lock(tmp_path / "new" / "m.lock", make_parent=True) as got:
        assert got and (tmp_path / "new" / "m.lock").exists()
    with try_lock(tmp_path / "a" / "b" / "m.lock", make_parent=True) as got:  # with its parents
        assert got and (tmp_path / "a" / "b" / "m.lock").exists()


def test_try_lock_with_wait_gets_the_lock_once_its_holder_lets_go(tmp_path):
    import threading
    import time

    path = tmp_path / "m.lock"
    held = os.open(path, os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(0.3, os.close, [held]).start()  # the other run ends
    t0 = time.monotonic()
    with try_lock(path, wait=True) as got:
        waited = time.monotonic() - t0
        assert got and _held_elsewhere(path)
    assert waited >= 0.25 and not path.exists()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc/self/fd")


@needs_proc
def test_try_lock_closes_what_it_opens(tmp_path):
    path, before = tmp_path / "m.lock", _open_fds()
    with try_lock(path):
        with try_lock(path) as second:
            assert not second
        assert _open_fds() == before + 1  # the holder's only
    assert _open_fds() == before


def test_try_lock_opens_its_file_for_writing_readable_and_writable_by_all_the_umask_allows(tmp_path, monkeypatch,
                                                                                           umask):
    """For writing: NFS maps flock to POSIX locks, which need it; 0o666: other users' runs sharing the
    folder lock it too."""
    real, flags = os.open, []

    def opening(path, flag, *args):
        flags.append(flag)
        return real(path, flag, *args)
    umask(0o002)
    monkeypatch.setattr(atomicio.os, "open", opening)
    with try_lock(tmp_path / "m.lock") as got:
        monkeypatch.setattr(atomicio.os, "open", real)
        assert got and (tmp_path / "m.lock").stat().st_mode & 0o777 == 0o664
    assert len(flags) == 1 and flags[0] & os.O_ACCMODE == os.O_RDWR and flags[0] & os.O_CREAT


@needs_proc
def test_try_lock_gives_up_after_five_files_replaced_under_it(tmp_path, monkeypatch):
    path, real, calls = tmp_path / "m.lock", fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        path.unlink()
        path.write_bytes(b"")
        return real(fd, op)
    monkeypatch.setattr(atomicio.fcntl, "flock", flock)
    before = _open_fds()
    with pytest.raises(OSError) as e:
        with try_lock(path):
            pass
    assert str(e.value) == f"{path}: keeps changing; is another run using it?"
    assert len(calls) == 5 and _open_fds() == before


def test_try_lock_retries_when_its_file_was_removed_before_it_locked(tmp_path, monkeypatch):
    """The previous holder removed the file between our open and our flock, and no one made
    another: the lock on the removed inode protects nothing, so make the file again."""
    path, real, calls = tmp_path / "m.lock", fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        if len(calls) == 1:
            path.unlink()
        return real(fd, op)
    monkeypatch.setattr(atomicio.fcntl, "flock", flock)
    with try_lock(path) as got:
        monkeypatch.setattr(atomicio.fcntl, "flock", real)
        assert got and len(calls) == 2 and path.exists() and _held_elsewhere(path)


def test_try_lock_makes_its_folder_again_when_it_was_removed_in_between(tmp_path, monkeypatch):
    path, real, opened = tmp_path / "new" / "m.lock", os.open, []

    def opening(p, *args):
        opened.append(p)
        if len(opened) == 1:
            path.parent.rmdir()  # a run ending removed it after our mkdir
        return real(p, *args)
    monkeypatch.setattr(atomicio.os, "open", opening)
    with try_lock(path, make_parent=True) as got:
        monkeypatch.setattr(atomicio.os, "open", real)
        assert got and len(opened) == 2 and _held_elsewhere(path)


def test_try_lock_raises_what_is_not_a_missing_folder(tmp_path):
    """A file where its folder should be: no retrying (as for a folder removed in between)."""
    (tmp_path / "new").write_text("")
    with pytest.raises(FileExistsError):
        with try_lock(tmp_path / "new" / "m.lock", make_parent=True):
            pass


@needs_proc
def test_try_lock_raises_a_failing_lock_rather_than_report_it_held(tmp_path, monkeypatch):
    """No locks on this file system (NFS without its lock daemon): an error, not 'another run
    has it' (which would leave the work to no one, forever); the file is closed all the same
    (as after Ctrl-C in a waiting flock)."""
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(atomicio.fcntl, "flock", flock)
    before = _open_fds()
    with pytest.raises(OSError) as e:
        with try_lock(tmp_path / "m.lock"):
            pass
    assert e.value.errno == errno.ENOLCK and _open_fds() == before


def test_try_lock_removes_its_file_while_still_holding_it(tmp_path, monkeypatch):
    """Closed first, another run could lock the file in between and lose it to our unlink."""
    path, real, exists_at_close = tmp_path / "m.lock", os.close, []

    def close(fd):
        exists_at_close.append(path.exists())
        real(fd)
    with try_lock(path):
        monkeypatch.setattr(atomicio.os, "close", close)
    monkeypatch.undo()
    assert exists_at_close == [False]


@needs_proc
def test_try_lock_lets_go_on_an_exception_and_of_a_file_already_removed(tmp_path):
    path, before = tmp_path / "m.lock", _open_fds()
    with pytest.raises(RuntimeError):
        with try_lock(path):
            raise RuntimeError("the work failed")
    assert not path.exists() and _open_fds() == before
    with try_lock(path) as got:
        assert got
        path.unlink()  # someone cleaned the folder up
    assert _open_fds() == before


def test_try_lock_without_fcntl_locks_nothing_and_says_got(tmp_path, monkeypatch):
    monkeypatch.setattr(atomicio, "fcntl", None)
    with try_lock(tmp_path / "m.lock") as got:
        assert got is True and not (tmp_path / "m.lock").exists()


@pytest.mark.parametrize("links", [True, False])
def test_publish_without_replace_keeps_a_file_that_appeared_and_replaces_nothing(tmp_path, monkeypatch, links):
    """replace=False: a file at the target (another run's, made since it was checked) stays, with
    FileExistsError and no temporary file left; an absent one is published whole. Without hard
    links (some network file systems) a check before the rename does the same."""
    if not links:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOTSUP, "no links")))
    target = tmp_path / "a.png"
    target.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        write_bytes_atomic(target, b"ours", replace=False)
    assert target.read_bytes() == b"theirs" and sorted(tmp_path.iterdir()) == [target]
    new = write_bytes_atomic(tmp_path / "b.png", b"ours", replace=False)
    assert new.read_bytes() == b"ours" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    assert write_bytes_atomic(target, b"ours").read_bytes() == b"ours"  # replace=True, the default: replaced


def test_publish_never_replaces_a_named_pipe_socket_or_device(tmp_path):
    """Run as root, `--out /dev/null` had its output renamed over /dev/null, which became a regular
    file. A target that is a named pipe (as a device, which needs root to make) is refused, left
    as it was, and no temporary file stays."""
    import stat

    pipe = tmp_path / "out.png"
    os.mkfifo(pipe)
    for replace in (True, False):
        with pytest.raises(OSError) as e:
            write_bytes_atomic(pipe, b"png", replace=replace)
        assert e.value.errno == errno.EINVAL and e.value.filename == str(pipe)
        assert "a named pipe, socket or device is there; not replaced" in str(e.value)
        assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and sorted(tmp_path.iterdir()) == [pipe]


def test_without_replace_a_broken_link_counts_as_there(tmp_path):
    """os.link never replaces a link, broken or not; the tools' checks at their start take a broken
    link as an output there (lexists), so that publishing it is not refused only after the work."""
    link = tmp_path / "a.png"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        write_bytes_atomic(link, b"ours", replace=False)
    assert link.is_symlink() and sorted(tmp_path.iterdir()) == [link]
    assert write_bytes_atomic(link, b"ours").read_bytes() == b"ours" and not link.is_symlink()  # --overwrite's


def test_folder_lock_removes_the_folders_it_made_if_left_empty(tmp_path):
    """A run refused after taking the lock (by another run's lock, or its input) leaves none of the
    folders the lock made, parents included; a folder with anything in it stays."""
    from atomicio import folder_lock

    with folder_lock(tmp_path / "a" / "b" / "out", ".run.lock") as mine:
        assert mine and (tmp_path / "a" / "b" / "out" / ".run.lock").exists()
        with folder_lock(tmp_path / "a" / "b" / "out", ".run.lock") as second:
            assert not second
    assert list(tmp_path.iterdir()) == []
    with folder_lock(tmp_path / "a" / "out", ".run.lock"):
        (tmp_path / "a" / "out" / "config.yaml").write_text("run")
    assert sorted(p.name for p in (tmp_path / "a" / "out").iterdir()) == ["config.yaml"]


def test_try_lock_refuses_a_link_at_its_name_and_leaves_its_target_alone(tmp_path):
    """A link planted in a shared folder made the lock create (and then remove) a file anywhere."""
    target = tmp_path / "elsewhere" / "made.txt"
    target.parent.mkdir()
    (tmp_path / "m.lock").symlink_to(target)
    with pytest.raises(OSError) as e, try_lock(tmp_path / "m.lock"):
        pass
    assert e.value.errno == errno.ELOOP and not target.exists() and (tmp_path / "m.lock").is_symlink()
    assert str(e.value) == f"[Errno {errno.ELOOP}] {tmp_path / 'm.lock'}: a link where a lock file goes; remove it, then rerun"


def test_stale_temps_of_dead_writers_of_this_machine_are_removed_and_nothing_else(tmp_path):
    """SIGKILL mid-write left hidden temporary files (a whole checkpoint's size) that no tool ever
    removed. Only those whose writer, a process of this machine, is gone are."""
    dead = ended_pid()
    host = atomicio._HOST
    other_host = "000000" if host != "000000" else "111111"
    names = {f".init.safetensors.{host}-{dead}-0123abcd.tmp": False,  # gone: removed
             f".clip.{host}-{dead}-0123abcd.tmp.mp4": False,
             f".f0.{host}-{os.getpid()}-0123abcd.tmp.png": True,  # this process: writing
             f".f1.{other_host}-{dead}-0123abcd.tmp.png": True,  # another machine's (a shared folder)
             ".f2.0123abcd.tmp.png": True,  # an earlier version's: no writer to ask
             f"f3.{host}-{dead}-0123abcd.tmp.png": True,  # not hidden: not ours
             "f4.png": True}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".d.{host}-{dead}-0123abcd.tmp").mkdir()  # a folder: never
    assert atomicio.remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n, kept in names.items() if kept] + [f".d.{host}-{dead}-0123abcd.tmp"])
    assert atomicio.remove_stale_temps(tmp_path / "missing") == 0
