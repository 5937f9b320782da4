"""cldm/convert.py: the initial checkpoint from plain SD weights."""
import re

import pytest
import torch

from cldm.checkpoint import CheckpointError
from cldm.convert import init_from_sd
from cldm.config import TINY_CONFIG, load_config
from cldm.model import create_model
from tests.train_helpers import tiny_sd_state

INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def test_the_input_conv_is_widened_with_zeros():
    sd = tiny_sd_state()
    out, report = init_from_sd(create_model(load_config(TINY_CONFIG)), sd)  # v2: 4 + 5 input channels
    assert out[INPUT_CONV].shape[1] == 9 and INPUT_CONV in report.widened
    assert torch.equal(out[INPUT_CONV][:, :4], sd[INPUT_CONV]) and not out[INPUT_CONV][:, 4:].any()


@pytest.mark.parametrize("shape", [(64, 4, 3, 3), (32, 4, 1, 1), (32, 12, 3, 3)])
def test_an_input_conv_that_cannot_be_widened_is_named_with_the_other_mismatches(shape):
    """An SD file of another architecture (other widths, a wider input) is refused in the one
    line every other mismatch gets, saying what the file looks like and that it does not fit the
    config, not as a bare "cannot widen shape" that stops at the first conv."""
    sd = {**tiny_sd_state(), INPUT_CONV: torch.zeros(shape)}
    with pytest.raises(CheckpointError) as e:
        init_from_sd(create_model(load_config(TINY_CONFIG)), sd)
    line = str(e.value)
    assert line.startswith("checkpoint (unknown SD variant (context dim 32) weights) does not match the model config: ")
    for key in (INPUT_CONV, "control_model.input_blocks.0.0.weight"):  # the ControlNet's copy of it too
        assert f"{key}: file {shape} vs model (32, 9, 3, 3)" in line


# Mutation round 10: which tensor ends up where, from which source, in which dtype and bucket.
from cldm.convert import InitReport  # noqa: E402
from ldm.schedule import BUFFER_NAMES  # noqa: E402

UNET, CONTROL = "model.diffusion_model.", "control_model."
HINT = "control_model.input_hint_block.0.weight"


def _init(sd=None, fresh=None, dtype=None, meta=False):
    cfg = load_config(TINY_CONFIG)
    if meta:
        with torch.device("meta"):
            model = create_model(cfg)
    else:
        torch.manual_seed(3)
        model = create_model(cfg)
    own = {k: v.clone() for k, v in model.state_dict().items()} if not meta else None
    out, report = init_from_sd(model, tiny_sd_state() if sd is None else sd, fresh=fresh, dtype=dtype)
    return out, report, own


def test_every_tensor_comes_from_its_source_and_lands_in_one_bucket():
    sd = {**tiny_sd_state(), "zz.extra": torch.ones(1), "aa.extra": torch.ones(2)}
    out, report, own = _init(sd)
    widened = [UNET + "input_blocks.0.0.weight", CONTROL + "input_blocks.0.0.weight"]
    assert report.widened == widened
    assert report.ignored == ["aa.extra", "zz.extra"]  # sorted, and only the file's extras
    buckets = [report.copied, report.control_from_unet, report.widened, report.new, report.schedule]
    assert sorted(k for b in buckets for k in b) == sorted(own)  # each model tensor in exactly one bucket
    for k in report.copied:
        assert not k.startswith(CONTROL)
        assert torch.equal(out[k], sd[k]), k
    assert report.schedule == [k for k in own if k in BUFFER_NAMES] and len(report.schedule) == len(BUFFER_NAMES)
    for k in report.schedule:  # the config's, though the file holds them too (was: "copied from SD")
        assert torch.equal(out[k], own[k]), k
    assert report.control_from_unet and all(k.startswith(CONTROL) for k in report.control_from_unet)
    for k in report.control_from_unet:  # the ControlNet encoder starts as the UNet encoder
        assert torch.equal(out[k], sd[UNET + k[len(CONTROL):]]), k
    assert HINT in report.new and all(k.startswith(CONTROL) and UNET + k[len(CONTROL):] not in sd for k in report.new)
    for k in report.new:  # fresh init kept as the model made it (random hint block, zero convs)
        assert torch.equal(out[k], own[k]), k
    assert out[HINT].abs().sum() > 0


def test_fresh_gives_the_new_layers_and_the_schedule_so_the_model_may_be_on_meta():
    torch.manual_seed(7)
    fresh = {k: v.clone() for k, v in create_model(load_config(TINY_CONFIG)).state_dict().items()}
    sd = {k: v for k, v in tiny_sd_state().items() if k not in BUFFER_NAMES}  # a file without the schedule
    fresh["betas"] = fresh["betas"] * 1.5  # tells fresh's schedule from the model's
    out, report, _ = _init(sd, fresh=fresh, meta=True)
    assert all(v.device.type == "cpu" for v in out.values())
    for k in [*report.new, *BUFFER_NAMES]:
        assert torch.equal(out[k], fresh[k]), k


