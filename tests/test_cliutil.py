"""cliutil: one line per error, whatever the exception's message looks like."""
import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cliutil import (DefaultsFormatter, OneLineParser, Terminated, _after_exit_hooks, exit_quietly, ignore_stop_signals,
                     non_negative_int, one_line, out_of_memory, path_arg, positive_float, positive_int, quiet_opencv,
                     quiet_startup_signals, run_cli, seed_arg, signals_deferred, signals_noted)
from tests.annotator.clips import write_folder
from tests.helpers import SignalAtLine, default_sigint, named_pipe, read_only_folder, refused

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("exc, line", [
    (OSError(), "OSError"),  # no message at all: its type name, not an IndexError
    (ValueError(""), "ValueError"),
    (ValueError("  \n\n"), "ValueError"),
    (ValueError("\n  first  \nsecond"), "first"),
    (FileNotFoundError(2, "No such file or directory", "x.png"), "[Errno 2] No such file or directory: 'x.png'"),
])
def test_one_line(exc, line):
    assert one_line(exc) == line
    assert one_line(exc, with_type=True) == (line if line == type(exc).__name__ else f"{type(exc).__name__}: {line}")


def test_out_of_memory_knows_each_libraries_way_of_saying_it():
    import torch

    assert out_of_memory(MemoryError())  # numpy: "Unable to allocate 1.2 TiB for an array ..."
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"))
    assert out_of_memory(cv2.error("OpenCV(4.10.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to "
                                   "allocate 1234 bytes in function 'OutOfMemoryError'"))
    assert not out_of_memory(RuntimeError("a bug"))
    assert not out_of_memory(cv2.error("(-215:Assertion failed) !ssize.empty() in function 'resize'"))
    assert not out_of_memory(ValueError("can't allocate memory"))


def test_out_of_memory_imports_neither_torch_nor_opencv():
    """cliutil is imported first by every script, before torch; asking must not load it."""
    code = ("import sys, cliutil; assert not cliutil.out_of_memory(RuntimeError('a bug')); "
            "assert cliutil.out_of_memory(MemoryError()); print(sorted({'torch', 'cv2'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr


def test_one_line_of_a_multi_line_opencv_error():
    try:
        cv2.resize(np.zeros((4, 4), np.uint8), "x")
    except cv2.error as e:
        assert "\n" in str(e).strip()
        assert one_line(e).startswith("OpenCV") and "in function 'resize'" in one_line(e)


def test_run_cli_reports_an_empty_message_in_one_line(capsys):
    def fail(exc):
        def run(_):
            raise exc
        return run
    args = argparse.Namespace()
    assert run_cli("p.py", fail(OSError()), args, (OSError,)) == 2
    assert capsys.readouterr().err == "p.py: error: OSError\n"
    assert run_cli("p.py", fail(KeyError()), args, (OSError,), named=(Exception,)) == 2
    assert capsys.readouterr().err == "p.py: error: KeyError\n"
    assert run_cli("p.py", fail(KeyError("k")), args, (OSError,), named=(Exception,)) == 2
    assert capsys.readouterr().err == "p.py: error: KeyError: 'k'\n"
    assert run_cli("p.py", fail(OSError("disk full")), args, (OSError,), named=(Exception,)) == 2
    assert capsys.readouterr().err == "p.py: error: disk full\n"  # an expected error: no type name before it
    assert run_cli("p.py", fail(KeyboardInterrupt()), args, (OSError,), "stopped") == 130
    assert capsys.readouterr().err == "p.py: stopped\n"
    assert run_cli("p.py", fail(KeyboardInterrupt()), args, (OSError,)) == 130
    assert capsys.readouterr().err == "p.py: interrupted\n"
    assert run_cli("p.py", lambda _: 0, args, (OSError,)) == 0
    with pytest.raises(TypeError):  # not listed: a bug keeps its traceback
        run_cli("p.py", fail(TypeError("bug")), args, (OSError,))


def test_run_cli_stops_on_sigterm_like_on_ctrl_c(capsys, tmp_path):
    """By default a SIGTERM unwinds the run as Ctrl-C does (its clean-up runs), exit 143; the
    previous handler is back afterwards. sigterm=False leaves SIGTERM to the run (Lightning's)."""
    tmp = tmp_path / "out.tmp"

    def run(_):
        tmp.write_bytes(b"half")
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        finally:
            tmp.unlink()
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert run_cli("p.py", run, argparse.Namespace(), (OSError,), "interrupted; rerun") == 143
    assert capsys.readouterr().err == "p.py: terminated (SIGTERM); rerun\n"
    assert not tmp.exists() and signal.getsignal(signal.SIGTERM) == before
    assert run_cli("p.py", run, argparse.Namespace(), (OSError,), "stopped early") == 143
    assert capsys.readouterr().err == "p.py: terminated (SIGTERM); stopped early\n"
    seen = []
    assert run_cli("p.py", lambda _: seen.append(signal.getsignal(signal.SIGTERM)) or 0, argparse.Namespace(),
                   (OSError,), sigterm=False) == 0
    assert seen == [before]


def sigterm_reraised(message: str):
    """A run that gets SIGTERM and re-raises it as a plain KeyboardInterrupt saying where it stopped."""
    def run(_):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        except KeyboardInterrupt:
            raise KeyboardInterrupt(message) from None
        return 0
    return run


def test_a_sigterm_the_run_reraises_with_where_it_stopped_is_still_a_sigterm(capsys):
    """A run that knows where it stopped re-raises a plain KeyboardInterrupt saying so: 143, said so."""
    run = sigterm_reraised("interrupted at step 3; rerun to resume")
    assert run_cli("p.py", run, argparse.Namespace(), (OSError,)) == 143
    assert capsys.readouterr().err == "p.py: terminated (SIGTERM) at step 3; rerun to resume\n"


def test_run_cli_off_the_main_thread_leaves_the_signal_handlers_alone():
    """Only the main thread may set them (signal.signal raises ValueError elsewhere): a run_cli
    called from another thread runs, without the SIGTERM hook, and takes no startup handler down."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    results = []
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        quiet_startup_signals()
        startup = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        worker = threading.Thread(target=lambda: results.append(run_cli("p.py", lambda _: 0, argparse.Namespace(),
                                                                        (OSError,))))
        worker.start()
        worker.join()
        assert results == [0]
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == startup
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_startup_handlers_leave_an_ignored_or_callers_signal_alone():
    """A background job has SIGINT ignored; a caller may have its own SIGTERM handler."""
    def own(signum, frame):
        pass

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        for sigint, sigterm in ((signal.SIG_IGN, signal.SIG_IGN), (signal.SIG_IGN, own)):
            signal.signal(signal.SIGINT, sigint)
            signal.signal(signal.SIGTERM, sigterm)
            quiet_startup_signals()
            assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (sigint, sigterm)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_run_cli_reports_a_raised_terminated_as_sigterm(capsys):
    """A caller that saw a sub-tool end by SIGTERM (exit 143) raises Terminated: 143 again, said so."""
    def run(_):
        raise Terminated("interrupted during step 2")
    assert run_cli("p.py", run, argparse.Namespace(), (OSError,)) == 143
    assert capsys.readouterr().err == "p.py: terminated (SIGTERM) during step 2\n"


def test_run_cli_without_a_stop_line_leaves_the_stop_to_its_caller(capsys):
    """interrupted=None (a tool run inside another): Ctrl-C and SIGTERM propagate, unsaid, as
    KeyboardInterrupt and Terminated; a SIGTERM stays a Terminated even when the run re-raised
    it as a plain KeyboardInterrupt saying where it stopped."""
    def ctrl_c(_):
        raise KeyboardInterrupt("interrupted; 2 written")

    with pytest.raises(KeyboardInterrupt) as e:
        run_cli("p.py", ctrl_c, argparse.Namespace(), (OSError,), interrupted=None)
    assert type(e.value) is KeyboardInterrupt and str(e.value) == "interrupted; 2 written"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="^interrupted; 3 written$"):
        run_cli("p.py", sigterm_reraised("interrupted; 3 written"), argparse.Namespace(), (OSError,), interrupted=None)
    assert capsys.readouterr().err == "" and signal.getsignal(signal.SIGTERM) == before


def test_run_cli_prints_the_interrupts_own_message(capsys):
    """A run that knows where it stopped re-raises KeyboardInterrupt with that; the generic
    `interrupted` is for one without a message."""
    def run(_):
        raise KeyboardInterrupt("interrupted; 2 written: --frames 2: continues")
    assert run_cli("p.py", run, argparse.Namespace(), (OSError,), "interrupted early") == 130
    assert capsys.readouterr().err == "p.py: interrupted; 2 written: --frames 2: continues\n"


STARTUP_INTERRUPT = """
import builtins, os, runpy, signal, sys
real, sig = builtins.__import__, getattr(signal, sys.argv[2])
def interrupting(name, *args, **kwargs):  # the signal as the first heavy library starts loading
    if name.partition(".")[0] in ("numpy", "torch", "cv2", "lightning"):
        builtins.__import__ = real
        os.kill(os.getpid(), sig)
    return real(name, *args, **kwargs)
builtins.__import__ = interrupting
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig, status, message", [("SIGINT", 130, "interrupted"),
                                                  ("SIGTERM", 143, "terminated (SIGTERM)")])
