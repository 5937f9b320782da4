"""Atomic writes and frame-folder reading."""
import os
import time

import cv2
import numpy as np
import pytest

from tqdm import tqdm

from annotator.color import to_uint8
from colorize.frames_io import (
    BAR_FORMAT, BAR_FORMAT_OPEN, FrameSourceError, encode_png, even_size, prefetch, progress_bar,
    write_bytes_atomic, write_image_atomic, write_video_atomic,
)


def rgb(h=24, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_write_image_atomic_round_trip_and_replace(tmp_path):
    a, b = rgb(seed=1), rgb(seed=2)
    path = write_image_atomic(tmp_path / "f.png", a)
    np.testing.assert_array_equal(cv2.imread(str(path))[..., ::-1], a)
    write_image_atomic(tmp_path / "f.png", b / 255.0)  # float [0, 1] input, existing file replaced
    np.testing.assert_array_equal(cv2.imread(str(path))[..., ::-1], b)
    write_image_atomic(tmp_path / "g.png", a[..., 0])  # gray: written as one channel
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "g.png"), cv2.IMREAD_UNCHANGED), a[..., 0])
    write_image_atomic(tmp_path / "h.png", b[..., :1] / 255.0)  # HW1 float gray
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "h.png"), cv2.IMREAD_UNCHANGED), b[..., 0])
    assert sorted(os.listdir(tmp_path)) == ["f.png", "g.png", "h.png"]  # no temporary files left


def test_write_image_atomic_failure_leaves_nothing(tmp_path):
    (tmp_path / "keep.png").write_bytes(b"old")
    with pytest.raises(cv2.error, match="could not find encoder for the specified extension"):
        write_image_atomic(tmp_path / "keep.notanimage", rgb())
    with pytest.raises(ValueError, match="HW or HW3"):
        write_image_atomic(tmp_path / "keep.png", np.zeros((4, 4, 2), np.uint8))
    assert os.listdir(tmp_path) == ["keep.png"] and (tmp_path / "keep.png").read_bytes() == b"old"


def test_write_bytes_atomic_cleans_up_on_error(tmp_path):
    with pytest.raises(TypeError):
        write_bytes_atomic(tmp_path / "x.json", "not bytes")
    assert os.listdir(tmp_path) == []


def test_write_video_atomic_round_trip(tmp_path):
    frames = [np.full((32, 48, 3), (40 * i, 100, 200 - 40 * i), np.uint8) for i in range(5)]
    n = write_video_atomic(tmp_path / "clip.mp4", (f for f in frames), fps=12)
    assert n == 5 and os.listdir(tmp_path) == ["clip.mp4"]
    cap = cv2.VideoCapture(str(tmp_path / "clip.mp4"))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(12)
    got = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        got.append(f[..., ::-1])
    cap.release()
    assert len(got) == 5 and got[0].shape == (32, 48, 3)
    for g, f in zip(got, frames):  # lossy codec: flat colours survive within a few levels
        assert np.abs(g.astype(int) - f).mean() < 6


def test_write_video_atomic_errors_leave_no_file(tmp_path):
    frames = [rgb(), rgb(), rgb(20, 40)]
    with pytest.raises(ValueError, match="frame 2 is 40x20, earlier frames 40x24"):
        write_video_atomic(tmp_path / "bad.mp4", frames, 25)
    with pytest.raises(ValueError, match="no frames"):
        write_video_atomic(tmp_path / "empty.mp4", [], 25)
    with pytest.raises(ValueError, match="fps"):
        write_video_atomic(tmp_path / "nofps.mp4", frames[:1], 0)
    assert os.listdir(tmp_path) == []


