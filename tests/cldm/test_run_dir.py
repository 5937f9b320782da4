"""A run folder: the config a rerun takes, the checkpoint --resume means, and the refusals that
keep two runs' histories out of one OUT."""
import os
import re

import pytest
import torch
from omegaconf import OmegaConf

from cldm.config import DEFAULT_CONFIG, TINY_CONFIG, load_config
from cldm.run_dir import (NO_CHECKPOINT, RESUME, RunDirError, check_run_dir, config_source, record_config,
                          rerun_hint, resolve_resume)
from tests.helpers import named_pipe
from tests.train_helpers import first_process, training_ckpt


@pytest.fixture(autouse=True)
def as_first_process(monkeypatch):
    first_process(monkeypatch)


def test_a_rerun_resumes_only_once_out_holds_a_checkpoint(tmp_path):
    assert rerun_hint(tmp_path) == NO_CHECKPOINT
    training_ckpt(tmp_path / "checkpoints" / "step=00000001.ckpt", 1)
    assert rerun_hint(tmp_path) == RESUME


def test_the_runs_own_config_only_when_there_is_a_checkpoint_to_resume(tmp_path):
    out, init = tmp_path / "run", tmp_path / "init.safetensors"  # records no config, has no YAML beside it
    record_config(out, load_config(TINY_CONFIG))
    assert config_source(out, init) == DEFAULT_CONFIG  # a run stopped before its first checkpoint: a new start
    training_ckpt(out / "checkpoints" / "step=00000001.ckpt", 1)
    assert config_source(out, init) == out / "config.yaml"
    assert config_source(out, init, resume="never") == DEFAULT_CONFIG
    assert config_source(out, init, config=TINY_CONFIG) == TINY_CONFIG
    (out / "config.yaml").unlink()  # a checkpoint but no config.yaml: nothing of the run's own to take
    assert config_source(out, init) == DEFAULT_CONFIG
    check_run_dir(out, load_config(TINY_CONFIG, ["model.scale_factor=0.2"]))  # nor to compare with here


def test_record_config_is_written_by_the_first_process_only(tmp_path, monkeypatch):
    cfg = load_config(TINY_CONFIG)
    monkeypatch.setenv("RANK", "1")
    record_config(tmp_path / "a", cfg)
    assert not (tmp_path / "a").exists()
    monkeypatch.setenv("RANK", "0")
    record_config(tmp_path / "a", cfg)
    assert OmegaConf.load(tmp_path / "a" / "config.yaml") == cfg
    record_config(tmp_path / "runs" / "b", cfg)  # an --out whose parent is new too
    assert OmegaConf.load(tmp_path / "runs" / "b" / "config.yaml") == cfg


def test_record_config_replaces_the_file_whole_never_rewriting_it_in_place(tmp_path):
    """Written beside and renamed over (atomicio): a reader of the old config.yaml (here a hard
    link to it) keeps it whole, and no temporary file is left (kills a plain write_bytes)."""
    out = tmp_path / "run"
    record_config(out, load_config(TINY_CONFIG))
    os.link(out / "config.yaml", tmp_path / "old.yaml")
    record_config(out, load_config(TINY_CONFIG, ["model.scale_factor=0.2"]))
    assert OmegaConf.load(tmp_path / "old.yaml") == load_config(TINY_CONFIG)
    assert OmegaConf.load(out / "config.yaml").model.scale_factor == 0.2
    assert os.listdir(out) == ["config.yaml"]