@pytest.mark.parametrize("script", ["build_pairs.py", "build_latent_cache.py", "tool_add_control_sd21.py",
                                    "tutorial_train_sd21_color_v2.py", "colorize_inference.py", "evaluate.py",
                                    "demo.py"])
def test_ctrl_c_or_sigterm_while_the_libraries_load_is_one_line(script, sig, status, message):
    """Before run_cli takes over, Ctrl-C or SIGTERM (here: during the first import of numpy,
    torch, OpenCV or Lightning) is "SCRIPT: interrupted", exit 130, or "SCRIPT: terminated
    (SIGTERM)", exit 143, as run_cli says them later; not an import traceback, or a silent end."""
    res = subprocess.run([sys.executable, "-c", STARTUP_INTERRUPT, str(REPO / script), sig], cwd=REPO,
                         capture_output=True, text=True, timeout=120, preexec_fn=default_sigint)
    assert (res.returncode, res.stderr) == (status, f"{script}: {message}\n")


def test_run_cli_takes_the_startup_handlers_down():
    """Once run_cli runs, SIGTERM is the default again (or run_cli's own with `sigterm`), not the
    startup handler's os._exit, which would skip the run's clean-up; and Lightning, when fit
    starts, would call it after its own handler, ending a training before it stops cleanly."""
    from cliutil import quiet_startup_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []

    def run(_):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return 0
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for sigterm in (False, True):
            quiet_startup_signals()
            assert all(getattr(signal.getsignal(s), "quiet_startup", False) for s in (signal.SIGINT, signal.SIGTERM))
            assert run_cli("p.py", run, argparse.Namespace(), (OSError,), sigterm=sigterm) == 0
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        (ctrl_c, term), (_, own) = seen
        assert ctrl_c.follows is signal.default_int_handler and term is signal.SIG_DFL  # noted on the way
        assert callable(own.follows) and not getattr(own.follows, "quiet_startup", False)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])



def test_run_cli_leaves_an_ignored_or_callers_handler_alone():
    """Only the startup handlers are taken down: a background job's ignored SIGINT stays ignored,
    and a caller's own SIGTERM handler stays (sigterm=False) or comes back after the run."""
    def own(signum, frame):
        pass

    def run(_):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return 0
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []
    try:
        for sigterm in (False, True):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, own)
            assert run_cli("p.py", run, argparse.Namespace(), (OSError,), sigterm=sigterm) == 0
            assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.SIG_IGN, own)
        assert seen[0] == (signal.SIG_IGN, own) and seen[1][0] is signal.SIG_IGN and seen[1][1] is not own
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])

PIPED = """
import os, sys
from cliutil import run_cli

def run(_):
    out, flush = sys.argv[1], sys.argv[2] == "flush"
    with open(out + ".tmp", "w") as f:
        f.write("work")
    try:
        print("report", flush=flush)  # flushed: the reader's going shows here, mid-run
        os.replace(out + ".tmp", out)
    finally:
        if os.path.exists(out + ".tmp"):
            os.unlink(out + ".tmp")
    print("more")
    if sys.argv[3:] == ["own"]:  # a pipe of the run's own breaks
        raise BrokenPipeError(32, "Broken pipe")
    return 0

sys.exit(run_cli("p.py", run, None, (OSError,)))
"""


def piped(tmp_path, *argv, read: bool) -> tuple[int, str]:
    """PIPED with stdout a pipe, whose reader goes before the first line unless `read`; stdout
    block-buffered, as Python makes it for a pipe without PYTHONUNBUFFERED."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-c", PIPED, str(tmp_path / "out"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not read:
        proc.stdout.close()  # `| head` that has read all it wants
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("flush", [True, False])
def test_a_reader_of_stdout_that_goes_ends_the_run_quietly_with_141(tmp_path, flush):
    """`SCRIPT | head`: no "Broken pipe" error or "Exception ignored" at exit, status 141 as for a
    Unix tool ended by SIGPIPE. Met mid-run (a flushed print), the run unwinds and cleans up;
    met at the end (buffered output), what the run wrote stays written."""
    rc, err = piped(tmp_path, "flush" if flush else "buffered", read=False)
    assert (rc, err) == (141, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if flush else ["out"])


def test_a_broken_pipe_of_the_runs_own_is_an_error(tmp_path, capsys):
    """Only a stdout whose reader has gone ends quietly: another broken pipe is reported."""
    assert piped(tmp_path, "flush", "own", read=True) == (2, "p.py: error: [Errno 32] Broken pipe\n")

    def run(_):
        raise BrokenPipeError(32, "Broken pipe")
    # a stdout that is no pipe at all (pytest's capture: no fileno): nothing says its reader went
    assert run_cli("p.py", run, argparse.Namespace(), (OSError,)) == 2
    assert capsys.readouterr().err == "p.py: error: [Errno 32] Broken pipe\n"


STDERR_GONE = """
import os, signal, sys
from cliutil import quiet_startup_signals, run_cli

def run(_):
    out, how = sys.argv[1], sys.argv[2]
    if how in ("error", "interrupt"):
        raise ValueError("bad input") if how == "error" else KeyboardInterrupt
    with open(out + ".tmp", "w") as f:
        f.write("work")
    try:
        print("progress", file=sys.stderr)  # a progress bar's line: the reader's going shows here
        os.replace(out + ".tmp", out)
    finally:
        if os.path.exists(out + ".tmp"):
            os.unlink(out + ".tmp")
    return 0

if sys.argv[2] == "startup":  # Ctrl-C while the libraries load
    quiet_startup_signals()
    os.kill(os.getpid(), signal.SIGINT)
