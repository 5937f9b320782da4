"""annotator.build_many: many movies in one run - skips, notes, other runs' movies, progress,
the workers' watchdog (the CLI's signals and worker processes: tests/scripts/test_build_pairs.py)."""
import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotator import build_many
from annotator.build_many import Summary, build_all
from annotator.pairs import PARTIAL_DIR, BuildOptions
from tests.annotator.clips import panning_clip, write_folder

REPO = Path(__file__).resolve().parents[2]
OPTS = BuildOptions(size=64, window=5, threads=1)


def test_build_all_skips_bad_and_existing(tmp_path):
    good = write_folder(panning_clip(6, 16, 24), tmp_path / "good")
    (tmp_path / "empty").mkdir()
    lines = []
    s = build_all([good, tmp_path / "empty"], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert [m["movie_id"] for m in s.built] == ["good"] and s.frames == 6 and 0 < s.seconds < 60
    assert lines == [f"skipped: {tmp_path / 'empty'}: folder contains no image frames"]
    s2 = build_all([good], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert s2.built == [] and s2.existing == ["good"] and len(lines) == 1
    build_all([good], tmp_path / "data", BuildOptions(size=64, window=3), progress=False, log=lines.append)
    assert lines[1] == (f"note: {tmp_path / 'data' / 'good'}: kept, but it was built with window 5 (now 3); "
                        "delete it to rebuild")
    build_all([good], tmp_path / "data", replace(OPTS, sim_size=32, quality=80), progress=False, log=lines.append)
    assert lines[2] == (f"note: {tmp_path / 'data' / 'good'}: kept, but it was built with sim_size {OPTS.sim_size} "
                        f"(now 32), quality {OPTS.quality} (now 80); delete it to rebuild")
    meta = tmp_path / "data" / "good" / "meta.json"
    kept = meta.read_bytes()
    meta.write_text("")  # e.g. a copy cut short
    s4 = build_all([good], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert s4.built == [] and s4.skipped == [f"{meta}: not valid JSON (Expecting value: line 1 column 1); delete "
                                             f"{meta.parent} to rebuild it"]
    with pytest.MonkeyPatch.context() as m:  # a read error names the file too
        m.setattr(build_many, "load_meta", lambda d: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
        s5 = build_all([good], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert s5.skipped == [f"{meta}: unreadable (PermissionError: [Errno 13] Permission denied); delete {meta.parent} to "
                          "rebuild it"]
    meta.write_bytes(kept)
    other = write_folder(panning_clip(6, 16, 24, seed=3), tmp_path / "elsewhere" / "good")
    s3 = build_all([other], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert s3.built == [] and "already built from" in s3.skipped[0]
    assert json.loads((tmp_path / "data" / "good" / "meta.json").read_text())["source"] == str(good.resolve())


def test_a_data_root_without_write_permission_stops_the_run(tmp_path, monkeypatch):
    """EACCES creating DATA_ROOT/.partial (a chmod a-w DATA_ROOT) is DATA_ROOT's fault: an OutputError,
    not one "skipped: ... PermissionError" per movie with the movies blamed."""
    clips = [write_folder(panning_clip(4, 16, 24, seed=k), tmp_path / name) for k, name in enumerate("ab")]
    real = Path.mkdir

    def denied(self, *args, **kwargs):
        if self.name == PARTIAL_DIR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    lines = []
    with pytest.raises(build_many.OutputError) as e:
        build_all(clips, tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert str(e.value) == f"permission denied ({tmp_path / 'data'}); finished movies are kept, rerun to resume"
    assert isinstance(e.value.__cause__, PermissionError)  # the original, with its path, in a traceback
    assert lines == [] and os.listdir(tmp_path / "data") == []


def test_an_output_error_names_where_the_write_was_refused(tmp_path):
    """Only DATA_ROOT/.partial read-only (DATA_ROOT itself writable): the line named DATA_ROOT, where the
    user then found nothing wrong. A refused write names the file, or the folder it was to be made in; a
    full disk (or an error without a file name) names DATA_ROOT."""
    root = tmp_path / "data"
    (root / PARTIAL_DIR).mkdir(parents=True)
    (root / "taken.json").write_text("{}")
    cases = [(errno.EROFS, root / PARTIAL_DIR / "m1", root / PARTIAL_DIR),  # mkdir .partial/m1
             (errno.EACCES, root / PARTIAL_DIR / "m1" / "frames", root / PARTIAL_DIR / "m1"),
             (errno.EACCES, root / "taken.json", root / "taken.json"),  # an existing file that refuses
             (errno.EACCES, root, root),
             (errno.ENOSPC, root / PARTIAL_DIR / "m1" / "frames", root),
             (errno.EROFS, None, root),
             (errno.EPERM, root / PARTIAL_DIR / "m1", root / PARTIAL_DIR)]  # an immutable .partial (chattr +i)
    for code, filename, named in cases:
        e = OSError(code, os.strerror(code), *([str(filename)] if filename else []))
        with pytest.raises(build_many.OutputError) as got:
            build_many.raise_if_output_error(e, root)
        reason = os.strerror(code)
        assert str(got.value) == f"{reason[0].lower()}{reason[1:]} ({named}); finished movies are kept, rerun to resume"
        assert got.value.where == str(named) and got.value.errno == code
    build_many.raise_if_output_error(OSError(errno.EIO, "I/O error", str(root)), root)  # not DATA_ROOT's: no OutputError


def test_an_input_that_refuses_reading_with_eperm_is_still_a_bad_input(tmp_path, monkeypatch):
    """EPERM stops the run when a write under DATA_ROOT is refused; a frame that cannot be read
    with it is the movie's fault: skipped, the others built."""
    bad = write_folder(panning_clip(4, 16, 24), tmp_path / "bad")
    good = write_folder(panning_clip(4, 16, 24, seed=1), tmp_path / "good")
    real = np.fromfile

    def refused(path, *a, **kw):
        if Path(path).parent == bad:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(np, "fromfile", refused)
    lines = []
    s = build_all([bad, good], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert [m["movie_id"] for m in s.built] == ["good"]
    assert lines == [f"skipped: {bad / 'frame0.png'}: cannot read file (Operation not permitted)"]


def test_an_input_named_twice_is_one_movie_not_a_clash(tmp_path, monkeypatch):
    """`films/* films/a` or `a a/`: was skipped as "movie id 'a' is also used by a; rename one of them" (exit 1),
    advice that cannot apply to one folder; two inputs with one id are still a clash."""
    a = write_folder(panning_clip(4, 16, 24), tmp_path / "a")
    other = write_folder(panning_clip(4, 16, 24, seed=1), tmp_path / "x" / "a")
    lines = []
    s = build_all([a, f"{a}/", tmp_path / "." / "a"], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert [m["movie_id"] for m in s.built] == ["a"] and s.skipped == [] and lines == []
    s = build_all([a, other], tmp_path / "data2", OPTS, progress=False, log=lines.append)
    assert s.skipped == [f"{other}: movie id 'a' is also used by {a}; rename one of them"]
    upper = write_folder(panning_clip(4, 16, 24, seed=2), tmp_path / "A")
    assert not build_many.folds_case(tmp_path)  # Linux's file systems: two movies
    s = build_all([a, upper], tmp_path / "data4", OPTS, progress=False, log=lines.append)
    assert sorted(m["movie_id"] for m in s.built) == ["A", "a"] and s.skipped == []
    # where one folder holds both (macOS's and Windows' defaults): the second is refused, before any work; the
    # same input named in two cases is one movie
    monkeypatch.setattr(build_many, "folds_case", lambda folder: True)
    s = build_all([a, upper], tmp_path / "data5", OPTS, progress=False, log=lines.append)
    assert [m["movie_id"] for m in s.built] == ["a"]
    assert s.skipped == [f"{upper}: movie id 'A' differs from 'a' of {a} only in case, and {tmp_path / 'data5'} "
                         "holds one folder for both; rename one of them"]
    monkeypatch.setattr(build_many, "_same_file", lambda x, y: True)
    s = build_all([a, upper], tmp_path / "data6", OPTS, progress=False, log=lines.append)
    assert [m["movie_id"] for m in s.built] == ["a"] and s.skipped == []
    loop = tmp_path / "loop.mp4"  # a symlink loop named twice: Path.resolve() raised RuntimeError
    loop.symlink_to(loop)
    s = build_all([loop, tmp_path / "." / "loop.mp4"], tmp_path / "data3", OPTS, progress=False, log=lines.append)
    assert s.skipped == [f"{loop}: no such file or folder"]


def test_a_window_capped_at_the_movie_length_is_no_option_change(tmp_path):
    """A 6-frame movie built with window 50 stores window 5; a rerun with 50 (or 5) is no change, 4 is."""
    good = write_folder(panning_clip(6, 16, 24), tmp_path / "good")
    lines = []
    build_all([good], tmp_path / "data", replace(OPTS, window=50), progress=False, log=lines.append)
    for window in (50, 5):
        s = build_all([good], tmp_path / "data", replace(OPTS, window=window), progress=False, log=lines.append)
        assert s.existing == ["good"] and lines == []
    build_all([good], tmp_path / "data", replace(OPTS, window=4), progress=False, log=lines.append)
    assert lines == [f"note: {tmp_path / 'data' / 'good'}: kept, but it was built with window 5 (now 4); "
                     "delete it to rebuild"]


def test_summary_notes_that_the_default_band_is_for_ssim():
    meta = {"frame_count": 10, "metric": "ssim", "default_band": {"pairs": 4}}
    assert "note:" not in Summary(built=[meta]).text()
    text = Summary(built=[meta, {**meta, "metric": "ncc"}, {**meta, "metric": "l1"}]).text()
    assert "12 pairs in the default band" in text
    assert ("note: the default band was chosen for SSIM; for l1, ncc similarities its pair count means little: "
            "choose --low/--high for training") in text


def test_a_run_leaves_partial_alone_while_another_run_builds_there(tmp_path):
    """A run that ends removes DATA_ROOT/.partial only when it is empty (os.rmdir): a movie
    another run is building there (holding its lock) is never touched; the last run to end
    removes it."""
    from annotator.pairs import movie_lock

    good = write_folder(panning_clip(6, 16, 24), tmp_path / "good")
    busy = tmp_path / "data" / ".partial" / "other_run" / "frames"
    busy.mkdir(parents=True)
    (busy / "000000.jpg").write_bytes(b"another run's frame")
    with movie_lock(tmp_path / "data", "other_run") as mine:
        assert mine
        s = build_all([good], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    assert [m["movie_id"] for m in s.built] == ["good"]
    assert (busy / "000000.jpg").read_bytes() == b"another run's frame"
    (busy / "000000.jpg").unlink()
    busy.rmdir()
    busy.parent.rmdir()  # the other run is done with its movie
    build_all([good], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    assert not (tmp_path / "data" / ".partial").exists()


def test_the_lock_of_a_finished_movie_left_by_a_killed_run_is_removed(tmp_path):
    """SIGKILL between publishing a movie (the rename, then an fsync of DATA_ROOT) and removing its
    lock left DATA_ROOT/.partial/<id>.lock, which every later run skipped as a finished movie's: the
    data root then never became what an uninterrupted run makes (found by a real-process stress
    run). A lock another run holds stays."""
    import fcntl

    a, b = clips_named(tmp_path, "ab")
    root = tmp_path / "data"
    build_all([a, b], root, OPTS, progress=False, log=lambda line: None)
    (root / PARTIAL_DIR).mkdir()
    (root / PARTIAL_DIR / "a.lock").touch()  # what the kill leaves
    held = os.open(root / PARTIAL_DIR / "b.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a run that holds it (finding the movie finished, say)
    try:
        s = build_all([a, b], root, OPTS, progress=False, log=lambda line: None)
    finally:
        os.close(held)
    assert s.existing == ["a", "b"] and os.listdir(root / PARTIAL_DIR) == ["b.lock"]
    build_all([a, b], root, OPTS, progress=False, log=lambda line: None)
    assert sorted(os.listdir(root)) == ["a", "b"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("they", ["finish it", "die"])
def test_a_movie_another_run_is_building_is_waited_for_at_the_end(tmp_path, workers, they):
    """Two runs given the same movie: the second must not delete the first one's .partial folder
    (as if a killed run had left it), or the first would publish missing frames. It was skipped
    as bad input (exit 1, a --strict stop); it is now left to the end and waited for, then taken
    as the other run left it: finished (counted, not rebuilt), or built here if that run died."""
    import fcntl

    a, good = clips_named(tmp_path, "ag")
    root = tmp_path / "data"
    theirs = root / ".partial" / "g" / "frames"
    theirs.mkdir(parents=True)
    (theirs / "000000.jpg").write_bytes(b"the other run's frame")
    held = os.open(theirs.parent.parent / "g.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # what the other run's build_movie holds
    lines, waiting, result = [], threading.Event(), {}

    def log(line):
        lines.append(line)
        if line.startswith("later: "):
            waiting.set()

    run = threading.Thread(target=lambda: result.update(s=build_all([a, good], root, OPTS, workers=workers, strict=True,
                                                                    progress=False, log=log)))
    run.start()
    try:
        assert waiting.wait(60), lines
        assert lines == [f"later: {good}: another run is building this movie in {theirs.parent}; this run waits for it "
                         "at the end"]
        time.sleep(0.3)
        assert run.is_alive() and (theirs / "000000.jpg").read_bytes() == b"the other run's frame"
        if they == "finish it":  # as build_movie publishes: the finished folder renamed into place
            build_all([good], tmp_path / "theirs", OPTS, progress=False, log=lambda line: None)
            shutil.rmtree(theirs.parent)
            os.rename(tmp_path / "theirs" / "g", root / "g")
            published = (root / "g" / "meta.json").read_bytes()
    finally:
        os.close(held)
        run.join(60)
    s = result["s"]
    assert not run.is_alive() and s.skipped == [] and not s.stopped
    assert [m["movie_id"] for m in s.built] == (["a"] if they == "finish it" else ["a", "g"])
    assert s.by_others == (["g"] if they == "finish it" else [])
    if they == "finish it":
        assert (root / "g" / "meta.json").read_bytes() == published and "built by another run meanwhile: 1" in s.text()
    assert sorted(os.listdir(root)) == ["a", "g"] and len(lines) == 1  # .partial removed: nothing left


def test_a_strict_stop_lists_a_movie_another_run_had_as_not_built(tmp_path):
    """The busy movie was counted as ended: a --strict stop before the wait left it out of "not
    built" (a review found it)."""
    import fcntl

    a, b = clips_named(tmp_path, "ab")
    cv2.imwrite(str(b / "frame3.png"), np.zeros((16, 20, 3), np.uint8))  # another size: bad input
    root = tmp_path / "data"
    (root / ".partial").mkdir(parents=True)
    held = os.open(root / ".partial" / "a.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # another run is building a
    try:
        s = build_all([a, b], root, OPTS, strict=True, progress=False, log=lambda line: None)
    finally:
        os.close(held)
    assert s.stopped and s.not_built == ["a"] and s.by_others == [] and len(s.skipped) == 1
    assert s.text().splitlines()[-1] == "stopped early because of --strict; not built: a"


def test_overall_progress_ends_at_100_percent_when_a_movie_is_skipped(tmp_path, capsys):
    """The overall bar starts from the claimed frame counts (6 + 8); the movie that fails at
    its fifth frame gives back what it did not build, so the bar ends full."""
    good = write_folder(panning_clip(6, 16, 24), tmp_path / "a_good")
    bad = write_folder(panning_clip(8, 16, 24), tmp_path / "b_bad")
    cv2.imwrite(str(bad / "frame4.png"), np.zeros((16, 20, 3), np.uint8))
    s = build_all([good, bad], tmp_path / "data", OPTS, progress=True, log=lambda line: None)
    assert len(s.built) == 1 and len(s.skipped) == 1
    renders = re.findall(r"all movies: +(\d+)%\|[^|]*\| (\d+)/(\d+)", capsys.readouterr().err)
    assert renders and int(renders[0][2]) == 14  # the first render: the claimed counts
    pct, n, total = map(int, renders[-1])
    assert (pct, n) == (100, total) and 6 <= total < 14


def test_progress_off_a_terminal_is_one_bar_and_none_when_all_is_built(tmp_path, capsys):
    """stderr here is not a terminal: no per-movie bars (their cursor moves would be stray
    escape codes in a log); a rerun with nothing to build prints no bar at all."""
    good = write_folder(panning_clip(6, 16, 24), tmp_path / "good")
    build_all([good], tmp_path / "data", OPTS, progress=True, log=lambda line: None)
    err = capsys.readouterr().err
    assert "all movies" in err and "good:" not in err and "\x1b[A" not in err
    build_all([good], tmp_path / "data", OPTS, progress=True, log=lambda line: None)
    assert capsys.readouterr().err == ""


def test_worker_watchdog_ends_an_orphaned_worker(tmp_path):
    """The portable half of the workers' parent-death watchdog (getppid polling, no prctl):
    a process whose parent exits ends within a second instead of running on."""
    child = ("import os, sys, time; from annotator.build_many import _exit_with_parent; "
             "_exit_with_parent(os.getppid(), use_prctl=False); print('ready', flush=True); time.sleep(60)")
    parent = ("import subprocess, sys; "
              f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE); "
              "c.stdout.readline(); print(c.pid, flush=True)")  # then exits without waiting for it
    out = subprocess.run([sys.executable, "-c", parent], cwd=REPO, capture_output=True, text=True, timeout=60)
    pid = int(out.stdout)
    deadline = time.time() + 3
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.02)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # an orphan reaped late shows as a zombie: it has ended
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_workers_share_the_cores_between_them(tmp_path, monkeypatch):
    """Each of `workers` movie builds gets cpu_count // workers encoder threads (one process
    here: the workers=1 path with a stand-in core count)."""
    import annotator.build_many as bm

    seen = []
    monkeypatch.setattr(bm.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(bm, "_build_parallel", lambda todo, root, options, *a: seen.append(options.threads))
    clips = [write_folder(panning_clip(4, 16, 24, seed=k), tmp_path / f"m{k}") for k in range(3)]
    build_all(clips, tmp_path / "d", replace(OPTS, threads=0), workers=2, progress=False, log=lambda line: None)
    assert seen == [4]


def test_a_png_movie_rebuilt_with_the_same_options_gets_no_note():
    """PNG movies record no JPEG quality: the same options must not read as a change."""
    from annotator.build_many import option_changes

    png = replace(OPTS, image_format="png")
    meta = {"short_side": png.size, "window": png.window, "metric": png.metric, "image_format": "png",
            "quality": None, "metric_params": {"sim_size": [png.sim_size, png.sim_size]}}
    assert option_changes(meta, png) == []
    assert option_changes({**meta, "image_format": "jpg", "quality": 95}, replace(OPTS, quality=95)) == []
    assert option_changes(meta, replace(png, window=png.window + 1)) == [f"window {png.window} (now {png.window + 1})"]


def test_summary_text_in_full():
    meta = {"frame_count": 10, "metric": "ssim", "default_band": {"pairs": 4}}
    s = Summary(built=[meta, {**meta, "frame_count": 5}], existing=["x"], skipped=["a: bad", "b: worse"],
                warnings=["c: odd"], not_in_shard=3, seconds=2.0, stopped=True, not_built=["d", "e"])
    assert s.text() == "\n".join([
        "built 2 movie(s): 15 frames, 8 pairs in the default band (0.94 < sim < 0.97, gap >= 3; 16 (reference, "
        "target) pairs, as training counts them), 2.0 s, 7.5 frames/s",
        "already built (skipped): 1", "bad input (skipped): 2", "  a: bad", "  b: worse",
        "built with a warning: 1", "  c: odd", "left to other shards: 3",
        "stopped early because of --strict; not built: d, e"])
    assert Summary(stopped=True).text().splitlines()[-1] == "stopped early because of --strict"
    assert Summary(built=[meta], seconds=0.04).text().splitlines()[0].endswith(", 0.0 s, 250.0 frames/s")



def test_an_input_given_by_another_path_to_its_source_is_that_movie(tmp_path, monkeypatch):
    """meta.json records the real path: the same folder named relatively is the movie already built."""
    good = write_folder(panning_clip(4, 16, 24), tmp_path / "good")
    build_all([good], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    monkeypatch.chdir(tmp_path)
    lines = []
    s = build_all(["good"], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert s.existing == ["good"] and s.skipped == [] and lines == []


def test_option_changes_names_every_option_in_order():
    from annotator.build_many import option_changes

    meta = {"frame_count": 20, "short_side": 64, "window": 5, "metric": "ssim", "image_format": "jpg",
            "quality": 95, "metric_params": {"sim_size": [64, 64]}}
    now = BuildOptions(size=128, window=7, metric="ncc", image_format="png", sim_size=32)
    assert option_changes(meta, now) == ["short_side 64 (now 128)", "window 5 (now 7)", "metric ssim (now ncc)",
                                         "image_format jpg (now png)", "sim_size 64 (now 32)", "quality 95 (now None)"]
    old = {k: v for k, v in meta.items() if k != "metric_params"}  # a meta.json of before metric_params
    assert option_changes(old, replace(now, size=64, window=5, metric="ssim", image_format="jpg")) == \
        ["sim_size None (now 32)"]
    one = {**meta, "frame_count": 1, "window": 1}  # a one-frame movie stores window 1 (at least 1)
    assert option_changes(one, BuildOptions(size=64, window=5, sim_size=64)) == []


def test_build_all_checks_the_options_before_anything(tmp_path):
    good = write_folder(panning_clip(4, 16, 24), tmp_path / "good")
    with pytest.raises(ValueError, match="--size must be"):
        build_all([good], tmp_path / "data", replace(OPTS, size=100), progress=False, log=lambda line: None)
    assert not (tmp_path / "data").exists()


def test_strict_stops_before_building_on_bad_input_found_in_the_plan(tmp_path):
    good = write_folder(panning_clip(4, 16, 24), tmp_path / "good")
    (tmp_path / "empty").mkdir()
    lines = []
    s = build_all([good, tmp_path / "empty"], tmp_path / "data", OPTS, strict=True, progress=False, log=lines.append)
    assert s.built == [] and s.stopped and s.not_built == ["good"] and not (tmp_path / "data" / "good").exists()
    assert lines == [f"skipped: {tmp_path / 'empty'}: folder contains no image frames"]


def test_no_more_workers_than_movies(tmp_path, monkeypatch):
    """8 workers for 3 movies are 3 (8 // 3 = 2 threads each); 4 for one movie build it in this
    process with all 8 threads."""
    seen = []
    monkeypatch.setattr(build_many.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(build_many, "_build_parallel",
                        lambda todo, root, options, workers, *a: seen.append(("parallel", workers, options.threads)))
    monkeypatch.setattr(build_many, "_build_one", lambda mid, path, root, options, *a: seen.append(
        ("here", options.threads)) or "skipped")
    clips = [write_folder(panning_clip(4, 16, 24, seed=k), tmp_path / f"m{k}") for k in range(3)]
    build_all(clips, tmp_path / "d", replace(OPTS, threads=0), workers=8, progress=False, log=lambda line: None)
    build_all(clips[:1], tmp_path / "d", replace(OPTS, threads=0), workers=4, progress=False, log=lambda line: None)
    assert seen == [("parallel", 3, 2), ("here", 8)]


def test_overall_progress_ends_at_100_percent_when_strict_stops_the_run(tmp_path, capsys):
    """The movie left unbuilt gives back its claimed frames too."""
    bad = write_folder(panning_clip(8, 16, 24), tmp_path / "a_bad")
    cv2.imwrite(str(bad / "frame4.png"), np.zeros((16, 20, 3), np.uint8))
    good = write_folder(panning_clip(6, 16, 24), tmp_path / "b_good")
    s = build_all([bad, good], tmp_path / "data", OPTS, strict=True, progress=True, log=lambda line: None)
    assert s.stopped and s.not_built == ["b_good"]
    renders = re.findall(r"all movies: +(\d+)%\|[^|]*\| (\d+)/(\d+)", capsys.readouterr().err)
    assert int(renders[0][2]) == 14
    pct, n, total = map(int, renders[-1])
    assert (pct, n) == (100, total) and total < 8


def test_per_movie_bars_take_the_lowest_free_line_and_the_claimed_total(monkeypatch, capsys):
    """On a terminal each movie's bar has its own line below the overall bar: a movie that
    starts takes the line a finished one left, not one below the last (which another holds)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bars = build_many._Bars([("a", None, 5), ("b", None, 0), ("c", None, 7), ("d", None, 9)], True)
    for mid in "ab":
        bars.advance(mid, 1)
    bars.finish("a")
    for mid in "cd":
        bars.advance(mid, 1)
    assert {mid: (abs(bar.pos), bar.total) for mid, bar in bars.bars.items()} == \
        {"b": (2, None), "c": (1, 7), "d": (3, 9)}  # b claimed no count
    bars.close()


@pytest.mark.parametrize("error, line", [
    (OSError(errno.EIO, "Input/output error"), "OSError: [Errno 5] Input/output error"),
    (ValueError("bad frame range 0:-1"), "ValueError: bad frame range 0:-1"),  # a skip, not the run's end
    (cv2.error("OpenCV(4) resize.cpp:1: error: (-215) !ssize.empty()"), "error: OpenCV(4) resize.cpp:1: error: (-215) "
                                                                         "!ssize.empty()")])
def test_a_movie_that_fails_to_build_is_one_line_with_the_error_type(tmp_path, monkeypatch, error, line):
    def failing(*args):
        raise error
    monkeypatch.setattr(build_many, "build_movie", failing)
    assert build_many._build_one("m", tmp_path / "m.mp4", tmp_path / "data", OPTS, None) == f"{tmp_path / 'm.mp4'}: {line}"


# ------------------------------------------------------- the worker loop, with stand-in workers

class FakeProc:
    """A worker process that has exited (`exitcode`) or runs until killed."""

    def __init__(self, exitcode=None):
        self.exitcode, self.killed = exitcode, False

    def is_alive(self):
        return self.exitcode is None

    def join(self, timeout=None):
        pass

    def kill(self):
        self.killed, self.exitcode = True, -9


def stand_in_workers(monkeypatch, scripts):
    """_start_worker replaced: movie id -> (messages it sends, exit code or None: still running,
    what it does on starting). Returns {id: FakeProc}."""
    import multiprocessing

    procs, open_ends = {}, []

    def start(ctx, mid, path, root, options):
        messages, exitcode, on_start = scripts[mid]
        read, write = multiprocessing.Pipe(duplex=False)
        for m in messages:
            write.send(m)
        if exitcode is None:
            open_ends.append(write)  # running: the pipe stays open
        else:
            write.close()
        if on_start:
            on_start(root)
        procs[mid] = FakeProc(exitcode)
        return build_many._Worker(mid, Path(path), procs[mid], read)
    monkeypatch.setattr(build_many, "_start_worker", start)
    return procs


def in_time(fn, seconds=30):
    """fn() in a thread that must end within `seconds` (a loop that waits forever fails the test)."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "still running"
    if "error" in out:
        raise out["error"]
    return out["value"]


def clips_named(tmp_path, names):
    return [write_folder(panning_clip(4, 16, 24, seed=k), tmp_path / name) for k, name in enumerate(names)]


def test_workers_results_warnings_and_a_worker_that_died(tmp_path, monkeypatch):
    a, b = clips_named(tmp_path, "ab")
    meta = {"movie_id": "a", "frame_count": 4}
    stand_in_workers(monkeypatch, {"a": ([("progress", 3), ("warning", "a: odd"), ("result", meta)], 0, None),
                                   "b": ([("progress", 2)], -9, None)})
    lines = []
    s = in_time(lambda: build_all([a, b], tmp_path / "data", OPTS, workers=2, progress=False, log=lines.append))
    assert s.built == [meta] and s.warnings == ["a: odd"]
    assert s.skipped == [f"{b}: the worker process died (exit code -9) while building it"]
    assert sorted(lines) == [f"skipped: {s.skipped[0]}", "warning: a: odd"]  # both ended: either first


def a_full_and_b_building(tmp_path, monkeypatch):
    """Two movies in stand-in workers: a's finds DATA_ROOT full, b's is building (its .partial
    folder made) when the run stops it. Returns (a, b, DATA_ROOT, the workers by movie)."""
    a, b = clips_named(tmp_path, "ab")
    root = tmp_path / "data"

    def building(root):
        (root / PARTIAL_DIR / "b" / "frames").mkdir(parents=True)
    procs = stand_in_workers(monkeypatch, {"a": ([("output-error", (errno.ENOSPC, str(root)))], 0, None),
                                           "b": ([], None, building)})
    return a, b, root, procs


def test_a_worker_that_finds_data_root_full_stops_the_others(tmp_path, monkeypatch):
    a, b, root, procs = a_full_and_b_building(tmp_path, monkeypatch)
    with pytest.raises(build_many.OutputError) as e:
        in_time(lambda: build_all([a, b], root, OPTS, workers=2, progress=False, log=lambda line: None))
    assert str(e.value) == f"no space left on device ({root}); finished movies are kept, rerun to resume"
    assert e.value.errno == errno.ENOSPC and procs["b"].killed and not (root / PARTIAL_DIR).exists()


def test_a_stop_where_no_lock_can_be_made_keeps_its_own_line_and_stops_every_worker(tmp_path, monkeypatch):
    """DATA_ROOT/.partial read-only: a worker's EROFS stops the run, and the parent's clean-up,
    which locks each stopped movie before removing its partial output, cannot make the lock
    either. That OSError replaced the run's line ("[Errno 30] Read-only file system:
    '.../.partial/b.lock'", found with a read-only bind mount) and cut the clean-up of the other workers short."""
    a, b, c = clips_named(tmp_path, "abc")
    root = tmp_path / "data"

    def movie_lock(root, mid):  # what atomicio.try_lock's os.open raises on a read-only .partial
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(root / PARTIAL_DIR / f"{mid}.lock"))
    monkeypatch.setattr(build_many, "movie_lock", movie_lock)
    procs = stand_in_workers(monkeypatch, {"a": ([("output-error", (errno.EROFS, str(root)))], 0, None),
                                           "b": ([], None, None), "c": ([], None, None)})
    with pytest.raises(build_many.OutputError) as e:
        in_time(lambda: build_all([a, b, c], root, OPTS, workers=3, progress=False, log=lambda line: None))
    assert str(e.value) == f"read-only file system ({root}); finished movies are kept, rerun to resume"
    assert procs["b"].killed and procs["c"].killed


def test_strict_stop_keeps_what_finished_meanwhile_and_another_runs_movie(tmp_path, monkeypatch):
    """The first bad movie stops the run: a movie whose worker finished it just then counts as
    built; the partial output of one that another run has taken over since is left alone."""
    import fcntl

    clips = clips_named(tmp_path, "abc")
    root = tmp_path / "data"
    monkeypatch.setattr(build_many, "load_meta", lambda d: {"movie_id": d.name})

    def finished(root):
        (root / "b").mkdir()
        (root / "b" / "meta.json").write_text("{}")

    held = []

    def taken_over(root):  # by another run, which holds its lock now
        (root / PARTIAL_DIR / "c" / "frames").mkdir(parents=True)
        held.append(os.open(root / PARTIAL_DIR / "c.lock", os.O_CREAT | os.O_RDWR))
        fcntl.flock(held[0], fcntl.LOCK_EX)
    procs = stand_in_workers(monkeypatch, {"a": ([("result", "a: bad input")], 0, None), "b": ([], None, finished),
                                           "c": ([], None, taken_over)})
    try:
        s = in_time(lambda: build_all(clips, root, OPTS, workers=3, strict=True, progress=False,
                                      log=lambda line: None))
    finally:
        for fd in held:
            os.close(fd)
    assert s.stopped and s.skipped == ["a: bad input"] and s.built == [{"movie_id": "b"}] and s.not_built == ["c"]
    assert procs["b"].killed and procs["c"].killed
    assert (root / PARTIAL_DIR / "c" / "frames").is_dir()


def test_a_worker_reports_progress_in_batches_then_its_result(tmp_path, monkeypatch):
    """Progress goes in batches of at least 8 frames, the rest before the result; SIGINT is
    ignored (the parent stops the run), the signals the parent held around its start are let
    through again, and OpenCV runs on one thread."""
    import multiprocessing
    import signal

    calls = []
    monkeypatch.setattr(build_many, "_exit_with_parent", lambda pid: calls.append(pid))

    def building(mid, path, root, options, report, warn):
        for n in (3, 3, 3, 2):
            report(n)
        warn("odd")
        return {"movie_id": mid}

    def run(build):
        monkeypatch.setattr(build_many, "_build_one", build)
        read, write = multiprocessing.Pipe(duplex=False)
        build_many._worker_main(write, "m", "m.mp4", str(tmp_path), OPTS, 4242)
        got = []
        with contextlib.suppress(EOFError):  # the worker closed its end
            while True:
                got.append(read.recv())
        return got

    old_int, old_threads = signal.getsignal(signal.SIGINT), cv2.getNumThreads()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
    try:
        assert run(building) == [("progress", 9), ("warning", "odd"), ("progress", 2), ("result", {"movie_id": "m"})]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and cv2.getNumThreads() == 1
        assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        cv2.setNumThreads(old_threads)
    assert calls == [4242]

    def full(*args):
        raise build_many.OutputError(errno.ENOSPC, "elsewhere")
    assert run(full) == [("output-error", (errno.ENOSPC, "elsewhere"))]  # the folder the error names

    def bug(*args):
        raise KeyError("oops")
    assert run(bug) == [("result", "m.mp4: KeyError: 'oops'")]
    signal.signal(signal.SIGINT, old_int)
    cv2.setNumThreads(old_threads)


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX signal masks")
def test_a_worker_started_inside_signals_deferred_boots_with_both_signals_blocked():
    """The worker inherits the mask across spawn's exec: a Ctrl-C that reaches it while Python
    boots stays pending (until _worker_main ignores SIGINT) instead of a traceback from a
    half-started worker; SIGINT's handler itself is left as it was. In a fresh process: the
    first spawned child starts multiprocessing's resource tracker, whose start unblocked both
    in the parent before the worker was made (_spawn_context starts it first)."""
    script = (
        "import signal\n"
        "from annotator import build_many\n"
        "from tests.annotator.test_build_many import send_blocked_signals\n"
        "ctx = build_many._spawn_context()\n"
        "old_int = signal.getsignal(signal.SIGINT)\n"
        "read, write = ctx.Pipe(duplex=False)\n"
        "with build_many.signals_deferred():\n"
        "    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN\n"
        "    proc = ctx.Process(target=send_blocked_signals, args=(write,), daemon=True)\n"
        "    proc.start()\n"
        "write.close()\n"
        "assert read.poll(60)\n"
        "print(read.recv())\n"
        "proc.join(10)\n"
        "assert signal.getsignal(signal.SIGINT) is old_int\n"
        "print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import signal
    child, parent = (eval(line) for line in out.stdout.splitlines())
    assert {int(signal.SIGINT), int(signal.SIGTERM)} <= set(child)
    assert not {int(signal.SIGINT), int(signal.SIGTERM)} & set(parent)


def send_blocked_signals(conn):  # a spawned worker's first act: send the signals blocked while Python booted
    import signal
    conn.send(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX signal masks")
def test_ctrl_c_while_a_worker_starts_stops_the_run_even_when_another_thread_takes_it(tmp_path, monkeypatch):
    """A Ctrl-C in the milliseconds a worker takes to start was lost when a thread that does not
    block signals took it (numpy's BLAS pool, tqdm's monitor): SIGINT was set to SIG_IGN there,
    and the run went on to exit 0. Now it stops the run: no movie is published, nothing left in
    .partial."""
    import signal
    import threading

    clips = [write_folder(panning_clip(6, 16, 24, seed=i), tmp_path / f"m{i}") for i in range(2)]
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # started first: SIGINT unblocked there
    other.start()
    start = build_many._start_worker

    def start_then_ctrl_c(*args):
        w = start(*args)
        os.kill(os.getpid(), signal.SIGINT)  # the kernel hands it to `other`, the one thread not blocking it
        time.sleep(0.1)  # Python has run the handler by now
        return w
    monkeypatch.setattr(build_many, "_start_worker", start_then_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            build_all(clips, tmp_path / "data", OPTS, workers=2, progress=False, log=lambda line: None)
    finally:
        stop.set()
    root = tmp_path / "data"
    assert [p.name for p in root.iterdir() if p.name != PARTIAL_DIR] == []
    assert not (root / PARTIAL_DIR).exists() or list((root / PARTIAL_DIR).iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_worker_asks_the_kernel_for_sigkill_when_its_parent_dies():
    child = ("import ctypes, os; from annotator.build_many import _exit_with_parent; _exit_with_parent(os.getppid()); "
             "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)")  # GET
    out = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "9", out.stderr


def test_plan_shows_names_that_are_not_utf8_with_escapes(tmp_path):
    """Python reads b"caf\\xe9" in as surrogate escapes, which a strict stdout (the summary) cannot encode: plan's
    clash lines show such names as annotator.video.shown_path does (\\xe9), and encode as UTF-8."""
    name = os.fsdecode(b"caf\xe9")
    a = write_folder(panning_clip(4, 16, 24), tmp_path / "a").rename(tmp_path / name)
    b = write_folder(panning_clip(4, 16, 24, seed=1), tmp_path / "x" / "a").rename(tmp_path / "x" / name)
    skipped = build_many.plan([a, b], tmp_path / "data")[2]
    assert skipped == [f"{tmp_path}/x/caf\\xe9: movie id 'caf_' is also used by {tmp_path}/caf\\xe9; "
                       "rename one of them"]
    build_all([a], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    skipped = build_many.plan([b], tmp_path / "data")[2]
    assert skipped == [f"{tmp_path}/x/caf\\xe9: movie id 'caf_' was already built from {tmp_path}/caf\\xe9; "
                       f"rename this input or delete {tmp_path}/data/caf_"]
    assert skipped[0].encode("utf-8")


def test_a_source_built_under_another_id_is_kept_not_built_again(tmp_path):
    """The id rule changed between versions ('Amélie' was 'Am_lie'): an upgrade's rerun built the
    film a second time under its new id, and training then drew its frames twice as often."""
    film = write_folder(panning_clip(4, 16, 24), tmp_path / "Amélie")
    other = write_folder(panning_clip(4, 16, 24, seed=1), tmp_path / "Brazil")
    build_all([film, other], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    (tmp_path / "data" / "Amélie").rename(tmp_path / "data" / "Am_lie")  # as the earlier rule stored it
    lines = []
    s = build_all([film, other], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert s.built == [] and sorted(s.existing) == ["Am_lie", "Brazil"] and s.skipped == []
    assert lines == [f"note: {film}: already built as 'Am_lie' ({tmp_path / 'data' / 'Am_lie'}, an earlier "
                     "version's name for it); kept"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")) == ["Am_lie", "Brazil"]
    lines.clear()  # and its options are compared as any kept movie's are
    build_all([film], tmp_path / "data", replace(OPTS, window=2), progress=False, log=lines.append)
    assert lines[1:] == [f"note: {tmp_path / 'data' / 'Am_lie'}: kept, but it was built with window 3 (now 2); "
                         "delete it to rebuild"], lines  # 3: the 4 frames' cap of window 5
    # another film at a path of its own is no such case: built, whatever the folders' names
    third = write_folder(panning_clip(4, 16, 24, seed=2), tmp_path / "x" / "Am_lie2")
    assert [m["movie_id"] for m in build_all([third], tmp_path / "data", OPTS, progress=False,
                                             log=lambda line: None).built] == ["Am_lie2"]


def test_one_film_under_several_names_is_built_once(tmp_path):
    """A symlink or a hard link to a film was built a second time (the film then trained twice),
    and a rerun after a kill took the second name for an earlier version's id of the first: the
    result depended on whether a run had been killed. Built once, under the least id."""
    film = write_folder(panning_clip(4, 16, 24), tmp_path / "film")
    (tmp_path / "alias").symlink_to(film)
    video = tmp_path / "v.avi"  # and a hard link: the same inode under another name
    video.write_bytes(b"")
    os.link(video, tmp_path / "w.avi")
    plan = build_many.plan([tmp_path / "film", tmp_path / "alias"], tmp_path / "data")
    assert [mid for mid, _, _ in plan[0]] == ["alias"]
    assert plan[3] == [f"{tmp_path / 'film'}: the same file as {tmp_path / 'alias'}, built once as 'alias'"]
    hard = build_many.plan([tmp_path / "w.avi", tmp_path / "v.avi"], tmp_path / "data")
    assert hard[3] == [f"{tmp_path / 'w.avi'}: the same file as {tmp_path / 'v.avi'}, built once as 'v'"]
    lines = []
    for _ in range(2):  # and a rerun sees the same
        s = build_all([film, tmp_path / "alias"], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert s.existing == ["alias"] and s.built == [] and s.skipped == []
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")) == ["alias"]
    assert all("earlier version" not in line for line in lines), lines


def test_a_partial_movie_no_run_holds_is_removed_and_a_held_one_kept(tmp_path):
    """A killed run's .partial/<id> for a movie no later run builds (its input gone, or built
    under another id) stayed for ever; one another run is building holds its lock."""
    from annotator.pairs import movie_lock

    film = write_folder(panning_clip(4, 16, 24), tmp_path / "film")
    root = tmp_path / "data"
    for orphan in ("gone", "busy"):
        (root / PARTIAL_DIR / orphan / "frames").mkdir(parents=True)
        (root / PARTIAL_DIR / orphan / "frames" / "000000.jpg").write_bytes(b"x" * 100)
    with movie_lock(root, "busy") as mine:
        assert mine
        build_all([film], root, OPTS, progress=False, log=lambda line: None)
        assert sorted(p.name for p in (root / PARTIAL_DIR).iterdir()) == ["busy", "busy.lock"]
    build_all([film], root, OPTS, progress=False, log=lambda line: None)
    assert not (root / PARTIAL_DIR).exists()
    with pytest.MonkeyPatch.context() as m:  # where nothing can be locked, nothing is taken for an orphan
        (root / PARTIAL_DIR / "kept").mkdir(parents=True)
        m.setattr(build_many, "locks_work", lambda: False)
        build_all([film], root, OPTS, progress=False, log=lambda line: None)
        assert (root / PARTIAL_DIR / "kept").is_dir()


def test_shards_split_the_sorted_ids_whatever_order_each_machine_lists_the_inputs_in(tmp_path):
    """Two machines whose globs list the same movies in other orders must still split them: taken
    in input order, shard 0 of one and shard 1 of the other could both take a movie and both skip
    another, which no machine would ever build (silently)."""
    clips = {mid: write_folder(panning_clip(2, 16, 24, seed=k), tmp_path / mid) for k, mid in enumerate("dacb")}
    orders = [[clips[m] for m in "dacb"], [clips[m] for m in "abcd"], [clips[m] for m in "cbda"]]
    for order in orders:
        shards = [build_many.plan(order, tmp_path / "data", (i, 2)) for i in range(2)]
        assert [[mid for mid, _, _ in s[0]] for s in shards] == [["a", "c"], ["b", "d"]]
        assert [s[4] for s in shards] == [2, 2] and all(mid == p.name for s in shards for mid, p, _ in s[0])


def test_at_most_workers_movies_run_at_once_and_their_progress_reaches_the_bars(tmp_path, monkeypatch):
    """workers=2 with three movies: the third starts only once a slot is free (a parent that
    started one more would run cpu_count // workers threads too many); the frames a worker
    reports advance its movie's bar and the overall one."""
    clips = clips_named(tmp_path, "abc")
    scripts = {mid: ([("progress", k + 1), ("result", {"movie_id": mid, "frame_count": 4})], 0, None)
               for k, mid in enumerate("abc")}
    stand_in_workers(monkeypatch, scripts)
    fake_start, ends, peak = build_many._start_worker, [], []

    def start(*args):
        w = fake_start(*args)
        ends.append(w.conn)
        peak.append(sum(not c.closed for c in ends))  # started and not yet reaped, this one included
        return w
    monkeypatch.setattr(build_many, "_start_worker", start)
    advanced, real_advance = [], build_many._Bars.advance
    monkeypatch.setattr(build_many._Bars, "advance", lambda self, mid, n: advanced.append((mid, n))
                        or real_advance(self, mid, n))
    s = in_time(lambda: build_all(clips, tmp_path / "data", OPTS, workers=2, progress=False, log=lambda line: None))
    assert sorted(m["movie_id"] for m in s.built) == ["a", "b", "c"]
    assert len(peak) == 3 and max(peak) == 2, peak  # the third: 1 or 2, as the first two end
    assert sorted(advanced) == [("a", 1), ("b", 2), ("c", 3)]


# ------------------------------------------------ found by a mutation round (each test names its mutant)

def test_an_output_error_decodes_a_bytes_filename(tmp_path):
    """An OSError raised on a bytes path carries a bytes filename: raise_if_output_error decodes
    it (os.fsdecode) to name the folder (Path(bytes) raises TypeError, which would replace the
    stop line with a traceback)."""
    (tmp_path / "data").mkdir()
    e = OSError(errno.EACCES, os.strerror(errno.EACCES), os.fsencode(tmp_path / "data" / "new"))
    with pytest.raises(build_many.OutputError) as got:
        build_many.raise_if_output_error(e, tmp_path)
    assert got.value.where == str(tmp_path / "data")


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX signal masks")
def test_build_all_starts_every_worker_with_both_signals_blocked(tmp_path):
    """_build_parallel itself starts each worker inside signals_deferred (so it boots with SIGINT
    and SIGTERM blocked) and takes its context from _spawn_context: with a bare spawn context the
    first start launched the resource tracker, which unblocked both in the parent before the
    first worker was made (seen here as the mask after its start). In a fresh process, where no
    tracker runs yet; a stand-in for the worker start records the mask around the real one."""
    script = (
        "import signal, sys\n"
        "from pathlib import Path\n"
        "from annotator import build_many\n"
        "from tests.annotator.test_build_many import OPTS, clips_named\n"
        "tmp = Path(sys.argv[1])\n"
        "clips = clips_named(tmp, 'ab')\n"
        "start, masks = build_many._start_worker, []\n"
        "def recording(*args):\n"
        "    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
        "    w = start(*args)\n"
        "    after = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
        "    masks.append([sorted(int(s) for s in m) for m in (before, after)])\n"
        "    return w\n"
        "build_many._start_worker = recording\n"
        "s = build_many.build_all(clips, tmp / 'data', OPTS, workers=2, progress=False, log=print)\n"
        "print(sorted(m['movie_id'] for m in s.built))\n"
        "print(masks)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import signal
    built, masks = (eval(line) for line in out.stdout.splitlines())
    assert built == ["a", "b"] and len(masks) == 2
    held = {int(signal.SIGINT), int(signal.SIGTERM)}
    assert all(held <= set(before) and held <= set(after) for before, after in masks), masks


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX signal masks")
def test_a_ctrl_c_during_the_clean_up_of_the_workers_waits_for_it(tmp_path, monkeypatch):
    """The stop of the workers still running (here: after another found DATA_ROOT full) runs
    inside signals_deferred: a Ctrl-C that comes meanwhile is held until every worker is
    killed and its partial output removed, then stops the run; it used to cut the clean-up
    short, leaving a worker running and its .partial folder."""
    import signal

    a, b, root, procs = a_full_and_b_building(tmp_path, monkeypatch)
    stop = build_many._stop_workers

    def ctrl_c_then_stop(running, root):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # Python has run the handler by now
        stop(running, root)
    monkeypatch.setattr(build_many, "_stop_workers", ctrl_c_then_stop)
    with pytest.raises(KeyboardInterrupt):  # the main thread's: signal handlers run there
        build_all([a, b], root, OPTS, workers=2, progress=False, log=lambda line: None)
    assert procs["b"].killed and not (root / PARTIAL_DIR).exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_a_worker_that_cannot_start_holds_no_pipe(tmp_path):
    """Out of file descriptors at a worker's start, its pipe's two ends stayed open while the
    run cleaned up: the lock that removes the other workers' partial output could not be made."""
    import multiprocessing as mp

    from annotator import build_many
    from annotator.pairs import BuildOptions

    class Context:  # spawn's, whose Process cannot start
        Pipe = staticmethod(mp.get_context("spawn").Pipe)

        class Process:
            def __init__(self, *a, **kw):
                pass

            def start(self):
                raise OSError(errno.EMFILE, "Too many open files")

    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Too many open files") as e:
        build_many._start_worker(Context, "m", tmp_path / "m.mp4", tmp_path, BuildOptions(size=64))
    assert len(os.listdir("/proc/self/fd")) == before, e.value  # with the error (and its frames) still held, as
    # build_all holds it while it cleans up


def test_running_out_of_memory_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """numpy's MemoryError was a traceback with one process; OpenCV's "Insufficient memory" in a
    worker was a skip counted as bad input (which --strict stopped on as such). Both stop the
    run now, as a full disk does, in one line; a bad frame is still a skip."""
    import cv2

    from annotator import build_many

    def fails(error):
        def build_movie(*a, **kw):
            raise error
        monkeypatch.setattr(build_many, "build_movie", build_movie)

    path = tmp_path / "film.mp4"
    for error, said in ((MemoryError("Unable to allocate 21.1 MiB"), "Unable to allocate 21.1 MiB"),
                        (cv2.error("(-4:Insufficient memory) Failed to allocate 2764800 bytes"),
                         "(-4:Insufficient memory) Failed to allocate 2764800 bytes")):
        fails(error)
        with pytest.raises(build_many.RunOutOfMemory) as e:
            build_many._build_one("film", path, tmp_path, None, None)
        assert str(e.value) == (f"out of memory (RAM) building {path} ({said}): lower --workers, --size or "
                                "--sim-size; finished movies are kept, rerun to resume")
        assert e.value.errno == errno.ENOMEM
    fails(ValueError("frame 3 is 10x10"))
    assert build_many._build_one("film", path, tmp_path, None, None) == f"{path}: ValueError: frame 3 is 10x10"

    class Conn:  # a worker's pipe, holding its one message
        def poll(self):
            return True

        def recv(self):
            return "out-of-memory", "out of memory (RAM) building x"
    w = build_many._Worker("film", path, None, Conn())
    build_many._read_messages(w, None, None)
    assert w.ended and isinstance(w.result, build_many.RunOutOfMemory) and str(w.result).startswith("out of memory")
    assert isinstance(w.result, build_many.STOPS_THE_RUN)  # raised by the parent's loop, not counted as a skip


def test_stopped_workers_partial_output_is_removed_after_every_pipe_is_closed(tmp_path, monkeypatch):
    """Out of file descriptors, the lock that guards the removal could not be made while the
    stopped workers' pipes were still open: a .partial folder was left behind."""
    from annotator import build_many

    closed = []

    class Conn:
        def __init__(self, mid):
            self.mid = mid

        def close(self):
            closed.append(self.mid)

    class Proc:
        def is_alive(self):
            return False

        def join(self, *a):
            pass

    running = [build_many._Worker(m, tmp_path / m, Proc(), Conn(m)) for m in ("a", "b", "c")]
    locked_with = []

    @contextlib.contextmanager
    def movie_lock(root, mid):
        locked_with.append((mid, sorted(closed)))
        yield True
    monkeypatch.setattr(build_many, "movie_lock", movie_lock)
    for m in ("a", "b", "c"):
        (tmp_path / build_many.PARTIAL_DIR / m).mkdir(parents=True)
    build_many._stop_workers(running, tmp_path)
    assert locked_with == [(m, ["a", "b", "c"]) for m in ("a", "b", "c")]
    assert list((tmp_path / build_many.PARTIAL_DIR).iterdir()) == []
