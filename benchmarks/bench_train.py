#!/usr/bin/env python3
"""Training throughput: samples/s, peak memory and model FLOPs utilisation (MFU).

Times the real training step (ColorControlModule.compute_loss, backward, AdamW step) on
synthetic batches, without Lightning or data loading, so it measures the model's speed
alone. MFU = (model FLOPs per sample, counted on the meta device without recompute, see
train_flops.py) x samples/s / the device's peak; the peak comes from the table below or
--peak-tflops.

  python benchmarks/bench_train.py --batch-size 16                          # GPU, real config, 512
  python benchmarks/bench_train.py --config models/cldm_tiny_color.yaml --size 64 --device cpu \\
      --precision 32 --batch-size 2
"""
from __future__ import annotations

import argparse
import datetime
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.cliargs import HelpFormatter, check_sides, json_problem, write_json  # noqa: E402
from benchmarks.experiments import SDPA_BACKENDS, sdpa_backend  # noqa: E402
from benchmarks.train_flops import build_module, synthetic_batch, training_flops  # noqa: E402
from cldm.config import DEFAULT_CONFIG, ConfigError, load_config  # noqa: E402
from cliutil import (OneLineParser, config_override, non_negative_int, positive_float, positive_int,  # noqa: E402
                     run_cli)
from colorize.loading import resolve_device  # noqa: E402

PROG = "bench_train.py"

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, which
# print the 2:4-sparsity figure (twice these) as the headline. Matched by substring of
# torch.cuda.get_device_name(), most specific first.
PEAK_BF16_TFLOPS = [
    ("h200 nvl", 835.0),   # H200 NVL
    ("h200", 989.4),       # H200 SXM
    ("h100 nvl", 835.0),   # H100 NVL
    ("h100 pcie", 756.0),  # H100 PCIe
    ("h100", 989.4),       # H100 SXM5
    ("a100", 312.0),       # A100 SXM4 and PCIe
    ("a6000", 154.8),      # RTX A6000 (FP32 accumulate)
]


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU, or fp32 where TF32/FP32 peaks differ)."""
    if device.type != "cuda" or precision == "32":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def train_step_fn(config, size: int, batch_size: int, precision: str, latent_cache: bool, checkpointing: bool,
                  device: torch.device, compile: bool = False, overrides=(), channels_last: bool = False):
    """The measured training step, as a function: loss under autocast, backward, AdamW step, on a
    synthetic batch already on `device` (the blank-prompt embedding computed beforehand).
    `channels_last`: the model's 4-D weights in NHWC order (an experiment: not used in training)."""
    module = build_module(config, overrides, checkpointing, device, compile=compile).to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    opt = module.configure_optimizers()["optimizer"]
    batch = synthetic_batch(module.model, batch_size, size, latent_cache, device)
    module.context([""])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step():
        with autocast:
            loss = module.compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench(config=DEFAULT_CONFIG, size=512, batch_size=8, steps=10, warmup=3, precision="bf16-mixed",
          latent_cache=True, checkpointing=None, compile=False, device=None, overrides=(),
          peak=None, channels_last=False) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(config, overrides)
    ckpt = cfg.model.unet.use_checkpoint if checkpointing is None else checkpointing
    step = train_step_fn(config, size, batch_size, precision, latent_cache, ckpt, device, compile, overrides,
                         channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    flops = training_flops(config, size, latent_cache, checkpointing=False, overrides=overrides)["total"]
    sps = batch_size / dt
    peak = peak or peak_tflops(device, precision)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**30
        mem_kind = "peak allocated GPU memory"
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        mem_kind = "peak process RSS"
    return {"device": device_name(device), "date": datetime.date.today().isoformat(),
            "config": Path(config).name, "size": size, "batch_size": batch_size, "precision": precision,
            "latent_cache": latent_cache, "checkpointing": bool(ckpt), "compile": compile,
            "channels_last": channels_last, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "step_s": dt, "samples_per_s": sps, "model_tflop_per_sample": flops / 1e12,
            "achieved_tflops": flops * sps / 1e12, "peak_tflops": peak,
            "mfu": flops * sps / (peak * 1e12) if peak else None, "memory_gib": mem, "memory_kind": mem_kind}


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model YAML")
    p.add_argument("--size", type=positive_int, default=512,
                   help="training crop (pixels; a multiple of the model's, 64 for SD2.1)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per step")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="bf16-mixed",
                   help="float32, or bf16 autocast as training runs")
    p.add_argument("--latent-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="latents from the cache or the VAE encode inside the step")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (default: the config's unet.use_checkpoint)")
    p.add_argument("--compile", action="store_true", help="torch.compile ControlNet and UNet")
    p.add_argument("--channels-last", action="store_true", help="experiment: NHWC weights and activations")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="experiment: let cuDNN time its convolution algorithms (torch.backends.cudnn.benchmark)")
    p.add_argument("--sdpa", choices=["auto", *SDPA_BACKENDS], default="auto",
                   help="experiment: one scaled_dot_product_attention backend for the attention of ControlNet "
                        "and UNet (auto: torch's choice; the text encoder and VAE keep torch's choice); a backend "
                        "that cannot run their shapes fails")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU intra-op threads (default: torch's); on a shared machine 1 avoids stalls")
    p.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="device peak (TFLOP/s) for MFU if not in the table")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("overrides", nargs="*", type=config_override, metavar="key=value", help="config overrides")
    a = p.parse_args(argv)
    problem = json_problem(a.json)
    if problem:
        p.error(problem)
    return run_cli(PROG, run, a, errors=(ConfigError, ValueError))


def run(a: argparse.Namespace) -> int:
    device = resolve_device(a.device)
    check_sides(a.config, a.overrides, size=a.size)  # and the config: before minutes of building and timing
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    with sdpa_backend(a.sdpa):
        r = bench(a.config, a.size, a.batch_size, a.steps, a.warmup, a.precision, a.latent_cache, a.checkpointing,
                  a.compile, device, a.overrides, a.peak_tflops, a.channels_last)
    r["sdpa"] = a.sdpa
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (no known peak)"
    print(f"{r['device']}, {r['date']}: {r['config']} {r['size']}px, batch {r['batch_size']}, precision {r['precision']}, "
          f"latent cache {r['latent_cache']}, checkpointing {r['checkpointing']}, compile {r['compile']}, "
          f"channels_last {r['channels_last']}, cudnn.benchmark {r['cudnn_benchmark']}, SDPA {r['sdpa']}\n"
          f"  {r['samples_per_s']:.2f} samples/s ({1000 * r['step_s']:.0f} ms/step), "
          f"{r['memory_gib']:.2f} GiB {r['memory_kind']}\n"
          f"  {r['model_tflop_per_sample']:.4f} TFLOP/sample -> {r['achieved_tflops']:.4f} TFLOP/s, MFU {mfu}")
    if a.json:
        write_json(a.json, r)
    return 0

if __name__ == "__main__":
    sys.exit(main())
