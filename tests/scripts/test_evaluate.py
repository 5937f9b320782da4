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
from annotator.color import rgb_to_gray, to_uint8
from colorize import metrics as M, report as R
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


def test_a_report_another_run_writes_meanwhile_is_kept_without_overwrite(clip, capsys, monkeypatch):
    """Two evaluations into one --out both passed the check before scoring; the second replaced
    the first's report, both exiting 0. A report file that appears while this run scores is
    kept now: one line naming it, and nothing of this run's report left."""
    root, _ = clip
    out = root / "rep"
    score = evaluate.evaluate_stream

    def meanwhile(*a, **k):
        out.mkdir()
        (out / "summary.csv").write_text("the other run's")
        return score(*a, **k)

    monkeypatch.setattr(evaluate, "evaluate_stream", meanwhile)
    rc = evaluate.main(["--pred", str(root / "copy"), "--gt", str(root / "gt"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and err.endswith(f"{out / 'summary.csv'}: cannot write the report (another run wrote it "
                                    "meanwhile; pass --overwrite to replace it); nothing of it is left\n"), err
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("summary.csv", "the other run's")]


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
    (root / "dir").mkdir()  # a folder at a report file's name: no rename replaces it, --overwrite or not
    (root / "dir" / "psnr.png").mkdir()
    for extra in ([], ["--overwrite"]):
        assert evaluate.main([*base[:-1], str(root / "dir"), *extra]) == 2
        assert capsys.readouterr().err == (f"evaluate.py: error: --out {root / 'dir'}: {root / 'dir' / 'psnr.png'} is "
                                           "a folder, where the report writes a file; move it away\n")
    assert len(scored) == 2  # the two runs above that wrote reports (--overwrite, mine), none of these
    (root / "linked").mkdir()  # a link to a folder at a report file's name: replaced, as any link
    (root / "linked" / "psnr.png").symlink_to(root / "dir")
    assert evaluate.main([*base[:-1], str(root / "linked"), "--overwrite"]) == 0
    assert (root / "linked" / "psnr.png").is_file() and not (root / "linked" / "psnr.png").is_symlink()
    assert (root / "dir" / "psnr.png").is_dir()


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


def test_every_metric_has_a_definition_and_a_column_in_one_order():
    """A metric is named in three places besides its code (metrics.PER_FRAME_KEYS, report.DEFINITIONS,
    evaluate.COLUMNS): one forgotten would leave a column or a definition out without an error."""
    assert R.SUMMARY_KEYS == (*M.PER_FRAME_KEYS, "cdc")
    assert tuple(R.DEFINITIONS) == tuple(evaluate.COLUMNS) == R.SUMMARY_KEYS


def test_the_table_and_the_report_line_in_full(clip, capsys):
    """Each column at its own precision (PSNR .2f, SSIM .4f, colourfulness .1f, warp error .3f,
    CDC .5f), names left-aligned and numbers right-aligned, then the report's files; a value
    that is no number (one frame: no warp error, no CDC) is '-', not 'nan'."""
    root, gt = clip
    out = root / "rep"
    assert evaluate.main(["--pred", f"plus10={root / 'offset'}", "--pred", str(root / "copy"), "--gt", str(root / "gt"),
                          "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    rows = [("method", "PSNR dB", "SSIM", "colourful.", "warp err", "CDC")]
    for name, means in [("plus10", doc["methods"]["plus10"]["mean"]), ("copy", doc["methods"]["copy"]["mean"]),
                        ("(ground truth)", doc["ground_truth"])]:
        rows.append((name, *[f.format(means[k]) if means.get(k) is not None else "-" for k, f in
                             [("psnr", "{:.2f}"), ("ssim", "{:.4f}"), ("colourfulness", "{:.1f}"),
                              ("warp_error", "{:.3f}"), ("cdc", "{:.5f}")]]))
    assert rows[1][1:3] == ("28.13", "0.9949") and rows[2][1:3] == ("100.00", "1.0000") and rows[3][1:3] == ("-", "-")
    assert rows[1][5] == f"{doc['ground_truth']['cdc']:.5f}" != f"{doc['ground_truth']['cdc']:.4f}"
    width = [max(len(r[i]) for r in rows) for i in range(6)]
    table = ["  ".join([r[0].ljust(width[0]), *(c.rjust(w) for c, w in zip(r[1:], width[1:]))]) for r in rows]
    paths = ", ".join(str(out / name) for name in REPORT_FILES.values())
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [*table, f"report: {paths}"] and "evaluating" not in captured.err

    write(root / "one", gt[:1])
    assert evaluate.main(["--pred", str(root / "one"), "--gt", str(root / "one")]) == 0  # with the progress bar
    captured = capsys.readouterr()
    assert "evaluating" in captured.err and "1/1" in captured.err
    lines = captured.out.splitlines()
    assert [line.split() for line in lines[1:]] == [["one", "100.00", "1.0000", lines[1].split()[3], "-", "-"],
                                                    ["(ground", "truth)", "-", "-", lines[2].split()[4], "-", "-"]]
    assert "report:" not in "".join(lines)


def test_pred_names_a_folder_with_an_equals_sign_and_the_reserved_names(tmp_path, monkeypatch):
    """An existing folder wins over a NAME=DIR reading; every name of the report's own rows and
    columns is refused, in any case."""
    odd = tmp_path / "lr=1e-4"
    odd.mkdir()
    assert evaluate.parse_preds([str(odd), f"b={tmp_path / 'x'}"]) == {"lr=1e-4": odd, "b": tmp_path / "x"}
    (tmp_path / "=x").mkdir()  # a folder whose name starts with "=": a folder, not an empty NAME
    assert evaluate.parse_preds([str(tmp_path / "=x")]) == {"=x": tmp_path / "=x"}
    monkeypatch.chdir(tmp_path)
    assert evaluate.parse_preds(["=x"]) == {"=x": Path("=x")}
    for name in evaluate.RESERVED_NAMES + ("Reference", "Input (Gray)"):
        with pytest.raises(evaluate.UsageError, match=rf"^--pred {re.escape(name)}=x: '{re.escape(name)}' names a row"):
            evaluate.parse_preds([f"{name}=x"])
    assert set(evaluate.RESERVED_NAMES) >= {"reference", "input (gray)", "ground truth", "ground_truth"}


def test_an_upper_case_video_suffix_and_a_name_twice_in_a_folder(clip, capsys):
    root, gt = clip
    (root / "CLIP.MP4").write_bytes(b"a video")
    line = one_line_error(["--pred", str(root / "offset"), "--gt", str(root / "CLIP.MP4"), "--no-progress"], capsys)
    assert line.startswith(f"evaluate.py: error: --gt {root / 'CLIP.MP4'} is a video file;")
    assert line.endswith(": extract its frames into a folder first")
    write(root / "gt", gt[:1], ext="jpg")  # frame_0.jpg beside frame_0.png
    line = one_line_error(["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress"], capsys)
    assert re.fullmatch(rf"evaluate\.py: error: --gt {re.escape(str(root / 'gt'))}: frame_0\.(jpg|png) and "
                        r"frame_0\.(jpg|png) have the same name", line) and "jpg" in line and "png" in line


def test_exclude_takes_a_stem_with_a_dot_and_the_lacking_frame_is_named(tmp_path, capsys):
    gt = frames(n=4)
    names = [f"shot.{i:04d}" for i in range(4)]
    write(tmp_path / "gt", gt, names=names)
    write(tmp_path / "pred", gt[1:3], names=names[1:3])  # lacks shot.0000 and shot.0003
    argv = ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--no-progress"]
    assert evaluate.main([*argv, "--exclude", "shot.0003", "--out", str(tmp_path / "rep")]) == 0
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert doc["excluded_frames"] == ["shot.0003"] and doc["frames"] == ["shot.0001", "shot.0002"]
    assert evaluate.main(argv) == 0
    err = capsys.readouterr().err
    assert "evaluate.py: note: --pred pred lacks 2 of 4 ground-truth frames (e.g. shot.0000)\n" in err


def test_predictions_lacking_different_frames_score_the_frames_all_have(clip, capsys):
    root, gt = clip
    write(root / "a", gt[:4])  # lacks frame_4
    write(root / "b", gt[1:], names=[f"frame_{i}" for i in range(1, 5)])  # lacks frame_0
    assert evaluate.main(["--pred", str(root / "a"), "--pred", str(root / "b"), "--gt", str(root / "gt"),
                          "--no-progress", "--out", str(root / "rep")]) == 0
    err = capsys.readouterr().err
    assert "note: evaluating the 3 of 5 ground-truth frames that every prediction has" in err
    assert json.loads((root / "rep" / "metrics.json").read_text())["frames"] == ["frame_1", "frame_2", "frame_3"]
    write(root / "c", gt[3:], names=["frame_3", "frame_4"])  # none in common with a's first three
    write(root / "d", gt[:3])
    line = one_line_error(["--pred", str(root / "c"), "--pred", str(root / "d"), "--gt", str(root / "gt"),
                           "--no-progress"], capsys)
    assert line == "evaluate.py: error: no matching frames: no ground-truth frame name is in every --pred folder"
    write(root / "other", gt, names=[f"x{i}" for i in range(5)])
    line = one_line_error(["--pred", str(root / "other"), "--gt", str(root / "gt"), "--no-progress"], capsys)
    assert line == (f"evaluate.py: error: no matching frames: --pred other ({root / 'other'}) has none of the 5 "
                    "ground-truth frame names (e.g. gt frame_0.png, pred x0.png)")


def test_only_frames_at_the_cap_are_noted(tmp_path, capsys):
    """16-bit frames: 20/65535 off in one value is above 100 dB (the cap, noted), 52/65535 off is
    99.5 dB, a prediction (not noted)."""
    gt = [f.astype(np.uint16) * 257 for f in frames(n=2)]
    pred = [g.copy() for g in gt]
    pred[0][0, 0, 0] += 20
    pred[1][0, 0, 0] += 52
    write(tmp_path / "gt", gt)
    write(tmp_path / "pred", pred)
    assert evaluate.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--no-progress",
                          "--out", str(tmp_path / "rep")]) == 0
    psnr = json.loads((tmp_path / "rep" / "metrics.json").read_text())["methods"]["pred"]["per_frame"]["psnr"]
    assert psnr[0] == 100.0 and psnr[1] == pytest.approx(10 * math.log10(255 ** 2 * gt[1].size / (52 / 257) ** 2))
    assert 99.4 < psnr[1] < 99.6
    assert "note: --pred pred: 1 frame(s) identical or nearly identical to the ground truth (e.g. frame_0)" in \
        capsys.readouterr().err


def test_a_gray_ground_truth_is_noted(clip, capsys):
    """The gray input given as --gt (a swap of folders) was scored without a word: ground-truth
    colourfulness 0, every PSNR against no colour at all."""
    root, gt = clip
    write(root / "gray", [np.repeat(to_uint8(rgb_to_gray(f))[..., None], 3, axis=2) for f in gt])
    for folder, noted in (("gray", True), ("gt", False)):
        assert evaluate.main(["--pred", str(root / "offset"), "--gt", str(root / folder), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert (err == f"evaluate.py: note: --gt {root / 'gray'} is gray (mean colourfulness 0.0): the scores compare "
                       "the predictions with no colour at all; --gt takes the colour ground truth, not the gray "
                       "input\n") if noted else err == "", err


def test_the_gray_ground_truth_note_is_below_a_colourfulness_of_2_at_one_decimal():
    """A gray video's decoding cast (about 1) is gray, muted colour (5) and 2.0 itself are not
    (kills `<` -> `<=`, and a threshold of 0.5 or 20); the mean is said at one decimal."""
    from types import SimpleNamespace

    note = lambda m: evaluate.gray_gt_note(SimpleNamespace(ground_truth={"colourfulness": m}), Path("g"))  # noqa: E731
    assert note(1.23) == ["--gt g is gray (mean colourfulness 1.2): the scores compare the predictions with no colour "
                          "at all; --gt takes the colour ground truth, not the gray input"]
    assert note(2.0) == note(5.0) == []


def test_the_strip_gets_8_bit_pictures_their_names_and_the_plots_the_positions(tmp_path, capsys, monkeypatch):
    """16-bit frames and reference are scored at 16 bits but shown at 8; each strip row is named
    by its frame, and the plots get each frame's place in the whole clip (a gap where one was left out)."""
    gt8 = frames()
    gt = [f.astype(np.uint16) * 257 for f in gt8]
    write(tmp_path / "gt", gt)
    write(tmp_path / "pred", [g + np.uint16(2570) for g in gt])
    write(tmp_path / "ref", gt[:1], names=["reference"])
    seen = {}
    real = evaluate.write_report

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "write_report", spy)
    assert evaluate.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--no-progress",
                          "--exclude", "frame_1", "--reference", str(tmp_path / "ref" / "reference.png"),
                          "--out", str(tmp_path / "rep")]) == 0
    strip = seen["strip"]
    assert seen["positions"] == [0, 2, 3, 4] and seen["excluded"] == ["frame_1"]
    assert strip.indices == [0, 2, 3] and strip.labels == ["frame_0", "frame_3", "frame_4"]
    for got, want in zip(strip.gt, [gt8[0], gt8[3], gt8[4]]):
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    for got, want in zip(strip.methods["pred"], [gt8[0], gt8[3], gt8[4]]):
        assert got.dtype == np.uint8 and np.array_equal(got, want + np.uint8(10))
    assert strip.reference.dtype == np.uint8 and np.array_equal(strip.reference, gt8[0])
    for got, want in zip(strip.gray, [gt8[0], gt8[3], gt8[4]]):  # the input a method coloured
        assert np.array_equal(got, to_uint8(rgb_to_gray(want)))


def test_checks_made_before_scoring(clip, capsys, monkeypatch):
    """A negative --strip-frames, a prediction of another size than the truth (its first frame:
    not after the long loop), an --out that is a symlink to the --gt folder (a missing --gt given as
    --out too is named as missing), and two frames too small for the optical flow, all refused
    before any frame is scored."""
    root, gt = clip
    monkeypatch.setattr(evaluate, "evaluate_stream", lambda *a, **k: pytest.fail("scored before the checks"))
    base = ["--gt", str(root / "gt"), "--no-progress"]
    line = one_line_error(["--pred", str(root / "offset"), *base, "--strip-frames", "-1"], capsys)
    assert line == "evaluate.py: error: --strip-frames must be >= 0 (got -1)"
    write(root / "small", [f[::2, ::2] for f in gt])
    line = one_line_error(["--pred", str(root / "small"), *base], capsys)
    assert line == (f"evaluate.py: error: size mismatch: {root / 'small' / 'frame_0.png'} is 26x18, ground truth "
                    "frame_0.png is 52x36")
    (root / "link").symlink_to(root / "gt")
    line = one_line_error(["--pred", str(root / "offset"), *base, "--out", str(root / "link")], capsys)
    assert line == (f"evaluate.py: error: --out {root / 'link'} is the --gt folder; write the report elsewhere, as a "
                    "frame folder holds frames only")
    line = one_line_error(["--pred", str(root / "offset"), "--gt", str(root / "nope"), "--no-progress",
                           "--out", str(root / "nope")], capsys)  # no folder: not called the --gt folder
    assert line == f"evaluate.py: error: --gt {root / 'nope'}: no such folder"
    write(root / "tiny", [f[:14, :30] for f in gt[:2]])
    line = one_line_error(["--pred", str(root / "tiny"), "--gt", str(root / "tiny"), "--no-progress"], capsys)
    assert line.endswith("frame_0.png: frames of 30x14 pixels are too small for optical flow (at least 16 pixels "
                         "a side)")


def test_without_a_stop_line_ctrl_c_goes_to_the_caller(clip, capsys, monkeypatch):
    """main(stop_line=False) (demo.py) re-raises Ctrl-C for the caller to say; main() says it, 130."""
    root, _ = clip

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "evaluate_stream", interrupted)
    argv = ["--pred", str(root / "offset"), "--gt", str(root / "gt"), "--no-progress"]
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv, stop_line=False)
    assert capsys.readouterr().err == ""
    assert evaluate.main(argv) == 130
    assert capsys.readouterr().err == "evaluate.py: interrupted\n"


