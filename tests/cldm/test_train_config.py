"""cldm/train_config.py: the train: section's checks, the flags' keys, and what a refused config
names. Configs resolved from a command line: tests/scripts/test_train.py."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from cldm import train_config
from cldm.config import TINY_CONFIG, load_config


def test_null_means_off_where_the_config_allows_it():
    cfg = load_config(TINY_CONFIG, ["train.max_epochs=null", "train.grad_clip=null", "train.val_every=null",
                                    "train.image_every=null"])
    train_config.check_train_numbers(cfg.train)  # no error: no epoch limit, no clipping, no validation, no images
    train_config.check_train_numbers(load_config(TINY_CONFIG, ["train.max_steps=-1", "train.max_epochs=-1"]).train)
    with pytest.raises(train_config.UsageError, match="train.batch_size .* must be an integer, got None"):
        train_config.check_train_numbers(load_config(TINY_CONFIG, ["train.batch_size=null"]).train)


@pytest.mark.parametrize("config", [TINY_CONFIG, TINY_CONFIG.parent / "cldm_v21_color.yaml"])
def test_every_flag_sets_a_key_the_shipped_configs_hold(config):
    """A flag whose key a config lacks would add it silently, and the config's value (shown in
    --help as the flag's default) would not be the one the run gets without the flag."""
    cfg = OmegaConf.load(config)
    missing = [key for key in train_config.FLAG_KEYS.values() if OmegaConf.select(cfg, key, default="<absent>")
               == "<absent>"]
    assert missing == []
    assert set(train_config.MODEL_FLAGS) == {"sd_locked", "only_mid_control", "train_unet_input", "grad_checkpoint"}


def test_an_empty_band_names_both_ends_and_a_null_end_is_the_datasets_default():
    from annotator.pairs import DEFAULT_HIGH, DEFAULT_LOW

    train_config.check_band(OmegaConf.create({"low": None, "high": None}))  # the dataset's 0.94 < sim < 0.97
    train_config.check_band(OmegaConf.create({"low": 0.5, "high": 0.6}))
    train_config.check_band(OmegaConf.create({"low": 0, "high": 0.5}))  # 0 is a low end, not the default
    for t, band in [({"low": 0.97, "high": 0.94}, "0.97 < sim < 0.94"), ({"low": 0.5, "high": 0.5}, "0.5 < sim < 0.5"),
                    ({"low": DEFAULT_HIGH, "high": None}, f"{DEFAULT_HIGH} < sim < {DEFAULT_HIGH}"),
                    ({"low": None, "high": DEFAULT_LOW}, f"{DEFAULT_LOW} < sim < {DEFAULT_LOW}")]:
        with pytest.raises(train_config.UsageError) as e:
            train_config.check_band(OmegaConf.create(t))
        assert str(e.value) == f"train.low (--low) must be below train.high (--high): the pair band {band} is empty"
    for key in ("low", "high"):  # NaN was "must be below": not what is wrong with it
        with pytest.raises(train_config.UsageError) as e:
            train_config.check_band(OmegaConf.create({key: float("nan")}))
        assert (str(e.value), e.value.key) == (f"train.{key} (--{key}) must be a number, got nan", f"train.{key}")


def test_model_settings_name_what_the_command_said_with_the_key_it_sets():
    def args(config=None, overrides=(), **flags):
        return SimpleNamespace(config=config, overrides=list(overrides),
                               **{n: flags.get(n) for n in train_config.MODEL_FLAGS})

    assert train_config.model_settings(args()) == []
    assert train_config.model_settings(args("my.yaml", ["model.scale_factor=0.2", " train.lr =1"], sd_locked=False,
                                            grad_checkpoint=True)) == [
        ("--config", "model"), ("model.scale_factor=0.2", "model.scale_factor"), (" train.lr =1", "train.lr"),
        ("--no-sd-locked", "model.sd_locked"), ("--grad-checkpoint", "model.unet.use_checkpoint")]


