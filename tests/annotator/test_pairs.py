import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotator.build_many import build_all
from annotator.pairs import (
    BuildOptions, build_movie, count_pairs, frame_path, list_movies, load_meta, load_similarity,
    movie_id_for, pair_mask, stored_size,
)
from annotator.similarity import similarity_table, small_gray
from annotator.video import FrameSourceError
from tests.annotator.clips import panning_clip, table_from_pairs, write_folder, write_video

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "bigbuckbunny.mp4"
OPTS = BuildOptions(size=64, window=5, threads=1)


def test_band_semantics_exact():
    w = 4
    sim = table_from_pairs(12, w, {
        (0, 3): 0.95,     # in band, gap 3 -> pair
        (1, 2): 0.95,     # in band but gap 1 < min_gap
        (2, 6): 0.94,     # == low: excluded (strict)
        (3, 7): 0.97,     # == high: excluded (strict)
        (4, 8): 0.9400001,  # just inside
        (5, 9): 0.9699999,  # just inside
        (6, 9): 0.99,     # above band
        (8, 11): 0.96,    # pair at the end of the movie
    })
    mask = pair_mask(sim, 0.94, 0.97, 3)
    got = {(i, i + d - w) for i, d in zip(*np.nonzero(mask))}
    want = {(0, 3), (4, 8), (5, 9), (8, 11)}
    assert got == want | {(j, i) for i, j in want}  # symmetric
    assert count_pairs(sim, 0.94, 0.97, 3) == 4
    assert count_pairs(sim, 0.94, 0.97, 1) == 5  # (1, 2) joins when the gap allows it
    assert count_pairs(sim, 0.9, 0.999, 3) == 7
    assert not pair_mask(np.full((3, 9), np.nan, np.float32)).any()  # NaN (outside the movie) never pairs
    with pytest.raises(ValueError):
        pair_mask(sim, 0.97, 0.94)
    with pytest.raises(ValueError, match="band is empty"):  # low == high: no value is strictly between
        pair_mask(sim, 0.95, 0.95)
    with pytest.raises(ValueError, match=r"^band ends must be numbers \(low=0.94, high=nan\)$"):
        pair_mask(sim, 0.94, float("nan"))
    with pytest.raises(ValueError):
        pair_mask(sim, 0.94, 0.97, 0)


def test_sim_size_must_leave_ssim_a_valid_area():
    """SSIM's 11x11 window ("valid" border) needs 12 pixels for a 2x2 area; at 11 (1x1) or less
    every similarity would be NaN and the movie would build "fine" with no pairs."""
    BuildOptions(sim_size=12).validate()
    for bad in (11, 10):
        with pytest.raises(ValueError, match=rf"--sim-size must be in 12..512 \(got {bad}\)"):
            BuildOptions(sim_size=bad).validate()


def test_sizes_have_upper_bounds():
    """Typos such as 100000 are refused up front, not met as a 37 GiB allocation per movie."""
    BuildOptions(size=4320, sim_size=512).validate()
    with pytest.raises(ValueError, match=r"^--size must be 0 or a multiple of 8 up to 4320 \(got 4328\)$"):
        BuildOptions(size=4328).validate()
    with pytest.raises(ValueError, match=r"^--sim-size must be in 12..512 \(got 513\)$"):
        BuildOptions(sim_size=513).validate()


def test_window_longer_than_the_movie_is_capped_at_its_frame_count(tmp_path):
    """--window 100 on 7 frames stores (7, 13), not (7, 201) columns of NaN: the farthest
    neighbour is 6 frames away. The readers take the window from the array's width."""
    frames = panning_clip(7, 32, 48)
    src = write_folder(frames, tmp_path / "clip")
    meta = build_movie(src, tmp_path / "data", options=BuildOptions(size=32, window=100, threads=1))
    sim = load_similarity(tmp_path / "data" / "clip")
    assert sim.shape == (7, 13) and meta["window"] == 6
    np.testing.assert_array_equal(sim, similarity_table([small_gray(f) for f in frames], 6))
    assert not np.isnan(sim[0, 6:]).any() and not np.isnan(sim[6, :7]).any()  # every column is used
    one = build_movie(write_folder(frames[:1], tmp_path / "one"), tmp_path / "data",
                      options=BuildOptions(size=32, window=100, threads=1))
    assert one["window"] == 1  # at least 1, as the band code needs
    np.testing.assert_array_equal(load_similarity(tmp_path / "data" / "one"), [[np.nan, 1, np.nan]])