@pytest.mark.parametrize("flag", ["--pred", "--gt", "--out", "--reference"])
def test_an_empty_path_is_a_usage_error_naming_its_flag(clip, capsys, monkeypatch, flag):
    """`--out "$OUT"` with OUT unset ended with exit 0 and no report; an empty --gt or --pred
    blamed ./requirements.txt; so does --pred NAME= with an empty folder."""
    root = clip[0]
    monkeypatch.chdir(root)
    argv = {"--pred": root / "offset", "--gt": root / "gt", "--out": root / "report"}
    argv[flag] = ""
    err = refused(evaluate.main, [str(a) for kv in argv.items() for a in kv], capsys)
    assert err == f"evaluate.py: error: argument {flag}: empty path (see --help)\n"
    if flag == "--pred":
        argv["--pred"] = "fixed="
        err = refused(evaluate.main, [str(a) for kv in argv.items() for a in kv], capsys)
        assert err == "evaluate.py: error: --pred fixed=: empty path after '='\n"
        argv["--pred"] = f"={root / 'offset'}"  # read as a folder "=...", it was refused as --pred offset: =...
        err = refused(evaluate.main, [str(a) for kv in argv.items() for a in kv], capsys)
        assert err == (f"evaluate.py: error: --pred ={root / 'offset'}: empty NAME before '=' (give NAME=DIR, or "
                       "DIR alone)\n")
    assert not (root / "report").exists()


