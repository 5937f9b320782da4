"""OrderedWriter: PNGs in clip order, counted, drained on an error; video_frames: the whole clip."""
import errno

import cv2
import numpy as np
import pytest

from colorize import outputs as O
from colorize.frames_io import write_bytes_atomic
from tests.helpers import stops_in_second_write


def frame(k: int, h: int = 6, w: int = 8) -> np.ndarray:
    """A float RGB frame whose every pixel is level 10 * k (8-bit)."""
    return np.full((h, w, 3), 10 * k / 255, np.float32)


def made(n: int, then: BaseException | None = None, log: list | None = None):
    """(name, depth, rgb) of frames 0..n-1, then `then` raised; `log` gets "made k" and "closed"."""
    try:
        for k in range(n):
            if log is not None:
                log.append(f"made {k}")
            yield f"f{k}.png", 8, frame(k)
        if then is not None:
            raise then
    finally:
        if log is not None:
            log.append("closed")


def levels(folder) -> dict:
    return {p.name: int(cv2.imread(str(p))[0, 0, 0]) for p in sorted(folder.iterdir())}


@pytest.fixture
def logged_writes(monkeypatch):
    log = []

    def write(path, data, **kw):
        log.append(f"wrote {path.name}")
        return write_bytes_atomic(path, data, **kw)
    monkeypatch.setattr(O, "write_bytes_atomic", write)
    return log


def test_outputs_are_written_in_order_behind_the_frames_being_made(tmp_path, monkeypatch, logged_writes):
    """With 2 PNG threads frame k is written once frame k + 2 is made; the folder is made at the
    first frame, `on_first` sees it, and the count and next frame follow the writes."""
    monkeypatch.setattr(O, "PNG_THREADS", 2)
    out, firsts = tmp_path / "out", []
    writer = O.OrderedWriter(out, start=5, keep_rgb=True)
    seen = []
    for rgb in writer.written(lambda: made(4, log=logged_writes), on_first=lambda rgb: firsts.append(out.is_dir())):
        seen.append((rgb[0, 0, 0] * 255).round())
        assert (writer.count, writer.next_frame) == (len(seen), 5 + len(seen))
    assert logged_writes == ["made 0", "made 1", "made 2", "wrote f0.png", "made 3", "wrote f1.png", "closed",
                             "wrote f2.png", "wrote f3.png"]
    assert seen == [0, 10, 20, 30] and firsts == [True]
    assert levels(out) == {"f0.png": 0, "f1.png": 10, "f2.png": 20, "f3.png": 30}
    assert list(O.OrderedWriter(tmp_path / "two", 0).written(lambda: made(2))) == [None, None]  # rgb not kept


def test_nothing_made_leaves_no_folder(tmp_path):
    writer = O.OrderedWriter(tmp_path / "out", 0)
    assert list(writer.written(lambda: made(0))) == [] and not (tmp_path / "out").exists() and writer.count == 0


def test_frames_made_before_an_error_are_written_before_it_is_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(O, "PNG_THREADS", 4)  # all 3 pending when the source fails
    writer = O.OrderedWriter(tmp_path, 0)
    with pytest.raises(ValueError, match="bad frame 3"):
        for _ in writer.written(lambda: made(3, ValueError("bad frame 3"))):
            pass
    assert (writer.count, writer.next_frame) == (3, 3) and sorted(levels(tmp_path)) == ["f0.png", "f1.png", "f2.png"]


def test_an_existing_output_is_refused_and_the_source_closed_before_the_frames_made_are_written(
        tmp_path, monkeypatch, logged_writes):
    monkeypatch.setattr(O, "PNG_THREADS", 2)
    (tmp_path / "f1.png").write_bytes(b"kept")
    writer = O.OrderedWriter(tmp_path, 0)
    with pytest.raises(O.OutputExistsError) as e:
        list(writer.written(lambda: made(3, log=logged_writes)))
    assert str(e.value) == f"{tmp_path / 'f1.png'} exists; pass --overwrite to replace it"
    assert logged_writes == ["made 0", "made 1", "closed", "wrote f0.png"] and writer.count == 1
    assert (tmp_path / "f1.png").read_bytes() == b"kept"
    writer = O.OrderedWriter(tmp_path, 0, overwrite=True)
    assert len(list(writer.written(lambda: made(3)))) == 3 and levels(tmp_path)["f1.png"] == 10


