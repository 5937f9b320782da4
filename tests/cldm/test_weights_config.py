"""Which config goes with a weights file: found beside it or recorded in it, and the checks of
a command's config against it."""
import shutil
from pathlib import Path

import pytest

from cldm.checkpoint import CheckpointError
from cldm.model import TINY_CONFIG, create_model, load_config
from cldm.trainable import export_control
from cldm.weights_config import (check_saved_config, config_difference, config_hash, config_origin, differing_keys,
                                 inference_leaves, model_leaves, resolve_config, saved_config_mismatch)

TOY = Path(__file__).resolve().parents[2] / "models" / "toy" / "toy_color_v2.safetensors"


def test_config_hash_ignores_checkpointing_but_not_what_trains():
    base = config_hash(load_config(TINY_CONFIG))
    assert config_hash(load_config(TINY_CONFIG, ["model.unet.use_checkpoint=true", "train.lr=1"])) == base
    assert config_hash(load_config(TINY_CONFIG, ["model.sd_locked=false"])) != base


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


def test_model_leaves_and_what_each_comparison_leaves_out():
    cfg = load_config(TINY_CONFIG, ["model.unet.use_checkpoint=true"])
    leaves = model_leaves(cfg)
    assert leaves["scale_factor"] == 0.18215 and leaves["unet.model_channels"] == cfg.model.unet.model_channels
    assert "unet.use_checkpoint" not in leaves and model_leaves(cfg.model) == leaves  # the section or the config
    assert model_leaves(cfg, ())["unet.use_checkpoint"] is True
    inference = inference_leaves(cfg)
    assert "sd_locked" not in inference and "train_unet_input" not in inference
    assert not [k for k in inference if k.endswith("dropout")] and "scale_factor" in inference


def test_differing_keys_count_a_missing_key_unless_told_it_means_null():
    theirs, ours = {"a": 1, "b": None, "c": 3}, {"a": 2, "c": 3, "d": 4}
    assert differing_keys(theirs, ours) == ["a", "b", "d"]
    assert differing_keys(theirs, ours, missing=None) == ["a", "d"]  # b: null there, absent here
    assert differing_keys(theirs, ours, free=("a",)) == ["b", "d"]
    assert config_difference(theirs, ours, ["d", "a"], "X") == "model.d is absent there, 4 in X (2 key(s) differ)"


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
    assert config_origin(tmp_path / "run" / "config.yaml", None, weights) is None  # e.g. a run's own config
    assert config_origin(tmp_path / "sd.yaml", tmp_path / "sd.yaml", weights) is None  # named with --config
    recorded = resolve_config(toy)
    assert config_origin(recorded, None, [("--ckpt", toy)]) == ("--ckpt", toy)
    assert config_origin(TINY_CONFIG, None, [("--ckpt", toy)]) is None