sys.exit(run_cli("p.py", run, None, (ValueError, OSError)))
"""


@pytest.mark.parametrize("how, status", [("progress", 141), ("error", 2), ("interrupt", 130), ("startup", 130)])
def test_a_reader_of_stderr_that_goes_ends_the_run_quietly(tmp_path, how, status):
    """`SCRIPT 2>&1 >/dev/null | head -c1`: a line on stderr mid-run ends it as SIGPIPE would, 141, after
    its clean-up; the line of how a run ended (error, interrupted), which no one can read now, is
    dropped and the status is still the run's. Each was a BrokenPipeError traceback (lost too), exit 1."""
    proc = subprocess.Popen([sys.executable, "-c", STDERR_GONE, str(tmp_path / "out"), how], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    proc.stderr.close()  # the reader has gone before the first line
    assert proc.wait(timeout=60) == status
    assert list(tmp_path.iterdir()) == []  # the run stopped, and cleaned up


def test_folder_problem_names_the_file_in_the_way(tmp_path, monkeypatch):
    from cliutil import folder_problem

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert folder_problem(a_file) == f"{a_file} is a file, not a folder"
    assert folder_problem(a_file / "sub" / "deeper") == f"{a_file} is a file, not a folder"
    assert folder_problem(tmp_path) is None and folder_problem(tmp_path / "new" / "deeper") is None
    monkeypatch.chdir(tmp_path)
    assert folder_problem(Path("notes.txt") / "sub") == f"{a_file} is a file, not a folder"  # named in full
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for link in ("dangling", "loop"):  # mkdir would fail there with "[Errno 17] File exists"
        assert folder_problem(tmp_path / link / "sub") == f"{tmp_path / link} is a broken symbolic link"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_file_problem_says_what_a_path_that_is_no_regular_file_is(tmp_path):
    from cliutil import NOT_REGULAR, file_problem

    (tmp_path / "f.png").write_bytes(b"x")
    (tmp_path / "to_file").symlink_to(tmp_path / "f.png")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "to_pipe").symlink_to(tmp_path / "pipe")
    assert NOT_REGULAR == "not a regular file (a named pipe, socket or device)"  # annotator/video.py's wording
    with named_pipe(tmp_path / "pipe"):
        assert [file_problem(tmp_path / n) for n in ("f.png", "to_file", "missing", "dangling", "loop", "pipe",
                                                      "to_pipe")] \
            == [None, None, "no such file", "no such file", "no such file", NOT_REGULAR, NOT_REGULAR]
    assert file_problem(tmp_path) == "is a folder" and file_problem(os.devnull) == NOT_REGULAR
    assert file_problem(tmp_path, "gone", "a folder, not an image") == "a folder, not an image"
    assert file_problem(tmp_path / "missing", "gone", "a folder, not an image") == "gone"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_out_folder_problem_says_what_is_in_the_way(tmp_path):
    from cliutil import NOT_FOLDER, folder_problem, not_a_folder, out_folder_problem

    (tmp_path / "notes.txt").write_text("x")
    assert NOT_FOLDER == "not a folder (a named pipe, socket or device)"
    with named_pipe(tmp_path / "pipe"):  # was "a file, not a folder"
        assert not_a_folder(tmp_path / "pipe") == NOT_FOLDER and not_a_folder(os.devnull) == NOT_FOLDER
        assert folder_problem(tmp_path / "pipe" / "sub") == f"{tmp_path / 'pipe'} is {NOT_FOLDER}"
        assert out_folder_problem("--out", tmp_path / "pipe") == f"--out {tmp_path / 'pipe'} is {NOT_FOLDER}"
    assert not_a_folder(tmp_path / "notes.txt") == "a file, not a folder"
    # the path itself in the way: named once, as given; a file above it: both named
    notes = tmp_path / "notes.txt"
    assert out_folder_problem("--out", notes) == f"--out {notes} is a file, not a folder"
    assert out_folder_problem("--dir", tmp_path / "notes.txt" / "a") \
        == f"--dir {tmp_path / 'notes.txt' / 'a'}: {tmp_path / 'notes.txt'} is a file, not a folder"
    assert out_folder_problem("--out", tmp_path) is None and out_folder_problem("--out", tmp_path / "new" / "x") is None


def test_out_file_problem_says_why_a_file_cannot_be_written_there(tmp_path, monkeypatch):
    from cliutil import out_file_problem

    (tmp_path / "notes.txt").write_text("x")
    assert out_file_problem("--video", tmp_path / "v.mp4") is None
    assert out_file_problem("--video", tmp_path / "new" / "v.mp4") is None  # the caller makes the folder
    assert out_file_problem("--out", tmp_path / "new" / "b.png", new_folders=False) \
        == f"--out {tmp_path / 'new' / 'b.png'}: there is no folder {tmp_path / 'new'}"
    assert out_file_problem("--video", tmp_path) == f"--video {tmp_path} is a folder"
    assert out_file_problem(None, tmp_path / "notes.txt" / "v.mp4") \
        == f"{tmp_path / 'notes.txt' / 'v.mp4'}: {tmp_path / 'notes.txt'} is a file, not a folder"
    ro = read_only_folder(tmp_path / "ro", monkeypatch)
    for new_folders in (True, False):
        assert out_file_problem("--video", ro / "v.mp4", new_folders=new_folders) \
            == f"--video {ro / 'v.mp4'}: {ro} is not writable"
    assert out_file_problem("--video", ro / "sub" / "v.mp4") == f"--video {ro / 'sub' / 'v.mp4'}: {ro} is not writable"
    os.mkfifo(tmp_path / "pipe.png")  # as a device (/dev/null, which root's rename replaced with the output)
    for where in (tmp_path / "pipe.png", os.devnull):
        assert out_file_problem("--out", where) == (f"--out {where}: not a regular file (a named pipe, socket or "
                                                    "device), which the output would replace; give the name of a file")


def test_out_folder_problem_names_the_folder_that_refuses_writes(tmp_path, monkeypatch):
    from cliutil import out_folder_problem

    ro = read_only_folder(tmp_path / "ro", monkeypatch)
    assert out_folder_problem("--out", ro) == f"--out {ro}: {ro} is not writable"
    assert out_folder_problem("--report", ro / "a" / "b") == f"--report {ro / 'a' / 'b'}: {ro} is not writable"


def test_not_writable_names_the_folder_that_refuses(tmp_path, monkeypatch):
    from cliutil import not_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    assert not_writable(ro) is None and not_writable(ro / "new" / "deeper") is None
    denied = []
    monkeypatch.setattr(os, "access", lambda p, mode: denied.append((p, mode)) or False)
    assert not_writable(ro / "new" / "deeper") == str(ro)  # the nearest folder that exists
    assert denied == [(str(ro), os.W_OK | os.X_OK)]
    monkeypatch.chdir(tmp_path)
    assert not_writable("ro") == str(ro)  # named in full


@pytest.mark.parametrize("parse, text, expected", [
    (positive_int, "3", 3), (positive_int, "0", "an integer >= 1"), (positive_int, "1.5", "an integer >= 1"),
    (non_negative_int, "0", 0), (non_negative_int, "-1", "an integer >= 0"), (non_negative_int, "x", "an integer >= 0"),
    (positive_float, "0.5", 0.5), (positive_float, "0", "a number > 0"), (positive_float, "-1e-9", "a number > 0"),
    (positive_float, "inf", "a number > 0"), (positive_float, "nan", "a number > 0"),
])
def test_counts_and_rates_refuse_what_is_out_of_range_naming_the_value(parse, text, expected):
    if isinstance(expected, str):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^expected {re.escape(expected)}, got {text!r}$"):
            parse(text)
    else:
        assert parse(text) == expected and type(parse(text)) is type(expected)


def test_a_seed_is_taken_over_torchs_whole_range_and_refused_outside_it():
    """0..2**64-1 is what torch.manual_seed takes: both ends pass, one past either is refused."""
    import torch

    assert (seed_arg("0"), seed_arg(str(2**64 - 1))) == (0, 2**64 - 1)
    torch.Generator().manual_seed(seed_arg(str(2**64 - 1)))  # the top end is torch's too
    for text in ("-1", str(2**64)):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^must be in 0\.\.{2**64 - 1} \(got {text}\)$"):
            seed_arg(text)


