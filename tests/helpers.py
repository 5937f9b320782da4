"""Constants and small helpers shared by tests (importable, unlike conftest)."""
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tolerances the reference implementation itself meets between runs (tests/fixtures/README.md).
COMPONENT_TOL = dict(rtol=1e-4, atol=1e-5)
DDIM_TOL = dict(rtol=1e-3, atol=1e-4)


def sub_state(sd: dict, prefix: str) -> dict:
    """Keys under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def refused(main, argv, capsys) -> str:
    """The one stderr line of a CLI run that must stop before any work with exit 2 (argparse's
    usage errors exit, run_cli's return), without a traceback."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def missing_under(tmp_path, argv: list[str], says: str) -> tuple[list[str], str]:
    """`argv` and `says` with MISSING standing for a path under tmp_path that does not exist. Not
    /nonexistent: any run on the machine may make that (a --video written there, say), after
    which a test expecting a refusal runs the real work instead."""
    missing = str(tmp_path / "missing")
    return [a.replace("MISSING", missing) for a in argv], says.replace("MISSING", missing)


def read_only_folder(path, monkeypatch):
    """Make the folder `path` with mode 0555 and, where the tests run as root (who writes there
    anyway), have os.access say what it says for anyone else: no writing, reading and listing
    as before. Returns `path`."""
    from pathlib import Path

    path.mkdir()
    path.chmod(0o555)
    if os.access(path, os.W_OK):
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == path and mode & os.W_OK
                            else real(p, mode, *a, **k))
    return path


@contextlib.contextmanager
def named_pipe(path):
    """A named pipe at `path` that reads as empty: a writer opens and closes it for every reader,
    so code that should refuse it unopened fails its test when it opens it, rather than blocking
    in the open (or read) for ever. Yields `path`."""
    os.mkfifo(path)
    done = threading.Event()

    def writer():
        while not done.is_set():
            os.close(os.open(path, os.O_WRONLY))  # waits for a reader

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # held open: the writer's last open returns
        thread.join()
        os.close(reader)


def default_sigint() -> None:
    """Popen preexec_fn for a child that a test interrupts with SIGINT: a test run started as a
    background job has SIGINT ignored, children inherit that, and Python then installs no
    Ctrl-C handler; a terminal's Ctrl-C reaches a foreground job, which this restores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ctrl_c_while_importing(module: str, argv: list[str]):
    """Run `argv` ([script, args...] or ["-m", module, args...]) in a new interpreter from the
    repository root, sending it SIGINT (a terminal's Ctrl-C) the moment it first imports `module`,
    i.e. in the seconds a heavy import (torch, OpenCV, matplotlib) takes. The CompletedProcess."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import os, runpy, signal, sys
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Hook())
argv = {list(argv)!r}
if argv[0] == "-m":
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300, preexec_fn=default_sigint)


