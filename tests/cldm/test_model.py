"""The assembled ControlLDM: key manifest, reference conformance, zero-init, per-sample caching."""
import json

import pytest
import torch

from cldm.color import VARIANTS
from cldm.config import DEFAULT_CONFIG, TINY_CONFIG, load_config
from cldm.model import create_model
from ldm import schedule
from tests.conftest import FIXTURES
from tests.helpers import DDIM_TOL


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_real_config_has_exactly_the_sd21_controlnet_keys(variant):
    manifest = json.loads((FIXTURES / "sd21_controlnet_keys.json").read_text())
    expected = {**manifest["keys"], **manifest["variant_overrides"][variant]}
    with torch.device("meta"):
        model = create_model(load_config(DEFAULT_CONFIG, [f"model.color_variant={variant}"]))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: v for k, v in got.items() if v != expected[k]} == {}


def tiny_v1(tiny_weights):
    model = create_model(load_config(TINY_CONFIG, ["model.color_variant=v1"])).eval()
    missing, unexpected = model.load_state_dict(tiny_weights, strict=False)
    assert unexpected == [] and all(k.startswith("cond_stage_model.") for k in missing)
    return model


@torch.no_grad()
def test_ddim20_sample_matches_reference(tiny_weights, tiny_io):
    model = tiny_v1(tiny_weights)
    for name in ("alphas_cumprod", "betas", "posterior_variance"):
        torch.testing.assert_close(getattr(model, name), tiny_weights[name], rtol=1e-6, atol=0)
    cond = model.prepare_condition(tiny_io["hint"][:1], context=tiny_io["context"][:1])
    assert cond.concat is None  # v1: the hint goes through the hint block only
    x0 = model.sample(cond, x_T=tiny_io["ddim_xT"], steps=20)
    torch.testing.assert_close(x0, tiny_io["ddim20_x0"], **DDIM_TOL)


