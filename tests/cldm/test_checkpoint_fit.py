"""How a state dict fits a model: the load report, refusing checkpoints of another model in one
line with the likely cause, and what a file looks like."""
import json
from pathlib import Path

import pytest
import torch

from cldm import checkpoint_fit
from cldm.checkpoint import CheckpointError, load_state_dict, save_state_dict
from cldm.checkpoint_fit import compare_state_dict, guess_kind, load_into, misfit
from tests.helpers import TinyLDM, assert_same, tiny_colour_model

FIXTURES = Path(__file__).parent.parent / "fixtures"


def sd21_shapes():
    keys = json.loads((FIXTURES / "sd21_controlnet_keys.json").read_text())["keys"]
    return {k: tuple(s) for k, s in keys.items()}


def test_summary_groups_keys_by_prefix():
    model = sd21_shapes()
    sd = {k: s for k, s in model.items() if not k.startswith("control_model.")}
    sd["model_ema.decay"] = ()
    report = compare_state_dict(model, sd)
    assert len(report.matched) == 1241 and len(report.missing) == 340
    lines = report.summary().splitlines()
    assert lines == ["1241 of 1581 model tensors found in the checkpoint",
                     "missing 340:", "  control_model.* (340 tensors)",
                     "unexpected 1:", "  model_ema.decay"]
    assert misfit(report) is None  # plain SD2.1 weights into ControlLDM: a normal start


def test_sd15_like_checkpoint_is_clearly_not_this_model():
    model = sd21_shapes()
    sd15 = {k: (s[0], 768) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else s
            for k, s in model.items() if not k.startswith(("control_model.", "cond_stage_model."))}
    sd15.update({f"cond_stage_model.transformer.text_model.encoder.layers.{i}.w": (4,) for i in range(12)})
    report = compare_state_dict(model, sd15)
    assert len(report.mismatched) == 32
    assert misfit(report) == (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight is [320, 768] in the "
        "checkpoint but [320, 1024] in the model (and 31 more tensors of another shape); likely SD1.x weights "
        "(768-wide cross-attention and a CLIP ViT-L text encoder), not Stable Diffusion 2.x: this model needs SD2.x "
        "weights such as v2-1_512-ema-pruned")
    summary = report.summary()
    assert "model.diffusion_model.* (32 tensors), e.g." in summary and "[320, 1024] vs [320, 768]" in summary
    assert len(summary.splitlines()) < 10
    assert guess_kind(sd15) == "SD1.x weights"
    v2 = {**model, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}  # our v2 model
    assert misfit(compare_state_dict(v2, sd15)).endswith(  # not "make it with tool_add_control_sd21.py"
        "likely SD1.x weights (768-wide cross-attention and a CLIP ViT-L text encoder), not Stable Diffusion 2.x: "
        "this model needs SD2.x weights such as v2-1_512-ema-pruned")


def test_guess_kind_tells_sd21_controlnet_and_our_variants_apart():
    fixture = json.loads((FIXTURES / "sd21_controlnet_keys.json").read_text())
    model = sd21_shapes()
    assert guess_kind({k: s for k, s in model.items() if not k.startswith("control_model.")}) == "SD2.x weights"
    assert guess_kind(model) == "ControlNet (3-channel hint) on SD2.x"
    for variant, overrides in fixture["variant_overrides"].items():
        assert guess_kind({**model, **overrides}) == f"ours: colour ControlNet {variant} on SD2.x"
    control_only = {k: s for k, s in model.items() if k.startswith("control_model.")}
    assert guess_kind(control_only) == "ControlNet (3-channel hint) on SD2.x, ControlNet weights only"


def test_load_into_refuses_a_different_context_width_and_leaves_model_untouched():
    model, before = TinyLDM(ctx=16), TinyLDM(ctx=16).state_dict()
    model.load_state_dict(before)
    with pytest.raises(CheckpointError) as err:
        load_into(model, TinyLDM(ctx=12).state_dict())
    msg = str(err.value)
    assert msg == ("checkpoint (unknown SD variant (context dim 12) weights) does not fit TinyLDM: "
                   "model.diffusion_model.attn2.to_k.weight is [8, 12] in the checkpoint but [8, 16] in the "
                   "model (and 2 more tensors of another shape); likely another model config (the file looks "
                   "like: unknown SD variant (context dim 12) weights)")
    assert "  model.diffusion_model.attn2.to_k.weight: [8, 16] vs [8, 12]" in err.value.report.summary().splitlines()
    assert_same(model.state_dict(), before)


