"""colorize_inference.py end to end with a random tiny checkpoint on frames of the sample clip."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import colorize_inference as cli
from annotator.color import rgb_to_gray, to_uint8
from annotator.video import iter_frames, probe
from cldm import weights_config
from cldm.checkpoint import save_state_dict
from cldm.config import TINY_CONFIG, load_config
from colorize import loading as L, methods as M, outputs as O, pipeline as P, resume_advice as R
from colorize.baselines import iter_baseline
from colorize.frames_io import encode_png, write_video_atomic
from tests.annotator.clips import panning_clip, truncate_avi, write_folder, write_video
from tests.colorize.tiny_model import save_tiny, tiny_model
from tests.helpers import (SignalAtLine, ended_pid, headless_video, named_pipe, read_only_folder, refused,
                           stops_in_second_write, video_with_sound)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "bigbuckbunny.mp4"
EXPECTED = Path(__file__).resolve().parents[1] / "colorize" / "baselines_expected.npz"  # see test_baselines.py
TOY = Path(__file__).resolve().parents[2] / "models" / "toy" / "toy_color_v2.safetensors"
FAST = ["--size", "64", "--steps", "2", "--config", str(TINY_CONFIG)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny checkpoint, a gray folder with a cut (frames 0-1 | 120-121 at 1/9 size) and references."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model()
    ckpt = save_tiny(model, root / "tiny.safetensors")
    colour = {}
    for i, _, rgb in iter_frames(SAMPLE, check_count=False):
        if i in (0, 1, 3, 120, 121, 125):
            colour[i] = np.ascontiguousarray(rgb[::9, ::9])  # 80x143
        if i >= 125:
            break
    gray = root / "gray"
    gray.mkdir()
    for n, i in enumerate((0, 1, 120, 121)):
        cv2.imwrite(str(gray / f"f{n}.png"), to_uint8(rgb_to_gray(colour[i])))
    refs = []
    for i in (3, 125):
        refs.append(root / f"ref{i}.png")
        cv2.imwrite(str(refs[-1]), colour[i][..., ::-1])
    return dict(root=root, model=model, ckpt=ckpt, gray=gray, refs=refs, colour=colour)


def run(args, capsys):
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def read_rgb(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(img[..., ::-1])


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def stop_encoding_at(n: int, monkeypatch) -> None:
    """Ctrl-C as the n-th PNG of the run is encoded (that frame made, its output not yet written)."""
    calls = []

    def stop(rgb, depth):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return encode_png(rgb, depth)
    monkeypatch.setattr(O, "encode_png", stop)


@pytest.mark.parametrize("mode", ["fixed", "recursive", "anchored"])
def test_folder_gives_same_names_sizes_and_lightness(env, tmp_path, capsys, mode):
    out = tmp_path / "out"
    rc, stdout, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"],
                           "--mode", mode, *(["--batch", "3"] if mode == "fixed" else []), "--out", out, *FAST],
                          capsys)
    assert rc == 0, err
    assert "wrote 4 frames" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["f0.png", "f1.png", "f2.png", "f3.png"]
    for n in range(4):
        gray = cv2.imread(str(env["gray"] / f"f{n}.png"), cv2.IMREAD_UNCHANGED)
        rgb = read_rgb(out / f"f{n}.png")
        assert rgb.shape == (80, 143, 3) and rgb.dtype == np.uint8
        # 8-bit rounding of each channel moves BT.601 luma by at most 0.5 levels
        assert np.abs(rgb_to_gray(rgb) * 255 - gray).max() <= 0.5 + 1e-3
    # and the frames are the library's for that mode (with the CLI's defaults), not another mode's
    grays = [f.gray for f in P.iter_gray_frames(env["gray"])]
    lib = P.colorize(env["model"], grays, [P.read_reference(env["refs"][0])], mode, batch=3, size=64, steps=2)
    for n, expected in enumerate(lib):
        np.testing.assert_array_equal(read_rgb(out / f"f{n}.png"), to_uint8(expected))


def test_a_continuation_with_other_settings_is_noted_and_every_frame_says_what_made_it(env, tmp_path, capsys):
    """A stopped run is continued with --frames N: into the same --out (and --video stitches the
    earlier frames in): with another seed or reference the clip mixed two looks without a word."""
    from colorize.provenance import read_record

    out = tmp_path / "out"
    base = ["--input", env["gray"], "--ckpt", env["ckpt"], "--out", out, "--no-progress", *FAST]
    assert run([*base, "--reference", env["refs"][0], "--frames", ":2", "--seed", "3"], capsys)[0] == 0
    assert read_record(out / "f0.png")["seed"] == "3"
    rc, _, err = run([*base, "--reference", env["refs"][0], "--frames", "2:3", "--seed", "3", "--batch", "1"], capsys)
    assert (rc, err) == (0, "")  # the same settings (--batch changes no colour)
    rc, _, err = run([*base, "--reference", env["refs"][1], "--frames", "3:", "--seed", "4"], capsys)
    before, now = read_record(out / "f0.png")["reference"], read_record(out / "f3.png")["reference"]
    assert rc == 0 and err == (
        f"colorize_inference.py: note: {out} keeps frames this run does not replace (e.g. f0.png) made with other "
        f"settings: --reference {before} (now: {now}); --seed 3 (now: 4); the clip mixes them (rerun it whole with "
        "--overwrite for one look)\n")
    assert "ref125.png (sha256 " in read_record(out / "f3.png")["reference"]
    rc, _, err = run([*base, "--reference", env["refs"][1], "--seed", "4", "--overwrite"], capsys)
    assert (rc, err) == (0, "")  # the whole clip again: nothing of the earlier look is left


def test_a_killed_runs_hidden_temporary_files_are_removed_by_the_next(env, tmp_path, capsys):
    """SIGKILL mid-write left `.f0.<host>-<pid>-<hex>.tmp.png` in --out and a growing hidden video
    beside --video, which no rerun removed."""
    import atomicio

    dead = ended_pid()
    out, videos = tmp_path / "out", tmp_path / "videos"
    out.mkdir()
    videos.mkdir()
    stale = [out / f".f0.{atomicio._HOST}-{dead}-0123abcd.tmp.png",
             videos / f".clip.{atomicio._HOST}-{dead}-0123abcd.tmp.mp4"]
    for path in stale:
        path.write_bytes(b"half")
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", out,
                      "--video", videos / "clip.mp4", "--no-progress"], capsys)
    assert rc == 0, err
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in out.iterdir()) == ["f0.png", "f1.png", "f2.png", "f3.png"]


@pytest.mark.parametrize("noise", P.NOISES)
def test_cli_output_is_the_library_output(env, tmp_path, capsys, noise):
    """Same seeds and references as the library, including --frames and two references (a cut)."""
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--reference", env["refs"][1],
                      "--frames", "1:4", "--seed", "5", "--noise", noise, "--ckpt", env["ckpt"], "--out", out, *FAST],
                     capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["f1.png", "f2.png", "f3.png"]
    grays = [f.gray for f in P.iter_gray_frames(env["gray"])][1:]
    refs = [P.read_reference(r) for r in env["refs"]]
    lib = P.colorize_fixed(env["model"], grays, refs, start=1, seed=5, noise=noise, size=64, steps=2)
    for n, expected in zip((1, 2, 3), lib):
        np.testing.assert_array_equal(read_rgb(out / f"f{n}.png"), to_uint8(expected))
    assert all((out / f"f{n}.png").stat().st_mode & 0o777 == 0o666 & ~_umask() for n in (1, 2, 3))


def _umask() -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)


@pytest.mark.parametrize("noise", P.NOISES)
def test_a_clip_in_parts_equals_one_run(env, tmp_path, capsys, noise):
    """--frames parts, with eta > 0: byte-identical to one run over the clip when the batches are
    the same; with other batches equal up to float rounding (batched == frame by frame to 1e-5,
    so an 8-bit level can round the other way)."""
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--noise", noise,
            "--eta", "0.5", "--batch", "2", *FAST]
    assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    for part in ("0:2", "2:"):
        assert run([*args, "--frames", part, "--out", tmp_path / "parts"], capsys)[0] == 0
    assert snapshot(tmp_path / "parts") == snapshot(tmp_path / "whole")
    assert len(snapshot(tmp_path / "whole")) == 4
    for part in ("0:1", "1:3", "3:"):
        assert run([*args, "--frames", part, "--batch", "3", "--out", tmp_path / "other"], capsys)[0] == 0
    for n in range(4):
        a, b = (read_rgb(tmp_path / d / f"f{n}.png").astype(int) for d in ("whole", "other"))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def gray_folder(env, folder: Path, n: int, broken=()) -> Path:
    """`n` gray frames f0.png.. (the env's 4, repeated), those numbered in `broken` not images."""
    folder.mkdir()
    for i in range(n):
        (folder / f"f{i}.png").write_bytes(b"broken" if i in broken else (env["gray"] / f"f{i % 4}.png").read_bytes())
    return folder


def test_frames_outside_the_range_are_not_read(env, tmp_path, capsys):
    src = gray_folder(env, tmp_path / "in", 4, broken=(0, 3))
    for method in (["--ckpt", env["ckpt"], *FAST], ["--method", "reinhard"], ["--method", "flow"]):
        out = tmp_path / f"out{method[1]}"
        rc, _, err = run(["--input", src, "--reference", env["refs"][0], "--frames", "1:3", "--out", out, *method],
                         capsys)
        assert rc == 0, err
        assert sorted(p.name for p in out.iterdir()) == ["f1.png", "f2.png"]


def test_a_bad_frame_mid_clip_keeps_what_was_written_and_says_how_to_resume(env, tmp_path, capsys):
    src = gray_folder(env, tmp_path / "in", 4, broken=(2,))
    out = tmp_path / "out"
    args = ["--input", src, "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--batch", "1", *FAST]
    rc, _, err = run([*args, "--out", out], capsys)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "error" in ln]
    assert rc == 2 and len(lines) == 1
    assert lines[0].endswith("f2.png: not a readable image (the 2 outputs before it are written and complete; "
                             "--frames 2: continues)")
    assert sorted(p.name for p in out.iterdir()) == ["f0.png", "f1.png"]  # complete, no temporary files
    (src / "f2.png").write_bytes((env["gray"] / "f2.png").read_bytes())
    assert run([*args, "--out", out, "--frames", "2:"], capsys)[0] == 0
    assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    assert snapshot(out) == snapshot(tmp_path / "whole")


def test_a_frame_too_large_to_decode_is_a_bad_frame_like_any_other(env, tmp_path, capsys):
    """OpenCV raises for an image over its size limits: a traceback and exit 1, no advice."""
    from tests.annotator.test_video import _png_header_only

    src = gray_folder(env, tmp_path / "in", 4)
    _png_header_only(src / "f2.png", 40000, 30000)
    rc, _, err = run(["--input", src, "--reference", env["refs"][0], "--method", "reinhard", "--out", tmp_path / "out"],
                     capsys)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "error" in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "f2.png: image too large for OpenCV to decode" in lines[0] and lines[0].endswith("--frames 2: continues)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.png", "f1.png"]
    rc, _, err = run(["--input", env["gray"], "--reference", src / "f2.png", "--method", "reinhard", "--out",
                      tmp_path / "out2"], capsys)
    assert rc == 2 and "f2.png: reference image too large for OpenCV to decode" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_video_cut_before_a_key_frame_keeps_its_sound_in_step(tmp_path, capsys):
    """FFmpeg decodes nothing before the first key frame: the sound started at the picture's start,
    0.32 s ahead of the first frame written, and the note blamed a varying frame rate."""
    import av

    src = headless_video(tmp_path / "cut.mp4")
    info = probe(src)
    ref = write_folder(panning_clip(1, 48, 64), tmp_path / "ref") / "frame0.png"
    rc, out, err = run(["--input", src, "--reference", ref, "--method", "reinhard", "--out", tmp_path / "out",
                        "--video", tmp_path / "out.mp4", "--no-progress"], capsys)
    assert rc == 0, err
    assert err.count("note: ") == 1 and "its first 8 frame(s) (0.32 s) cannot be decoded" in err
    decoded = len(list((tmp_path / "out").iterdir()))
    assert f"wrote {decoded} frames" in out and "(aac copied), 25 fps)" in out

    def times(path, kind):
        with av.open(str(path)) as c:
            s = next(s for s in c.streams if s.type == kind)
            start = float(s.start_time * s.time_base) if s.start_time else 0.0
            return start, [float(p.pts * p.time_base) for p in c.demux(s) if p.pts is not None and p.size]
    (v_start, _), (_, theirs) = times(src, "video"), times(src, "audio")
    (_, frames), (_, ours) = times(tmp_path / "out.mp4", "video"), times(tmp_path / "out.mp4", "audio")
    assert len(frames) == decoded and frames[:2] == pytest.approx([0, 0.04])
    assert ours == pytest.approx([t - v_start - info.lead for t in theirs], abs=1 / 8000)


def test_a_bad_frame_in_a_later_batch_names_the_batch_the_outputs_stop_before(env, tmp_path, capsys):
    """Fixed mode at --batch 4 with frame 6 unreadable: frames 4 and 5 are not written either (their
    batch never ran), so the line said "the 4 outputs before it", as if every frame before 6 were."""
    src = gray_folder(env, tmp_path / "in", 8, broken=(6,))
    out = tmp_path / "out"
    rc, _, err = run(["--input", src, "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--batch", "4",
                      "--no-progress", *FAST, "--out", out], capsys)
    assert rc == 2 and err.splitlines()[-1].endswith(
        "f6.png: not a readable image (the 4 outputs before its batch, frames 4-7, are written and complete; "
        "--frames 4: continues)"), err
    assert sorted(p.name for p in out.iterdir()) == ["f0.png", "f1.png", "f2.png", "f3.png"]


def _advice(line: str, pattern: str) -> list[str]:
    """The flags an error line advises, as argv (e.g. ["--frames", "4:6"])."""
    return re.search(pattern, line).group(1).split()


def test_a_truncated_video_gets_advice_that_works(env, tmp_path, capsys):
    """A video cut off (its header still claims every frame): going on in the same file would end
    in the same error, so the advice is the frames it still holds, or a complete copy of it; both
    followed in turn give the whole clip's frames (the copy's range said no --overwrite, and was
    refused over the held range's outputs, one of them batched otherwise)."""
    full = write_video(panning_clip(12, 32, 48), tmp_path / "full.avi")
    cut = truncate_avi(full, tmp_path / "cut.avi", 6)
    args = ["--input", cut, "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--batch", "4", *FAST]
    out = tmp_path / "out"
    rc, _, err = run([*args, "--out", out], capsys)
    line = err.splitlines()[-1]
    assert rc == 2 and line.endswith(  # frames 4-5, a batch being made when the file ran out, are not written
        "cut.avi: truncated or corrupt: decoded 6 of 12 frames (the 4 outputs before its batch, frames 4-7, are "
        "written and complete; --frames 4:6 colourises the rest of the frames it holds; with a complete copy of the file, --frames 4: "
        "--overwrite continues)"), err
    shutil.copytree(out, tmp_path / "copy")
    rc, _, err = run([*args, "--out", tmp_path / "v", "--video", tmp_path / "v.mp4"], capsys)
    assert rc == 2 and err.splitlines()[-1].endswith(  # its advice runs without --video, which needs every frame
        "--frames 4:6 without --video colourises the rest of the frames it holds; with a complete copy of the file, "
        "--frames 4: --overwrite continues)"), err
    assert run([*args, *_advice(line, r"(--frames \S+) colourises"), "--out", out], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(6)]
    cut.write_bytes(full.read_bytes())
    go_on = _advice(line, r"copy of the file, (--frames \S+ --overwrite) continues")
    assert run([*args, *go_on, "--out", tmp_path / "copy"], capsys)[0] == 0  # the held range not run
    assert run([*args, *go_on, "--out", out], capsys)[0] == 0  # after it
    assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    assert snapshot(tmp_path / "copy") == snapshot(out) == snapshot(tmp_path / "whole")
    assert len(snapshot(tmp_path / "whole")) == 12

    # every frame it holds written (a baseline goes frame by frame), and --video, which needs them all
    cut = truncate_avi(full, tmp_path / "cut2.avi", 6)
    args = ["--input", cut, "--reference", env["refs"][0], "--method", "reinhard", "--out", tmp_path / "rh",
            "--video", tmp_path / "rh.mp4"]
    rc, _, err = run(args, capsys)
    line = err.splitlines()[-1]
    assert rc == 2 and line.endswith("(the 6 outputs before it are written and complete; it holds no more frames; "
                                     "with a complete copy of the file, --frames 6: continues)"), err
    cut.write_bytes(full.read_bytes())
    assert run([*args, *_advice(line, r"copy of the file, (--frames \S+) continues")], capsys)[0] == 0
    assert probe(tmp_path / "rh.mp4").frame_count == 12


def test_odd_sized_video_is_padded(env, tmp_path, capsys):
    out, mp4 = tmp_path / "out", tmp_path / "clip.mp4"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", out,
                      "--video", mp4], capsys)
    assert rc == 0, err
    assert "frames are 143x80 and MPEG-4 needs even sides, so the video is 144x80" in err
    info = probe(mp4)
    assert (info.width, info.height, info.frame_count) == (144, 80, 4)
    assert read_rgb(out / "f0.png").shape == (80, 143, 3)


