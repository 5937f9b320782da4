"""AutoencoderKL against the reference outputs of the tiny fixture, and SD2.1 key names."""
import json
from pathlib import Path

import pytest
import torch

from ldm.modules.autoencoder import AttnBlock, AutoencoderKL, DiagonalGaussian, Level, ResnetBlock
from tests.helpers import COMPONENT_TOL as TOL, SDPACalls, sub_state

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def vae(tiny_arch, tiny_weights) -> AutoencoderKL:
    model = AutoencoderKL(**tiny_arch["vae"]).eval()
    model.load_state_dict(sub_state(tiny_weights, "first_stage_model."), strict=True)
    return model


@torch.no_grad()
def test_posterior_matches_reference(vae, tiny_io):
    posterior = vae.encode(tiny_io["image"])
    torch.testing.assert_close(posterior.mean, tiny_io["vae_mean"], **TOL)
    torch.testing.assert_close(posterior.logvar, tiny_io["vae_logvar"], **TOL)
    torch.testing.assert_close(posterior.std, (0.5 * tiny_io["vae_logvar"]).exp(), **TOL)


@torch.no_grad()
def test_decode_matches_reference(vae, tiny_io, tiny_arch):
    torch.testing.assert_close(vae.decode(tiny_io["z"]), tiny_io["vae_decoded"], **TOL)
    z = tiny_io["z"] / tiny_arch["diffusion"]["scale_factor"]  # what decode_first_stage feeds the VAE
    torch.testing.assert_close(vae.decode(z), tiny_io["decode_first_stage"], **TOL)


@torch.no_grad()
def test_sample_is_seeded_and_uses_std(vae, tiny_io):
    posterior = vae.encode(tiny_io["image"])
    a = posterior.sample(torch.Generator().manual_seed(0))
    b = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, posterior.mean + posterior.std * noise)


@torch.no_grad()
def test_sample_under_autocast_is_a_float32_draw(vae, tiny_io):
    """Under autocast the moments are bf16; the reference draws float32 noise (and the sum
    promotes), so the training target z0, and the diffusion noise drawn like it, are not
    quantised to bf16."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        posterior = vae.encode(tiny_io["image"])
        z = posterior.sample(torch.Generator().manual_seed(0))
    assert posterior.mean.dtype == torch.bfloat16 and z.dtype == torch.float32
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, posterior.mean.float() + posterior.std.float() * noise, rtol=0, atol=0)


@torch.no_grad()
def test_half_precision_runs_close_to_float32(vae, tiny_io, tiny_arch):
    """GroupNorm runs in float32, so a bfloat16 model stays near the float32 one."""
    half = AutoencoderKL(**tiny_arch["vae"])
    half.load_state_dict(vae.state_dict())
    half = half.to(torch.bfloat16).eval()
    out = half.decode(tiny_io["z"].to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    err = (out.float() - tiny_io["vae_decoded"]).abs().max().item()
    assert err < 0.15  # observed 0.06 on outputs up to 3.3: bfloat16 round-off, no blow-up


def test_sd21_state_dict_names_and_shapes():
    """A model built from SD2.1's first-stage config has exactly the checkpoint's keys and shapes."""
    manifest = json.loads((FIXTURES / "sd21_controlnet_keys.json").read_text())["keys"]
    expected = {k: list(shape) for k, shape in sub_state(manifest, "first_stage_model.").items()}
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = AutoencoderKL(ddconfig, embed_dim=4)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


def test_attention_levels_follow_attn_resolutions():
    ddconfig = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    model = AutoencoderKL(ddconfig, embed_dim=4)
    keys = model.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and not any(k.startswith("encoder.down.0.attn") for k in keys)
    assert "decoder.up.1.attn.1.q.weight" in keys and not any(k.startswith("decoder.up.0.attn") for k in keys)
    assert "encoder.down.0.downsample.conv.weight" in keys and "encoder.down.1.downsample.conv.weight" not in keys
    assert "decoder.up.1.upsample.conv.weight" in keys and "decoder.up.0.upsample.conv.weight" not in keys
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == (1, 4, 16, 16)
        assert model.decode(posterior.mean).shape == x.shape


def test_double_z_false_is_rejected():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(dict(double_z=False, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                           ch_mult=[1], num_res_blocks=1, attn_resolutions=[]), 4)


def test_double_z_defaults_to_true(tiny_arch):
    """As in the reference Encoder, a ddconfig that leaves double_z out means mean and logvar."""
    ddconfig = {k: v for k, v in tiny_arch["vae"]["ddconfig"].items() if k != "double_z"}
    model = AutoencoderKL(ddconfig, tiny_arch["vae"]["embed_dim"])
    assert model.encoder.conv_out.out_channels == 2 * ddconfig["z_channels"]


def test_unknown_ddconfig_key_is_an_error(tiny_arch):
    ddconfig = {**tiny_arch["vae"]["ddconfig"], "attn_typ": "vanilla"}
    with pytest.raises(ValueError, match=r"unknown ddconfig key\(s\) \['attn_typ'\]"):
        AutoencoderKL(ddconfig, tiny_arch["vae"]["embed_dim"])


def test_posterior_logvar_is_clamped_to_minus_30_and_20():
    """As the reference: logvar outside [-30, 20] is clamped before std is taken."""
    logvar = torch.tensor([-35.0, -25.0, 10.0, 25.0])
    p = DiagonalGaussian(torch.cat([torch.zeros(4), logvar]).view(1, 8, 1, 1))
    assert p.logvar.flatten().tolist() == [-30.0, -25.0, 10.0, 20.0]
    torch.testing.assert_close(p.std.flatten(), torch.exp(0.5 * torch.tensor([-30.0, -25.0, 10.0, 20.0])))


@torch.no_grad()
def test_attention_gives_sdpa_channels_at_stride_one():
    """SDPA's fused (flash / memory-efficient) kernels need the head dimension at stride 1;
    (b, 1, c, hw).transpose views have it at stride hw and fall back to the math kernel, which
    materialises the (hw x hw) matrix (64 MB per 512x512 image in the VAE's middle block)."""
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 8, 8)
    with SDPACalls() as sdpa:
        y = block(x)
    assert [[t.stride(-1) for t in call] for call in sdpa.calls] == [[1, 1, 1]]
    # single-head attention over positions, by hand
    q, k, v = (conv(block.norm(x)).flatten(2) for conv in (block.q, block.k, block.v))
    w = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, dim=-1)
    torch.testing.assert_close(y, x + block.proj_out((v @ w.transpose(1, 2)).reshape(x.shape)), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_level_follows_each_block_with_its_attention():
    """A level with attention runs block i then attn i; with one block per level (the tiny and
    common attn_resolutions configs) the one attention must still run."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 4, 4)
    one = Level([ResnetBlock(32)], [AttnBlock(32)]).eval()
    torch.testing.assert_close(one.blocks(x), one.attn[0](one.block[0](x)), rtol=0, atol=0)
    two = Level([ResnetBlock(32, 64), ResnetBlock(64)], [AttnBlock(64), AttnBlock(64)]).eval()
    expected = two.attn[1](two.block[1](two.attn[0](two.block[0](x))))
    torch.testing.assert_close(two.blocks(x), expected, rtol=0, atol=0)
    plain = Level([ResnetBlock(32)], []).eval()
    torch.testing.assert_close(plain.blocks(x), plain.block[0](x), rtol=0, atol=0)
    assert (one.blocks(x) - plain.block[0](x)).abs().max() > 0.01  # the attention is not a no-op here