def test_a_video_cut_short_by_a_full_disk_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    """OpenCV's writer says nothing when the disk fills: the file just ends early, without the
    index a player needs. Here its release() leaves the first 4 kB, as a full disk did."""
    real = cv2.VideoWriter

    class FullDisk:
        def __init__(self, name, *args):
            self.name, self.writer = name, real(name, *args)

        def __getattr__(self, attr):
            return getattr(self.writer, attr)

        def release(self):
            self.writer.release()
            with open(self.name, "r+b") as f:
                f.truncate(4096)

    frames = [rgb(64, 64, seed) for seed in range(12)]
    monkeypatch.setattr(cv2, "VideoWriter", FullDisk)
    with pytest.raises(OSError, match="clip.mp4: the video was not written completely"):
        write_video_atomic(tmp_path / "clip.mp4", frames, 25)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(cv2, "VideoWriter", real)
    assert write_video_atomic(tmp_path / "clip.mp4", frames, 25) == 12  # the check passes a whole video
    assert (tmp_path / "clip.mp4").stat().st_size > 4096


def test_prefetch_keeps_order_raises_in_place_and_stops_early():
    assert list(prefetch(range(50), depth=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise FrameSourceError("x.png", "not a readable image")

    got = []
    with pytest.raises(FrameSourceError, match="x.png: not a readable image"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1, 2]
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = prefetch(endless(), depth=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()  # the producer stops instead of running on
    n = len(produced)
    assert n <= 3 + 2 + 1
    time.sleep(0.3)
    assert len(produced) == n


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_get_the_permissions_of_a_normal_file(tmp_path, umask, mode):
    """Not mkstemp's 0600: 0666 less the umask, as open() would create them (atomicio)."""
    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "a.json", b"{}")
        write_image_atomic(tmp_path / "b.png", rgb())
        write_video_atomic(tmp_path / "c.mp4", [rgb()] * 2, 25)
        (tmp_path / "d.png").write_bytes(b"old")
        os.chmod(tmp_path / "d.png", 0o600)
        write_image_atomic(tmp_path / "d.png", rgb())  # a replaced file too
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == dict.fromkeys(
        ["a.json", "b.png", "c.mp4", "d.png"], mode)


def test_odd_sized_video_is_padded_not_cropped(tmp_path):
    """MPEG-4 needs even sides; 53x37 becomes 54x38 with the last column and row repeated."""
    frame = rgb(37, 53, seed=3)
    frame = cv2.GaussianBlur(frame, (0, 0), 2.0)  # smooth, so the lossy codec keeps it close
    frame[:, -1] = (250, 20, 20)  # a red last column and a blue last row, which cropping would lose
    frame[-1, :] = (20, 20, 250)
    assert even_size(53, 37) == (54, 38) and even_size(54, 38) == (54, 38)
    write_video_atomic(tmp_path / "odd.mp4", [frame] * 3, 25)
    cap = cv2.VideoCapture(str(tmp_path / "odd.mp4"))
    ok, got = cap.read()
    cap.release()
    assert ok and got.shape == (38, 54, 3)
    got = got[..., ::-1].astype(int)
    assert np.abs(got[:37, :53] - frame).mean() < 6
    for col in (52, 53):  # the last column and its copy are red (codec: roughly)
        assert got[5:30, col, 0].mean() > 180 and got[5:30, col, 2].mean() < 90, col
    for row in (36, 37):
        assert got[row, 5:45, 2].mean() > 180 and got[row, 5:45, 0].mean() < 90, row


@pytest.mark.parametrize("elapsed", [0.5, 5.0, 500.0])
def test_progress_bar_always_shows_frames_per_second(elapsed):
    """tqdm's default switches to s/frame below 1 frame/s; ours keeps frames/s."""
    for fmt, total in ((BAR_FORMAT, 10), (BAR_FORMAT_OPEN, None)):
        line = tqdm.format_meter(n=2, total=total, elapsed=elapsed, prefix="fixed", unit=" frame", bar_format=fmt)
        assert f"{2 / elapsed:.2f} frame/s" in line, line
        assert "s/" not in line.replace("frame/s", ""), line


def test_progress_bar_rate_is_the_average_since_the_start():
    """Frames arrive in batches; with tqdm's default smoothing (0.3) the rate shown weighs the
    latest burst (after a slow first batch, several times the real speed). Smoothing 0 makes it
    frames done / time elapsed."""
    import io

    bar = progress_bar(8, "fixed", file=io.StringIO())
    assert bar.smoothing == 0
    bar.close()


# Mutation round 10: prefetch depth and shutdown, the bar's settings, input checks, sizes, fps.
import threading  # noqa: E402

from colorize.frames_io import check_video  # noqa: E402


def _frames_of(path):
    cap = cv2.VideoCapture(str(path))
    fps, got = cap.get(cv2.CAP_PROP_FPS), []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        got.append(f)
    cap.release()
    return fps, got


def test_prefetch_reads_exactly_depth_ahead_and_its_thread_ends_on_close():
    threads = threading.active_count()
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    gen = prefetch(endless(), depth=3)
    assert next(gen) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(produced) == 1 + 3 + 1  # taken, 3 queued, 1 waiting to be queued
    start = time.monotonic()
    gen.close()
    assert time.monotonic() - start < 2 and threading.active_count() == threads  # the producer stopped


def test_progress_bar_settings(capsys):
    bar = progress_bar(3, "frames")
    assert (bar.unit, bar.unit_scale, bool(bar.dynamic_ncols), bar.smoothing) == (" frame", False, True, 0)
    assert bar.bar_format == BAR_FORMAT
    bar.update(2)
    bar.close()
    out, err = capsys.readouterr()
    assert out == "" and "frames: " in err and "2/3" in err and " frame/s" in err  # on stderr
    for total in (None, 0):
        bar = progress_bar(total, "frames")
        assert bar.bar_format == BAR_FORMAT_OPEN
        bar.close()


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.bool_])
def test_write_image_atomic_refuses_pixels_that_are_neither_uint8_nor_float(tmp_path, dtype):
    with pytest.raises(TypeError, match=f"expected uint8 or float \\[0, 1\\] pixels, got {np.dtype(dtype)}"):
        write_image_atomic(tmp_path / "x.png", np.ones((4, 4, 3), dtype))
    assert os.listdir(tmp_path) == []