def test_load_into_refuses_a_reshaped_tensor_outside_the_locked_parts():
    """A new part (ControlNet) of another shape can't be loaded: an error, not a tensor left random."""
    model = TinyLDM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = TinyLDM().state_dict()
    sd["control_model.zero.weight"] = torch.ones(8, 6)
    with pytest.raises(CheckpointError) as err:
        load_into(model, sd)
    assert str(err.value) == ("checkpoint (unknown SD variant (context dim 16) weights) does not fit TinyLDM: "
                              "control_model.zero.weight is [8, 6] in the checkpoint but [8, 8] in the model; "
                              "likely another model config (the file looks like: unknown SD variant (context "
                              "dim 16) weights)")
    assert err.value.report.mismatched == {"control_model.zero.weight": ((8, 8), (8, 6))}
    assert_same(model.state_dict(), before)


def test_checkpoint_of_another_colour_variant_names_the_key_shapes_and_cause(tmp_path):
    """v1 without concat_to_unet shares every shape with v2 without it except the ControlNet input conv."""
    path = tmp_path / "v1.safetensors"
    save_state_dict(tiny_colour_model("model.color_variant=v1", "model.concat_to_unet=false").state_dict(), path)
    model = tiny_colour_model("model.color_variant=v2", "model.concat_to_unet=false")
    conv_before = model.control_model.input_blocks[0][0].weight.clone()
    with pytest.raises(CheckpointError) as err:
        load_into(model, load_state_dict(path))
    assert str(err.value) == (
        "checkpoint (ours: colour ControlNet v1 on unknown SD variant (context dim 32)) does not fit ControlLDM: "
        "control_model.input_blocks.0.0.weight is [32, 4, 3, 3] in the checkpoint but [32, 9, 3, 3] in the "
        "model; likely another colour variant: the file's ControlNet takes 4 input channels (colour variant "
        "v1), this config's 9 (v2); set model.color_variant=v1")
    assert torch.equal(model.control_model.input_blocks[0][0].weight, conv_before)

    # Every loader that checks with misfit gets the same one line, e.g. the inference pipeline.
    from cldm.config import TINY_CONFIG
    from colorize.loading import load_model
    with pytest.raises(CheckpointError, match=r"does not fit the config: control_model\.input_blocks\.0\.0\.weight "
                                              r"is \[32, 4, 3, 3\] in the checkpoint but \[32, 9, 3, 3\].*"
                                              r"another colour variant") as err:
        load_model(path, config=TINY_CONFIG, overrides=["model.color_variant=v2", "model.concat_to_unet=false"])
    assert "\n" not in str(err.value)

    # The UNet's input conv differing too (default concat_to_unet=true) still leads with the ControlNet's.
    with pytest.raises(CheckpointError, match=r"control_model\.input_blocks\.0\.0\.weight .* \(and 1 more tensor "
                                              r"of another shape\); likely another colour variant"):
        load_into(tiny_colour_model("model.color_variant=v2"), load_state_dict(path))


def test_plain_sd_weights_point_to_the_init_tool():
    sd = {k: v for k, v in tiny_colour_model("model.color_variant=v1").state_dict().items()
          if not k.startswith("control_model.")}
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight is \[32, 4, 3, 3\] "
                                              r"in the checkpoint but \[32, 9, 3, 3\] in the model; likely plain Stable "
                                              r"Diffusion weights .* tool_add_control_sd21\.py"):
        load_into(tiny_colour_model("model.color_variant=v2"), sd)