def test_raw_writes_the_models_decoded_colours_without_the_input_lightness(env, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--frames", "0:1",
                      "--raw", "--out", out, *FAST], capsys)
    assert rc == 0, err
    gray = [f.gray for f in P.iter_gray_frames(env["gray"])][0]
    [want] = P.colorize_fixed(env["model"], [gray], P.read_reference(env["refs"][0]), raw=True, size=64, steps=2)
    got = read_rgb(out / "f0.png")
    np.testing.assert_array_equal(got, to_uint8(want))
    assert np.abs(rgb_to_gray(got) - gray).max() > 0.05  # not luma-true: the lightness is the model's


def test_progress_bar_shows_frames_per_second(env, tmp_path, capsys):
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"],
                      "--out", tmp_path / "out", *FAST], capsys)
    assert rc == 0 and "4/4" in err and " frame/s]" in err and "s/ frame" not in err and "s/frame" not in err


def test_no_cursor_escapes_off_a_terminal(env, tmp_path, capsys):
    """The flow baseline scans for the reference's frame with a second bar; in a log (stderr is
    not a terminal here) it would leave cursor-up escapes, so it is shown on terminals only."""
    rc, _, err = run(["--method", "flow", "--input", env["gray"], "--reference", env["refs"][0],
                      "--out", tmp_path / "out"], capsys)
    assert rc == 0 and "flow: 100%" in err and "\x1b" not in err, err


def test_sixteen_bit_and_colour_frames(env, tmp_path, capsys):
    src = tmp_path / "in16"
    src.mkdir()
    g16 = (rgb_to_gray(env["colour"][0]) * 65535 + 0.5).astype(np.uint16)
    g16[0, 0] = 1000  # not an 8-bit level
    cv2.imwrite(str(src / "a.png"), g16)
    cv2.imwrite(str(src / "b.png"), env["colour"][1][..., ::-1])  # a colour frame, 8-bit
    out = tmp_path / "out"
    rc, _, err = run(["--input", src, "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--out", out, *FAST],
                     capsys)
    assert rc == 0, err
    assert "frames are colour; colourising their BT.601 luma" in err
    a = read_rgb(out / "a.png")
    assert a.dtype == np.uint16 and a.shape == (80, 143, 3)
    assert np.abs(rgb_to_gray(a.astype(np.float64)) - g16).max() <= 0.5 + 1e-2  # 16-bit levels
    b = read_rgb(out / "b.png")
    assert b.dtype == np.uint8
    assert np.abs(rgb_to_gray(b) - rgb_to_gray(env["colour"][1])).max() * 255 <= 0.5 + 1e-3


def test_video_input_reference_frame_and_video_output(env, tmp_path, capsys):
    from tests.annotator.clips import write_video

    clip = write_video((rgb for i, _, rgb in iter_frames(SAMPLE, check_count=False) if i < 3), tmp_path / "in.mp4",
                       fps=24.0)  # the sample's first frames (1280x720), at another rate than --fps's default
    out, mp4 = tmp_path / "out", tmp_path / "clip.mp4"
    rc, stdout, err = run(["--input", clip, "--reference-frame", "1", "--ckpt", env["ckpt"],
                           "--out", out, "--video", mp4, *FAST], capsys)
    assert rc == 0, err
    assert "wrote 3 frames" in stdout and "24 fps" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert read_rgb(out / "000000.png").shape == (720, 1280, 3)
    info = probe(mp4)
    assert (info.frame_count, info.width, info.height, info.fps) == (3, 1280, 720, 24.0)


@pytest.mark.parametrize("method", ["reinhard", "reinhard-bands", "flow"])
def test_baselines_run_without_a_checkpoint(env, tmp_path, capsys, method):
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", method,
                      "--frames", "0:2", "--out", out], capsys)
    assert rc == 0, err
    for n in range(2):
        gray = cv2.imread(str(env["gray"] / f"f{n}.png"), cv2.IMREAD_UNCHANGED)
        assert np.abs(rgb_to_gray(read_rgb(out / f"f{n}.png")) * 255 - gray).max() <= 0.5 + 1e-3


def test_no_checkpoint_names_every_baseline(tmp_path, capsys):
    """The line named two of the three baselines (reinhard|flow), not reinhard-bands."""
    rc, _, err = run(["--input", tmp_path, "--reference", tmp_path / "ref.png", "--out", tmp_path / "out"], capsys)
    assert (rc, err) == (2, "colorize_inference.py: error: --method model needs --ckpt (or use a baseline that needs "
                            "none: --method reinhard, reinhard-bands or flow)\n")


@pytest.mark.parametrize("method", ["flow", "reinhard-bands"])
def test_streamed_baselines_write_what_they_wrote_before(tmp_path, capsys, method):
    """The PNGs of the in-memory implementation (see test_baselines.py), for an image reference
    (flow anchors it at its most similar frame) and for an image plus a ground-truth frame."""
    e = np.load(EXPECTED)
    for sub, images in (("gray", e["gray"]), ("colour", e["colour"][..., ::-1])):
        (tmp_path / sub).mkdir()
        for i, img in enumerate(images):
            cv2.imwrite(str(tmp_path / sub / f"f{i}.png"), img)
    cv2.imwrite(str(tmp_path / "ref3.png"), e["colour"][3][..., ::-1])
    old = method.split("-")[0]
    base = ["--input", tmp_path / "gray", "--reference", tmp_path / "ref3.png", "--method", method]
    assert run([*base, "--frames", "1:6", "--out", tmp_path / "img"], capsys)[0] == 0
    got = np.stack([read_rgb(tmp_path / "img" / f"f{i}.png") for i in range(1, 6)])
    np.testing.assert_array_equal(got, e[f"cli_{old}_img"])
    assert run([*base, "--reference-frame", "1", "--gt", tmp_path / "colour", "--out", tmp_path / "mixed"],
               capsys)[0] == 0
    got = np.stack([read_rgb(tmp_path / "mixed" / f"f{i}.png") for i in range(6)])
    want = e[f"cli_{old}_mixed"].copy()
    if method == "reinhard-bands":  # frame 2 now takes the more similar reference (frame 1), not the
        # nearest (a tie between the image, anchored at frame 3, and frame 1, which went to the image)
        assert run([*base[:2], "--reference-frame", "1", "--gt", tmp_path / "colour", "--method", method,
                    "--out", tmp_path / "frame1"], capsys)[0] == 0
        want[2] = read_rgb(tmp_path / "frame1" / "f2.png")
    np.testing.assert_array_equal(got, want)


def _bad_cases(env, tmp):
    empty = tmp / "empty"
    empty.mkdir()
    broken = tmp / "broken"
    broken.mkdir()
    for n in range(3):
        (broken / f"f{n}.png").write_bytes((env["gray"] / f"f{n}.png").read_bytes())
    (broken / "f1.png").write_bytes(b"not a png")
    junk = tmp / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    other = tmp / "other.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, str(other))
    video = tmp / "clip.mp4"
    video.write_bytes(SAMPLE.read_bytes()[:2048])
    ref, ck, g = env["refs"][0], env["ckpt"], env["gray"]
    gray_ref = tmp / "gray_ref.png"
    gray_ref.write_bytes((g / "f0.png").read_bytes())
    (tmp / "folder.mp4").mkdir()
    (tmp / "linked").mkdir()
    (tmp / "link").symlink_to(tmp / "linked")
    from cldm.resume import LIGHTNING_KEYS, TRAINING_KEY
    step_ckpt = tmp / "step=00000005.ckpt"  # the keys a training checkpoint has, no tensors
    torch.save({**{k: {} for k in LIGHTNING_KEYS}, "global_step": 5, TRAINING_KEY: {}}, step_ckpt)
    base = ["--reference", ref, "--ckpt", ck, *FAST]
    return {
        "missing control": (["--input", g, *base, "--control", tmp / "nope.safetensors"],
                            f"--control {tmp / 'nope.safetensors'}: no such file"),
        "training checkpoint as control": (["--input", g, *base, "--control", step_ckpt],
                                           f"--control {step_ckpt}: a training checkpoint, not an export; make one "
                                           "with tutorial_train_sd21_color_v2.py ... --export, or pass the run's "
                                           "OUT/control.safetensors"),
        "eta above one": (["--input", g, *base, "--eta", "1.5"], "--eta must be <= 1 (got 1.5)"),
        "gray reference image": (["--input", g, "--reference", gray_ref, "--ckpt", ck, *FAST],
                                 f"--reference {gray_ref} is gray: it has no colours to give"),
        "reference is a folder": (["--input", g, "--reference", g, "--ckpt", ck, *FAST],
                                  f"{g}: reference image is a folder"),
        "out below a file": (["--input", g, *base, "--out", ref / "sub"], f"--out {ref / 'sub'}: {ref} is a file"),
        "video is a folder": (["--input", g, *base, "--video", tmp / "folder.mp4"], "folder.mp4 is a folder"),
        "video below a file": (["--input", g, *base, "--video", ref / "v.mp4"],
                               f"--video {ref / 'v.mp4'}: {ref} is a file"),
        "video inside out": (["--input", g, *base, "--out", tmp / "o", "--video", tmp / "o" / "v.mp4"],
                             "is inside --out"),
        "model frame too large": (["--input", g, *base, "--size", "5000"],
                                  "frames of 143x80 at size 5000 mean model frames of 8960x4992; sides above 4096"),
        "model output not finite": (["--input", g, *base, "--ref-guidance", "1e30"],
                                    "the model's output for frame 0 is NaN or infinite"),
        "empty folder": (["--input", empty, *base], f"--input {empty}: folder contains no image frames"),
        "unreadable frame": (["--input", broken, *base], "f1.png: not a readable image"),
        "missing input": (["--input", tmp / "nope", *base], f"--input {tmp / 'nope'}: no such file or folder"),
        "missing gt": (["--input", g, "--gt", tmp / "nope", "--reference-frame", "0", "--ckpt", ck, *FAST],
                       f"--gt {tmp / 'nope'}: no such file or folder"),
        "missing reference": (["--input", g, "--reference", tmp / "nope.png", "--ckpt", ck, *FAST],
                              "nope.png: reference image not found"),
        "no reference": (["--input", g, "--ckpt", ck, *FAST], "no reference"),
        "no checkpoint": (["--input", g, "--reference", ref, *FAST], "needs --ckpt"),
        "missing checkpoint": (["--input", g, "--reference", ref, "--ckpt", tmp / "nope.safetensors", *FAST],
                               f"--ckpt {tmp / 'nope.safetensors'}: no such file"),
        "corrupt checkpoint": (["--input", g, "--reference", ref, "--ckpt", junk, *FAST], "not a safetensors file"),
        "wrong checkpoint": (["--input", g, "--reference", ref, "--ckpt", other, *FAST],
                             "model tensors found in the checkpoint; the file holds: unknown (no "),
        "video as checkpoint": (["--input", g, "--reference", ref, "--ckpt", video, *FAST],
                                "clip.mp4: not a checkpoint file"),
        "flow reference outside": (["--input", g, "--reference-frame", "3", "--gt", SAMPLE,
                                    "--method", "flow", "--frames", "0:2"], "lies outside the frames"),
        "gray reference frame": (["--input", g, "--reference-frame", "0", "--ckpt", ck, *FAST],
                                 f"--reference-frame 0: frame 0 of {g} (--input, as no --gt is given) is gray, "
                                 "not colour"),
        "gray gt frame": (["--input", g, "--gt", g, "--reference-frame", "1", "--ckpt", ck, *FAST],
                          f"--reference-frame 1: frame 1 of {g} (--gt) is gray, not colour"),
        "reference frame past the end": (["--input", g, "--reference-frame", "9", "--ckpt", ck, *FAST],
                                         f"--reference-frame 9: {g} (--input, as no --gt is given) has no frame 9 "
                                         "(counting from 0; it has 4)"),  # each named no flag
        "reference frame past the gt's end": (["--input", g, "--gt", SAMPLE, "--reference-frame", "200", "--ckpt", ck,
                                               *FAST], f"--reference-frame 200: {SAMPLE} (--gt) has no frame 200 "
                                                       "(counting from 0; it has 132)"),
        "negative reference frame": (["--input", g, "--reference-frame", "-1", "--ckpt", ck, *FAST],
                                     "--reference-frame -1: frame numbers start at 0"),
        "video inside out through a link": (["--input", g, *base, "--out", tmp / "link", "--video",
                                             tmp / "linked" / "v.mp4"], "is inside --out"),
        "steps past schedule": (["--input", g, *base, "--steps", "501"],
                                "--steps must be between 1 and 500 for the model's 1000-step noise schedule (got 501)"),
        "config not the checkpoint's": (["--input", g, "--reference", ref, "--ckpt", TOY, *FAST],  # FAST: tiny YAML
                                        "toy_color_v2.safetensors was saved with another model config: model.scale_factor"),
        "infinite fps": (["--input", g, *base, "--video", tmp / "v.mp4", "--fps", "inf"],
                         "--fps must be between 0.01 and 1000 (got inf)"),
        "nan eta": (["--input", g, *base, "--eta", "nan"], "--eta must be a finite number (got nan)"),
        "infinite guidance": (["--input", g, *base, "--ref-guidance", "inf"], "--ref-guidance must be a finite number"),
        "out is a file": (["--input", g, *base, "--out", ref], "is a file, not a folder"),
        "unsupported device": (["--input", g, *base, "--device", "meta"],
                               "--device meta: expected auto, cpu, cuda or cuda:N (N from 0)"),
        "out is input": (["--input", g, *base, "--out", g], "is the input folder"),
        "bad frames": (["--input", g, *base, "--frames", "3:1"], "--frames '3:1'"),
        "empty frames": (["--input", g, *base, "--frames", "3:3"], "--frames '3:3': expected A:B with 0 <= A < B"),
        # not argparse's "expected one argument": the value reaches --frames' own check, named there
        # in quotes (was "--frames -1:: expected"), also by an abbreviation of the flag argparse takes
        "from the end": (["--input", g, *base, "--frames", "-1:"], "--frames '-1:': expected A:B with 0 <= A < B"),
        "abbreviated": (["--input", g, *base, "--fra", "-1:"], "--frames '-1:': expected A:B with 0 <= A < B"),
        "negative range": (["--input", g, *base, "--frames", "-5:-1"], "--frames '-5:-1': expected A:B with 0 <= A"),
        "not numbers": (["--input", g, *base, "--frames", "a:"], "--frames 'a:': expected A:B with whole numbers"),
        "negative eta": (["--input", g, *base, "--eta", "-0.5"], "--eta must be >= 0 (got -0.5)"),
        "anchor strength": (["--input", g, *base, "--mode", "anchored", "--anchor-strength", "2"],
                            "--anchor-strength must be in [0, 1] (got 2.0)"),
        "batch": (["--input", g, *base, "--batch", "0"], "--batch must be >= 1 (got 0)"),
        "anchor every": (["--input", g, *base, "--mode", "anchored", "--anchor-every", "-1"],
                         "--anchor-every must be >= 0 (got -1)"),
    }


CUT_ZIP = "truncated or corrupt (its zip directory, at the end of the file, is missing or damaged)"


@pytest.mark.parametrize("flag, name, says", [("--ckpt", "nope.safetensors", "no such file"),
                                              ("--ckpt", "folder", "is a folder"),
                                              ("--control", "nope.safetensors", "no such file"),
                                              ("--ckpt", "cut.ckpt", CUT_ZIP), ("--control", "cut.ckpt", CUT_ZIP),
                                              ("--ckpt", "text.ckpt", "not a checkpoint file (expected .safetensors, "
                                               "or a torch .ckpt/.pt/.pth zip or pickle)")])
def test_a_missing_checkpoint_is_the_error_alone(env, tmp_path, capsys, flag, name, says):
    """Without --config the run prints the config it found ("config: .../cldm_v21_color.yaml" for a
    missing --ckpt) before the load: that line came before the error. So did it for a file cut short
    or one that is no checkpoint."""
    (tmp_path / "folder").mkdir()
    save_state_dict({"a": torch.randn(1000)}, tmp_path / "cut.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "cut.ckpt").read_bytes()[:-10])
    (tmp_path / "text.ckpt").write_text("hello\n")
    files = {"--ckpt": env["ckpt"], "--control": None, flag: tmp_path / name}
    rc, out, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--size", "64", "--out",
                        tmp_path / "out", *[a for k, v in files.items() if v is not None for a in (k, v)]], capsys)
    assert (rc, out, err) == (2, "", f"colorize_inference.py: error: {flag} {tmp_path / name}: {says}\n")

