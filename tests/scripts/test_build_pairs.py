"""build_pairs.py end to end, as a user runs it (subprocesses, real files)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from annotator.pairs import list_movies, load_similarity
from tests.annotator.clips import panning_clip, write_folder, write_video

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "build_pairs.py"


def run(*args, check_rc=None):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args), "--no-progress"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert p.returncode == check_rc, p.stderr
    return p


def snapshot(root: Path) -> dict:
    """Everything a finished DATA_ROOT holds, minus the timing in meta.json."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "meta.json":
                meta = json.loads(data)
                meta.pop("build_seconds")
                data = json.dumps(meta, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


def test_help_explains_every_flag():
    out = run("--help", check_rc=0).stdout
    for flag in ["--out", "--size", "--format", "--quality", "--window", "--metric", "--sim-size", "--workers",
                 "--threads", "--decode-threads", "--shard", "--strict", "--no-progress"]:
        assert flag in out


def test_bad_arguments_one_line(tmp_path):
    for args in (["--size", "100"], ["--window", "0"], ["--workers", "0"], ["--shard", "2/2"], ["--quality", "0"]):
        p = run(tmp_path, "--out", tmp_path / "d", *args)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_every_bad_input_is_reported_and_nothing_is_lost(tmp_path):
    good_video = write_video(panning_clip(12, 32, 48), tmp_path / "good_video.mov")
    good_folder = write_folder(panning_clip(10, 32, 48), tmp_path / "good_folder")
    junk = tmp_path / "unreadable.mp4"
    junk.write_bytes(os.urandom(5000))
    full = write_video(panning_clip(30, 48, 64), tmp_path / "full.avi")
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a film")
    stray = write_folder(panning_clip(4, 32, 48), tmp_path / "stray_file")
    (stray / "Thumbs.db").write_bytes(b"\0")
    mixed = write_folder(panning_clip(6, 32, 48), tmp_path / "mixed_sizes")
    cv2.imwrite(str(mixed / "frame4.png"), np.zeros((32, 40, 3), np.uint8))
    bad = [junk, truncated, empty, notes, stray, mixed]

    p = run(good_video, junk, truncated, good_folder, empty, notes, stray, mixed, "--out", tmp_path / "d",
            "--size", "32", "--window", "4", check_rc=1)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == len(bad), p.stderr  # one line each, no library noise
    for path in bad:
        assert sum(str(path) in line for line in lines) == 1, (path, lines)
    assert "Thumbs.db: not an image file" in p.stderr
    assert "frame4.png: frame is 40x32, earlier frames are 48x32" in p.stderr
    assert "decoded" in p.stderr and "of 30 frames" in p.stderr
    assert list_movies(tmp_path / "d") == ["good_folder", "good_video"]
    assert load_similarity(tmp_path / "d" / "good_video").shape == (12, 9)
    assert "built 2 movie(s): 22 frames" in p.stdout and "bad input (skipped): 6" in p.stdout
    assert "frames/s" in p.stdout and "pairs in the default band" in p.stdout
    assert not any((tmp_path / "d" / ".partial").iterdir())


def test_strict_stops(tmp_path):
    bad = write_folder(panning_clip(4, 32, 48), tmp_path / "a_mixed")
    cv2.imwrite(str(bad / "frame2.png"), np.zeros((30, 48, 3), np.uint8))
    good = write_folder(panning_clip(4, 32, 48), tmp_path / "b_good")
    p = run(bad, good, "--out", tmp_path / "d", "--size", "32", "--strict", check_rc=2)
    assert "frame2.png" in p.stderr and "stopped early" in p.stdout
    assert list_movies(tmp_path / "d") == []
    p = run(good, tmp_path / "missing.mp4", "--out", tmp_path / "d", "--strict", check_rc=2)
    assert "missing.mp4: no such file" in p.stderr and list_movies(tmp_path / "d") == []


def test_kill_mid_run_then_resume_gives_identical_result(tmp_path):
    small = write_folder(panning_clip(10, 64, 96), tmp_path / "a_small")
    big = write_folder(panning_clip(1500, 96, 144, cuts=(700,)), tmp_path / "b_big", ext="bmp")
    args = [small, big, "--out", tmp_path / "killed", "--size", "64", "--window", "4", "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "killed" / ".partial" / "b_big" / "frames"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if partial.is_dir() and len(os.listdir(partial)) > 50:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_movies(tmp_path / "killed") == ["a_small"]  # the half-written movie does not count
    assert partial.is_dir()

    p = run(*args[:-1], check_rc=0)
    assert "built 1 movie(s): 1500 frames" in p.stdout and "already built (skipped): 1" in p.stdout
    run(*args[:3], tmp_path / "clean", *args[4:-1], check_rc=0)
    killed, clean = snapshot(tmp_path / "killed"), snapshot(tmp_path / "clean")
    assert killed.keys() == clean.keys() and killed == clean


def test_shards_and_workers(tmp_path):
    clips = [write_folder(panning_clip(8, 32, 48, seed=k), tmp_path / f"m{k}") for k in range(3)]
    run(*clips, "--out", tmp_path / "d", "--size", "32", "--shard", "0/2", check_rc=0)
    first = list_movies(tmp_path / "d")
    p = run(*clips, "--out", tmp_path / "d", "--size", "32", "--shard", "1/2", check_rc=0)
    assert "left to other shards: 2" in p.stdout
    assert first == ["m0", "m2"] and list_movies(tmp_path / "d") == ["m0", "m1", "m2"]
    run(*clips, "--out", tmp_path / "p", "--size", "32", "--workers", "2", check_rc=0)
    assert snapshot(tmp_path / "p") == snapshot(tmp_path / "d")