def test_load_into_partial_load_casts_dtype_and_reports(caplog):
    src, model = TinyLDM(), TinyLDM()
    sd = {k: v.half() for k, v in src.state_dict().items() if not k.startswith("control_model.")}
    sd["model_ema.decay"] = torch.tensor(0.999)
    ctrl_before = model.control_model.hint.weight.clone()
    with caplog.at_level("WARNING", logger="cldm.checkpoint_fit"):
        report = load_into(model, sd)
    # visible at the default log level, not only at INFO
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage() == ("partial load into TinyLDM:\n7 of 11 model tensors found in the "
                                              "checkpoint\nmissing 4:\n  control_model.* (4 tensors)\n"
                                              "ignored 1:\n  model_ema.decay")
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith("control_model."))
    assert report.ignored == ["model_ema.decay"] and not report.unexpected and not report.mismatched
    w = model.model.diffusion_model.attn2.to_k.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, src.model.diffusion_model.attn2.to_k.weight.half().float(), rtol=0, atol=0)
    assert torch.equal(model.control_model.hint.weight, ctrl_before)


def test_load_into_refuses_half_a_strict_part_or_mostly_missing():
    sd = TinyLDM().state_dict()
    del sd["model.diffusion_model.out.bias"]
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.\* does not match the model \(1 missing, "
                                              r"e\.g\. model\.diffusion_model\.out\.bias\)$"):
        load_into(TinyLDM(), sd)
    bare_unet = {k.removeprefix("model.diffusion_model."): v for k, v in TinyLDM().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"only 5 of 11 model tensors found"):
        load_into(TinyLDM(), {k: v for k, v in bare_unet.items() if not k.startswith("cond_stage")})
    # min_matched is "at least": exactly that share fits, one tensor fewer does not
    report = compare_state_dict(TinyLDM(), {k: v for k, v in bare_unet.items() if not k.startswith("cond_stage")})
    assert len(report.matched) == 5 and misfit(report, strict_prefixes=(), min_matched=5 / 11) is None
    assert misfit(report, strict_prefixes=(), min_matched=6 / 11) == \
        "only 5 of 11 model tensors found in the checkpoint"
    # everything strict: even the new ControlNet must be there
    sd = {k: v for k, v in TinyLDM().state_dict().items() if not k.startswith("control_model.zero")}
    with pytest.raises(CheckpointError, match=r"\(all\)\* does not match the model \(2 missing, e\.g\. "
                                              r"control_model\.zero\.weight\)$"):
        load_into(TinyLDM(), sd, strict_prefixes=("",))


def test_schedule_comes_from_the_config_not_from_a_rounded_file():
    """An fp16/bf16 file holds a rounded schedule (bf16 makes alphas_cumprod[0] exactly 1): both
    loaders keep the config's float32 one; a file without it loads too; another schedule is refused."""
    from cldm.convert import init_from_sd
    from ldm.schedule import BUFFER_NAMES, schedule_buffers

    exact = schedule_buffers()
    sd = tiny_colour_model().state_dict()
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    assert bf16["alphas_cumprod"][0].item() == 1.0  # what rounding does to it
    for state in (bf16, {k: v for k, v in sd.items() if k not in BUFFER_NAMES}):
        model = tiny_colour_model()
        load_into(model, state)
        out, _ = init_from_sd(tiny_colour_model(), {k: v for k, v in state.items() if not k.startswith("control_")})
        for name in BUFFER_NAMES:
            assert torch.equal(model.state_dict()[name], exact[name]) and torch.equal(out[name], exact[name]), name
    other = {**sd, "betas": sd["betas"] * 1.5}
    with pytest.raises(CheckpointError, match=r"noise schedule \(betas\) is not the config's"):
        load_into(tiny_colour_model(), other)
    with pytest.raises(CheckpointError, match=r"noise schedule \(betas\) is not the config's"):
        init_from_sd(tiny_colour_model(), other)


