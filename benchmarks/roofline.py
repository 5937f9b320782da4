#!/usr/bin/env python3
"""Roofline floor of a training step or a sampling step, from an operator trace, without a GPU.

Traces the step that bench_train.py / bench_inference.py time (real config, bf16 autocast,
latent cache; or one DDIM step and the VAE decode with half-precision weights: bf16 here, as
fp16 moves the same bytes) on fake tensors, so the SD2.1 config at
512 costs no memory, and records every aten operator with its FLOPs (torch's own formulas)
and the bytes it must move at the least (each tensor argument read once, each output or
mutated argument written once; views move nothing). Each operator's floor is then
max(FLOPs / matrix rate, bytes / memory bandwidth) for matrix work (convolutions, matmuls,
attention) and bytes / bandwidth for the rest, as if every kernel ran at its roofline.

Two bounds for the measured step to be read against:
- eager floor: the sum of all operators' floors, one kernel each, as eager PyTorch runs them;
- matrix floor: the matrix operators alone, as if everything around them fused away for free.
The matrix floor bounds what torch.compile or hand-fused kernels can reach; the gap between
the two is memory traffic of element-wise work (norms, activations, casts, adds).

Ceilings default to what was measured on this workplace's lent GPUs (the lending service's
notes, KINDS.md, not in this repo: an 8192^3 bf16 matmul on random data, and a
device-to-device copy counting read + write):
H200 788 TFLOP/s and 4.3 TB/s; H100 798 TFLOP/s and 3.0 TB/s, not in those notes as they
stand now (no H100 was lent to this project): an assumption. MFU uses the datasheet peak
(989.4 TFLOP/s dense bf16 on both), as bench_train.py does. The optimiser is added by
formula as one fused AdamW pass (float32 weight, grad and two moments read, three written).
Casts run on the fake CPU's autocast, whose op list covers convolutions, matmuls and
attention like CUDA's does.

  python benchmarks/roofline.py train --batch-size 16          # ~25 s on 2 cores
  python benchmarks/roofline.py sample --batch-size 8 --gpu h200
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_train import PEAK_BF16_TFLOPS  # noqa: E402
from benchmarks.cliargs import check_sides  # noqa: E402
from cldm.config import DEFAULT_CONFIG, ConfigError  # noqa: E402
from cliutil import OneLineParser, config_override, positive_float, positive_int, run_cli  # noqa: E402

PROG = "roofline.py"


def _ms(seconds: float) -> str:
    """Milliseconds to 0.1 ms, or to 3 significant digits below 1 ms (the tiny config's floors
    all read 0.0 at one decimal)."""
    ms = 1e3 * seconds
    return f"{ms:.1f}" if ms >= 1 else f"{ms:.3g}"

# Ceilings (TFLOP/s bf16 matmul, TB/s copy): H200 as the lending service's KINDS.md records it
# (2026-10-28 and 2026-11-04); H100 assumed (see the module doc).
CEILINGS = {"h100": (798.0, 3.0), "h200": (788.0, 4.3)}
ADAMW_BYTES_PER_PARAM = 7 * 4  # fused AdamW: read weight, grad, exp_avg, exp_avg_sq; write three


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


# The fused CPU attention kernels that fake CPU tensors dispatch to have no formula in torch.
FLOPS = dict(flop_counter.flop_registry)
FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = flop_counter.shape_wrapper(_sdpa_cpu_flops)
FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
    flop_counter.shape_wrapper(_sdpa_cpu_backward_flops)


def kind(op_name: str) -> str:
    """Which row an aten operator goes to; 'matrix' rows run on the tensor cores."""
    if "scaled_dot_product" in op_name:
        return "matrix: attention"
    if "convolution" in op_name:
        return "matrix: convolution"
    if op_name.split(".")[1] in ("mm", "addmm", "bmm", "baddbmm"):
        return "matrix: matmul"
    if "norm" in op_name:
        return "normalisation"
    if "_to_copy" in op_name:
        return "casts"
    if any(s in op_name for s in ("cat", "clone", "copy", "upsample", "slice_backward")):
        return "copies, concat, resize"
    return "element-wise, reductions"


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the storage itself, shared by all its views


def _nbytes(tensors) -> int:
    """Bytes of the distinct tensors given; a broadcast (stride 0) dimension is read once."""
    seen, total = set(), 0
    for t in tensors:
        key = (_storage(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            total += math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()
    return total


@dataclass
class Op:
    name: str
    flops: int  # hardware FLOPs: what the kernel computes
    bytes: int
    recompute: int = 0  # of those, recomputed forward work (flash attention's backward redoes QK^T)


class OpTrace(TorchDispatchMode):
    """Records name, FLOPs and least bytes of every aten operator that moves data."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "aten" or func.is_view:
            return out
        schema = func._schema.arguments
        inputs = _tensors((args, kwargs))
        written = [a for a, s in zip(args, schema) if s.alias_info is not None and s.alias_info.is_write]
        written += [kwargs[s.name] for s in schema if s.name in kwargs and s.alias_info is not None
                    and s.alias_info.is_write]
        if not written and {_storage(t) for t in _tensors(out)} <= {_storage(t) for t in inputs}:
            return out  # a view in all but name (e.g. _unsafe_view): nothing moves
        moved = _nbytes(inputs) + _nbytes(_tensors(out) + _tensors(written))
        if moved == 0:
            return out
        fn = FLOPS.get(func._overloadpacket)
        flops = fn(*args, **kwargs, out_val=out) if fn is not None else 0
        recompute = 0
        if "scaled_dot_product" in str(func) and "backward" in str(func):
            (b, h, s_q, d), s_k = args[1].shape, args[2].shape[2]
            recompute = flop_counter.bmm_flop((b * h, s_q, d), (b * h, d, s_k))
        self.ops.append(Op(str(func), int(flops), moved, recompute))
        return out


