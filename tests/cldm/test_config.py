"""The model config: YAML plus overrides, every key checked, each problem one line naming where it came from."""
import os
import re

import pytest
import yaml

from cldm.config import REPO, TINY_CONFIG, ConfigError, load_config
from cldm.model import create_model
from tests.helpers import named_pipe


def _write_text(tmp_path, text):
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    return path


def _without(text, *keys):
    return "".join(line for line in text.splitlines(keepends=True) if line.split(":")[0].strip() not in keys)


TINY_TEXT = TINY_CONFIG.read_text()


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



@pytest.mark.parametrize("text, expected", [
    ("", "model: missing; expected a mapping (as in cldm_v21_color.yaml)"),
    ("model: 3\n", "model: expected a mapping, got 3"),
    (re.sub(r"  unet:\n(    .*\n)+", "  unet: 5\n", TINY_TEXT), "model.unet: expected a mapping, got 5"),
    # a key nothing reads is named before the type errors (a misspelt key's right spelling is also "missing")
    (TINY_TEXT.replace("  unet:\n", "  unet: 5\n  old_unet:\n"), "model.old_unet: unknown key; did you mean unet?"),
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



@pytest.mark.parametrize("extra, line", [
    ("notes: mine\n", "notes: unknown key; known keys: model, train"),
    ("model:\n  guess_mode: true\n", "model.guess_mode: unknown key; known keys: color_variant, "
     "concat_to_unet, cond_stage, control, first_stage, latent_channels, only_mid_control, parameterization, "
     "scale_factor, schedule, sd_locked, train_unet_input, unet"),
    ("model:\n  sd_lockd: false\n", "model.sd_lockd: unknown key; did you mean sd_locked?"),
    ("model:\n  schedule:\n    linear_ned: 0.01\n", "model.schedule.linear_ned: unknown key; did you mean linear_end?"),
    ("model:\n  control:\n    hint_channel: 4\n", "model.control.hint_channel: unknown key; did you mean hint_channels?"),
    ("model:\n  first_stage:\n    embed: 4\n", "model.first_stage.embed: unknown key; did you mean embed_dim?"),
    ("model:\n  cond_stage:\n    comment: x\n", "model.cond_stage.comment: unknown key; known keys: arch, heads, "
     "layer, layers, max_length, width"),
    ("train:\n  lrr: 1\n", "train.lrr: unknown key; did you mean lr?"),
])
def test_a_key_nothing_reads_is_named_in_every_section(tmp_path, extra, line):
    """Added keys were ignored without a word (a misspelt `sd_lockd: false` trained the locked
    recipe; `cond_stage: {comment: x}` was a TypeError traceback from the text encoder)."""
    import omegaconf

    merged = omegaconf.OmegaConf.merge(omegaconf.OmegaConf.load(TINY_CONFIG), omegaconf.OmegaConf.create(extra))
    path = _write_text(tmp_path, omegaconf.OmegaConf.to_yaml(merged))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {line}"


def test_an_sd_training_yaml_is_named_as_one_before_its_other_sections(tmp_path):
    path = _write_text(tmp_path, "model:\n  target: cldm.cldm.ControlLDM\n  params: {}\ndata:\n  target: x\n"
                                 "lightning: {}\n")
    with pytest.raises(ConfigError, match=r"edited\.yaml: model\.target: a config in the layout of SD's"):
        load_config(path)


def test_a_resolver_call_is_refused_in_a_file_an_override_and_a_checkpoints_config(tmp_path, monkeypatch):
    """`${oc.env:X}` in a shared YAML (or in the config a shared checkpoint records) copied the
    user's environment variable into the metadata of every checkpoint and export, hparams.yaml
    and TensorBoard's events. A plain ${key} interpolation reads only the config."""
    import omegaconf

    monkeypatch.setenv("MY_SECRET_TOKEN", "hunter2")
    why = ("calls a resolver, which a config (often a shared one) may not: the value would be recorded in checkpoints "
           "and logs (${oc.env:...} would copy an environment variable there)")
    path = _write_text(tmp_path, TINY_TEXT.replace("arch: ViT-H-14", "arch: ${oc.env:MY_SECRET_TOKEN}"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: model.cond_stage.arch: '${{oc.env:MY_SECRET_TOKEN}}' {why}; write the value " \
                           "itself in its place"  # not hunter2 (a run's config.yaml from an earlier version: edit it)
    override = "train.optimizer=x${oc.env:MY_SECRET_TOKEN}"
    with pytest.raises(ConfigError) as e:
        load_config(TINY_CONFIG, [override])
    assert str(e.value) == f"{TINY_CONFIG} with {override}: train.optimizer: 'x${{oc.env:MY_SECRET_TOKEN}}' {why}; " \
                           "write the value itself in the override"
    recorded = omegaconf.OmegaConf.create(TINY_TEXT.replace("layer: penultimate", "layer: '${oc.env:HOME}'"))
    with pytest.raises(ConfigError) as e:
        load_config(recorded, ["train.seed=1"], name="X.safetensors")
    assert str(e.value) == f"X.safetensors: model.cond_stage.layer: '${{oc.env:HOME}}' {why}"  # no file to edit
    tied = _write_text(tmp_path, TINY_TEXT.replace("latent_channels: 4", "latent_channels: ${oc.env:LC,4}"))
    with pytest.raises(ConfigError) as e:  # the override of a key tied to it holds no resolver call
        load_config(tied, ["model.first_stage.embed_dim=4"])
    assert str(e.value).startswith(f"{tied}: model.latent_channels: '${{oc.env:LC,4}}' calls a resolver")
    assert str(e.value).endswith("; write the value itself in its place")
    cfg = load_config(TINY_CONFIG, ["train.seed=${train.accumulate}"])
    assert cfg.train.seed == cfg.train.accumulate
    escaped = _write_text(tmp_path, TINY_TEXT.replace("optimizer: adamw", "optimizer: \\${oc.env:HOME}"))
    assert load_config(escaped).train.optimizer == "${oc.env:HOME}"  # a literal string, no call


def test_use_linear_in_transformer_true_is_accepted(tmp_path):
    model = create_model(load_config(_write_config(tmp_path, lambda m: m["unet"].update(use_linear_in_transformer=True))))
    assert model.size_multiple == 32



@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_config_that_is_no_file_says_which_it_is(tmp_path):
    with pytest.raises(ConfigError, match=r"^config not found: \S+nope\.yaml$"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"^config \S+: is a folder$"):  # was "config not found"
        load_config(tmp_path)
    with named_pipe(tmp_path / "pipe.yaml") as pipe, pytest.raises(
            ConfigError, match=r"^config \S+pipe\.yaml: not a regular file \(a named pipe, socket or device\)$"):
        load_config(pipe)  # was "config not found"; reading it would block



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


def test_overrides_given_as_one_string_or_a_mapping():
    """A string was read a character at a time ("override must look like key=value, got 'm'")."""
    assert load_config(TINY_CONFIG, "model.color_variant=v3").model.color_variant == "v3"
    assert load_config(TINY_CONFIG, (o for o in ["model.color_variant=v3"])).model.color_variant == "v3"  # not used up
    with pytest.raises(ConfigError, match=r"^overrides must be key=value strings, e\.g\. \['model\.color_variant=v3'\], "
                                          r"got \{'model\.color_variant': 'v3'\}$"):
        load_config(TINY_CONFIG, {"model.color_variant": "v3"})