def test_an_empty_path_is_refused_naming_its_flag(capsys):
    """`--out "$OUT"` with OUT unset: "" was the current folder (outputs written there, or an error
    blaming a file in it)."""
    assert path_arg("out") == "out" and path_arg(" ") == " "  # a name of spaces is a name
    with pytest.raises(argparse.ArgumentTypeError, match="^empty path$"):
        path_arg("")
    parser = OneLineParser(prog="p.py")
    parser.add_argument("--out", type=path_arg)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--out", ""])
    assert e.value.code == 2 and capsys.readouterr().err == "p.py: error: argument --out: empty path (see --help)\n"



@pytest.mark.parametrize("script, argv", [
    ("tutorial_train_sd21_color_v2", ["--init", "i", "--data", "d", "--out", "o", "--config", "c", "--resume", "r"]),
    ("build_pairs", ["in", "--out", "o"]),
    ("build_latent_cache", ["root", "--ckpt", "c", "--config", "y"]),
    ("tool_add_control_sd21", ["sd.safetensors", "out.safetensors", "--config", "c"]),
    ("tools/plot_pairs", ["movie", "--out", "o.png"]),
])
def test_every_path_of_the_data_and_training_scripts_refuses_an_empty_one(script, argv, capsys, monkeypatch):
    """As colorize_inference.py, evaluate.py and demo.py do (tested in their own files): each path
    given as "" in turn (a flag's value, or a positional argument) is refused while parsing."""
    import importlib

    if "/" in script:
        monkeypatch.syspath_prepend(str(REPO / Path(script).parent))
    main = importlib.import_module(Path(script).name).main
    for i, value in enumerate(argv):
        if value.startswith("--"):
            continue
        empty = argv[:i] + [""] + argv[i + 1:]
        name = argv[i - 1] if i and argv[i - 1].startswith("--") else None
        err = refused(main, empty, capsys)
        assert err.endswith(": empty path (see --help)\n") and (name is None or f"argument {name}:" in err), err

def test_quiet_opencv_leaves_an_explicit_setting(monkeypatch):
    monkeypatch.delenv("OPENCV_FFMPEG_LOGLEVEL", raising=False)
    monkeypatch.setenv("OPENCV_LOG_LEVEL", "DEBUG")
    quiet_opencv()
    assert (os.environ["OPENCV_FFMPEG_LOGLEVEL"], os.environ["OPENCV_LOG_LEVEL"]) == ("-8", "DEBUG")
    monkeypatch.setenv("OPENCV_FFMPEG_LOGLEVEL", "32")
    monkeypatch.delenv("OPENCV_LOG_LEVEL")
    quiet_opencv()
    assert (os.environ["OPENCV_FFMPEG_LOGLEVEL"], os.environ["OPENCV_LOG_LEVEL"]) == ("32", "OFF")


def test_help_shows_a_default_only_where_one_is_worth_showing():
    parser = argparse.ArgumentParser(prog="p.py", formatter_class=DefaultsFormatter)
    parser.add_argument("--none", help="N.")
    parser.add_argument("--flag", action="store_true", help="F.")
    parser.add_argument("--zero", type=int, default=0, help="Z.")
    parser.add_argument("--three", type=int, default=3, help="T.")
    text = " ".join(parser.format_help().split())
    assert "N. --flag F. --zero ZERO Z. (default: 0) --three THREE T. (default: 3)" in text


@pytest.mark.parametrize("module, argv, name", [
    ("colorize_inference", ["--set", "nope"], "--set"),
    ("cldm.checkpoint_cli", ["inspect", "x.safetensors", "--config", "c.yaml", "--set", "nope"], "--set"),
    ("tool_add_control_sd21", ["sd.safetensors", "out.safetensors", "nope"], "key=value"),
    ("tutorial_train_sd21_color_v2", ["--init", "i", "--data", "d", "--out", "o", "nope"], "key=value"),
    ("benchmarks.bench_train", ["nope"], "key=value"),
    ("benchmarks.flops", ["nope"], "key=value"),
    ("benchmarks.train_flops", ["nope"], "key=value"),
    ("benchmarks.profile_step", ["train", "nope"], "key=value"),
    ("benchmarks.roofline", ["train", "nope"], "key=value"),
])
def test_an_override_without_equals_sign_names_the_argument_it_came_to(module, argv, name, capsys):
    """Every CLI that takes `key=value` overrides parses them with config_override: a bad one is
    refused while parsing, naming the flag (or the positional argument), before anything loads."""
    import importlib

    err = refused(importlib.import_module(module).main, argv, capsys)
    assert err.endswith(f": error: argument {name}: override must look like key=value, got 'nope' (see --help)\n"), err


@pytest.mark.parametrize("text, problem", [
    ("=v3", "override '=v3' has no key before '=' (e.g. model.color_variant=v3)"),
    (" =v3", "override ' =v3' has no key before '=' (e.g. model.color_variant=v3)"),
    ("model.color_variant =v3", "override 'model.color_variant =v3': the key has a space; write key=value with a "
                                "dotted key and no spaces before '='"),
    ("model. color_variant=v3", "override 'model. color_variant=v3': the key has a space; write key=value with a "
                                "dotted key and no spaces before '='"),
])
def test_an_override_without_a_key_or_with_a_space_in_it_names_the_argument(text, problem, capsys):
    """Refused while parsing, as a missing '=' is: load_config would say only "Key '' is not in struct"."""
    from cliutil import config_override

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(problem)):
        config_override(text)
    assert config_override("train.note=a b=c") == "train.note=a b=c"  # the value may hold spaces and '='
    import tutorial_train_sd21_color_v2 as train
    err = refused(train.main, ["--init", "i", "--data", "d", "--out", "o", text], capsys)
    assert err.endswith(f": error: argument key=value: {problem} (see --help)\n"), err


def test_a_value_that_starts_with_a_dash_and_a_digit_goes_to_its_flag(capsys):
    p = OneLineParser(prog="t")
    p.add_argument("--frames")
    p.add_argument("--n", type=int)
    p.add_argument("--flag", action="store_true")
    p.add_argument("rest", nargs="*")
    args = p.parse_args(["--frames", "-5:-1", "--n", "-3"])
    assert (args.frames, args.n) == ("-5:-1", -3)
    assert p.parse_args(["--frames", "-.5:"]).frames == "-.5:"
    assert p.parse_args(["--frames", "1:", "--", "-1:"]).rest == ["-1:"]  # after "--": positional
    assert p.parse_known_args(["--flag", "-1:"])[1] == ["-1:"]  # a flag without a value takes none
    with pytest.raises(SystemExit):
        p.parse_args(["--frames", "--flag"])  # a flag is still a flag
    assert capsys.readouterr().err == "t: error: argument --frames: expected one argument (see --help)\n"


def test_a_dash_digit_value_goes_to_a_flag_named_by_the_start_argparse_takes_for_it(capsys):
    p = OneLineParser(prog="t")
    p.add_argument("--frames")
    p.add_argument("--frame-rate")
    p.add_argument("--shard")
    # (a plain negative number, "--sh -3", argparse gives to the flag itself)
    assert p.parse_args(["--sh", "-1/4", "--frame-", "-2:", "--frames", "-1:"]) \
        == argparse.Namespace(frames="-1:", frame_rate="-2:", shard="-1/4")  # --sh was "expected one argument"
    assert p.parse_known_args(["--sx", "-1/4"])[1] == ["--sx", "-1/4"]  # the start of no flag: not joined
    with pytest.raises(SystemExit):
        p.parse_args(["--frame", "-1:"])  # the start of two: argparse's own word for it
    assert capsys.readouterr().err == "t: error: ambiguous option: --frame could match --frames, --frame-rate " \
                                      "(see --help)\n"
    exact = OneLineParser(prog="t", allow_abbrev=False)
    exact.add_argument("--shard")
    assert exact.parse_known_args(["--sh", "-1/4"])[1] == ["--sh", "-1/4"]  # no abbreviations there: none joined