class SDPACalls(TorchFunctionMode):
    """Records (query, key, value) of every F.scaled_dot_product_attention call inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append(tuple(args[:3]))
        return func(*args, **(kwargs or {}))


def ended_pid() -> int:
    """The process id of a process that has run and ended (reaped): a killed writer's, say."""
    import subprocess
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def running(pid: int) -> bool:
    """Whether process `pid` has not ended (a zombie has: an orphan's reaper may be slow to collect it)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def video_with_sound(path, frames: int = 10, fps: int = 10, audio: str = "aac", rate: int = 16000,
                     video_start: int = 0, hz: float = 440.0):
    """A 32x24 MPEG-4 video of `frames` gray levels (frame i: level 20 i) with a mono sine tone
    of `hz` as long as the picture, in `audio` ('aac' in .mp4, 'pcm_s16le' in .mov); the first
    picture at `video_start` frames, the sound from 0. Returns the path."""
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = 32, 24, "yuv420p"
        a = c.add_stream(audio, rate=rate, layout="mono")
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 20 * i, np.uint8), format="rgb24")
            f.pts = video_start + i
            c.mux(v.encode(f))
        c.mux(v.encode())
        n = rate * (video_start + frames) // fps
        pcm = (np.sin(2 * np.pi * hz * np.arange(n) / rate) * 10000).astype(np.int16)
        for s in range(0, n, 1024):
            f = av.AudioFrame.from_ndarray(pcm[None, s:s + 1024], format="s16", layout="mono")
            f.sample_rate, f.pts = rate, s
            c.mux(a.encode(f))
        c.mux(a.encode())
    return path


def headless_video(path, frames: int = 50, fps: int = 25, drop: int = 4, rate: int = 8000):
    """A 64x48 H.264 video (key frame every 12, B-frames) of `frames` gray levels (frame i: level
    5 i) with a mono AAC tone, whose first `drop` video packets are then cut away, as a cut made
    without re-encoding leaves a stream: FFmpeg decodes nothing before the next key frame (the
    first 8 frames' times, 0.32 s, are lost here). Returns the path."""
    import av
    import numpy as np

    full = Path(path).with_name("full_" + Path(path).name)
    with av.open(str(full), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        v.codec_context.gop_size = 12
        a = c.add_stream("aac", rate=rate, layout="mono")
        for i in range(frames):
            img = np.full((48, 64, 3), 5 * i, np.uint8)
            img[40:, i:i + 8] = 255  # some motion, as a film has
            c.mux(v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(v.encode())
        n = rate * frames // fps
        pcm = (np.sin(2 * np.pi * 440 * np.arange(n) / rate) * 10000).astype(np.int16)
        for s in range(0, n, 1024):
            f = av.AudioFrame.from_ndarray(pcm[None, s:s + 1024], format="s16", layout="mono")
            f.sample_rate, f.pts = rate, s
            c.mux(a.encode(f))
        c.mux(a.encode())
    with av.open(str(full)) as src, av.open(str(path), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
        video = 0
        for p in src.demux():
            if not p.size:
                continue
            if p.stream.type == "video":
                video += 1
                if video <= drop:
                    continue
            p.stream = streams[p.stream.index]
            out.mux(p)
    full.unlink()
    return path


def vfr_video(path, steps_ms: list[int], nominal: int = 30, audio: bool = False, start_ms: int = 0):
    """A 32x24 MPEG-4 video whose frame i (gray level 5 i) lasts steps_ms[i] milliseconds (time
    base 1/1000, `nominal` fps stated), with a mono AAC tone as long as the picture if `audio`
    (.mkv: no frame count stored, so FFmpeg estimates one from duration x nominal); the first
    frame at `start_ms`. Returns the path and the frames' times in ms, from the first frame's."""
    import av
    import numpy as np

    times = [sum(steps_ms[:i]) for i in range(len(steps_ms))]
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=nominal)
        v.width, v.height, v.pix_fmt = 32, 24, "yuv420p"
        v.codec_context.time_base = Fraction(1, 1000)
        a = c.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 5 * i % 256, np.uint8), format="rgb24")
            f.pts, f.time_base = start_ms + t, Fraction(1, 1000)
            c.mux(v.encode(f))
        c.mux(v.encode())
        if a is not None:
            n = 16 * sum(steps_ms)
            pcm = (np.sin(2 * np.pi * 440 * np.arange(n) / 16000) * 10000).astype(np.int16)
            for s in range(0, n, 1024):
                f = av.AudioFrame.from_ndarray(pcm[None, s:s + 1024], format="s16", layout="mono")
                f.sample_rate, f.pts = 16000, s
                c.mux(a.encode(f))
            c.mux(a.encode())
    return path, times


class CrossDeviceCopies(TorchDispatchMode):
    """Counts aten copies whose source and destination devices differ."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if isinstance(src, torch.Tensor) and src.device != out.device:
                self.count += 1
        return out


def stops_in_second_write(write, calls: list):
    """`write` (path, data) that records each file name in `calls` and raises KeyboardInterrupt
    once, in the second call (Ctrl-C landing in the write of f1): the writer must write it again."""
    def stopped_once(path, data, **kw):
        calls.append(path.name)
        if calls == ["f0.png", "f1.png"]:
            raise KeyboardInterrupt
        return write(path, data, **kw)
    return stopped_once


def assert_same(a, b):
    """Two state dicts with the same names, dtypes and values (bitwise)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Evil:
    """Unpickling this creates a directory: stands in for arbitrary code in a .ckpt."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class TinyLDM(nn.Module):
    """The SD naming pattern in miniature; `ctx` plays the cross-attention context width."""

    def __init__(self, ctx=16):
        super().__init__()
        self.model = nn.Module()
        attn2 = nn.ModuleDict({"to_k": nn.Linear(ctx, 8)})
        self.model.diffusion_model = nn.ModuleDict({"attn2": attn2, "out": nn.Linear(8, 4)})
        self.cond_stage_model = nn.Linear(3, ctx)
        self.control_model = nn.ModuleDict({"hint": nn.Linear(4, 8), "zero": nn.Linear(8, 8)})
        self.register_buffer("betas", torch.linspace(0, 1, 10))


def tiny_colour_model(*overrides):
    """ControlLDM of the tiny config with `overrides`, seeded: the same weights every call."""
    from cldm.config import TINY_CONFIG, load_config
    from cldm.model import create_model
    torch.manual_seed(0)
    return create_model(load_config(TINY_CONFIG, list(overrides)))


class SignalAtLine:
    """A sweep over each line of a span of code, for windows a timer cannot hit: `signum` goes to the
    main thread, whose handler runs it at once, at the `at`-th line run between start() and stop()
    (a trace function, in the frame start() is given and those it returns to). Test in a loop:
    reset(at) for at = 1, 2, ... until a run ends without `sent`."""

    def __init__(self, signum: int):
        self.signum = signum
        self.reset(0)

    def reset(self, at: int) -> None:
        self.at, self.lines, self.on, self.sent = at, 0, False, False

    def _trace(self, frame, event, arg):
        if event == "line" and self.on:
            self.lines += 1
            if self.lines == self.at:
                self.sent = True
                self.stop()
                signal.pthread_kill(threading.main_thread().ident, self.signum)
        return self._trace

    def start(self, frame) -> None:
        self.on = True
        while frame is not None:
            frame.f_trace = self._trace
            frame = frame.f_back
        sys.settrace(self._trace)

    def stop(self) -> None:
        self.on = False
        sys.settrace(None)