def test_unexpected_tensors_make_a_partial_load_and_keys_group_by_prefix():
    model = {"u.a": (2,), "u.b": (2,), "u.c": (2,)}
    report = compare_state_dict(model, {**model, "ema.x": (1,), "ema.y": (1,), "ema.z": (1,), "step": ()})
    assert not report.ok and misfit(report) is None
    assert report.summary() == ("3 of 3 model tensors found in the checkpoint\nunexpected 4:\n  ema.* (3 tensors)\n"
                                "  step")
    # groups of up to two names are loose names, on one line with the others
    assert checkpoint_fit.group_keys(["c.x.1", "c.x.2", "c.y", "a.b.1", "a.b.2", "z"]) == [
        ("c.* (3 tensors)", "c.x.1"), ("a.b.1, a.b.2, z", "a.b.1")]
    assert checkpoint_fit.group_keys([f"k{i}" for i in range(8)], max_names=6) == [
        ("k0, k1, k2, k3, k4, k5, ... (+2 more)", "k0")]


def test_a_unet_input_conv_of_another_concat_setting_is_not_called_plain_sd():
    """Our own file (not plain SD) whose UNet takes 4 channels: saved with concat_to_unet=false."""
    sd = tiny_colour_model("model.color_variant=v2", "model.concat_to_unet=false").state_dict()
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight is \[32, 4, 3, 3\] "
                                              r"in the checkpoint but \[32, 9, 3, 3\] in the model; likely another "
                                              r"colour variant or concat_to_unet setting: the file's UNet takes 4 "
                                              r"input channels, this config's 9 \(model\.color_variant, "
                                              r"model\.concat_to_unet\)$"):
        load_into(tiny_colour_model("model.color_variant=v2"), sd)


def test_a_controlnet_of_another_task_is_named_not_taken_for_colour_variant_v1():
    """A canny/depth SD2.1 ControlNet has v1's 4-channel input conv: the advice was to set
    color_variant=v1, which then failed on its 3-channel hint block."""
    sd = tiny_colour_model("model.color_variant=v1").state_dict()
    sd["control_model.input_hint_block.0.weight"] = sd["control_model.input_hint_block.0.weight"][:, :3]
    with pytest.raises(CheckpointError) as e:
        load_into(tiny_colour_model("model.color_variant=v2"), sd)
    assert str(e.value).endswith(
        "likely a ControlNet of another task (ControlNet (3-channel hint) on unknown SD variant (context dim 32): canny, "
        "depth, pose, ...), which cannot colourise (a colour ControlNet's hint is reference RGB + gray, 4 channels): "
        "use a ControlNet trained by tutorial_train_sd21_color_v2.py"), str(e.value)
    assert "color_variant" not in str(e.value)


def test_guess_kind_names_the_diffusers_format_and_prefixless_tensors():
    for key in ("down_blocks.0.resnets.0.conv1.weight", "controlnet_cond_embedding.conv_in.weight",
                "encoder.down_blocks.0.resnets.0.conv1.weight"):
        assert guess_kind({key: (4, 4, 3, 3), "conv_in.weight": (4, 4, 3, 3)}).startswith("diffusers format")
    assert guess_kind({"input_blocks.0.0.weight": (4, 4, 3, 3)}) == (
        "UNet or ControlNet tensors without their model.diffusion_model. or control_model. prefix")
    assert guess_kind({"x": (1,)}) == "unknown (no model.diffusion_model.* or control_model.* tensors)"


def test_guess_kind_of_unusual_files():
    unet = "model.diffusion_model.x."
    assert guess_kind({unet + "attn2.to_k.weight": (4, 1024)}) == "SD2.x weights, no text encoder"
    assert guess_kind({unet + "attn2.to_k.weight": (4,)}) == "unknown SD variant weights, no text encoder"
    assert guess_kind({"control_model.input_hint_block.0.weight": (16, 6, 3, 3)}) == \
        "ControlNet (6-channel hint) on unknown SD variant, ControlNet weights only"
    # a 4-channel hint without the ControlNet's input conv: no variant to read (not v1's 4 channels)
    assert guess_kind({"control_model.input_hint_block.0.weight": (16, 4, 3, 3)}) == \
        "ours: colour ControlNet ? on unknown SD variant, ControlNet weights only"
    assert guess_kind({unet + "attn2.to_k.weight": (4, 2048)}) == "SDXL weights, no text encoder"