def test_the_settings_the_frames_record_reach_the_report_and_a_mix_is_noted(clip, capsys):
    """colorize_inference.py records what made each frame (colorize.provenance): metrics.json
    keeps it per method, and a method whose frames were made with different settings (a
    continuation with another seed) is noted, as its scores mix two looks."""
    from colorize.frames_io import encode_png
    from colorize.provenance import with_record

    root, gt = clip
    for name, seeds in (("steady", [0] * 5), ("mixed", [0, 0, 0, 7, 7])):
        folder = root / name
        folder.mkdir()
        for i, (img, seed) in enumerate(zip(gt, seeds)):
            png = encode_png((img + np.uint8(10)).astype(np.float32) / 255, 8)
            (folder / f"frame_{i}.png").write_bytes(with_record(png, {"method": "model", "seed": str(seed)}))
    out = root / "report"
    rc = evaluate.main(["--pred", f"steady={root / 'steady'}", "--pred", f"mixed={root / 'mixed'}", "--pred",
                        f"plain={root / 'offset'}", "--gt", str(root / "gt"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0 and err == ("evaluate.py: note: --pred mixed: frame_0.png and frame_3.png were made with other "
                               "settings: --seed 0 (frame_3.png: 7): its scores mix them\n"), err
    methods = json.loads((out / REPORT_FILES["json"]).read_text())["methods"]
    assert methods["steady"]["made_with"] == {"method": "model", "seed": "0"}
    assert methods["mixed"]["made_with"] == {"method": "model", "seed": "0"} and "made_with" not in methods["plain"]
