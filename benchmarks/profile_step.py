#!/usr/bin/env python3
"""Where the time of a training step or a sampling step goes, by kind of kernel.

Runs a few steps of the real config (or --config) under torch.profiler and prints, per
step: wall time, the time the device was busy (the sum of its kernels' own times) and that
time split into kinds (matmul/conv, attention, normalisation, element-wise, copies/casts,
other), with the top kernels. Busy time well below wall time means the step waits for the
host (Python, kernel launches), as eager sampling at batch 1 does; the kinds say which
kernels to work on otherwise. On the CPU the same table is of CPU operator time.

  python benchmarks/profile_step.py train --batch-size 16 --no-checkpointing      # GPU, real config
  python benchmarks/profile_step.py sample --batch-size 1 [--no-cuda-graph]
  python benchmarks/profile_step.py train --config models/cldm_tiny_color.yaml --size 64 --device cpu
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_train import train_step_fn  # noqa: E402
from benchmarks.cliargs import check_sides  # noqa: E402
from cldm.config import DEFAULT_CONFIG, ConfigError, load_config  # noqa: E402
from cldm.model import create_model  # noqa: E402
from cliutil import OneLineParser, config_override, non_negative_int, positive_int, run_cli  # noqa: E402
from colorize.loading import resolve_device  # noqa: E402

PROG = "profile_step.py"

# First match wins; kernel names (CUDA) and operator names (CPU) both.
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("normalisation", r"norm"),
    ("matmul/conv", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|xmma|wgmma|conv|cudnn|linear"),
    ("copies/casts", r"copy|cast|to_copy|\bto\b|contiguous|cat|memcpy|memset"),
    ("element-wise/reduce", r"elementwise|vectorized|reduce|unrolled|add|mul|silu|gelu|sum|mean|div|sub|sqrt"
                            r"|exp|pow|foreach|adam"),
]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, low)), "other")


def train_step(config, size: int, batch_size: int, checkpointing: bool, device, overrides=()):
    """bench_train.py's step: bf16 autocast, latent cache."""
    return train_step_fn(config, size, batch_size, "bf16-mixed", True, checkpointing, device, overrides=overrides)


def sample_step(config, size: int, batch_size: int, cuda_graph: bool, device, overrides=()):
    """One DDIM step of colorize.pipeline (ControlNet + UNet), fp16 autocast on CUDA, bf16 on CPU,
    with the weights held in that dtype as colorize_inference.py holds them."""
    from colorize import pipeline as P
    from colorize.cuda_graph import GraphCache
    from colorize.loading import cast_weights

    with torch.device(device):
        model = create_model(load_config(config, overrides)).eval().requires_grad_(False)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    cast_weights(model, dtype)
    hint = torch.rand(batch_size, 4, size, size, device=device)
    graphs = GraphCache() if cuda_graph and device.type == "cuda" else None
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, cache_enabled=False):
        cond = model.prepare_condition(hint, context=model.get_learned_conditioning([""]).expand(batch_size, -1, -1),
                                       ref_latent=model.encode_first_stage(hint[:, :3] * 2 - 1))

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            P.sample_latents(model, cond, P.clip_generator(0), 1, graphs=graphs)

    return step


def profile_steps(step, steps: int, warmup: int, device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / steps
    by_name, by_kind = defaultdict(float), defaultdict(float)
    if device.type == "cuda":  # kernels: every device event is one, with its own time
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                by_name[e.name] += e.device_time_total
    else:  # operators' own CPU time (nested calls excluded)
        for e in prof.key_averages():
            by_name[e.key] += e.self_cpu_time_total
    for name, t in by_name.items():
        by_kind[kind(name)] += t
    busy = sum(by_name.values()) / 1e6 / steps  # profiler times are in microseconds
    return {"wall_s": wall, "busy_s": busy,
            "kinds": {k: v / 1e6 / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [(n, v / 1e6 / steps) for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])]}


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "sample"], help="a training step or one DDIM sampling step")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model YAML (default: the real SD2.1 config)")
    p.add_argument("--size", type=positive_int, default=512,
                   help="image side in pixels, a multiple of the model's (64 for SD2.1) (default: 512)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per step (default: 8)")
    p.add_argument("--steps", type=positive_int, default=5, help="profiled steps (default: 5)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="steps before profiling (default: 3)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="train: gradient checkpointing (default: off)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="sample: replay the step from a CUDA graph (default: on; CUDA only)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if present, else cpu), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--top", type=non_negative_int, default=15, help="kernels listed (default: 15)")
    # default=[]: else argparse lists the optional overrides as required when `what` is missing
    p.add_argument("overrides", nargs="*", type=config_override, default=[], metavar="key=value",
                   help="config overrides")
    return run_cli(PROG, run, p.parse_args(argv), errors=(ConfigError, ValueError))


def run(a: argparse.Namespace) -> int:
    device = resolve_device(a.device)
    check_sides(a.config, a.overrides, size=a.size)  # and the config, before building the model
    if a.what == "train":
        step = train_step(a.config, a.size, a.batch_size, a.checkpointing, device, a.overrides)
    else:
        step = sample_step(a.config, a.size, a.batch_size, a.cuda_graph, device, a.overrides)
    r = profile_steps(step, a.steps, a.warmup, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    unit = "device" if device.type == "cuda" else "CPU operator"
    print(f"# {a.what}, {Path(a.config).name}, {a.size}px, batch {a.batch_size}, {where}, torch {torch.__version__}")
    print(f"wall {1000 * r['wall_s']:.1f} ms/step; {unit} time {1000 * r['busy_s']:.1f} ms/step "
          f"({100 * r['busy_s'] / r['wall_s']:.0f} % of wall)")
    print(f"| kind | ms/step | share of {unit} time |\n|---|---:|---:|")
    for k, v in r["kinds"].items():
        print(f"| {k} | {1000 * v:.2f} | {100 * v / r['busy_s']:.1f} % |")
    print(f"\ntop {a.top}:")
    for name, v in r["top"][:a.top]:
        print(f"  {1000 * v:8.2f} ms  {kind(name):20s} {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