@pytest.mark.parametrize("case, says", [
    ("missing input", "--input {tmp}/nope: no such file or folder"),
    ("missing gt", "--gt {tmp}/nope: no such file or folder"),
    ("text as gt", "--gt {tmp}/text.mp4: cannot open video (unreadable, truncated or not a video)"),
    ("broken gt frame", "--gt {tmp}/broken/f0.png: not a readable image"),
    ("broken input frame as reference", "--input {tmp}/broken/f0.png: not a readable image"),
])
def test_a_missing_or_unreadable_source_names_its_flag(env, tmp_path, capsys, case, says):
    """Was "{tmp}/nope: no such file or folder", naming no flag, as every other flag's error does."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "f0.png").write_bytes(b"not a png")
    (tmp_path / "text.mp4").write_text("not a video")
    gt = {"missing gt": "nope", "text as gt": "text.mp4", "broken gt frame": "broken"}.get(case)
    source = {"missing input": tmp_path / "nope", "broken input frame as reference": tmp_path / "broken"}
    argv = ["--input", source.get(case, env["gray"]), "--reference-frame", "0", "--method", "reinhard",
            "--no-progress", "--out", tmp_path / "out", *(["--gt", tmp_path / gt] if gt else [])]
    rc, out, err = run(argv, capsys)
    assert (rc, out, err) == (2, "", f"colorize_inference.py: error: {says.format(tmp=tmp_path)}\n")
    assert not (tmp_path / "out").exists()

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("flag, says", [
    ("--reference", "{pipe}: reference image not a regular file"),
    ("--control", "--control {pipe}: not a regular file"),
    ("--ckpt", "--ckpt {pipe}: not a regular file"),
    ("--config", "config {pipe}: not a regular file"),
])
def test_a_named_pipe_as_an_input_file_is_called_one_not_missing(env, tmp_path, capsys, flag, says):
    """Each was "no such file" (or "not found"), though there is one; none is opened (a pipe blocks its reader)."""
    args = {"--reference": env["refs"][0], "--ckpt": env["ckpt"], "--config": TINY_CONFIG, "--control": None}
    with named_pipe(tmp_path / "pipe.safetensors") as pipe:
        args[flag] = pipe
        argv = [str(a) for a in ["--input", env["gray"], "--size", "64", "--steps", "2", "--out", tmp_path / "out",
                                 *[a for k, v in args.items() if v is not None for a in (k, v)]]]
        err = refused(cli.main, argv, capsys)
    assert err == f"colorize_inference.py: error: {says.format(pipe=pipe)} (a named pipe, socket or device)\n"
    assert not (tmp_path / "out").exists()


def test_bad_input_gives_one_line_and_loses_nothing(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"earlier work")
    for name, (args, message) in _bad_cases(env, tmp_path).items():
        before = snapshot(out), snapshot(env["gray"])
        if "--out" not in args:
            args = [*args, "--out", out]
        rc, _, err = run(args, capsys)
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if "error" in ln]
        assert rc == 2, (name, err)
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("colorize_inference.py: error:"), \
            (name, err)
        assert "Traceback" not in err, name
        assert (snapshot(out), snapshot(env["gray"])) == before, name  # nothing lost, no temp files left


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_a_seed_outside_torchs_range_is_refused(env, tmp_path, capsys, seed):
    """It was taken modulo 2**64: 2**64 gave seed 0's frames, -1 those of 2**64 - 1."""
    err = refused(cli.main, [str(a) for a in ("--input", env["gray"], "--reference", env["refs"][0], "--method",
                                              "reinhard", "--seed", seed, "--out", tmp_path / "out")], capsys)
    assert err == (f"colorize_inference.py: error: argument --seed: must be in 0..{2**64 - 1} (got {seed}) "
                   "(see --help)\n") and not (tmp_path / "out").exists()


def test_existing_outputs_are_kept_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "f2.png").write_bytes(b"earlier work")
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--out", out, *FAST]
    rc, _, err = run(args, capsys)
    assert rc == 2 and err.splitlines()[-1] == (f"colorize_inference.py: error: {out / 'f2.png'} exists (1 output(s) "
                                                "already there); pass --overwrite to replace them")
    assert snapshot(out) == {"f2.png": b"earlier work"}
    rc, _, err = run([*args, "--overwrite"], capsys)
    assert rc == 0, err
    assert sorted(snapshot(out)) == ["f0.png", "f1.png", "f2.png", "f3.png"]
    assert read_rgb(out / "f2.png").shape == (80, 143, 3)
    # the range's first outputs, as a run killed without a word (SIGKILL) leaves them: say how to go on
    for name in ("f2.png", "f3.png"):
        (out / name).unlink()
    rc, _, err = run(args, capsys)
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: {out / 'f0.png'} exists (2 output(s) already there); --frames 2: continues a "
        "run stopped there, or pass --overwrite to replace them")
    rc, _, err = run([*args, "--frames", "0:3"], capsys)
    assert rc == 2 and "; --frames 2:3 continues a run stopped there, or pass" in err.splitlines()[-1]
    video = tmp_path / "clip.mp4"  # an existing --video is an output too
    video.write_bytes(b"earlier film")
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard",
                      "--out", tmp_path / "other", "--video", video], capsys)
    assert rc == 2 and f"{video} exists" in err and video.read_bytes() == b"earlier film"


@pytest.mark.parametrize("case", ["out is gt", "video is input", "video is gt", "video in input", "video in gt",
                                  "video is audio", "video is audio through a link, no --overwrite"])
def test_outputs_on_an_input_are_refused_even_with_overwrite(env, tmp_path, capsys, case):
    """--overwrite replaces outputs, never inputs: --out as the --gt folder would replace its colour
    frames of the same names, --video as the input or --gt video (or the --audio file: it was
    replaced, and without --overwrite the refusal advised it) would replace the clip, and a
    --video inside a frame folder would make it unreadable as frames ("also holds 1 video file")."""
    gray, colour = tmp_path / "gray", tmp_path / "colour"
    gray.mkdir()
    colour.mkdir()
    for n in range(2):
        (gray / f"f{n}.png").write_bytes((env["gray"] / f"f{n}.png").read_bytes())
        cv2.imwrite(str(colour / f"f{n}.png"), env["colour"][n][..., ::-1])
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(SAMPLE.read_bytes())
    source, gt, out, video = {
        "out is gt": (gray, colour, colour, None),
        "video is input": (clip, None, tmp_path / "o", clip),
        "video is gt": (gray, clip, tmp_path / "o", clip),
        "video in input": (gray, None, tmp_path / "o", gray / "v.mp4"),
        "video in gt": (gray, colour, tmp_path / "o", colour / "v.mp4"),
        "video is audio": (gray, None, tmp_path / "o", clip),
        "video is audio through a link, no --overwrite": (gray, None, tmp_path / "o", tmp_path / "link.mp4"),
    }[case]
    if "link" in case:
        video.symlink_to(clip)
    what = "--gt" if "gt" in case else "input"
    message = {"out is gt": f"--out {colour} is the --gt folder; write the outputs elsewhere",
               "video is input": f"--video {clip} is the input video; write it elsewhere",
               "video is gt": f"--video {clip} is the --gt video; write it elsewhere",
               "video is audio": f"--video {clip} is the --audio file; write it elsewhere",
               "video is audio through a link, no --overwrite": f"--video {video} is the --audio file; write it "
                                                                "elsewhere"}.get(
        case, f"--video {video} is inside the {what} folder; write it elsewhere, as a frame folder holds frames only")
    before = [snapshot(gray), snapshot(colour), clip.read_bytes()]
    args = ["--input", source, "--method", "reinhard", "--out", out, "--no-progress",
            *([] if "no --overwrite" in case else ["--overwrite"]),
            *(["--gt", gt, "--reference-frame", "0"] if gt else ["--reference", env["refs"][0]]),
            *(["--video", video] if video else []), *(["--audio", clip] if "audio" in case else [])]
    rc, _, err = run(args, capsys)
    assert (rc, err) == (2, f"colorize_inference.py: error: {message}\n")
    assert [snapshot(gray), snapshot(colour), clip.read_bytes()] == before


@pytest.mark.parametrize("video", [False, True])
def test_model_frames_too_large_are_refused_before_the_weights_load(env, tmp_path, capsys, monkeypatch, video):
    """Was said only after the model had loaded (seconds for SD2.1) and the bar had started; a
    video's size comes from its probe, a folder's from its range's first frame."""
    monkeypatch.setattr(cli.L, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    source = write_video(panning_clip(2, 64, 96), tmp_path / "v.avi") if video else env["gray"]
    args = ["--input", source, "--reference", env["refs"][0], "--ckpt", env["ckpt"], *FAST, "--no-progress",
            "--out", tmp_path / "o", "--size", "5000", *(["--frames", "1:"] if not video else [])]
    rc, _, err = run(args, capsys)
    size = "96x64 at size 5000 mean model frames of 7488x4992" if video else \
        "143x80 at size 5000 mean model frames of 8960x4992"
    assert (rc, err) == (2, f"colorize_inference.py: error: frames of {size}; sides above 4096 are refused (lower "
                            "the size, or crop very narrow frames)\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--out", "--video"])
def test_an_unwritable_out_or_video_folder_is_refused_up_front(env, tmp_path, capsys, monkeypatch, flag):
    """Was found only after the model was loaded and the first batch made ("[Errno 13] Permission
    denied: 'ro/out'"), and for --video in a line naming its temporary file ('ro/.v.1a2b3c4d.tmp.mp4')."""
    ro = read_only_folder(tmp_path / "ro", monkeypatch)
    monkeypatch.setattr(cli.L, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    target = {"--out": ro / "out", "--video": ro / "v.mp4"}[flag]
    video = flag == "--video"
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], *FAST, "--no-progress",
            "--out", tmp_path / "o" if video else target, *(["--video", target] if video else [])]
    try:
        rc, out, err = run(args, capsys)
    finally:
        ro.chmod(0o755)
    assert (rc, out, err) == (2, "", f"colorize_inference.py: error: {flag} {target}: {ro} is not writable\n")
    assert list(ro.iterdir()) == [] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--out", "--video"])
def test_a_broken_link_as_out_or_video_folder_is_one_line(env, tmp_path, capsys, flag):
    """A symlink loop as --out was a RuntimeError traceback ("Symlink loop from ...", from Path.resolve);
    a dangling one failed with "[Errno 17] File exists" once the first frame was made."""
    for link, target in (("loop", tmp_path / "loop"), ("dangling", tmp_path / "nowhere")):
        (tmp_path / link).symlink_to(target)
        where = tmp_path / link if flag == "--out" else tmp_path / "o"
        video = ["--video", tmp_path / link / "v.mp4"] if flag == "--video" else []
        rc, out, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard",
                            "--no-progress", "--out", where, *video], capsys)
        what = f"--out {where}" if flag == "--out" else f"--video {tmp_path / link / 'v.mp4'}"
        assert (rc, out, err) == (2, "", f"colorize_inference.py: error: {what}: {tmp_path / link} is a broken "
                                         "symbolic link\n")


def test_help_explains_every_flag(capsys):
    p = cli.parser()
    for action in p._actions:
        assert action.help, action.dest
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--reference", "--reference-frame", "--ckpt", "--control", "--config", "--mode",
                 "--steps", "--eta", "--seed", "--size", "--batch", "--precision", "--device", "--out",
                 "--video", "--audio", "--no-audio", "--raw", "--ref-guidance", "--method", "--overwrite",
                 "--anchor-every", "--noise"):
        assert flag in text
    flat = " ".join(text.split())
    assert "EXPERIMENTAL: reference guidance" in flat and "reference dropout" in flat
    assert "reinhard-bands" in flat and "Reinhard et al. 2001 global Lab mean/std transfer" in flat
    # the line's range, not "from that frame": in fixed mode it starts at the bad frame's batch
    assert "its last line names the --frames N: that continues it: not always the bad frame (in fixed mode, the " \
           "first frame of its batch). Rerun with that range" in flat and "Rerun from that frame" not in flat
    # not "a frame's result does not depend on --batch or --frames": another batch can move it by a level
    assert "its result only by float rounding (an 8-bit level at most) where its batch holds other frames" in flat
    assert re.search(r"--input DIR\|VIDEO grayscale frames: .*8/16-bit gray, gray\+alpha, RGB or RGBA: alpha is ignored, "
                     r"EXIF orientation applied", flat) and "1/3/4 channels" not in flat
    assert "--device DEVICE auto (cuda if available, else cpu), cpu, cuda, or cuda:N" in flat
    with pytest.raises(SystemExit) as e:
        cli.main(["--input", "x"])  # missing --out: argparse, one line, exit 2
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_steps_and_device_are_refused_before_the_input_or_the_model_is_read(env, tmp_path, capsys, monkeypatch):
    """The step count against the schedule of the config the run would use (--config, --set, the
    .yaml beside the checkpoint), known before the weights are loaded; the device in one line
    (torch's own message lists every device type it knows)."""
    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(cli, "probe", lambda *a, **k: pytest.fail("the input was read"))
    base = ["--input", SAMPLE, "--reference", env["refs"][0], "--out", tmp_path / "new"]
    for args, message in [
        (["--ckpt", TOY, "--steps", "5000"], "--steps must be between 1 and 500 for the model's 1000-step noise "
                                             "schedule (got 5000)"),
        (["--ckpt", env["ckpt"], *FAST, "--set", "model.schedule.timesteps=100", "--steps", "51"],
         "--steps must be between 1 and 50 for the model's 100-step noise schedule (got 51)"),
        (["--ckpt", TOY, "--device", "foo"], "--device foo: expected auto, cpu, cuda or cuda:N (N from 0)"),
        (["--ckpt", TOY, "--device", "cuda:x"], "--device cuda:x: expected auto, cpu, cuda or cuda:N (N from 0)"),
        (["--ckpt", TOY, "--device", "mps"], "--device mps: expected auto, cpu, cuda or cuda:N (N from 0)"),
    ]:
        rc, _, err = run([*base, *args], capsys)
        assert rc == 2 and err == f"colorize_inference.py: error: {message}\n", err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("how, status, said", [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated (SIGTERM)")])
@pytest.mark.parametrize("video", [False, True])
def test_an_interrupt_says_which_frame_to_continue_from(env, tmp_path, capsys, monkeypatch, how, status, said, video):
    """Stopped while the third output is made: the two before it are kept, the message names
    --frames 2: (not a placeholder), and that range completes the run."""
    encode = O.encode_png
    calls = []

    def stop_at_the_third(rgb, depth):
        calls.append(1)
        if len(calls) == 3:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # run_cli's handler raises KeyboardInterrupt
            raise KeyboardInterrupt
        return encode(rgb, depth)
    monkeypatch.setattr(O, "encode_png", stop_at_the_third)
    out = tmp_path / "out"
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", out]
    if video:
        args += ["--video", tmp_path / "v.mp4"]
    rc, _, err = run(args, capsys)
    assert rc == status and err.splitlines()[-1] == (f"colorize_inference.py: {said}; the 2 outputs written so far "
                                                     f"are complete: --frames 2: continues"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no video, no temporary files
    assert sorted(p.name for p in out.iterdir()) == ["f0.png", "f1.png"]
    monkeypatch.setattr(O, "encode_png", encode_png)
    if video:  # the continuation with the same --video gives the whole clip's video
        rc, stdout, err = run([*args, "--frames", "2:"], capsys)
        assert rc == 0 and "wrote 2 frames" in stdout and "(4 frames, 2 of them already in" in stdout, err
        assert probe(tmp_path / "v.mp4").frame_count == 4
    else:
        assert run([*args, "--frames", "2:"], capsys)[0] == 0
        assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
        assert snapshot(out) == snapshot(tmp_path / "whole")
        # a run that starts later counts from its own start: stopped at its third, it goes on at 3
        calls.clear()
        monkeypatch.setattr(O, "encode_png", stop_at_the_third)
        rc, _, err = run([*args, "--frames", "1:", "--out", tmp_path / "later"], capsys)
        assert rc == status and err.splitlines()[-1].endswith("--frames 3: continues"), err


@pytest.mark.parametrize("video", [False, True])
def test_a_second_ctrl_c_while_the_outputs_are_drained_leaves_none_uncounted(env, tmp_path, capsys, monkeypatch,
                                                                             video):
    """Ctrl-C as the first PNG is renamed into place, and again as the next is, in the drain of
    those already made: the second landed between that rename and its count, so the line said one
    output fewer than were on disk, and the --frames N: it advised was refused (N's PNG exists).
    Real signals, as the handler runs them: after the rename (the hard link that publishes a PNG
    without replacing anything) returns."""
    rename, link = os.replace, os.link
    renames = []

    def after(publish):
        def signal_after_rename(src, dst):
            publish(src, dst)
            if str(dst).endswith(".png"):
                renames.append(dst)
                if len(renames) <= 2:  # to this thread: not run late by another (one held is delivered as it ends)
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return signal_after_rename
    monkeypatch.setattr(os, "replace", after(rename))
    monkeypatch.setattr(os, "link", after(link))
    out = tmp_path / "out"
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", out,
            "--no-progress"]
    if video:
        args += ["--video", tmp_path / "v.mp4"]
    rc, _, err = run(args, capsys)
    line = err.splitlines()[-1]
    written = sorted(p.name for p in out.iterdir())
    assert rc == 130 and len([n for n in err.splitlines() if ": note: " not in n]) == 1 and re.fullmatch(
        rf"colorize_inference.py: interrupted; the {len(written)} outputs? written so far (is|are) complete: "
        rf"--frames {len(written)}: continues", line), (line, written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no video, no temporary files
    monkeypatch.setattr(os, "replace", rename)
    monkeypatch.setattr(os, "link", link)
    rc, _, err = run([*args, "--frames", f"{len(written)}:"], capsys)
    assert rc == 0, err
    if video:
        assert probe(tmp_path / "v.mp4").frame_count == 4
    whole = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", tmp_path / "whole"]
    assert run(whole, capsys)[0] == 0
    assert snapshot(out) == snapshot(tmp_path / "whole")


def test_a_second_ctrl_c_while_the_stop_line_is_worked_out_still_says_where_to_go_on(env, tmp_path, capsys,
                                                                                    monkeypatch):
    """A second Ctrl-C in the stop's handler (as it looks at --video) ended it with "interrupted before
    any output was written": 2 were, and the rerun of the same command that line advises is refused."""
    stop_encoding_at(3, monkeypatch)
    identity, calls = R.file_identity, []

    def signal_in_the_handler(path):
        calls.append(path)
        if len(calls) == 2:  # the first is before the run; the second, the handler's
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # not run late by another thread
        return identity(path)
    monkeypatch.setattr(R, "file_identity", signal_in_the_handler)
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", tmp_path / "out",
            "--video", tmp_path / "v.mp4", "--no-progress"]
    rc, _, err = run(args, capsys)
    assert len(calls) == 2 and rc == 130 and err.splitlines()[-1] == (
        "colorize_inference.py: interrupted; the 2 outputs written so far are complete: --frames 2: continues"), err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.png", "f1.png"]


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_stop_that_a_library_turns_into_its_own_error_says_where_to_go_on(env, tmp_path, capsys, monkeypatch, signum,
                                                                            status, said):
    """A Ctrl-C or SIGTERM whose exception a library's C code turned into an error of its own (an
    OSError here, as the third frame is read) ended as that error with exit 2, or, once run_cli
    knew it for a stop, with its "interrupted before any output was written": two were."""
    colourised = M.colourised

    def stop_in_c_code(*args, **kwargs):
        for i, made in enumerate(colourised(*args, **kwargs)):
            if i == 2:
                try:
                    signal.raise_signal(signum)  # handled at once, in this (the main) thread
                except KeyboardInterrupt:  # what the C code does with the pending exception
                    raise OSError(5, "Input/output error") from None
                pytest.fail("no handler raised")
            yield made
    monkeypatch.setattr(M, "colourised", stop_in_c_code)
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard",
                      "--out", tmp_path / "out", "--no-progress"], capsys)
    assert (rc, err) == (status, f"colorize_inference.py: {said}; the 2 outputs written so far are complete: "
                                 "--frames 2: continues\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.png", "f1.png"]