def test_stored_size_and_ids(tmp_path):
    assert stored_size(1280, 720, 512) == (912, 512)
    assert stored_size(720, 1280, 512) == (512, 912)  # portrait
    assert stored_size(1920, 800, 512) == (1232, 512)  # scope 2.4:1, long side on the 8-grid
    assert stored_size(1280, 720, 0) == (1280, 720)
    # 0 keeps the source's short side on the 8-grid, as the VAE (build_latent_cache) needs
    assert stored_size(160, 90, 0) == (160, 88) and stored_size(90, 160, 0) == (88, 160)
    # down even from 7 px over the grid (300 -> 296, never up to 304: no upscaling); long side
    # 640 * 296 / 300 = 631.5 -> 632
    assert stored_size(640, 300, 0) == (632, 296) and stored_size(300, 640, 0) == (296, 632)
    assert stored_size(6, 5, 0) == (8, 8)
    assert stored_size(96, 64, 64) == (96, 64)
    assert movie_id_for("films/My Film (1950).mkv") == "My_Film__1950_"
    (tmp_path / "frames.v2").mkdir()
    assert movie_id_for(tmp_path / "frames.v2") == "frames.v2"
    # a leading dot would make it a hidden folder, which list_movies skips
    assert movie_id_for("clips/.hidden take.mkv") == "hidden_take" and movie_id_for("...") == "movie"
    # other scripts keep their letters (two Japanese titles must not both become '____'),
    # and a decomposed accent (macOS file names) gives the id of the composed one
    assert movie_id_for("films/東京物語.mp4") == "東京物語"
    assert movie_id_for("films/麦秋物語.mp4") == "麦秋物語"
    assert movie_id_for("Ame\u0301lie: 2001.mkv") == movie_id_for("Am\u00e9lie: 2001.mkv") == "Am\u00e9lie__2001"


def test_build_movie_layout_and_exact_similarity(tmp_path):
    frames = panning_clip(20, 64, 96, cuts=(12,))
    src = write_folder(frames, tmp_path / "clip")
    opts = BuildOptions(size=64, window=5, image_format="png", threads=2)
    meta = build_movie(src, tmp_path / "data", options=opts)
    d = tmp_path / "data" / "clip"
    assert list_movies(tmp_path / "data") == ["clip"]
    assert sorted(p.name for p in d.iterdir()) == ["frames", "meta.json", "similarity.npy"]
    assert sorted(p.name for p in (d / "frames").iterdir()) == [f"{i:06d}.png" for i in range(20)]
    assert meta == load_meta(d)
    assert {k: meta[k] for k in ("kind", "fps", "frame_count", "source_size", "size", "window", "metric")} == {
        "kind": "folder", "fps": None, "frame_count": 20, "source_size": [96, 64], "size": [96, 64],
        "window": 5, "metric": "ssim"}
    assert meta["source"] == str(src.resolve()) and meta["metric_params"]["sim_size"] == [64, 64]
    # lossless frames: stored frames equal the source, and the table is their similarity
    stored = [cv2.imread(str(frame_path(d, i, "png")))[:, :, ::-1] for i in range(20)]
    for a, b in zip(stored, frames):
        np.testing.assert_array_equal(a, b)
    sim = load_similarity(d)
    np.testing.assert_array_equal(sim, similarity_table([small_gray(f) for f in frames], 5))
    assert meta["default_band"]["pairs"] == count_pairs(sim)
    assert not (tmp_path / "data" / ".partial" / "clip").exists()


def test_sim_size_is_the_size_the_similarity_is_computed_at(tmp_path):
    frames = panning_clip(6, 32, 48)
    opts = BuildOptions(size=32, window=2, sim_size=24, image_format="png", threads=1)
    meta = build_movie(write_folder(frames, tmp_path / "clip"), tmp_path / "data", options=opts)
    assert meta["metric_params"]["sim_size"] == [24, 24]
    sim = load_similarity(tmp_path / "data" / "clip")  # lossless frames at the source size: exact
    np.testing.assert_array_equal(sim, similarity_table([small_gray(f, 24) for f in frames], 2))


