#!/usr/bin/env python3
"""Frames per second of the inference modes (colorize.pipeline), on one machine in one run.

Times the library call colorize_inference.py makes, end to end per frame: resize, the
reference and hint work, DDIM, VAE decode, resize back and the luminance-true recombination
at the input size (no file writing). The model is the tiny config (or --config) with random
weights - speed does not depend on the weights - so by default the numbers compare the modes,
not the real model:
fixed mode batches frames and encodes the reference once; recursive and anchored modes run
one frame at a time and encode the previous output as the next reference. The row
"fixed8serial" is fixed mode at batch 8 without the pipeline's overlap of one batch's CPU
finishing with the next batch's GPU work (the same outputs): the baseline for that overlap.
Runs of the modes alternate and the median of --repeat runs is reported, so background load
hits all modes alike.

With --flops it instead counts the FLOPs per frame of the pipeline's path for a config (the
real SD2.1 one by default) on the meta device - no memory, no GPU - as benchmarks/flops.py
does for its parts: fixed mode (reference latent and prompt once per clip), recursive/anchored
(plus a VAE encode of the previous output) and reference guidance.

  python benchmarks/bench_inference.py --threads 1              # tiny config, CPU, 1280x720 frames
  python benchmarks/bench_inference.py --frames 32 --scale 0.25 --size 64 --steps 20
  python benchmarks/bench_inference.py --config models/cldm_v21_color.yaml --device cuda --size 512 --square
  python benchmarks/bench_inference.py --flops --height 512 --width 896
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from annotator.color import rgb_to_gray, transfer_luma  # noqa: E402
from annotator.video import iter_frames  # noqa: E402
from benchmarks.cliargs import check_sides  # noqa: E402
from benchmarks.experiments import SDPA_BACKENDS, sdpa_backend  # noqa: E402
from cldm.config import DEFAULT_CONFIG, TINY_CONFIG, ConfigError, load_config  # noqa: E402
from cldm.model import create_model  # noqa: E402
from cliutil import OneLineParser, positive_float, positive_int, run_cli  # noqa: E402
from colorize import loading as L, pipeline as P  # noqa: E402
from ldm import schedule  # noqa: E402

PROG = "bench_inference.py"
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "bigbuckbunny.mp4"
RUNS = {  # name (for --modes) -> (mode, batch)
    "fixed1": ("fixed", 1),
    "fixed4": ("fixed", 4),
    "fixed8": ("fixed", 8),
    "fixed8serial": ("fixed-serial", 8),
    "fixed16": ("fixed", 16),
    "recursive": ("recursive", 1),
    "anchored": ("anchored", 1),
}
DEFAULT_RUNS = "fixed1,fixed4,fixed8,recursive,anchored"


def label(name: str) -> str:
    mode, batch = RUNS[name]
    if mode == "fixed-serial":
        return f"fixed, batch {batch}, serial (no overlap)"
    return f"{mode}, batch {batch}" if mode == "fixed" else mode


def load_frames(n: int, scale: float, square: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """n gray frames of the sample clip (from frame 1) and colour frame 0 as the reference.

    `square`: the centre square of each frame (720x720 before scaling), for 512x512 model frames.
    """
    grays, ref = [], None
    for i, _, rgb in iter_frames(SAMPLE, stop=n + 1, check_count=False):
        if square:
            h, w = rgb.shape[:2]
            s = min(h, w)
            rgb = np.ascontiguousarray(rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s])
        if scale != 1:
            rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if i == 0:
            ref = rgb
        else:
            grays.append(rgb_to_gray(rgb))
    return grays, ref


def fixed_serial(model, grays, ref, batch: int, **options):
    """Fixed mode without the pipeline's overlap: each batch is sampled, decoded and finished
    before the next starts (Colorizer.run), the way colorize.pipeline worked before 2026-11-27.
    The same work and outputs as fixed mode: the baseline the overlap is measured against, and
    the reference the overlap tests compare with (tests/colorize/test_pipeline.py, tests/test_cuda.py)."""
    col = P.Colorizer(model, grays[0].shape, P.Options(batch=batch, **options))
    r = col.reference(ref)
    with ThreadPoolExecutor(min(batch, os.cpu_count() or 1)) as pool:
        for i in range(0, len(grays), batch):
            chunk = grays[i:i + batch]
            yield from col.run(chunk, range(i, i + len(chunk)), [r] * len(chunk), pool)


def fps(model, grays, ref, mode: str, batch: int, **options) -> tuple[float, float]:
    """(frames per second of wall time, CPU seconds per frame over all threads)."""
    t, c = time.perf_counter(), time.process_time()
    if mode == "fixed-serial":
        frames = fixed_serial(model, grays, ref, batch, **options)
    else:
        frames = P.colorize(model, grays, ref, mode, batch=batch, **options)
    n = sum(1 for _ in frames)
    return n / (time.perf_counter() - t), (time.process_time() - c) / n


@torch.no_grad()
def pipeline_flops(config=DEFAULT_CONFIG, height: int = 512, width: int = 512, steps: int = 20) -> dict[str, int]:
    """FLOPs per frame of colorize.pipeline's model path (batch 1), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    cfg = load_config(config)
    with torch.device("meta"):
        model = create_model(cfg).eval()
    s = cfg.model.schedule  # DDIM reads the schedule's values, which meta tensors do not have
    for name, value in schedule.schedule_buffers("linear", s.timesteps, s.linear_start, s.linear_end).items():
        model.register_buffer(name, value)
    hint = torch.rand(1, 4, height, width, device="meta")
    context = model.get_learned_conditioning([""])
    ref_latent = model.encode_first_stage(hint[:, :3] * 2 - 1)
    gens = P.clip_generator(0)  # shared noise, the default (the FLOPs are the same either way)

    def frame(guided: bool = False):
        cond = model.prepare_condition(hint, context=context, ref_latent=ref_latent)
        uncond = model.prepare_condition(hint, context=context, ref_latent=ref_latent) if guided else None
        z = P.sample_latents(model, cond, gens, steps, uncond=uncond, ref_guidance=2.0 if guided else 1.0)
        return model.decode_first_stage(z)

    tokens = model.cond_stage_model.tokenize([""]).to("meta")
    out = {"text encoder (once per clip)": count(lambda: model.cond_stage_model.encode_tokens(tokens)),
           "VAE encode of a reference": count(lambda: model.encode_first_stage(hint[:, :3] * 2 - 1)),
           "hint block": count(lambda: model.control_model.encode_hint(hint)),
           "one DDIM step (ControlNet + UNet)": count(lambda: P.sample_latents(
               model, model.prepare_condition(hint, context=context, ref_latent=ref_latent), gens, 1)),
           "VAE decode": count(lambda: model.decode_first_stage(torch.zeros(1, 4, height // 8, width // 8,
                                                                             device="meta")))}
    out["one DDIM step (ControlNet + UNet)"] -= out["hint block"]
    out["fixed, per frame"] = count(frame)
    out["recursive / anchored, per frame"] = out["fixed, per frame"] + out["VAE encode of a reference"]
    out["fixed with --ref-guidance, per frame"] = count(lambda: frame(guided=True))
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="model YAML (default: the tiny config; with --flops the real SD2.1 one)")
    p.add_argument("--frames", type=positive_int, default=16, help="frames per run (default: 16)")
    p.add_argument("--scale", type=positive_float, default=1.0, help="input frame scale, 1 = 1280x720 (default: 1)")
    p.add_argument("--size", type=positive_int, default=64, help="model short side (default: 64 -> 64x128)")
    p.add_argument("--square", action="store_true", help="centre-crop the frames to squares (720x720)")
    p.add_argument("--steps", type=positive_int, default=20,
                   help="DDIM steps, at most half the model's schedule (default: 20)")
    p.add_argument("--repeat", type=positive_int, default=3,
                   help="runs per mode; the median is reported (default: 3)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", *L.PRECISIONS],
                   help="autocast dtype; auto: fp16 on CUDA, fp32 on the CPU (default: auto)")
    p.add_argument("--noise", default="shared", choices=P.NOISES, help="noise option (default: shared)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: replay denoising steps from CUDA graphs (default: on; off on the CPU)")
    p.add_argument("--channels-last", action="store_true", help="experiment: NHWC weights and activations")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="experiment: let cuDNN time its convolution algorithms (torch.backends.cudnn.benchmark)")
    p.add_argument("--sdpa", choices=["auto", *SDPA_BACKENDS], default="auto",
                   help="experiment: one scaled_dot_product_attention backend for the attention of ControlNet "
                        "and UNet (the text encoder and VAE keep torch's choice) (default: torch's choice)")
    p.add_argument("--cast-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="hold the weights in the autocast dtype, as colorize_inference.py does "
                        "(colorize.loading.cast_weights; default: on; off: autocast casts them every step)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile ControlNet, UNet and VAE decoder (ControlLDM.compile_denoiser); the "
                        "warm-up compiles each batch shape and reports the largest difference from eager")
    p.add_argument("--modes", default=DEFAULT_RUNS, help=f"comma-separated rows of the table to run, of "
                   f"{','.join(RUNS)} (default: {DEFAULT_RUNS})")
    p.add_argument("--flops", action="store_true", help="count FLOPs per frame on meta instead of timing")
    p.add_argument("--height", type=positive_int, default=512,
                   help="--flops: model frame height, a multiple of the model's (64 for SD2.1) (default: 512)")
    p.add_argument("--width", type=positive_int, default=512, help="--flops: model frame width (default: 512)")
    args = p.parse_args(argv)
    runs = [m.strip() for m in args.modes.split(",")]
    if not runs or any(m not in RUNS for m in runs):
        p.error(f"--modes {args.modes}: choose from {','.join(RUNS)}")
    return run_cli(PROG, lambda a: run(a, runs), args, errors=(ConfigError, ValueError))