def test_a_failed_write_names_its_file_and_stops_the_count_there(tmp_path, monkeypatch):
    def full(path, data, **kw):
        if path.name == "f1.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes_atomic(path, data, **kw)
    monkeypatch.setattr(O, "write_bytes_atomic", full)
    monkeypatch.setattr(O, "PNG_THREADS", 1)
    writer = O.OrderedWriter(tmp_path, 10)
    with pytest.raises(OSError) as e:
        list(writer.written(lambda: made(3)))
    assert str(e.value) == f"cannot write {tmp_path / 'f1.png'}: No space left on device"
    assert (writer.count, writer.next_frame) == (1, 11) and list(levels(tmp_path)) == ["f0.png"]


def test_closing_the_stream_writes_the_frames_made_unless_the_disk_refuses(tmp_path, monkeypatch, logged_writes):
    """A video writer that stops taking frames closes the stream: the PNGs already made are
    written; a disk error in that drain is not raised over the video's own error."""
    monkeypatch.setattr(O, "PNG_THREADS", 2)
    writer = O.OrderedWriter(tmp_path / "a", 0)
    stream = writer.written(lambda: made(4, log=logged_writes))
    next(stream)
    stream.close()
    assert logged_writes == ["made 0", "made 1", "made 2", "wrote f0.png", "closed", "wrote f1.png", "wrote f2.png"]
    assert writer.count == 3

    def fails_at_f2(path, data, **kw):
        if path.name == "f2.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes_atomic(path, data, **kw)
    monkeypatch.setattr(O, "write_bytes_atomic", fails_at_f2)
    writer = O.OrderedWriter(tmp_path / "b", 0)
    stream = writer.written(lambda: made(4))
    next(stream)
    stream.close()
    assert writer.count == 2 and sorted(levels(tmp_path / "b")) == ["f0.png", "f1.png"]


def test_a_stop_inside_a_write_writes_that_frame_and_the_rest_again(tmp_path, monkeypatch):
    """Ctrl-C in the write of f1 (f2 and f3 made): f1 stays first in line, so the drain writes it,
    then f2 and f3, in order; f4 is not made."""
    monkeypatch.setattr(O, "PNG_THREADS", 2)
    calls = []
    monkeypatch.setattr(O, "write_bytes_atomic", stops_in_second_write(write_bytes_atomic, calls))
    writer = O.OrderedWriter(tmp_path, 0)
    with pytest.raises(KeyboardInterrupt):
        list(writer.written(lambda: made(5)))
    assert calls == ["f0.png", "f1.png", "f1.png", "f2.png", "f3.png"] and writer.count == 4


def test_video_frames_take_the_frames_outside_the_range_from_out(tmp_path):
    for k in (0, 1, 4):
        cv2.imwrite(str(tmp_path / f"f{k}.png"), np.full((6, 8, 3), 10 * k, np.uint8))
    asked = []
    size = lambda: asked.append(1) or (6, 8)  # noqa: E731
    clip = list(O.video_frames(iter([frame(2), frame(3)]), tmp_path, ["f0.png", "f1.png"], ["f4.png"], size))
    assert [int(round(float(f[0, 0, 0]) * (255 if f.dtype != np.uint8 else 1))) for f in clip] == [0, 10, 20, 30, 40]
    assert asked == [1]
    assert len(list(O.video_frames(iter([frame(2)]), tmp_path, [], [], lambda: pytest.fail("asked")))) == 1


def test_video_frames_name_an_earlier_output_of_another_size_or_unreadable(tmp_path):
    cv2.imwrite(str(tmp_path / "f0.png"), np.zeros((6, 10, 3), np.uint8))
    (tmp_path / "f2.png").write_bytes(b"not a png")
    with pytest.raises(O.EarlierOutputError) as e:
        list(O.video_frames(iter([frame(1)]), tmp_path, ["f0.png"], [], lambda: (6, 8)))
    assert str(e.value) == (f"--video: {tmp_path / 'f0.png'} is 10x6, the input's frames 8x6: --out holds frames "
                            "of another clip or size")
    new = []
    with pytest.raises(O.EarlierOutputError, match=r"^--video: .*f2\.png"):
        list(O.video_frames((new.append(1) or frame(1) for _ in range(1)), tmp_path, [], ["f2.png"], lambda: (6, 8)))
    assert new == [1]  # the new frames came first