def test_every_file_is_on_disk_before_the_movie_is_published(tmp_path, monkeypatch):
    from tests.test_atomicio import synced_paths

    synced = synced_paths(monkeypatch)
    build_movie(write_folder(panning_clip(6, 16, 24), tmp_path / "clip"), tmp_path / "data", options=OPTS)
    tmp = tmp_path / "data" / ".partial" / "clip"
    published = sorted(p.relative_to(tmp_path / "data" / "clip") for p in (tmp_path / "data" / "clip").rglob("*"))
    assert len(published) == 9  # frames/, 6 frames, similarity.npy, meta.json
    assert set(synced[:-1]) == {str(tmp / p) for p in published} | {str(tmp)}  # under .partial: before the rename
    assert synced[-1] == str(tmp_path / "data")  # then the rename itself


def test_build_is_deterministic_and_resizes(tmp_path):
    src = write_video(panning_clip(15, 72, 128), tmp_path / "clip.avi")
    a = build_movie(src, tmp_path / "a", options=OPTS)
    build_movie(src, tmp_path / "b", options=BuildOptions(size=64, window=5, threads=3))
    assert a["size"] == [112, 64] and a["source_size"] == [128, 72]
    for i in range(15):
        a_i, b_i = frame_path(tmp_path / "a" / "clip", i), frame_path(tmp_path / "b" / "clip", i)
        assert a_i.read_bytes() == b_i.read_bytes()
    np.testing.assert_array_equal(load_similarity(tmp_path / "a" / "clip"), load_similarity(tmp_path / "b" / "clip"))


def test_failed_movie_leaves_nothing(tmp_path):
    src = write_folder(panning_clip(8, 16, 24), tmp_path / "clip")
    cv2.imwrite(str(src / "frame5.png"), np.zeros((16, 20, 3), np.uint8))
    with pytest.raises(FrameSourceError, match="frame5.png"):
        build_movie(src, tmp_path / "data", options=OPTS)
    assert list_movies(tmp_path / "data") == []
    assert not (tmp_path / "data" / "clip").exists() and not (tmp_path / "data" / ".partial" / "clip").exists()