def test_dtype_casts_the_weights_once_and_keeps_the_schedule_float32():
    out, report, own = _init(dtype=torch.float16)
    for bucket in (report.copied, report.control_from_unet, report.widened, report.new, report.schedule):
        for k in bucket:
            assert out[k].dtype == (torch.float32 if k in BUFFER_NAMES else torch.float16), k
    for k in BUFFER_NAMES:
        assert torch.equal(out[k], own[k])
    k = UNET + "input_blocks.0.0.weight"
    assert torch.equal(out[k][:, :4], tiny_sd_state()[k].half())


def test_the_schedule_comes_from_the_config_not_the_rounded_file():
    sd = {k: (v.half() if k in BUFFER_NAMES else v) for k, v in tiny_sd_state().items()}  # an fp16 file rounds it
    out, _, own = _init(sd)
    for k in BUFFER_NAMES:
        assert out[k].dtype == torch.float32 and torch.equal(out[k], own[k]), k


def test_a_file_of_another_noise_schedule_is_refused():
    sd = tiny_sd_state()
    sd["betas"] = sd["betas"] * 2
    with pytest.raises(CheckpointError, match=r"does not match the model config: its noise schedule \(betas\) "
                                              r"is not the config's"):
        _init(sd)


def test_a_missing_sd_tensor_is_named():
    key = UNET + "time_embed.0.weight"
    sd = {k: v for k, v in tiny_sd_state().items() if k != key}
    with pytest.raises(CheckpointError, match=f": missing {key}$"):
        _init(sd)


@pytest.mark.parametrize("key,shape", [
    (UNET + "input_blocks.1.0.in_layers.2.weight", (32, 31, 3, 3)),  # narrower, but not the input conv
    (UNET + "time_embed.0.weight", (32, 128)),                      # same count of numbers, transposed
])
def test_only_the_input_conv_may_differ_in_shape(key, shape):
    sd = {**tiny_sd_state(), key: torch.zeros(shape)}
    with pytest.raises(CheckpointError) as e:
        _init(sd)
    assert f"{key}: file {shape} vs model " in str(e.value)


def test_more_than_five_problems_are_counted_after_the_first_five():
    keys = [k for k in tiny_sd_state() if k.startswith(UNET + "time_embed") or k.startswith(UNET + "out.")]
    keys = sorted(keys)[:6]
    assert len(keys) == 6
    sd = {k: v for k, v in tiny_sd_state().items() if k not in keys}
    with pytest.raises(CheckpointError) as e:
        _init(sd)
    line = str(e.value)
    assert line.endswith("; ... (6 problems)") and line.count("missing ") == 5
    in_model_order = [k for k in create_model(load_config(TINY_CONFIG)).state_dict() if k in keys]
    assert all(f"missing {k};" in line for k in in_model_order[:5]) and in_model_order[5] not in line


def test_an_sd1_file_is_told_to_need_sd2_weights():
    sd = {k: (torch.zeros(v.shape[0], 768) if k.endswith("attn2.to_k.weight") else v)
          for k, v in tiny_sd_state().items()}
    with pytest.raises(CheckpointError) as e:
        _init(sd)
    assert re.fullmatch(r"SD1\.x weights \(768-wide cross-attention and a CLIP ViT-L text encoder\), not Stable "
                        r"Diffusion 2\.x: this model needs SD2\.x weights such as v2-1_512-ema-pruned \(\d+ problems, "
                        r"e\.g\. [^;]*attn2\.to_k\.weight: file \(\d+, 768\) vs model \(\d+, \d+\)\)", str(e.value)), e.value


def test_the_summary_counts_each_bucket_grouped_by_its_first_two_name_parts():
    r = InitReport(copied=["b.x.1", "a.y.2", "b.x.3", "v.1"], control_from_unet=["c.1", "c.2"],
                   widened=["w.1", "w.2"], new=["n.a.1"], schedule=["betas", "alphas_cumprod"], ignored=[])
    assert r.summary().splitlines() == [
        "copied from SD:            4 tensors: a.y.* (1), b.x.* (2), v.1.* (1)",
        "ControlNet from SD UNet:   2 tensors",
        "widened (zero new inputs): w.1, w.2",
        "new (fresh init):          1 tensors: n.a.* (1)",
        "noise schedule (config):   2 buffers",
        "ignored from the file:     0 tensors: -",
    ]
    assert InitReport().summary().splitlines()[2] == "widened (zero new inputs): -"


def test_ema_weights_are_one_group_and_the_summary_says_which_weights_were_copied():
    """A full LDM checkpoint's EMA copy (model_ema.<name without inner dots>) was listed tensor by
    tensor (a 22 KB line for SD2.1) and nothing said that its model.* weights, not the EMA ones,
    were copied."""
    sd = tiny_sd_state()
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    ema.update({"model_ema." + k[len(UNET):].replace(".", ""): v for k, v in sd.items() if k.startswith(UNET)})
    _, report, _ = _init({**sd, **ema})
    lines = report.summary().splitlines()
    assert lines[5] == f"ignored from the file:     {len(ema)} tensors: model_ema.* ({len(ema)})"
    assert lines[6] == ("  (model_ema.*: the file's EMA weights; its model.* weights were copied, as SD's own "
                        "inference uses them; SD's *-ema-pruned files hold the EMA weights as model.*)")
    _, plain, _ = _init(sd)
    assert len(plain.summary().splitlines()) == 6