def test_write_image_atomic_without_an_extension_writes_png(tmp_path):
    a = rgb(seed=4)
    write_image_atomic(tmp_path / "noext", a)
    assert (tmp_path / "noext").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "noext"))[..., ::-1], a)


def test_write_image_atomic_an_encoder_failure_is_an_oserror(tmp_path, monkeypatch):
    monkeypatch.setattr(cv2, "imencode", lambda *a: (False, None))
    with pytest.raises(OSError, match=r"f\.jpg: cannot encode image as \.jpg$"):
        write_image_atomic(tmp_path / "f.jpg", rgb())
    assert os.listdir(tmp_path) == []


def test_even_size_pads_each_side_by_its_own_parity():
    assert even_size(53, 38) == (54, 38) and even_size(54, 37) == (54, 38) and even_size(1, 1) == (2, 2)


@pytest.mark.parametrize("h, w", [(36, 53), (37, 54)])
def test_a_video_odd_in_one_side_only_is_padded_on_that_side(tmp_path, h, w):
    write_video_atomic(tmp_path / "v.mp4", [rgb(h, w)] * 2, 25)
    _, got = _frames_of(tmp_path / "v.mp4")
    assert len(got) == 2 and got[0].shape == (h + h % 2, w + w % 2, 3)


def test_write_video_atomic_keeps_a_fractional_fps_and_makes_the_folder(tmp_path):
    path = tmp_path / "new" / "sub" / "clip.mp4"
    assert write_video_atomic(path, [rgb(32, 48)] * 3, 12.5) == 3
    fps, got = _frames_of(path)
    assert fps == pytest.approx(12.5) and len(got) == 3


@pytest.mark.parametrize("fps", [-5, float("nan"), float("inf"), None])
def test_write_video_atomic_refuses_a_bad_fps_before_writing(tmp_path, monkeypatch, fps):
    def no_writer(*args):  # OpenCV hangs on an infinite fps: fail fast should the check let it through
        raise AssertionError(f"writer opened with {args}")

    monkeypatch.setattr(cv2, "VideoWriter", no_writer)
    with pytest.raises(ValueError, match=f"clip.mp4: fps must be a positive finite number, got {fps}"):
        write_video_atomic(tmp_path / "clip.mp4", [rgb()], fps)
    assert os.listdir(tmp_path) == []



