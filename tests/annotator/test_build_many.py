"""annotator.build_many: many movies in one run - skips, notes, other runs' movies, progress,
the workers' watchdog (the CLI's signals and worker processes: tests/scripts/test_build_pairs.py)."""
import errno
import json
import os
import re
import subprocess
import sys
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
    assert [m["movie_id"] for m in s.built] == ["good"] and s.frames == 6
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
    assert lines == [] and os.listdir(tmp_path / "data") == []


def test_an_input_named_twice_is_one_movie_not_a_clash(tmp_path):
    """`films/* films/a` or `a a/`: was skipped as "movie id 'a' is also used by a; rename one of them" (exit 1),
    advice that cannot apply to one folder; two inputs with one id are still a clash."""
    a = write_folder(panning_clip(4, 16, 24), tmp_path / "a")
    other = write_folder(panning_clip(4, 16, 24, seed=1), tmp_path / "x" / "a")
    lines = []
    s = build_all([a, f"{a}/", tmp_path / "." / "a"], tmp_path / "data", OPTS, progress=False, log=lines.append)
    assert [m["movie_id"] for m in s.built] == ["a"] and s.skipped == [] and lines == []
    s = build_all([a, other], tmp_path / "data2", OPTS, progress=False, log=lines.append)
    assert s.skipped == [f"{other}: movie id 'a' is also used by {a}; rename one of them"]
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
    another run is building there is never touched; the last run to end removes it."""
    good = write_folder(panning_clip(6, 16, 24), tmp_path / "good")
    busy = tmp_path / "data" / ".partial" / "other_run" / "frames"
    busy.mkdir(parents=True)
    (busy / "000000.jpg").write_bytes(b"another run's frame")
    s = build_all([good], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    assert [m["movie_id"] for m in s.built] == ["good"]
    assert (busy / "000000.jpg").read_bytes() == b"another run's frame"
    (busy / "000000.jpg").unlink()
    busy.rmdir()
    busy.parent.rmdir()  # the other run is done with its movie
    build_all([good], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    assert not (tmp_path / "data" / ".partial").exists()


def test_a_movie_another_run_is_building_is_skipped_untouched(tmp_path):
    """Two runs given the same movie: the second must not delete the first one's .partial
    folder (as if a killed run had left it), or the first would publish missing frames."""
    import fcntl

    good = write_folder(panning_clip(6, 16, 24), tmp_path / "good")
    theirs = tmp_path / "data" / ".partial" / "good" / "frames"
    theirs.mkdir(parents=True)
    (theirs / "000000.jpg").write_bytes(b"the other run's frame")
    held = os.open(theirs.parent.parent / "good.lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # what the other run's build_movie holds
        lines = []
        s = build_all([good], tmp_path / "data", OPTS, progress=False, log=lines.append)
        assert s.built == [] and lines == [f"skipped: {good}: another run is building this movie in {theirs.parent}"]
        assert (theirs / "000000.jpg").read_bytes() == b"the other run's frame"
    finally:
        os.close(held)
    # its lock released (that run was killed): the next run rebuilds the movie
    s = build_all([good], tmp_path / "data", OPTS, progress=False, log=lambda line: None)
    assert [m["movie_id"] for m in s.built] == ["good"] and not (tmp_path / "data" / ".partial").exists()


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