@pytest.mark.parametrize("signum, kind", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, cli.Terminated)])
def test_a_stop_turned_into_an_error_before_any_output_reaches_a_calling_tool_without_that_error(
        env, tmp_path, monkeypatch, signum, kind):
    """main(stop_line=False) (demo.py): the stop a library turned into its own error, as the first
    frame is read, is re-raised as the stop itself, not with that error as its context (a traceback's
    "During handling of the above exception, another exception occurred")."""
    colourised = M.colourised

    def stop_in_c_code(*args, **kwargs):
        for _ in colourised(*args, **kwargs):
            try:
                signal.raise_signal(signum)
            except KeyboardInterrupt:
                raise OSError(5, "Input/output error") from None
            pytest.fail("no handler raised")
            yield
    monkeypatch.setattr(M, "colourised", stop_in_c_code)
    with pytest.raises(KeyboardInterrupt) as e:
        cli.main([str(a) for a in ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard",
                                   "--out", tmp_path / "out", "--no-progress"]], stop_line=False)
    assert type(e.value) is kind and e.value.args == () and e.value.__suppress_context__ is True
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_stop_that_a_library_turns_into_a_runtime_error_is_a_stop_not_a_traceback(env, tmp_path, capsys,
                                                                                    monkeypatch):
    """A RuntimeError (torch's, OpenCV's cv2.error) is re-raised as a bug unless it is out of memory:
    one that a Ctrl-C was turned into is a stop first, with the line that says where to go on."""
    colourised = M.colourised

    def stop_in_c_code(*args, **kwargs):
        for i, made in enumerate(colourised(*args, **kwargs)):
            if i == 2:
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    raise RuntimeError("an operation was interrupted") from None
                pytest.fail("no handler raised")
            yield made
    monkeypatch.setattr(M, "colourised", stop_in_c_code)
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard",
                      "--out", tmp_path / "out", "--no-progress"], capsys)
    assert (rc, err) == (130, "colorize_inference.py: interrupted; the 2 outputs written so far are complete: "
                              "--frames 2: continues\n")


def test_a_second_ctrl_c_as_the_stop_line_is_said_is_no_traceback(env, tmp_path, capsys, monkeypatch):
    """A second Ctrl-C while run_cli wrote the stop's line escaped its handler: a traceback after it."""
    import cliutil

    stop_encoding_at(3, monkeypatch)
    say = cliutil._say

    def signal_then_say(line):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # to this thread: run at once
        say(line)
    monkeypatch.setattr(cliutil, "_say", signal_then_say)
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", tmp_path / "out",
            "--no-progress"]
    try:
        rc, _, err = run(args, capsys)
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped run_cli")
    assert rc == 130 and err == (
        "colorize_inference.py: interrupted; the 2 outputs written so far are complete: --frames 2: continues\n")


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_after_the_stop_line_is_worked_out_still_says_where_to_go_on(env, tmp_path, capsys,
                                                                                    monkeypatch, second):
    """A second Ctrl-C or SIGTERM after run() had worked out its stop line (signals ignored for that
    alone) but before run_cli said it - as the exception left run(), or run_cli's signals_noted block -
    replaced that exception with a bare one: "interrupted before any output was written" (2 were, and
    the rerun it advises is refused), or a traceback. The signal comes at each line run in that span
    in turn (a trace function), as its handler runs it: at once, in the main thread."""
    import cliutil

    worked_out, say = R.where_it_stopped, cliutil._say
    sweep = SignalAtLine(second)

    def trace_from_its_return(*args, **kwargs):
        said = worked_out(*args, **kwargs)
        sweep.start(sys._getframe(1))  # the frames it returns through
        return said

    def stop_tracing_then_say(line):
        sweep.stop()
        say(line)
    monkeypatch.setattr(R, "where_it_stopped", trace_from_its_return)
    monkeypatch.setattr(cliutil, "_say", stop_tracing_then_say)
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    for at in range(1, 500):
        sweep.reset(at)
        stop_encoding_at(3, monkeypatch)
        try:
            rc, _, err = run([*args, "--out", tmp_path / str(at)], capsys)
        except KeyboardInterrupt:
            pytest.fail(f"the second signal, at line {at}, escaped run_cli")
        finally:
            sweep.stop()
        assert (rc, err) == (130, "colorize_inference.py: interrupted; the 2 outputs written so far are "
                                  "complete: --frames 2: continues\n"), (at, err)
        if not sweep.sent:  # each line up to the stop line's tried
            break
    assert at > 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        assert not callable(getattr(signal.getsignal(signum), "follows", None))  # no noting handler left


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_a_complete_run_returns_changes_nothing(env, tmp_path, capsys, monkeypatch, signum):
    """A Ctrl-C or SIGTERM after a complete run had said "wrote ...", as run() returned (its objects
    freed: the progress bar here, a model in earnest) or before run_cli did, ended it with
    "interrupted before any output was written", exit 130 (the rerun it advises is refused: the
    outputs exist), or with a traceback from tqdm's __del__. It comes at each line from run()'s
    return until run_cli puts the handlers back (from then on it is the caller's), in turn (a trace
    function), as its handler runs it: at once."""
    import cliutil

    sweep = SignalAtLine(signum)
    put_back = cliutil._put_back

    def stop_tracing_then_put_back(handlers):  # run_cli's finally, about to put the handlers back
        sweep.stop()
        put_back(handlers)
    monkeypatch.setattr(cliutil, "_put_back", stop_tracing_then_put_back)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def watch(frame, event, arg):  # from run()'s return (its frame then freed)
        if event == "return" and frame.f_code is cli.run.__code__:
            sys.setprofile(None)
            sweep.start(frame.f_back)
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    for at in range(1, 500):
        sweep.reset(at)
        sys.setprofile(watch)
        try:
            rc, out, err = run([*args, "--out", tmp_path / str(at)], capsys)
        except KeyboardInterrupt:
            pytest.fail(f"the signal, at line {at}, escaped run_cli")
        finally:
            sys.setprofile(None)
            sweep.stop()
        assert (rc, err, unraisable) == (0, "", []), (at, err, unraisable)
        assert out == f"wrote 4 frames to {tmp_path / str(at)}\n"
        if not sweep.sent:  # each line up to run_cli's putting the handlers back tried
            break
    assert at > 1


def test_flow_holds_frames_waiting_for_a_late_reference_beside_the_outputs(tmp_path, capsys, monkeypatch):
    """Past FLOW_RAM (lowered here to a frame's worth), the frames waiting for --reference-frame 4
    go to a temporary file in the nearest existing folder of --out (not yet made: its parent), on
    the outputs' disk rather than in the system's temporary folder; the note says where, and the
    outputs are those of a run that held them in RAM."""
    colour = write_folder(panning_clip(6, 48, 64), tmp_path / "colour", pattern="f{:d}")
    args = ["--input", colour, "--reference-frame", "4", "--method", "flow", "--no-progress"]
    assert run([*args, "--out", tmp_path / "ram"], capsys)[0] == 0
    monkeypatch.setattr(M, "FLOW_RAM", 48 * 64 * 13)
    made, make = [], tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda dir: made.append(dir) or make(dir=dir))
    rc, _, err = run([*args, "--out", tmp_path / "new" / "out"], capsys)
    assert rc == 0 and made == [tmp_path, tmp_path], err
    assert f"they are held in a temporary file in {tmp_path}, deleted as the run ends" in err
    assert snapshot(tmp_path / "new" / "out") == snapshot(tmp_path / "ram")


def test_flow_stopped_past_its_reference_frame_is_told_a_range_that_holds_it(tmp_path, capsys, monkeypatch):
    """Flow walks from its --reference-frame: "--frames 3:6 continues" was a range the tool itself
    refuses ("--reference-frame 1 lies outside the frames being colourised"). The advice starts at
    the reference frame, with --overwrite for the outputs since, and gives the uninterrupted result."""
    colour = write_folder(panning_clip(6, 48, 64), tmp_path / "colour", pattern="f{:d}")
    stop_encoding_at(4, monkeypatch)
    args = ["--input", colour, "--reference-frame", "1", "--method", "flow", "--frames", "0:6", "--no-progress"]
    rc, _, err = run([*args, "--out", tmp_path / "out"], capsys)
    line = err.splitlines()[-1]
    assert (rc, line) == (130, "colorize_inference.py: interrupted; the 3 outputs written so far are complete: "
                               "--frames 1:6 --overwrite continues (flow walks again from its reference frame 1)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.png", "f1.png", "f2.png"]
    monkeypatch.setattr(O, "encode_png", encode_png)
    advice = _advice(line, r"complete: (--frames .*) continues")
    rc, _, err = run([*args[:-3], *advice, "--no-progress", "--out", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "whole")


def test_a_video_of_unknown_length_keeps_existing_outputs(env, tmp_path, capsys, monkeypatch):
    """A container that does not say how many frames it has: outputs cannot be checked up front,
    so each is checked before it is written; an existing one stops the run, unchanged."""
    from tests.annotator.clips import panning_clip, write_video

    video = write_video(panning_clip(3, 64, 96), tmp_path / "v.avi")
    monkeypatch.setattr(P, "output_names", lambda *a, **k: None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "000001.png").write_bytes(b"earlier work")
    rc, _, err = run(["--input", video, "--reference", env["refs"][0], "--method", "reinhard", "--out", out], capsys)
    assert rc == 2 and f"{out / '000001.png'} exists; pass --overwrite" in err, err
    assert (out / "000001.png").read_bytes() == b"earlier work"


@pytest.mark.parametrize("link", [True, False])
def test_an_output_another_run_writes_meanwhile_is_kept(env, tmp_path, capsys, monkeypatch, link):
    """Two runs started together into one --out both passed the check at their start; the one
    that finished said "wrote 4 frames" over the other's frames. An output that appears after
    the check is now kept and stops the run as an existing one does, naming it, with the outputs
    before it complete; so too where the file system has no hard links (a check just before the
    rename then)."""
    if not link:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    out = tmp_path / "out"
    calls = []

    def other_run_meanwhile(rgb, depth):  # the second frame's output made by another run as this one encodes it
        calls.append(1)
        if len(calls) == 2:
            (out / "f1.png").write_bytes(b"the other run's")
        return encode_png(rgb, depth)

    monkeypatch.setattr(O, "encode_png", other_run_meanwhile)
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", out,
                      "--no-progress"], capsys)
    assert rc == 2 and err.splitlines()[-1].startswith(f"colorize_inference.py: error: {out / 'f1.png'} exists; "
                                                       "pass --overwrite to replace it"), err
    assert (out / "f1.png").read_bytes() == b"the other run's"
    assert sorted(p.name for p in out.iterdir()) == ["f0.png", "f1.png"]  # no temporary file left


def test_a_broken_link_at_an_output_is_an_output_there(env, tmp_path, capsys):
    """Outputs are published without replacing what is there, and a link (broken too) is there:
    refused as an existing output, not after the frames before it were made with a claim that
    another run wrote it; --overwrite replaces the link."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "f1.png").symlink_to(tmp_path / "nowhere.png")
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", out, "--no-progress"]
    rc, _, err = run(args, capsys)
    assert rc == 2 and f"{out / 'f1.png'} exists; pass --overwrite to replace it" in err.splitlines()[-1], err
    assert (out / "f1.png").is_symlink()
    assert run([*args, "--overwrite"], capsys)[0] == 0 and not (out / "f1.png").is_symlink()


def test_an_interrupt_before_any_output_says_so(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(L, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], *FAST,
                      "--out", tmp_path / "out"], capsys)
    assert rc == 130 and err == "colorize_inference.py: interrupted before any output was written\n"


@pytest.mark.parametrize("video", [False, True])
def test_an_interrupt_while_the_first_frame_is_made_says_nothing_was_written(env, tmp_path, capsys, monkeypatch,
                                                                             video):
    """A stop inside the run before its first PNG is written (here as it is encoded) goes through
    run()'s own handler, which leaves the line to run_cli: not "the 0 outputs written so far are
    complete: --frames 0: continues"."""
    stop_encoding_at(1, monkeypatch)
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", tmp_path / "out", *(["--video", tmp_path / "v.mp4"] if video else [])], capsys)
    assert rc == 130 and err.splitlines()[-1] == "colorize_inference.py: interrupted before any output was written", err
    assert not (tmp_path / "v.mp4").exists()


def test_a_video_in_a_folder_not_made_yet(env, tmp_path, capsys):
    out, video = tmp_path / "new", tmp_path / "films" / "clip.mp4"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard",
                      "--out", out, "--video", video], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["f0.png", "f1.png", "f2.png", "f3.png"] and video.is_file()


def video_frames(path: Path) -> list:
    return [rgb for _, _, rgb in iter_frames(path)]


@pytest.mark.parametrize("first, then", [("0:2", "2:"), ("2:", "0:2"), ("0:1", "1:3"), ("1:3", "0:1")])
def test_a_partial_range_with_video_makes_the_whole_clips_video(env, tmp_path, capsys, first, then):
    """Continuing a stopped run (--frames N: --video V) gives the video an uninterrupted run gives:
    the frames outside the range come from --out, in clip order."""
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard"]
    assert run([*args, "--out", tmp_path / "whole", "--video", tmp_path / "whole.mp4"], capsys)[0] == 0
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    assert run([*args, "--out", out, "--frames", first], capsys)[0] == 0
    if then == "1:3":  # the last frame, outside both ranges, from a third run
        assert run([*args, "--out", out, "--frames", "3:"], capsys)[0] == 0
    if then == "0:1":
        assert run([*args, "--out", out, "--frames", "3:"], capsys)[0] == 0
    rc, stdout, err = run([*args, "--out", out, "--frames", then, "--video", video], capsys)
    assert rc == 0, err
    new = {"2:": 2, "0:2": 2, "1:3": 2, "0:1": 1}[then]
    frames = f"{new} frame" + ("s" if new > 1 else "")
    assert stdout.startswith(f"wrote {frames} to {out} and {video} (4 frames, {4 - new} of them already in {out}")
    assert snapshot(out) == snapshot(tmp_path / "whole")
    got, want = video_frames(video), video_frames(tmp_path / "whole.mp4")
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, want))
    # the video takes what --out holds, in clip order: another frame there (a cut apart) shows
    k = 3 if then.startswith("0:") else 0  # a frame outside the range
    (out / f"f{k}.png").write_bytes(snapshot(tmp_path / "whole")[f"f{3 - k}.png"])
    assert run([*args, "--out", out, "--frames", then, "--video", video, "--overwrite"], capsys)[0] == 0
    got = video_frames(video)

    def diff(a, b):
        return np.abs(a.astype(int) - b).mean()
    assert 5 * diff(got[k], want[3 - k]) < diff(got[k], want[k])  # lossy, so not bit for bit


@pytest.mark.parametrize("present, frames, missing", [
    ([], "2:", "f0.png (frame 0) is missing (2 of the 2 outside the range)"),
    (["f0.png"], "2:", "f1.png (frame 1) is missing (1 of the 2 outside the range)"),
    (["f0.png", "f1.png"], "2:3", "f3.png (frame 3) is missing (1 of the 3 outside the range)"),
])
def test_a_partial_range_with_video_is_refused_up_front_when_frames_are_missing(env, tmp_path, capsys, present,
                                                                              frames, missing):
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    out.mkdir()
    for name in present:
        (out / name).write_bytes(b"earlier work")  # not read: the check is for presence, before any work
    before = snapshot(out)
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", out,
                      "--frames", frames, "--video", video], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err == (f"colorize_inference.py: error: --video with --frames {frames} makes the whole clip's video, "
                   f"taking the other frames from --out, but {out / missing}: colourise them first, or run without "
                   "--frames, or without --video\n")
    assert snapshot(out) == before and not video.exists()


