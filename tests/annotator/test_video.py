import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from av import open as av_open

from annotator.video import (
    FrameRangeError, FrameSourceError, bgr_to_rgb, decode_image, iter_frames, natural_key, probe, read_image, read_image_native,
    TruncatedVideoError, shortfall_verdict,
)
from tests.annotator.clips import panning_clip, rotate_mp4, truncate_avi, write_folder, write_video

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "bigbuckbunny.mp4"


def test_sample_clip_probe_and_frames():
    info = probe(SAMPLE)
    assert (info.kind, info.fps, info.frame_count, info.width, info.height) == ("video", 25.0, 132, 1280, 720)
    frames = list(iter_frames(SAMPLE))
    assert [i for i, _, _ in frames] == list(range(132))
    assert frames[5][1] == "000005"
    rgb = frames[0][2]
    assert rgb.shape == (720, 1280, 3) and rgb.dtype == np.uint8
    ok, bgr = cv2.VideoCapture(str(SAMPLE)).read()
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])  # RGB order by default
    _, _, first_bgr = next(iter_frames(SAMPLE, bgr=True))
    np.testing.assert_array_equal(first_bgr, bgr)


def test_natural_sort_and_names(tmp_path):
    frames = panning_clip(12, 16, 24)
    write_folder(frames, tmp_path / "clip", pattern="f{:d}")
    got = list(iter_frames(tmp_path / "clip"))
    assert [n for _, n, _ in got] == [f"f{i}.png" for i in range(12)]  # f2 before f10
    for (_, _, a), b in zip(got, frames):
        np.testing.assert_array_equal(a, b)
    assert sorted(["b10", "b9", "a1"], key=natural_key) == ["a1", "b9", "b10"]
    info = probe(tmp_path / "clip")
    assert (info.kind, info.frame_count, info.width, info.height, info.fps) == ("folder", 12, 24, 16, None)