def trace(what: str, config=DEFAULT_CONFIG, size: int = 512, batch_size: int = 16,
          overrides=()) -> tuple[list[Op], int]:
    """(operators, trainable parameters) of one `what` on fake CPU tensors under bf16 autocast.

    train: loss (latent cache) and backward, as bench_train.py's step without the optimiser.
    step: the denoiser call of one DDIM step (ControlNet + UNet), and decode: the VAE decode
    of the final latents, both with the weights held in half precision as colorize_inference.py
    holds them. The DDIM update itself is a few latent-size element-wise operations, left out.
    """
    from benchmarks.train_flops import build_module, synthetic_batch
    from cldm.config import load_config
    from cldm.model import create_model
    from colorize.loading import cast_weights

    cpu = torch.device("cpu")
    rec = OpTrace()
    if what == "train":
        with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
            module = build_module(config, overrides, checkpointing=False, device=cpu)
            batch = synthetic_batch(module.model, batch_size, size, latent_cache=True, device=cpu)
            module.context([""])  # once per run, not per step
            with rec:
                module.compute_loss(batch).backward()
        return rec.ops, sum(p.numel() for p in module.parameters() if p.requires_grad)

    with torch.device("meta"):  # cast on meta: fake parameters cannot be converted in place
        model = create_model(load_config(config, overrides)).eval().requires_grad_(False)
    cast_weights(model, torch.bfloat16)
    lat = size // model.latent_factor
    with FakeTensorMode(allow_non_fake_inputs=True), torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model.to_empty(device=cpu)
        x = torch.randn(batch_size, model.latent_channels, lat, lat)
        if what == "decode":
            with rec:
                model.decode_first_stage(x)
            return rec.ops, 0
        context_dim = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
        cond = model.prepare_condition(torch.rand(batch_size, 4, size, size),
                                       context=torch.randn(batch_size, 77, context_dim),
                                       ref_latent=torch.randn(batch_size, model.latent_channels, lat, lat))
        with rec:
            model.apply_model(x, torch.full((batch_size,), 500), cond)
    return rec.ops, 0