def test_the_remedy_for_an_init_of_another_config_follows_where_the_config_came_from():
    def args(config=None, overrides=(), **flags):
        return SimpleNamespace(config=config, overrides=list(overrides), out="runs/a",
                               **{**{n: None for n in train_config.MODEL_FLAGS}, **flags})

    beside = Path("models/x.yaml")
    assert train_config.saved_config_remedy(args("c.yaml"), Path("c.yaml")) == \
        "leave out --config to use the one it records"
    assert train_config.saved_config_remedy(args("c.yaml", ["model.a=1"]), Path("c.yaml")) == \
        "leave out --config and the model overrides to use the one it records"
    assert train_config.saved_config_remedy(args(None, ["model.a=1"]), object()) == \
        "leave out the overrides of model keys to use the one it records"
    assert train_config.saved_config_remedy(args(), Path("runs/a/config.yaml")) == \
        "resume with the --init runs/a was started with, or use another --out"
    assert train_config.saved_config_remedy(args(), beside) == f"fix or remove {beside}, or pass --config"
    for model_override in (args(None, ["model.color_variant=v3"]), args(sd_locked=False)):  # not the file's fault
        assert train_config.saved_config_remedy(model_override, beside) == \
            "leave out the overrides of model keys to use the one it records"
    assert train_config.saved_config_remedy(args(None, ["train.lr=1"]), beside) == \
        f"fix or remove {beside}, or pass --config"
    beside_config = Path("models/config.yaml")  # beside an init named config.safetensors: not OUT's own
    assert train_config.saved_config_remedy(args(), beside_config) == f"fix or remove {beside_config}, or pass --config"


# key -> (lowest allowed value, one below it, the bound the message states)
LOWEST = {"size": (64, 63, ">= 64"), "batch_size": (1, 0, ">= 1"), "accumulate": (1, 0, ">= 1"),
          "num_workers": (0, -1, ">= 0"), "lr": (1e-12, 0, "> 0"), "weight_decay": (0.0, -0.1, ">= 0.0"),
          "warmup_steps": (0, -1, ">= 0"), "grad_clip": (0.0, -0.5, ">= 0.0"), "seed": (0, -1, "in 0..4294967295"),
          "max_steps": (1, 0, "-1 (no limit) or >= 1"), "max_epochs": (1, 0, "-1 (no limit) or >= 1"),
          "val_every": (0, -1, ">= 0"), "log_every": (1, 0, ">= 1"), "ckpt_every": (1, 0, ">= 1"),
          "ckpt_keep": (1, 0, ">= 1"), "image_every": (0, -1, ">= 0"), "image_count": (1, 0, ">= 1"),
          "image_ddim_steps": (1, 0, ">= 1")}


def test_every_number_has_its_lowest_value_and_a_refusal_naming_its_flag():
    """One key at a time: keys a section lacks are not checked."""
    assert set(train_config.TRAIN_NUMBERS) == set(LOWEST)
    for key, (lowest, below, bound) in LOWEST.items():
        train_config.check_train_numbers(OmegaConf.create({key: lowest}))
        what, flag = train_config.TRAIN_NUMBERS[key][2], "--" + key.replace("_", "-")
        with pytest.raises(train_config.UsageError) as e:
            train_config.check_train_numbers(OmegaConf.create({key: below}))
        assert str(e.value) == f"train.{key} ({flag}, {what}) must be {bound}, got {below!r}"
    train_config.check_train_numbers(OmegaConf.create({"seed": 2**32 - 1}))  # seed_everything's highest
    with pytest.raises(train_config.UsageError) as e:  # Lightning's refusal named no flag
        train_config.check_train_numbers(OmegaConf.create({"seed": 2**32}))
    assert str(e.value) == "train.seed (--seed, seed) must be in 0..4294967295, got 4294967296"
    for key in ("max_steps", "max_epochs"):  # -1: no limit; below it refused
        train_config.check_train_numbers(OmegaConf.create({key: -1}))
        with pytest.raises(train_config.UsageError, match=r"must be -1 \(no limit\) or >= 1, got -2$"):
            train_config.check_train_numbers(OmegaConf.create({key: -2}))


def test_a_number_of_the_wrong_type_is_refused_and_an_integer_is_a_number():
    check = train_config.check_train_numbers
    check(OmegaConf.create({"lr": 1, "grad_clip": 0, "weight_decay": 0}))  # 'lr: 1' in a YAML is an int
    for t, says in [({"batch_size": 8.0}, "train.batch_size (--batch-size, samples per device) must be an integer, "
                                          "got 8.0"),
                    ({"batch_size": True}, "must be an integer, got True"),
                    ({"lr": True}, "train.lr (--lr, learning rate) must be a finite number, got True"),
                    ({"lr": float("nan")}, "must be a finite number, got nan"),
                    ({"grad_clip": float("inf")}, "must be a finite number, got inf"),
                    ({"max_steps": None}, "train.max_steps (--max-steps, last step) must be an integer, got None")]:
        with pytest.raises(train_config.UsageError) as e:
            check(OmegaConf.create(t))
        assert str(e.value).endswith(says), str(e.value)