def test_loose_names_are_listed_up_to_max_names_six_by_default():
    keys = [f"k{i}" for i in range(7)]
    assert checkpoint_fit.group_keys(keys[:6]) == [("k0, k1, k2, k3, k4, k5", "k0")]
    assert checkpoint_fit.group_keys(keys) == [("k0, k1, k2, k3, k4, k5, ... (+1 more)", "k0")]
    assert checkpoint_fit.group_keys(keys[:2], max_names=2) == [("k0, k1", "k0")]
    report = compare_state_dict({}, {k: (1,) for k in keys})
    assert report.summary().splitlines()[1:] == ["unexpected 7:", "  k0, k1, k2, k3, k4, k5, ... (+1 more)"]
    assert report.summary(max_names=2).splitlines()[-1] == "  k0, k1, ... (+5 more)"


def test_a_strict_part_is_checked_key_for_key_whatever_comes_before_it():
    """A strict part counts as present by any of its names, matched or unexpected; a strict part
    the file lacks does not end the check of the next; each count's example is its first name found
    (one example after both counts read as an unexpected tensor when it was a missing one)."""
    sd = TinyLDM().state_dict()  # no first_stage_model.*: the check goes on to cond_stage_model.*
    del sd["cond_stage_model.bias"]
    assert misfit(compare_state_dict(TinyLDM(), sd)) == ("the checkpoint's cond_stage_model.* does not match the "
                                                         "model (1 missing, e.g. cond_stage_model.bias)")
    renamed = {k: v for k, v in TinyLDM().state_dict().items() if not k.startswith("cond_stage_model.")}
    renamed["cond_stage_model.proj.weight"] = torch.ones(1)
    assert misfit(compare_state_dict(TinyLDM(), renamed)) == (
        "the checkpoint's cond_stage_model.* does not match the model (2 missing, e.g. cond_stage_model.weight; "
        "1 unexpected, e.g. cond_stage_model.proj.weight)")
    extra = {**TinyLDM().state_dict(), "cond_stage_model.x": torch.ones(1), "cond_stage_model.y": torch.ones(1)}
    assert misfit(compare_state_dict(TinyLDM(), extra)) == (
        "the checkpoint's cond_stage_model.* does not match the model (2 unexpected, e.g. cond_stage_model.x)")


def test_a_differing_input_conv_is_named_before_any_other_tensor():
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    model = {"control_model.a.weight": (2,), conv: (32, 9, 3, 3)}
    report = compare_state_dict(model, {"control_model.a.weight": (3,), conv: (32, 4, 3, 3)})
    assert not report.ok
    assert misfit(report).startswith(f"{conv} is [32, 4, 3, 3] in the checkpoint but [32, 9, 3, 3] in the model "
                                     "(and 1 more tensor of another shape); likely plain Stable Diffusion weights")


def test_likely_causes_of_other_files():
    """SDXL is named like SD1.x; a file's ControlNet of an unknown channel count gets no
    `set model.color_variant=` hint; another task's ControlNet (3-channel hint) is named as such."""
    key = "model.diffusion_model.input_blocks.1.1.attn2.to_k.weight"
    assert misfit(compare_state_dict({key: (320, 1024)}, {key: (320, 2048)})).endswith(
        "likely SDXL weights, no text encoder, not Stable Diffusion 2.x: this model needs SD2.x weights such as "
        "v2-1_512-ema-pruned")
    conv = "control_model.input_blocks.0.0.weight"
    assert misfit(compare_state_dict({conv: (32, 9, 3, 3)}, {conv: (32, 7, 3, 3)})).endswith(
        "likely another colour variant: the file's ControlNet takes 7 input channels (colour variant unknown), this "
        "config's 9 (v2)")
    model = sd21_shapes()
    unet_conv = "model.diffusion_model.input_blocks.0.0.weight"
    assert misfit(compare_state_dict({**model, unet_conv: (320, 9, 3, 3)}, model)).endswith(
        "likely a ControlNet of another task (ControlNet (3-channel hint) on SD2.x: canny, depth, pose, ...), which "
        "cannot colourise (a colour ControlNet's hint is reference RGB + gray, 4 channels): use a ControlNet trained "
        "by tutorial_train_sd21_color_v2.py")  # not "another colour variant or concat_to_unet setting"
