"""Which config goes with a weights file: found beside it or recorded in it, and the checks of
a command's config against it."""
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from cldm.checkpoint import CheckpointError
from cldm.config import DEFAULT_CONFIG, TINY_CONFIG, ConfigError, load_config
from cldm.model import create_model
from cldm.trainable import export_control
from cldm.weights_config import (check_saved_config, config_difference, config_hash, config_hashes, config_origin,
                                 differing_keys, inference_leaves, load_resolved_config, model_leaves, read_export_metadata,
                                 resolve_config, saved_config, saved_config_mismatch)

TOY = Path(__file__).resolve().parents[2] / "models" / "toy" / "toy_color_v2.safetensors"
TOY_CONFIG = TOY.with_suffix(".yaml")


def test_config_hash_ignores_checkpointing_but_not_what_trains():
    base = config_hash(load_config(TINY_CONFIG))
    assert config_hash(load_config(TINY_CONFIG, ["model.unet.use_checkpoint=true", "train.lr=1"])) == base
    assert config_hash(load_config(TINY_CONFIG, ["model.sd_locked=false"])) != base


def test_config_hash_is_of_the_resolved_model_section_whatever_its_key_order():
    """Checkpoints record it: the same model must hash the same in a config built another way."""
    expected = hashlib.sha256(b"a: 2\nb: 2\ncond_stage: null\ntrain_unet_input: true\n").hexdigest()[:16]
    assert config_hash({"model": {"b": 2, "a": "${model.b}"}, "train": {"lr": 1}}) == expected
    assert config_hash({"a": 2, "b": 2}) == expected  # the section itself
    older = hashlib.sha256(b"a: 2\nb: 2\n").hexdigest()[:16]  # as checkpoints before 2026-11-28 recorded it
    assert config_hash({"a": 2, "b": 2}, defaults=False) == older
    assert config_hashes({"a": 2, "b": 2})[0] == expected and older in config_hashes({"a": 2, "b": 2})


def test_a_left_out_optional_key_hashes_like_its_default():
    """A config without model.train_unet_input trains the UNet input conv as one saying true, and
    one without model.cond_stage has no text encoder as one saying null: the same model."""
    full = load_config(TINY_CONFIG, ["model.cond_stage=null"])
    assert full.model.train_unet_input is True
    lacking = OmegaConf.create(OmegaConf.to_container(full))
    del lacking.model["train_unet_input"], lacking.model["cond_stage"]
    assert config_hash(lacking) == config_hash(full)
    assert config_hash(lacking, defaults=False) != config_hash(full)
    assert model_leaves(lacking) == model_leaves(full)
    flipped = OmegaConf.merge(lacking, {"model": {"train_unet_input": False}})
    assert config_hash(flipped) != config_hash(full)


@pytest.mark.parametrize("config", [TINY_CONFIG, DEFAULT_CONFIG, TOY_CONFIG])
def test_the_shipped_configs_hash_as_before(config):
    """They write every optional key, so checkpoints trained with them keep their recorded hash."""
    cfg = load_config(config)
    assert config_hash(cfg) == config_hash(cfg, defaults=False) == config_hashes(cfg)[0]


def test_config_hashes_accept_what_older_checkpoints_recorded_for_the_same_model():
    """Before 2026-11-28 a config writing an optional key at its default and one leaving it out
    recorded different hashes; either run now resumes under either config."""
    full = load_config(TINY_CONFIG, ["model.cond_stage=null"])
    plain = OmegaConf.to_container(full)
    variants = []
    for left_out in ((), ("train_unet_input",), ("cond_stage",), ("train_unet_input", "cond_stage")):
        variants.append({**plain, "model": {k: v for k, v in plain["model"].items() if k not in left_out}})
    older = [config_hash(v, defaults=False) for v in variants]
    assert len(set(older)) == 4
    for v in variants:
        assert config_hashes(v) == (config_hash(full), *older[1:])  # older[0] is config_hash(full)
    flipped = OmegaConf.to_container(load_config(TINY_CONFIG, ["model.cond_stage=null",
                                                               "model.train_unet_input=false"]))
    no_text = {**flipped, "model": {k: v for k, v in flipped["model"].items() if k != "cond_stage"}}
    assert config_hashes(flipped) == (config_hash(flipped), config_hash(no_text, defaults=False))  # false is no default
    assert not set(config_hashes(flipped)) & set(older)


