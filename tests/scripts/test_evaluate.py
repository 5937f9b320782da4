"""evaluate.py main(argv) on tiny synthetic frame folders."""
import builtins
import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import evaluate
from colorize.report import REPORT_FILES
from tests.helpers import named_pipe, read_only_folder, refused

REPO = Path(__file__).resolve().parents[2]


def frames(n=5, h=36, w=52, seed=0):
    """Smooth colour frames in [20, 200] moving 1 px right per frame (room for +10)."""
    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.random((h, w + n, 3)).astype(np.float32), (0, 0), 2.0)
    big = (20 + 180 * (big - big.min()) / (big.max() - big.min()) + 0.5).astype(np.uint8)
    return [np.ascontiguousarray(big[:, n - i:n - i + w]) for i in range(n)]


def write(folder, imgs, ext="png", names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"frame_{i}" for i in range(len(imgs))]
    for name, img in zip(names, imgs):
        cv2.imwrite(str(folder / f"{name}.{ext}"), img[..., ::-1])
    return folder


@pytest.fixture
def clip(tmp_path):
    gt = frames()
    write(tmp_path / "gt", gt)
    write(tmp_path / "offset", [f + np.uint8(10) for f in gt])
    write(tmp_path / "copy", gt, ext="bmp")  # other extension, same names
    return tmp_path, gt