@torch.no_grad()
def test_decode_first_stage_matches_reference(tiny_weights, tiny_io):
    model = tiny_v1(tiny_weights)
    torch.testing.assert_close(model.decode_first_stage(tiny_io["z"]), tiny_io["decode_first_stage"],
                               rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_vae_encodes_once_per_sample_not_per_step():
    model = create_model(TINY_CONFIG).eval()
    calls = []
    model.first_stage_model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    text_calls = []
    # the token embedding: encode() calls the tower's parts, never the tower's own forward
    model.cond_stage_model.model.token_embedding.register_forward_pre_hook(lambda m, a: text_calls.append(1))
    hint_calls = []
    model.control_model.input_hint_block.register_forward_hook(lambda m, i, o: hint_calls.append(i[0].shape))
    steps = []
    model.control_model.register_forward_pre_hook(lambda m, a: steps.append(1))
    hint = torch.rand(3, 4, 64, 64)
    model.get_learned_conditioning([""])  # warm the blank-prompt cache
    assert text_calls == [1]
    text_calls.clear()
    cond = model.prepare_condition(hint)
    model.sample(cond, steps=20, generator=torch.Generator().manual_seed(0))
    assert len(steps) == 20   # the ControlNet did run every step ...
    assert calls == [3]       # ... but one batched reference encode for 3 samples, none during 20 steps
    assert hint_calls == [(3, 4, 64, 64)]  # ... and one hint-block pass, at image size
    assert text_calls == []   # blank prompt embedding reused


@torch.no_grad()
def test_v3_encodes_reference_and_gray_once_each():
    model = create_model(load_config(TINY_CONFIG, ["model.color_variant=v3"])).eval()
    calls = []
    model.first_stage_model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    cond = model.prepare_condition(torch.rand(2, 4, 64, 64))
    model.sample(cond, steps=5)
    assert len(calls) == 2 and cond.concat.shape == (2, 8, 8, 8)


@torch.no_grad()
def test_sample_under_autocast_keeps_the_latent_in_float32():
    """Under bf16 autocast the model's outputs are bf16, but the DDIM trajectory (drawn here by
    `sample` itself) stays float32: a bf16 x would be rounded at every step."""
    model = create_model(TINY_CONFIG).eval()
    xs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = model.prepare_condition(torch.rand(1, 4, 64, 64))
        assert cond.guided_hint.dtype == torch.bfloat16
        z = model.sample(cond, steps=3, generator=torch.Generator().manual_seed(0),
                         callback=lambda i, t, x, x0: xs.append(x.dtype))
    assert z.dtype == torch.float32 and xs == [torch.float32] * 3


def test_prompt_cache_is_dropped_when_text_weights_are_loaded():
    torch.manual_seed(0)
    model = create_model(TINY_CONFIG).eval()
    torch.manual_seed(1)
    other = create_model(TINY_CONFIG).eval()
    with torch.no_grad():
        first = model.get_learned_conditioning(["", "a red car"])
        expected = other.cond_stage_model.encode(["", "a red car"])
    assert (first - expected).abs().max() > 0.1  # the two text towers really differ
    model.load_state_dict(other.state_dict())  # e.g. load_into after construction
    torch.testing.assert_close(model.get_learned_conditioning(["", "a red car"]), expected, rtol=1e-5, atol=1e-5)
    # loading the text encoder alone invalidates as well
    torch.manual_seed(2)
    third = create_model(TINY_CONFIG).cond_stage_model.eval()
    model.cond_stage_model.load_state_dict(third.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.get_learned_conditioning([""]), third.encode([""]), rtol=0, atol=0)


@torch.no_grad()
def test_prompt_cache_follows_dtype_and_device():
    torch.manual_seed(0)
    model = create_model(TINY_CONFIG).eval()
    f32 = model.get_learned_conditioning(["a red car"])
    model.to(torch.float64)
    f64 = model.get_learned_conditioning(["a red car"])
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64, model.cond_stage_model.encode(["a red car"]), rtol=0, atol=0)
    # same weights, more precision: float32's rounding through the tower, up to 1.4e-6 over seeds 0-5 (outputs
    # up to 2.9, 6 float32 steps); atol=1e-6 failed now and then, before the seed was fixed
    torch.testing.assert_close(f64.float(), f32, rtol=1e-5, atol=1e-5)
    model.to(torch.float32)  # the weights went through float64 and back: recomputed, equal to fresh
    torch.testing.assert_close(model.get_learned_conditioning(["a red car"]),
                               model.cond_stage_model.encode(["a red car"]), rtol=0, atol=0)
    model.to("meta")
    assert model.get_learned_conditioning(["a red car"]).device.type == "meta"


def test_image_size_must_suit_the_vae_and_the_unet_downsamples():
    model = create_model(TINY_CONFIG).eval()  # VAE /8, UNet channel_mult [1, 2, 2]: 2 downsamples
    assert model.size_multiple == 32
    with pytest.raises(ValueError, match=r"^hint height and width must be multiples of 32 \(the VAE and hint "
                                         r"block downsample by 8, then the UNet's 2 downsamples by 2 each\), "
                                         r"got 72x64$"):
        model.prepare_condition(torch.rand(1, 4, 72, 64))
    with pytest.raises(ValueError, match="multiples of 32.*got 64x40"):
        model.prepare_condition(torch.rand(1, 4, 64, 40))  # 40 = 5 latent cells: /8 works, the UNet doesn't
    with torch.no_grad():
        cond = model.prepare_condition(torch.rand(1, 4, 96, 32), context=torch.zeros(1, 77, 32))
        assert model.sample(cond, steps=2).shape == (1, 4, 12, 4)
    with torch.device("meta"):
        sd21 = create_model(DEFAULT_CONFIG)  # 3 UNet downsamples: multiples of 64
    with pytest.raises(ValueError, match="multiples of 64 .*3 downsamples.*got 544x512"):
        sd21.prepare_condition(torch.rand(1, 4, 544, 512, device="meta"), context=torch.zeros(1, 77, 1024))


def _randomised_tiny_model():
    model = create_model(TINY_CONFIG).eval()
    for p in model.parameters():  # zero-initialised convs would make the outputs zeros
        p.data.add_(torch.randn_like(p) * 0.02)
    return model