def with_metadata(path, config: str | None = None):
    """A weights file recording `config` (or no metadata at all)."""
    save_file({"w": torch.zeros(1)}, str(path), metadata=None if config is None else {"config": config})
    return path


def test_a_file_recording_no_config_leaves_sd21s(tmp_path):
    plain = with_metadata(tmp_path / "plain.safetensors")
    assert saved_config(plain) is None and resolve_config(plain) == DEFAULT_CONFIG
    assert saved_config(with_metadata(tmp_path / "empty.safetensors", "")) is None  # not an empty config
    assert resolve_config(tmp_path / "missing.safetensors") == DEFAULT_CONFIG


def test_unreadable_weights_metadata_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/x\.safetensors: not a readable safetensors file \("):
        read_export_metadata(tmp_path / "x.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"garbage")  # the loader's own message, not wrapped again
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/x\.ckpt: truncated or corrupt \("):
        read_export_metadata(tmp_path / "x.ckpt")


def test_the_control_exports_yaml_wins_over_the_sd_files(tmp_path):
    """SD2.1 file + export, each with a YAML beside it: the export's is the trained model's."""
    for name in ("sd", "control"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
        (tmp_path / f"{name}.yaml").write_text("model: {}\n")
    got = resolve_config(tmp_path / "sd.safetensors", control=tmp_path / "control.safetensors")
    assert got == tmp_path / "control.yaml"
    (tmp_path / "control.yaml").unlink()
    assert resolve_config(tmp_path / "sd.safetensors", control=tmp_path / "control.safetensors") == \
        tmp_path / "sd.yaml"
    assert resolve_config(tmp_path / "sd.safetensors", config=tmp_path / "x.yaml") == tmp_path / "x.yaml"


def test_a_config_recorded_in_the_export_wins_over_the_sd_files_yaml(tmp_path):
    """An export without its control.yaml still names its model (training records the whole config
    in it); the SD file's YAML or record describes only the base, so it comes second."""
    v3 = load_config(TINY_CONFIG, ["model.color_variant=v3"])
    export_control(create_model(v3), tmp_path / "control.safetensors", cfg=v3)
    (tmp_path / "sd.yaml").write_text(TINY_CONFIG.read_text())
    got = resolve_config(tmp_path / "sd.safetensors", control=tmp_path / "control.safetensors")
    assert got == v3 and got.model.color_variant == "v3"
    assert resolve_config(tmp_path / "sd.safetensors") == tmp_path / "sd.yaml"
    (tmp_path / "control.yaml").write_text(TINY_CONFIG.read_text())  # a YAML beside it wins over what it records
    assert resolve_config(tmp_path / "sd.safetensors", control=tmp_path / "control.safetensors") == \
        tmp_path / "control.yaml"


def test_model_leaves_and_what_each_comparison_leaves_out():
    cfg = load_config(TINY_CONFIG, ["model.unet.use_checkpoint=true"])
    leaves = model_leaves(cfg)
    assert leaves["scale_factor"] == 0.18215 and leaves["unet.model_channels"] == cfg.model.unet.model_channels
    assert "unet.use_checkpoint" not in leaves and model_leaves(cfg.model) == leaves  # the section or the config
    assert model_leaves(cfg, ())["unet.use_checkpoint"] is True
    inference = inference_leaves(cfg)
    assert not {"sd_locked", "train_unet_input", "unet.use_checkpoint"} & inference.keys()
    assert leaves["first_stage.ddconfig.z_channels"] == 4  # a leaf two sections down
    assert not [k for k in inference if k.endswith("dropout")] and "scale_factor" in inference


def test_differing_keys_count_a_missing_key_unless_told_it_means_null():
    theirs, ours = {"a": 1, "b": None, "c": 3}, {"a": 2, "c": 3, "d": 4}
    assert differing_keys(theirs, ours) == ["a", "b", "d"]
    assert differing_keys(theirs, ours, missing=None) == ["a", "d"]  # b: null there, absent here
    assert differing_keys(theirs, ours, free=("a",)) == ["b", "d"]
    assert config_difference(theirs, ours, ["d", "a"], "X") == "model.d is absent there, 4 in X (2 key(s) differ)"
    assert config_difference(theirs, ours, ["b"], "X") == "model.b is None there, absent in X (1 key(s) differ)"


def test_a_config_contradicting_the_recorded_one_names_the_key_and_the_remedy(tmp_path):
    cfg = load_config(TINY_CONFIG)
    path = tmp_path / "control.safetensors"
    export_control(create_model(cfg), path, cfg=cfg)
    assert saved_config_mismatch(path, load_config(TINY_CONFIG, ["model.sd_locked=false"])) is None  # training only
    other = load_config(TINY_CONFIG, ["model.scale_factor=0.5", "model.only_mid_control=true"])
    assert saved_config_mismatch(path, other, here="H") == \
        "model.only_mid_control is False there, True in H (2 key(s) differ)"
    assert saved_config_mismatch(path, other, free=("only_mid_control",), here="H") == \
        "model.scale_factor is 0.18215 there, 0.5 in H (1 key(s) differ)"
    with pytest.raises(CheckpointError, match=rf"^{path} was saved with another model config: model.only_mid_control "
                                              r"is False there, True in y.yaml with the overrides \(2 key\(s\) differ\); "
                                              r"do this$"):
        check_saved_config(path, other, Path("y.yaml"), ["x=1"], "do this")
    assert saved_config_mismatch(tmp_path / "none.safetensors", other) is None  # no file, nothing recorded
    with pytest.raises(CheckpointError, match=rf"^{path} was saved with another model config: model.scale_factor is "
                                              r"0.18215 there, 0.5 in its own config \(1 key\(s\) differ\); leave out "
                                              r"--config and --set to use the one saved with it$"):
        check_saved_config(path, other, other, free=("only_mid_control",))
    check_saved_config(path, load_config(TINY_CONFIG, ["model.only_mid_control=true"]), Path("y.yaml"),
                       free=("only_mid_control",))  # a key the caller may choose anew


def test_a_recorded_config_without_an_optional_key_or_only_training_can_resolve_is_no_contradiction(tmp_path):
    cfg = load_config(TINY_CONFIG, ["model.cond_stage=null"])
    recorded = TINY_CONFIG.read_text().split("  cond_stage:")[0] + "train:\n  lr: 1.0\n"
    path = with_metadata(tmp_path / "a.safetensors", recorded)  # lacks model.cond_stage: null here means the same
    assert saved_config_mismatch(path, cfg) is None
    assert saved_config_mismatch(path, load_config(TINY_CONFIG)) == \
        "model.cond_stage.arch is absent there, ViT-H-14 in this config (5 key(s) differ)"
    path = with_metadata(tmp_path / "b.safetensors", "model:\n  scale_factor: ${train.scale}\n")
    assert saved_config_mismatch(path, cfg) is None  # nothing to compare


def test_config_origin_names_the_weights_a_found_config_came_from(tmp_path):
    sd, control = tmp_path / "sd.safetensors", tmp_path / "control.safetensors"
    cfg = load_config(TINY_CONFIG)
    export_control(create_model(cfg), control, cfg=cfg)
    (tmp_path / "sd.yaml").write_text(TINY_CONFIG.read_text())
    weights = [("--control", control), ("--ckpt", sd)]
    recorded = resolve_config(sd, control=control)
    assert config_origin(recorded, None, weights) == ("--control", control)
    assert config_origin(tmp_path / "sd.yaml", None, [("--ckpt", sd)]) == ("--ckpt", sd)
    assert config_origin(TINY_CONFIG, TINY_CONFIG, weights) is None  # named by --config
    assert config_origin(tmp_path / "run" / "config.yaml", None, [("--init", sd)]) is None  # another source


def test_config_origin_names_the_weights_only_for_the_config_found_with_them(tmp_path):
    sd, toy = tmp_path / "sd.safetensors", tmp_path / "toy.safetensors"
    sd.write_bytes(b"")
    (tmp_path / "sd.yaml").write_text("model: {}\n")
    shutil.copy(TOY, toy)  # records its config, no YAML beside it
    weights = [("--control", None), ("--ckpt", sd)]
    assert config_origin(tmp_path / "sd.yaml", None, weights) == ("--ckpt", sd)
    plain = with_metadata(tmp_path / "plain.safetensors")  # an export given, with no config of its own
    assert config_origin(tmp_path / "sd.yaml", None, [("--control", plain), ("--ckpt", sd)]) == ("--ckpt", sd)
    assert config_origin(tmp_path / "run" / "config.yaml", None, weights) is None  # e.g. a run's own config
    assert config_origin(tmp_path / "sd.yaml", tmp_path / "sd.yaml", weights) is None  # named with --config
    recorded = resolve_config(toy)
    assert config_origin(recorded, None, [("--ckpt", toy)]) == ("--ckpt", toy)
    assert config_origin(TINY_CONFIG, None, [("--ckpt", toy)]) is None


def test_a_bad_config_the_user_never_named_says_where_it_was_found(tmp_path):
    """A YAML beside the weights (an A1111-style sd.yaml, say) or a config they record, not --config."""
    sd = tmp_path / "sd.safetensors"
    sd.write_bytes(b"")
    bad = TINY_CONFIG.read_text().replace("scale_factor: 0.18215", "scale_factor: abc")
    (tmp_path / "sd.yaml").write_text(bad)
    weights = [("--control", None), ("--ckpt", sd)]
    problem = "model.scale_factor: expected a positive number, got 'abc'"
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'sd.yaml'}: {problem} (found beside --ckpt: fix or "
                                                    "remove it, or pass --config)") + "$"):
        load_resolved_config(tmp_path / "sd.yaml", (), weights)
    with pytest.raises(ConfigError, match=re.escape(problem) + "$"):  # named with --config: no note
        load_resolved_config(tmp_path / "sd.yaml", (), weights, config=tmp_path / "sd.yaml")
    assert load_resolved_config(tmp_path / "sd.yaml", ["model.scale_factor=0.5"], weights).model.scale_factor == 0.5
    good = tmp_path / "good"  # a fine YAML beside the weights, and a bad override: the override's fault alone
    good.mkdir()
    (good / "sd.yaml").write_text(TINY_CONFIG.read_text())
    (good / "sd.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        load_resolved_config(good / "sd.yaml", ["train.lrr=1"], [("--ckpt", good / "sd.safetensors")])
    assert "train.lrr" in str(e.value) and "found beside" not in str(e.value)
    with pytest.raises(ConfigError, match=r"\(found beside --ckpt: fix or remove it, or pass --config\)$"):
        load_resolved_config(tmp_path / "sd.yaml", ["train.lr=1"], weights)  # the file's fault, an override beside it
    rec = with_metadata(tmp_path / "rec.safetensors", bad)
    with pytest.raises(ConfigError, match="^" + re.escape(f"the config {rec} records: {problem}") + "$"):
        load_resolved_config(resolve_config(rec), (), [("--ckpt", rec)])
    assert load_resolved_config(resolve_config(rec), ["model.scale_factor=0.5"],
                                [("--ckpt", rec)]).model.scale_factor == 0.5
    # a config object that none of the weights given records (none given): loaded as load_config does
    with pytest.raises(ConfigError, match="^" + re.escape(f"the checkpoint's config: {problem}") + "$"):
        load_resolved_config(OmegaConf.create(bad))
    assert load_resolved_config(OmegaConf.load(TINY_CONFIG), ["model.scale_factor=0.5"]).model.scale_factor == 0.5