def test_a_leftover_partial_folder_that_cannot_be_removed_is_named(tmp_path, monkeypatch):
    """A killed run's .partial/<id> that the next run cannot remove (read-only, another user's):
    the skip line said only "[Errno 17] File exists: '.../.partial/clip/frames'" (found with a
    read-only bind mount on it); it names the folder, why, and what to do."""
    import errno
    import shutil

    src = write_folder(panning_clip(4, 16, 24), tmp_path / "clip")
    left = tmp_path / "data" / ".partial" / "clip"
    (left / "frames").mkdir(parents=True)
    real = shutil.rmtree

    def read_only_leftover(path, ignore_errors=False, onerror=None):
        if Path(path) != left:
            return real(path, ignore_errors, onerror)
        if not ignore_errors:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), "000000.jpg")  # rmtree names it by its folder's fd
    monkeypatch.setattr(shutil, "rmtree", read_only_leftover)
    s = build_all([src], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    assert s.skipped == [f"{left}: left by an interrupted run, and it cannot be removed (Read-only file system); "
                         "remove it, then rerun"]
    assert list_movies(tmp_path / "data") == [] and (left / "frames").is_dir()


def test_sample_clip(tmp_path):
    """The real clip: 132 frames at 25 fps; its duplicated frames score exactly 1 and the
    default band finds pairs.

    Measured values (OpenCV 5.0 / FFmpeg decode, 2026-11-25) with tolerances for other
    decoder/OpenCV builds: 8-bit rounding differences move a similarity by ~1e-3, and 33
    pairs lie within 1e-3 of a band edge, of which a few may flip.
    """
    s = build_all([SAMPLE], tmp_path, BuildOptions(size=64), progress=False)
    assert not s.skipped and len(s.built) == 1
    meta = load_meta(tmp_path / "bigbuckbunny")
    assert (meta["frame_count"], meta["fps"], meta["source_size"], meta["size"]) == (132, 25.0, [1280, 720], [112, 64])
    sim = load_similarity(tmp_path / "bigbuckbunny")
    assert sim.shape == (132, 39)
    nxt = sim[:-1, 20]  # sim(i, i + 1)
    assert nxt.min() == pytest.approx(0.889, abs=0.01) and nxt.argmin() == 39  # the fastest motion
    assert (nxt > 0.9999).sum() == 5  # the clip repeats a frame every 25: those pairs score 1
    assert meta["default_band"]["pairs"] == count_pairs(sim)
    assert abs(count_pairs(sim) - 236) <= 5
    assert abs(int(pair_mask(sim).any(axis=1).sum()) - 75) <= 2  # frames that have a partner


def test_sample_clip_with_cuts(tmp_path):
    """Scenes spliced from the real clip: the two splices show up as the lowest next-frame
    similarities, far below any within-shot value."""
    from annotator.video import iter_frames

    frames = [f for _, _, f in iter_frames(SAMPLE)]
    order = list(range(0, 30)) + list(range(100, 132)) + list(range(30, 60))
    clip = write_folder([frames[i][::10, ::10] for i in order], tmp_path / "spliced", ext="jpg")
    build_movie(clip, tmp_path / "data", options=BuildOptions(size=64, window=3))
    nxt = load_similarity(tmp_path / "data" / "spliced")[:-1, 3 + 1]
    assert set(np.argsort(nxt)[:2]) == {29, 61}
    # measured 0.221 and 0.239 at the splices, 0.870 the lowest within a shot (tolerance 0.01)
    np.testing.assert_allclose(nxt[[29, 61]], [0.221, 0.239], atol=0.01)
    assert np.delete(nxt, [29, 61]).min() == pytest.approx(0.870, abs=0.01)


@pytest.mark.parametrize("content, why", [
    (b"\xff\xfe{}", "not valid JSON (not UTF-8 text: byte 0)"),  # UnicodeDecodeError: a ValueError naming no file
    (b"[1, 2]", "not a JSON object (it holds a list)"),  # was AttributeError ('list' object has no attribute 'get')
    (b"null", "not a JSON object (it holds a NoneType)"),
    (b"{}", "no 'frame_count' entry (not a meta.json written by build_pairs.py)"),  # was a KeyError later
    (b'{"frame_count": 3, "size": [8, 8]}', "no 'image_format' entry (not a meta.json written by build_pairs.py)"),
    (b"{", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2)"),  # cut short
    (b'{"frame_count": 3, "image_format": "png"}', "no 'size' entry (not a meta.json written by build_pairs.py)"),
    # were TypeErrors and AttributeErrors naming no file in build_latent_cache.py ("'int' and 'str'", ...)
    (b'{"frame_count": "3", "size": [8, 8], "image_format": "png"}', "its 'frame_count' holds \"3\", not a whole "
                                                                      "number >= 1 (not a meta.json written by "
                                                                      "build_pairs.py)"),
    (b'{"frame_count": 0, "size": [8, 8], "image_format": "png"}', "its 'frame_count' holds 0, not a whole number "
                                                                    ">= 1 (not a meta.json written by build_pairs.py)"),
    (b'{"frame_count": true, "size": [8, 8], "image_format": "png"}', "its 'frame_count' holds true, not a whole "
                                                                       "number >= 1 (not a meta.json written by "
                                                                       "build_pairs.py)"),
    (b'{"frame_count": 3.0, "size": [8, 8], "image_format": "png"}', "its 'frame_count' holds 3.0, not a whole "
                                                                      "number >= 1 (not a meta.json written by "
                                                                      "build_pairs.py)"),
    (b'{"frame_count": 3, "size": [8], "image_format": "png"}', "its 'size' holds [8], not [width, height] in whole "
                                                                 "pixels (not a meta.json written by build_pairs.py)"),
    (b'{"frame_count": 3, "size": "8x8", "image_format": "png"}', "its 'size' holds \"8x8\", not [width, height] in "
                                                                   "whole pixels (not a meta.json written by "
                                                                   "build_pairs.py)"),
    (b'{"frame_count": 3, "size": [8, 0], "image_format": "png"}', "its 'size' holds [8, 0], not [width, height] in "
                                                                    "whole pixels (not a meta.json written by "
                                                                    "build_pairs.py)"),
    (b'{"frame_count": 3, "size": [' + b"1000, " * 20 + b'8], "image_format": "png"}',
     "its 'size' holds [1000, 1000, 1000, 1000, 1000, 1000, ..., not [width, height] in whole pixels (not a "
     "meta.json written by build_pairs.py)"),
    (b'{"frame_count": 3, "size": [8, 8], "image_format": "jpg/../../../../etc/hostname"}',
     "its 'image_format' holds \"jpg/../../../../etc/hostname\", not 'jpg' or 'png' (not a meta.json written by "
     "build_pairs.py)"),
    (b'{"frame_count": 3, "size": [8, 8], "image_format": ["png"]}',
     "its 'image_format' holds [\"png\"], not 'jpg' or 'png' (not a meta.json written by build_pairs.py)"),
])
def test_a_meta_json_that_is_not_a_json_object_is_named(tmp_path, content, why):
    from annotator.pairs import load_meta

    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_meta(tmp_path)
    assert str(e.value) == f"{tmp_path / 'meta.json'}: {why}"


def test_meta_and_similarity_errors_show_a_folder_name_that_is_not_utf8_with_escapes(tmp_path):
    """As annotator.video.shown_path: \\xe9, not the surrogate escape a strict stdout (build_pairs.py's summary)
    cannot encode and stderr shows as \\udce9."""
    movie = tmp_path / os.fsdecode(b"caf\xe9")
    movie.mkdir()
    (movie / "meta.json").write_text("")
    (movie / "similarity.npy").write_bytes(b"")
    shown = f"{tmp_path}/caf\\xe9"
    for load, line in [(load_meta, f"{shown}/meta.json: not valid JSON (Expecting value: line 1 column 1)"),
                       (load_similarity, f"{shown}/similarity.npy: not a whole similarity table (empty, cut short or "
                                         f"not a .npy file); delete {shown} and rebuild it with build_pairs.py")]:
        with pytest.raises(ValueError) as e:
            load(movie)
        assert str(e.value) == line


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


NOT_READ = "empty, cut short or not a .npy file"


@pytest.mark.parametrize("content, why", [
    (b"", NOT_READ),  # was numpy's EOFError traceback
    (_npy(np.zeros((4, 5), np.float32))[:-8], NOT_READ),  # was "Failed to read all data ..." naming no file
    (b"not a table\n", NOT_READ),  # was "This file contains pickled (object) data"
    (_npy(np.zeros(5, np.float32)), "it holds a float32 array of shape (5,), not (frames, 2 x window + 1) floats"),
    (_npy(np.zeros((4, 4), np.float32)), "it holds a float32 array of shape (4, 4), not (frames, 2 x window + 1) "
                                         "floats"),
], ids=["empty", "cut short", "text", "1-D", "even width"])
def test_a_similarity_npy_that_is_not_a_whole_table_is_named(tmp_path, content, why):
    (tmp_path / "similarity.npy").write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_similarity(tmp_path)
    assert str(e.value) == f"{tmp_path / 'similarity.npy'}: not a whole similarity table ({why}); delete " \
                           f"{tmp_path} and rebuild it with build_pairs.py"


def test_a_similarity_npy_with_another_frame_count_than_meta_json_is_named(tmp_path):
    """similarity.npy copied from another build of the movie: its rows would pair the wrong frames, or
    frames past its end; load_similarity names both files and both counts."""
    (tmp_path / "meta.json").write_text('{"frame_count": 3, "size": [8, 8], "image_format": "png"}')
    (tmp_path / "similarity.npy").write_bytes(_npy(np.zeros((4, 3), np.float32)))
    with pytest.raises(ValueError) as e:
        load_similarity(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'similarity.npy'}: 4 rows, but {tmp_path / 'meta.json'} says 3 frames "
                            f"(files of two different builds); delete {tmp_path} and rebuild it with build_pairs.py")
    (tmp_path / "similarity.npy").write_bytes(_npy(np.zeros((3, 3), np.float32)))
    assert load_similarity(tmp_path).shape == (3, 3)


