"""benchmarks/profile_step.py on the tiny config (CPU): the table adds up, the kinds are named."""
import pytest

from benchmarks import profile_step as ps
from cldm.config import TINY_CONFIG


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_f16f16_f32", "matmul/conv"), ("aten::convolution_backward", "matmul/conv"),
    ("flash_fwd_kernel", "attention"), ("void at::native::vectorized_elementwise_kernel<4, ...>", "element-wise/reduce"),
    ("aten::native_group_norm", "normalisation"), ("aten::_to_copy", "copies/casts"), ("aten::empty", "other"),
])
def test_kernel_kinds(name, kind):
    assert ps.kind(name) == kind


@pytest.mark.parametrize("what", ["train", "sample"])
def test_profile_on_cpu_adds_up(what, capsys):
    import torch

    device = torch.device("cpu")
    make = ps.train_step if what == "train" else ps.sample_step
    step = make(TINY_CONFIG, 64, 2, False, device)
    r = ps.profile_steps(step, steps=1, warmup=1, device=device)
    assert r["wall_s"] > 0 and 0 < r["busy_s"]
    assert sum(r["kinds"].values()) == pytest.approx(r["busy_s"], rel=1e-9)
    assert sum(t for _, t in r["top"]) == pytest.approx(r["busy_s"], rel=1e-9)
    assert r["kinds"].get("matmul/conv", 0) > 0
