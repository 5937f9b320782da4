"""`python -m cldm.checkpoint inspect|convert`: what it prints, one-line errors, exit statuses, Ctrl-C."""
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from cldm import checkpoint, checkpoint_cli
from cldm.checkpoint import CheckpointError, load_state_dict, read_metadata, save_state_dict
from cldm.checkpoint_cli import main
from tests.helpers import Evil, TinyLDM, assert_same, ctrl_c_while_importing, tiny_colour_model


def test_cli_inspect_and_convert(tmp_path, capsys):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": TinyLDM().state_dict(), "global_step": 3}, ckpt)
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(ckpt), str(out)]) == 0
    assert_same(load_state_dict(out), load_state_dict(ckpt))
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tensors: 11\nparameters: 358 (0.0 M)\ndtypes: float32 11\n" in text
    assert "looks like: unknown SD variant (context dim 16) weights" in text

    evil = tmp_path / "evil.ckpt"
    torch.save({"x": Evil(tmp_path / "pwned")}, evil)
    assert main(["convert", str(evil), str(tmp_path / "o.safetensors")]) == 2  # bad input: the project's 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m cldm.checkpoint: error: {evil}: holds pickled Python objects")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.safetensors").exists()


def test_convert_keeps_the_files_metadata(tmp_path):
    """The toy's recorded config and an export's color_variant, init, step... are what later
    checks refuse mismatches by: a format change must not drop them."""
    meta = {"config": "model: {}", "color_variant": "v2", "step": "7"}
    src = tmp_path / "in.safetensors"
    save_state_dict(TinyLDM().state_dict(), src, metadata=meta)
    as_ckpt, back = tmp_path / "mid.ckpt", tmp_path / "back.safetensors"
    assert main(["convert", str(src), str(as_ckpt)]) == 0 and main(["convert", str(as_ckpt), str(back)]) == 0
    assert read_metadata(as_ckpt) == {**meta, "converted_from": "in.safetensors"}
    assert read_metadata(back) == {**meta, "converted_from": "mid.ckpt"}
    assert_same(load_state_dict(back), load_state_dict(src))
    assert main(["convert", str(src), str(tmp_path / "nodir" / "x.safetensors")]) == 2


def test_convert_keeps_an_existing_output_unless_overwrite(tmp_path, capsys):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.ckpt"
    save_state_dict({"a": torch.ones(2)}, src)
    out.write_bytes(b"keep")
    assert main(["convert", str(src), str(out)]) == 2
    assert capsys.readouterr().err == f"python -m cldm.checkpoint: error: {out}: exists; pass --overwrite to replace it\n"
    assert out.read_bytes() == b"keep"
    assert main(["convert", str(src), str(out), "--overwrite"]) == 0 and load_state_dict(out)["a"].sum() == 2
    assert main(["convert", str(src), str(src), "--overwrite"]) == 2  # would read and replace one file
    assert "the same file as the input" in capsys.readouterr().err and load_state_dict(src)["a"].sum() == 2
    (tmp_path / "link.safetensors").symlink_to(src)  # another name of the input: refused too
    assert main(["convert", str(src), str(tmp_path / "link.safetensors"), "--overwrite"]) == 2
    assert "the same file as the input" in capsys.readouterr().err and load_state_dict(src)["a"].sum() == 2