def test_a_dash_digit_that_is_a_flag_of_the_parsers_is_not_joined(capsys):
    """A parser with a flag like "-1" (argparse then reads "-1" as that flag, not a number): the
    flag before it gets no value from it."""
    p = OneLineParser(prog="t")
    p.add_argument("--n")
    p.add_argument("-1", dest="one", action="store_true")
    assert p.parse_args(["-1", "--n", "-2"]) == argparse.Namespace(n="-2", one=True)
    with pytest.raises(SystemExit):
        p.parse_args(["--n", "-1"])
    assert capsys.readouterr().err == "t: error: argument --n: expected one argument (see --help)\n"


SLOW_EXIT = """
import atexit, runpy, sys, time
import cliutil  # imported first by the scripts, as torch, whose exit hooks come after it, is not
atexit.register(time.sleep, 30)  # a slow teardown (torch's exit hooks take about a second) for the signal
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
SLOW_CLEAN_UP = """
import runpy, sys, time
class Slow:  # freed with __main__'s globals, after the exit hooks (where most of torch's teardown is)
    def __del__(self):
        time.sleep(3)
slow = Slow()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
EXITING = """
import sys
from cliutil import exit_quietly
print("done", flush=True)
exit_quietly(int(sys.argv[1]))
"""


def signal_after_the_last_line(argv, last: str, sig: str, teardown: str = SLOW_EXIT) -> tuple[int, str, float]:
    """(exit status, stderr, seconds from the signal to the end) of `argv`, signalled once it has
    printed a line starting with `last`, while its teardown (SLOW_EXIT, or SLOW_CLEAN_UP) runs."""
    p = subprocess.Popen([sys.executable, "-c", teardown, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        while not p.stdout.readline().startswith(last):
            assert p.poll() is None, p.stderr.read()
        time.sleep(0.3)
        p.send_signal(getattr(signal, sig))
        start = time.monotonic()
        _, err = p.communicate(timeout=60)
        return p.returncode, err, time.monotonic() - start
    finally:
        p.kill()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("status", [0, 2])
def test_a_signal_during_the_teardown_ends_quietly_with_the_runs_status(tmp_path, sig, status):
    """Ctrl-C after the run has said how it ended: no "Exception ignored in atexit callback"
    traceback, no waiting for the rest of the teardown, and the run's own exit status."""
    script = tmp_path / "exiting.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + EXITING)
    rc, err, took = signal_after_the_last_line([script, status], "done", sig)
    assert (rc, err) == (status, "") and took < 20


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("status", [0, 2])
def test_a_signal_after_the_exit_hooks_does_not_end_the_process_by_that_signal(tmp_path, sig, status):
    """After the exit hooks Python puts the default action back (the process killed by the signal,
    status -2 / -15 to its parent) for the rest of its teardown: with torch loaded that is most of
    it, half a second after a baseline's "wrote" line. The run's status, and no line, there too."""
    script = tmp_path / "exiting.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + EXITING)
    rc, err, _ = signal_after_the_last_line([script, status], "done", sig, SLOW_CLEAN_UP)
    assert (rc, err) == (status, "")


def test_exit_quietly_leaves_an_ignored_signal_ignored_and_the_exit_hooks_only_its_own_handlers():
    """A background job (SIGINT ignored by the shell, as nohup ignores SIGHUP) stays deaf to it in
    its teardown; _after_exit_hooks ignores the signals only where exit_quietly set its handler,
    not in a process that imports cliutil and exits some other way (a handler of its own kept)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _after_exit_hooks()  # no exit_quietly: nothing changed
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) \
            == (signal.default_int_handler, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with pytest.raises(SystemExit) as stop:
            exit_quietly(3)
        assert stop.value.code == 3
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # ignored: stays so
        assert getattr(signal.getsignal(signal.SIGTERM), "exit_quietly", False)
        _after_exit_hooks()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.SIG_IGN, signal.SIG_IGN)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


ENDS_QUIETLY = ["build_pairs.py", "build_latent_cache.py", "tutorial_train_sd21_color_v2.py", "colorize_inference.py",
                "evaluate.py", "demo.py", "tool_add_control_sd21.py", "cldm/checkpoint.py", "tools/make_toy_model.py",
                "tools/plot_pairs.py", "tools/make_idea_figure.py", "tools/make_demo_figures.py"]


@pytest.mark.parametrize("script", ENDS_QUIETLY)
def test_each_script_ends_through_exit_quietly(script):
    """Its `if __name__ == "__main__":` block ends with exit_quietly(main()), not sys.exit(main()),
    which leaves a signal in the teardown its traceback (checked on one script by running it)."""
    import ast
    tree = ast.parse((REPO / script).read_text())
    block = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"][-1]
    assert ast.unparse(block.body[-1]) == "exit_quietly(main())"


def test_a_ctrl_c_as_a_script_exits_after_its_run_leaves_no_traceback(tmp_path):
    """The same through a real script: colorize_inference.py's baseline, signalled after "wrote"."""
    frames = write_folder([np.full((16, 24, 3), 40 * k, np.uint8) for k in range(3)], tmp_path / "gray")
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), np.full((16, 24, 3), (30, 90, 200), np.uint8))
    argv = [REPO / "colorize_inference.py", "--input", frames, "--reference", ref, "--method", "reinhard",
            "--no-progress", "--out", tmp_path / "out"]
    rc, err, took = signal_after_the_last_line(argv, "wrote 3 frames", "SIGINT")
    assert (rc, err) == (0, "") and took < 20
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_a_stop_as_the_last_line_is_flushed_ends_with_the_runs_status(capsys, monkeypatch):
    """Ctrl-C or SIGTERM in run_cli's flush of stdout (a pipe: the run's last line reaches its
    reader there) came after the run had ended and said how: it used to be reported as
    "interrupted before any output was written", exit 130, after a run that wrote everything."""
    class Stdout:
        def write(self, text):
            return len(text)

        def flush(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdout", Stdout())
    assert run_cli("t", lambda args: 0, argparse.Namespace(), (), interrupted="interrupted before any output") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX signal masks")
def test_signals_deferred_holds_them_with_other_threads_running_and_delivers_them_after():
    """The scripts have threads that do not block the signals (numpy's BLAS pool, tqdm's monitor):
    the kernel hands a signal to one of them and Python runs its handler in the main thread,
    inside the block - in build_pairs a second Ctrl-C cut the workers' clean-up short."""
    import signal
    import threading

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # started before the block: signals unblocked there
    other.start()
    got = []

    def record(signum, frame):
        got.append(signum)
    old = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with signals_deferred():
            for s in (signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), s)
            time.sleep(0.1)  # a handler Python would run has run by now
            assert got == []
        time.sleep(0.1)
        assert sorted(got) == sorted([signal.SIGINT, signal.SIGTERM])  # delivered, not lost
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is record
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        stop.set()