def test_evaluate_writes_report_with_known_numbers(clip, capsys):
    root, gt = clip
    write(root / "ref", gt[:1], names=["reference"])
    out = root / "report"
    rc = evaluate.main(["--pred", f"plus10={root / 'offset'}", "--pred", str(root / "copy"), "--gt", str(root / "gt"),
                        "--out", str(out), "--reference", str(root / "ref" / "reference.png"), "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "plus10" in table and "copy" in table and "(ground truth)" in table and "28.13" in table
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "per_frame.csv", "psnr.png", "strip.png", "summary.csv", "warp_error.png"] == sorted(REPORT_FILES.values())
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["frames"] == [f"frame_{i}" for i in range(5)]
    plus10, copy = doc["methods"]["plus10"], doc["methods"]["copy"]
    assert plus10["per_frame"]["psnr"] == pytest.approx([20 * math.log10(25.5)] * 5, abs=1e-9)
    assert copy["mean"]["psnr"] == 100.0 and copy["mean"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert doc["excluded_frames"] == []
    assert copy["per_frame"]["warp_error"][0] is None
    assert copy["mean"]["warp_error"] == pytest.approx(doc["ground_truth"]["warp_error"])
    assert copy["mean"]["cdc"] == pytest.approx(doc["ground_truth"]["cdc"])
    assert plus10["mean"]["cdc"] == pytest.approx(copy["mean"]["cdc"], abs=1e-12)  # a shift moves no mass between frames
    strip = cv2.imread(str(out / "strip.png"))
    assert strip.shape[0] > 3 * 200  # three rows of frames


def test_exclude_leaves_a_frame_out_and_the_cap_is_noted(clip, capsys):
    """A method that reproduces the reference frame (frame 0) exactly and is 10 levels off elsewhere."""
    root, gt = clip
    write(root / "refcopy", gt[:1] + [f + np.uint8(10) for f in gt[1:]])
    off = 20 * math.log10(25.5)  # 28.13 dB
    base = ["--pred", str(root / "refcopy"), "--gt", str(root / "gt"), "--no-progress"]
    assert evaluate.main([*base, "--out", str(root / "all")]) == 0
    captured = capsys.readouterr()
    assert ("note: --pred refcopy: 1 frame(s) identical or nearly identical to the ground truth (e.g. frame_0) score the 100 dB PSNR "
            "cap" in captured.err and "--exclude frame_0" in captured.err)
    doc = json.loads((root / "all" / "metrics.json").read_text())
    assert doc["methods"]["refcopy"]["mean"]["psnr"] == pytest.approx((100 + 4 * off) / 5, abs=1e-9)  # 42.5

    assert evaluate.main([*base, "--exclude", "frame_0", "--out", str(root / "ex")]) == 0
    captured = capsys.readouterr()
    assert "note" not in captured.err
    doc = json.loads((root / "ex" / "metrics.json").read_text())
    assert doc["frames"] == ["frame_1", "frame_2", "frame_3", "frame_4"] and doc["excluded_frames"] == ["frame_0"]
    m = doc["methods"]["refcopy"]
    assert m["mean"]["psnr"] == pytest.approx(off, abs=1e-9) and f"{off:.2f}" in captured.out
    assert m["per_frame"]["warp_error"][0] is None  # no pair with the frame left out

    # a frame in the middle (with its extension): no warp error across the gap either
    mid = ["--pred", str(root / "copy"), "--exclude", "frame_2.png", "--out", str(root / "mid")]
    assert evaluate.main([*base, *mid]) == 0
    doc = json.loads((root / "mid" / "metrics.json").read_text())
    assert doc["frames"] == ["frame_0", "frame_1", "frame_3", "frame_4"] and doc["excluded_frames"] == ["frame_2"]
    warp = doc["methods"]["copy"]["per_frame"]["warp_error"]
    assert warp[0] is None and warp[2] is None and warp[1] is not None and warp[3] is not None
    err = capsys.readouterr().err
    assert "--pred copy: 4 frame(s) identical or nearly identical to the ground truth (e.g. frame_0)" in err
    assert "--pred refcopy: 1 frame(s)" in err
    assert evaluate.main([*base, "--exclude", "frame_9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["evaluate.py: error: --exclude frame_9: no ground-truth frame has that name (they are like "
                   "frame_0)"]
    assert evaluate.main([*base, *[a for i in range(5) for a in ("--exclude", f"frame_{i}")]]) == 2
    assert "leaves no frame to score" in capsys.readouterr().err


def test_evaluate_uses_common_frames_and_notes_missing(clip, capsys):
    root, gt = clip
    write(root / "short", gt[:3])
    rc = evaluate.main(["--pred", str(root / "short"), "--gt", str(root / "gt"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0 and "lacks 2 of 5" in err and "evaluating the 3 of 5" in err
    write(root / "long", gt + gt[:2], names=[f"frame_{i}" for i in range(7)])
    assert evaluate.main(["--pred", str(root / "long"), "--gt", str(root / "gt"), "--no-progress"]) == 0
    assert "--pred long has 2 frame(s) the ground truth lacks, not scored (e.g. frame_5.png)" in capsys.readouterr().err


def one_line_error(argv, capsys) -> str:
    assert evaluate.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: "), lines
    return lines[0]


def test_ground_truth_of_changing_size_and_frames_too_small_for_flow(tmp_path, capsys):
    gt = frames()
    mixed = gt[:2] + [cv2.resize(gt[2], (60, 40))] + gt[3:]
    write(tmp_path / "gt", mixed)
    write(tmp_path / "pred", mixed)
    err = one_line_error(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--no-progress"], capsys)
    assert f"ground-truth frames differ in size: {tmp_path}/gt/frame_2.png is 60x40, frame_0.png is 52x36" in err
    tiny = [f[:14, :30] for f in gt]  # OpenCV's flow fails (or crashes) on frames this small
    write(tmp_path / "tiny", tiny)
    err = one_line_error(["--pred", str(tmp_path / "tiny"), "--gt", str(tmp_path / "tiny"), "--no-progress"], capsys)
    assert "frame_0.png: frames of 30x14 pixels are too small for optical flow (at least 16 pixels a side)" in err
    write(tmp_path / "one", tiny[:1])  # a single frame has no flow to compute
    assert evaluate.main(["--pred", str(tmp_path / "one"), "--gt", str(tmp_path / "one"), "--no-progress"]) == 0


def test_16_bit_frames_are_scored_at_their_depth(tmp_path, capsys):
    gt = [f.astype(np.uint16) * 257 for f in frames(n=2)]
    pred = [g.copy() for g in gt]
    pred[0][0, 0, 0] += 60  # 60/65535 off: 60/257 levels on the 0..255 scale, lost if rounded to 8 bits
    write(tmp_path / "gt", gt)
    write(tmp_path / "pred", pred)
    assert evaluate.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--no-progress",
                          "--out", str(tmp_path / "rep")]) == 0
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    mse = (60 / 257) ** 2 / gt[0].size
    assert doc["methods"]["pred"]["per_frame"]["psnr"][0] == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)


def test_a_strip_from_an_earlier_run_is_removed(clip, capsys):
    root, _ = clip
    argv = ["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress", "--out", str(root / "rep")]
    assert evaluate.main(argv) == 0 and (root / "rep" / "strip.png").is_file()
    assert evaluate.main(argv + ["--strip-frames", "0", "--overwrite"]) == 0
    assert not (root / "rep" / "strip.png").exists() and (root / "rep" / "metrics.json").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing_gt", "--gt {root}/nope: no such folder"),
    ("missing_pred", "--pred nope: {root}/nope: no such folder"),
    ("no_match", "no matching frames: --pred other"),
    ("size", "size mismatch: {root}/small/frame_0.png is 26x18, ground truth frame_0.png is 52x36"),
    ("late_size", "size mismatch: {root}/late/frame_3.png is 26x18"),
    ("unreadable", "--pred broken: {root}/broken/frame_2.png: not a readable image"),
    ("unreadable_gt", "--gt {root}/broken/frame_2.png: not a readable image"),
    ("unreadable_reference", "--reference {root}/broken/frame_2.png: not a readable image"),
    ("same_name", "two predictions are named 'offset'"),
    ("gt_name", "--pred {root}/ground_truth: 'ground_truth' names a row or column of the report's own (the ground "
                "truth, the gray input, the reference); label the prediction with NAME=DIR"),
    ("gt_label", "--pred Ground Truth={root}/offset: 'Ground Truth' names a row or column of the report's own"),
    ("bad_reference", "--reference {root}/missing.png: no such file"),
    ("folder_reference", "--reference {root}/gt: a folder, not an image"),
    ("video_gt", "--gt {root}/clip.mp4 is a video file; --gt and --pred take folders of frames (one image per frame, "
                 "matched by name, as colorize_inference.py's --out): extract its frames into a folder first"),
    ("video_pred", "--pred clip.mp4: {root}/clip.mp4 is a video file; --gt and --pred take folders of frames (one "
                   "image per frame, matched by name, as colorize_inference.py's --out): extract its frames into a "
                   "folder first"),
    ("file_gt", "--gt {root}/gt/frame_0.png is a file; --gt and --pred take folders of frames (one image per frame, "
                "matched by name, as colorize_inference.py's --out)"),
])
def test_evaluate_bad_input_one_line_exit_2(clip, capsys, case, message):
    root, gt = clip
    pred = {"missing_gt": "offset", "missing_pred": "nope", "no_match": "other", "size": "small",
            "late_size": "late", "unreadable": "broken",
            "unreadable_gt": "broken", "unreadable_reference": "offset", "same_name": "offset", "bad_reference": "offset",
            "video_gt": "offset", "video_pred": "clip.mp4", "file_gt": "offset", "folder_reference": "offset",
            "gt_name": "ground_truth", "gt_label": "offset"}[case]
    gt_dir = root / {"missing_gt": "nope", "video_gt": "clip.mp4", "file_gt": "gt/frame_0.png",
                     "unreadable_gt": "broken"}.get(case, "gt")
    (root / "clip.mp4").write_bytes(b"a video")
    write(root / "other", gt, names=[f"x{i}" for i in range(5)])
    write(root / "small", [f[::2, ::2] for f in gt])
    write(root / "late", gt[:3] + [f[::2, ::2] for f in gt[3:]])
    write(root / "broken", gt)
    (root / "broken" / "frame_2.png").write_bytes(b"not a png")
    write(root / "ground_truth", gt)
    argv = ["--pred", str(root / pred), "--gt", str(gt_dir), "--no-progress", "--out", str(root / "rep")]
    if case == "gt_label":
        argv[1] = f"Ground Truth={root / pred}"
    if case == "same_name":
        argv += ["--pred", str(root / "offset")]
    if case == "bad_reference":
        argv += ["--reference", str(root / "missing.png")]
    if case == "folder_reference":  # was "no such file"
        argv += ["--reference", str(root / "gt")]
    if case == "unreadable_reference":
        argv += ["--reference", str(root / "broken" / "frame_2.png")]
    assert evaluate.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: "), captured.err
    assert message.format(root=root) in lines[0]
    if case.startswith(("video", "file", "unreadable", "missing")):  # the whole line, naming the flag
        assert lines[0] == "evaluate.py: error: " + message.format(root=root)
    assert not (root / "rep").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_as_reference_is_called_one_not_missing(clip, capsys):
    root, _ = clip
    argv = ["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress", "--out", str(root / "rep")]
    with named_pipe(root / "pipe.png") as pipe:  # was "no such file"; reading it would block
        err = refused(evaluate.main, [*argv, "--reference", str(pipe)], capsys)
    assert err == f"evaluate.py: error: --reference {pipe}: not a regular file (a named pipe, socket or device)\n"
    assert not (root / "rep").exists()


def test_out_is_checked_before_scoring(clip, capsys, monkeypatch):
    """A file as --out (or inside its path), or a report already there without --overwrite, is
    refused before any frame is scored, in one line, the file untouched."""
    root, _ = clip
    monkeypatch.setattr(evaluate, "evaluate_stream", lambda *a, **k: pytest.fail("scored before --out was checked"))
    note = root / "notes.md"
    note.write_text("mine")
    base = ["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress"]
    for out, message in [(note, f"--out {note} is a file, not a folder"),
                         (note / "rep", f"--out {note / 'rep'}: {note} is a file, not a folder")]:
        assert evaluate.main([*base, "--out", str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err == f"evaluate.py: error: {message}\n"
    assert note.read_text() == "mine"


def test_an_unwritable_out_is_refused_before_scoring(clip, capsys, monkeypatch):
    """Was found only after every frame had been scored (minutes for a film): "cannot write the report
    (Permission denied)"."""
    root, _ = clip
    ro = read_only_folder(root / "ro", monkeypatch)
    monkeypatch.setattr(evaluate, "evaluate_stream", lambda *a, **k: pytest.fail("scored before --out was checked"))
    try:
        for out in (ro, ro / "rep"):
            line = one_line_error(["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress",
                                   "--out", str(out)], capsys)
            assert line == f"evaluate.py: error: --out {out}: {ro} is not writable"
    finally:
        ro.chmod(0o755)


def test_an_out_that_is_a_broken_link_is_refused_before_scoring(clip, capsys, monkeypatch):
    """A symlink loop as --out was a RuntimeError traceback ("Symlink loop from ..."); a dangling one
    failed after the scoring with "[Errno 17] File exists"."""
    root, _ = clip
    monkeypatch.setattr(evaluate, "evaluate_stream", lambda *a, **k: pytest.fail("scored before --out was checked"))
    (root / "loop").symlink_to(root / "loop")
    (root / "dangling").symlink_to(root / "nowhere")
    for link in ("loop", "dangling"):
        line = one_line_error(["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress",
                               "--out", str(root / link)], capsys)
        assert line == f"evaluate.py: error: --out {root / link}: {root / link} is a broken symbolic link"


def test_an_existing_report_is_kept_unless_overwrite(clip, capsys, monkeypatch):
    root, gt = clip
    rep = root / "rep"
    base = ["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress", "--out", str(rep)]
    assert evaluate.main(base) == 0  # a new folder
    before = {p.name: p.read_bytes() for p in rep.iterdir()}
    write(root / "other", [f + np.uint8(20) for f in gt])
    again = ["--pred", str(root / "other"), *base[2:]]
    scored = []
    stream = evaluate.evaluate_stream
    monkeypatch.setattr(evaluate, "evaluate_stream", lambda *a, **k: scored.append(1) or stream(*a, **k))
    assert evaluate.main(again) == 2
    assert capsys.readouterr().err == (f"evaluate.py: error: --out {rep} holds a report already (metrics.json); "
                                       "pass --overwrite to replace it, or choose another folder\n")
    assert not scored and {p.name: p.read_bytes() for p in rep.iterdir()} == before
    assert evaluate.main([*again, "--overwrite"]) == 0
    assert list(json.loads((rep / "metrics.json").read_text())["methods"]) == ["other"]
    # a folder without a report is written into; any one report file counts as a report
    (root / "mine").mkdir()
    (root / "mine" / "keep.txt").write_text("mine")
    assert evaluate.main([*base[:-1], str(root / "mine")]) == 0
    (root / "part").mkdir()
    (root / "part" / "strip.png").write_bytes(b"")
    assert evaluate.main([*base[:-1], str(root / "part")]) == 2
    assert "holds a report already (strip.png)" in capsys.readouterr().err


def test_a_full_disk_names_the_file_and_leaves_no_half_report(clip, capsys, monkeypatch):
    """ENOSPC while the report is written (at psnr.png, after the JSON and CSVs): one line naming
    the file, exit 2, no report file left (so the rerun is not refused as "a report already"),
    and with --overwrite the earlier report kept whole."""
    root, _ = clip
    rep = root / "rep"
    base = ["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress", "--out", str(rep)]
    real = builtins.open

    def fills_up(file, mode="r", *args, **kwargs):  # the plot's file is made, its write fails
        f = real(file, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(os.fspath(file)).startswith((".psnr.", "psnr.png")):
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", fills_up)
        assert evaluate.main(base) == 2
    message = (f"evaluate.py: error: {rep / 'psnr.png'}: cannot write the report (No space left on device); "
               "nothing of it was written\n")
    assert capsys.readouterr().err == message
    assert not rep.exists()
    assert evaluate.main(base) == 0  # space freed: the rerun writes the report
    before = {p.name: p.read_bytes() for p in rep.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", fills_up)
        assert evaluate.main([*base, "--strip-frames", "0", "--overwrite"]) == 2
    assert capsys.readouterr().err == message
    assert {p.name: p.read_bytes() for p in rep.iterdir()} == before


def test_the_command_line_keeps_an_existing_report(clip):
    """The same from the command line, in another process."""
    root, _ = clip
    (root / "rep").mkdir()
    (root / "rep" / "summary.csv").write_text("earlier")
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--pred", str(root / "offset"), "--gt",
                           str(root / "gt"), "--out", str(root / "rep")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and re.fullmatch(r"evaluate\.py: error: --out .*rep holds a report already "
                                                 r"\(summary\.csv\); pass --overwrite .*\n", proc.stderr), proc.stderr
    assert (root / "rep" / "summary.csv").read_text() == "earlier"


def test_evaluate_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--gt", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_a_reader_of_stdout_that_has_gone_does_not_cost_the_report(clip):
    """`evaluate.py ... --out R | head -1` with stdout unbuffered (PYTHONUNBUFFERED=1, common in
    containers) met the closed pipe at the table, printed before the report, which was then never
    written (or only at random). The reader here goes before the first line: exit 141, quietly,
    and the report is there."""
    root, _ = clip
    proc = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), "--pred", str(root / "offset"), "--gt",
                             str(root / "gt"), "--out", str(root / "rep"), "--no-progress"], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and "error" not in err, err
    assert sorted(p.name for p in (root / "rep").iterdir()) == sorted(REPORT_FILES.values())


@pytest.mark.parametrize("which", ["gt", "pred"])
def test_out_that_is_a_frame_folder_is_refused(clip, capsys, which):
    """A report written into the --gt (or a --pred) folder would leave its JSON, CSVs and plots among
    the frames: every later run refuses metrics.json there, or scores psnr.png as a frame."""
    root, _ = clip
    folder = root / ("gt" if which == "gt" else "offset")
    before = sorted(p.name for p in folder.iterdir())
    line = one_line_error(["--pred", f"off={root / 'offset'}", "--gt", str(root / "gt"), "--no-progress",
                           "--out", f"{folder}/"], capsys)
    what = "--gt" if which == "gt" else "--pred off"
    assert line == (f"evaluate.py: error: --out {folder} is the {what} folder; write the report elsewhere, as a "
                    "frame folder holds frames only")
    assert sorted(p.name for p in folder.iterdir()) == before