@pytest.mark.parametrize("options, message", [
    (dict(size=100), "--size must be 0 or a multiple of 8 up to 4320 (got 100)"),
    (dict(size=-8), "--size must be 0 or a multiple of 8 up to 4320 (got -8)"),
    (dict(threads=-1), "--threads and --decode-threads must be >= 0 (got -1, 0)"),
    (dict(decode_threads=-1), "--threads and --decode-threads must be >= 0 (got 0, -1)"),
    (dict(window=0), "--window must be >= 1 (got 0)"),
    (dict(metric="psnr"), "--metric must be one of ssim, ncc, l1 (got 'psnr')"),
    (dict(image_format="bmp"), "--format must be one of jpg, png"),
    (dict(quality=0), "--quality must be in 1..100 (got 0)"),
    (dict(quality=101), "--quality must be in 1..100 (got 101)"),
])
def test_build_options_refused_with_their_message(options, message):
    with pytest.raises(ValueError) as e:
        BuildOptions(**options).validate()
    assert str(e.value) == message


def test_build_options_at_their_edges_pass():
    for options in [dict(size=0), dict(size=8), dict(window=1), dict(quality=1), dict(quality=100),
                    dict(threads=0, decode_threads=0), dict(metric="l1", image_format="png")]:
        BuildOptions(**options).validate()