def test_another_model_config_names_the_first_key_and_only_what_set_a_differing_one(tmp_path):
    out = tmp_path / "run"
    record_config(out, load_config(TINY_CONFIG))
    other = load_config(TINY_CONFIG, ["model.scale_factor=0.2", "model.unet.use_checkpoint=true",
                                      "train.lr=0.5"])
    check_run_dir(out, other)  # no checkpoint yet: nothing to continue
    training_ckpt(out / "checkpoints" / "step=00000001.ckpt", 1)
    check_run_dir(out, load_config(TINY_CONFIG, ["model.unet.use_checkpoint=true", "train.lr=0.5"]))  # same run
    given = [("model.scale_factor=0.2", "model.scale_factor"), ("--grad-checkpoint", "model.unet.use_checkpoint"),
             ("train.lr=0.5", "train.lr")]
    with pytest.raises(RunDirError) as e:
        check_run_dir(out, other, given)
    assert str(e.value) == (f"{out} holds checkpoints of another model config ({out / 'config.yaml'}): "
                            "model.scale_factor is 0.18215 there, 0.2 in this command's (1 key(s) differ); leave out "
                            "model.scale_factor=0.2 to continue the run (it has its own config.yaml), or use another "
                            "--out for a new run")
    with pytest.raises(RunDirError, match=r"leave out --config to continue"):  # --config sets the whole model
        check_run_dir(out, other, [("--config", "model")])
    with pytest.raises(RunDirError, match=r"; leave out model.scale_factor=0.2 to continue"):  # not the --config
        check_run_dir(out, other, [("--config", "model"), *given])  # whose scale factor the override replaced
    two = load_config(TINY_CONFIG, ["model.scale_factor=0.2", "model.unet.model_channels=16"])
    with pytest.raises(RunDirError, match=r"in this command's \(2 key\(s\) differ\); use another --out for a new run$"):
        check_run_dir(out, two)
    with pytest.raises(RunDirError, match=r"\(2 key\(s\) differ\); leave out model.scale_factor=0.2 and --set "
                                          r"model.unet.model_channels=16 to continue the run"):
        check_run_dir(out, two, [("model.scale_factor=0.2", "model.scale_factor"),
                                 ("--set model.unet.model_channels=16", "model.unet.model_channels")])
    with pytest.raises(RunDirError, match=r"; leave out --config and model.scale_factor=0.2 to continue"):
        check_run_dir(out, two, [("--config", "model"), ("model.scale_factor=0.2", "model.scale_factor")])
    # ddconfig.ch is not ddconfig.ch_mult: a key that only starts like a differing one sets nothing of it
    with pytest.raises(RunDirError, match=r"model.first_stage.ddconfig.ch_mult is \[1, 1, 2, 2\] there, \[1, 2, 2, 2\] "
                                          r"in this command's \(1 key\(s\) differ\); use another --out for a new run$"):
        check_run_dir(out, load_config(TINY_CONFIG, ["model.first_stage.ddconfig.ch_mult=[1,2,2,2]"]),
                      [("model.first_stage.ddconfig.ch=32", "model.first_stage.ddconfig.ch")])
    with pytest.raises(RunDirError, match=r"model.unet.new_key is absent there, 3 in this command's"):
        cfg = OmegaConf.to_container(load_config(TINY_CONFIG))
        cfg["model"]["unet"]["new_key"] = 3  # one side lacks it
        check_run_dir(out, OmegaConf.create(cfg))
    with pytest.raises(RunDirError, match=r"model.scale_factor is 1.0 there, 1 in this command's \(1 key\(s\) differ\) "
                                          r"\(the same number written differently: write it as there\); leave out "
                                          r"model.scale_factor=1 to continue"):
        out1 = tmp_path / "run1"  # a run started with scale_factor 1.0, continued with =1: 1 == 1.0, not to the hash
        record_config(out1, load_config(TINY_CONFIG, ["model.scale_factor=1.0"]))
        training_ckpt(out1 / "checkpoints" / "step=00000001.ckpt", 1)
        check_run_dir(out1, load_config(TINY_CONFIG, ["model.scale_factor=1"]),
                      [("model.scale_factor=1", "model.scale_factor")])
    with pytest.raises(RunDirError, match=r"\): another model config; use another --out for a new run$"):
        cfg = OmegaConf.to_container(load_config(TINY_CONFIG))
        cfg["model"]["unet"]["extra"] = {}  # the hashes differ, yet no leaf does: no key to name
        check_run_dir(out, OmegaConf.create(cfg))


