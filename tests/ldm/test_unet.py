"""UNet building blocks against the reference implementation's tiny golden outputs."""
import math

import pytest
import torch

from cldm.controlnet import ControlledUnetModel
from ldm.modules import attention, unet as unet_module
from ldm.modules.attention import BasicTransformerBlock, CrossAttention
from ldm.modules.unet import ResBlock, UNetModel, timestep_embedding
from tests.helpers import COMPONENT_TOL, SDPACalls, sub_state
from tests.ldm.reference_arch import unet_kwargs

# The tiny UNet (channel_mult [1, 2, 2], 1 res block per level, attention at 1x and 2x):
# ResBlocks 3 encoder + 2 middle + 6 decoder; transformer blocks 2 + 1 + 4.
TINY_RESBLOCKS, TINY_TRANSFORMERS = 11, 7


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 4)
    # freqs = exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01]
    expected = torch.tensor([[1, 1, 0, 0], [math.cos(10), math.cos(0.1), math.sin(10), math.sin(0.1)]])
    torch.testing.assert_close(emb, expected.float(), rtol=1e-6, atol=1e-6)


def test_group_norm_eps_is_sds_1e_6_in_transformers_and_1e_5_in_resblocks():
    """SD normalises a SpatialTransformer's input with eps 1e-6 and a ResBlock's with 1e-5; the
    tiny golden outputs have too much variance per group to see it. A group of variance 1e-6
    (values +-1e-3) comes out as +-1e-3 / sqrt(1e-6 + eps): 1/sqrt(2) and 1/sqrt(11), rtol 1e-4."""
    from ldm.modules.attention import SpatialTransformer
    x = torch.tensor([1e-3, -1e-3]).repeat(1, 32, 1, 1)  # (1, 32, 1, 2): 32 groups of one channel
    expected = torch.tensor([1.0, -1.0]).repeat(1, 32, 1, 1)
    with torch.no_grad():
        norm = SpatialTransformer(32, 1, 32, 1, 8).norm(x)
        res = ResBlock(32, 16).in_layers[0](x)
    torch.testing.assert_close(norm, expected / math.sqrt(2), rtol=1e-4, atol=0)
    torch.testing.assert_close(res, expected / math.sqrt(11), rtol=1e-4, atol=0)


def _tiny_unet(tiny_arch, tiny_weights, **overrides):
    unet = UNetModel(**{**unet_kwargs(tiny_arch), **overrides})
    unet.load_state_dict(sub_state(tiny_weights, "model.diffusion_model."), strict=True)
    return unet


def test_plain_unet_matches_reference_with_all_attention_through_sdpa(tiny_arch, tiny_weights, tiny_io):
    unet = _tiny_unet(tiny_arch, tiny_weights)
    assert sum(isinstance(m, BasicTransformerBlock) for m in unet.modules()) == TINY_TRANSFORMERS
    with torch.no_grad(), SDPACalls() as sdpa:
        eps = unet(tiny_io["x"], tiny_io["t"], tiny_io["context"])
    torch.testing.assert_close(eps, tiny_io["eps_plain"], **COMPONENT_TOL)
    # Every CrossAttention (self and cross, 2 per transformer block) is one SDPA call.
    assert len(sdpa.calls) == 2 * TINY_TRANSFORMERS == sum(isinstance(m, CrossAttention) for m in unet.modules())
    b, ctx_len = tiny_io["x"].shape[0], tiny_io["context"].shape[1]
    shapes = [(tuple(q.shape), tuple(k.shape)) for q, k, _ in sdpa.calls]
    self_attn, cross_attn = shapes[0::2], shapes[1::2]
    assert all(q[0] == b and q[2] == k[2] for q, k in self_attn)   # tokens attend to tokens
    assert all(q[0] == b and k[2] == ctx_len for q, k in cross_attn)  # ... then to the 77 context tokens
    # heads x 16 channels: 32 channels at full latent size (8x8 = 64 tokens), 64 at 4x4
    assert self_attn[0] == ((b, 2, 64, 16), (b, 2, 64, 16)) and self_attn[1] == ((b, 4, 16, 16), (b, 4, 16, 16))


def test_controlled_unet_without_control_equals_plain(tiny_arch, tiny_weights, tiny_io):
    sd = sub_state(tiny_weights, "model.diffusion_model.")
    plain, controlled = UNetModel(**unet_kwargs(tiny_arch)), ControlledUnetModel(**unet_kwargs(tiny_arch))
    plain.load_state_dict(sd)
    controlled.load_state_dict(sd)
    with torch.no_grad():
        args = tiny_io["x"], tiny_io["t"], tiny_io["context"]
        assert torch.equal(plain(*args), controlled(*args))


