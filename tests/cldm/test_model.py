"""The assembled ControlLDM: key manifest, reference conformance, zero-init, per-sample caching."""
import json

import pytest
import torch

from cldm.model import DEFAULT_CONFIG, TINY_CONFIG, ConfigError, create_model, load_config
from tests.conftest import FIXTURES
from tests.helpers import DDIM_TOL, sub_state


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
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
    with pytest.raises(ConfigError, match="colour_variant.*Did you mean"):
        load_config(TINY_CONFIG, ["model.colour_variant=v3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY_CONFIG, ["model.color_variant"])
    with pytest.raises(ValueError, match="color_variant must be one of"):
        create_model(load_config(TINY_CONFIG, ["model.color_variant=v4"]))


@torch.no_grad()
def test_vae_encodes_once_per_sample_not_per_step():
    model = create_model(TINY_CONFIG).eval()
    calls = []
    model.first_stage_model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    text_calls = []
    model.cond_stage_model.model.register_forward_pre_hook(lambda m, a: text_calls.append(1))
    hint = torch.rand(3, 4, 64, 64)
    model.get_learned_conditioning([""])  # warm the blank-prompt cache
    text_calls.clear()
    cond = model.prepare_condition(hint)
    model.sample(cond, steps=20, generator=torch.Generator().manual_seed(0))
    assert calls == [3]       # one batched reference encode for 3 samples, none during 20 steps
    assert text_calls == []   # blank prompt embedding reused


@torch.no_grad()
def test_v3_encodes_reference_and_gray_once_each():
    model = create_model(load_config(TINY_CONFIG, ["model.color_variant=v3"])).eval()
    calls = []
    model.first_stage_model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    cond = model.prepare_condition(torch.rand(2, 4, 64, 64))
    model.sample(cond, steps=5)
    assert len(calls) == 2 and cond.concat.shape == (2, 8, 8, 8)
