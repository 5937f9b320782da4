"""benchmarks/flops.py: the FLOP count of one sampled frame adds up, attention included."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_inference, flops, train_flops
from cldm.config import TINY_CONFIG
from ldm.modules.attention import CrossAttention
from tests.helpers import refused


def test_tiny_config_measured_total_is_the_sum_of_its_parts():
    steps, size = 2, 64
    p = flops.sampling_flops(TINY_CONFIG, size=size, steps=steps)  # meta device, like the real benchmark
    # The measured end-to-end run (prompt, reference encode, hint block, DDIM, decode) ...
    assert p["ours_measured"] == (p["text_encoder"] + p["vae_encode_reference"] + p["hint_block"]
                                  + steps * (p["controlnet_step"] + p["unet_step"]) + p["vae_decode"])
    assert p["ours_measured"] == p["ours_total"] == 1_272_769_664
    assert all(p[k] > 0 for k in ("text_encoder", "vae_encode_reference", "hint_block", "controlnet_step",
                                  "unet_step", "vae_decode"))

    # The hint block by hand: 3x3 convs, 2 FLOPs per multiply-add, output size after each stride.
    hint_convs = [m for m in flops.meta_model(TINY_CONFIG).control_model.input_hint_block if hasattr(m, "weight")]
    side, expected = size, 0
    for conv in hint_convs:
        side //= conv.stride[0]
        expected += 2 * conv.in_channels * conv.out_channels * 9 * side * side
    assert p["hint_block"] == expected

    # Attention by hand: per SDPA call, QK^T and AV each cost 2 * B * Lq * Lk * inner FLOPs.
    model = flops.meta_model(TINY_CONFIG, device="cpu")
    calls = []

    def record(module, args, kwargs, out):
        x, context = args[0], (args[1] if len(args) > 1 else kwargs.get("context"))
        lk = x.shape[1] if context is None else context.shape[1]
        calls.append(4 * x.shape[0] * x.shape[1] * lk * module.to_q.out_features)

    for m in model.modules():
        if isinstance(m, CrossAttention):
            m.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        hint = torch.rand(1, 4, size, size)
        cond = model.prepare_condition(hint, context=torch.zeros(1, 77, 32))
        x = torch.zeros(1, 4, size // 8, size // 8)
        control = model.control_model(torch.cat([x, cond.concat], 1), cond.guided_hint, torch.tensor([5]), cond.context)
        n_control = len(calls)
        model.model.diffusion_model(torch.cat([x, cond.concat], 1), torch.tensor([5]), cond.context, control=control)
    assert n_control == 6 and len(calls) == 20  # ControlNet: 3 transformer blocks; UNet: 7; 2 attentions each
    assert p["controlnet_step_attention"] == sum(calls[:n_control]) == 1_618_944
    assert p["unet_step_attention"] == sum(calls[n_control:]) == 4_690_944


def test_cpu_count_includes_attention_like_meta():
    """On CPU tensors SDPA runs a fused kernel torch has no FLOP formula for; flops.py adds one."""
    q = torch.randn(1, 2, 64, 16)
    total, attention = flops._flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert total == attention == 4 * 2 * 64 * 64 * 16
    counts = {}
    for device in ("meta", "cpu"):
        unet = flops.meta_model(TINY_CONFIG, device=device).model.diffusion_model
        with torch.device(device), torch.no_grad():
            args = torch.zeros(1, 9, 8, 8), torch.tensor([5]), torch.zeros(1, 77, 32)
            counts[device] = flops._flops(lambda: unet(*args))
    assert counts["cpu"] == counts["meta"] == (55_432_192, 4_690_944)


BAD_MODEL_ARGUMENTS = [
    (["--size", "0"], "argument --size: expected an integer >= 1"),
    (["--size", "60"], "--size 60: must be a positive multiple of 64 for cldm_v21_color.yaml"),
    (["--size", "48"], "--size 48: must be a positive multiple of 64"),
    (["--config", str(TINY_CONFIG), "--size", "48"], "--size 48: must be a positive multiple of 32"),
    (["--config", "nope.yaml"], "config not found: nope.yaml"),
    (["nope"], "override must look like key=value"),
    (["model.nope=1"], "bad override"),
]


@pytest.mark.parametrize("argv, says", BAD_MODEL_ARGUMENTS + [
    (["--steps", "0"], "argument --steps: expected an integer >= 1"),
    (["--steps", "600"], "steps must be between 1 and 500"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_flops_refuses_bad_arguments_in_one_line(argv, says, capsys):
    assert says in refused(flops.main, argv, capsys)


@pytest.mark.parametrize("argv, says", BAD_MODEL_ARGUMENTS)
def test_train_flops_refuses_bad_arguments_in_one_line(argv, says, capsys):
    assert says in refused(train_flops.main, argv, capsys)


def test_flops_cli_counts_the_tiny_config(capsys):
    """The count the library gives for these flags (1_272_769_664, test above), in GFLOP to 3 places."""
    assert flops.main(["--config", str(TINY_CONFIG), "--size", "64", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# cldm_tiny_color.yaml, 64x64, 2 DDIM steps, batch 1, ")
    rows = dict(line.split(None, 1) for line in lines[1:] if not line.startswith("original /"))
    assert rows["ours_total"] == rows["ours_measured"] == "1.273 GFLOP"
    assert rows["controlnet_step"] == "0.017 GFLOP" and rows["unet_step"] == "0.055 GFLOP"


BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def benchmarks_text() -> str:
    return " ".join(BENCHMARKS.read_text().split())  # a figure may sit across a line break


def test_the_real_config_training_flops_are_those_benchmarks_md_records():
    """The MFU basis (2.577 TFLOP a sample of SD2.1 at 512 with the latent cache), counted again on
    the meta device (seconds): BENCHMARKS.md's row is what the code counts now, and no VAE
    encode is in the step."""
    f = train_flops.training_flops()
    assert f["fwd VAE encode"] == 0 and f["forward"] + f["backward"] == f["total"]
    row = (f"| **latent cache** (the MFU basis) | {f['forward'] / 1e12:.3f} | {f['backward'] / 1e12:.3f} | "
           f"**{f['total'] / 1e12:.3f}** |")
    assert row in benchmarks_text(), row


@pytest.mark.slow
def test_the_real_config_inference_flops_are_those_benchmarks_md_records():
    """24.0 TFLOP a 512x512 frame (20 DDIM steps), and its parts, counted again on the meta device
    (about a minute): the figures BENCHMARKS.md gives are what the code counts now."""
    f = {k: v / 1e12 for k, v in bench_inference.pipeline_flops().items()}
    text = benchmarks_text()
    for said in (f"(fixed {f['fixed, per frame']:.3f}, recursive {f['recursive / anchored, per frame']:.3f}, "
                 f"ref-guidance {f['fixed with --ref-guidance, per frame']:.3f} TFLOP)",
                 f"one step (ControlNet + UNet) {f['one DDIM step (ControlNet + UNet)']:.3f} TFLOP",
                 f"VAE decode {f['VAE decode']:.3f}, VAE encode {f['VAE encode of a reference']:.3f}",
                 f"hint block {f['hint block']:.3f}, text encoder {f['text encoder (once per clip)']:.3f}"):
        assert said in text, said
