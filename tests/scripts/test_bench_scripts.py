"""benchmarks/bench_inference.py, bench_train.py (tiny config) and bench_loader.py on the CPU: every row runs;
and every benchmark script refuses bad arguments in one line before any work."""
import json
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from benchmarks import bench_inference, bench_loader, bench_pairs, bench_train, profile_step, roofline
from benchmarks.experiments import sdpa_backend
from cldm.config import TINY_CONFIG, load_config
from cldm.model import create_model
from ldm.modules.attention import CrossAttention
from tests.helpers import missing_under, refused

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid here")



def test_bench_inference_runs_every_mode_and_the_serial_baseline(capsys):
    rc = bench_inference.main(["--frames", "4", "--scale", "0.25", "--steps", "4", "--repeat", "1", "--threads", "1",
                               "--precision", "bf16", "--modes", "fixed1,fixed4,fixed8serial,recursive,anchored"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "weights in torch.bfloat16" in out  # cast as colorize_inference.py casts them
    assert "CUDA graphs n/a (CPU)" in out  # a GPU-only feature is not reported "on" for a CPU run
    rows = dict(re.findall(r"^\| ([a-z][^|]*?) \| ([0-9.]+) \|", out, re.M))
    assert set(rows) == {"fixed, batch 1", "fixed, batch 4", "fixed, batch 8, serial (no overlap)", "recursive",
                         "anchored"}
    assert all(float(v) > 0 for v in rows.values())
    table = re.findall(r"^\| [a-z][^|]*? \| ([0-9.]+) \| ([0-9.]+) \| [0-9.]+ \|$", out, re.M)
    assert len(table) == 5 and all(float(spf) == pytest.approx(1 / float(f), rel=0.02, abs=1e-3) for f, spf in table)


def test_bench_inference_fps_counts_the_frames_of_the_mode_asked_for(monkeypatch):
    """The frames/s column is frames made / wall seconds, of the mode and batch of its row (a
    count doubled, or every row timed as fixed, passed the test above)."""
    calls, clock = [], iter([10.0, 14.0])
    monkeypatch.setattr(bench_inference.time, "perf_counter", lambda: next(clock))

    def colorize(model, grays, ref, mode, batch, **options):
        calls.append((mode, batch))
        yield from grays
    monkeypatch.setattr(bench_inference.P, "colorize", colorize)
    frames_per_s, _ = bench_inference.fps(None, [0] * 6, None, *bench_inference.RUNS["recursive"])
    assert frames_per_s == 6 / 4 and calls == [("recursive", 1)]


def test_bench_png_threads_times_the_three_ways_and_finds_the_same_outputs(capsys):
    from benchmarks import bench_png_threads
    from colorize import outputs

    shipped = outputs.PNG_THREADS, outputs.ThreadPoolExecutor
    assert bench_png_threads.main(["--method", "reinhard", "--frames", "3", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "reinhard, 3 frames of bigbuckbunny.mp4, median of 1; outputs identical: True" in out
    rows = re.findall(r"^ *(threads \(\d+\)|serial): +[0-9.]+ s +[0-9.]+ frames/s +([0-9.]+)x serial$", out, re.M)
    assert [name for name, _ in rows] == [*{f"threads ({outputs.PNG_THREADS})": 0, "threads (1)": 0}, "serial"]
    assert rows[-1][1] == "1.00" and (outputs.PNG_THREADS, outputs.ThreadPoolExecutor) == shipped  # put back


def test_bench_png_threads_encodes_serial_on_the_main_thread_and_fails_on_outputs_that_differ(capsys, monkeypatch):
    """An encoder that marks the PNGs made on the main thread: only the serial runs' differ, and the
    bench says so and exits 1 (kills installing no Serial stand-in, and returning 0 whatever)."""
    import threading

    from benchmarks import bench_png_threads
    from colorize import outputs

    encode = outputs.encode_png
    monkeypatch.setattr(outputs, "encode_png", lambda rgb, depth: encode(rgb, depth) + (
        b"main" if threading.current_thread() is threading.main_thread() else b""))
    assert bench_png_threads.main(["--method", "reinhard", "--frames", "2", "--repeat", "1"]) == 1
    assert "; outputs identical: False" in capsys.readouterr().out


def test_bench_train_reports_speed_and_memory():
    r = bench_train.bench(TINY_CONFIG, size=64, batch_size=2, steps=1, warmup=1, precision="32", device="cpu")
    assert r["samples_per_s"] > 0 and r["memory_gib"] > 0
    assert r["samples_per_s"] == pytest.approx(2 / r["step_s"])  # batch / step time, not steps / s
    assert r["achieved_tflops"] == pytest.approx(r["model_tflop_per_sample"] * r["samples_per_s"])
    assert r["model_tflop_per_sample"] == pytest.approx(0.591e-3, rel=0.01)  # BENCHMARKS.md: 0.591 GFLOP
    assert r["mfu"] is None  # no known peak for a CPU


def test_bench_loader_times_items_and_loaders_on_a_cache_of_sd_shapes(tmp_path, capsys):
    argv = ["--size", "64", "--items", "4", "--batch-size", "2", "--batches", "2", "--workers", "0",
            "--data-root", str(tmp_path / "d"), "--target", "100", "--json", str(tmp_path / "r.json")]
    assert bench_loader.main(argv) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    for key in ("read_frame_ms", "hint_ms", "latent_item_ms", "pixels_item_ms", "loader_latent_w0_samples_per_s"):
        assert r[key] > 0, key
    assert r["workers_per_gpu"] == {"100 samples/s": -(-100 // r["latent_items_per_s"])}
    lat = np.load(tmp_path / "d" / "bigbuckbunny" / "latents.npy", mmap_mode="r")
    assert lat.shape == (132, 2, 4, 8, 112 // 8)  # SD2.1's latent channels and /8, for 112x64 frames
    assert "workers per GPU for 100 samples/s" in capsys.readouterr().out
    # the data kept for reuse fit only their own --size: another is refused, not a traceback
    assert "holds the sample built at --size 64: use --size 64 or another folder" in refused(
        bench_loader.main, argv[:1] + ["128"] + argv[2:], capsys)


def test_sdpa_backend_forces_one_kernel_in_the_denoisers_attention_only():
    """The forced backend applies to ControlNet's and UNet's attention (CrossAttention), what the
    experiment measures; the text encoder (fp32, causal mask) and the VAE (SD2.1: one head of 512)
    keep torch's choice, as flash and cuDNN attention cannot run them on a GPU. The CPU has math
    and flash kernels but no memory-efficient one: forcing that one must fail in CrossAttention,
    and only there."""
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=2, dim_head=8).eval()
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        want = attn(x)
        for name in ("auto", "math", "flash"):
            with sdpa_backend(name):
                torch.testing.assert_close(attn(x), want)
        model = create_model(load_config(TINY_CONFIG)).eval()
        with sdpa_backend("efficient"):
            with pytest.raises(RuntimeError, match="No viable backend"):
                attn(x)
            assert model.get_learned_conditioning([""]).shape[0] == 1  # text encoder
            z = model.encode_first_stage(torch.rand(1, 3, 64, 64))  # the VAE's attention, both ways
            assert model.decode_first_stage(z).shape == (1, 3, 64, 64)
        torch.testing.assert_close(attn(x), want)  # restored on exit


def test_bench_inference_flops_of_the_tiny_config_are_in_gflop(capsys):
    """Every row read "0.000 TFLOP" for the tiny config; the unit now follows the largest count."""
    from cldm.config import TINY_CONFIG

    assert bench_inference.main(["--flops", "--config", str(TINY_CONFIG), "--height", "64", "--width", "64",
                                 "--steps", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows and all(r.endswith(" GFLOP") and float(r.split()[-2]) > 0 for r in rows), rows


def test_bench_inference_forces_the_attention_backend_in_the_denoiser_only(capsys):
    """--sdpa flash ran every SDPA call on flash, where on a GPU the VAE's 512-wide head and the
    text encoder's fp32 masked attention have no flash kernel."""
    argv = ["--frames", "2", "--scale", "0.25", "--steps", "2", "--repeat", "1", "--threads", "1", "--modes", "fixed1"]
    assert bench_inference.main([*argv, "--sdpa", "flash"]) == 0
    assert "SDPA flash" in capsys.readouterr().out
    # the run really is under the forced backend: the CPU has no memory-efficient kernel
    with pytest.raises(RuntimeError, match="No viable backend"):
        bench_inference.main([*argv, "--sdpa", "efficient"])


def test_bench_train_records_the_attention_backend(tmp_path, capsys):
    assert bench_train.main(["--config", str(TINY_CONFIG), "--size", "64", "--batch-size", "1", "--steps", "1",
                             "--warmup", "0", "--precision", "32", "--device", "cpu", "--sdpa", "math",
                             "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["sdpa"] == "math"
    out = capsys.readouterr().out
    assert "SDPA math" in out and "batch 1, precision 32, " in out  # was "batch 1, 32, "


def test_gpu_suite_runs_the_sections_asked_for_in_order(tmp_path):
    """The script's wiring, with a stand-in python that records its arguments: each section's
    commands run in the order asked for, each logged; an unknown section fails the run."""
    repo = Path(__file__).resolve().parents[2]
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(repo / "benchmarks/gpu_suite.sh"), str(tmp_path / "out"), "trainx", "profile",
                          "pairs", "nonsense"], env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}, capture_output=True, text=True)
    assert run.returncode == 1 and "unknown section nonsense" in run.stdout
    lines = calls.read_text().splitlines()[1:]  # after the version check
    assert [line.split()[0] for line in lines] == ["benchmarks/bench_train.py"] * 2 + \
        ["benchmarks/profile_step.py"] * 2 + ["benchmarks/bench_pairs.py"]
    assert "--batch-size 32" in lines[0] and "--compile" in lines[0]
    assert "--compile --channels-last" in lines[1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.log")) == sorted(
        ["bench_train_b32_compile.log", "bench_train_b16_compile_channelslast.log", "profile_train_b16.log",
         "profile_sample_b8.log", "bench_pairs.log"])


@pytest.mark.parametrize("argv, says", [
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--batch-size", "-1"], "argument --batch-size: expected an integer >= 1"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1"),
    (["--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1"),
    (["--peak-tflops", "-1"], "argument --peak-tflops: expected a number > 0"),
    (["--size", "0"], "argument --size: expected an integer >= 1"),
    (["--size", "60"], "--size 60: must be a positive multiple of 64 for cldm_v21_color.yaml"),
    (["--config", str(TINY_CONFIG), "--size", "48"], "--size 48: must be a positive multiple of 32"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available", marks=NO_CUDA),
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda"),
    (["--config", "nope.yaml"], "config not found: nope.yaml"),
    (["nope"], "override must look like key=value"),
    (["model.nope=1"], "bad override"),
    (["--json", "MISSING/dir/x.json"], "--json MISSING/dir/x.json: no folder MISSING/dir"),
])
def test_bench_train_refuses_bad_arguments_before_the_run(argv, says, capsys, tmp_path):
    argv, says = missing_under(tmp_path, argv, says)
    assert says in refused(bench_train.main, ["--device", "cpu", *argv], capsys)


@pytest.mark.parametrize("argv, says", [
    (["--frames", "0"], "argument --frames: expected an integer >= 1"),
    (["--repeat", "0"], "argument --repeat: expected an integer >= 1"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1"),
    (["--steps", "600"], "steps must be between 1 and 500"),
    (["--scale", "0"], "argument --scale: expected a number > 0"),
    (["--scale", "-1"], "argument --scale: expected a number > 0"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available", marks=NO_CUDA),
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda"),
    (["--config", "nope.yaml"], "config not found: nope.yaml"),
    (["--flops", "--height", "100"], "--height 100: must be a positive multiple of 64"),
    (["--flops", "--steps", "600"], "steps must be between 1 and 500"),
])
def test_bench_inference_refuses_bad_arguments_before_the_run(argv, says, capsys):
    assert says in refused(bench_inference.main, argv, capsys)


@pytest.mark.parametrize("argv, says", [
    ([], "the following arguments are required: what (see --help)"),  # not "what, key=value"
    (["train", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["train", "--size", "50"], "--size 50: must be a positive multiple of 64"),
    (["train", "--config", "nope.yaml"], "config not found: nope.yaml"),
    (["train", "nope"], "override must look like key=value"),
    (["train", "--tbps", "-1"], "argument --tbps: expected a number > 0"),
    (["train", "--tflops", "0"], "argument --tflops: expected a number > 0"),
    (["sample", "--steps", "0"], "argument --steps: expected an integer >= 1"),
])
def test_roofline_refuses_bad_arguments_in_one_line(argv, says, capsys):
    assert says in refused(roofline.main, argv, capsys)


@pytest.mark.parametrize("argv, says", [
    ([], "the following arguments are required: what (see --help)"),
    (["train", "--steps", "0"], "argument --steps: expected an integer >= 1"),
    (["train", "--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["sample", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["train", "--top", "-1"], "argument --top: expected an integer >= 0, got '-1' (see --help)"),
    (["train", "--size", "50"], "--size 50: must be a positive multiple of 64 for cldm_v21_color.yaml "
                                "(the VAE and the UNet's downsampling)"),
    (["train", "--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N (N from 0)"),
    (["train", "--config", "nope.yaml"], "config not found: nope.yaml"),
    (["train", "model.nope=1"], "bad override model.nope=1 for cldm_v21_color.yaml: model.nope: no such key"),
])
def test_profile_step_refuses_bad_arguments_in_one_line(argv, says, capsys):
    assert says in refused(profile_step.main, argv, capsys)


@pytest.mark.parametrize("argv, says", [
    (["--repeat", "0"], "argument --repeat: expected an integer >= 1"),
    (["--naive-frames", "0"], "argument --naive-frames: expected an integer >= 1"),
    (["--naive-frames", "200"], "--naive-frames 200: the naive SSIM needs 19 frames after each"),
    (["--size", "-5"], "--size must be 0 or a multiple of 8"),
    (["--threads", "-1"], "argument --threads: expected an integer >= 0"),
    (["--decode-threads", "-2"], "argument --decode-threads: expected an integer >= 0"),
    (["--video", "MISSING/film.mp4"], "MISSING/film.mp4: no such file or folder"),
    (["--video", "README.md"], "README.md: not a video file"),
    (["--video", "TEXT.mp4"], "TEXT.mp4: cannot open video"),
    (["--video", "FOLDER"], "FOLDER: a folder; the yardsticks decode a video file"),
])
def test_bench_pairs_refuses_bad_arguments_before_the_timings(argv, says, tmp_path, capsys):
    (tmp_path / "TEXT.mp4").write_text("not a video")
    (tmp_path / "FOLDER").mkdir()
    cv2.imwrite(str(tmp_path / "FOLDER" / "0.png"), np.zeros((8, 8, 3), np.uint8))  # a folder of frames
    argv, says = missing_under(tmp_path, argv, says)
    argv = [str(tmp_path / a) if a in ("TEXT.mp4", "FOLDER") else a for a in argv]
    assert says in refused(bench_pairs.main, ["--no-1080p", *argv], capsys)


@pytest.mark.parametrize("argv, says", [
    (["--target", "-5"], "argument --target: expected a number > 0"),
    (["--workers", "-1"], "argument --workers: expected an integer >= 0"),
    (["--items", "0"], "argument --items: expected an integer >= 1"),
    (["--size", "60"], "--size 60: must be a multiple of 64"),
    (["--data-root", "README.md"], "README.md is a file, not a folder"),
    (["--json", "MISSING/dir/r.json"], "--json MISSING/dir/r.json: no folder MISSING/dir"),
])
def test_bench_loader_refuses_bad_arguments_before_the_run(argv, says, capsys, tmp_path):
    argv, says = missing_under(tmp_path, argv, says)
    assert says in refused(bench_loader.main, argv, capsys)


def test_help_shows_each_default_once(capsys):
    """DefaultsFormatter: a default is shown, once, where there is one (none for None)."""
    for main, shown in ((bench_train.main, ["(default: 8)", "(default: 10)", "(default: 3)", "(default: 512)",
                                             "(default: bf16-mixed)"]),
                        (bench_pairs.main, ["(default: 5)", "(default: 3)", "(default: 512)", "(default: 0)"]),
                        (bench_loader.main, ["(default: 512)", "(default: 100)"])):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert all(s in out for s in shown), out
        assert "(default: None)" not in out and "folder) (default" not in out
