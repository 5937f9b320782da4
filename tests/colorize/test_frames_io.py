"""Atomic writes and frame-folder reading."""
import os
import time

import cv2
import numpy as np
import pytest

from tqdm import tqdm

from colorize.frames_io import (
    BAR_FORMAT, BAR_FORMAT_OPEN, FrameSourceError, even_size, prefetch, progress_bar, read_frame_folder,
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


def test_read_frame_folder_natural_order(tmp_path):
    for i in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"frame{i}.png"), np.full((6, 8, 3), i, np.uint8))
    names, frames = read_frame_folder(tmp_path)
    assert names == ["frame1.png", "frame2.png", "frame10.png"]
    assert [int(f[0, 0, 0]) for f in frames] == [1, 2, 10]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FrameSourceError, match="no image frames"):
        read_frame_folder(tmp_path / "empty")


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