def test_a_partial_range_with_video_and_a_bad_earlier_frame(env, tmp_path, capsys):
    """An unreadable frame, or one of another size, in --out outside the range: one line; the new
    frames are kept and only the video is missing."""
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", tmp_path / "out"]
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    assert run(args, capsys)[0] == 0
    (out / "f3.png").write_bytes(b"broken")
    rc, _, err = run([*args, "--frames", "1:3", "--video", video, "--overwrite"], capsys)
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: --video: {out / 'f3.png'}: not a readable image (the 2 new outputs are "
        "written and complete; only --video is missing: colourise frame 3 again with --frames 3:4 --overwrite "
        "without --video, then --frames 4: writes the video)"), err
    cv2.imwrite(str(out / "f0.png"), np.zeros((8, 8, 3), np.uint8))
    rc, _, err = run([*args, "--frames", "1:3", "--video", video, "--overwrite"], capsys)
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: --video: {out / 'f0.png'} is 8x8, the input's frames 143x80: --out holds "
        "frames of another clip or size"), err  # found before the first new frame was written
    assert not video.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    cv2.imwrite(str(out / "f3.png"), np.zeros((8, 8, 3), np.uint8))
    rc, _, err = run([*args, "--frames", "0:3", "--video", video, "--overwrite"], capsys)
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: --video: {out / 'f3.png'} is 8x8, the input's frames 143x80: --out holds "
        "frames of another clip or size (the 3 new outputs are written and complete; only --video is missing)"), err


@pytest.mark.parametrize("broken", [0, 3])
def test_an_unreadable_output_read_for_the_video_is_mended_by_following_the_advice(env, tmp_path, capsys, broken):
    """A corrupt PNG in --out outside the range, read for --video before the new frames (frame 0)
    or after them (frame 3): the line says to colourise that frame again, then how the video is
    made; followed literally, the video is the uninterrupted run's (reinhard: the same PNGs)."""
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard"]
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    assert run([*args, "--out", out], capsys)[0] == 0
    whole = snapshot(out)
    (out / f"f{broken}.png").write_bytes(b"broken")
    rc, _, err = run([*args, "--out", out, "--frames", "1:3", "--video", video, "--overwrite"], capsys)
    then = "then rerun" if broken == 0 else "then --frames 4: writes the video"
    said = "nothing was written" if broken == 0 else "the 2 new outputs are written and complete; only --video is missing:"
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: --video: {out / f'f{broken}.png'}: not a readable image ({said}"
        f"{';' if broken == 0 else ''} colourise frame {broken} again with --frames {broken}:{broken + 1} --overwrite "
        f"without --video, {then})"), err
    assert run([*args, "--out", out, "--frames", f"{broken}:{broken + 1}", "--overwrite"], capsys)[0] == 0
    last = ["--frames", "1:3", "--overwrite"] if broken == 0 else ["--frames", "4:"]
    rc, _, err = run([*args, "--out", out, "--video", video, *last], capsys)
    assert rc == 0, err
    assert snapshot(out) == whole and video.is_file()


@pytest.mark.parametrize("odd", [0, 1])
@pytest.mark.parametrize("kind", ["folder", "video"])
def test_video_names_the_frame_of_out_whose_size_is_not_the_inputs(env, tmp_path, capsys, kind, odd):
    """A frame of --out of another size is the one named, with both sizes, also where it is the
    first frame of the clip (the input's frames, not the first one read, set the video's size)."""
    from tests.annotator.clips import panning_clip, write_video

    source = env["gray"] if kind == "folder" else write_video(panning_clip(3, 80, 144), tmp_path / "v.avi")
    out = tmp_path / "out"
    args = ["--input", source, "--reference", env["refs"][0], "--method", "reinhard", "--out", out]
    assert run(args, capsys)[0] == 0
    names = sorted(p.name for p in out.iterdir())
    cv2.imwrite(str(out / names[odd]), np.zeros((8, 8, 3), np.uint8))
    before = snapshot(out)
    rc, _, err = run([*args, "--frames", "2:", "--video", tmp_path / "o.mp4", "--overwrite"], capsys)
    size = "143x80" if kind == "folder" else "144x80"
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: --video: {out / names[odd]} is 8x8, the input's frames {size}: --out holds "
        "frames of another clip or size"), err
    assert snapshot(out) == before and not (tmp_path / "o.mp4").exists()  # refused before any new frame


def test_a_partial_range_with_video_of_a_clip_of_unknown_length(env, tmp_path, capsys, monkeypatch):
    from tests.annotator.clips import panning_clip, write_video

    clip = write_video(panning_clip(3, 64, 96), tmp_path / "v.avi")
    monkeypatch.setattr(P, "output_names", lambda *a, **k: None)
    args = ["--input", clip, "--reference", env["refs"][0], "--method", "reinhard", "--out", tmp_path / "out"]
    rc, _, err = run([*args, "--frames", "1:2", "--video", tmp_path / "o.mp4"], capsys)
    assert rc == 2 and "does not say how many frames it has, so the frames after 1 cannot be checked" in err, err
    assert run([*args, "--frames", "0:1"], capsys)[0] == 0
    rc, stdout, err = run([*args, "--frames", "1:", "--video", tmp_path / "o.mp4"], capsys)
    assert rc == 0 and probe(tmp_path / "o.mp4").frame_count == 3, err