def _denoise_and_decode(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    hint = torch.rand(2, 4, 64, 64, generator=g)
    cond = model.prepare_condition(hint, context=torch.randn(2, 77, 32, generator=g))
    x = torch.randn(2, model.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        eps = model.apply_model(x, torch.tensor([10, 900]), cond)
        return eps, model.decode_first_stage(x)


def test_compile_denoiser_in_place_traces_whole_and_keeps_names():
    """compile_denoiser compiles ControlNet, UNet and VAE decoder in place: the state_dict keeps SD's
    names, each part traces as one graph (fullgraph: no graph breaks), and the traced model
    computes what the eager one does (the 'eager' backend runs the captured ops unchanged)."""
    torch._dynamo.reset()
    model = _randomised_tiny_model()
    keys = list(model.state_dict())
    before = _denoise_and_decode(model)
    model.compile_denoiser(vae_decoder=True, backend="eager", fullgraph=True, dynamic=False)
    assert list(model.state_dict()) == keys
    after = _denoise_and_decode(model)
    for a, b in zip(before, after):
        assert a.abs().max() > 1e-3
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_denoiser_with_inductor_matches_eager():
    """The real thing (inductor, C++ kernels on the CPU; minutes here): fused kernels reorder float
    sums, so equal to 1e-4, not bitwise."""
    torch._dynamo.reset()
    model = _randomised_tiny_model()
    before = _denoise_and_decode(model)
    model.compile_denoiser(vae_decoder=True, dynamic=False)
    after = _denoise_and_decode(model)
    for a, b in zip(before, after):
        assert a.abs().max() > 1e-3
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_training_loss_targets_by_hand(parameterization):
    """The loss is the MSE between the model output at x_t = sqrt(a) z0 + sqrt(1 - a) eps and
    its target: eps, or v = sqrt(a) eps - sqrt(1 - a) z0 (Salimans & Ho 2022), with a =
    alphas_cumprod[t], written out here from the schedule. The weights get small random offsets: a
    fresh model's zero output conv predicts 0 whatever x_t is, and would hide a wrong x_t."""
    torch.manual_seed(0)
    model = create_model(load_config(TINY_CONFIG, [f"model.parameterization={parameterization}"])).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    cond = model.prepare_condition(torch.rand(2, 4, 64, 64, generator=g), context=torch.randn(2, 77, 32, generator=g))
    a = model.alphas_cumprod.double()[t][:, None, None, None]
    x_t = (a.sqrt() * z0 + (1 - a).sqrt() * eps).float()
    target = eps if parameterization == "eps" else (a.sqrt() * eps - (1 - a).sqrt() * z0).float()
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(model.apply_model(x_t, t, cond), target)
        got = model.training_loss(z0, cond, noise=eps, t=t)
        blind = torch.nn.functional.mse_loss(torch.zeros_like(target), target)  # what a zero output gives
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert abs(got.item() - blind.item()) > 1e-3 * blind.item()  # the output at x_t counts


def test_schedule_and_only_mid_control_come_from_the_config():
    """The constructor's own schedule (used when a checkpoint brings none): SD's linear-in-sqrt
    betas from linear_start up to linear_end; only_mid_control reaches the UNet call."""
    cfg = load_config(TINY_CONFIG, ["model.only_mid_control=true", "model.schedule.timesteps=50"])
    model = create_model(cfg).eval()
    sch = cfg.model.schedule
    want = schedule.schedule_buffers("linear", 50, sch.linear_start, sch.linear_end)
    torch.testing.assert_close(model.betas, want["betas"], rtol=0, atol=0)
    assert model.num_timesteps == 50 and bool((model.betas.diff() > 0).all())
    torch.testing.assert_close(model.betas[[0, -1]].double(), torch.tensor([sch.linear_start, sch.linear_end],
                                                                            dtype=torch.float64), rtol=1e-6, atol=0)
    seen = []
    model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["only_mid_control"]), with_kwargs=True)
    cond = model.prepare_condition(torch.rand(1, 4, 64, 64), context=torch.randn(1, 77, 32))
    with torch.no_grad():
        model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([3]), cond)
    assert seen == [True] and create_model(TINY_CONFIG).only_mid_control is False  # the YAML's default