def test_a_video_path_that_is_not_utf8_is_refused_before_any_frame(tmp_path):
    """OpenCV's writer crashed the process (SIGSEGV) on such a path (a Latin-1 'café' folder):
    run in a child; the frames are a generator that must not be started."""
    import subprocess
    import sys
    from pathlib import Path

    folder = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")
    code = ("import sys, numpy as np; from colorize.frames_io import write_video_atomic\n"
            "def frames():\n    raise AssertionError('a frame was made')\n    yield\n"
            "try:\n    write_video_atomic(sys.argv[1], frames(), 25)\nexcept OSError as e:\n    print(e)\n")
    child = subprocess.run([sys.executable, "-c", code, f"{folder}/clip.mp4"], capture_output=True, text=True,
                           timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == 0, child.stderr
    assert child.stdout == f"{tmp_path}/caf\\xe9/clip.mp4: OpenCV cannot write a video whose path is not UTF-8: " \
                           "rename it\n"
    assert not os.path.exists(folder)  # nothing made, not even the folder

def test_a_relative_video_path_in_a_folder_that_is_not_utf8_is_refused(tmp_path):
    """The name given is UTF-8 but the current folder is not: its absolute path is what OpenCV gets
    (kills checking `path` rather than `path.absolute()`). In a child, as a crash would be SIGSEGV."""
    import subprocess
    import sys
    from pathlib import Path

    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    repo = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path.insert(0, {str(repo)!r}); from colorize.frames_io import write_video_atomic\n"
            "def frames():\n    raise AssertionError('a frame was made')\n    yield\n"
            "try:\n    write_video_atomic('clip.mp4', frames(), 25)\nexcept OSError as e:\n    print(e)\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=folder)
    assert child.returncode == 0, child.stderr
    assert child.stdout == "clip.mp4: OpenCV cannot write a video whose path is not UTF-8: rename it\n"
    assert os.listdir(folder) == []


def test_check_video_wants_the_exact_frame_count(tmp_path):
    write_video_atomic(tmp_path / "v.mp4", [rgb(32, 48)] * 3, 25)
    check_video(tmp_path / "v.mp4", 3, tmp_path / "v.mp4")
    for wrong in (2, 4):
        with pytest.raises(OSError, match="v.mp4: the video was not written completely"):
            check_video(tmp_path / "v.mp4", wrong, tmp_path / "v.mp4")


def test_a_failed_video_releases_its_writer(tmp_path, monkeypatch):
    real, released = cv2.VideoWriter, []

    class Spy:
        def __init__(self, *args):
            self.writer = real(*args)

        def __getattr__(self, attr):
            return getattr(self.writer, attr)

        def release(self):
            released.append(1)
            self.writer.release()

    monkeypatch.setattr(cv2, "VideoWriter", Spy)
    with pytest.raises(ValueError, match="frame 1 is"):
        write_video_atomic(tmp_path / "bad.mp4", [rgb(), rgb(20, 40)], 25)
    assert released == [1] and os.listdir(tmp_path) == []


def test_encode_png_clips_and_rounds_to_the_depth():
    rgb = np.array([[[-0.1, 0.5, 1.2], [0.0, 1 / 65535 * 0.6, 1.0]]], np.float32)
    sixteen = cv2.imdecode(np.frombuffer(encode_png(rgb, 16), np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert sixteen.dtype == np.uint16
    np.testing.assert_array_equal(sixteen, [[[0, 32768, 65535], [0, 1, 65535]]])  # 0.5 * 65535 = 32767.5 rounds up
    eight = cv2.imdecode(np.frombuffer(encode_png(rgb, 8), np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    np.testing.assert_array_equal(eight, to_uint8(rgb))


def test_encode_png_an_encoder_failure_is_an_oserror(monkeypatch):
    """Not an AttributeError from the None that a failed cv2.imencode returns as its data."""
    monkeypatch.setattr(cv2, "imencode", lambda *a: (False, None))
    with pytest.raises(OSError, match="^cannot encode PNG$"):
        encode_png(np.zeros((2, 2, 3), np.float32), 16)


def stop_right_after_a_temp_file_is_made(code, folder):
    """A trace function: Ctrl-C at the first line that the function of `code` runs once a new
    temporary file is in `folder`, as a signal landing just after the statement that made it."""
    def call(frame, event, arg):
        if frame.f_code is not code:
            return None
        there = set(folder.glob(".*tmp*"))

        def line(frame, event, arg):
            if event == "line" and set(folder.glob(".*tmp*")) - there:
                raise KeyboardInterrupt  # raised in the traced frame, at that line; tracing then stops
            return line
        return line
    return call


@pytest.mark.parametrize("where", ["video", "sound"])
def test_a_stop_just_after_a_temporary_file_is_made_removes_it(tmp_path, where):
    """write_video_atomic's temporary video and _remux's temporary muxed file were made one
    statement before the try that removes them: a stop in between left a hidden file."""
    import sys

    from colorize import frames_io
    from tests.helpers import video_with_sound

    src = video_with_sound(tmp_path / "src.mp4")
    out = tmp_path / "out"
    out.mkdir()
    code = (frames_io.write_video_atomic if where == "video" else frames_io._remux).__code__
    sys.settrace(stop_right_after_a_temp_file_is_made(code, out))
    try:
        with pytest.raises(KeyboardInterrupt):
            write_video_atomic(out / "clip.mp4", [rgb(24, 32, i) for i in range(10)], 10, audio_from=src)
    finally:
        sys.settrace(None)
    assert os.listdir(out) == []
    assert write_video_atomic(out / "clip.mp4", [rgb(24, 32, i) for i in range(10)], 10, audio_from=src) == 10
    assert os.listdir(out) == ["clip.mp4"]  # untraced, the same call writes the video (the test's setup works)


def test_a_second_stop_as_the_video_writer_is_released_still_removes_the_temporary_video(tmp_path, monkeypatch):
    """Ctrl-C during the encode, and again while the clean-up releases OpenCV's writer (it flushes
    the encoder: the longest step there): the second, run by the handler once release returns,
    came before the temporary video was removed, and left a hidden .clip.*.tmp.mp4. Real signals."""
    import signal

    from colorize import frames_io

    class SignallingWriter:
        def __init__(self, *args):
            self.writer, self.frames = cv2.VideoWriter(*args), 0

        def isOpened(self):
            return self.writer.isOpened()

        def write(self, frame):
            self.writer.write(frame)
            self.frames += 1
            if self.frames == 3:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        def release(self):
            self.writer.release()
            if self.frames >= 3:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    class Cv2:
        VideoWriter = SignallingWriter

        def __getattr__(self, name):
            return getattr(cv2, name)

    monkeypatch.setattr(frames_io, "cv2", Cv2())
    with pytest.raises(KeyboardInterrupt):
        write_video_atomic(tmp_path / "clip.mp4", [rgb(24, 32, i) for i in range(10)], 10)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("source, error", [("notes.txt", "Invalid data"), ("missing.mp4", "No such file")])
def test_a_sound_source_ffmpeg_cannot_read_is_one_line_and_leaves_no_file(tmp_path, source, error):
    """_remux turns FFmpeg's own errors (a source that is no media file; one that is not
    there: av's FileNotFoundError, an FFmpegError that is no ValueError) into the one OSError
    line naming the video and the source, with the --no-audio way out, as it does the "no audio
    stream" ValueError; nothing is left in the folder. (Found by a mutant that caught the
    ValueError alone: av's FileNotFoundError went out as it was.)"""
    (tmp_path / "notes.txt").write_text("not a film")
    src, out = tmp_path / source, tmp_path / "out"
    with pytest.raises(OSError) as e:
        write_video_atomic(out / "clip.mp4", [rgb(24, 32, i) for i in range(3)], 10, audio_from=src)
    assert type(e.value) is OSError
    line = str(e.value)
    assert line.startswith(f"{out / 'clip.mp4'}: cannot add the sound of {src} (") and \
        line.endswith("); leave it out with --no-audio"), line
    assert error in line and "\n" not in line, line
    assert os.listdir(out) == []
