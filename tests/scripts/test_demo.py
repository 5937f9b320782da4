"""demo.py end to end: the embedded toy model and the baselines on held-out frames of the sample clip."""
import csv
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import demo
from annotator.video import probe
from atomicio import try_lock
from colorize import methods
from tests.annotator.clips import panning_clip, truncate_avi, write_folder, write_video
from tests.helpers import named_pipe, read_only_folder, refused

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QUICK = ["--frames", "100:104", "--steps", "2", "--methods", "fixed,reinhard,flow"]


def run(argv, capsys):
    rc = demo.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def summary(report):
    with open(report / "summary.csv", newline="") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def test_quick_demo_writes_frames_videos_report_and_strip(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, stdout, err = run(QUICK + ["--out", out], capsys)
    assert rc == 0, err
    names = [f"frame_{i:04d}.png" for i in range(100, 104)]
    for method in ("fixed", "reinhard", "flow"):
        assert sorted(p.name for p in (out / method).iterdir()) == names
        assert cv2.imread(str(out / method / names[0])).shape == (720, 1280, 3)
        cap = cv2.VideoCapture(str(out / f"{method}.mp4"))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
        cap.release()
    # the reference frame (100) is in the ground truth but left out of scoring
    assert sorted(p.name for p in (out / "data" / "colour").iterdir()) == names
    doc = json.loads((out / "report" / "metrics.json").read_text())
    assert doc["frames"] == [n[:-4] for n in names[1:]] and doc["excluded_frames"] == ["frame_0100"]
    assert "lacks" not in err  # no notes about frames the ground truth or a prediction lacks
    rows = summary(out / "report")
    assert set(rows) == {"fixed", "reinhard", "flow", demo.GRAY_LABEL, "ground_truth"}
    for method in ("fixed", "reinhard", "flow", demo.GRAY_LABEL):
        assert math.isfinite(float(rows[method]["psnr"])) and 5 < float(rows[method]["psnr"]) < 60
    assert float(rows[demo.GRAY_LABEL]["colourfulness"]) == 0.0
    # the toy model colours: even at 2 DDIM steps, 3 dB over the gray input (measured 23.0 vs 17.7)
    assert float(rows["fixed"]["psnr"]) > float(rows[demo.GRAY_LABEL]["psnr"]) + 3
    assert (out / "report" / "strip.png").stat().st_size > 0
    assert f"[1/3] held-out frames 100-103 of {demo.SAMPLE}: reference = frame 100 in colour\n" in stdout
    assert "[3/3] scoring frames 101-103 against the ground truth\n" in stdout
    assert probe(out / "fixed.mp4").fps == 25.0  # the sample's rate, for the frame folder data/gray
    tail = stdout.strip().splitlines()[-6:]
    assert tail[0].startswith("demo done in") and str(out) in tail[0]
    # where the inputs it scored against are (README: data/ with gray, ground truth, reference.png)
    data = out / "data"
    assert tail[1] == (f"  inputs:        {data / 'gray'}/ (gray), {data / 'colour'}/ (ground truth), "
                       f"{data / 'reference.png'}")
    assert (data / "reference.png").is_file()
    assert "strip.png" in tail[-1]
    # the summary lists every file the report holds (it lacked warp_error.png), the strip on its own line
    listed = re.fullmatch(r"  report: +\S+/ \((.*)\)", tail[-2]).group(1).split(", ")
    assert sorted(listed) == sorted(p.name for p in (out / "report").iterdir() if p.name != "strip.png")


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--frames", "100:102", "--methods", "reinhard", "--out", out]
    assert run(args, capsys)[0] == 0
    before = (out / "reinhard" / "frame_0100.png").read_bytes()
    rc, _, err = run(args, capsys)
    assert rc == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert (out / "reinhard" / "frame_0100.png").read_bytes() == before
    # an interrupted run (no report yet) is refused by demo.py itself, in one line, not by a sub-tool
    shutil.rmtree(out / "report")
    rc, _, err = run(args, capsys)
    assert rc == 2 and re.fullmatch(rf"demo\.py: error: {re.escape(str(out / 'data'))} exists from an earlier run "
                                    r"\(3 output\(s\) already there\); pass --overwrite or another --out\n", err), err
    assert (out / "reinhard" / "frame_0100.png").read_bytes() == before
    assert run(args + ["--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize("args, message", [
    (["--methods", "fixed,magic"], "--methods: unknown method magic; choose from "
                                   "fixed,recursive,anchored,reinhard,reinhard-bands,flow"),
    (["--frames", "130:140"], f"{re.escape(str(demo.SAMPLE))}: has only 132 frames, --frames asks for frames 130..139"),
    (["--frames", "140:150"], f"{re.escape(str(demo.SAMPLE))}: has only 132 frames, --frames asks for frames 140..149"),
    (["--frames", "130:133"], f"{re.escape(str(demo.SAMPLE))}: has only 132 frames, --frames asks for frames 130..132"),
    (["--frames=-1:5"], r"--frames '-1:5': need 0 <= A and at least two frames \(the reference and one to score\)"),
    (["--methods", " , "], "--methods: unknown method \\(none given\\); choose from "
                           "fixed,recursive,anchored,reinhard,reinhard-bands,flow"),
    (["--size", "0"], r"--size must be >= 1 \(got 0\)"),
    (["--frames", "5:6"], r"--frames '5:6': need 0 <= A and at least two frames \(the reference and one to score\)"),
    (["--frames", "a:b"], "--frames 'a:b': expected A:B with whole numbers, e.g. 100:132"),
    (["--frames", "100:"], "--frames '100:': expected A:B with whole numbers, e.g. 100:132"),  # was "100:: expected"
    (["--ckpt", "missing.safetensors"], "--ckpt missing.safetensors: no such file"),
    (["--ckpt", "docs"], "--ckpt docs: is a folder"),  # was "no such file"
    (["--steps", "0"], r"--steps must be >= 1 \(got 0\)"),
    # the model's schedule and the checkpoint's fit to its config, checked before data/ is written
    (["--steps", "999"], r"--steps must be between 1 and 500 for the model's 1000-step noise schedule \(got 999\)"),
    (["--ckpt", str(FIXTURES / "tiny_v1_weights.safetensors")],
     rf"--ckpt {re.escape(str(FIXTURES / 'tiny_v1_weights.safetensors'))} does not fit the config: .*; the file holds: .*"),
    (["--device", "cuda:99"], r"--device cuda:99: (CUDA is not available here|this machine has \d+ CUDA device\(s\))"),
    (["--clip", "nope.mp4"], "--clip nope.mp4: no such file or folder"),
])
def test_bad_arguments_give_one_line_before_anything_is_written(tmp_path, capsys, args, message):
    rc, _, err = run(args + ["--out", tmp_path / "demo"], capsys)
    assert rc == 2 and re.fullmatch(f"demo\\.py: error: {message}\n", err), err
    assert not (tmp_path / "demo").exists()


def test_a_second_demo_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two demos into one --out (its default is shared by everyone using a checkout) both passed
    the check for earlier outputs and then mixed their frames, one exiting 0 with a report made
    from the other's reference. The first holds --out's lock (held here as it would): the second
    is one line, and writes nothing."""
    out = tmp_path / "demo"
    with try_lock(out / demo.DEMO_LOCK, make_parent=True) as mine:
        assert mine
        rc, _, err = run([*QUICK, "--methods", "reinhard", "--out", out], capsys)
    assert (rc, err) == (2, f"demo.py: error: --out {out} is in use by another demo run (it holds "
                            f"{out / demo.DEMO_LOCK}); wait for it to end, or give another --out\n")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--clip", "--ckpt"])
def test_an_empty_path_is_a_usage_error_naming_its_flag(tmp_path, capsys, monkeypatch, flag):
    """`--out "$OUT"` with OUT unset: "" was the current folder, the demo's outputs written there."""
    monkeypatch.chdir(tmp_path)
    argv = {"--out": tmp_path / "demo", "--methods": "reinhard", "--frames": "100:102"}
    argv[flag] = ""
    err = refused(demo.main, [str(a) for kv in argv.items() for a in kv], capsys)
    assert err == f"demo.py: error: argument {flag}: empty path (see --help)\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_the_model_check_reads_the_checkpoints_config_once(tmp_path, monkeypatch, suffix):
    """check_model finds the model config once for the step check and the load (as
    colorize_inference.py does): without a YAML beside the weights, finding it reads their
    metadata, for a .ckpt a torch.load (it was found twice)."""
    from cldm.checkpoint import load_state_dict, save_state_dict
    from cldm.weights_config import read_export_metadata
    from colorize import loading

    ckpt = tmp_path / f"toy{suffix}"  # no toy.yaml beside it: the config it records
    save_state_dict(load_state_dict(demo.TOY), ckpt, metadata=read_export_metadata(demo.TOY))
    found, real = [], loading.resolve_config
    monkeypatch.setattr(loading, "resolve_config", lambda *a, **kw: found.append(a) or real(*a, **kw))
    demo.check_model(str(ckpt), 2)
    assert len(found) == 1, found
    with pytest.raises(demo.DemoError, match=r"--steps must be between 1 and 500 .*\(got 999\)"):
        demo.check_model(str(ckpt), 999)  # the schedule of the config it records


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_as_ckpt_is_called_one_before_anything_is_written(tmp_path, capsys):
    with named_pipe(tmp_path / "model.safetensors") as pipe:  # was "no such file"
        rc, _, err = run(["--ckpt", pipe, "--out", tmp_path / "demo"], capsys)
    assert rc == 2 and err == f"demo.py: error: --ckpt {pipe}: not a regular file (a named pipe, socket or device)\n"
    assert not (tmp_path / "demo").exists()


def test_a_gray_clip_is_refused_before_anything_is_written(tmp_path, capsys):
    """Its reference frame has no colours to give: was refused by colorize_inference.py only
    after data/ had been written, as "--reference .../data/reference.png is gray" and a failed step."""
    clip = write_video((np.repeat(f.mean(-1, keepdims=True), 3, -1).astype(np.uint8)
                        for f in panning_clip(4, 48, 64)), tmp_path / "gray.mp4")
    rc, out, err = run(["--clip", clip, "--frames", "1:4", "--methods", "reinhard", "--out", tmp_path / "demo"],
                       capsys)
    assert rc == 2 and err == f"demo.py: error: --clip {clip}: frame 1 (the reference frame) is gray, not colour\n"
    assert out == "" and not (tmp_path / "demo").exists()
    colour = write_video(panning_clip(4, 48, 64), tmp_path / "colour.mp4")  # the same clip in colour runs
    assert run(["--clip", colour, "--frames", "1:4", "--methods", "reinhard", "--out", tmp_path / "demo"],
               capsys)[0] == 0



def test_a_clip_too_small_for_optical_flow_is_refused_before_anything_is_written(tmp_path, capsys):
    """The report's warp error needs optical flow on the frames: a 12 px clip failed in evaluate.py
    only after every method had run."""
    clip = write_video(panning_clip(4, 12, 16), tmp_path / "small.mp4")
    rc, out, err = run(["--clip", clip, "--frames", "1:4", "--methods", "reinhard", "--out", tmp_path / "demo"],
                       capsys)
    assert rc == 2 and err == (f"demo.py: error: --clip {clip}: frames of 16x12 pixels are too small for optical "
                               "flow (at least 16 pixels a side)\n")
    assert out == "" and not (tmp_path / "demo").exists()

def test_out_below_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    """Was a raw "[Errno 20] Not a directory" after the first stage had been announced."""
    note = tmp_path / "README.md"
    note.write_text("mine")
    rc, out, err = run(["--methods", "reinhard", "--out", note / "sub"], capsys)
    assert rc == 2 and err == f"demo.py: error: --out {note / 'sub'}: {note} is a file, not a folder\n", err
    assert out == "" and note.read_text() == "mine"


def test_an_unwritable_out_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    ro = read_only_folder(tmp_path / "ro", monkeypatch)
    rc, out, err = run(["--methods", "reinhard", "--out", ro / "demo"], capsys)
    assert rc == 2 and err == f"demo.py: error: --out {ro / 'demo'}: {ro} is not writable\n", err
    assert out == "" and list(ro.iterdir()) == []


def test_a_method_named_twice_runs_once(tmp_path, capsys):
    """--methods reinhard,reinhard ran reinhard twice; the second run refused the first one's outputs
    ("frame_0000.png exists") and the demo ended with exit 2 and no report."""
    clip = tmp_path / "clip"
    clip.mkdir()
    for i, f in enumerate(panning_clip(3, 48, 64)):
        cv2.imwrite(str(clip / f"frame_{i:04d}.png"), f[..., ::-1])
    out = tmp_path / "demo"
    rc, stdout, err = run(["--clip", clip, "--frames", "0:3", "--methods", "reinhard, reinhard", "--out", out], capsys)
    assert rc == 0, err
    assert stdout.count("[2/3] colourising with reinhard (1/1)") == 1
    assert list(summary(out / "report")) == ["reinhard", "gray input", "ground_truth"]


def test_no_progress_draws_no_bar(tmp_path, capsys):
    """In a log a bar's lines are noise: with --no-progress the demo's steps write nothing to stderr."""
    clip = tmp_path / "clip"
    clip.mkdir()
    for i, f in enumerate(panning_clip(3, 48, 64)):
        cv2.imwrite(str(clip / f"frame_{i:04d}.png"), f[..., ::-1])
    args = ["--clip", clip, "--frames", "0:3", "--methods", "reinhard", "--out", tmp_path / "demo"]
    rc, _, err = run(args, capsys)
    assert rc == 0 and "frame/s" in err, err  # the bar, there without the flag
    rc, _, err = run([*args, "--no-progress", "--overwrite"], capsys)
    assert (rc, err) == (0, "")


def test_the_videos_have_the_clips_frame_rate(tmp_path, capsys):
    """A 30 fps clip gives 30 fps videos (the demo passed --fps 25 whatever the clip); a frame
    folder has no rate, and gets colorize_inference.py's default, 25."""
    clip = write_video(panning_clip(3, 48, 64), tmp_path / "clip.avi", fps=30)
    rc, _, err = run(["--clip", clip, "--frames", "0:3", "--methods", "reinhard", "--out", tmp_path / "a"], capsys)
    assert rc == 0, err
    assert probe(tmp_path / "a" / "reinhard.mp4").fps == 30.0
    rc, _, err = run(["--clip", tmp_path / "a" / "data" / "colour", "--frames", "0:3", "--methods", "reinhard",
                      "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    assert probe(tmp_path / "b" / "reinhard.mp4").fps == 25.0


@pytest.mark.parametrize("where", ["earlier data", "earlier frames", "out"])
def test_a_clip_among_the_outputs_is_refused_and_kept(tmp_path, capsys, where):
    """A rerun on an earlier run's data/colour with --overwrite removed the clip before reading it
    (then "folder contains no image frames"); --out as the clip folder put the mp4s among its frames."""
    out = tmp_path / "demo"
    clip = {"earlier data": out / "data" / "colour", "earlier frames": out / "reinhard", "out": out}[where]
    clip.mkdir(parents=True)
    for i, f in enumerate(panning_clip(3, 48, 64)):
        cv2.imwrite(str(clip / f"frame_{i:04d}.png"), f[..., ::-1])
    before = sorted(p.name for p in clip.iterdir())
    rc, stdout, err = run(["--clip", clip, "--frames", "0:3", "--methods", "reinhard", "--out", out, "--overwrite"],
                          capsys)
    lies_in = {"earlier data": clip, "earlier frames": clip}.get(where)
    message = (f"--clip {clip} lies in {lies_in}, where the demo writes (and --overwrite removes) its outputs; "
               "copy the clip elsewhere or choose another --out" if lies_in else
               f"--out {out} is the --clip folder; write the demo's outputs elsewhere")
    assert (rc, stdout, err) == (2, "", f"demo.py: error: {message}\n")
    assert sorted(p.name for p in clip.iterdir()) == before


def test_overwrite_removes_only_what_the_demo_wrote(tmp_path, capsys):
    """--overwrite rmtree'd data/, report/ and each method's folder whole, with whatever else was in
    them (with --out . in a clone: data/sample/), and a user's file in data/ was called "an
    earlier run" to be overwritten. Files beside the demo's are kept; one in a folder the demo
    reads back as frames is refused, named, with --overwrite too."""
    clip = write_folder(panning_clip(4, 48, 64), tmp_path / "clip", pattern="frame_{:04d}")
    out = tmp_path / "demo"
    (out / "data" / "sample").mkdir(parents=True)
    (out / "report").mkdir()
    (out / "data" / "important.txt").write_text("notes")
    (out / "data" / "sample" / "film.mp4").write_bytes(b"bundled")
    (out / "report" / "notes.txt").write_text("mine")
    args = ["--clip", clip, "--methods", "reinhard", "--out", out]
    assert run(args + ["--frames", "0:4"], capsys)[0] == 0  # nothing of the demo's was there: nothing to refuse
    assert run(args + ["--frames", "1:3", "--overwrite"], capsys)[0] == 0
    assert (out / "data" / "important.txt").read_text() == "notes"
    assert (out / "data" / "sample" / "film.mp4").read_bytes() == b"bundled"
    assert (out / "report" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "reinhard").iterdir()) == ["frame_0001.png", "frame_0002.png"]
    assert sorted(p.name for p in (out / "data" / "colour").iterdir()) == ["frame_0001.png", "frame_0002.png"]
    (out / "reinhard" / "todo.txt").write_text("keep")
    for overwrite in ([], ["--overwrite"]):
        rc, stdout, err = run(args + ["--frames", "0:4", *overwrite], capsys)
        assert (rc, stdout, err) == (2, "", f"demo.py: error: {out / 'reinhard'} holds todo.txt, which the demo did "
                                            "not write (it reads the folder back as a clip of its frames); move it "
                                            "or choose another --out\n")
    assert (out / "reinhard" / "todo.txt").read_text() == "keep"
    assert sorted(p.name for p in (out / "reinhard").iterdir()) == ["frame_0001.png", "frame_0002.png", "todo.txt"]


@pytest.mark.slow
def test_full_demo_toy_model_beats_gray_input(tmp_path, capsys):
    """The README's demo with its defaults: every method scored, and what the README says of it:
    the toy beats the gray input clearly in fixed and anchored mode (README: by 7.1 and 5.3 dB),
    recursive mode drifts (still above gray: 1.9 dB) and anchoring holds the drift back."""
    rc, _, err = run(["--out", tmp_path / "demo"], capsys)
    assert rc == 0, err
    rows = summary(tmp_path / "demo" / "report")
    assert set(rows) == set(demo.MODEL_MODES + demo.BASELINES) | {demo.GRAY_LABEL, "ground_truth"}
    psnr = {m: float(rows[m]["psnr"]) for m in (*demo.MODEL_MODES, demo.GRAY_LABEL)}
    gray = psnr[demo.GRAY_LABEL]
    assert psnr["fixed"] > gray + 3.0 and psnr["anchored"] > gray + 3.0, psnr
    assert gray < psnr["recursive"] < psnr["anchored"] < psnr["fixed"], psnr


def test_overwrite_leaves_no_frames_of_the_earlier_run(tmp_path, capsys):
    """A narrower --frames range with --overwrite scores only its own frames: the earlier run's
    extracted frames and outputs are removed first (they used to be scored again), those of a
    method this run leaves out too (they stayed, beside a report that does not score them)."""
    out = tmp_path / "demo"
    assert run(["--frames", "100:104", "--methods", "reinhard,flow", "--out", out], capsys)[0] == 0
    (out / "flow" / "notes.txt").write_text("mine")  # not the demo's: kept, and so is its folder
    assert run(["--frames", "100:102", "--methods", "reinhard", "--out", out, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["data", "flow", "reinhard", "reinhard.mp4", "report"]
    assert [p.name for p in (out / "flow").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in (out / "data" / "colour").iterdir()) == ["frame_0100.png", "frame_0101.png"]
    assert sorted(p.name for p in (out / "reinhard").iterdir()) == ["frame_0100.png", "frame_0101.png"]
    assert json.loads((out / "report" / "metrics.json").read_text())["frames"] == ["frame_0101"]


def test_help_says_methods_default_to_all_six(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "(default: all six)" in text and "fixed,recursive,anchored,reinhard,reinhard-bands,flow" in text


def test_ctrl_c_in_a_step_exits_130_saying_interrupted(tmp_path, capsys, monkeypatch):
    """A sub-tool stopped by Ctrl-C stops the demo as interrupted (130), not as failed (2), in the
    demo's one line (the sub-tool's own is not printed)."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(methods, "iter_baseline", interrupt)
    rc, _, err = run(["--frames", "100:102", "--methods", "reinhard", "--out", tmp_path / "demo"], capsys)
    assert rc == 130, err
    assert "error" not in err and "colorize_inference.py: interrupted" not in err  # its --frames advice: not the demo's
    assert err.splitlines()[-1] == ("demo.py: interrupted during colorize_inference.py --method reinhard; what was "
                                    "written so far is kept: rerun with --overwrite to start again")


def test_sigterm_in_a_step_exits_143_saying_terminated(tmp_path, capsys, monkeypatch):
    """A sub-tool stopped by SIGTERM (a job scheduler) stops the demo with 143, not with Ctrl-C's
    130 (a scheduler or script reads the status)."""
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(methods, "iter_baseline", send_sigterm)
    rc, _, err = run(["--frames", "100:102", "--methods", "reinhard", "--out", tmp_path / "demo"], capsys)
    assert rc == 143, err
    assert err.splitlines()[-1] == ("demo.py: terminated (SIGTERM) during colorize_inference.py --method reinhard; "
                                    "what was written so far is kept: rerun with --overwrite to start again")
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_after_a_steps_first_frame_is_one_line_and_143(tmp_path, capsys, monkeypatch):
    """Once a sub-tool has written frames it re-raises the stop saying where to continue it alone
    (--frames N:); inside the demo that line is not printed and the stop stays a SIGTERM (143)."""
    from colorize.baselines import iter_baseline

    def first_then_sigterm(*args, **kwargs):
        frames = iter_baseline(*args, **kwargs)
        yield next(frames)
        send_sigterm()

    monkeypatch.setattr(methods, "iter_baseline", first_then_sigterm)
    rc, _, err = run(["--frames", "100:103", "--methods", "reinhard", "--out", tmp_path / "demo"], capsys)
    assert rc == 143, err
    assert "colorize_inference.py:" not in err and "--frames" not in err, err
    assert err.splitlines()[-1] == ("demo.py: terminated (SIGTERM) during colorize_inference.py --method reinhard; "
                                    "what was written so far is kept: rerun with --overwrite to start again")
    assert len(list((tmp_path / "demo" / "reinhard").glob("*.png"))) == 1


def test_sigterm_between_steps_exits_143(tmp_path, capsys, monkeypatch):
    """SIGTERM outside any sub-tool (here while the frames are extracted) is 143 as well."""
    monkeypatch.setattr(demo, "prepare_frames", send_sigterm)
    rc, _, err = run(["--frames", "100:102", "--methods", "reinhard", "--out", tmp_path / "demo"], capsys)
    assert rc == 143, err
    assert err.splitlines()[-1] == ("demo.py: terminated (SIGTERM); what was written so far is kept: "
                                    "rerun with --overwrite to start again")


def send_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this


def test_prepare_frames_writes_the_range_and_its_first_frame_as_the_reference(tmp_path):
    from annotator.color import rgb_to_gray, to_uint8
    from annotator.video import read_image

    frames = panning_clip(5, 48, 64)
    clip = write_folder(frames, tmp_path / "clip")
    reference = demo.prepare_frames(clip, 1, 4, tmp_path / "data")
    assert reference == tmp_path / "data" / "reference.png"
    np.testing.assert_array_equal(read_image(reference), frames[1])
    names = [f"frame_{i:04d}.png" for i in (1, 2, 3)]
    for sub in ("gray", "colour"):
        assert sorted(p.name for p in (tmp_path / "data" / sub).iterdir()) == names
    np.testing.assert_array_equal(read_image(tmp_path / "data" / "colour" / names[1]), frames[2])
    gray = cv2.imread(str(tmp_path / "data" / "gray" / names[1]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(gray, to_uint8(rgb_to_gray(frames[2])))


@pytest.mark.parametrize("first, stop", [(3, 6), (7, 9)])  # the range runs past the end, or starts past it
def test_prepare_frames_refuses_a_clip_shorter_than_the_range(tmp_path, first, stop):
    clip = write_folder(panning_clip(5, 48, 64), tmp_path / "clip")
    with pytest.raises(demo.DemoError, match=rf"^{re.escape(str(clip))}: has only 5 frames, --frames asks for "
                                             rf"frames {first}\.\.{stop - 1}$"):
        demo.prepare_frames(clip, first, stop, tmp_path / "data")


@pytest.mark.parametrize("flag, value", [("--ckpt", "nope.safetensors"), ("--steps", "1000"), ("--size", "64"),
                                         ("--device", "cpu")])
def test_a_model_flag_without_a_model_method_is_refused(tmp_path, capsys, flag, value):
    """A missing --ckpt (or --steps 1000, which a model method refuses) ran the baselines and
    exited 0: the flags of the model's methods are refused without one, as colorize_inference.py
    refuses them with a baseline."""
    rc, _, err = run(["--methods", "reinhard,flow", flag, value, "--out", tmp_path / "demo"], capsys)
    assert (rc, err) == (2, f"demo.py: error: {flag} is for the model's methods (fixed, recursive, anchored), which "
                            "--methods reinhard,flow leaves out; leave it out\n")
    assert not (tmp_path / "demo").exists()


def test_colourise_passes_the_demos_settings_to_colorize_inference(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo.colorize_inference, "main", lambda argv, stop_line: calls.append(argv) or 0)
    args = demo.parser().parse_args(["--size", "128", "--steps", "3", "--device", "cpu", "--overwrite"])
    assert demo.model_flags(args, ["recursive"]) and args.ckpt == str(demo.TOY)  # the default, where not given
    data, ref, out = tmp_path / "data", tmp_path / "data" / "reference.png", tmp_path / "demo"
    demo.colourise("recursive", data, ref, out, args, 25.0)
    demo.colourise("flow", data, ref, out, demo.parser().parse_args([]), 30000 / 1001)
    demo.colourise("reinhard", data, ref, out, demo.parser().parse_args(["--no-progress"]))  # a folder: no rate
    common = ["--input", str(data / "gray"), "--reference", str(ref)]
    assert calls == [
        [*common, "--out", str(out / "recursive"), "--video", str(out / "recursive.mp4"), "--fps", "25.0",
         "--method", "model", "--mode", "recursive", "--ckpt", str(demo.TOY), "--size", "128", "--steps", "3",
         "--device", "cpu", "--overwrite"],
        [*common, "--out", str(out / "flow"), "--video", str(out / "flow.mp4"), "--fps", "29.97002997002997",
         "--method", "flow"],  # the clip's rate to the last digit (it was 25 whatever the clip)
        [*common, "--out", str(out / "reinhard"), "--video", str(out / "reinhard.mp4"), "--method", "reinhard",
         "--no-progress"],
    ]


def test_a_failed_step_stops_the_demo_in_one_line_after_its_own(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no reference image given")
        yield
    monkeypatch.setattr(methods, "iter_baseline", broken)
    rc, _, err = run(["--frames", "100:102", "--methods", "reinhard", "--out", tmp_path / "demo"], capsys)
    assert rc == 2 and err.splitlines()[-2:] == [
        "colorize_inference.py: error: --method reinhard: no reference image given",
        "demo.py: error: colorize_inference.py --method reinhard failed (exit status 2; its message is above); once "
        "that is mended, rerun the demo with --overwrite"], err  # not the tool's own --frames advice
    assert not (tmp_path / "demo" / "report").exists()


def test_checkpoint_is_not_needed_for_the_baselines_and_a_truncated_clip_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(demo.MODEL_DEFAULTS, "ckpt", str(tmp_path / "nope.safetensors"))  # the toy model missing
    args = demo.parser().parse_args(["--out", str(tmp_path / "demo")])
    demo.check_args(args, 100, 102, ["reinhard", "flow"])  # no model: no checkpoint to check
    full = write_video(panning_clip(12, 32, 48), tmp_path / "full.avi")
    cut = truncate_avi(full, tmp_path / "cut.avi", 6)  # its header still claims 12 frames
    rc, out, err = run(["--clip", cut, "--frames", "8:10", "--methods", "reinhard", "--out", tmp_path / "demo"],
                       capsys)
    assert (rc, out, err) == (2, "", f"demo.py: error: {cut}: has no frame 8 (counting from 0; it has 6)\n")
    assert not (tmp_path / "demo").exists()


def test_overwrite_removes_an_earlier_runs_video_before_anything_else(tmp_path, capsys, monkeypatch):
    """Removed up front, so a run that stops early leaves no video of the earlier one beside its outputs."""
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "reinhard.mp4").write_bytes(b"earlier film")
    monkeypatch.setattr(demo, "prepare_frames", lambda *a: (_ for _ in ()).throw(demo.DemoError("stopped")))
    rc, _, err = run(["--frames", "100:102", "--methods", "reinhard", "--out", out, "--overwrite"], capsys)
    assert (rc, err) == (2, "demo.py: error: stopped\n")
    assert list(out.iterdir()) == []


def test_overwrite_removes_the_outputs_and_folders_of_every_method_the_run_leaves_out(tmp_path, capsys, monkeypatch):
    """A model mode's frames and video, and a baseline's, are removed and their folders with them,
    though --methods names only reinhard (kills passing `methods` for the folders to remove, and an
    `every` of the baselines or the model modes alone)."""
    out = tmp_path / "demo"
    for m in ("fixed", "anchored", "flow"):
        (out / m).mkdir(parents=True)
        (out / m / "frame_0100.png").write_bytes(b"earlier")
        (out / f"{m}.mp4").write_bytes(b"earlier film")
    monkeypatch.setattr(demo, "prepare_frames", lambda *a: (_ for _ in ()).throw(demo.DemoError("stopped")))
    rc, _, err = run(["--frames", "100:102", "--methods", "reinhard", "--out", out, "--overwrite"], capsys)
    assert (rc, err) == (2, "demo.py: error: stopped\n")
    assert list(out.iterdir()) == []


def test_without_overwrite_the_outputs_of_a_method_left_out_are_kept(tmp_path, capsys, monkeypatch):
    """Not in the way of a run of reinhard alone, and not removed by it either (kills removing
    earlier outputs whatever --overwrite says)."""
    out = tmp_path / "demo"
    (out / "flow").mkdir(parents=True)
    (out / "flow" / "frame_0100.png").write_bytes(b"earlier")
    (out / "flow.mp4").write_bytes(b"earlier film")
    monkeypatch.setattr(demo, "prepare_frames", lambda *a: (_ for _ in ()).throw(demo.DemoError("stopped")))
    rc, _, err = run(["--frames", "100:102", "--methods", "reinhard", "--out", out], capsys)
    assert (rc, err) == (2, "demo.py: error: stopped\n")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["flow", "flow.mp4", "flow/frame_0100.png"]


def test_earlier_outputs_are_the_demos_own_names_alone(tmp_path):
    """What --overwrite removes is only what the demo writes: a frame name in full (a user's
    frame_0001.png.orig beside it is in the way, not removed) and data/reference.png; a hidden
    file is no frame to a reader; a broken link at one of its names is said as one."""
    out = tmp_path / "demo"
    (out / "reinhard").mkdir(parents=True)
    (out / "data").mkdir()
    for name in ("frame_0001.png", "frame_0001.png.orig", ".DS_Store"):
        (out / "reinhard" / name).write_bytes(b"x")
    (out / "data" / "reference.png").write_bytes(b"x")
    (out / "reinhard.mp4").symlink_to(tmp_path / "gone.mp4")
    mine, other = demo.earlier_outputs(out, ["reinhard"])
    assert mine == [out / "reinhard" / "frame_0001.png", out / "data" / "reference.png"]
    assert other == [f"{out / 'reinhard'} holds frame_0001.png.orig, which the demo did not write (it reads the "
                     "folder back as a clip of its frames)",
                     f"{out / 'reinhard.mp4'} is a broken symbolic link, where the demo writes a file"]
