"""ControlNet and the controlled UNet against the reference implementation's golden outputs."""
import pytest
import torch

from cldm.controlnet import ControlledUnetModel, ControlNet
from tests.helpers import COMPONENT_TOL, sub_state
from tests.ldm.reference_arch import unet_kwargs


def _nets(tiny_arch, tiny_weights):
    unet = ControlledUnetModel(**unet_kwargs(tiny_arch))
    control = ControlNet(hint_channels=tiny_arch["control_extra"]["hint_channels"],
                         **unet_kwargs(tiny_arch, controlnet=True))
    unet.load_state_dict(sub_state(tiny_weights, "model.diffusion_model."), strict=True)
    control.load_state_dict(sub_state(tiny_weights, "control_model."), strict=True)
    return unet, control


@torch.no_grad()
def test_control_outputs_and_controlled_eps_match_reference(tiny_arch, tiny_weights, tiny_io):
    unet, control = _nets(tiny_arch, tiny_weights)
    x, t, ctx = tiny_io["x"], tiny_io["t"], tiny_io["context"]
    outs = control(x, control.encode_hint(tiny_io["hint"]), t, ctx)
    names = sorted(k for k in tiny_io if k.startswith("control_"))
    assert len(outs) == len(names) == len(control.input_blocks) + 1
    for out, name in zip(outs, names):
        torch.testing.assert_close(out, tiny_io[name], **COMPONENT_TOL, msg=name)
    torch.testing.assert_close(unet(x, t, ctx, control=outs), tiny_io["eps_controlled"], **COMPONENT_TOL)


def test_hint_block_downsamples_by_8_and_starts_at_zero(tiny_arch):
    control = ControlNet(hint_channels=4, **unet_kwargs(tiny_arch, controlnet=True))
    feats = control.encode_hint(torch.rand(2, 4, 64, 48))
    assert feats.shape == (2, tiny_arch["unet"]["model_channels"], 8, 6)
    assert torch.count_nonzero(feats) == 0  # last conv is zero-initialised
    outs = control(torch.randn(2, 4, 8, 6), feats, torch.tensor([5, 500]), torch.randn(2, 77, 32))
    assert all(torch.count_nonzero(o) == 0 for o in outs)  # zero convs


def test_only_mid_control_uses_only_the_last_residual(tiny_arch, tiny_weights, tiny_io):
    unet, control = _nets(tiny_arch, tiny_weights)
    x, t, ctx = tiny_io["x"], tiny_io["t"], tiny_io["context"]
    with torch.no_grad():
        outs = control(x, control.encode_hint(tiny_io["hint"]), t, ctx)
        mid_only = unet(x, t, ctx, control=outs, only_mid_control=True)
        zeros_but_mid = [torch.zeros_like(o) for o in outs[:-1]] + [outs[-1]]
        torch.testing.assert_close(mid_only, unet(x, t, ctx, control=zeros_but_mid), rtol=0, atol=1e-6)
        assert not torch.allclose(mid_only, tiny_io["eps_controlled"])


def test_controlnet_takes_only_its_own_arguments(tiny_arch):
    kw = unet_kwargs(tiny_arch, controlnet=True)
    with pytest.raises(TypeError, match="out_channels"):
        ControlNet(hint_channels=4, out_channels=4, **kw)  # it has no output conv
    with pytest.raises(TypeError, match="use_checkpint"):
        ControlNet(hint_channels=4, use_checkpint=True, **kw)
    with pytest.raises(ValueError, match="use_linear_in_transformer=false"):
        ControlNet(hint_channels=4, **{**kw, "use_linear_in_transformer": False})


def test_the_unet_encoder_builds_a_graph_only_when_it_trains(tiny_arch, tiny_weights, tiny_io):
    """The encoder runs with grad only in grad mode and when one of its parameters trains (new
    input channels): then their gradient arrives; frozen, or under no_grad, it builds none."""
    unet, _ = _nets(tiny_arch, tiny_weights)
    unet.requires_grad_(False)
    seen = []
    unet.input_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(torch.is_grad_enabled()))
    x, t, ctx = tiny_io["x"], tiny_io["t"], tiny_io["context"]
    unet(x, t, ctx)
    first = unet.input_blocks[0][0].weight
    first.requires_grad_(True)
    unet(x, t, ctx).square().mean().backward()
    with torch.no_grad():
        unet(x, t, ctx)
    assert seen == [False, True, False]
    assert first.grad is not None and first.grad.abs().max() > 0


@torch.no_grad()
def test_float64_nets_match_the_reference_in_float64(tiny_arch, tiny_weights, tiny_io):
    """The UNet's output conv runs in the input's dtype: float64 weights and inputs give a
    float64 eps equal to the (float32) reference."""
    unet, control = (n.double() for n in _nets(tiny_arch, tiny_weights))
    x, t, ctx = tiny_io["x"].double(), tiny_io["t"], tiny_io["context"].double()
    outs = control(x, control.encode_hint(tiny_io["hint"].double()), t, ctx)
    eps = unet(x, t, ctx, control=outs)
    assert eps.dtype == torch.float64
    torch.testing.assert_close(eps, tiny_io["eps_controlled"].double(), **COMPONENT_TOL)
