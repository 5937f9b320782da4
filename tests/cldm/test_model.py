"""The assembled ControlLDM: key manifest, reference conformance, zero-init, per-sample caching."""
import json
import os
import re

import pytest
import torch
import yaml

from cldm.color import VARIANTS
from cldm.model import DEFAULT_CONFIG, REPO, TINY_CONFIG, ConfigError, create_model, load_config
from ldm import schedule
from tests.conftest import FIXTURES
from tests.helpers import DDIM_TOL, named_pipe


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


def test_bad_override_is_a_one_line_error():
    with pytest.raises(ConfigError, match="colour_variant.*did you mean"):
        load_config(TINY_CONFIG, ["model.colour_variant=v3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY_CONFIG, ["model.color_variant"])
    with pytest.raises(ConfigError, match=r"model\.color_variant: expected one of v1, v2, v3, got 'v4'$"):
        load_config(TINY_CONFIG, ["model.color_variant=v4"])  # refused before a model is built
    with pytest.raises(ConfigError, match=r"cldm_tiny_color\.yaml: Interpolation key 'nope' not found$"):
        load_config(TINY_CONFIG, ["model.scale_factor=${nope}"])  # resolved when loaded, not deep in create_model


def test_a_misspelt_override_names_the_override_and_its_whole_key():
    """OmegaConf's "Key 'model_chanels' is not in struct" names neither the override nor the key's
    section; among several overrides the line names the one that does not fit."""
    with pytest.raises(ConfigError) as e:
        load_config(TINY_CONFIG, ["train.lr=1", "model.unet.model_chanels=32", "model.nope=1"])
    assert str(e.value) == ("bad override model.unet.model_chanels=32 for cldm_tiny_color.yaml: "
                            "model.unet.model_chanels: no such key "
                            "(did you mean one of: 'model_channels', 'num_head_channels'?)")
    with pytest.raises(ConfigError) as e:
        load_config(TINY_CONFIG, ["model.nope.deeper=1"])
    assert str(e.value) == "bad override model.nope.deeper=1 for cldm_tiny_color.yaml: model.nope: no such key"


@pytest.mark.parametrize("override, expected", [
    ("train.low=abc", "train.low: expected a number or null, got 'abc'"),
    ("train.min_gap=2.5", "train.min_gap: expected a positive integer or null, got 2.5"),
    ("train.compile=1", "train.compile: expected true or false, got 1"),
    ("model.scale_factor=abc", "model.scale_factor: expected a positive number, got 'abc'"),
    ("model.scale_factor=.nan", "model.scale_factor: expected a positive number, got nan"),
    ("model.scale_factor=.inf", "model.scale_factor: expected a positive number, got inf"),
    ("model.scale_factor=0", "model.scale_factor: expected a positive number, got 0"),
    ("model.scale_factor=null", "model.scale_factor: expected a positive number, got None"),  # null only in NULL_OK
    ("train.low=.nan", "train.low: expected a number or null, got nan"),
    ("model.unet.model_channels=abc", "model.unet.model_channels: expected a positive integer, got 'abc'"),
    ("model.unet.model_channels=-3", "model.unet.model_channels: expected a positive integer, got -3"),
    ("model.unet.model_channels=true", "model.unet.model_channels: expected a positive integer, got True"),
    ("model.unet.channel_mult=[1,0]", "model.unet.channel_mult: expected a list of positive integers, got [1, 0]"),
    ("model.schedule.timesteps=abc", "model.schedule.timesteps: expected a positive integer, got 'abc'"),
    ("model.sd_locked=maybe", "model.sd_locked: expected true or false, got 'maybe'"),
    ("model.concat_to_unet=maybe", "model.concat_to_unet: expected true or false, got 'maybe'"),
    ("model.unet.use_checkpoint=abc", "model.unet.use_checkpoint: expected true or false, got 'abc'"),
    ("model.first_stage.ddconfig.dropout=1", "model.first_stage.ddconfig.dropout: expected a number in [0, 1), got 1"),
    ("model.first_stage.ddconfig.dropout=-0.1",
     "model.first_stage.ddconfig.dropout: expected a number in [0, 1), got -0.1"),
    ("model.parameterization=x0", "model.parameterization: expected one of eps, v, got 'x0'"),
    ("model.unet=5", "model.unet: expected a mapping, got 5"),
])
def test_an_override_of_the_wrong_type_is_a_config_error_naming_file_override_and_key(override, expected):
    """Types come from the reference config (bool is not an int; an int is fine for a float);
    sizes and counts must be positive. Else: a torch traceback, or a run that fails after writing OUT."""
    with pytest.raises(ConfigError) as e:
        load_config(TINY_CONFIG, ["model.color_variant=v3", override, "train.num_workers=0"])
    assert str(e.value) == f"{TINY_CONFIG} with {override}: {expected}"


def test_the_error_names_the_last_override_that_set_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(TINY_CONFIG, ["model.unet.model_channels=8", "train.seed=1", "model.unet.model_channels=-1"])
    assert str(e.value) == (f"{TINY_CONFIG} with model.unet.model_channels=-1: model.unet.model_channels: "
                            "expected a positive integer, got -1")


def test_legitimate_values_and_nulls_pass():
    cfg = load_config(TINY_CONFIG, ["model.color_variant=v3", "model.concat_to_unet=false", "model.parameterization=v",
                                    "model.scale_factor=1", "model.cond_stage=null", "model.unet.use_checkpoint=true",
                                    "model.first_stage.ddconfig.dropout=0.1", "train.low=-0.5", "train.high=1",
                                    "train.min_gap=null", "train.precision=32", "train.max_epochs=null",
                                    "train.batch_size=null"])  # train: numbers are the training script's to check
    assert (cfg.model.scale_factor, cfg.model.cond_stage, cfg.train.low, cfg.train.min_gap) == (1, None, -0.5, None)
    assert (cfg.train.precision, cfg.train.batch_size) == (32, None)
    assert [load_config(p).model.color_variant for p in sorted(REPO.glob("models/**/*.yaml"))] == ["v2"] * 3


def _write_text(tmp_path, text):
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    return path


def _without(text, *keys):
    return "".join(line for line in text.splitlines(keepends=True) if line.split(":")[0].strip() not in keys)


TINY_TEXT = TINY_CONFIG.read_text()


@pytest.mark.parametrize("text, expected", [
    ("", "model: missing; expected a mapping (as in cldm_v21_color.yaml)"),
    ("model: 3\n", "model: expected a mapping, got 3"),
    (TINY_TEXT.replace("  unet:\n", "  unet: 5\n  old_unet:\n"), "model.unet: expected a mapping, got 5"),
    (_without(TINY_TEXT, "color_variant"), "model.color_variant: missing; expected one of v1, v2, v3"),
    (_without(TINY_TEXT, "scale_factor"), "model.scale_factor: missing; expected a positive number"),
    (_without(TINY_TEXT, "num_head_channels"), "model.unet.num_head_channels: missing; expected a positive integer"),
    (_without(TINY_TEXT, "seed"), "train.seed: missing; expected a number"),
    (TINY_TEXT.replace("train:\n", "train: 3\n").split("\n  size:")[0], "train: expected a mapping, got 3"),
    (TINY_TEXT.replace("compile: false", "compile: 'no'"), "train.compile: expected true or false, got 'no'"),
])
def test_a_yaml_lacking_a_key_or_with_a_value_of_another_type_is_a_config_error(tmp_path, text, expected):
    path = _write_text(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {expected}"


def test_an_override_can_mend_a_bad_value_of_the_file(tmp_path):
    """The merged result is checked: the file is named for its own bad values, the override for its;
    an override cannot add a key the file lacks (struct mode), and the file's lack is what is named."""
    path = _write_text(tmp_path, TINY_TEXT.replace("compile: false", "compile: 'no'"))
    assert load_config(path, ["train.compile=false"]).train.compile is False
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.lr=1"])
    assert str(e.value) == f"{path}: train.compile: expected true or false, got 'no'"
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.compile=maybe"])
    assert str(e.value) == f"{path} with train.compile=maybe: train.compile: expected true or false, got 'maybe'"
    path = _write_text(tmp_path, TINY_TEXT.replace("scale_factor: 0.18215", "scale_factor: ${nope}"))
    assert load_config(path, ["model.scale_factor=0.2"]).model.scale_factor == 0.2
    path = _write_text(tmp_path, _without(TINY_TEXT, "scale_factor"))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["model.scale_factor=0.2"])
    assert str(e.value) == f"{path}: model.scale_factor: missing; expected a positive number"


def test_optional_keys_and_a_vae_only_config_load(tmp_path):
    """train:, model.train_unet_input and model.cond_stage may be absent; a model: of first_stage
    alone is a VAE config (build_latent_cache.py), checked as far as it goes."""
    cfg = load_config(_write_text(tmp_path, _without(TINY_TEXT.split("\ntrain:")[0], "train_unet_input")
                                  .split("  cond_stage:")[0]))
    assert "train" not in cfg and "cond_stage" not in cfg.model and cfg.model.unet.model_channels == 32
    vae = TINY_TEXT.split("  first_stage:")[1].split("  cond_stage:")[0]
    assert load_config(_write_text(tmp_path, "model:\n  first_stage:" + vae)).model.first_stage.embed_dim == 4
    with pytest.raises(ConfigError, match=r"model\.first_stage\.ddconfig\.ch: expected a positive integer, got 0$"):
        load_config(_write_text(tmp_path, "model:\n  first_stage:" + vae.replace("ch: 32", "ch: 0")))


def test_a_checkpoints_config_is_checked_too():
    from omegaconf import OmegaConf

    saved = OmegaConf.load(TINY_CONFIG)
    saved.model.unet.model_channels = "abc"
    with pytest.raises(ConfigError, match=re.escape("the checkpoint's config: model.unet.model_channels: expected a "
                                                    "positive integer, got 'abc'")):
        load_config(saved)


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


def _write_config(tmp_path, edit):
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    edit(cfg["model"])
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["unet"].update(use_checkpint=True), r"model\.unet\.use_checkpint: unknown key; did you mean use_checkpoint\?"),
    (lambda m: m["unet"].update(in_channels=9), r"model\.unet\.in_channels: set from latent_channels and color_variant"),
    (lambda m: m["unet"].update(use_linear_in_transformer=False), r"model\.unet: use_linear_in_transformer=false"),
    (lambda m: m["first_stage"]["ddconfig"].update(tanh_out=True),
     r"model\.first_stage\.ddconfig\.tanh_out: unknown key"),
])
def test_unknown_or_unsupported_yaml_keys_are_config_errors(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        create_model(load_config(_write_config(tmp_path, edit)))


@pytest.mark.parametrize("section, wrong, right", [("unet", "model_chanels", "model_channels"),
                                                   ("ddconfig", "chh", "ch")])
def test_a_misspelt_yaml_key_is_named_with_the_file_not_as_the_key_it_lacks(tmp_path, section, wrong, right):
    """Found by load_config, which knows the file; create_model, given the config alone, could
    only say "model.unet.model_chanels: unknown key", and the reference check would first call
    the key it replaces missing."""
    def edit(m):
        part = m["unet"] if section == "unet" else m["first_stage"]["ddconfig"]
        part[wrong] = part.pop(right)
    path = _write_config(tmp_path, edit)
    key = f"model.unet.{wrong}" if section == "unet" else f"model.first_stage.ddconfig.{wrong}"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {key}: unknown key; did you mean {right}?"


def test_use_linear_in_transformer_true_is_accepted(tmp_path):
    model = create_model(load_config(_write_config(tmp_path, lambda m: m["unet"].update(use_linear_in_transformer=True))))
    assert model.size_multiple == 32


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


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_config_that_is_no_file_says_which_it_is(tmp_path):
    with pytest.raises(ConfigError, match=r"^config not found: \S+nope\.yaml$"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"^config \S+: is a folder$"):  # was "config not found"
        load_config(tmp_path)
    with named_pipe(tmp_path / "pipe.yaml") as pipe, pytest.raises(
            ConfigError, match=r"^config \S+pipe\.yaml: not a regular file \(a named pipe, socket or device\)$"):
        load_config(pipe)  # was "config not found"; reading it would block


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


def test_latent_channels_other_than_the_vaes_latent_are_refused_naming_both_keys():
    """It built, then failed at the first step: "expected input ... to have 13 channels, but got 9"."""
    with pytest.raises(ConfigError, match=r"with model\.latent_channels=8: model\.latent_channels: must equal "
                                          r"model\.first_stage\.embed_dim \(4\), the channels of the VAE's latents; "
                                          r"got 8$"):
        load_config(TINY_CONFIG, ["model.latent_channels=8"])
    with pytest.raises(ConfigError, match=r"with model\.first_stage\.embed_dim=8: model\.latent_channels: must equal "
                                          r"model\.first_stage\.embed_dim \(8\), .* got 4$"):  # the override that did it
        load_config(TINY_CONFIG, ["model.color_variant=v1", "model.first_stage.embed_dim=8"])
    assert create_model(load_config(TINY_CONFIG, ["model.latent_channels=8", "model.first_stage.embed_dim=8"])) \
        .first_stage_model.quant_conv.out_channels == 16  # mean and log-variance of 8 channels


def test_fewer_latent_channels_than_the_vaes_latent_are_refused_too():
    """Kills `!=` -> `>` in _latent_mismatch: 2 channels under a VAE of 4 is as wrong as 8."""
    with pytest.raises(ConfigError, match=r"with model\.latent_channels=2: model\.latent_channels: must equal "
                                          r"model\.first_stage\.embed_dim \(4\), the channels of the VAE's latents; "
                                          r"got 2$"):
        load_config(TINY_CONFIG, ["model.latent_channels=2"])


@pytest.mark.parametrize("ch_mult", ["[1,1,2]", "[1,1,2,2,2]"])
def test_a_vae_that_does_not_downsample_by_8_is_refused(ch_mult):
    """The hint block downsamples by 8, whatever the VAE does: with a 3-level VAE (/4) the config
    built, then the first step failed with "The size of tensor a (16) must match the size of
    tensor b (8)". A VAE-only config (build_latent_cache.py) may have any depth."""
    levels = ch_mult.count(",") + 1
    with pytest.raises(ConfigError, match=rf"with model\.first_stage\.ddconfig\.ch_mult={re.escape(ch_mult)}: "
                                          r"model\.first_stage\.ddconfig\.ch_mult: needs 4 levels: the VAE halves "
                                          r"the image between levels, 3 times, as the ControlNet hint block "
                                          rf"downsamples by 8; got {levels}$"):
        load_config(TINY_CONFIG, [f"model.first_stage.ddconfig.ch_mult={ch_mult}"])
    cfg = load_config(TINY_CONFIG)
    assert create_model(cfg).latent_factor == 8
    cfg.model.first_stage.ddconfig.ch_mult = [1, 1, 2]  # past the config check: the model refuses it itself
    with pytest.raises(ValueError, match="^the VAE downsamples by 4, the ControlNet hint block by 8: they must agree$"):
        create_model(cfg)