def test_bit_depths_and_channels(tmp_path):
    rgb16 = np.zeros((4, 5, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 257 * 100, 0  # R=255, G=100, B=0 in 8 bit
    cv2.imwrite(str(tmp_path / "a16.png"), rgb16[:, :, ::-1])
    np.testing.assert_array_equal(read_image(tmp_path / "a16.png")[0, 0], [255, 100, 0])

    cv2.imwrite(str(tmp_path / "gray.png"), np.full((4, 5), 77, np.uint8))
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png")[0, 0], [77, 77, 77])

    cv2.imwrite(str(tmp_path / "gray16.png"), np.full((4, 5), 257 * 30, np.uint16))
    np.testing.assert_array_equal(read_image(tmp_path / "gray16.png")[0, 0], [30, 30, 30])
    # 16 -> 8 bit rounds to the nearest level (x / 257): 257k + 128 -> k, 257k + 129 -> k + 1
    levels = np.array([[0, 128, 129, 257 * 30 + 128, 257 * 30 + 129, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "round16.png"), levels)
    np.testing.assert_array_equal(read_image(tmp_path / "round16.png")[0, :, 0], [0, 0, 1, 30, 31, 255])

    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)  # BGRA on disk; alpha dropped
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png")[0, 0], [30, 20, 10])
    assert read_image(tmp_path / "rgba.png", bgr=True)[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("ext", [".avi", ".mp4", ".mov", ".mkv"])
def test_video_containers(tmp_path, ext):
    frames = panning_clip(10, 32, 48)
    p = write_video(frames, tmp_path / f"clip{ext}")
    info = probe(p)
    assert (info.kind, info.frame_count, info.width, info.height) == ("video", 10, 48, 32)
    got = [f for _, _, f in iter_frames(p)]
    assert len(got) == 10
    # lossy codecs: decoded frames are close to the originals (mean abs error in 8-bit levels;
    # unrelated frames of this texture differ by ~40)
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(got, frames)]) < 10


def test_bad_sources(tmp_path):
    def error(path) -> str:
        with pytest.raises(FrameSourceError) as e:
            probe(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    (tmp_path / "empty").mkdir()
    assert "no image frames" in error(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a video file" in error(tmp_path / "notes.txt")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    assert "cannot open video" in error(tmp_path / "junk.mp4")
    assert "no such file" in error(tmp_path / "missing.mkv")

    vids = tmp_path / "films"
    vids.mkdir()
    write_video(panning_clip(3, 16, 16), vids / "a.avi")
    assert "pass those instead" in error(vids)

    mixed = write_folder(panning_clip(3, 16, 16), tmp_path / "mixed")
    (mixed / "readme.md").write_text("x")
    with pytest.raises(FrameSourceError, match="readme.md: not an image file"):
        probe(mixed)


def test_errors_while_streaming(tmp_path):
    sizes = write_folder(panning_clip(4, 16, 24), tmp_path / "sizes")
    cv2.imwrite(str(sizes / "frame2.png"), np.zeros((16, 20, 3), np.uint8))
    with pytest.raises(FrameSourceError, match=r"frame2.png: frame is 20x16, earlier frames are 24x16"):
        list(iter_frames(sizes))

    broken = write_folder(panning_clip(4, 16, 24), tmp_path / "broken")
    (broken / "frame3.png").write_bytes(b"not a png")
    with pytest.raises(FrameSourceError, match=r"frame3.png: not a readable image"):
        list(iter_frames(broken))

    full = write_video(panning_clip(30, 48, 64), tmp_path / "full.avi")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert probe(cut).frame_count == 30  # the header still claims all frames
    decoded = []
    with pytest.raises(TruncatedVideoError, match=r"cut.avi: truncated or corrupt: decoded \d+ of 30 frames") as e:
        decoded.extend(i for i, _, _ in iter_frames(cut))
    assert (e.value.decoded, e.value.claimed) == (len(decoded), 30) and 0 < len(decoded) < 30  # where the file ends


def test_shortfall_rule():
    """Missing frames (container claim - decoded): <= 2 silent; up to one second of
    frames (a tenth of the claim for short clips) a warning; more is a truncated file."""
    film = 2 * 3600 * 24  # a 2-hour film at 24 fps claims 172800 frames
    assert shortfall_verdict("f.mkv", film, film, 24.0) is None
    assert shortfall_verdict("f.mkv", film + 5, film, 24.0) is None  # more than claimed: fine
    assert shortfall_verdict("f.mkv", film - 2, film, 24.0) is None
    assert shortfall_verdict("f.mkv", film - 3, film, 24.0).startswith(
        f"f.mkv: decoded {film - 3} of the {film} frames its container claims (3 missing, up to 24 "
        f"tolerated; where is unknown, so frames after a gap may be numbered early)")
    assert shortfall_verdict("f.mkv", film - 24, film, 24.0) is not None
    for missing in (25, 864):  # 864 = the old 0.5 % slack, which passed silently
        with pytest.raises(FrameSourceError, match=rf"f.mkv: truncated or corrupt: decoded {film - missing} of"):
            shortfall_verdict("f.mkv", film - missing, film, 24.0)
    assert "up to 60 tolerated" in shortfall_verdict("f.mkv", film - 60, film, 59.94)
    assert "up to 25 tolerated" in shortfall_verdict("f.mkv", film - 25, film, None)  # rate unknown: 25 fps
    assert "up to 4 tolerated" in shortfall_verdict("c.avi", 36, 40, 25.0)  # short clip: a tenth of 40
    with pytest.raises(FrameSourceError):
        shortfall_verdict("c.avi", 35, 40, 25.0)
    assert "up to 4 tolerated" in shortfall_verdict("c.avi", 45, 49, 25.0)  # a tenth rounded down: 4.9 -> 4
    with pytest.raises(FrameSourceError):
        shortfall_verdict("c.avi", 44, 49, 25.0)
    assert shortfall_verdict("c.avi", 8, 10, 25.0) is None  # the two-frame slack holds for tiny clips
    with pytest.raises(FrameSourceError):
        shortfall_verdict("c.avi", 7, 10, 25.0)
    assert shortfall_verdict("x.avi", 5, 0, 25.0) is None  # no claim, nothing to compare


def test_video_shorter_than_its_claim(tmp_path):
    """Real files cut after k of 600 frames (the header still claims 600, 25 fps): 599 decode
    silently, 597 with one warning line naming the file (the old 0.5 % slack passed that
    silently), 574 is truncated."""
    full = write_video(panning_clip(600, 16, 16), tmp_path / "full.avi", fps=25)
    lines = []
    got = list(iter_frames(truncate_avi(full, tmp_path / "k599.avi", 599), warn=lines.append))
    assert len(got) == 599 and lines == []
    got = list(iter_frames(truncate_avi(full, tmp_path / "k597.avi", 597), warn=lines.append))
    assert len(got) == 597 and lines == [
        f"{tmp_path / 'k597.avi'}: decoded 597 of the 600 frames its container claims (3 missing, "
        f"up to 25 tolerated; where is unknown, so frames after a gap may be numbered early); the decoded "
        f"frames are kept"]
    with pytest.warns(UserWarning, match="k597.avi: decoded 597 of the 600"):  # no callback: a Python warning
        list(iter_frames(tmp_path / "k597.avi"))
    cut = truncate_avi(full, tmp_path / "k574.avi", 574)
    with pytest.raises(FrameSourceError, match=r"k574.avi: truncated or corrupt: decoded 574 of 600 frames"):
        list(iter_frames(cut, warn=lines.append))
    assert len(lines) == 1


def test_frames_missing_mid_video_are_not_called_missing_at_the_end(tmp_path):
    """Frames 5-7 of an MJPG .avi whose chunks the demuxer drops (tag overwritten): 37 of 40
    decode, and frame 8 comes out as index 5 - OpenCV's CAP_PROP_POS_FRAMES and POS_MSEC count
    delivered frames (5, 200 ms there), so the gap cannot be located; the warning says so."""
    frames = panning_clip(40, 16, 24)
    data = bytearray(write_video(frames, tmp_path / "full.avi", fps=25).read_bytes())
    movi = data.find(b"movi")  # the frame chunks: between the LIST movi tag and the index
    chunks = [movi + m.start() for m in re.finditer(b"00dc", bytes(data[movi : data.find(b"idx1")]))]
    assert len(chunks) == 40
    for k in (5, 6, 7):
        data[chunks[k] : chunks[k] + 4] = b"JUNK"
    gap = tmp_path / "gap.avi"
    gap.write_bytes(bytes(data))
    lines = []
    got = list(iter_frames(gap, warn=lines.append))
    assert len(got) == 37 and lines == [
        f"{gap}: decoded 37 of the 40 frames its container claims (3 missing, up to 4 tolerated; where is "
        "unknown, so frames after a gap may be numbered early); the decoded frames are kept"]
    err = [np.abs(got[5][2].astype(int) - f.astype(int)).mean() for f in frames]
    # index 5 holds source frame 8 (mean abs diff measured 7.1 to it, 12.2 to frames 7 and 9: JPEG at 24x16)
    assert int(np.argmin(err)) == 8 and err[8] < 0.7 * min(err[7], err[9])


def test_read_image_native_keeps_depth_and_drops_alpha(tmp_path):
    rgba16 = np.zeros((4, 5, 4), np.uint16)
    rgba16[...] = (1000, 2000, 3000, 65535)  # BGRA on disk
    cv2.imwrite(str(tmp_path / "a.png"), rgba16)
    img = read_image_native(tmp_path / "a.png")
    assert img.dtype == np.uint16 and img.shape == (4, 5, 3) and img[0, 0].tolist() == [3000, 2000, 1000]
    cv2.imwrite(str(tmp_path / "g.png"), np.full((4, 5), 1000, np.uint16))
    assert read_image_native(tmp_path / "g.png").shape == (4, 5)  # gray stays 2-D


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_bgr_to_rgb_swaps_exactly_the_colour_channels_at_any_depth(dtype):
    """uint8/uint16/float32 go through cv2.cvtColor, float64 through numpy: the same result."""
    rng = np.random.default_rng(0)
    for channels in (3, 4):
        img = (rng.random((6, 9, channels)) * 250).astype(dtype)
        want = img[..., [2, 1, 0, 3][:channels]]
        got = bgr_to_rgb(img)
        assert got.dtype == dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
    gray = (rng.random((6, 9, 2)) * 250).astype(dtype)
    assert bgr_to_rgb(gray) is gray  # gray + alpha: nothing to swap


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_exif_orientation_is_applied(tmp_path, ext):
    """A phone photo stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to
    view") reads upright, as photo viewers show it."""
    from PIL import Image

    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)  # left half red as stored
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / f"r{ext}", exif=exif, quality=100, lossless=True)
    for img in (read_image(tmp_path / f"r{ext}"), read_image_native(tmp_path / f"r{ext}")):
        assert img.shape == (32, 16, 3)
        top, bottom = img[:16].astype(int), img[16:].astype(int)
        assert (top[..., 0] > 200).all() and (top[..., 1:] < 60).all()  # stored left -> shown top
        assert (bottom < 60).all()


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_video_rotation_tag_is_applied(tmp_path, degrees):
    """A portrait phone video (frames stored sideways, a rotation in the track header) reads
    upright, as players show it: probe's size and every frame, also inside a range."""
    stored = write_video(panning_clip(6, h=32, w=48, speed=2), tmp_path / "v.mp4")
    rotated = rotate_mp4(stored, tmp_path / "r.mp4", degrees)
    upright = [np.rot90(f, -degrees // 90) for _, _, f in iter_frames(stored)]  # clockwise
    info = probe(rotated)
    assert (info.width, info.height) == (upright[0].shape[1], upright[0].shape[0])
    for start in (0, 3):
        got = list(iter_frames(rotated, start=start))
        assert [i for i, _, _ in got] == list(range(start, 6))
        for i, _, img in got:
            np.testing.assert_array_equal(img, upright[i])  # the same decode, turned


def test_folder_range_reads_nothing_outside_it(tmp_path):
    frames = panning_clip(6, 16, 24)
    d = write_folder(frames, tmp_path / "clip")
    (d / "frame0.png").write_bytes(b"broken")  # before the range
    (d / "frame4.png").write_bytes(b"broken")  # after it
    got = list(iter_frames(d, start=1, stop=4))
    assert [(i, n) for i, n, _ in got] == [(1, "frame1.png"), (2, "frame2.png"), (3, "frame3.png")]
    for i, _, f in got:
        np.testing.assert_array_equal(f, frames[i])
    assert [i for i, _, _ in iter_frames(d, start=5)] == [5]
    assert [i for i, _, _ in iter_frames(d, start=5, stop=99)] == [5]  # a stop past the end: to the end
    assert list(iter_frames(d, start=6)) == []  # just past the last frame: nothing
    with pytest.raises(FrameRangeError, match="clip: folder has only 6 frames") as e:
        list(iter_frames(d, start=7))
    assert e.value.frames == 6
    with pytest.raises(FrameSourceError, match="frame4.png: not a readable image"):
        list(iter_frames(d, start=3))
    with pytest.raises(ValueError, match="bad frame range"):
        list(iter_frames(d, start=3, stop=2))
    # the size check starts at the range's first frame
    cv2.imwrite(str(d / "frame0.png"), np.zeros((8, 8, 3), np.uint8))
    assert len(list(iter_frames(d, start=1, stop=4))) == 3
    # 16-bit frames keep their depth with keep_depth
    cv2.imwrite(str(d / "frame5.png"), np.full((16, 24), 1000, np.uint16))
    (_, _, f16), = iter_frames(d, start=5, keep_depth=True)
    assert f16.dtype == np.uint16 and f16.shape == (16, 24) and int(f16[0, 0]) == 1000


def test_video_range_grabs_to_the_start_and_stops(tmp_path):
    full = list(iter_frames(SAMPLE, stop=8))
    assert [i for i, _, _ in full] == list(range(8))
    part = list(iter_frames(SAMPLE, start=5, stop=8))
    assert [(i, n) for i, n, _ in part] == [(5, "000005"), (6, "000006"), (7, "000007")]
    for (_, _, a), (_, _, b) in zip(part, full[5:], strict=True):
        np.testing.assert_array_equal(a, b)  # the frames a full decode gives
    assert [i for i, _, _ in iter_frames(SAMPLE, start=130)] == [130, 131]
    assert list(iter_frames(SAMPLE, start=132)) == []
    with pytest.raises(FrameRangeError, match="video has only 132 frames") as e:
        list(iter_frames(SAMPLE, start=140))
    assert e.value.frames == 132


def test_truncation_is_judged_only_when_the_video_is_read_to_its_end(tmp_path):
    full = write_video(panning_clip(600, 16, 16), tmp_path / "full.avi", fps=25)
    cut = truncate_avi(full, tmp_path / "k574.avi", 574)  # claims 600: truncated if read to the end
    assert len(list(iter_frames(cut, stop=100))) == 100  # stopped before: nothing to judge
    assert [i for i, _, _ in iter_frames(cut, start=570, stop=574)] == [570, 571, 572, 573]
    with pytest.raises(FrameSourceError, match="truncated or corrupt: decoded 574 of 600"):
        list(iter_frames(cut, start=570))
    with pytest.raises(FrameSourceError, match="truncated or corrupt: decoded 574 of 600"):
        list(iter_frames(cut, start=570, stop=580))  # asked for more than it has: it ran out


def test_names_alike_in_natural_order_are_listed_by_name_whatever_the_listing_order(tmp_path, monkeypatch):
    """f1, f01 and F1 are one frame number to natural_key: the file system's listing order decided
    between them, so a copy of the folder could number its frames otherwise."""
    from annotator import video

    for name in ("f01.png", "F1.png", "f1.png", "f2.png"):
        cv2.imwrite(str(tmp_path / name), np.zeros((2, 2), np.uint8))
    scandir = os.scandir
    for order in (sorted, lambda e, **k: sorted(e, reverse=True, **k)):
        monkeypatch.setattr(video.os, "scandir", lambda f: order(list(scandir(f)), key=lambda e: e.name))
        assert [p.name for p in list_frame_files(tmp_path)] == ["F1.png", "f01.png", "f1.png", "f2.png"]


def test_natural_order_ignores_case():
    from annotator.video import natural_key

    assert sorted(["Frame10.png", "frame2.png", "FRAME1.png"], key=natural_key) == ["FRAME1.png", "frame2.png",
                                                                                   "Frame10.png"]


# Mutation round 10: folder listing rules, pixel conversions, video metadata edge cases (through a
# capture whose answers a test sets), ranges and flags.
import os  # noqa: E402

from annotator import video as V  # noqa: E402
from annotator.video import list_frame_files  # noqa: E402


def test_folder_listing_skips_hidden_files_and_subfolders_and_reads_upper_case_extensions(tmp_path):
    d = write_folder(panning_clip(2, 8, 8), tmp_path / "clip")
    (d / ".DS_Store").write_bytes(b"junk")
    (d / "._frame0.png").write_bytes(b"junk")  # macOS resource fork: hidden, and no image
    (d / "sub").mkdir()
    (d / "sub" / "x.txt").write_text("x")
    (d / "Zed.PNG").write_bytes((d / "frame1.png").read_bytes())
    assert [p.name for p in list_frame_files(d)] == ["frame0.png", "frame1.png", "Zed.PNG"]


def test_a_folder_of_frames_and_videos_is_refused(tmp_path):
    d = write_folder(panning_clip(2, 8, 8), tmp_path / "clip")
    (d / "film.MP4").write_bytes(b"x")
    with pytest.raises(FrameSourceError, match=r"clip: frame folder also holds 1 video file\(s\); keep them apart$"):
        list_frame_files(d)


def test_a_dangling_link_with_an_image_name_is_listed_and_its_reading_names_it(tmp_path):
    d = write_folder(panning_clip(2, 8, 8), tmp_path / "clip")
    (d / "frame2.png").symlink_to(tmp_path / "gone.png")
    assert [p.name for p in list_frame_files(d)] == ["frame0.png", "frame1.png", "frame2.png"]
    with pytest.raises(FrameSourceError, match=r"clip/frame2.png: cannot read file \(No such file or directory\)$"):
        list(iter_frames(d))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("via_link", [False, True])
def test_a_named_pipe_with_an_image_name_is_refused_at_listing(tmp_path, via_link):
    d = write_folder(panning_clip(2, 8, 8), tmp_path / "clip")
    os.mkfifo(tmp_path / "pipe")
    if via_link:
        (d / "frame_0001.png").symlink_to(tmp_path / "pipe")
    else:
        os.mkfifo(d / "frame_0001.png")
    # listing reads nothing, so a regression fails here rather than hanging in a reader
    with pytest.raises(FrameSourceError, match=r"clip/frame_0001.png: not a regular file \(a named pipe, socket or "
                                               r"device; inside a frame folder\)$"):
        list_frame_files(d)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_with_a_video_name_is_refused_before_it_is_opened(tmp_path):
    os.mkfifo(tmp_path / "clip.mp4")
    code = ("import sys; from annotator.video import FrameSourceError, probe\n"
            "try: probe(sys.argv[1])\nexcept FrameSourceError as e: print(e)")
    # in a process of its own: a regression blocks in the open, and the timeout ends it
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "clip.mp4")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout == f"{tmp_path}/clip.mp4: not a regular file (a named pipe, socket or device)\n", done.stderr


def test_a_video_whose_name_is_not_utf8_is_refused_and_a_folder_so_named_is_read(tmp_path):
    name = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: Python reads them in as surrogate escapes
    video = write_video(panning_clip(3, 16, 16), tmp_path / "c.avi").rename(tmp_path / f"{name}.avi")
    folder = write_folder(panning_clip(3, 16, 16), tmp_path / "f").rename(tmp_path / name)  # cv2.imwrite: SIGSEGV
    code = ("import sys; from annotator.video import FrameSourceError, iter_frames, probe\n"
            "for read in (probe, lambda p: list(iter_frames(p))):\n"
            "    try: read(sys.argv[1])\n    except FrameSourceError as e: print(e)\n"
            "print(len(list(iter_frames(sys.argv[2]))))")
    # in a process of its own: OpenCV given such a name ends the process with SIGSEGV
    done = subprocess.run([sys.executable, "-c", code, video, folder], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    line = f"{tmp_path}/caf\\xe9.avi: OpenCV cannot open a file name that is not UTF-8: rename it\n"
    assert (done.returncode, done.stdout) == (0, line * 2 + "3\n"), done.stderr


def test_a_folder_that_cannot_be_listed_is_a_frame_source_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FrameSourceError, match=r"f: cannot list folder \(Not a directory\)$"):
        list_frame_files(tmp_path / "f")


def test_an_empty_image_file_is_not_a_readable_image(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(FrameSourceError, match=r"e.png: not a readable image$"):
        read_image(tmp_path / "e.png")


def test_a_video_whose_first_frames_cannot_be_decoded_says_so_and_counts_from_the_first_decodable(tmp_path):
    """A stream cut before a key frame: FFmpeg skips what it cannot decode without a word, and the
    shortfall was put down to a varying frame rate or frames "missing inside it"."""
    from tests.helpers import headless_video

    path = headless_video(tmp_path / "cut.mp4")
    info = probe(path)
    with av_open(path) as c:
        v = c.streams.video[0]
        start = float(v.start_time * v.time_base)
    said = []
    frames = list(iter_frames(path, warn=said.append))
    assert info.lead == pytest.approx(0.32) and said == [
        f"{path}: its first 8 frame(s) (0.32 s) cannot be decoded (the stream starts without a key frame, as a cut "
        "made without re-encoding does); frames are counted from the first decodable one"]
    first = round((start + info.lead) * 25)  # the source frame shown at that time: gray level 5 x its index
    assert abs(int(frames[0][2][0, 0, 0]) - 5 * first) <= 2 and len(frames) == 50 - first
    said.clear()  # a range that starts later says it too (a run continued with --frames N: is told as a whole run)
    assert [i for i, _, _ in iter_frames(path, start=3, stop=5, warn=said.append)] == [3, 4] and len(said) == 1
    assert list(iter_frames(path, stop=1, check_count=False, warn=said.append)) and len(said) == 1
    ok = write_video(panning_clip(4, 16, 16), tmp_path / "ok.mp4")
    assert probe(ok).lead == 0.0 and list(iter_frames(ok, warn=said.append)) and len(said) == 1


def _png_header_only(path, width, height):
    """A valid PNG that declares `width` x `height` (8-bit gray) and holds no pixels: OpenCV checks
    its size limits on the header, before reading any pixel."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_an_image_over_opencvs_size_limits_is_one_line_not_its_exception(tmp_path):
    """cv2.imdecode raises cv2.error (not None) over 2**30 pixels: a traceback, exit 1, in every
    tool (a 1 MB PNG of 40000x30000 zeros is enough)."""
    path = _png_header_only(tmp_path / "big.png", 40000, 30000)
    with pytest.raises(FrameSourceError, match=r"big\.png: image too large for OpenCV to decode: its limits are by "
                                               r"default 2\*\*30 pixels and 2\*\*20 a side, and the environment "
                                               r"variable OPENCV_IO_MAX_IMAGE_PIXELS raises the first$"):
        decode_image(path)
    small = _png_header_only(tmp_path / "small.png", 2000, 2000)  # the variable named is the one OpenCV reads
    code = "import sys, numpy, cv2; cv2.imdecode(numpy.fromfile(sys.argv[1], numpy.uint8), cv2.IMREAD_UNCHANGED)"
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000000"}
    assert "CV_IO_MAX_IMAGE_PIXELS" in subprocess.run([sys.executable, "-c", code, str(small)], env=env,
                                                      capture_output=True, text=True).stderr


def test_read_image_keep_16bit(tmp_path):
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[...] = (1000, 2000, 3000)
    cv2.imwrite(str(tmp_path / "a.png"), rgb16[..., ::-1])
    img = read_image(tmp_path / "a.png", keep_16bit=True)
    assert img.dtype == np.uint16 and img[0, 0].tolist() == [1000, 2000, 3000]


def test_float_images_are_taken_as_0_to_1_rounded_and_nan_is_refused(tmp_path):
    """A NaN pixel was black (nan_to_num): colourised, and scored by evaluate.py, without a word."""
    cv2.imwrite(str(tmp_path / "f.tiff"), np.array([[-0.5, 0.5, 1.5, 0.0, 0.002, 0.998]], np.float32))
    img = read_image(tmp_path / "f.tiff")
    assert img[0, :, 0].tolist() == [0, 128, 255, 0, 1, 254] and (img[..., 0] == img[..., 2]).all()
    for bad in (np.nan, np.inf):
        cv2.imwrite(str(tmp_path / "n.tiff"), np.array([[0.5, bad]], np.float32))
        for read in (read_image, read_image_native):  # the colourised frames are read at their own depth
            with pytest.raises(FrameSourceError, match=r"n\.tiff: has NaN or infinite pixels$"):
                read(tmp_path / "n.tiff")


def test_unsupported_pixel_types_and_shapes_are_named(tmp_path):
    cv2.imwrite(str(tmp_path / "i.tiff"), np.array([[1, 2]], np.int32))
    with pytest.raises(FrameSourceError, match=r"i.tiff: unsupported pixel type int32$"):
        read_image(tmp_path / "i.tiff")
    with pytest.raises(FrameSourceError, match=r"x: unsupported image shape \(2, 2, 5\)$"):
        V._to_rgb8(np.zeros((2, 2, 5), np.uint8), "x")


def test_files_with_alpha_decode_without_it(tmp_path):
    """decode_image (IMREAD_ANYDEPTH | IMREAD_ANYCOLOR, not IMREAD_UNCHANGED) gives gray HW or
    colour HW3 for files with alpha, which IMREAD_UNCHANGED reads as HW4: so read_image's path
    through _to_rgb8 (want_bgr=False) never sees BGRA, and read_reference never a 2- or
    4-channel array (their branches for those were removed as unreachable)."""
    from PIL import Image

    gray = np.full((4, 5), 51, np.uint8)
    alpha = np.full_like(gray, 7)
    colour = np.full((4, 5, 3), (10, 20, 30), np.uint8)  # RGB
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(tmp_path / "rgba.webp", lossless=True)
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(tmp_path / "rgba.tiff")
    Image.fromarray(gray, "L").save(tmp_path / "gray_t.png", transparency=51)  # tRNS: alpha by a key colour
    assert cv2.imwrite(str(tmp_path / "bgra16.png"), np.dstack([colour[..., ::-1], alpha]).astype(np.uint16) * 257)
    for name in ("la.png", "rgba.png", "rgba.webp", "rgba.tiff", "gray_t.png", "bgra16.png"):
        assert cv2.imread(str(tmp_path / name), cv2.IMREAD_UNCHANGED).shape in ((4, 5), (4, 5, 4)), name
        img = V.decode_image(tmp_path / name)
        assert img.shape in ((4, 5), (4, 5, 3)), name
        if name.endswith(".tiff"):  # OpenCV's TIFF reader multiplies the colour by the alpha: shape only
            continue
        want = [51] * 3 if name.startswith(("la", "gray")) else [10, 20, 30]
        assert read_image(tmp_path / name)[0, 0].tolist() == want, name
        assert read_image(tmp_path / name, bgr=True)[0, 0].tolist() == want[::-1], name


def test_gray_plus_alpha_gives_the_gray_channel():
    ga = np.dstack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 200, np.uint8)])
    assert V._to_rgb8(ga, "x").tolist() == [[[50] * 3] * 2] * 2


def test_a_video_extension_in_upper_case_is_a_video(tmp_path):
    p = write_video(panning_clip(3, 16, 16), tmp_path / "clip.avi").rename(tmp_path / "CLIP.AVI")
    assert probe(p).kind == "video" and len(list(iter_frames(p))) == 3


def test_an_unreadable_video_is_named(tmp_path, monkeypatch):
    p = write_video(panning_clip(3, 16, 16), tmp_path / "c.avi")
    monkeypatch.setattr(os, "access", lambda *a: False)  # tests may run as root, whom chmod does not stop
    with pytest.raises(FrameSourceError, match=r"c.avi: file is not readable \(permission denied\)$"):
        probe(p)


REAL_CAPTURE = cv2.VideoCapture


class FakeCapture:
    """A real capture of a small file whose frame count, fps and frames a test can override."""
    calls: list = []

    def __init__(self, name, api, params, *, count=None, fps=None, frames=None):
        FakeCapture.calls.append(list(params))
        self.cap, self.count, self.fps, self.frames = REAL_CAPTURE(name, api, params), count, fps, frames

    def get(self, prop):
        if prop == cv2.CAP_PROP_FRAME_COUNT and self.count is not None:
            return self.count
        if prop == cv2.CAP_PROP_FPS and self.fps is not None:
            return self.fps
        return self.cap.get(prop)

    def read(self):
        if self.frames is None:
            return self.cap.read()
        return (True, self.frames.pop(0)) if self.frames else (False, None)

    def __getattr__(self, attr):
        return getattr(self.cap, attr)


def fake_capture(monkeypatch, **kw):
    FakeCapture.calls = []
    monkeypatch.setattr(cv2, "VideoCapture", lambda *a: FakeCapture(*a, **kw))


@pytest.fixture
def small_avi(tmp_path):
    return write_video(panning_clip(4, 16, 16), tmp_path / "s.avi", fps=25)


def test_probe_of_a_video_that_states_no_rate_or_count(small_avi, monkeypatch):
    fake_capture(monkeypatch, count=-1, fps=0.0)
    info = probe(small_avi)
    assert (info.fps, info.frame_count) == (None, None)
    fake_capture(monkeypatch, count=0, fps=-1.0)  # what some containers say for "unknown"
    info = probe(small_avi)
    assert (info.fps, info.frame_count) == (None, None)
    fake_capture(monkeypatch, count=3.9999)  # a count read as a float: rounded, not cut
    assert probe(small_avi).frame_count == 4


def test_a_video_without_a_decodable_frame(small_avi, monkeypatch):
    fake_capture(monkeypatch, frames=[])
    for read in (probe, lambda p: list(iter_frames(p))):
        with pytest.raises(FrameSourceError, match=r"s.avi: video has no decodable frame$"):
            read(small_avi)
    assert list(iter_frames(small_avi, stop=0)) == []  # nothing asked for: no error


def test_video_frames_that_are_gray_or_change_size(small_avi, monkeypatch):
    for bgr in (False, True):
        fake_capture(monkeypatch, frames=[np.full((4, 6), 9, np.uint8)])
        (_, _, f), = iter_frames(small_avi, check_count=False, bgr=bgr)
        assert f.shape == (4, 6, 3) and (f == 9).all()
    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[...] = (1, 2, 3, 4)
    for bgr, want in ((False, [3, 2, 1]), (True, [1, 2, 3])):  # alpha dropped
        fake_capture(monkeypatch, frames=[bgra.copy()])
        (_, _, f), = iter_frames(small_avi, check_count=False, bgr=bgr)
        assert f.shape == (4, 6, 3) and f[0, 0].tolist() == want
    fake_capture(monkeypatch, frames=[np.zeros((4, 6, 3), np.uint8)] * 2 + [np.zeros((4, 8, 3), np.uint8)])
    with pytest.raises(FrameSourceError, match=r"s.avi: frame 2 is 8x4, earlier frames are 6x4$"):
        list(iter_frames(small_avi))


def test_decode_threads_reach_the_decoder(small_avi, monkeypatch):
    fake_capture(monkeypatch)
    assert len(list(iter_frames(small_avi, decode_threads=1))) == 4
    list(iter_frames(small_avi))
    assert FakeCapture.calls == [[cv2.CAP_PROP_N_THREADS, 1], []]


def test_check_count_false_skips_the_shortfall_verdict(small_avi, monkeypatch):
    fake_capture(monkeypatch, count=40)  # claims 40, has 4: truncated
    with pytest.raises(FrameSourceError, match="truncated or corrupt: decoded 4 of 40"):
        list(iter_frames(small_avi))
    assert len(list(iter_frames(small_avi, check_count=False))) == 4


def test_the_shortfall_warning_points_at_the_caller(small_avi, monkeypatch):
    fake_capture(monkeypatch, count=40, frames=[np.zeros((4, 4, 3), np.uint8)] * 37)
    with pytest.warns(UserWarning, match="decoded 37 of the 40 frames") as w:
        list(iter_frames(small_avi))
    assert w[0].filename == __file__


def test_frame_range_and_flag_checks(tmp_path):
    frames = panning_clip(3, 8, 8)
    d = write_folder(frames, tmp_path / "clip")
    with pytest.raises(ValueError, match=r"^bad frame range -1:None$"):
        list(iter_frames(d, start=-1))
    assert list(iter_frames(d, start=2, stop=2)) == []  # an empty range is no error
    with pytest.raises(ValueError, match="keep_depth frames are RGB"):
        list(iter_frames(d, keep_depth=True, bgr=True))
    (_, _, bgr), = iter_frames(d, stop=1, bgr=True)
    np.testing.assert_array_equal(bgr, frames[0][..., ::-1])


def _png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk of a PNG."""
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks.append((pos, kind, length))
        pos += 12 + length
    return chunks


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_damaged_tells_a_png_cut_short_or_failing_a_critical_crc(dtype):
    rng = np.random.default_rng(0)
    img = (rng.random((120, 160, 3)) * np.iinfo(dtype).max).astype(dtype)
    data = cv2.imencode(".png", img)[1].tobytes()
    chunks = _png_chunks(data)
    assert [k for _, k, _ in chunks].count(b"IDAT") > 3  # libpng's 8 KiB chunks: cuts inside and between them
    check = lambda b: V.png_damaged(np.frombuffer(b, np.uint8))
    assert not check(data)
    cuts = sorted({pos for pos, _, _ in chunks} | {pos + 9 for pos, _, _ in chunks} | {len(data) - 1, 9, 20})
    assert all(check(data[:cut]) for cut in cuts)
    for pos, kind, length in chunks:  # one bit flipped in each critical chunk's data, then in its CRC
        for at in ([pos + 8 + length // 2] if length else []) + [pos + 8 + length]:
            bad = bytearray(data)
            bad[at] ^= 1
            assert check(bytes(bad)), (kind, at)
    # an ancillary chunk failing its CRC: libpng warns and decodes, and so do we (no refusal of our own)
    text = b"Comment\x00x"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", (zlib.crc32(b"tEXt" + text) ^ 1))
    ancillary = data[:33] + chunk + data[33:]
    assert not check(ancillary)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(ancillary, np.uint8), cv2.IMREAD_UNCHANGED), img)
    # not a PNG: left to its decoder
    assert not check(cv2.imencode(".jpg", img[..., :3].astype(np.uint8))[1].tobytes()[:100])
    assert not check(b"")


def test_a_damaged_image_is_refused_in_our_one_line_without_any_of_the_decoders_own(tmp_path):
    """libpng prints its errors to stderr itself, OpenCV its TIFF/BMP/JPEG 2000 errors through its log:
    either would be a line before ours. In a process of its own: OpenCV reads its log level as it loads."""
    rng = np.random.default_rng(1)
    img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    paths = []
    for ext in (".png", ".tif", ".bmp", ".jp2", ".jpg", ".webp", ".ppm"):
        data = cv2.imencode(ext, img)[1].tobytes()
        paths.append(tmp_path / f"cut{ext}")
        paths[-1].write_bytes(data[: len(data) // 2])
    data = bytearray(cv2.imencode(".png", img)[1].tobytes())
    pos, _, length = next(c for c in _png_chunks(bytes(data)) if c[1] == b"IDAT")
    data[pos + 8 + length] ^= 1  # the IDAT's CRC
    paths.append(tmp_path / "crc.png")
    paths[-1].write_bytes(bytes(data))
    code = ("import sys, cliutil; cliutil.quiet_opencv()\n"
            "from annotator.video import FrameSourceError, read_image\n"
            "for path in sys.argv[1:]:\n"
            "    try: read_image(path)\n    except FrameSourceError as e: print(e)")
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [f"{p}: not a readable image" for p in paths]


def test_shortfall_rule_with_the_frames_times():
    """Frames whose times reach the container's end (within the count's tolerance) are a
    variable frame rate or frames missing inside, not a truncated file: one line, kept. Times
    that stop early still mean a truncated file, and AVI's times (frames / nominal rate) judge
    exactly as the count does."""
    line = shortfall_verdict("f.mkv", 60, 122, 30.0, last_time=3.89)  # 3.89 x 30 + 1 = 117.7: 4.3 short <= 12
    # (12: a tenth of 122); 60 / (3.89 + 1 / 30) = 15.29
    assert line == ("f.mkv: decoded 60 frames, not the 122 its container claims or implies (at 30 fps nominal), "
                    "but their times reach its end: its frame rate varies (15.29 fps on average), or frames are "
                    "missing inside it; the decoded frames are kept")
    with pytest.raises(TruncatedVideoError):  # 3.6 x 30 + 1 = 109 frames spanned: 13 short > 12
        shortfall_verdict("f.mkv", 60, 122, 30.0, last_time=3.6)
    with pytest.raises(TruncatedVideoError):
        shortfall_verdict("f.mkv", 60, 122, 30.0, last_time=1.97)  # stopped at 60 frames' time: truncated
    assert shortfall_verdict("f.mkv", 120, 122, 30.0, last_time=1.0) is None  # within the slack: no word
    # an MKV whose first frame is at 1 s: its count, from the file's 0, is 30 frames more
    assert "their times reach its end" in shortfall_verdict("f.mkv", 60, 152, 30.0, last_time=3.89, start=1.0)
    with pytest.raises(TruncatedVideoError):
        shortfall_verdict("f.mkv", 60, 152, 30.0, last_time=3.89)
    # constant 25 fps from 0.5 s: 30 frames, all there, counted from 0 as 42: nothing to say
    assert shortfall_verdict("b.mkv", 30, 42, 25.0, last_time=1.16, start=0.5) is None
    with pytest.raises(TruncatedVideoError):
        shortfall_verdict("b.mkv", 30, 42, 25.0, last_time=1.16)
    with pytest.raises(TruncatedVideoError):  # times that jump past the end (a TS discontinuity) reach no end
        shortfall_verdict("f.ts", 60, 122, 30.0, last_time=10.0)
    with pytest.raises(TruncatedVideoError):  # a start past the claimed end (a broadcast's clock) is no count
        shortfall_verdict("f.ts", 60, 122, 30.0, last_time=1.97, start=36000.0)
    for decoded in (36, 35):  # AVI: last_time = (decoded - 1) / fps, the same verdict as without it
        for last in (None, (decoded - 1) / 25):
            try:
                got = shortfall_verdict("c.avi", decoded, 40, 25.0, last_time=last)
            except TruncatedVideoError as e:
                got = type(e)
            assert got == (TruncatedVideoError if decoded == 35 else shortfall_verdict("c.avi", 36, 40, 25.0))


def test_a_variable_frame_rate_mkv_is_read_whole_and_a_cut_one_is_still_truncated(tmp_path):
    """An MKV stores no frame count: FFmpeg estimates duration x nominal rate, 118 for 60 frames
    of 33 then 100 ms at a nominal 30 fps (the last taken as 33). All 60 decode, with one line (this was called
    truncated: the helper's 1200-frame screen-recording-like clip could not be colourised). The
    same file cut in half (its header still states the whole duration) stays truncated."""
    from tests.helpers import vfr_video

    path, _ = vfr_video(tmp_path / "vfr.mkv", [33] * 30 + [100] * 30)
    assert probe(path).frame_count == 118  # 3.923 s (the last frame: 33 ms, its packet's duration) x 30
    lines = []
    got = list(iter_frames(path, warn=lines.append))
    assert [i for i, _, _ in got] == list(range(60)) and len(lines) == 1
    assert lines[0].startswith(f"{path}: decoded 60 frames, not the 118 its container claims or implies "
                               "(at 30 fps nominal), but their times reach its end"), lines
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TruncatedVideoError, match=r"cut.mkv: truncated or corrupt: decoded \d+ of 118 frames"):
        list(iter_frames(cut, warn=lines.append))
    late, _ = vfr_video(tmp_path / "late.mkv", [33] * 30 + [100] * 30, start_ms=1000)  # its first frame at 1 s
    assert probe(late).frame_count == 148  # counted from the file's 0
    lines = []
    assert len(list(iter_frames(late, warn=lines.append))) == 60 and "their times reach its end" in lines[0]