def run_args(tmp_path, overrides=(), **given):
    """The training script's parsed command line: no flag given but those in `given`."""
    return SimpleNamespace(out=str(tmp_path / "out"), init=str(tmp_path / "init.safetensors"), resume="auto",
                           overrides=list(overrides), **{"config": None, **{n: None for n in train_config.FLAG_KEYS},
                                                         **given})


def test_every_flag_sets_its_own_key_after_the_overrides(tmp_path):
    flags = dict(size=128, low=0.1, high=0.9, min_gap=2, num_workers=3, batch_size=4, accumulate=5, lr=2e-4,
                 weight_decay=0.01, optimizer="adamw8bit", warmup_steps=6, grad_clip=0.5, precision="bf16-mixed",
                 max_steps=7, max_epochs=8, seed=0, compile=True, ckpt_every=11, ckpt_keep=12, image_every=13,
                 log_every=14, val_every=15, sd_locked=False, only_mid_control=True, train_unet_input=False,
                 grad_checkpoint=True)  # the falsy ones differ from the tiny config's too
    assert flags.keys() == train_config.FLAG_KEYS.keys()
    cfg = train_config.run_config(run_args(tmp_path, ["train.seed=5", "train.image_count=3"], config=str(TINY_CONFIG),
                                           **flags))
    assert {name: OmegaConf.select(cfg, key) for name, key in train_config.FLAG_KEYS.items()} == flags
    assert cfg.train.image_count == 3 and cfg.train.image_ddim_steps == 4  # an override; the tiny config's


def test_a_bad_flag_value_is_named_by_the_flag(tmp_path):
    for given, says in [(dict(min_gap=0), "--min-gap 0: train.min_gap: expected a positive integer or null, got 0"),
                        (dict(lr=0.0), "train.lr (--lr, learning rate) must be > 0, got 0.0"),
                        (dict(low=0.9, high=0.9), "train.low (--low) must be below train.high (--high): the pair "
                                                  "band 0.9 < sim < 0.9 is empty")]:
        with pytest.raises(train_config.UsageError) as e:
            train_config.run_config(run_args(tmp_path, config=str(TINY_CONFIG), **given))
        assert str(e.value) == says



def test_a_bad_train_value_of_the_file_or_an_override_says_where_it_came_from(tmp_path):
    """Not the flag the message names as the key's: that flag was not given."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_CONFIG.read_text().replace("batch_size: 2", "batch_size: two"))
    says = "train.batch_size (--batch-size, samples per device) must be an integer, got 'two'"
    with pytest.raises(train_config.UsageError) as e:
        train_config.run_config(run_args(tmp_path, config=str(bad)))
    assert str(e.value) == f"{bad}: {says}"
    with pytest.raises(train_config.UsageError) as e:
        train_config.run_config(run_args(tmp_path, ["train.batch_size=1", "train.batch_size=two"],
                                         config=str(TINY_CONFIG)))
    assert str(e.value) == f"the override train.batch_size=two: {says}"
    with pytest.raises(train_config.UsageError) as e:  # the flag's value: the message names the flag already
        train_config.run_config(run_args(tmp_path, config=str(bad), batch_size=0))
    assert str(e.value) == "train.batch_size (--batch-size, samples per device) must be >= 1, got 0"

def test_a_config_without_a_train_section_is_named_and_one_found_beside_the_init_says_so(tmp_path):
    no_train = tmp_path / "init.yaml"  # beside --init (init.safetensors)
    no_train.write_text(TINY_CONFIG.read_text().split("\ntrain:")[0])
    says = f"{no_train}: no train: section (see models/cldm_v21_color.yaml)"
    for config, note in ((None, " (found beside --init: fix or remove it, or pass --config)"), (str(no_train), "")):
        with pytest.raises(train_config.UsageError) as e:
            train_config.run_config(run_args(tmp_path, config=config, lr=1e-4))
        assert str(e.value) == says + note