def run(args: argparse.Namespace, runs: list[str]) -> int:
    config = args.config or (DEFAULT_CONFIG if args.flops else TINY_CONFIG)
    if args.flops:  # the model's own checks, before minutes of counting
        check_sides(config, height=args.height, width=args.width)
        P.check_steps(load_config(config).model.schedule.timesteps, args.steps)
        print(f"# FLOPs per frame, {Path(config).name}, {args.width}x{args.height}, {args.steps} DDIM steps")
        counts = pipeline_flops(config, args.height, args.width, args.steps)
        scale, unit = (1e12, "TFLOP") if max(counts.values()) >= 1e12 else (1e9, "GFLOP")  # tiny: all 0.000 TFLOP
        for k, v in counts.items():
            print(f"{k:40s} {v / scale:8.3f} {unit}")
        return 0
    device = L.resolve_device(args.device)
    cfg = load_config(config)
    P.check_steps(cfg.model.schedule.timesteps, args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda_graph = args.cuda_graph and device.type == "cuda"  # the pipeline uses them on CUDA only
    graphs = ("on" if args.cuda_graph else "off") if device.type == "cuda" else "n/a (CPU)"

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    with torch.device(device):
        model = create_model(cfg).eval().requires_grad_(False)
    dtype = L.compute_dtype(args.precision, device)
    if args.cast_weights and dtype != torch.float32:
        L.cast_weights(model, dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    grays, ref = load_frames(args.frames, args.scale, args.square)
    opts = dict(size=args.size, steps=args.steps, precision=args.precision, noise=args.noise,
                cuda_graph=cuda_graph)
    with sdpa_backend(args.sdpa):  # warm-up (CUDA graphs, compiling) and timed runs alike
        # Warm-up: every batch shape of the runs once (CUDA graph capture, cuDNN autotuning, compiling).
        warm = {(RUNS[n][0] not in ("recursive", "anchored"), RUNS[n][1]) for n in runs}
        warm_up = lambda: {b: list(P.colorize(model, grays[:max(b, 2)], ref, "fixed" if f else "recursive", batch=b,
                                              **opts)) for f, b in sorted(warm)}
        if args.compile:
            eager = warm_up()
            t = time.perf_counter()
            model.compile_denoiser(vae_decoder=True, dynamic=False)
            compiled = warm_up()
            diff = max(float(np.abs(x - y).max()) for b in eager for x, y in zip(eager[b], compiled[b]))
            print(f"compile + warm-up: {time.perf_counter() - t:.0f} s; largest |compiled - eager| over "
                  f"{sum(map(len, eager.values()))} warm-up frames: {diff:.2e}")
        else:
            warm_up()
        results = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name in runs:
                results[name].append(fps(model, grays, ref, *RUNS[name], **opts))
    h, w = grays[0].shape
    mh, mw = P.model_size(h, w, args.size)
    t = time.perf_counter()
    for g in grays:
        transfer_luma(P.resize(np.full((mh, mw, 3), 0.5, np.float32), (h, w)), g)
    post = (time.perf_counter() - t) / len(grays)
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"config {Path(config).name}, input {w}x{h} -> model {mw}x{mh}, {args.steps} steps, "
          f"{args.noise} noise, CUDA graphs {graphs}, "
          f"weights in {dtype if args.cast_weights else torch.float32}, channels_last {args.channels_last}, "
          f"cudnn.benchmark {args.cudnn_benchmark}, SDPA {args.sdpa}, compile {args.compile}, "
          f"{args.frames} frames, median of {args.repeat}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# 1-min load average: {load_before:.1f} before, {load:.1f} after (other jobs on the machine)")
    print("| mode | frames/s | s/frame | CPU s/frame |\n|---|---:|---:|---:|")
    for name, values in results.items():
        f = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"| {label(name)} | {f:.2f} | {1 / f:.3f} | {cpu:.3f} |")
    print(f"resize back + luminance-true recombination alone: {post * 1000:.1f} ms/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