def test_resume_never_refuses_an_out_with_checkpoints(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert resolve_resume("never", ckpts) is None
    training_ckpt(ckpts / "step=00000001.ckpt", 1)
    with pytest.raises(RunDirError, match=f"^{re.escape(str(ckpts))} already holds checkpoints; use --resume auto"):
        resolve_resume("never", ckpts)


def test_resume_auto_takes_the_newest_checkpoint_and_refuses_a_bad_one(tmp_path):
    """A bad newest file is refused, not skipped: every rerun would meet it again, or train on from an older step."""
    ckpts = tmp_path / "checkpoints"
    assert resolve_resume("auto", ckpts) is None
    training_ckpt(ckpts / "step=00000001.ckpt", 1)
    training_ckpt(ckpts / "step=00000003.ckpt", 3)
    assert resolve_resume("auto", ckpts) == ckpts / "step=00000003.ckpt"
    bad = ckpts / "step=00000004.ckpt"
    torch.save({"state_dict": {}}, bad)  # a whole file, but no training checkpoint
    with pytest.raises(RunDirError, match=f"^{re.escape(str(bad))}: not a Lightning training checkpoint .*; move it "
                                          f"out of {re.escape(str(ckpts))}, or pass --resume PATH$"):
        resolve_resume("auto", ckpts)


def test_resume_path_of_the_wrong_kind_is_named(tmp_path):
    with pytest.raises(RunDirError, match=r"^--resume \S+: a folder, not a checkpoint file$"):
        resolve_resume(str(tmp_path), tmp_path / "checkpoints")
    with pytest.raises(RunDirError, match=r"^--resume \S+missing\.ckpt: no such file$"):
        resolve_resume(str(tmp_path / "missing.ckpt"), tmp_path / "checkpoints")
    if hasattr(os, "mkfifo"):  # was "no such file"
        with named_pipe(tmp_path / "pipe.ckpt") as pipe, pytest.raises(
                RunDirError, match=r"^--resume \S+pipe\.ckpt: not a regular file \(a named pipe, socket or device\)$"):
            resolve_resume(str(pipe), tmp_path / "checkpoints")
    torch.save([1], tmp_path / "list.ckpt")
    with pytest.raises(RunDirError, match=r"^--resume \S+list\.ckpt: holds a list, not a training checkpoint$"):
        resolve_resume(str(tmp_path / "list.ckpt"), tmp_path / "checkpoints")


def test_resume_path_to_an_older_checkpoint_of_the_run_is_refused(tmp_path):
    """Pruning to --ckpt-keep and a later --resume auto go by the highest step: maybe the abandoned one."""
    ckpts = tmp_path / "checkpoints"
    old, new = training_ckpt(ckpts / "step=00000002.ckpt", 2), training_ckpt(ckpts / "step=00000004.ckpt", 4)
    with pytest.raises(RunDirError, match=f"^--resume {re.escape(str(old))}: {re.escape(str(ckpts))} already holds a "
                                          r"later checkpoint \(step=00000004\.ckpt\); move the later ones away"):
        resolve_resume(str(old), ckpts)
    assert resolve_resume(str(new), ckpts) == new


def test_resume_path_from_another_run_only_into_an_out_without_checkpoints(tmp_path):
    """Forking a run into a new OUT is fine; into an OUT with its own checkpoints it would mix two
    histories (and overwrite OUT/control.safetensors with the other run's weights)."""
    other = training_ckpt(tmp_path / "other" / "checkpoints" / "step=00000500.ckpt", 500)
    new = tmp_path / "new" / "checkpoints"
    assert resolve_resume(str(other), new) == other
    mine = tmp_path / "mine" / "checkpoints"
    training_ckpt(mine / "step=00000010.ckpt", 10)
    with pytest.raises(RunDirError, match=r"^--resume \S*other/checkpoints/step=00000500\.ckpt: from outside "
                                          r"\S*mine/checkpoints, which holds this run's own checkpoints \(newest "
                                          r"step=00000010\.ckpt\); fork into another --out"):
        resolve_resume(str(other), mine)
    # its own newest, named by a path with another spelling, is not foreign
    assert resolve_resume(str(mine / ".." / "checkpoints" / "step=00000010.ckpt"), mine).name == "step=00000010.ckpt"


def test_a_checkpoint_recording_the_older_hash_of_the_same_model_resumes(tmp_path):
    """Before 2026-11-28 a config leaving out model.train_unet_input (true) hashed apart from one
    writing it; such a checkpoint resumes under either, into its own OUT or a new one."""
    from cldm.callbacks import AtomicCheckpointIO
    from cldm.resume import LIGHTNING_KEYS, TRAINING_KEY
    from cldm.run_dir import check_resume_config
    from cldm.weights_config import config_hash

    explicit = load_config(TINY_CONFIG)
    lacking = OmegaConf.create(OmegaConf.to_container(explicit))
    del lacking.model["train_unet_input"]
    run = tmp_path / "run"
    record_config(run, lacking)
    ckpt = run / "checkpoints" / "step=00000005.ckpt"
    AtomicCheckpointIO().save_checkpoint({**{k: {} for k in LIGHTNING_KEYS}, "global_step": 5,
                                          TRAINING_KEY: {"config_hash": config_hash(lacking, defaults=False)}}, ckpt)
    for cfg in (lacking, explicit):
        check_resume_config(ckpt, cfg)
        check_run_dir(run, cfg)
    with pytest.raises(RunDirError, match="model.only_mid_control is False there, True"):
        check_resume_config(ckpt, load_config(TINY_CONFIG, ["model.only_mid_control=true"]))


def test_a_checkpoint_of_another_model_config_is_refused_before_out_is_written(tmp_path):
    """--resume PATH from another run with other model settings (a fork), or an OUT whose
    config.yaml is gone: Lightning's restore refused it only after OUT/config.yaml had been
    written with the refused config, which the next plain rerun then took (and failed on)."""
    from cldm.callbacks import AtomicCheckpointIO
    from cldm.resume import LIGHTNING_KEYS, TRAINING_KEY
    from cldm.run_dir import check_resume_config
    from cldm.weights_config import config_hash

    tiny = load_config(TINY_CONFIG)
    other = load_config(TINY_CONFIG, ["model.only_mid_control=true"])
    run = tmp_path / "run"
    record_config(run, tiny)
    ckpt = run / "checkpoints" / "step=00000005.ckpt"
    AtomicCheckpointIO().save_checkpoint({**{k: {} for k in LIGHTNING_KEYS}, "global_step": 5,
                                          TRAINING_KEY: {"config_hash": config_hash(tiny)}}, ckpt)
    check_resume_config(ckpt, tiny)  # its own config
    check_resume_config(None, other)  # nothing to resume
    with pytest.raises(RunDirError, match=re.escape(
            f"{ckpt}: trained with another model config ({run / 'config.yaml'}): model.only_mid_control is False "
            "there, True in this command's (1 key(s) differ); leave out model.only_mid_control=true to continue it")):
        check_resume_config(ckpt, other, [("model.only_mid_control=true", "model.only_mid_control")])
    with pytest.raises(RunDirError, match=r"\(1 key\(s\) differ\)$"):  # nothing given sets it: no remedy to name
        check_resume_config(ckpt, other)
    by_hashes = re.escape(f"{ckpt}: trained with another model config (hash {config_hash(tiny)}, this config's "
                          f"{config_hash(other)}); pass the --config and model settings it was trained with")
    # no run config to name the key by (one of another config, unreadable, gone): the hashes
    for text in (OmegaConf.to_yaml(other), "model: [unclosed\n", None):
        if text is None:
            (run / "config.yaml").unlink()
        else:
            (run / "config.yaml").write_text(text)
        with pytest.raises(RunDirError, match=f"^{by_hashes}$"):
            check_resume_config(ckpt, other)


def test_a_refused_resume_names_the_key_by_the_config_its_checkpoint_keeps(tmp_path):
    """OUT/config.yaml edited by hand since (or gone): the checkpoint's hyperparameters keep the
    config it was trained with, so the key that differs is named, not just two hashes. A kept
    config that does not give the recorded hash is not trusted: the hashes, as before."""
    from cldm.callbacks import AtomicCheckpointIO
    from cldm.resume import LIGHTNING_KEYS, TRAINING_KEY
    from cldm.run_dir import check_resume_config
    from cldm.weights_config import config_hash

    tiny = load_config(TINY_CONFIG)
    other = load_config(TINY_CONFIG, ["model.only_mid_control=true"])
    run = tmp_path / "run"
    record_config(run, other)  # edited by hand after the checkpoint was written
    ckpt = run / "checkpoints" / "step=00000005.ckpt"

    def save(kept):
        AtomicCheckpointIO().save_checkpoint({**{k: {} for k in LIGHTNING_KEYS}, "global_step": 5,
                                              "hyper_parameters": {"lr": 1e-5, "config": OmegaConf.to_container(kept)},
                                              TRAINING_KEY: {"config_hash": config_hash(tiny)}}, ckpt)

    save(tiny)
    key = "model.only_mid_control is False there, True in this command's (1 key(s) differ)"
    with pytest.raises(RunDirError, match=re.escape(
            f"{ckpt}: trained with another model config (the one the checkpoint records; {run / 'config.yaml'} was "
            f"changed since): {key}") + "$"):
        check_resume_config(ckpt, other)
    (run / "config.yaml").unlink()
    with pytest.raises(RunDirError, match=re.escape(
            f"{ckpt}: trained with another model config (the one the checkpoint records): {key}; leave out "
            "model.only_mid_control=true to continue it") + "$"):
        check_resume_config(ckpt, other, [("model.only_mid_control=true", "model.only_mid_control")])
    save(load_config(TINY_CONFIG, ["model.scale_factor=0.5"]))  # not the config its hash is of
    with pytest.raises(RunDirError, match=re.escape(f"(hash {config_hash(tiny)}, this config's {config_hash(other)}); "
                                                    "pass the --config and model settings it was trained with")):
        check_resume_config(ckpt, other)