def test_out_of_memory_is_one_line_and_other_runtime_errors_are_not_hidden(env, tmp_path, capsys, monkeypatch):
    def fail(message):
        def colorize(*a, **k):
            raise RuntimeError(message)
            yield
        monkeypatch.setattr(P, "colorize", colorize)

    args = ["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], *FAST, "--out", tmp_path]
    fail("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to "
         "allocate 249328451584 bytes. Error code 12 (Cannot allocate memory)")
    rc, _, err = run(args, capsys)
    assert rc == 2 and err.splitlines()[-1] == ("colorize_inference.py: error: out of memory on cpu at --size 64, "
                                                "--batch 4: lower them")
    assert "Traceback" not in err
    fail("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([str(a) for a in args])


def test_a_video_input_is_probed_once(env, tmp_path, capsys, monkeypatch):
    probed = []

    def counting_probe(path):
        probed.append(Path(path).name)
        return probe(path)
    monkeypatch.setattr(cli, "probe", counting_probe)
    monkeypatch.setattr(P, "probe", counting_probe)
    rc, _, err = run(["--input", SAMPLE, "--reference", env["refs"][0], "--method", "reinhard", "--frames", "0:1",
                      "--out", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert probed == [SAMPLE.name]
    probed.clear()
    rc, _, err = run(["--input", SAMPLE, "--reference", env["refs"][0], "--method", "reinhard", "--frames", "140:",
                      "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "--frames 140: starts past the input's 132 frames" in err and probed == [SAMPLE.name]


def test_compile_flag_compiles_the_denoiser_and_pads_batches(env, tmp_path, capsys, monkeypatch):
    """--compile compiles ControlNet, UNet and VAE decoder with static shapes (compiling itself is
    tested in tests/cldm/test_model.py; here it is recorded, not run: minutes on a CPU) and pads the
    short last batch, so 3 frames in batches of 2 reach the model as two batches of 2."""
    compiled, sizes = [], []
    monkeypatch.setattr(P.ControlLDM, "compile_denoiser", lambda self, **kw: compiled.append(kw))
    sample = P.sample_latents
    monkeypatch.setattr(P, "sample_latents", lambda m, cond, *a: sizes.append(len(cond)) or sample(m, cond, *a))
    args = ["--input", env["gray"], "--frames", "0:3", "--reference", env["refs"][0], "--ckpt", env["ckpt"],
            "--batch", "2", *FAST]
    rc, _, err = run([*args, "--out", tmp_path / "c", "--compile"], capsys)
    assert rc == 0, err
    assert compiled == [dict(vae_decoder=True, dynamic=False)] and sizes == [2, 2]
    assert run([*args, "--out", tmp_path / "e"], capsys)[0] == 0
    assert sizes == [2, 2, 2, 1]  # without --compile the last batch is its own size
    for name in ("f0.png", "f1.png", "f2.png"):
        assert np.abs(read_rgb(tmp_path / "c" / name).astype(int) - read_rgb(tmp_path / "e" / name)).max() <= 1


@pytest.mark.parametrize("precision, cast", [("bf16", torch.bfloat16), ("fp32", None), ("auto", None)])
def test_reduced_precision_holds_the_weights_in_it(env, tmp_path, capsys, monkeypatch, precision, cast):
    """--precision fp16/bf16 (auto: fp16 on CUDA, here the CPU: fp32) casts the weights once
    instead of autocast casting them every step (same frames: tests/colorize/test_pipeline.py)."""
    casts = []
    real = L.cast_weights
    monkeypatch.setattr(L, "cast_weights", lambda m, dtype: casts.append(dtype) or real(m, dtype))
    rc, _, err = run(["--input", env["gray"], "--frames", "0:1", "--reference", env["refs"][0], "--ckpt",
                      env["ckpt"], "--precision", precision, "--out", tmp_path / "o", *FAST], capsys)
    assert rc == 0, err
    assert casts == ([cast] if cast else [])


def test_a_reference_of_another_aspect_ratio_is_noted(env, tmp_path, capsys):
    ref = np.ascontiguousarray(env["colour"][3][:, :80])  # 80x80: square, the frames are 143x80
    cv2.imwrite(str(tmp_path / "square.png"), ref[..., ::-1])
    base = ["--input", env["gray"], "--frames", "0:2", "--method", "flow"]  # reinhard uses statistics only
    rc, _, err = run([*base, "--reference", tmp_path / "square.png", "--out", tmp_path / "a"], capsys)
    assert rc == 0 and err.count("a reference of 80x80 is stretched to the frames' 143x80 shape") == 1, err
    rc, _, err = run([*base, "--reference", env["refs"][0], "--out", tmp_path / "b"], capsys)
    assert rc == 0 and "stretched" not in err
    wider = np.ascontiguousarray(np.concatenate([env["colour"][3], env["colour"][3][:, -1:]], axis=1))  # 144x80
    cv2.imwrite(str(tmp_path / "wider.png"), wider[..., ::-1])
    rc, _, err = run([*base, "--reference", tmp_path / "wider.png", "--out", tmp_path / "c"], capsys)
    assert rc == 0 and "stretched" not in err  # within 2%: not worth a note


def test_a_broken_video_is_one_line_without_ffmpegs_own(env, tmp_path):
    """FFmpeg prints "moov atom not found" itself unless told not to (cliutil.quiet_opencv, which
    must run before cv2 is imported: hence a fresh process)."""
    bad = tmp_path / "text.mp4"
    bad.write_text("not a video")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    res = subprocess.run([sys.executable, str(Path(cli.__file__)), "--input", str(bad), "--reference",
                          str(env["refs"][0]), "--method", "reinhard", "--out", str(tmp_path / "out")],
                         env=clean, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"colorize_inference.py: error: --input {bad}: cannot open video"), res.stderr


def test_a_full_disk_names_the_file_it_could_not_write(env, tmp_path, capsys, monkeypatch):
    import errno

    real, written = O.write_bytes_atomic, []

    def filling(path, data, **kw):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real(path, data, **kw)

    monkeypatch.setattr(O, "write_bytes_atomic", filling)
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--out", out],
                     capsys)
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: cannot write {out / 'f1.png'}: No space left on device (the 1 output "
        "before it is written and complete; --frames 1: continues)")
    assert sorted(p.name for p in out.iterdir()) == ["f0.png"]


def test_the_config_found_for_the_weights_is_named(env, tmp_path, capsys):
    """Without --config the run says which config it took (recorded in the file here, as the toy
    records its own); with --config it says nothing about it."""
    toy = tmp_path / "toy.safetensors"  # without the YAML beside it
    shutil.copy(TOY, toy)
    common = ["--input", env["gray"], "--reference", env["refs"][0], "--size", "64", "--steps", "1", "--frames", "0:1"]
    rc, out, err = run([*common, "--ckpt", toy, "--out", tmp_path / "a"], capsys)
    assert rc == 0, err
    assert out.splitlines()[0] == f"config: the one {toy} records"
    shutil.copy(TOY.with_suffix(".yaml"), toy.with_suffix(".yaml"))
    rc, out, err = run([*common, "--ckpt", toy, "--out", tmp_path / "b"], capsys)
    assert rc == 0 and out.splitlines()[0] == f"config: {toy.with_suffix('.yaml')}", err
    rc, out, err = run([*common, "--ckpt", toy, "--config", toy.with_suffix(".yaml"), "--out", tmp_path / "c"], capsys)
    assert rc == 0 and "config:" not in out, err


def test_the_config_is_resolved_once(env, tmp_path, capsys, monkeypatch):
    """The step check, the "config: ..." line and the load take the one config found."""
    calls = []

    def counted(*args, resolve=weights_config.resolve_config):
        calls.append(args)
        return resolve(*args)
    monkeypatch.setattr(weights_config, "resolve_config", counted)
    rc, out, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--size", "64", "--steps", "1",
                        "--frames", "0:1", "--ckpt", TOY, "--out", tmp_path], capsys)
    assert rc == 0 and out.splitlines()[0] == f"config: {TOY.with_suffix('.yaml')}", err
    assert calls == [(str(TOY), None, None)]
    assert out.splitlines()[-1] == f"wrote 1 frame to {tmp_path}"  # not "1 frames"



def test_no_progress_leaves_stderr_to_messages(env, tmp_path, capsys):
    common = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--frames", "0:2"]
    rc, _, err = run([*common, "--out", tmp_path / "a"], capsys)
    assert rc == 0 and "frame/s" in err, err
    rc, out, err = run([*common, "--out", tmp_path / "b", "--no-progress"], capsys)
    assert (rc, err) == (0, "") and out == f"wrote 2 frames to {tmp_path / 'b'}\n"


def streams(path) -> list[str]:
    import av

    with av.open(str(path)) as c:
        return [f"{s.type}:{s.codec_context.name}" for s in c.streams]


def test_video_keeps_the_input_films_sound_unless_told_otherwise(env, tmp_path, capsys):
    """A video input's audio goes into --video (copied: the packets are the input's); --no-audio
    leaves it out; --audio takes it from another file, e.g. for a frame-folder input."""
    from tests.colorize.test_audio import packets

    film = video_with_sound(tmp_path / "film.mp4")
    base = ["--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    rc, out, _ = run(["--input", film, *base, "--out", tmp_path / "a", "--video", tmp_path / "a.mp4"], capsys)
    assert rc == 0 and f"sound of {film} (aac copied), 10 fps)" in out
    assert streams(tmp_path / "a.mp4") == ["video:mpeg4", "audio:aac"]
    assert packets(tmp_path / "a.mp4", "audio") == packets(film, "audio")
    rc, out, _ = run(["--input", film, *base, "--out", tmp_path / "b", "--video", tmp_path / "b.mp4", "--no-audio"],
                     capsys)
    assert rc == 0 and "sound" not in out and streams(tmp_path / "b.mp4") == ["video:mpeg4"]
    assert [f for f in iter_frames(tmp_path / "b.mp4")][-1][2].shape == (24, 32, 3)
    pcm = video_with_sound(tmp_path / "track.mov", audio="pcm_s16le")
    rc, out, _ = run(["--input", env["gray"], *base, "--out", tmp_path / "c", "--video", tmp_path / "c.mp4",
                      "--audio", pcm], capsys)
    assert rc == 0 and f"sound of {pcm} (pcm_s16le re-encoded to AAC), 25 fps)" in out
    assert streams(tmp_path / "c.mp4") == ["video:mpeg4", "audio:aac"]
    rc, out, _ = run(["--input", env["gray"], *base, "--out", tmp_path / "d", "--video", tmp_path / "d.mp4"], capsys)
    assert rc == 0 and "sound" not in out and streams(tmp_path / "d.mp4") == ["video:mpeg4"]


def test_the_sound_message_says_what_a_mov_does_with_opus(env, tmp_path, capsys):
    """Opus is copied into an .mp4 but re-encoded into a .mov (QuickTime's muxer refuses it)."""
    film = video_with_sound(tmp_path / "film.mp4", audio="opus")
    base = ["--input", film, "--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    rc, out, _ = run([*base, "--out", tmp_path / "a", "--video", tmp_path / "a.mp4"], capsys)
    assert rc == 0 and f"sound of {film} (opus copied), 10 fps)" in out
    rc, out, _ = run([*base, "--out", tmp_path / "b", "--video", tmp_path / "b.mov"], capsys)
    assert rc == 0 and f"sound of {film} (opus re-encoded to AAC), 10 fps)" in out
    assert streams(tmp_path / "b.mov") == ["video:mpeg4", "audio:aac"]


def test_the_video_rate_says_variable_times_it_could_not_keep():
    from colorize.audio import FrameTimes

    vfr, cfr = FrameTimes([0, 33, 70, 400], Fraction(1, 1000), 33), FrameTimes([0, 40, 80], Fraction(1, 1000), 40)
    assert cli.video_rate(30.0, vfr, 4, 30.0) == "the input's variable frame rate, 9.238 fps on average"  # 4 / 0.433 s
    assert cli.video_rate(30.0, vfr, 5, 30.0) == ("30 fps; the input's frame rate varies, but its 4 frame times do "
                                                  "not match the 5 frames: the sound may drift")
    assert cli.video_rate(25.0, cfr, 3, 25.0) == cli.video_rate(25.0, cfr, 4, 25.0) == "25 fps"
    assert cli.video_rate(25.0, cfr, 3, None) == "25 fps" and cli.video_rate(25.0, None, 3, 25.0) == "25 fps"


def test_a_variable_frame_rate_film_keeps_its_frame_times_and_so_its_sound_in_step(env, tmp_path, capsys):
    """60 frames of 33 then 100 ms (an MKV: its frame count an estimate, 122) with sound: all
    are colourised (they were refused as a truncated file once all were made), and the video
    shows each at the film's time (it was 30 fps throughout: frame 59 at 1.97 s, not 3.89, with
    the sound 1.9 s out of step), its sound copied, and the last line says so. An exact
    24000/1001 film's video is 24000/1001 (it was 2997/125: OpenCV's decimal rate)."""
    import av

    from tests.colorize.test_audio import packets
    from tests.helpers import vfr_video

    film, times = vfr_video(tmp_path / "film.mkv", [33] * 30 + [100] * 30, audio=True)
    base = ["--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    rc, out, err = run(["--input", film, *base, "--out", tmp_path / "a", "--video", tmp_path / "a.mp4"], capsys)
    assert rc == 0 and out == (f"wrote 60 frames to {tmp_path / 'a'} and {tmp_path / 'a.mp4'} (sound of {film} "
                               "(aac copied), the input's variable frame rate, 15.29 fps on average)\n"), out
    assert "decoded 60 frames, not the 122 its container claims or implies" in err
    assert [round(t * 1000, 6) for _, t in packets(tmp_path / "a.mp4", "video")] == times
    assert [t for _, t in packets(tmp_path / "a.mp4", "audio")] == [t for _, t in packets(film, "audio")]

    ntsc = tmp_path / "ntsc.mp4"
    with av.open(str(ntsc), "w") as c:
        v = c.add_stream("mpeg4", rate=Fraction(24000, 1001))
        v.width, v.height, v.pix_fmt = 32, 24, "yuv420p"
        for i in range(5):
            c.mux(v.encode(av.VideoFrame.from_ndarray(np.full((24, 32, 3), 9 * i, np.uint8), format="rgb24")))
        c.mux(v.encode())
    rc, out, _ = run(["--input", ntsc, *base, "--out", tmp_path / "b", "--video", tmp_path / "b.mp4"], capsys)
    assert rc == 0 and out.endswith("(23.976 fps)\n"), out
    with av.open(str(tmp_path / "b.mp4")) as c:
        assert c.streams.video[0].average_rate == Fraction(24000, 1001)


@pytest.mark.parametrize("extra, says", [
    (["--audio", "{film}"], "--audio is the sound of --video: give --video too"),
    (["--video", "{tmp}/v.mp4", "--audio", "{film}", "--no-audio"],
     "--audio is the sound of --video: leave out --audio or --no-audio"),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}/nope.wav"], "--audio {tmp}/nope.wav: no such file"),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}"], "--audio {tmp}: is a folder"),
    (["--video", "{tmp}/v.mp4", "--audio", "{pipe}"],
     "--audio {pipe}: not a regular file (a named pipe, socket or device)"),  # was "no such file"
    (["--video", "{tmp}/v.mp4", "--audio", "{ref}"], "--audio {ref}: no audio stream found in it"),
])
def test_a_bad_audio_flag_is_one_line_before_any_work(env, tmp_path, capsys, extra, says):
    values = dict(tmp=tmp_path, film=video_with_sound(tmp_path / "film.mp4"), ref=env["refs"][0],
                  pipe=tmp_path / "pipe.wav")
    argv = ["--input", str(env["gray"]), "--reference", str(env["refs"][0]), "--method", "reinhard", "--out",
            str(tmp_path / "out"), *[a.format(**values) for a in extra]]
    with named_pipe(values["pipe"]):
        assert refused(cli.main, argv, capsys).strip() == f"colorize_inference.py: error: {says.format(**values)}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "v.mp4").exists()


def test_without_pyav_a_videos_sound_is_one_line_and_no_audio_still_works(env, tmp_path, capsys, monkeypatch):
    film = video_with_sound(tmp_path / "film.mp4")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError, as in an older install
    argv = ["--input", str(film), "--reference", str(env["refs"][0]), "--method", "reinhard", "--no-progress",
            "--out", str(tmp_path / "a"), "--video", str(tmp_path / "a.mp4")]
    assert refused(cli.main, argv, capsys).strip() == ("colorize_inference.py: error: --video takes the input's "
                                                      "sound with PyAV, which is not installed: pip install -r "
                                                      "requirements.txt, or pass --no-audio")
    assert not (tmp_path / "a").exists()
    assert cli.main(argv + ["--no-audio"]) == 0 and (tmp_path / "a.mp4").is_file()
    argv[1] = str(env["gray"])  # a frame folder has no sound to look for: PyAV is not needed
    assert cli.main(argv[:-3] + [str(tmp_path / "b"), "--video", str(tmp_path / "b.mp4")]) == 0


def test_parse_range_reads_a_slice_and_refuses_a_bare_number():
    assert cli.parse_range(None) == slice(0, None)
    assert cli.parse_range(":5") == slice(0, 5) and cli.parse_range("2:3") == slice(2, 3)
    assert cli.parse_range("7:") == slice(7, None)
    with pytest.raises(cli.UsageError, match=r"^--frames '3': expected A:B with 0 <= A < B, e.g. 0:16 or 100:$"):
        cli.parse_range("3")  # one frame number is not a range (3: or 3:4?)


def _checked(tmp_path, *extra):
    """check_args on a baseline run's arguments (no model: nothing but the checks)."""
    ref = tmp_path / "ref.png"
    if not ref.exists():
        cv2.imwrite(str(ref), np.full((8, 8, 3), (0, 64, 200), np.uint8))
    args = cli.parse_args([str(a) for a in ["--input", tmp_path, "--reference", ref, "--method", "reinhard",
                                            "--out", tmp_path / "out", *extra]])
    return cli.check_args(args)


@pytest.mark.parametrize("flag", ["--input", "--reference", "--gt", "--out", "--video", "--audio", "--ckpt",
                                  "--control", "--config"])
def test_an_empty_path_is_a_usage_error_naming_its_flag(env, tmp_path, capsys, monkeypatch, flag):
    """`--out "$OUT"` with OUT unset wrote into the current folder; an empty --input blamed
    ./requirements.txt, --reference said ": reference image is a folder", --video "" made no video."""
    monkeypatch.chdir(tmp_path)
    argv = {"--input": env["gray"], "--reference": env["refs"][0], "--out": tmp_path / "out", "--method": "reinhard"}
    argv[flag] = ""
    err = refused(cli.main, [str(a) for kv in argv.items() for a in kv], capsys)
    assert err == f"colorize_inference.py: error: argument {flag}: empty path (see --help)\n"
    assert list(tmp_path.iterdir()) == []


def test_a_frame_of_32_bit_integers_is_refused_naming_it_and_float_frames_are_read(env, tmp_path, capsys):
    """A 32-bit integer TIFF frame was read as floats in [0, 1] (a gray of 100 as 100.0: the output
    nearly white), with exit 0; inputs are 8- or 16-bit, or float, as evaluate.py refuses it too."""
    gray = (rgb_to_gray(env["colour"][0]) * 255).round()
    for kind, pixels in (("int", gray.astype(np.int32)), ("float", (gray / 255).astype(np.float32))):
        (tmp_path / kind).mkdir()
        assert cv2.imwrite(str(tmp_path / kind / "f0.tif"), pixels)
    args = ["--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    rc, _, err = run(["--input", tmp_path / "int", *args, "--out", tmp_path / "o_int"], capsys)
    assert (rc, err) == (2, f"colorize_inference.py: error: {tmp_path / 'int' / 'f0.tif'}: unsupported pixel type "
                            "int32\n")
    assert not (tmp_path / "o_int").exists()
    assert run(["--input", tmp_path / "float", *args, "--out", tmp_path / "o_float"], capsys)[0] == 0
    out = read_rgb(tmp_path / "o_float" / "f0.png")
    assert np.abs(rgb_to_gray(out) * 255 - gray).max() <= 1  # its lightness, on the 0..1 scale


def test_fps_with_a_video_input_is_refused_before_any_work(tmp_path, capsys):
    """--fps replaced a video input's own rate, silently putting its copied sound out of step (the
    sample at --fps 10: 13.2 s of picture, 5.3 s of sound), though --help says video input keeps its own."""
    film = video_with_sound(tmp_path / "film.mp4")  # 10 frames at 10 fps, 1 s of sound
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), np.full((8, 8, 3), (0, 64, 200), np.uint8))
    out, mp4 = tmp_path / "out", tmp_path / "out.mp4"
    argv = [str(a) for a in ["--method", "reinhard", "--input", film, "--reference", ref, "--out", out,
                             "--video", mp4, "--fps", "25"]]
    assert refused(cli.main, argv, capsys) == (f"colorize_inference.py: error: --fps is for frame-folder input: "
                                               f"--input {film} is a video, whose own frame rate --video keeps "
                                               "(so that its sound stays in step)\n")
    assert not out.exists() and not mp4.exists()


def test_fps_and_video_name_limits(tmp_path):
    """--fps from 0.01 to 1000, both ends included; --video's suffix in any case."""
    for fps in ("0.01", "1000"):
        _checked(tmp_path, "--video", tmp_path / "v.mp4", "--fps", fps)
    for fps in ("0.009", "1000.5"):
        with pytest.raises(cli.UsageError, match=rf"^--fps must be between 0.01 and 1000 \(got {fps}\)$"):
            _checked(tmp_path, "--video", tmp_path / "v.mp4", "--fps", fps)
    for name in ("v.MP4", "v.m4v", "v.Mov"):
        _checked(tmp_path, "--video", tmp_path / name)
    with pytest.raises(cli.UsageError, match=rf"^--video {re.escape(str(tmp_path / 'v.avi'))}: use a "
                                             r"\.mp4/\.m4v/\.mov file name$"):
        _checked(tmp_path, "--video", tmp_path / "v.avi")
    with pytest.raises(cli.UsageError, match=r"^--fps is the frame rate of --video: give --video too$"):
        _checked(tmp_path, "--fps", "25")  # without --video it would be taken and silently unused


BASELINE_OOM = ("out of memory on the CPU: --method reinhard works on the frames at their own size; downscale them "
                "first")  # not "lower --size and --batch", which a baseline does not use


@pytest.mark.parametrize("error, says", [
    (MemoryError(), BASELINE_OOM),
    (cv2.error("(-4:Insufficient memory) Failed to allocate 99 bytes"), BASELINE_OOM),
    (cv2.error("(-215:Assertion failed) a bug"), None),  # not hidden
])
def test_a_baselines_out_of_memory_is_one_line_and_its_other_errors_are_not_hidden(env, tmp_path, capsys,
                                                                                   monkeypatch, error, says):
    def failing(*a, **k):
        raise error
        yield
    monkeypatch.setattr(M, "iter_baseline", failing)
    argv = [str(a) for a in ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard",
                             "--no-progress", "--out", tmp_path / "out"]]
    if says is None:
        with pytest.raises(cv2.error, match="a bug"):
            cli.main(argv)
    else:
        assert refused(cli.main, argv, capsys) == f"colorize_inference.py: error: {says}\n"


def test_flow_starts_from_a_reference_frame_inside_the_range(env, tmp_path, capsys):
    """--reference-frame counts from the clip's start: with --frames 1:3, frame 2 is the range's
    second frame (the walk starts there); frames 1 and 2 may start it, 0 and 3 lie outside; two
    references for one frame are one line naming both and the frame in the clip."""
    colour = tmp_path / "colour"
    colour.mkdir()
    for n, i in enumerate((0, 1, 120, 121)):
        cv2.imwrite(str(colour / f"f{n}.png"), env["colour"][i][..., ::-1])
    base = ["--input", env["gray"], "--gt", colour, "--method", "flow", "--frames", "1:3", "--no-progress"]
    rc, _, err = run([*base, "--reference-frame", "2", "--out", tmp_path / "out"], capsys)
    assert rc == 0, err
    grays = [f.gray for f in P.iter_gray_frames(env["gray"], 1, 3)]
    want = list(iter_baseline("flow", grays, [P.reference_frame(colour, 2)], [1]))
    for n, expected in zip((1, 2), want):
        np.testing.assert_array_equal(read_rgb(tmp_path / "out" / f"f{n}.png"), to_uint8(expected))
    assert run([*base, "--reference-frame", "1", "--out", tmp_path / "first"], capsys)[0] == 0
    for n in (0, 3):
        rc, _, err = run([*base, "--reference-frame", str(n), "--out", tmp_path / f"o{n}"], capsys)
        go_on = "; to continue a stopped run, start at it: --frames 0:3 --overwrite" if n == 0 else ""
        assert (rc, err) == (2, f"colorize_inference.py: error: --reference-frame {n} lies outside the frames being "
                                f"colourised (flow starts from it){go_on}\n")
    rc, _, err = run([*base, "--reference-frame", "2", "--reference-frame", "2", "--out", tmp_path / "two"], capsys)
    assert (rc, err) == (2, "colorize_inference.py: error: --method flow: --reference-frame 2 and --reference-frame 2 "
                            "are both frame 2; flow takes one reference per frame\n")  # was "frame 1": the range's
    ref = tmp_path / "ref2.png"
    shutil.copy(colour / "f2.png", ref)  # falls on frame 2, its own
    rc, _, err = run([*base, "--reference", ref, "--reference-frame", "2", "--out", tmp_path / "img"], capsys)
    assert (rc, err) == (2, f"colorize_inference.py: error: --method flow: --reference {ref} and --reference-frame 2 "
                            "are both frame 2 (a --reference image is placed at its most similar frame); flow takes "
                            "one reference per frame\n")


def test_the_config_recorded_in_the_control_file_is_named_as_the_controls(env, tmp_path, capsys, monkeypatch):
    from omegaconf import OmegaConf

    control = tmp_path / "control.safetensors"
    save_file({"control_model.x": torch.zeros(1)}, str(control))
    monkeypatch.setattr(weights_config, "resolve_config", lambda *a: OmegaConf.load(TINY_CONFIG))
    monkeypatch.setattr(L, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, out, _ = run(["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--control",
                      control, "--size", "64", "--steps", "2", "--out", tmp_path / "out"], capsys)
    assert rc == 130 and out == f"config: the one {control} records\n"


@pytest.mark.parametrize("frames", [None, "2:", "0:2"])
def test_a_failed_video_after_the_last_frame_says_only_the_video_is_missing(env, tmp_path, capsys, monkeypatch,
                                                                            frames):
    """The video write fails (a full disk) once every PNG is written: the advice is the range at the
    clip's end, which writes only the video, not --overwrite (every frame colourised again); followed,
    it gives the video of an uninterrupted run, the PNGs untouched. Also for a range that is part of
    the clip (the other frames were in --out)."""
    def full_disk(path, frames, fps, audio_from=None, times=None, lead=0.0):
        for _ in frames:
            pass
        raise OSError(f"cannot write {path}: No space left on device")
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    assert run([*args, "--out", tmp_path / "whole", "--video", tmp_path / "whole.mp4"], capsys)[0] == 0
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    if frames is not None:  # the frames outside the range, from an earlier run
        shutil.copytree(tmp_path / "whole", out)
        args += ["--frames", frames, "--overwrite"]
    monkeypatch.setattr(cli, "write_video_atomic", full_disk)
    rc, _, err = run([*args, "--out", out, "--video", video], capsys)
    n = 4 if frames is None else 2
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: cannot write {video}: No space left on device (the {n} outputs before it are "
        "written and complete; only --video is missing: rerun with --frames 4: (it writes the video from the 4 "
        "outputs in --out))"), err
    assert snapshot(out) == snapshot(tmp_path / "whole") and not video.exists()
    monkeypatch.undo()
    pngs = snapshot(out)
    rc, stdout, err = run([*args[:6], "--no-progress", "--out", out, "--video", video, "--frames", "4:"], capsys)
    assert (rc, stdout) == (0, f"wrote {video} from the 4 outputs in {out} (25 fps)\n"), err
    got, want = video_frames(video), video_frames(tmp_path / "whole.mp4")
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert snapshot(out) == pngs


def test_a_failed_video_of_a_clip_of_unknown_length_is_told_the_range_at_its_end(env, tmp_path, capsys, monkeypatch):
    """A video that does not say how many frames it has: the advice is the range from the next
    frame, which finds no frames left and writes the video from --out."""
    clip = write_video(panning_clip(3, 64, 96), tmp_path / "v.avi")
    monkeypatch.setattr(P, "output_names", lambda *a, **k: None)

    def full_disk(path, frames, fps, audio_from=None, times=None, lead=0.0):
        for _ in frames:
            pass
        raise OSError(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(cli, "write_video_atomic", full_disk)
    out, video = tmp_path / "out", tmp_path / "o.mp4"
    args = ["--input", clip, "--reference", env["refs"][0], "--method", "reinhard", "--no-progress", "--out", out,
            "--video", video]
    rc, _, err = run(args, capsys)
    assert rc == 2 and err.splitlines()[-1].endswith(
        "(the 3 outputs before it are written and complete; --frames 3: continues)"), err
    monkeypatch.setattr(cli, "write_video_atomic", write_video_atomic)
    pngs = snapshot(out)
    rc, stdout, err = run([*args, "--frames", "3:"], capsys)
    assert rc == 0 and stdout.startswith(f"wrote {video} from the 3 outputs in {out} ("), err
    assert probe(video).frame_count == 3 and snapshot(out) == pngs


def test_frames_from_the_clips_end_with_video_loads_no_model_and_reads_no_reference(env, tmp_path, capsys,
                                                                                  monkeypatch):
    """--frames N: (N the input's frame count) --video colourises nothing: the weights are not
    loaded (--ckpt is no file), the reference not read (no file either), and --out is untouched."""
    base = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    assert run([*base, "--out", tmp_path / "whole", "--video", tmp_path / "whole.mp4"], capsys)[0] == 0
    out, video = tmp_path / "whole", tmp_path / "v.mp4"
    pngs = snapshot(out)
    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc, stdout, err = run(["--input", env["gray"], "--reference", tmp_path / "no-ref.png", "--ckpt",
                           tmp_path / "no-weights.safetensors", *FAST, "--no-progress", "--out", out,
                           "--frames", "4:", "--video", video], capsys)
    assert rc == 0 and stdout == f"wrote {video} from the 4 outputs in {out} (25 fps)\n", err
    assert err == ("colorize_inference.py: note: --video: frames are 143x80 and MPEG-4 needs even sides, so the "
                   "video is 144x80 (last column/row repeated); the PNGs keep the input size\n")
    got, want = video_frames(video), video_frames(tmp_path / "whole.mp4")
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert snapshot(out) == pngs and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4", "whole", "whole.mp4"]
    # the video is an output like any: there already, it is kept unless --overwrite
    rc, _, err = run([*base, "--out", out, "--frames", "4:", "--video", video], capsys)
    assert rc == 2 and err == (f"colorize_inference.py: error: {video} exists (1 output(s) already there); pass "
                               "--overwrite to replace them\n")
    assert run([*base, "--out", out, "--frames", "4:9", "--video", video, "--overwrite"], capsys)[0] == 0


def test_frames_from_the_clips_end_of_a_one_frame_clip(env, tmp_path, capsys):
    """--frames 1: --video on a clip of one frame writes the video from its one output (the range
    at the clip's end, as for any length; no model or reference read); with that output gone, the
    refusal is the video-only one, naming it (1 of the 1)."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(env["gray"] / "f0.png", src / "f0.png")
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    base = ["--input", src, "--method", "reinhard", "--no-progress", "--out", out]
    assert run([*base, "--reference", env["refs"][0]], capsys)[0] == 0
    rc, stdout, err = run([*base, "--reference", tmp_path / "no-ref.png", "--frames", "1:", "--video", video], capsys)
    assert rc == 0 and stdout.startswith(f"wrote {video} from the 1 output in {out} ("), err
    assert probe(video).frame_count == 1
    (out / "f0.png").unlink()
    video.unlink()
    rc, _, err = run([*base, "--reference", env["refs"][0], "--frames", "1:", "--video", video], capsys)
    assert rc == 2 and err == (f"colorize_inference.py: error: --video with --frames 1: writes the video from the 1 "
                               f"output in --out, but {out / 'f0.png'} (frame 0) is missing (1 of the 1): colourise "
                               "the missing frames first\n"), err


def test_frames_from_the_clips_end_keeps_the_input_films_sound(env, tmp_path, capsys):
    film = video_with_sound(tmp_path / "film.mp4")
    args = ["--input", film, "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
            "--out", tmp_path / "out"]
    assert run(args, capsys)[0] == 0
    rc, stdout, err = run([*args, "--frames", "10:", "--video", tmp_path / "v.mp4"], capsys)
    assert rc == 0 and stdout == (f"wrote {tmp_path / 'v.mp4'} from the 10 outputs in {tmp_path / 'out'} "
                                  f"(sound of {film} (aac copied), 10 fps)\n"), err
    assert streams(tmp_path / "v.mp4") == ["video:mpeg4", "audio:aac"] and probe(tmp_path / "v.mp4").frame_count == 10


@pytest.mark.parametrize("extra, says", [
    (["--video", "{tmp}/v.mp4"], "--video with --frames 4: writes the video from the 4 outputs in --out, but "
                                 "{out}/f1.png (frame 1) is missing (2 of the 4): colourise the missing frames first"),
    # without --video, nothing to do: the line says what --video would make of it
    ([], "--frames 4: starts past the input's 4 frames; with --video V it writes only the video from the 4 outputs "
         "in --out"),
    (["--video", "{tmp}/v.mp4", "--frames", "5:"], "--frames 5: starts past the input's 4 frames"),
    (["--frames", "5:"], "--frames 5: starts past the input's 4 frames"),  # past the end: no hint, with --video too
])
def test_frames_from_the_clips_end_is_refused_without_video_or_outputs(env, tmp_path, capsys, extra, says):
    out = tmp_path / "out"
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
            "--out", out]
    assert run(args, capsys)[0] == 0
    (out / "f1.png").unlink()
    (out / "f3.png").unlink()
    before = snapshot(out)
    extra = [a.format(tmp=tmp_path) for a in extra]
    rc, _, err = run([*args, "--frames", "4:", *extra], capsys)
    assert rc == 2 and err == f"colorize_inference.py: error: {says.format(out=out)}\n", err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_frames_from_the_end_of_a_one_frame_clip_names_its_one_output(env, tmp_path, capsys):
    clip = write_folder(panning_clip(1, 32, 48), tmp_path / "clip")
    rc, _, err = run(["--input", clip, "--reference", env["refs"][0], "--method", "reinhard", "--frames", "1:",
                      "--out", tmp_path / "out"], capsys)
    assert rc == 2 and err == ("colorize_inference.py: error: --frames 1: starts past the input's 1 frame; with "
                               "--video V it writes only the video from the 1 output in --out\n"), err


OS_REPLACE = os.replace


def stop_in_the_videos_rename(monkeypatch, video: Path, after: bool) -> None:
    """Ctrl-C in the os.replace that puts the finished video in place: once it is done (`after`),
    as a signal handled when the call returns, or before it."""
    real = OS_REPLACE

    def replace(src, dst):
        if Path(dst) == video:
            if after:
                real(src, dst)
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("old", [False, True])
def test_a_stop_as_the_video_is_renamed_into_place_says_whether_it_is_complete(env, tmp_path, capsys, monkeypatch,
                                                                             old):
    """A stop in the video's final rename: once the rename is done, the run is complete (it said
    "only --video is missing", and the --frames N: it advised was refused: the video exists); an
    older video there (--overwrite) does not count as this run's."""
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
            "--out", out, "--video", video]
    if old:
        video.write_bytes(b"an older video")
        args.append("--overwrite")
    stop_in_the_videos_rename(monkeypatch, video, after=True)
    rc, _, err = run(args, capsys)
    assert rc == 130 and err.splitlines()[-1] == (
        f"colorize_inference.py: interrupted as it finished; all 4 outputs and {video} are written and complete"), err
    assert probe(video).frame_count == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["out", "v.mp4"]
    if old:  # stopped before the rename: the old video is there, unchanged, and the new one is missing
        video.write_bytes(b"an older video")
        stop_in_the_videos_rename(monkeypatch, video, after=False)
        rc, _, err = run(args, capsys)
        assert rc == 130 and err.splitlines()[-1] == (
            "colorize_inference.py: interrupted; the 4 outputs written so far are complete: only --video is missing: "
            "rerun with --frames 4: (it writes the video from the 4 outputs in --out)"), err
        assert video.read_bytes() == b"an older video"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v.mp4"]
    # the same for a run that writes only the video
    args[args.index("--method"):args.index("--method")] = ["--frames", "4:"]
    video.unlink()
    stop_in_the_videos_rename(monkeypatch, video, after=False)
    rc, _, err = run([*args, "--overwrite"], capsys)
    assert rc == 130 and err.splitlines()[-1] == (
        f"colorize_inference.py: interrupted; {video} is not written (the outputs in {out} are untouched): "
        "--frames 4: writes it"), err
    assert not video.exists()
    stop_in_the_videos_rename(monkeypatch, video, after=True)
    rc, _, err = run([*args, "--overwrite"], capsys)
    assert rc == 130 and err.splitlines()[-1] == (
        f"colorize_inference.py: interrupted as it finished; {video} is written and complete"), err
    assert probe(video).frame_count == 4


def test_a_stop_after_the_rename_of_a_video_identical_to_the_old_one_says_it_is_complete(env, tmp_path, capsys,
                                                                                       monkeypatch):
    """--overwrite rerun of the same command, stopped once its video is renamed into place: the
    new video has the old one's size (the same bytes), and is still told from it (a new file:
    another inode), so the run is complete, not "only --video is missing"."""
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
            "--out", out, "--video", video, "--overwrite"]
    assert run(args, capsys)[0] == 0
    old = video.read_bytes()
    stop_in_the_videos_rename(monkeypatch, video, after=True)
    rc, _, err = run(args, capsys)
    assert video.read_bytes() == old  # the case: nothing but the file itself tells them apart
    assert rc == 130 and err.splitlines()[-1] == (
        f"colorize_inference.py: interrupted as it finished; all 4 outputs and {video} are written and complete"), err