def _in_a_thread(body):
    """Run `body()` in another thread; what it raised, if anything."""
    raised = []

    def target():
        try:
            body()
        except BaseException as e:  # reported to the test
            raised.append(e)
    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    return raised


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX signal masks")
def test_signals_deferred_keeps_a_block_that_was_there_before_it_and_runs_off_the_main_thread():
    """It puts the mask back as it found it (a signal blocked by the caller, or by an outer
    signals_deferred, stays blocked), not unblocks SIGINT/SIGTERM; in another thread it only
    blocks them there (setting a handler would raise ValueError: handlers are the main thread's)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        with signals_deferred():
            pass
        assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    masks = []

    def body():
        with signals_deferred():
            masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
    assert _in_a_thread(body) == []
    assert {signal.SIGINT, signal.SIGTERM} <= masks[0] and not {signal.SIGINT, signal.SIGTERM} & masks[1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_ignore_stop_signals_drops_both_until_run_cli_puts_the_handlers_back():
    """Inside a run, from the call on, SIGINT and SIGTERM are ignored - dropped, not run late (a run
    that is complete or has worked out its stop line) - until run_cli returns, which sets the
    handlers it found again."""
    got = []

    def record(signum, frame):
        got.append(signum)

    def run(_):
        ignore_stop_signals()
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        for s in (signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), s)
        time.sleep(0.1)
        return 0
    old = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,), sigterm=False) == 0
        time.sleep(0.1)
        assert got == []
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is record
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_ignore_stop_signals_off_the_main_thread_changes_nothing():
    """Only the main thread may set a handler: elsewhere (run_cli called from a thread) it is a
    no-op, not a ValueError out of the stop's handling."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        ignore_stop_signals()
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
    assert _in_a_thread(body) == [] and seen == [handlers]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_signals_noted_notes_each_stop_signal_and_still_runs_the_handler():
    """Each SIGINT and SIGTERM in the block is noted and handled as before (the handler raises as
    usual); a signal not asked for, SIG_IGN and SIG_DFL are left alone; the handlers found come back."""
    got = []

    def record(signum, frame):
        got.append(signum)
    old = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with signals_noted() as noted:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.raise_signal(s)
        assert noted == got == [signal.SIGTERM, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is record
        got.clear()
        with signals_noted((signal.SIGINT,)) as noted:
            assert signal.getsignal(signal.SIGTERM) is record and signal.getsignal(signal.SIGINT).follows is record
            signal.raise_signal(signal.SIGTERM)
        assert (noted, got) == ([], [signal.SIGTERM])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt), signals_noted() as noted:
            signal.raise_signal(signal.SIGINT)
        assert noted == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with signals_noted() as noted:
            assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.SIG_IGN,
                                                                                           signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)  # ignored: not a stop
        assert noted == []
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_signals_noted_off_the_main_thread_changes_nothing():
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with signals_noted() as noted:
            seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), noted))
    assert _in_a_thread(body) == [] and seen == [(*handlers, [])]


def _turned_into(error: BaseException, signum: int):
    """A run whose library (C code that checks for signals) turns the exception that the signal's
    handler raised inside it into an error of its own."""
    def run(_):
        try:
            signal.raise_signal(signum)
        except KeyboardInterrupt:
            raise error from None
        pytest.fail("no handler raised")
    return run


def test_run_cli_ctrl_c_that_a_library_turns_into_its_own_error_still_ends_as_interrupted(capsys):
    """Ctrl-C inside safetensors' reading came out as "truncated or not a safetensors file", said as
    an error with exit 2: the run was stopped, not given a bad file. As with SIGTERM, 130 and the
    stop line; a caller's (interrupted=None) gets the KeyboardInterrupt."""
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run = _turned_into(OSError("x.safetensors: truncated or not a safetensors file"), signal.SIGINT)
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,), "interrupted; rerun") == 130
        assert capsys.readouterr().err == "p.py: interrupted; rerun\n"
        with pytest.raises(KeyboardInterrupt) as e:
            run_cli("p.py", run, argparse.Namespace(), (OSError,), interrupted=None)
        assert type(e.value) is KeyboardInterrupt and capsys.readouterr().err == ""
        # without a stop signal the same error is an error; and an earlier run's Ctrl-C is not this one's
        assert run_cli("p.py", lambda _: (_ for _ in ()).throw(OSError("x: bad")), argparse.Namespace(),
                       (OSError,)) == 2
        assert capsys.readouterr().err == "p.py: error: x: bad\n"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_run_cli_sigterm_turned_into_an_error_is_terminated_even_after_a_ctrl_c(capsys):
    """Both came: SIGTERM's 143 wins (a scheduler's stop), as for a raised Terminated."""
    before = signal.getsignal(signal.SIGINT)

    def run(_):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # a run that went on after a first Ctrl-C (say, cleaning up)
        return _turned_into(OSError("cut short"), signal.SIGTERM)(_)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,), "interrupted; rerun") == 143
        assert capsys.readouterr().err == "p.py: terminated (SIGTERM); rerun\n"
        with pytest.raises(Terminated):
            run_cli("p.py", run, argparse.Namespace(), (OSError,), interrupted=None)
    finally:
        signal.signal(signal.SIGINT, before)


def test_run_cli_without_sigterm_leaves_a_sigterm_before_an_error_to_the_run(capsys):
    """sigterm=False (training: Lightning's SIGTERM): a SIGTERM the run's own handler took does not
    turn a later error into a stop; SIGTERM's handler is not even wrapped."""
    def own(signum, frame):
        raise KeyboardInterrupt
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, own)
        run = _turned_into(OSError("disk full at step 3"), signal.SIGTERM)
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,), sigterm=False) == 2
        assert capsys.readouterr().err == "p.py: error: disk full at step 3\n"
    finally:
        signal.signal(signal.SIGTERM, before)


class _SignalsWhenFreed:
    """Stands for what a stopped run held (a loaded model): as it is freed, once run_cli has said how
    the run ended, a second Ctrl-C or SIGTERM comes (`signum`); records the handlers found then."""

    def __init__(self, signum, seen: list):
        self.signum, self.seen = signum, seen

    def __del__(self):
        self.seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("first, status, line", [
    (KeyboardInterrupt, 130, "p.py: interrupted"),
    (Terminated, 143, "p.py: terminated (SIGTERM)"),
    (lambda: OSError("x.safetensors: bad"), 2, "p.py: error: x.safetensors: bad"),
])
def test_a_signal_while_the_ended_run_is_let_go_of_changes_nothing(capsys, monkeypatch, first, second, status, line):
    """The run's objects, held by its exception, are freed as run_cli's except clause ends (a large
    model: a while). A second Ctrl-C or SIGTERM then came out of run_cli as a traceback (exit 1,
    "cliutil.Terminated" after "interrupted"), or as "Exception ignored in __del__": the line is said,
    the run is over, the signal has nothing left to stop. The handlers are back afterwards."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []

    def run(_):
        held = _SignalsWhenFreed(second, seen)  # noqa: F841 (freed with this frame, as the exception goes)
        raise first()  # a new one: its traceback holds this frame
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,)) == status
        assert seen == [(signal.SIG_IGN, signal.SIG_IGN)] and not unraisable
        assert capsys.readouterr().err == line + "\n"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])


def test_run_cli_plain_ctrl_c_that_a_run_re_raises_with_where_it_stopped_stays_a_ctrl_c(capsys):
    """Ctrl-C is noted now as SIGTERM was: only a noted SIGTERM makes a stop Terminated (exit 143,
    "terminated (SIGTERM)"), not a noted Ctrl-C, whether the run re-raised it with its own line or
    not, and for a caller's run_cli (interrupted=None) too."""
    before = signal.getsignal(signal.SIGINT)

    def run(_):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("interrupted; 2 written: --frames 2: continues") from None
        pytest.fail("no handler raised")
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,)) == 130
        assert capsys.readouterr().err == "p.py: interrupted; 2 written: --frames 2: continues\n"
        assert run_cli("p.py", lambda _: signal.raise_signal(signal.SIGINT), argparse.Namespace(), (OSError,)) == 130
        assert capsys.readouterr().err == "p.py: interrupted\n"
        with pytest.raises(KeyboardInterrupt) as e:
            run_cli("p.py", run, argparse.Namespace(), (OSError,), interrupted=None)
        assert type(e.value) is KeyboardInterrupt and e.value.args == ("interrupted; 2 written: --frames 2: continues",)
    finally:
        signal.signal(signal.SIGINT, before)