def floors(ops: list[Op], trainable: int, tflops: float, tbps: float) -> dict:
    """Per-kind FLOPs, bytes and floor seconds; plus the eager and matrix floors."""
    rows = defaultdict(lambda: {"ops": 0, "flops": 0, "bytes": 0, "floor_s": 0.0})
    for op in ops:
        k = kind(op.name)
        r = rows[k]
        t_mem = op.bytes / (tbps * 1e12)
        r["floor_s"] += max(op.flops / (tflops * 1e12), t_mem) if k.startswith("matrix") else t_mem
        r["ops"] += 1
        r["flops"] += op.flops
        r["bytes"] += op.bytes
    if trainable:
        b = trainable * ADAMW_BYTES_PER_PARAM
        rows["optimizer (fused AdamW, by formula)"] = {"ops": 1, "flops": 0, "bytes": b, "floor_s": b / (tbps * 1e12)}
    rows = dict(sorted(rows.items(), key=lambda kv: -kv[1]["floor_s"]))
    matrix = sum(r["floor_s"] for k, r in rows.items() if k.startswith("matrix"))
    return {"rows": rows, "model_flops": sum(op.flops - op.recompute for op in ops),
            "eager_floor_s": sum(r["floor_s"] for r in rows.values()), "matrix_floor_s": matrix}


def print_rows(title: str, f: dict) -> None:
    print(f"\n{title}\n| kind | ops | GFLOP | GB moved | floor ms | share of eager floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, r in f["rows"].items():
        print(f"| {k} | {r['ops']} | {r['flops'] / 1e9:.0f} | {r['bytes'] / 1e9:.2f} | {1e3 * r['floor_s']:.2f} | "
              f"{100 * r['floor_s'] / f['eager_floor_s']:.1f} % |")
    print()


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "sample"],
                   help="a training step (loss, backward, AdamW), or sampling: one DDIM step and the VAE decode")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model YAML (default: the real SD2.1 config)")
    p.add_argument("--size", type=positive_int, default=512,
                   help="image side in pixels, a multiple of the model's (64 for SD2.1) (default: 512)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="samples per step (default: 16)")
    p.add_argument("--steps", type=positive_int, default=20,
                   help="sample: DDIM steps per frame, for frames/s (default: 20)")
    p.add_argument("--gpu", choices=sorted(CEILINGS), default="h100", help="whose measured ceilings (default: h100)")
    p.add_argument("--tflops", type=positive_float, default=None, help="matrix rate in TFLOP/s instead of --gpu's")
    p.add_argument("--tbps", type=positive_float, default=None, help="memory bandwidth in TB/s instead of --gpu's")
    # default=[]: else argparse lists the optional overrides as required when `what` is missing
    p.add_argument("overrides", nargs="*", type=config_override, default=[], metavar="key=value",
                   help="config overrides")
    return run_cli(PROG, run, p.parse_args(argv), errors=(ConfigError, ValueError))


def run(a: argparse.Namespace) -> int:
    check_sides(a.config, a.overrides, size=a.size)  # and the config, before the trace
    tflops, tbps = CEILINGS[a.gpu]
    tflops, tbps = a.tflops or tflops, a.tbps or tbps
    peak = dict(PEAK_BF16_TFLOPS)[a.gpu]
    ceilings = f"{tflops:g} TFLOP/s, {tbps:g} TB/s ({a.gpu if a.tflops is None and a.tbps is None else 'given'})"
    print(f"# {a.what}, {Path(a.config).name}, {a.size}px, batch {a.batch_size}; ceilings {ceilings}; "
          f"torch {torch.__version__}")
    if a.what == "train":
        f = floors(*trace("train", a.config, a.size, a.batch_size, a.overrides), tflops, tbps)
        print_rows("training step: loss, backward, AdamW", f)
        for name in ("eager", "matrix"):
            t = f[name + "_floor_s"]
            print(f"{name} floor: {_ms(t)} ms/step, {a.batch_size / t:.1f} samples/s, MFU at most "
                  f"{100 * f['model_flops'] / t / (peak * 1e12):.0f} % of {peak:g} TFLOP/s")
        return 0
    step = floors(*trace("step", a.config, a.size, a.batch_size, a.overrides), tflops, tbps)
    decode = floors(*trace("decode", a.config, a.size, a.batch_size, a.overrides), tflops, tbps)
    print_rows("one DDIM step: ControlNet + UNet", step)
    print_rows("VAE decode", decode)
    for name in ("eager", "matrix"):
        key = name + "_floor_s"
        t = a.steps * step[key] + decode[key]
        flops = a.steps * step["model_flops"] + decode["model_flops"]
        print(f"{name} floor: {_ms(step[key])} ms/step, {_ms(decode[key])} ms decode: "
              f"{a.batch_size / t:.1f} frames/s at {a.steps} steps (GPU work alone), MFU at most "
              f"{100 * flops / t / (peak * 1e12):.0f} % of {peak:g} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