def test_a_bad_frame_in_a_closed_range_keeps_its_end_in_the_advice(env, tmp_path, capsys):
    src = tmp_path / "in"
    shutil.copytree(env["gray"], src)
    (src / "f2.png").write_bytes(b"broken")
    rc, _, err = run(["--input", src, "--reference", env["refs"][0], "--method", "reinhard", "--frames", "0:3",
                      "--no-progress", "--out", tmp_path / "out"], capsys)
    assert rc == 2 and err.endswith("f2.png: not a readable image (the 2 outputs before it are written and complete; "
                                    "--frames 2:3 continues)\n"), err


def test_video_of_a_later_range_takes_the_size_from_a_frame_in_it(env, tmp_path, capsys):
    """Input frame 0, outside --frames 1:, is never read, not even for the video's size (its
    output in --out is what the video takes)."""
    src = tmp_path / "in"
    shutil.copytree(env["gray"], src)
    args = ["--input", src, "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
            "--out", tmp_path / "out"]
    assert run(args, capsys)[0] == 0
    (src / "f0.png").write_bytes(b"broken")
    rc, _, err = run([*args, "--frames", "1:", "--overwrite", "--video", tmp_path / "v.mp4"], capsys)
    assert rc == 0 and probe(tmp_path / "v.mp4").frame_count == 4, err


def test_frames_from_the_clips_end_reads_one_input_frame_for_the_size_its_last(env, tmp_path, capsys):
    """--frames N: --video colourises nothing, so no new frame tells the size the outputs in --out
    must have: the input's last frame is read for it, and no other (frames 0..N-2 broken here).
    Nor does it show a progress bar (there are no frames to count): its only line on stderr is
    the note on the odd width."""
    src = tmp_path / "in"
    shutil.copytree(env["gray"], src)
    out = tmp_path / "out"
    args = ["--input", src, "--reference", env["refs"][0], "--method", "reinhard", "--out", out]
    assert run([*args, "--no-progress"], capsys)[0] == 0
    for name in ("f0.png", "f1.png", "f2.png"):
        (src / name).write_bytes(b"broken")
    rc, stdout, err = run([*args, "--frames", "4:", "--video", tmp_path / "v.mp4"], capsys)
    assert (rc, stdout) == (0, f"wrote {tmp_path / 'v.mp4'} from the 4 outputs in {out} (25 fps)\n"), err
    assert err == ("colorize_inference.py: note: --video: frames are 143x80 and MPEG-4 needs even sides, so the "
                   "video is 144x80 (last column/row repeated); the PNGs keep the input size\n")
    assert probe(tmp_path / "v.mp4").frame_count == 4


def test_a_baseline_refuses_the_model_only_flags_it_would_ignore(env, tmp_path, capsys):
    """--method flow --mode recursive ran flow and silently dropped the mode (and so --steps, --raw,
    --ckpt ...). Every flag of the model and sampling groups, and --raw, is one of them."""
    groups = {g.title: g._group_actions for g in cli.parser()._action_groups}
    model_flags = {a.dest for a in groups["method and model"] + groups["sampling"]} - {"method"}
    assert set(cli.MODEL_ONLY) == model_flags | {"raw"}
    base = ["--input", env["gray"], "--reference", env["refs"][0], "--out", tmp_path / "out", "--no-progress"]
    for method, given, shown in [("flow", ["--mode", "recursive"], "--mode"),
                                 ("reinhard", ["--steps", "10"], "--steps"),
                                 ("reinhard-bands", ["--raw"], "--raw"),
                                 ("flow", ["--ckpt", env["ckpt"]], "--ckpt"),
                                 ("flow", ["--no-cuda-graph"], "--no-cuda-graph"),
                                 ("reinhard", ["--set", "model.color_variant=v3"], "--set"),
                                 ("flow", ["--anchor-strength", "0.5"], "--anchor-strength")]:
        rc, out, err = run([*base, "--method", method, *given], capsys)
        assert (rc, out, err) == (2, "", f"colorize_inference.py: error: {shown} is for --method model; --method "
                                         f"{method} uses no model: leave it out\n")
    # typed with their default values too: whether a flag is refused must not depend on its value
    rc, out, err = run([*base, "--method", "flow", "--mode", "fixed", "--steps", "20"], capsys)
    assert (rc, out, err) == (2, "", "colorize_inference.py: error: --mode is for --method model; --method flow uses "
                                     "no model: leave it out\n")
    assert not (tmp_path / "out").exists()


def test_a_truncated_video_that_fails_before_any_output_names_the_frames_it_holds(env, tmp_path, capsys):
    """Flow's scan for where a --reference image belongs, or the model's first batch, reaches the cut
    before any output is written: the line said only "truncated", and a rerun of the same range
    failed the same way."""
    full = write_video(panning_clip(12, 32, 48), tmp_path / "full.avi")
    cut = truncate_avi(full, tmp_path / "cut.avi", 6)
    for name, method in [("flow", ["--method", "flow"]), ("model", ["--ckpt", env["ckpt"], "--batch", "8", *FAST])]:
        args = ["--input", cut, "--reference", env["refs"][0], "--out", tmp_path / name, "--no-progress", *method]
        rc, _, err = run([*args, "--frames", "1:"], capsys)
        line = err.splitlines()[-1]
        assert rc == 2 and line.endswith("cut.avi: truncated or corrupt: decoded 6 of 12 frames (nothing was written; "
                                         "--frames 1:6 colourises the frames it holds)"), err
        assert not (tmp_path / name).exists()
        assert run([*args, *_advice(line, r"(--frames \S+) colourises")], capsys)[0] == 0
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [f"{i:06d}.png" for i in range(1, 6)]
    # flow's reference frame past the cut: no range of this file can hold it
    rc, _, err = run(["--input", cut, "--gt", full, "--reference-frame", "8", "--method", "flow", "--out",
                      tmp_path / "past", "--no-progress"], capsys)
    assert rc == 2 and err.splitlines()[-1].endswith(
        "cut.avi: truncated or corrupt: decoded 6 of 12 frames (nothing was written; it ends before flow's reference "
        "frame 8)"), err


def test_fixed_mode_stopped_inside_a_batch_goes_on_from_the_batchs_first_frame(env, tmp_path, capsys, monkeypatch):
    """Stopped after writing part of a batch (Ctrl-C, a full disk): a run from the next frame would
    batch the frames otherwise, and a frame sampled in another batch can differ by an 8-bit level,
    so "exactly the result of an uninterrupted run" needs the batch's first frame, with --overwrite."""
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--noise", "per-frame",
            "--batch", "2", "--no-progress", *FAST]
    stop_encoding_at(4, monkeypatch)  # f0 f1 | f2 written, f3 not
    rc, _, err = run([*args, "--out", tmp_path / "out"], capsys)
    line = err.splitlines()[-1]
    assert (rc, line) == (130, "colorize_inference.py: interrupted; the 3 outputs written so far are complete: "
                               "--frames 2: --overwrite continues (from the start of the batch it stopped in: the "
                               "frames of an uninterrupted run)")
    monkeypatch.setattr(O, "encode_png", encode_png)
    assert run([*args, *_advice(line, r"complete: (--frames .*) continues"), "--out", tmp_path / "out"],
               capsys)[0] == 0
    assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "whole")
    # the batches count from the run's first frame: --frames 1: batches f1 f2 | f3, stopped at f3 it goes on there
    stop_encoding_at(3, monkeypatch)
    rc, _, err = run([*args, "--frames", "1:", "--out", tmp_path / "later"], capsys)
    assert rc == 130 and err.splitlines()[-1].endswith("complete: --frames 3: continues"), err