def test_run_cli_stop_turned_into_an_error_is_raised_for_a_caller_without_that_error_as_context():
    """interrupted=None: the caller's KeyboardInterrupt (or Terminated) does not carry the library's
    error as its context (a traceback's "During handling of the above exception, OSError ...")."""
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum, kind in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)):
            with pytest.raises(KeyboardInterrupt) as e:
                run_cli("p.py", _turned_into(OSError("cut short"), signum), argparse.Namespace(), (OSError,),
                        interrupted=None)
            assert type(e.value) is kind and e.value.__suppress_context__ is True
    finally:
        signal.signal(signal.SIGINT, before)


def test_run_cli_second_ctrl_c_as_a_stop_turned_into_an_error_is_said_is_no_traceback(capsys, monkeypatch):
    """The stop line of a Ctrl-C that a library turned into its own error is said with Ctrl-C
    ignored, as the line of a plain Ctrl-C is: a second one there escaped run_cli."""
    import cliutil

    say = cliutil._say

    def signal_then_say(line):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # to this thread: run at once
        say(line)
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run = _turned_into(OSError("x.safetensors: truncated or not a safetensors file"), signal.SIGINT)
        monkeypatch.setattr(cliutil, "_say", signal_then_say)
        try:
            rc = run_cli("p.py", run, argparse.Namespace(), (OSError,), "interrupted; rerun")
        except KeyboardInterrupt:
            pytest.fail("the second Ctrl-C escaped run_cli")
        assert rc == 130 and capsys.readouterr().err == "p.py: interrupted; rerun\n"
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_ignore_stop_signals_keeps_them_ignored_until_run_cli_returns(capsys, second):
    """A run that has worked out its stop line raises it next; a second Ctrl-C or SIGTERM after that
    was worked out but before run_cli said it (ignored for a block that ended before) replaced it
    with a bare KeyboardInterrupt: "interrupted before any output was written", where outputs were.
    They stay ignored until run_cli returns and puts the handlers back."""
    seen = []

    def run(_):
        try:
            raise KeyboardInterrupt  # the first
        except KeyboardInterrupt:
            ignore_stop_signals()
            line = "interrupted; the 2 outputs written so far are complete: --frames 2: continues"
            seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
            signal.pthread_kill(threading.main_thread().ident, second)  # to this thread: run at once
            raise KeyboardInterrupt(line) from None
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    try:
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,)) == 130
        assert seen == [(signal.SIG_IGN, signal.SIG_IGN)]
        assert capsys.readouterr().err == ("p.py: interrupted; the 2 outputs written so far are complete: "
                                           "--frames 2: continues\n")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])


def test_signals_noted_leaves_a_handler_set_inside_the_block():
    """One set inside on purpose (ignore_stop_signals' SIG_IGN, which run_cli puts back) is not overwritten."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with signals_noted():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_a_complete_run_is_let_go_of_changes_nothing(capsys, monkeypatch, signum):
    """A run that is complete calls ignore_stop_signals: a Ctrl-C or SIGTERM as its objects
    are freed (its frame, as it returns: a model, a while) or before run_cli returns has nothing left
    to stop; it came out as "interrupted before any output was written", exit 130, or as "Exception
    ignored in __del__". The handlers are back afterwards."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    seen = []

    def run(_):
        held = _SignalsWhenFreed(signum, seen)  # noqa: F841 (freed as this returns)
        ignore_stop_signals()
        print("wrote it")
        return 0
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    try:
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,)) == 0
        assert seen == [(signal.SIG_IGN, signal.SIG_IGN)] and not unraisable
        assert capsys.readouterr() == ("wrote it\n", "")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_a_run_returns_is_not_a_stop(capsys, monkeypatch, signum):
    """A run that returned (its work done, its line said) without ignoring the signals itself: run_cli
    ignores them as it returns (a line before that is unavoidably live), and a Ctrl-C or SIGTERM from
    then until run_cli puts the handlers back has nothing to stop; it ended the run with run_cli's
    stop line, exit 130 or 143. It comes at each line of that span in turn (a trace function), as
    its handler runs it: at once, in this thread."""
    import cliutil

    sweep = SignalAtLine(signum)
    put_back, ignore = cliutil._put_back, cliutil.ignore_stop_signals

    def stop_tracing_then_put_back(handlers):
        sweep.stop()
        put_back(handlers)

    def ignore_then_trace():
        ignore()
        sweep.start(sys._getframe(1))  # the frames it returns to
    monkeypatch.setattr(cliutil, "_put_back", stop_tracing_then_put_back)
    monkeypatch.setattr(cliutil, "ignore_stop_signals", ignore_then_trace)

    def run(_):
        print("wrote it")
        return 0
    before = signal.getsignal(signal.SIGTERM)
    for at in range(1, 200):
        sweep.reset(at)
        try:
            rc = run_cli("p.py", run, argparse.Namespace(), (OSError,))
        except KeyboardInterrupt:
            pytest.fail(f"the signal, at line {at}, escaped run_cli")
        finally:
            sweep.stop()
        assert (rc, capsys.readouterr()) == (0, ("wrote it\n", "")), at
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == before
        if not sweep.sent:  # each line up to run_cli's putting the handlers back tried
            break
    assert at > 1


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("part", ["set-up", "end"])
def test_signals_deferred_a_signal_as_it_sets_itself_up_or_ends_leaves_nothing_blocked(part, signum):
    """A signal that another thread took (one not blocking it) runs the main thread's handler at
    once, whatever the mask. As signals_deferred set itself up, one between the block and the
    handlers' swap raised out of the set-up; as it ended, one once a handler was back, before the
    mask was, raised out of the clean-up. Either left SIGINT and SIGTERM blocked in the main thread
    for good (every process started afterwards inherits the mask: a SIGTERM would never reach it)
    and a clean-up undone (a hidden .v.*.tmp.mp4 left by write_video_atomic). Sent at each line of
    the part in turn (as interrupt_main does: the handler's flag), it stops before the block or at
    its end, never lost, and leaves the mask as it was and both signals stopping the run (after
    the set-up, the very handlers it found)."""
    import _thread

    def stop(s, frame):
        raise KeyboardInterrupt
    code = signals_deferred.__wrapped__.__code__
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        for at in range(1, 100):
            state = {"lines": 0, "sent": False}

            def tracer(frame, event, arg):
                if event == "line" and frame.f_code is code:
                    state["lines"] += 1
                    if state["lines"] == at:
                        state["sent"] = True
                        _thread.interrupt_main(signum)
                return tracer
            stopped = False
            if part == "set-up":
                sys.settrace(tracer)
            try:
                with signals_deferred():
                    sys.settrace(None if part == "set-up" else tracer)
            except KeyboardInterrupt:
                stopped = True
            finally:
                sys.settrace(None)
            assert stopped == state["sent"], at  # never lost
            assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask, at
            if part == "set-up":
                assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is stop, at
            for s in (signal.SIGINT, signal.SIGTERM):  # each still stops the run
                with pytest.raises(KeyboardInterrupt):
                    _thread.interrupt_main(s)
                    time.sleep(0.01)
            if not state["sent"]:
                break
        assert at > 3
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def installed(monkeypatch, versions: dict[str, str | None], cv2_version: str | None = None):
    """importlib.metadata as if `versions` were installed (and nothing else); cv2 importable at
    `cv2_version` (None: `import cv2` fails, so the distributions' versions decide)."""
    import importlib.metadata as metadata

    def version(dist):
        if dist not in versions:
            raise metadata.PackageNotFoundError(dist)
        return versions[dist]
    monkeypatch.setattr(metadata, "version", version)
    if cv2_version is None:
        monkeypatch.setitem(sys.modules, "cv2", None)
    else:
        monkeypatch.setitem(sys.modules, "cv2", type("cv2", (), {"__version__": cv2_version}))