def test_convert_unpickles_only_when_allowed_and_os_errors_are_one_line(tmp_path, capsys):
    import argparse
    src = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, src)
    assert main(["convert", str(src), str(tmp_path / "o.safetensors")]) == 2
    assert "holds pickled Python objects" in capsys.readouterr().err and not (tmp_path / "o.safetensors").exists()
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--allow-pickle"]) == 0
    assert_same(load_state_dict(tmp_path / "o.safetensors"), {"a": torch.ones(2)})
    long = tmp_path / ("x" * 300 + ".safetensors")  # the OS refuses the name (ENAMETOOLONG)
    assert main(["convert", str(src), str(long), "--allow-pickle"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m cldm.checkpoint: error: ") and "File name too long" in err
    assert err.count("\n") == 1


def test_cli_usage_errors_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: the following arguments are required: file (see --help)" in err
    assert main(["inspect", str(tmp_path / "nope.ckpt")]) == 2
    assert capsys.readouterr().err == f"python -m cldm.checkpoint: error: {tmp_path / 'nope.ckpt'}: no such file\n"

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint_cli, "load_state_dict", interrupted)
    assert main(["inspect", str(tmp_path / "nope.ckpt")]) == 130
    assert capsys.readouterr().err == "python -m cldm.checkpoint: interrupted\n"


def test_cli_inspect_compares_with_a_config(tmp_path, capsys):
    path = tmp_path / "v1.safetensors"
    save_state_dict(tiny_colour_model("model.color_variant=v1").state_dict(), path)
    from cldm.config import TINY_CONFIG
    assert main(["inspect", str(path), "--config", str(TINY_CONFIG), "--set", "model.color_variant=v2"]) == 1
    out = capsys.readouterr().out
    assert (f"against {TINY_CONFIG}:\n715 of 717 model tensors found in the checkpoint\n"
            "shape mismatch 2 (model vs checkpoint):\n"
            "  control_model.input_blocks.0.0.weight: [32, 9, 3, 3] vs [32, 4, 3, 3]\n"
            "  model.diffusion_model.input_blocks.0.0.weight: [32, 9, 3, 3] vs [32, 4, 3, 3]\n"
            "would not load: control_model.input_blocks.0.0.weight is [32, 4, 3, 3]") in out
    assert main(["inspect", str(path), "--config", str(TINY_CONFIG), "--set", "model.color_variant=v1"]) == 0
    assert capsys.readouterr().out.endswith("717 of 717 model tensors found in the checkpoint\nwould load\n")
    # the config is checked before anything is printed; --set without it is no silent no-op
    assert main(["inspect", str(path), "--config", str(TINY_CONFIG), "--set", "model.unet.model_channels=abc"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "model.unet.model_channels: expected a positive integer" in err
    assert main(["inspect", str(path), "--set", "model.color_variant=v1"]) == 2
    assert capsys.readouterr().err == "python -m cldm.checkpoint: error: --set needs --config (the overrides apply to its model)\n"
    save_state_dict({"a": torch.ones(1)}, path, metadata={"config": "x", "step": "3"})
    assert main(["inspect", str(path)]) == 0 and "metadata: config, step\n" in capsys.readouterr().out


def inspect_run(capsys, *argv):
    """(exit status, stdout) of `inspect ARGV...`, which must say nothing on stderr."""
    rc = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    assert err == "", err
    return rc, out


def test_cli_inspect_tells_a_training_checkpoint_and_checks_it_as_a_resume(tmp_path, capsys):
    """OUT/checkpoints/*.ckpt holds only the trainable tensors, under the LightningModule's
    `model.` prefix: not a broken full model, but what a resume under the config loads."""
    from omegaconf import OmegaConf

    from cldm.callbacks import AtomicCheckpointIO
    from cldm.lightning import ColorControlModule
    from cldm.config import TINY_CONFIG, load_config
    from tests.train_helpers import saving, tiny_model
    cfg = load_config(TINY_CONFIG)
    module = saving(ColorControlModule(tiny_model("v2"), config=OmegaConf.to_container(cfg, resolve=True)))
    ckpt = {"state_dict": module.state_dict(), "global_step": 7, "epoch": 0, "pytorch-lightning_version": "2.x",
            "optimizer_states": [], "lr_schedulers": [], "loops": {}}
    module.on_save_checkpoint(ckpt)  # what the training's checkpoints hold
    path = tmp_path / "step=00000007.ckpt"
    AtomicCheckpointIO().save_checkpoint(ckpt, path)

    tiny = ("--config", TINY_CONFIG)
    rc, out = inspect_run(capsys, path)
    assert rc == 0 and ("top-level: model.* 171\nlooks like: Lightning training checkpoint of this project: 171 "
                        "trainable tensors, step 7, to resume or --export (ours: colour ControlNet v2 on unknown SD "
                        "variant (context dim 32))\nmetadata: none\n") in out
    rc, out = inspect_run(capsys, path, *tiny)
    assert rc == 0 and out.endswith(f"against {TINY_CONFIG}, the tensors that train under it:\n171 of 171 model "
                                    "tensors found in the checkpoint\nwould load to resume training (on the run's "
                                    "--init weights)\n")
    for override, reason in [
            ("model.color_variant=v3", "control_model.input_blocks.0.0.weight is [32, 9, 3, 3] in the checkpoint but "
                                       "[32, 12, 3, 3] in the model (and 1 more tensor of another shape); likely "
                                       "another colour variant"),
            ("model.sd_locked=false", "lacks 184 tensors that this config trains (e.g. model.diffusion_model."
                                      "output_blocks.0.0.in_layers.0.weight; model.sd_locked and "
                                      "model.train_unet_input say which train)"),
            ("model.train_unet_input=false", "holds 1 tensor that this config does not train (e.g. "
                                             "model.diffusion_model.input_blocks.0.0.weight; "),
            ("model.only_mid_control=true", "trained with another model config (hash ")]:  # same tensors
        rc, out = inspect_run(capsys, path, *tiny, "--set", override)
        assert rc == 1 and f"\nwould not load: {reason}" in out, (override, out)
    # a config without model.train_unet_input trains the UNet input conv, as the training does
    no_key = tmp_path / "no_train_unet_input.yaml"
    no_key.write_text(Path(TINY_CONFIG).read_text().replace("  train_unet_input: true\n", ""))
    assert "train_unet_input" not in no_key.read_text()
    module = saving(ColorControlModule(tiny_model("v2"), config=OmegaConf.to_container(load_config(no_key),
                                                                                    resolve=True)))
    ckpt = {**ckpt, "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    rc, out = inspect_run(capsys, path, "--config", no_key)
    assert rc == 0 and out.endswith("\nwould load to resume training (on the run's --init weights)\n"), out

    # a checkpoint that needs unpickling is still refused in one line, its code not run
    torch.save({**ckpt, "payload": Evil(tmp_path / "pwned")}, path)
    assert main(["inspect", str(path), *map(str, tiny)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: holds pickled Python objects ({os.mkdir.__module__}.mkdir" in err
    assert not (tmp_path / "pwned").exists()


def test_cli_inspect_tells_an_export_and_checks_it_as_control(tmp_path, capsys):
    """OUT/control.safetensors holds only trainable weights: checked as --control loads it on top
    of SD weights (load_sd_plus_control), by its tensors and by what its metadata says."""
    from cldm.config import TINY_CONFIG, load_config
    from cldm.trainable import configure_trainable, export_control, load_sd_plus_control
    from tests.train_helpers import tiny_model
    model = tiny_model("v2")
    configure_trainable(model)  # as training leaves it
    path = export_control(model, tmp_path / "control.safetensors", step=5, cfg=load_config(TINY_CONFIG),
                          extra={"init": "init.safetensors"})

    tiny = ("--config", TINY_CONFIG)
    rc, out = inspect_run(capsys, path)
    assert rc == 0 and ("\nlooks like: ControlNet export (trainable weights only, step 5, trained on --init "
                        "init.safetensors), for --control on top of SD weights (ours: colour ControlNet v2 on "
                        "unknown SD variant (context dim 32))\n") in out
    rc, out = inspect_run(capsys, path, *tiny)
    assert rc == 0 and f"against {TINY_CONFIG}, on top of SD weights that give the rest:\n171 of 717 model " \
        "tensors found in the checkpoint\nmissing 546:\n" in out and out.endswith("\nwould load as --control\n")
    rc, out = inspect_run(capsys, path, *tiny, "--set", "model.sd_locked=false")  # how it trained: no matter
    assert rc == 0 and out.endswith("\nwould load as --control\n")
    for override, reason in [("model.color_variant=v3", "made for colour variant v2, the model is v3 (set "
                                                        "model.color_variant=v2)"),
                             ("model.parameterization=v", "made for a model that predicts eps, this config's "
                                                          "predicts v (set model.parameterization=eps)")]:
        rc, out = inspect_run(capsys, path, *tiny, "--set", override)
        assert rc == 1 and out.endswith(f"\nwould not load: {reason}\n"), (override, out)

    # without metadata, by its tensors alone; the reasons are load_sd_plus_control's
    from cldm.model import create_model
    sd = load_state_dict(path)
    bare = tmp_path / "bare.safetensors"
    save_state_dict(sd, bare)
    rc, out = inspect_run(capsys, bare)
    assert rc == 0 and "\nlooks like: ControlNet export (trainable weights only), for --control" in out
    v3 = ("control_model.input_blocks.0.0.weight is [32, 9, 3, 3] in the checkpoint but [32, 12, 3, 3] in the model "
          "(and 1 more tensor of another shape); likely another colour variant")
    half = ("the checkpoint's control_model.* does not match the model (1 missing, e.g. "
            "control_model.middle_block_out.0.bias)")
    for override, drop, reason in [("model.color_variant=v3", None, v3),
                                   ("model.color_variant=v2", "control_model.middle_block_out.0.bias", half)]:
        save_state_dict({k: v for k, v in sd.items() if k != drop}, bare)
        rc, out = inspect_run(capsys, bare, *tiny, "--set", override)
        assert rc == 1 and f"\nwould not load: {reason}" in out, (override, out)
        with pytest.raises(CheckpointError, match=f"does not fit the model: {re.escape(reason)}"):
            load_sd_plus_control(create_model(load_config(TINY_CONFIG, [override])), tmp_path / "unused", bare)


def test_cli_inspect_compares_the_config_a_file_records_as_the_tools_do(capsys, tmp_path):
    """The toy records its config (scale factor 0.57326), an export its run's: the tiny YAML fits
    their shapes but not that, which inference and training refuse: inspect must not say "would load"."""
    from cldm.config import REPO, TINY_CONFIG, load_config
    from cldm.model import create_model
    from cldm.trainable import configure_trainable, export_control
    toy = REPO / "models" / "toy" / "toy_color_v2.safetensors"
    rc, out = inspect_run(capsys, toy, "--config", TINY_CONFIG)
    assert rc == 1
    assert out.splitlines()[-1] == (f"would not load: it was saved with another model config: model.scale_factor is "
                                    f"0.57326 there, 0.18215 in {TINY_CONFIG} (1 key(s) differ)")
    rc, out = inspect_run(capsys, toy, "--config", TINY_CONFIG, "--set", "model.scale_factor=0.57326")
    assert rc == 0 and out.splitlines()[-1] == "would load"
    rc, out = inspect_run(capsys, toy, "--config", TINY_CONFIG, "--set", "model.scale_factor=0.5")
    assert rc == 1 and out.splitlines()[-1] == (f"would not load: it was saved with another model config: "
                                                f"model.scale_factor is 0.57326 there, 0.5 in {TINY_CONFIG} with the "
                                                f"overrides (1 key(s) differ)")
    made = load_config(TINY_CONFIG, ["model.scale_factor=0.5"])
    model = create_model(made)
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors", cfg=made)
    rc, out = inspect_run(capsys, export, "--config", TINY_CONFIG)
    assert rc == 1 and out.splitlines()[-1] == (
        f"would not load: it was saved with another model config: model.scale_factor is 0.5 there, 0.18215 in "
        f"{TINY_CONFIG} (1 key(s) differ)")
    rc, out = inspect_run(capsys, export, "--config", TINY_CONFIG, "--set", "model.scale_factor=0.5")
    assert rc == 0 and out.splitlines()[-1] == "would load as --control"


def test_convert_into_a_missing_folder_names_the_folder(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    save_state_dict({"a": torch.ones(2)}, src)
    out = tmp_path / "nodir" / "x.safetensors"
    assert main(["convert", str(src), str(out)]) == 2
    assert capsys.readouterr().err == (f"python -m cldm.checkpoint: error: {out}: no folder {out.parent} to write "
                                       "it in\n")


def test_convert_refuses_an_output_it_cannot_write_before_reading_the_input(tmp_path, capsys, monkeypatch):
    """A folder at OUTPUT (even with --overwrite), a file in the way of its folder, or an extension
    it cannot write: one line naming OUTPUT, before a large input is read; the rename's error named
    the temporary file, and the extension was checked only once the input was loaded."""
    src = tmp_path / "in.safetensors"
    save_state_dict({"a": torch.ones(2)}, src)
    (tmp_path / "dir.safetensors").mkdir()
    monkeypatch.setattr(checkpoint_cli, "load_state_dict", lambda *a, **kw: pytest.fail("read the input"))
    for out, said in [(tmp_path / "dir.safetensors", f"{tmp_path / 'dir.safetensors'} is a folder"),
                      (src / "x.ckpt", f"{src / 'x.ckpt'}: {src} is a file, not a folder"),
                      (tmp_path / "out.bin", f"{tmp_path / 'out.bin'}: unknown checkpoint extension "
                                             "(use .safetensors or .ckpt/.pt/.pth)")]:
        assert main(["convert", str(src), str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err == f"python -m cldm.checkpoint: error: {said}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "in.safetensors"]


@pytest.mark.parametrize("fmt, error", [
    ("safetensors", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ("ckpt", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 0"))])
def test_convert_onto_a_disk_filling_during_the_write_is_one_line(tmp_path, capsys, monkeypatch, fmt, error):
    """What safetensors and torch.save raise when the disk fills mid-write were tracebacks (exit 1):
    one line, as tool_add_control_sd21.py's (the free space, checked again, says why)."""
    src, out = tmp_path / "in.safetensors", tmp_path / f"o.{fmt}"
    save_state_dict({"a": torch.ones(2)}, src)

    def full(*a, **kw):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 4, 4))
        raise error
    monkeypatch.setattr(checkpoint, "save_state_dict", full)
    assert main(["convert", str(src), str(out)]) == 2
    assert capsys.readouterr().err == (f"python -m cldm.checkpoint: error: {out}: cannot write the checkpoint: no "
                                       "space left on device (or disk quota exceeded); nothing was written\n")
    assert not out.exists()


def test_convert_refuses_too_little_free_space_before_writing(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in.safetensors", tmp_path / "o.safetensors"
    save_state_dict({"a": torch.ones(2**18)}, src)  # 1 MiB of float32
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 2**19, 2**19))
    monkeypatch.setattr(checkpoint, "save_state_dict", lambda *a, **kw: pytest.fail("started writing"))
    assert main(["convert", str(src), str(out)]) == 2
    assert capsys.readouterr().err == (f"python -m cldm.checkpoint: error: {out}: no space left on device (the "
                                       "checkpoint needs 1.0 MiB, 0.5 MiB are free)\n")
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [(["inspect", ""], "file"), (["inspect", "F", "--config", ""], "--config"),
                                        (["convert", "", "o.ckpt"], "input"), (["convert", "F", ""], "output")])
def test_cli_refuses_an_empty_path_naming_it(tmp_path, capsys, argv, flag):
    """An empty path ("$CKPT" unset) was the current folder ("convert IN ''": ": exists"), and an
    empty --config was no config at all: inspect said nothing of it."""
    src = tmp_path / "in.safetensors"
    save_state_dict({"a": torch.ones(2)}, src)
    with pytest.raises(SystemExit) as e:
        main([str(src) if a == "F" else a for a in argv])
    assert e.value.code == 2
    said = f"python -m cldm.checkpoint {argv[0]}: error: argument {flag}: empty path (see --help)\n"
    assert capsys.readouterr().err == said


def test_cli_inspect_names_eight_top_level_parts_and_dtypes_by_count(tmp_path, capsys):
    sd = {f"t{i}.{j}": torch.zeros(1) for i in range(9) for j in range(9 - i)}  # t0: 9 tensors ... t8: 1
    sd["t8.0"] = sd["t8.0"].half()
    save_state_dict(sd, tmp_path / "m.safetensors")
    rc, out = inspect_run(capsys, tmp_path / "m.safetensors")
    assert rc == 0 and ("tensors: 45\nparameters: 45 (0.0 M)\ndtypes: float32 44, float16 1\n"
                        "top-level: t0.* 9, t1.* 8, t2.* 7, t3.* 6, t4.* 5, t5.* 4, t6.* 3, t7.* 2\n") in out
    save_state_dict({"a.x": torch.zeros(1), "b": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert "\ntop-level: a, b\n" in inspect_run(capsys, tmp_path / "m.safetensors")[1]


def test_cli_inspect_says_a_file_without_the_controlnet_would_load_partially(tmp_path, capsys):
    from cldm.config import TINY_CONFIG
    sd = {k: v for k, v in tiny_colour_model().state_dict().items() if not k.startswith("control_model.")}
    save_state_dict(sd, tmp_path / "sd.safetensors")
    rc, out = inspect_run(capsys, tmp_path / "sd.safetensors", "--config", TINY_CONFIG)
    assert rc == 0 and out.endswith("\nwould load (partially)\n") and "\nmissing " in out


def test_ctrl_c_while_the_libraries_load_is_one_line():
    """Seconds of imports (torch among them) before run_cli takes over: Ctrl-C there was a
    KeyboardInterrupt traceback out of the import."""
    done = ctrl_c_while_importing("torch", ["-m", "cldm.checkpoint", "inspect", "x.safetensors"])
    assert (done.returncode, done.stderr) == (130, "python -m cldm.checkpoint: interrupted\n")


def test_ctrl_c_while_torch_loads_names_the_module_as_it_is_run():
    """`python -m cldm.checkpoint`, as run_cli names it later, not the file's name (kills
    quiet_startup_signals ignoring its `prog`)."""
    done = ctrl_c_while_importing("torch", ["-m", "cldm.checkpoint", "inspect", "x.safetensors"])
    assert (done.returncode, done.stderr) == (130, "python -m cldm.checkpoint: interrupted\n")