def test_a_mode_refuses_the_flags_of_another_mode(env, tmp_path, capsys):
    """--anchor-every with recursive ran plain recursive (no drift control, silently), --batch with
    recursive or anchored went frame by frame: refused like a baseline's model flags."""
    base = ["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], *FAST,
            "--out", tmp_path / "out", "--no-progress"]
    for mode, given, says in [("recursive", ["--anchor-every", "3"], "--anchor-every is for --mode anchored; --mode "
                                                                     "recursive takes no anchoring"),
                              ("fixed", ["--anchor-strength", "0.5"], "--anchor-strength is for --mode anchored; "
                                                                      "--mode fixed takes no anchoring"),
                              ("anchored", ["--batch", "8"], "--batch is for --mode fixed; --mode anchored takes no "
                                                             "batches (it goes frame by frame)"),
                              ("recursive", ["--batch", "2"], "--batch is for --mode fixed; --mode recursive takes "
                                                              "no batches (it goes frame by frame)")]:
        rc, out, err = run([*base, "--mode", mode, *given], capsys)
        assert (rc, out, err) == (2, "", f"colorize_inference.py: error: {says}: leave it out\n")
    # typed with their default values, as unused: they were let through (an audit found "--mode recursive
    # --anchor-every 8" running plain recursive)
    for mode, given, says in [("recursive", ["--anchor-every", "8"], "--anchor-every is for --mode anchored"),
                              ("fixed", ["--anchor-strength", "1.0"], "--anchor-strength is for --mode anchored"),
                              ("anchored", ["--batch", "4"], "--batch is for --mode fixed")]:
        assert given[1] == str(cli.parser().get_default(given[0][2:].replace("-", "_")))
        rc, out, err = run([*base, "--mode", mode, *given], capsys)
        assert rc == 2 and err.startswith(f"colorize_inference.py: error: {says}; "), err
    assert not (tmp_path / "out").exists()
    assert run([*base, "--mode", "anchored", "--anchor-every", "8", "--anchor-strength", "1.0"], capsys)[0] == 0


def test_a_control_on_other_sd_weights_than_its_runs_is_noted_and_still_colours(env, tmp_path, capsys):
    """The export's recorded digest of the locked weights is checked against --ckpt's: a note on
    stderr (a fine-tuned base may be meant), and the frames are made all the same."""
    from cldm.trainable import configure_trainable, export_control, locked_digest

    model = tiny_model(seed=3)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    key = "model.diffusion_model.out.2.bias"
    other = tmp_path / "other.safetensors"
    save_file({**sd, key: sd[key] + 1e-3}, str(other))
    configure_trainable(model)
    control = export_control(model, tmp_path / "control.safetensors", cfg=load_config(TINY_CONFIG),
                             extra={"init": "init.safetensors", "locked_digest": locked_digest(model)})
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", other, "--control", control,
                      "--size", "64", "--steps", "1", "--no-progress", "--out", tmp_path / "out"], capsys)
    assert rc == 0 and err == (f"colorize_inference.py: note: --control {control} was trained on other SD weights than "
                               f"--ckpt {other} holds (its run's --init (init.safetensors); the digests of the locked "
                               "weights differ): fine for a fine-tuned SD2.1 or the same weights at another precision, "
                               "but SD2.1 768-v under a 512-base export colours wrongly; to be sure, pass that --init, "
                               "or the SD file it was made from, as --ckpt\n")
    assert len(snapshot(tmp_path / "out")) == 4


def test_pngs_are_encoded_in_threads_while_the_next_frames_are_made_and_written_in_order(env, tmp_path, capsys,
                                                                                        monkeypatch):
    """The main thread makes frame k + PNG_THREADS before it writes frame k; encoding runs elsewhere."""
    log, encoders = [], set()
    colour, encode, write = M.iter_baseline, O.encode_png, O.write_bytes_atomic

    def made(*a, **k):
        for k, out in enumerate(colour(*a, **k)):
            log.append(f"made {k}")
            yield out

    def encoded(rgb, depth):
        encoders.add(threading.current_thread() is threading.main_thread())
        return encode(rgb, depth)

    monkeypatch.setattr(O, "PNG_THREADS", 2)
    monkeypatch.setattr(M, "iter_baseline", made)
    monkeypatch.setattr(O, "encode_png", encoded)
    monkeypatch.setattr(O, "write_bytes_atomic", lambda path, data, **kw: log.append(f"wrote {path.name}") or
                        write(path, data, **kw))
    args = ["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress"]
    assert run([*args, "--out", tmp_path / "out"], capsys)[0] == 0
    assert log == ["made 0", "made 1", "made 2", "wrote f0.png", "made 3", "wrote f1.png", "wrote f2.png",
                   "wrote f3.png"] and encoders == {False}
    monkeypatch.setattr(O, "PNG_THREADS", 1)  # the same bytes whenever they are encoded
    assert run([*args, "--out", tmp_path / "one"], capsys)[0] == 0
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "one")


@pytest.mark.parametrize("threads, written, says", [(1, ["f0.png", "f1.png", "f1.png", "f2.png"], "the 3 outputs written "
                                                    "so far are complete: --frames 3: continues"),
                                                    (2, ["f0.png", "f1.png", "f1.png", "f2.png", "f3.png"], "the 4 "
                                                    "outputs written so far are complete: that is all of them")])
def test_a_stop_while_a_png_is_written_loses_none_of_the_frames_made(env, tmp_path, capsys, monkeypatch, threads,
                                                                     written, says):
    """Ctrl-C lands in the main thread, in the write of f1 (say): that write is done again, and
    the frames made after it, their PNGs already encoded, are written too, in order."""
    calls = []
    monkeypatch.setattr(O, "PNG_THREADS", threads)
    monkeypatch.setattr(O, "write_bytes_atomic", stops_in_second_write(O.write_bytes_atomic, calls))
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out], capsys)
    assert rc == 130 and err == f"colorize_inference.py: interrupted; {says}\n"
    assert calls == written and sorted(snapshot(out)) == sorted(set(written))


def test_a_stop_as_the_last_pngs_are_written_leaves_no_output_uncounted(env, tmp_path, capsys, monkeypatch):
    """The frames still pending once the clip is made are written after its loop: a stop landing
    there, just after f2's rename (before it is counted), left f2 on disk while the line said
    "--frames 2: continues", a range that refuses to start over it without --overwrite. They
    are drained as those inside the loop are."""
    write, calls = O.write_bytes_atomic, []

    def stopped_after_the_rename(path, data, **kw):
        calls.append(path.name)
        done = write(path, data, **kw)
        if calls == ["f0.png", "f1.png", "f2.png"]:  # the first write after the loop (4 frames, 2 pending)
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(O, "PNG_THREADS", 2)
    monkeypatch.setattr(O, "write_bytes_atomic", stopped_after_the_rename)
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out], capsys)
    assert rc == 130 and err == ("colorize_inference.py: interrupted; the 4 outputs written so far are complete: "
                                 "that is all of them\n"), err
    assert calls == ["f0.png", "f1.png", "f2.png", "f2.png", "f3.png"]
    assert sorted(p.name for p in out.iterdir()) == ["f0.png", "f1.png", "f2.png", "f3.png"]


def test_a_stop_inside_the_video_writer_still_writes_the_pngs_already_made(env, tmp_path, capsys, monkeypatch):
    """With --video the writer pulls frames; a stop inside it (here after it took f1) used to
    drop the frames made and encoded but not yet written (f2, f3 with 2 PNG threads)."""
    def stopped_after_two(path, frames, fps, audio_from=None, times=None, lead=0.0):
        for k, _ in enumerate(frames):
            if k == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(O, "PNG_THREADS", 2)
    monkeypatch.setattr(cli, "write_video_atomic", stopped_after_two)
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out, "--video", tmp_path / "v.mp4"], capsys)
    assert rc == 130 and err.splitlines()[-1] == (
        "colorize_inference.py: interrupted; the 4 outputs written so far are complete: only --video is missing: "
        "rerun with --frames 4: (it writes the video from the 4 outputs in --out)"), err
    assert sorted(snapshot(out)) == ["f0.png", "f1.png", "f2.png", "f3.png"]


def test_a_full_disk_while_draining_for_the_video_writer_keeps_its_error_and_count(env, tmp_path, capsys, monkeypatch):
    """The drain after the video writer's error stops at the first PNG the disk refuses; the
    writer's error is the one reported, with the count of what was written."""
    write, calls = O.write_bytes_atomic, []

    def disk_fills_at_f2(path, data, **kw):
        calls.append(path.name)
        if path.name == "f2.png":
            raise OSError(28, "No space left on device")
        return write(path, data, **kw)

    def stopped_after_two(path, frames, fps, audio_from=None, times=None, lead=0.0):
        for k, _ in enumerate(frames):
            if k == 1:
                raise OSError(f"{path}: the video was not written completely (is the disk full?)")

    monkeypatch.setattr(O, "PNG_THREADS", 2)
    monkeypatch.setattr(O, "write_bytes_atomic", disk_fills_at_f2)
    monkeypatch.setattr(cli, "write_video_atomic", stopped_after_two)
    out, video = tmp_path / "out", tmp_path / "v.mp4"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out, "--video", video], capsys)
    assert rc == 2 and err.splitlines()[-1] == (
        f"colorize_inference.py: error: {video}: the video was not written completely (is the disk full?) (the 2 "
        "outputs before it are written and complete; --frames 2: continues)"), err
    assert calls == ["f0.png", "f1.png", "f2.png"] and sorted(snapshot(out)) == ["f0.png", "f1.png"]


def stop_as_the_bar_closes(monkeypatch) -> None:
    """Ctrl-C as run() closes its progress bar: after the last output (and the video) is written."""
    bar = cli.progress_bar

    def stopping_bar(*a, **k):
        b = bar(*a, **k)
        close = b.close

        def stop():
            b.close = close  # once: tqdm closes itself again when collected
            close()
            raise KeyboardInterrupt
        b.close = stop
        return b

    monkeypatch.setattr(cli, "progress_bar", stopping_bar)


@pytest.mark.parametrize("video", [False, True])
def test_a_stop_as_the_run_finishes_says_that_nothing_is_missing(env, tmp_path, capsys, monkeypatch, video):
    """A stop after the last output (here as the progress bar closes) used to end in "interrupted
    before any output was written"."""
    stop_as_the_bar_closes(monkeypatch)
    out, clip = tmp_path / "out", tmp_path / "v.mp4"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out, *(["--video", clip] if video else [])], capsys)
    assert rc == 130 and err.splitlines()[-1] == ("colorize_inference.py: interrupted as it finished; all 4 outputs"
                                                  f"{f' and {clip}' if video else ''} are written and complete"), err
    assert len(snapshot(out)) == 4 and clip.exists() == video


@pytest.mark.parametrize("video", [False, True])
def test_a_one_frame_run_stopped_as_it_finishes_says_the_1_output(env, tmp_path, capsys, monkeypatch, video):
    """The finished line in the singular: "the 1 output is", or "the 1 output and V are" with
    --video (not "all 1 outputs", nor "is" for the two)."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(env["gray"] / "f0.png", src / "f0.png")
    stop_as_the_bar_closes(monkeypatch)
    out, clip = tmp_path / "out", tmp_path / "v.mp4"
    rc, _, err = run(["--input", src, "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out, *(["--video", clip] if video else [])], capsys)
    assert rc == 130 and err.splitlines()[-1] == ("colorize_inference.py: interrupted as it finished; the 1 output"
                                                  + (f" and {clip} are" if video else " is") + " written and complete")


def test_a_stop_after_the_first_output_says_where_to_continue(env, tmp_path, capsys, monkeypatch):
    """One output written is not "interrupted before any output was written": the line names it
    and the range that continues (kills `done["n"] == 0` -> `<= 1` in run's KeyboardInterrupt)."""
    monkeypatch.setattr(O, "PNG_THREADS", 1)
    stop_encoding_at(2, monkeypatch)
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out], capsys)
    assert (rc, err) == (130, "colorize_inference.py: interrupted; the 1 output written so far is complete: "
                              "--frames 1: continues\n")
    assert sorted(p.name for p in out.iterdir()) == ["f0.png"]


def test_recursive_mode_stopped_mid_batch_size_goes_on_from_the_next_frame(env, tmp_path, capsys, monkeypatch):
    """Only fixed mode batches: recursive goes frame by frame, so 2 outputs of the default --batch 4
    are no part-written batch and the advice is the next frame, without --overwrite (kills dropping
    `args.mode == "fixed"` from resume's batch rule)."""
    stop_encoding_at(3, monkeypatch)
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--ckpt", env["ckpt"], "--mode",
                      "recursive", "--no-progress", *FAST, "--out", tmp_path / "out"], capsys)
    assert (rc, err.splitlines()[-1]) == (130, "colorize_inference.py: interrupted; the 2 outputs written so far are "
                                               "complete: --frames 2: continues")


def test_a_png_is_encoded_while_the_next_frame_is_made_and_alongside_the_next_png(env, tmp_path, capsys,
                                                                                 monkeypatch):
    """f0's encoding waits (up to seconds) until f1 has been made and f1's encoding has begun: with
    PNG_THREADS 2 both happen while it runs. Kills waiting for each PNG in the main thread as it is
    submitted, and a pool of one thread whatever PNG_THREADS says."""
    colour, encode = M.iter_baseline, O.encode_png
    frames, made, started, overlapped = [], [threading.Event() for _ in range(4)], \
        [threading.Event() for _ in range(4)], []

    def making(*a, **k):
        for k, out in enumerate(colour(*a, **k)):
            frames.append(out)
            made[k].set()
            yield out

    def encoded(rgb, depth):
        k = next(i for i, f in enumerate(frames) if f is rgb)
        started[k].set()
        if k == 0:
            overlapped.append((made[1].wait(5), started[1].wait(5)))
        return encode(rgb, depth)

    monkeypatch.setattr(O, "PNG_THREADS", 2)
    monkeypatch.setattr(M, "iter_baseline", making)
    monkeypatch.setattr(O, "encode_png", encoded)
    out = tmp_path / "out"
    assert run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                "--out", out], capsys)[0] == 0
    assert overlapped == [(True, True)] and len(snapshot(out)) == 4


def test_a_stop_as_a_run_of_unknown_length_finishes_counts_what_it_wrote(env, tmp_path, capsys, monkeypatch):
    """A video that does not say its length (total unknown): the line counts the outputs written,
    not "all None outputs" (kills `done['n']` -> `total` in the finished line)."""
    from tests.annotator.clips import panning_clip, write_video

    bar = cli.progress_bar

    def stopping_bar(*a, **k):
        b = bar(*a, **k)
        close = b.close

        def stop():
            b.close = close
            close()
            raise KeyboardInterrupt
        b.close = stop
        return b

    video = write_video(panning_clip(3, 64, 96), tmp_path / "v.avi")
    monkeypatch.setattr(P, "output_names", lambda *a, **k: None)
    monkeypatch.setattr(cli, "progress_bar", stopping_bar)
    out = tmp_path / "out"
    rc, _, err = run(["--input", video, "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out], capsys)
    assert (rc, err.splitlines()[-1]) == (130, "colorize_inference.py: interrupted as it finished; all 3 outputs are "
                                               "written and complete")
    assert len(snapshot(out)) == 3


def test_flow_stopped_right_at_its_reference_frame_goes_on_from_there_without_overwrite(tmp_path, capsys,
                                                                                       monkeypatch):
    """The next frame to make is the reference frame itself: the range from it holds it, so nothing
    written is made again (kills `i < start` -> `i <= start` in resume's flow rule)."""
    colour = write_folder(panning_clip(6, 48, 64), tmp_path / "colour", pattern="f{:d}")
    stop_encoding_at(4, monkeypatch)
    rc, _, err = run(["--input", colour, "--reference-frame", "3", "--method", "flow", "--frames", "0:6",
                      "--no-progress", "--out", tmp_path / "out"], capsys)
    assert (rc, err.splitlines()[-1]) == (130, "colorize_inference.py: interrupted; the 3 outputs written so far are "
                                               "complete: --frames 3:6 continues")


def test_a_stop_between_two_outputs_counts_the_frames_drained_after_it(env, tmp_path, capsys, monkeypatch):
    """Ctrl-C can land in the loop that takes the written outputs (between two of them), outside
    the writer: the frames made and pending (f1, f2 with 2 PNG threads) were then drained only
    when the traceback was freed, after the line had said "the 1 outputs ... --frames 1:
    continues", a range that refuses to start over f1 without --overwrite."""
    def stopped_after_one(outputs):
        for _ in outputs:
            raise KeyboardInterrupt

    monkeypatch.setattr(O, "PNG_THREADS", 2)
    monkeypatch.setattr(cli, "sum", stopped_after_one, raising=False)  # the loop over the outputs without --video
    out = tmp_path / "out"
    rc, _, err = run(["--input", env["gray"], "--reference", env["refs"][0], "--method", "reinhard", "--no-progress",
                      "--out", out], capsys)
    present = sorted(p.name for p in out.iterdir())
    assert rc == 130 and err == (f"colorize_inference.py: interrupted; the {len(present)} outputs written so far are "
                                 f"complete: --frames {len(present)}: continues\n"), (err, present)


def test_unattended_runs_write_a_quiet_log_and_survive_a_closed_stderr(env, tmp_path):
    """Under a scheduler the bar went to the log 10 times a second (megabytes of carriage returns
    an hour); with stderr closed (`2>&-`) tqdm wrote to None: exit 1 and not a word, nothing
    written (unattended-run audit). Now: an update every 30 s in a log (here: the first and the
    last), and no bar where stderr is closed."""
    script = Path(cli.__file__)
    args = [str(script), "--input", str(env["gray"]), "--reference", str(env["refs"][0]), "--method", "reinhard"]
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "a")], stderr=log, timeout=120)
    text = (tmp_path / "log").read_text()
    assert done.returncode == 0 and len(sorted((tmp_path / "a").iterdir())) == 4
    assert text.count("\r") <= 2 and "4/4" in text, text  # tqdm's first draw and its close
    for method, out in (("reinhard", "b"), ("flow", "c")):  # flow: its second bar, which scans for the reference
        done = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "bash", sys.executable, *args[:-1], method,
                               "--out", str(tmp_path / out)], timeout=120)
        assert done.returncode == 0 and len(sorted((tmp_path / out).iterdir())) == 4, method