def test_similarity_is_of_the_stored_frames_after_the_resize(tmp_path):
    """48x72 frames stored at 32x48 (lossless): the table is the similarity of those stored
    frames, not of the source ones."""
    frames = panning_clip(6, 48, 72, speed=3)
    build_movie(write_folder(frames, tmp_path / "clip"), tmp_path / "data",
                options=BuildOptions(size=32, window=2, sim_size=16, image_format="png", threads=1))
    d = tmp_path / "data" / "clip"
    stored = [cv2.imread(str(frame_path(d, i, "png")))[:, :, ::-1] for i in range(6)]
    assert stored[0].shape == (32, 48, 3)
    sim = load_similarity(d)
    np.testing.assert_array_equal(sim, similarity_table([small_gray(f, 16) for f in stored], 2))
    assert not np.array_equal(sim, similarity_table([small_gray(f, 16) for f in frames], 2))


@pytest.mark.parametrize("fmt, quality, params", [
    ("jpg", 50, [cv2.IMWRITE_JPEG_QUALITY, 50]),
    ("png", 50, [cv2.IMWRITE_PNG_COMPRESSION, 1]),  # quality is for JPEG only
])
def test_frames_are_encoded_with_the_options(tmp_path, fmt, quality, params):
    frames = panning_clip(3, 16, 24)
    meta = build_movie(write_folder(frames, tmp_path / "clip"), tmp_path / "data",
                       options=BuildOptions(size=16, window=1, image_format=fmt, quality=quality, threads=1))
    for i, f in enumerate(frames):
        ok, want = cv2.imencode("." + fmt, np.ascontiguousarray(f[:, :, ::-1]), params)
        assert frame_path(tmp_path / "data" / "clip", i, fmt).read_bytes() == want.tobytes()
    assert meta["quality"] == (50 if fmt == "jpg" else None) and meta["image_format"] == fmt


def test_meta_records_the_options_and_the_metric(tmp_path, monkeypatch):
    """format_version 1, the --size given (0: the source's), the source as an absolute path even
    when given relative, and the metric's parameters (SSIM's only for ssim)."""
    monkeypatch.chdir(tmp_path)
    write_folder(panning_clip(4, 16, 24), tmp_path / "clip")
    meta = build_movie("clip", tmp_path / "data", options=BuildOptions(size=0, window=1, sim_size=12, threads=1))
    assert (meta["format_version"], meta["short_side"], meta["size"]) == (1, 0, [24, 16])
    assert meta["source"] == str(tmp_path / "clip") and meta["default_band"]["min_gap"] == 3
    input_ = ("8-bit BT.601 gray of the frame as resized for storing (before it is encoded: JPEG's loss is not "
              "scored), downscaled by exact 2x pixel-averaging halvings then one bilinear step")
    assert meta["metric_params"] == {"input": input_, "sim_size": [12, 12], "gaussian_sigma": 1.5, "window": 11,
                                     "c1": 0.01**2, "c2": 0.03**2, "data_range": 1.0, "border": "valid"}
    ncc = build_movie("clip", tmp_path / "ncc", options=BuildOptions(size=16, window=1, metric="ncc", threads=1))
    assert ncc["metric_params"] == {"input": input_, "sim_size": [64, 64]} and ncc["short_side"] == 16


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_frames_too_narrow_to_store_are_refused_naming_their_sizes(tmp_path, fmt):
    """2x600 frames at short side 512 would be 512x153600: JPEG cannot hold it, and the movie was
    skipped as "cannot encode frame 0 as jpg", as if the disk or encoder were at fault."""
    src = write_folder([np.full((600, 2, 3), 128, np.uint8)] * 3, tmp_path / "thin")
    with pytest.raises(FrameSourceError, match=r"thin: frames of 2x600 would be stored at 512x153600 \(short side "
                                               r"512\), over 65500 pixels a side: too narrow a picture for training "
                                               r"crops$"):
        build_movie(src, tmp_path / "data", options=BuildOptions(size=512, image_format=fmt, threads=1))
    assert not (tmp_path / "data" / "thin").exists() and not list((tmp_path / "data" / ".partial").glob("thin*"))
    assert build_movie(src, tmp_path / "data", options=BuildOptions(size=8, threads=1))["size"] == [8, 2400]


