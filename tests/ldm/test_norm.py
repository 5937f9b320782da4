"""GroupNorm32: statistics in float32 whatever the input dtype."""
import torch
import torch.nn.functional as F

from ldm.modules.norm import GroupNorm32


@torch.no_grad()
def test_half_input_is_normalised_in_float32_then_cast_back():
    """Bit for bit the float32 result rounded once to the input's dtype (CPU's bf16 kernel differs
    from it in the last place on some elements), with float32 affine parameters."""
    torch.manual_seed(0)
    norm = GroupNorm32(32, 64, eps=1e-6)
    norm.weight.normal_()
    norm.bias.normal_()
    x = (torch.randn(2, 64, 32, 32) * 0.01 + 10).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-6).to(torch.bfloat16)
    assert torch.equal(y, expected)
