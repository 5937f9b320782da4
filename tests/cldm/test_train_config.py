"""cldm/train_config.py: the train: section's checks, the flags' keys, and what a refused config
names. Configs resolved from a command line: tests/scripts/test_train.py."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from cldm import train_config
from cldm.model import TINY_CONFIG, load_config


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
    for t, band in [({"low": 0.97, "high": 0.94}, "0.97 < sim < 0.94"), ({"low": 0.5, "high": 0.5}, "0.5 < sim < 0.5"),
                    ({"low": DEFAULT_HIGH, "high": None}, f"{DEFAULT_HIGH} < sim < {DEFAULT_HIGH}"),
                    ({"low": None, "high": DEFAULT_LOW}, f"{DEFAULT_LOW} < sim < {DEFAULT_LOW}")]:
        with pytest.raises(train_config.UsageError) as e:
            train_config.check_band(OmegaConf.create(t))
        assert str(e.value) == f"train.low (--low) must be below train.high (--high): the pair band {band} is empty"


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
    def args(config=None, overrides=()):
        return SimpleNamespace(config=config, overrides=list(overrides), out="runs/a")

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
