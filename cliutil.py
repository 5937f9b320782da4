"""What every command-line script here shares: bad input reported as one line, never a traceback.

Usage errors name what is wrong and where, end with "(see --help)" and exit 2; `run_cli` turns
the errors a script expects into the same one line and exit 2, Ctrl-C into exit 130, and a
reader of stdout or stderr that stops early (`| head`) into a quiet exit 141.
"""
from __future__ import annotations

import argparse
import atexit
import errno
import importlib.metadata
import math
import os
import re
import select
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence


# argparse types for counts and rates: a bad value is argparse's one line, not a traceback later
def _number(kind: type, low: float, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type by it
    return parse


positive_int = _number(int, 0, True, "an integer >= 1")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0, True, "a number > 0")


def not_utf8(path: str | os.PathLike) -> bool:
    """Whether `path` is not UTF-8 (a name Python read into surrogate escapes): OpenCV's binding
    crashes on one, safetensors refuses it with a message that misleads."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


MAX_SEED = 2**64 - 1  # torch.manual_seed's range


def seed_arg(text: str) -> int:
    """argparse type of a --seed that goes to torch.manual_seed: one outside its range is refused
    while parsing, naming the flag (torch's own "Overflow when unpacking long long" names none)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED} (got {text})")
    return seed


def path_arg(text: str) -> str:
    """argparse type of every path flag: an empty one (`--out "$OUT"` with OUT unset) is refused
    while parsing, naming the flag. Taken as given it is the current folder: outputs written
    there, or an error blaming a file in it ("./requirements.txt: not an image file")."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return text


def config_override(text: str) -> str:
    """argparse type of a `key=value` config override: one without '=', or without a key (or with
    a space in it), is refused while parsing, so the message names the flag or argument it came to
    (load_config's own could not)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override must look like key=value, got {text!r}")
    key = text.split("=", 1)[0]
    if not key.strip():  # else omegaconf's "Key '' is not in struct", once the config loads
        raise argparse.ArgumentTypeError(f"override {text!r} has no key before '=' (e.g. model.color_variant=v3)")
    if any(c.isspace() for c in key):
        raise argparse.ArgumentTypeError(f"override {text!r}: the key has a space; write key=value with a dotted key "
                                         "and no spaces before '='")
    return text


NOT_REGULAR = "not a regular file (a named pipe, socket or device)"
NOT_FOLDER = "not a folder (a named pipe, socket or device)"


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be (or become) a folder: it, or a folder above it, is a file or a broken
    symbolic link (dangling, or a loop); else None. Checked before any work, so the error is not a raw
    "[Errno 20] Not a directory" (or "[Errno 17] File exists") minutes in."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        if os.path.islink(path):
            return f"{path} is a broken symbolic link"
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else f"{path} is {not_a_folder(path)}"


def not_a_folder(path: str | os.PathLike) -> str:
    """What an existing `path` that is no folder is, said as such: a regular file, or NOT_FOLDER."""
    return "a file, not a folder" if os.path.isfile(path) else NOT_FOLDER


def out_folder_problem(flag: str, path: str | os.PathLike) -> str | None:
    """Why the output folder given as `flag` cannot take the outputs, in one line: folder_problem
    ("--out X is a file, not a folder" when X itself is in the way, "--out X/sub: X is a file, not
    a folder" for one above it), else not_writable ("--out X: Y is not writable"); None if it can."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path} is {not_a_folder(path)}"
    return _unusable_folder(f"{flag} {path}", path)


def out_file_problem(flag: str | None, path: str | os.PathLike, *, new_folders: bool = True) -> str | None:
    """Why the output file given as `flag` (None: a positional argument, named by its path alone)
    cannot be written at `path`, in one line: a folder there, a named pipe, socket or device there
    (as root, /dev/null was replaced by the output), a file or broken link in the way of its folder
    (folder_problem), a folder that does not exist (with `new_folders=False`: the
    caller makes none), or one that refuses writes (not_writable); None if it can be written."""
    said = str(path) if flag is None else f"{flag} {path}"
    if os.path.isdir(path):
        return f"{said} is a folder"
    if os.path.exists(path) and not os.path.isfile(path):  # the rename of a finished output would replace it
        return f"{said}: {NOT_REGULAR}, which the output would replace; give the name of a file"
    return _unusable_folder(said, os.path.dirname(os.path.abspath(path)), must_exist=not new_folders)


def _unusable_folder(said: str, folder: str | os.PathLike, must_exist: bool = False) -> str | None:
    """Why `folder` cannot be (or become, unless `must_exist`) a folder to write in, as
    `said` + ": " + the reason; None when it can."""
    if problem := folder_problem(folder):
        return f"{said}: {problem}"
    if must_exist and not os.path.isdir(folder):
        return f"{said}: there is no folder {folder}"
    if (unwritable := not_writable(folder)) is not None:
        return f"{said}: {unwritable} is not writable"
    return None


def file_problem(path: str | os.PathLike, missing: str = "no such file", folder: str = "is a folder") -> str | None:
    """Why `path` is not an input file to read: `missing`, `folder`, or NOT_REGULAR for what exists
    but is neither (a named pipe would block its reader for ever, and "no such file" is untrue);
    None for a regular file (through a symbolic link too). Looks only, opens nothing."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return folder
    return NOT_REGULAR if path.exists() else missing


def not_writable(folder: str | os.PathLike) -> str | None:
    """The folder, `folder` or the nearest one above it that exists, in which it (or a file in it) cannot
    be made (no write permission, a read-only file system); None if it can. For outputs checked before
    the work: else the error comes at the end of it, or names a temporary file the user never gave."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return None if os.access(folder, os.W_OK | os.X_OK) else folder


def quiet_opencv() -> None:
    """Bad input is reported by us in one line: silence OpenCV's and FFmpeg's own console noise
    (FFmpeg's "moov atom not found", OpenCV's "[ERROR:0@0.01] ... TIFF_Error" for a truncated
    TIFF, before our message); every OpenCV call here is checked by its result. Call before cv2
    is imported; an explicit setting in the environment wins (OPENCV_LOG_LEVEL=ERROR shows
    OpenCV's reasons again)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")


def quiet_startup_signals(prog: str | None = None) -> None:
    """Ctrl-C or SIGTERM before run_cli takes over - while torch, OpenCV or Lightning load,
    seconds - ends the script with "PROG: interrupted" and exit 130, or "PROG: terminated
    (SIGTERM)" and exit 143 as run_cli reports them later, not an import traceback or a silent
    end by the signal. For scripts, at the top, when run as __main__; nothing is written yet, so
    there is nothing to clean up. run_cli puts the usual handlers back. `prog`: the name run_cli
    will say, where it is not the script's file name (`python -m cldm.checkpoint`)."""
    prog = prog or os.path.basename(sys.argv[0])

    def startup(message: str, status: int):
        def handler(signum, frame):
            try:
                os.write(2, f"{prog}: {message}\n".encode())
            except OSError:  # stderr's reader has gone: raised here, it would stop the import, not end us
                pass
            os._exit(status)

        handler.quiet_startup = True
        return handler

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # else ignored: a background job
        signal.signal(signal.SIGINT, startup("interrupted", 130))
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # else ignored, or a handler of the caller's
        signal.signal(signal.SIGTERM, startup("terminated (SIGTERM)", 128 + int(signal.SIGTERM)))
        hangup_as_sigterm()


def hangup_as_sigterm() -> None:
    """A hangup (the terminal closed, an ssh session dropped without nohup) is taken as SIGTERM,
    so the same clean-up runs and says so: SIGHUP's default ended a run at once, leaving temporary
    files and locks. Passed on as a SIGTERM to this process, which a run holding SIGTERM (while
    it renames files into place) gets when it lets go. Not where SIGHUP is ignored (nohup) or
    handled already, nor where there is none (Windows)."""
    hup = getattr(signal, "SIGHUP", None)
    if hup is not None and signal.getsignal(hup) is signal.SIG_DFL:
        signal.signal(hup, _pass_on_hangup)


def _pass_on_hangup(signum, frame) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def exit_quietly(status: int) -> None:
    """sys.exit(status) for a script run as __main__, where Ctrl-C or SIGTERM during the
    interpreter's teardown (about a second of torch's exit hooks) ends the process at once with
    that status: the run is over and has said how it ended, so the signal has nothing left to
    stop, and Python would print an "Exception ignored in atexit callback" traceback instead.
    After the exit hooks (_after_exit_hooks) the signals are ignored: the process ends a moment
    later with that status, not killed by the signal."""
    def handler(signum, frame):
        os._exit(status)

    handler.exit_quietly = True
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):  # ignored (a background job) stays so
            signal.signal(signum, handler)
    sys.exit(status)


@atexit.register  # at import, before torch's: exit hooks run last registered first, so this one after them
def _after_exit_hooks() -> None:
    """After the exit hooks Python puts the signals' default action back for the rest of its
    teardown (freeing the modules: half a second with torch loaded), where Ctrl-C or SIGTERM
    would end the process by the signal, not with the status exit_quietly was given: ignore them."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if getattr(signal.getsignal(signum), "exit_quietly", False):
            signal.signal(signum, signal.SIG_IGN)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what and where), not the whole usage block."""

    def parse_known_args(self, args=None, namespace=None):
        """A value that starts with '-' and a digit ("--frames -1:", "--shard -1/4") goes to its
        flag, as a plain negative number does: no flag here looks like that, and argparse took it
        for an unknown flag ("expected one argument"), so the flag's own check never said what is
        wrong with it (or that "=" joins it: "--frames=-1:")."""
        args = list(sys.argv[1:] if args is None else args)
        joined = []
        for i, arg in enumerate(args):
            if arg == "--":  # what follows is positional as it is
                joined += args[i:]
                break
            action = self._flag_action(joined[-1]) if joined else None
            if (action is not None and action.nargs is None and re.match(r"-\.?\d", arg)
                    and arg not in self._option_string_actions):
                joined[-1] = f"{joined[-1]}={arg}"
            else:
                joined.append(arg)
        return super().parse_known_args(joined, namespace)

    def _flag_action(self, arg: str) -> argparse.Action | None:
        """The action of the flag `arg` names in full or, as argparse takes it, by the start of one
        long option alone ("--fra" for "--frames"); None for anything else. Where argparse would
        find two options, or takes no abbreviations (allow_abbrev=False), nothing is joined and
        argparse says what it says of the flag."""
        if arg in self._option_string_actions:
            return self._option_string_actions[arg]
        long = len(arg) > 2 and arg[0] in self.prefix_chars and arg[1] in self.prefix_chars
        if not (long and self.allow_abbrev) or "=" in arg:
            return None
        started = [s for s in self._option_string_actions if s.startswith(arg)]
        return self._option_string_actions[started[0]] if len(started) == 1 else None

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        # `is`: a default of 0 is worth showing, though 0 == False
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def one_line(e: BaseException, with_type: bool = False) -> str:
    """The first non-empty line of str(e), after "TypeName: " with `with_type`; for an exception
    without a message, such as a bare OSError(), its type name alone, so an error line never
    ends empty (or in an IndexError)."""
    for line in str(e).splitlines():
        if line.strip():
            return f"{type(e).__name__}: {line.strip()}" if with_type else line.strip()
    return type(e).__name__


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a library saying memory ran out: Python's MemoryError (numpy's too), torch's
    OutOfMemoryError (CUDA) or its CPU allocator's RuntimeError, OpenCV's "Insufficient memory".
    The libraries are looked up, not imported: an error of theirs means they are loaded."""
    if isinstance(e, MemoryError):
        return True
    torch, cv2 = sys.modules.get("torch"), sys.modules.get("cv2")
    return (torch is not None and isinstance(e, torch.OutOfMemoryError)) or \
        (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)) or \
        (cv2 is not None and isinstance(e, cv2.error) and "Insufficient memory" in str(e))


LOG_BAR_INTERVAL = 30.0  # s between a progress bar's updates written to a file or pipe, not a terminal


def is_terminal(stream=None) -> bool:
    """Whether `stream` (default stderr) is a terminal: False where it is None (started closed,
    `2>&-`, where `sys.stderr.isatty()` raised AttributeError) or closed since."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def bar_options(file=None, disable: bool = False) -> dict:
    """tqdm's `disable` and `mininterval` for a progress bar on `file` (default stderr): off where
    it is closed (tqdm wrote to None: a run ended with exit 1 and not a word), and where it is no
    terminal (a log file under a scheduler, `> log 2>&1`) an update every LOG_BAR_INTERVAL s, not
    10 a second (an hour's run wrote megabytes of carriage returns)."""
    file = sys.stderr if file is None else file
    return {"disable": disable or file is None, "mininterval": 0.1 if is_terminal(file) else LOG_BAR_INTERVAL}


def too_many_files(where: str, lower: str) -> str:
    """The line for a process out of file descriptors (EMFILE), with its limit and the flag of
    the processes (or files) to have fewer of."""
    try:
        import resource
        held = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # not POSIX
        return f"too many open files {where}: raise the limit (ulimit -n) or lower {lower}"
    more = 4096 if 0 <= held < 2048 else 2 * held  # RLIM_INFINITY is -1
    return (f"too many open files (this process may hold {held}: `ulimit -n`) {where}: raise the limit "
            f"(ulimit -n {more}) or lower {lower}")


def too_many_files_error(e: BaseException) -> bool:
    """Whether `e` says the process ran out of file descriptors (EMFILE, or its text in a data
    loader's error); not the system-wide limit (ENFILE, "... in system"), which no ulimit raises."""
    text = str(e)
    return getattr(e, "errno", None) == errno.EMFILE or ("Too many open files" in text and "in system" not in text)


def _reader_gone(stream) -> bool:
    """Whether `stream` (stdout, stderr) is a pipe whose reader has gone (`| head` that read
    enough): poll() reports an error on it. Any other broken pipe is a real error."""
    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no such stream (None, pytest's capture), or no poll()
        return False


def _to_devnull(stream) -> None:
    """Writes to `stream`, whose reader has gone, go nowhere from now on: else the next one, or
    the flush at exit, raises again ("Exception ignored ...", exit status 120)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, stream.fileno())
    os.close(null)


def _say(line: str) -> None:
    """`line` on stderr, or nowhere where stderr's reader has gone (`2>&1 >/dev/null | head -c1`):
    the exit status still says how the run ended, where a traceback would have made it 1."""
    try:
        print(line, file=sys.stderr)
    except BrokenPipeError:
        if not _reader_gone(sys.stderr):
            raise
        _to_devnull(sys.stderr)


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM for the duration (they are delivered afterwards, not lost).

    annotator/build_many.py holds them while starting a worker - which inherits the mask, so it
    starts with both blocked until it has set itself up (no traceback from a half-started worker;
    the parent alone stops the run) - and while stopping the workers, so a second Ctrl-C cannot
    cut the clean-up short; colorize/outputs.py between an output's rename and its count;
    colorize/frames_io.py while write_video_atomic's clean-up releases the writer and removes
    its temporary file.

    Blocking them in this thread is not enough: the kernel hands a signal to any thread that
    does not block it (numpy's BLAS pool, tqdm's monitor), and Python runs the handler in the
    main thread all the same. So the main thread's handlers only note them meanwhile. (Setting
    SIGINT to SIG_IGN here instead, as this once did for the worker's sake, lost a Ctrl-C that
    such a thread took: an ignored signal is dropped, not held.)
    """
    main = threading.current_thread() is threading.main_thread()
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    noted: list[int] = []
    holding = True
    old_handlers, old_mask = {}, None

    def note(signum, frame):
        if holding:
            noted.append(signum)
        else:  # the block is over: act as the handler it replaced (left in place where another signal
            # raised as they were put back)
            old_handlers[signum](signum, frame)

    try:  # handlers first, then the mask, inside the try: a signal another thread took meanwhile runs
        # the main thread's handler at once, and one that raised out of here left the mask blocked
        if main:
            for signum in HELD_SIGNALS:
                if callable(handler := signal.getsignal(signum)):  # a Python handler (not SIG_IGN or SIG_DFL,
                    # nor one set outside Python)
                    old_handlers[signum] = handler
                    signal.signal(signum, note)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        yield
    finally:  # the mask first, while the signals are only noted: nothing can raise before it is back
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        holding = False
        for signum, old in old_handlers.items():
            signal.signal(signum, old)
        for signum in noted:
            signal.raise_signal(signum)  # to the handler restored above


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM from here until run_cli returns, which puts back the handlers it
    found. For a run inside run_cli that is complete, or has worked out the line its stop ends with
    (the KeyboardInterrupt it raises next carries it): a second Ctrl-C or SIGTERM has nothing left
    to stop, but came out as a traceback, or replaced that exception with a bare one, so run_cli
    said its own line ("interrupted before any output was written" where outputs were). Ignored,
    not held: the kernel drops it whichever thread it comes to, so none is run late. Until run_cli
    returns, not to the end of a block: the run's objects, held by its exception or its frame, are
    freed as run_cli's except clause ends or the run returns (a large model: a while), and a
    signal meanwhile was a traceback. Main thread only (elsewhere a no-op: handlers are its)."""
    if threading.current_thread() is threading.main_thread():
        for signum in HELD_SIGNALS:
            if signal.getsignal(signum) is not None:  # None: set outside Python, which could not be put back
                signal.signal(signum, signal.SIG_IGN)


@contextmanager
def signals_noted(signums: tuple[int, ...] = HELD_SIGNALS):
    """Yield a list that gains each of `signums` (SIGINT, SIGTERM) that comes during the block, handled as
    before (its handler raises as usual): for a caller that must tell a stop from an error, where
    a library's C code turns the KeyboardInterrupt raised inside it into an error of its own
    (safetensors reading a checkpoint: "truncated or not a safetensors file"). Only Python
    handlers are followed (SIG_DFL and SIG_IGN are left alone); main thread only (elsewhere the
    list stays empty)."""
    noted: list[int] = []
    old, mine = {}, {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            handler = signal.getsignal(signum)
            if callable(handler):
                def noting(s, frame, handler=handler):
                    noted.append(s)
                    handler(s, frame)

                noting.follows = handler
                old[signum] = signal.signal(signum, noting)
                mine[signum] = noting
    try:
        yield noted
    finally:
        for signum, handler in old.items():
            if signal.getsignal(signum) is mine[signum]:  # else set inside the block on purpose (SIG_IGN by
                signal.signal(signum, handler)  # ignore_stop_signals), for whoever set it to put back


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (run_cli's `sigterm`), so the same clean-up runs; a
    caller that sees a sub-tool's exit status 143 raises it to stop as terminated too."""


def _as_terminated(message: str) -> str:
    """A stop line for SIGTERM: "interrupted; ..." -> "terminated (SIGTERM); ...", anything else
    after it."""
    rest = message.removeprefix("interrupted")
    return "terminated (SIGTERM)" + (rest if rest != message else f"; {message}")


def _put_back(handlers: dict[int, object]) -> None:
    for signum, handler in handlers.items():
        if handler is not None:  # None: set outside Python
            signal.signal(signum, handler)


# Releases known to break this project, found by running it on older ones (README, "Versions"):
# {name: (the distributions that install it, the least release that works, what the older lack)}.
MINIMUM_VERSIONS = {
    "opencv": (("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                "opencv-contrib-python"), (4, 11), "4.10 decodes a truncated JPEG as a frame without a word"),
    "av": (("av",), (15,), "12 to 14 lack the stream details reading a video and --video's sound use"),
    "open_clip": (("open_clip_torch",), (2, 23), "older ones build no SD2.1 text encoder (no mlp_ratio)"),
    "lightning": (("lightning",), (2, 1), "2.0's ModelCheckpoint takes no enable_version_counter"),
}


def _release(text: str, parts: int) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:parts])


def dependency_problem(needs: Sequence[str]) -> str | None:
    """One line for the first package of `needs` (MINIMUM_VERSIONS' names) installed at a release
    known to break this project; they failed with a traceback after the run had started (PyAV
    13 at the end of a whole clip), or not at all (OpenCV 4.10). A package not installed is left
    to the code that imports it, except Lightning: pytorch_lightning alone looks like it."""
    for name in needs:
        dists, least, why = MINIMUM_VERSIONS[name]
        found = []
        if name == "opencv":  # the one imported, of the distributions installed (often several)
            try:
                import cv2
                found.append(("opencv", cv2.__version__))
            except ImportError:
                pass
        for dist in () if found else dists:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            if isinstance(version, str):  # None for a leftover .dist-info without METADATA: not known
                found.append((dist, version))
        if not found and name == "lightning":
            return ("the lightning package is not installed (pytorch_lightning alone is not what this imports): "
                    "pip install -r requirements.txt")
        if found and _release(found[0][1], len(least)) < least:  # the imported cv2, else the first installed
            dist, version = found[0]
            return (f"{dist} {version} is older than {'.'.join(map(str, least))}, the least this needs ({why}): "
                    "pip install -r requirements.txt")
    return None


def run_cli(prog: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
            errors: tuple[type[BaseException], ...], interrupted: str | None = "interrupted",
            named: tuple[type[BaseException], ...] = (), sigterm: bool = True, needs: Sequence[str] = ()) -> int:
    """`run(args)`, with `errors` printed as "PROG: error: <first line>" (exit 2) and Ctrl-C as exit 130.

    `needs`: MINIMUM_VERSIONS' names of the packages the run uses; one installed at a release
    known to break it is refused first, in one line (dependency_problem).

    `named`: further errors reported the same way but after their type name ("PROG: error:
    ConfigKeyError: ..."), for libraries whose messages do not say what kind of problem they are.
    `interrupted`: the message on Ctrl-C, unless the KeyboardInterrupt carries its own (a run that
    knows where it stopped re-raises one saying so); None re-raises it, for a tool run inside another
    (demo.py) that says itself how the stop ends.
    `sigterm`: stop on SIGTERM (kill, a job scheduler) as on Ctrl-C, so the same clean-up runs
    (temporary files removed), with exit status 143; False leaves SIGTERM to the run (Lightning's
    own handling while it trains).
    A reader of stdout that goes (`| head`) ends the process quietly, status 141, as SIGPIPE does; so
    does one of stderr met by the run (a progress bar), and the line of how it ended is dropped, not
    turned into a traceback, where stderr's reader has gone (`2>&1 >/dev/null | head -c1`).
    """
    if problem := dependency_problem(needs):
        _say(f"{prog}: error: {problem}")
        return 2

    def on_sigterm(signum, _frame):
        raise Terminated

    main = threading.current_thread() is threading.main_thread()  # signals are the main thread's
    hook = sigterm and main
    # From here on Ctrl-C cleans up, and SIGTERM is the default again unless `sigterm`: a startup
    # handler left in place would end a run without its clean-up, and inside Lightning's own
    # SIGTERM handler (which calls the one it finds) before the training stops at a checkpoint.
    for signum, usual in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if main and getattr(signal.getsignal(signum), "quiet_startup", False):
            signal.signal(signum, usual)
    found = {signum: signal.getsignal(signum) for signum in HELD_SIGNALS} if main else {}  # put back at the end
    if main and hasattr(signal, "SIGHUP"):
        found[signal.SIGHUP] = signal.getsignal(signal.SIGHUP)
        hangup_as_sigterm()  # SIGTERM's, whoever handles it (Lightning's while training)
    if hook:
        signal.signal(signal.SIGTERM, on_sigterm)
    received: list[int] = []  # the stop signals that came (signals_noted)
    try:
        try:
            with signals_noted(HELD_SIGNALS if hook else (signal.SIGINT,)) as received:  # SIGTERM: the run's
                status = run(args)
                ignore_stop_signals()  # the run is over: a signal now (as this block ends) was "interrupted
                # before any output was written", exit 130, after a complete run
            if sys.stdout is not None:  # None: started with stdout closed
                try:
                    sys.stdout.flush()  # where buffered output meets a reader that has gone
                except KeyboardInterrupt:  # the run is over and has said how it ended (its last line, if
                    pass  # cut off here, is flushed at exit): as exit_quietly, its status, no stop line
            return status
        except BrokenPipeError:
            gone = [stream for stream in (sys.stdout, sys.stderr) if _reader_gone(stream)]
            if not gone:
                raise
            # Python ignores SIGPIPE, so `| head` that has read enough ends us here: end as a
            # Unix tool does by that signal, quietly with 141 - whether the run was done (a
            # buffered report meets the pipe at the end) or not (a flushed print, mid-run) - and
            # the process too, so a tool calling another's main() stops with it. What is written
            # stays written; the unwinding run cleaned up what it had not finished. The same for
            # stderr's reader (a progress bar's line met it): no error line could reach anyone.
            for stream in gone:
                _to_devnull(stream)
            raise SystemExit(128 + int(signal.SIGPIPE)) from None
    except errors + named as e:
        if received:  # Ctrl-C's KeyboardInterrupt or SIGTERM's Terminated, raised inside a library's C
            # code (safetensors reading the checkpoint), came out as that library's error ("truncated or
            # not a safetensors file"): the run was stopped, not given bad input
            terminated = signal.SIGTERM in received
            if interrupted is None:
                raise (Terminated if terminated else KeyboardInterrupt) from None
            ignore_stop_signals()
            _say(f"{prog}: {_as_terminated(interrupted) if terminated else interrupted}")
            return 128 + int(signal.SIGTERM) if terminated else 130
        ignore_stop_signals()
        _say(f"{prog}: error: {one_line(e, with_type=not isinstance(e, errors))}")
        return 2
    except KeyboardInterrupt as e:
        if interrupted is None:
            if signal.SIGTERM in received and not isinstance(e, Terminated):  # a run re-raised it with where it stopped
                raise Terminated(*e.args) from None
            raise
        ignore_stop_signals()  # a second Ctrl-C as the line is said ended the run with a traceback
        message = one_line(e) if str(e).strip() else interrupted
        terminated = signal.SIGTERM in received or isinstance(e, Terminated)
        _say(f"{prog}: {_as_terminated(message) if terminated else message}")
        return 128 + int(signal.SIGTERM) if terminated else 130
    finally:
        _put_back(found)  # the run's exception, and all it held, is gone by now
