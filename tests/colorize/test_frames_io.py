"""Atomic writes and frame-folder reading."""
import os
import time

import cv2
import numpy as np
import pytest

from colorize.frames_io import (
    FrameSourceError, prefetch, read_frame_folder, write_bytes_atomic, write_image_atomic, write_video_atomic,
)


def rgb(h=24, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_write_image_atomic_round_trip_and_replace(tmp_path):
    a, b = rgb(seed=1), rgb(seed=2)
    path = write_image_atomic(tmp_path / "f.png", a)
    np.testing.assert_array_equal(cv2.imread(str(path))[..., ::-1], a)
    write_image_atomic(tmp_path / "f.png", b / 255.0)  # float [0, 1] input, existing file replaced
    np.testing.assert_array_equal(cv2.imread(str(path))[..., ::-1], b)
    write_image_atomic(tmp_path / "g.png", a[..., 0])  # gray
    assert sorted(os.listdir(tmp_path)) == ["f.png", "g.png"]  # no temporary files left


def test_write_image_atomic_failure_leaves_nothing(tmp_path):
    (tmp_path / "keep.png").write_bytes(b"old")
    with pytest.raises(Exception):
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