def test_an_existing_movie_is_refused_and_left_alone(tmp_path):
    src = write_folder(panning_clip(4, 16, 24), tmp_path / "clip")
    build_movie(src, tmp_path / "data", options=OPTS)
    before = load_similarity(tmp_path / "data" / "clip")
    with pytest.raises(FileExistsError, match=r"clip already exists$"):
        build_movie(src, tmp_path / "data", options=OPTS)
    np.testing.assert_array_equal(load_similarity(tmp_path / "data" / "clip"), before)


def test_a_killed_runs_partial_folder_is_rebuilt_and_a_held_lock_refused(tmp_path):
    from atomicio import try_lock

    src = write_folder(panning_clip(4, 16, 24), tmp_path / "clip")
    with try_lock(tmp_path / "data" / ".partial" / "clip.lock", make_parent=True) as got:
        assert got
        with pytest.raises(FileExistsError) as e:
            build_movie(src, tmp_path / "data", options=OPTS)
    assert str(e.value) == f"{src}: another run is building this movie in {tmp_path / 'data' / '.partial' / 'clip'}"
    stale = tmp_path / "data" / ".partial" / "clip" / "frames"
    stale.mkdir(parents=True)
    (stale / "000009.jpg").write_bytes(b"left by a killed run")
    build_movie(src, tmp_path / "data", options=OPTS)
    frames = sorted(p.name for p in (tmp_path / "data" / "clip" / "frames").iterdir())
    assert frames == [f"{i:06d}.jpg" for i in range(4)]


def test_progress_counts_every_frame_and_decode_threads_follow_the_threads(tmp_path, monkeypatch):
    """progress(1) per scored frame; decode threads 0 (auto) -> 1 for at most 2 threads, else
    FFmpeg's default (0); a value given is passed as is."""
    import annotator.pairs as pairs

    src = write_folder(panning_clip(9, 16, 24), tmp_path / "clip")
    seen = []
    real = pairs.iter_frames
    monkeypatch.setattr(pairs, "iter_frames", lambda *a, **kw: seen.append(kw["decode_threads"]) or real(*a, **kw))
    ticks = []
    build_movie(src, tmp_path / "a", options=BuildOptions(size=16, window=2, threads=1), progress=ticks.append)
    assert ticks == [1] * 9
    build_movie(src, tmp_path / "b", options=BuildOptions(size=16, window=2, threads=2))
    build_movie(src, tmp_path / "c", options=BuildOptions(size=16, window=2, threads=3))
    build_movie(src, tmp_path / "d", options=BuildOptions(size=16, window=2, threads=3, decode_threads=2))
    assert seen == [1, 1, 0, 2]


def test_list_movies_sorted_finished_and_not_hidden(tmp_path):
    assert list_movies(tmp_path / "missing") == []
    for name in ["m3", "b", "zz", "a1", ".hidden", "unfinished"]:
        (tmp_path / name).mkdir()
        if name != "unfinished":
            (tmp_path / name / "meta.json").write_text("{}")
    assert list_movies(tmp_path) == ["a1", "b", "m3", "zz"]