def test_gradient_checkpointing_recomputes_blocks_and_gives_same_gradients(tiny_arch, tiny_weights, tiny_io,
                                                                           monkeypatch):
    checkpointed = []
    for module in (unet_module, attention):  # count calls of the checkpoint function the blocks use
        real = module.checkpoint
        monkeypatch.setattr(module, "checkpoint",
                            lambda fn, *a, _real=real, **kw: checkpointed.append(fn.__self__) or _real(fn, *a, **kw))
    grads, counts = [], []
    for use_checkpoint in (False, True):
        checkpointed.clear()
        unet = _tiny_unet(tiny_arch, tiny_weights, use_checkpoint=use_checkpoint).train()
        runs = {"res": 0, "attn": 0}  # forwards of each block's first layer, recomputes included
        for m in unet.modules():
            if isinstance(m, ResBlock):
                m.in_layers.register_forward_pre_hook(lambda *_: runs.__setitem__("res", runs["res"] + 1))
            elif isinstance(m, BasicTransformerBlock):
                m.attn1.register_forward_pre_hook(lambda *_: runs.__setitem__("attn", runs["attn"] + 1))
        unet(tiny_io["x"], tiny_io["t"], tiny_io["context"]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
        counts.append((len(checkpointed), runs["res"], runs["attn"]))
        if use_checkpoint:
            assert {type(m) for m in checkpointed} == {ResBlock, BasicTransformerBlock}
    # Off: no checkpoint calls, each block runs once. On: every block is checkpointed and runs
    # again during backward.
    assert counts == [(0, TINY_RESBLOCKS, TINY_TRANSFORMERS),
                      (TINY_RESBLOCKS + TINY_TRANSFORMERS, 2 * TINY_RESBLOCKS, 2 * TINY_TRANSFORMERS)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_unknown_or_unsupported_arguments_are_errors(tiny_arch):
    with pytest.raises(TypeError, match="use_checkpint"):
        UNetModel(**unet_kwargs(tiny_arch), use_checkpint=True)
    with pytest.raises(TypeError, match="unexpected keyword argument .image_size"):
        UNetModel(**tiny_arch["unet"])  # the reference-only keys, unstripped
    with pytest.raises(ValueError, match="use_linear_in_transformer=false .* not supported"):
        UNetModel(**{**unet_kwargs(tiny_arch), "use_linear_in_transformer": False})


def test_a_first_level_wider_than_model_channels_runs(tiny_arch):
    """channel_mult[0] != 1: the decoder ends at model_channels * channel_mult[0] channels, and the
    output head must take that many (the reference's conv takes model_channels: a shape error)."""
    kw = {**unet_kwargs(tiny_arch), "channel_mult": [2, 2]}
    unet = UNetModel(**kw)
    assert unet.out[-1].in_channels == unet.out[0].num_channels == 2 * kw["model_channels"]
    x = torch.randn(1, kw["in_channels"], 8, 8)
    with torch.no_grad():
        assert unet(x, torch.tensor([3]), torch.randn(1, 77, kw["context_dim"])).shape == (1, kw["out_channels"], 8, 8)


def test_half_weights_without_autocast_and_float32_ending_under_autocast(tiny_arch, tiny_weights, tiny_io):
    """Two dtype rules of the reference UNet. Under autocast with float32 input, the decoder's
    last norm and SiLU run in float32 (h is cast back to the input's dtype first): the output
    conv receives float32. A UNet held in bfloat16 runs without autocast (the float32 time
    embedding is cast to the weights' dtype) and stays near the float32 result."""
    unet = _tiny_unet(tiny_arch, tiny_weights)
    seen = []
    unet.out[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x, t, ctx = tiny_io["x"], tiny_io["t"], tiny_io["context"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert unet(x, t, ctx).dtype == torch.bfloat16
    assert seen == [torch.float32]
    half = unet.to(torch.bfloat16)
    with torch.no_grad():
        eps = half(x.bfloat16(), t, ctx.bfloat16())
    assert eps.dtype == torch.bfloat16
    err = (eps.float() - tiny_io["eps_plain"]).abs().max().item() / tiny_io["eps_plain"].abs().max().item()
    assert err < 0.05, err  # bfloat16 round-off (8 bits of mantissa)


@torch.no_grad()
def test_spatial_transformer_starts_as_the_identity_and_runs_every_block():
    """proj_out is zero-initialised (SD's zero_module), so a fresh transformer adds nothing; with
    depth > 1 (SD2.1 and the tiny model have 1) the tokens go through each block in turn."""
    from ldm.modules.attention import SpatialTransformer
    torch.manual_seed(0)
    st = SpatialTransformer(32, heads=2, dim_head=16, depth=2, context_dim=8).eval()
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 8)
    assert torch.equal(st(x, ctx), x)
    torch.nn.init.normal_(st.proj_out.weight, std=0.1)
    tokens = st.proj_in(st.norm(x).flatten(2).transpose(1, 2))
    one = st.transformer_blocks[0](tokens, ctx)
    two = st.transformer_blocks[1](one, ctx)

    def as_image(t):
        return x + st.proj_out(t).transpose(1, 2).reshape(x.shape)

    torch.testing.assert_close(st(x, ctx), as_image(two), rtol=1e-5, atol=1e-6)
    assert (as_image(two) - as_image(one)).abs().max() > 1e-2  # the second block counts