def test_releases_known_to_break_the_project_are_named_in_one_line(monkeypatch):
    """PyAV 13 failed with an AttributeError after a whole clip was colourised, open_clip 2.20
    at building the model, a pytorch_lightning-only install at the training script's start, and
    OpenCV 4.10 read a truncated JPEG as a frame without a word (dependency audit)."""
    from cliutil import dependency_problem

    fix = "pip install -r requirements.txt"
    installed(monkeypatch, {"av": "13.1.0", "open_clip_torch": "2.20.0", "lightning": "2.6.6",
                            "opencv-python-headless": "4.10.0.84"})
    assert dependency_problem(["av"]) == ("av 13.1.0 is older than 15, the least this needs (12 to 14 lack the "
                                          f"stream details reading a video and --video's sound use): {fix}")
    assert dependency_problem(["lightning", "open_clip"]).startswith("open_clip_torch 2.20.0 is older than 2.23,")
    assert dependency_problem(["opencv"]).startswith("opencv-python-headless 4.10.0.84 is older than 4.11,")
    installed(monkeypatch, {"opencv-python-headless": "4.10.0.84"}, cv2_version="5.0.0")  # the one imported decides
    assert dependency_problem(["opencv", "av", "open_clip"]) is None  # absent: left to the code that imports it
    installed(monkeypatch, {"opencv-python": "5.0.0.93"}, cv2_version="4.10.0")  # of two installed, the old loads
    assert dependency_problem(["opencv"]).startswith("opencv 4.10.0 is older than 4.11,")
    installed(monkeypatch, {"av": None, "lightning": None})  # a .dist-info left without METADATA: not known
    assert dependency_problem(["av"]) is None
    assert dependency_problem(["lightning"]) == ("the lightning package is not installed (pytorch_lightning alone is "
                                                 f"not what this imports): {fix}")
    installed(monkeypatch, {"av": "15.0.0", "open_clip_torch": "2.23.0", "lightning": "2.1.0rc1"}, cv2_version="4.11.0")
    assert dependency_problem(["opencv", "av", "open_clip", "lightning"]) is None  # the least that work
    installed(monkeypatch, {"lightning": "2.0.9"})
    assert dependency_problem(["lightning"]).startswith("lightning 2.0.9 is older than 2.1,")


def test_run_cli_refuses_a_breaking_release_before_the_run(monkeypatch, capsys):
    ran = []
    installed(monkeypatch, {"av": "12.3.0"}, cv2_version="5.0.0")
    assert run_cli("prog", ran.append, argparse.Namespace(), (ValueError,), needs=("opencv", "av")) == 2
    assert ran == [] and capsys.readouterr().err.startswith("prog: error: av 12.3.0 is older than 15, ")
    assert run_cli("prog", lambda a: ran.append(a) or 0, argparse.Namespace(), (ValueError,), needs=("opencv",)) == 0
    assert len(ran) == 1


@pytest.mark.parametrize("script, needs", [
    ("build_pairs.py", {"opencv", "av"}), ("build_latent_cache.py", {"opencv"}),
    ("colorize_inference.py", {"opencv", "av", "open_clip"}), ("evaluate.py", {"opencv"}),
    ("demo.py", {"opencv", "av", "open_clip"}), ("tool_add_control_sd21.py", {"open_clip"}),
    ("cldm/checkpoint_cli.py", {"open_clip"}),
    ("tutorial_train_sd21_color_v2.py", {"opencv", "av", "open_clip", "lightning"}),
])
def test_each_script_names_what_it_needs(script, needs):
    """Read from the source: each run_cli call's needs= (the training script's first, which runs
    before anything is prepared)."""
    import ast

    calls = [node for node in ast.walk(ast.parse((REPO / script).read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_cli"]
    given = [{e.value for e in kw.value.elts} for node in calls for kw in node.keywords if kw.arg == "needs"]
    assert given == [needs]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP")
def test_a_hangup_stops_the_run_as_sigterm_does(capsys, tmp_path):
    """The terminal closed (an ssh session dropped without nohup): SIGHUP's default ended a run
    at once, leaving temporary files and locks (unattended-run audit). Taken as SIGTERM, its
    clean-up runs; under nohup (SIGHUP ignored) nothing changes; the handler is put back."""
    tmp = tmp_path / "out.tmp"

    def run(_):
        tmp.write_bytes(b"half")
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the passed-on SIGTERM interrupts this
        finally:
            tmp.unlink()
        return 0

    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        assert run_cli("p.py", run, argparse.Namespace(), (OSError,), "interrupted; rerun") == 143
        assert capsys.readouterr().err == "p.py: terminated (SIGTERM); rerun\n"
        assert not tmp.exists() and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        seen = []
        assert run_cli("p.py", lambda _: seen.append(signal.getsignal(signal.SIGHUP)) or 0, argparse.Namespace(),
                       (OSError,)) == 0
        assert seen == [signal.SIG_IGN]
    finally:
        signal.signal(signal.SIGHUP, before)
    code = ("import os, signal, time\nfrom cliutil import quiet_startup_signals\nquiet_startup_signals('p.py')\n"
            "os.kill(os.getpid(), signal.SIGHUP)\ntime.sleep(5)\n")  # while the imports load
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (143, "p.py: terminated (SIGTERM)\n")


def test_progress_bars_update_every_30_s_in_a_log_and_not_at_all_without_stderr(monkeypatch):
    import io
    import pty

    from cliutil import LOG_BAR_INTERVAL, bar_options

    assert LOG_BAR_INTERVAL == 30.0
    assert bar_options(io.StringIO()) == {"disable": False, "mininterval": 30.0}  # a log file, a pipe
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert bar_options(terminal) == {"disable": False, "mininterval": 0.1}  # tqdm's own
    os.close(leader)
    assert bar_options(io.StringIO(), disable=True)["disable"] is True
    monkeypatch.setattr(sys, "stderr", None)  # started with stderr closed (2>&-)
    assert bar_options() == {"disable": True, "mininterval": 30.0}
    from cliutil import is_terminal
    assert not is_terminal() and not is_terminal(io.StringIO())


@pytest.mark.parametrize("script", ["build_pairs.py", "build_latent_cache.py", "tool_add_control_sd21.py",
                                    "tutorial_train_sd21_color_v2.py", "colorize_inference.py", "evaluate.py",
                                    "demo.py", "-m cldm.checkpoint"])
def test_every_scripts_help_gives_its_exit_statuses(script):
    """Schedulers and shell scripts branch on the exit status: each script's --help says what
    0, 2, 130 and 143 mean, not only the docs."""
    command = script.split() if script.startswith("-m") else [str(REPO / script)]
    res = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    text = " ".join(res.stdout.split())
    assert res.returncode == 0 and "Exit status: 0 " in text, text[-400:]
    assert all(code in text for code in (" 2 ", "130", "143")), text[-400:]