@torch.no_grad()
def test_encode_first_stage_scales_the_posterior():
    torch.manual_seed(0)
    model = create_model(TINY_CONFIG).eval()
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    post = model.first_stage_model.encode(img)
    torch.testing.assert_close(model.encode_first_stage(img), post.mean * model.scale_factor, rtol=0, atol=0)
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
    got = model.encode_first_stage(img, sample=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, (post.mean + post.std * noise) * model.scale_factor)
    torch.testing.assert_close(model.decode_first_stage(got), model.first_stage_model.decode(got / model.scale_factor))


@torch.no_grad()
def test_prompt_cache_keeps_autocast_and_float32_embeddings_apart():
    torch.manual_seed(0)
    model = create_model(TINY_CONFIG).eval()
    f32 = model.get_learned_conditioning(["a red car"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model.get_learned_conditioning(["a red car"])
        want = model.cond_stage_model.encode(["a red car"])
    torch.testing.assert_close(amp, want, rtol=0, atol=0)
    assert not torch.equal(amp.float(), f32)  # bf16 matmuls: another embedding
    torch.testing.assert_close(model.get_learned_conditioning(["a red car"]), f32, rtol=0, atol=0)


def test_training_draws_every_timestep_from_zero():
    model = create_model(load_config(TINY_CONFIG, ["model.schedule.timesteps=4"])).eval()
    drawn = []
    step = model.apply_model
    model.apply_model = lambda x, t, cond: drawn.extend(t.tolist()) or step(x, t, cond)
    cond = model.prepare_condition(torch.rand(64, 4, 64, 64), context=torch.zeros(64, 77, 32))
    with torch.no_grad():
        model.training_loss(torch.randn(64, 4, 8, 8), cond, generator=torch.Generator().manual_seed(0))
    assert sorted(set(drawn)) == [0, 1, 2, 3]


def test_prompt_cache_holds_64_prompts():
    """The first 64 distinct prompts are kept; later ones are encoded at every call."""
    model = create_model(TINY_CONFIG).eval()
    encodes = []
    model.cond_stage_model.model.token_embedding.register_forward_pre_hook(lambda m, a: encodes.append(a[0].shape[0]))
    prompts = [f"prompt {i}" for i in range(70)]
    first = model.get_learned_conditioning(prompts)
    assert encodes == [1] * 70
    encodes.clear()
    torch.testing.assert_close(model.get_learned_conditioning(prompts), first, rtol=0, atol=0)
    assert encodes == [1] * 6  # prompts 64..69


def _parts():
    m = create_model(TINY_CONFIG)
    return m.model.diffusion_model, m.control_model, m.first_stage_model


def test_control_ldm_defaults_are_sd21s_and_other_parameterizations_are_refused():
    """Built directly (create_model passes every value): SD's scale factor and linear schedule of
    1000 steps from 0.00085 to 0.012, eps, v2 concatenated to the UNet, full control."""
    from cldm.cldm import ControlLDM

    model = ControlLDM(*_parts(), None)
    assert (model.scale_factor, model.parameterization, model.color_variant) == (0.18215, "eps", "v2")
    assert model.concat_to_unet is True and model.only_mid_control is False and model.num_timesteps == 1000
    torch.testing.assert_close(model.betas[[0, -1]].double(), torch.tensor([0.00085, 0.012], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"^parameterization must be 'eps' or 'v', got 'x0'$"):
        ControlLDM(*_parts(), None, parameterization="x0")


def test_a_model_without_text_encoder_needs_the_context():
    model = create_model(load_config(TINY_CONFIG, ["model.cond_stage=null"])).eval()
    assert model.cond_stage_model is None
    with pytest.raises(RuntimeError, match="no text encoder; pass `context` explicitly"):
        model.get_learned_conditioning([""])
    with pytest.raises(RuntimeError, match="no text encoder"):
        model.prepare_condition(torch.rand(1, 4, 32, 32))
    cond = model.prepare_condition(torch.rand(1, 4, 32, 32), context=torch.zeros(1, 77, 32))
    assert cond.concat.shape == (1, 5, 4, 4)


@torch.no_grad()
def test_apply_model_feeds_the_noisy_latent_then_the_concat_in_its_dtype():
    """ControlNet and UNet (concat_to_unet) see [x_t, concat] on the channels, in x_t's dtype:
    a float32 concat (the latent cache's) with a bf16 model and x_t is cast, not promoted."""
    from cldm.color import ColorCondition

    model = create_model(TINY_CONFIG).eval().to(torch.bfloat16)
    seen = []
    for net in (model.control_model, model.model.diffusion_model):
        net.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    concat = torch.randn(2, 5, 8, 8, generator=g)
    context, hint = torch.randn(2, 77, 32, generator=g).bfloat16(), torch.randn(2, 32, 8, 8, generator=g).bfloat16()
    cond = ColorCondition(context, hint, concat)
    model.apply_model(x_t, torch.tensor([5, 500]), cond)
    assert len(seen) == 2
    for x_in in seen:
        assert x_in.dtype == torch.bfloat16 and x_in.shape == (2, 9, 8, 8)
        assert torch.equal(x_in[:, :4], x_t) and torch.equal(x_in[:, 4:], concat.bfloat16())


@torch.no_grad()
def test_without_concat_to_unet_only_the_controlnet_sees_the_concat():
    """concat_to_unet=false: the UNet keeps SD's 4 input channels and gets x_t alone."""
    from cldm.color import ColorCondition

    model = create_model(load_config(TINY_CONFIG, ["model.concat_to_unet=false"])).eval()
    seen = {}
    for name, net in (("control", model.control_model), ("unet", model.model.diffusion_model)):
        net.register_forward_pre_hook(lambda m, a, name=name: seen.update({name: a[0]}))
    g = torch.Generator().manual_seed(0)
    x_t, concat = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    cond = ColorCondition(torch.randn(2, 77, 32, generator=g), torch.randn(2, 32, 8, 8, generator=g), concat)
    assert model.apply_model(x_t, torch.tensor([5, 500]), cond).shape == (2, 4, 8, 8)
    assert torch.equal(seen["control"], torch.cat([x_t, concat], dim=1)) and torch.equal(seen["unet"], x_t)


@torch.no_grad()
def test_a_bfloat16_model_draws_bfloat16_noise_and_takes_the_loss_in_float32():
    """A bf16 model (bf16-true training) gets noise like z0 (bf16, which the model takes) and still a
    float32 loss: the squared errors and their mean are not rounded to bf16."""
    torch.manual_seed(0)
    model = create_model(TINY_CONFIG).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)  # else the zero output conv predicts 0
    model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g).bfloat16(), torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    t = torch.tensor([10, 900])
    cond = model.prepare_condition(torch.rand(2, 4, 64, 64, generator=g).bfloat16(),
                                   context=torch.randn(2, 77, 32, generator=g).bfloat16())
    x_t = schedule.q_sample(z0, t, eps, model.sqrt_alphas_cumprod, model.sqrt_one_minus_alphas_cumprod)
    out = model.apply_model(x_t, t, cond)
    loss = model.training_loss(z0, cond, noise=eps, t=t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ((out.float() - eps.float()) ** 2).mean(), rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(z0.shape, generator=g, dtype=torch.bfloat16)
    drawn = model.training_loss(z0, cond, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, model.training_loss(z0, cond, noise=noise, t=t), rtol=0, atol=0)


@torch.no_grad()
def test_sample_draws_x_T_with_the_models_latent_channels():
    """x_T not given: (B, latent_channels, h, w) from `generator`, for latents other than SD's 4 too."""
    cfg = load_config(TINY_CONFIG, ["model.color_variant=v1", "model.latent_channels=8", "model.first_stage.embed_dim=8"])
    model = create_model(cfg).eval()
    cond = model.prepare_condition(torch.rand(1, 4, 32, 32), context=torch.zeros(1, 77, 32))
    got = model.sample(cond, steps=1, generator=torch.Generator().manual_seed(3))
    x_T = torch.randn((1, 8, 4, 4), generator=torch.Generator().manual_seed(3))
    assert got.shape == (1, 8, 4, 4)
    torch.testing.assert_close(got, model.sample(cond, x_T=x_T, steps=1), rtol=0, atol=0)


def test_compile_denoiser_compiles_controlnet_unet_and_on_request_the_vae_decoder():
    model = create_model(TINY_CONFIG).eval()
    calls = []
    parts = {"control": model.control_model, "unet": model.model.diffusion_model,
             "decoder": model.first_stage_model.decoder, "encoder": model.first_stage_model.encoder}
    for name, part in parts.items():
        part.compile = lambda name=name, **options: calls.append((name, options))
    model.compile_denoiser(dynamic=False)
    assert calls == [("control", {"dynamic": False}), ("unet", {"dynamic": False})]
    calls.clear()
    model.compile_denoiser(vae_decoder=True, mode="max-autotune")
    assert calls == [(name, {"mode": "max-autotune"}) for name in ("control", "unet", "decoder")]


def _cond_and_uncond(model, g):
    cond = model.prepare_condition(torch.rand(1, 4, 32, 32, generator=g), context=torch.randn(1, 77, 32, generator=g))
    uncond = model.prepare_condition(torch.rand(1, 4, 32, 32, generator=g), context=torch.randn(1, 77, 32, generator=g))
    return cond, uncond


@torch.no_grad()
def test_sample_draws_x_T_from_the_generator():
    model = _randomised_tiny_model()
    cond, _ = _cond_and_uncond(model, torch.Generator().manual_seed(0))
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    got = model.sample(cond, steps=2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, model.sample(cond, x_T=x_T, steps=2), rtol=0, atol=0)


@torch.no_grad()
def test_sample_passes_guidance_eta_parameterization_and_generator_to_ddim():
    """Against DDIM run on a model_fn that does the guidance itself, uncond + s (cond - uncond),
    here with s = 2.5 and 0.5 (below 1 counts too; alone it hid cond and uncond swapped, which
    give the same mean at s = 0.5), eta = 1 with the generator's noise, v-prediction."""
    from ldm import sampler

    torch.manual_seed(0)
    model = create_model(load_config(TINY_CONFIG, ["model.parameterization=v"])).eval()
    for p in model.parameters():  # zero-initialised convs would make cond and uncond outputs equal
        p.data.add_(torch.randn_like(p) * 0.02)
    cond, uncond = _cond_and_uncond(model, torch.Generator().manual_seed(1))
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))

    for scale in (2.5, 0.5):
        def guided(x, t):
            u = model.apply_model(x, t, uncond)
            return u + scale * (model.apply_model(x, t, cond) - u)

        want = sampler.ddim_sample(guided, x_T, model.alphas_cumprod, steps=3, eta=1.0, parameterization="v",
                                   generator=torch.Generator().manual_seed(3))
        got = model.sample(cond, x_T=x_T, steps=3, eta=1.0, guidance_scale=scale, uncond=uncond,
                           generator=torch.Generator().manual_seed(3))
        # cond and uncond run as one batch there, two calls here: 1.6e-6 apart at 0.5, 5.2e-5 at 2.5 (CPU,
        # 2026-11-29); cond and uncond swapped: 0.67
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)
    unguided = model.sample(cond, x_T=x_T, steps=3, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert (unguided - want).abs().max() > 1e-3  # the guidance counts
    with pytest.raises(ValueError, match="guidance_scale != 1 needs an unconditional ColorCondition"):
        model.sample(cond, x_T=x_T, steps=3, guidance_scale=0.5)


def test_training_loss_draws_t_then_noise_from_the_generator():
    """t = randint(0, T) then noise = randn, both from `generator`, in that order."""
    model = _randomised_tiny_model()
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(2, 4, 4, 4, generator=g)
    cond = model.prepare_condition(torch.rand(2, 4, 32, 32, generator=g), context=torch.randn(2, 77, 32, generator=g))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    with torch.no_grad():
        want = model.training_loss(z0, cond, noise=noise, t=t)
        got = model.training_loss(z0, cond, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)






