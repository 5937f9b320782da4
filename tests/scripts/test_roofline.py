"""benchmarks/roofline.py: FLOPs and least bytes per operator, and the floors built from them."""
import pytest
import torch

from benchmarks import flops, roofline, train_flops
from cldm.config import TINY_CONFIG


def traced(fn, *args):
    rec = roofline.OpTrace()
    with rec:
        fn(*args)
    return rec.ops


def test_bytes_and_flops_of_single_operators_by_hand():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    [add] = traced(torch.add, a, a.clone())
    assert add.bytes == 3 * 8 * 16 * 4 and add.flops == 0  # two float32 inputs read, one output written
    [mm] = traced(torch.mm, a, b)
    assert mm.flops == 2 * 8 * 16 * 4 and mm.bytes == 4 * (8 * 16 + 16 * 4 + 8 * 4)
    [same] = traced(torch.add, a, a)
    assert same.bytes == 2 * 8 * 16 * 4  # one tensor passed twice is read once
    [bias] = traced(torch.add, a, torch.randn(16).expand(8, 16))
    assert bias.bytes == 4 * (8 * 16 + 16 + 8 * 16)  # a broadcast row is read once
    [inplace] = traced(lambda x: x.mul_(2.0), a.clone())
    assert inplace.bytes == 2 * 8 * 16 * 4  # read, then written back
    [cast] = traced(lambda x: x.to(torch.bfloat16), a)
    assert cast.bytes == 8 * 16 * (4 + 2) and roofline.kind(cast.name) == "casts"
    # views, including those not flagged as views, move nothing
    assert traced(lambda x: (x.view(128), x.t(), torch.ops.aten._unsafe_view(x, [128])), a) == []


def test_floors_by_hand():
    ops = [roofline.Op("aten.mm.default", 4e12, 1e9), roofline.Op("aten.mm.default", 1e9, 6e9),
           roofline.Op("aten.add.Tensor", 0, 3e9)]
    f = roofline.floors(ops, trainable=1000, tflops=1000, tbps=3)
    # mm: 4 ms of arithmetic (its 1 GB would take 0.33 ms); the second mm is memory-bound: 2 ms;
    # add: 1 ms; AdamW: 28 bytes per trainable parameter
    assert f["matrix_floor_s"] == pytest.approx(4e-3 + 2e-3, rel=1e-12)
    assert f["eager_floor_s"] == pytest.approx(4e-3 + 2e-3 + 1e-3 + 28e3 / 3e12, rel=1e-12)
    assert f["model_flops"] == 4e12 + 1e9


def test_tiny_config_flops_match_the_flop_benchmarks():
    size, batch = 64, 2
    ops, trainable = roofline.trace("train", TINY_CONFIG, size, batch)
    model_flops = sum(op.flops - op.recompute for op in ops)
    expected = train_flops.training_flops(TINY_CONFIG, size)["total"] * batch
    # The fused attention backward also computes key/value gradients of cross-attention that the
    # meta count (unfused, autograd computes only what is needed) leaves out: 0.49 % here.
    assert model_flops == pytest.approx(expected, rel=1e-2) and model_flops >= expected
    assert sum(op.recompute for op in ops) > 0  # flash backward's QK^T, not model work
    assert trainable > 0 and any(roofline.kind(op.name) == "casts" for op in ops)  # autocast ran

    parts = flops.sampling_flops(TINY_CONFIG, size=size, steps=1)
    step, _ = roofline.trace("step", TINY_CONFIG, size, batch)
    assert sum(op.flops for op in step) == batch * (parts["controlnet_step"] + parts["unet_step"])
    decode, _ = roofline.trace("decode", TINY_CONFIG, size, batch)
    assert sum(op.flops for op in decode) == batch * parts["vae_decode"]


def test_cli_prints_both_floors(capsys):
    assert roofline.main(["sample", "--config", str(TINY_CONFIG), "--size", "64", "--batch-size", "1",
                          "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "one DDIM step" in out and "VAE decode" in out
    assert "eager floor:" in out and "matrix floor:" in out and "frames/s at 2 steps" in out
    assert "0.0 ms" not in out  # the tiny config's floors, under 1 ms, read 0.0 at one decimal


def test_milliseconds_keep_three_digits_below_one():
    assert [roofline._ms(s) for s in (0.2453, 1.5, 0.001, 4.2e-6, 2.46e-6)] == ["245.3", "1500.0", "1.0", "0.0042",
                                                                               "0.00246"]
