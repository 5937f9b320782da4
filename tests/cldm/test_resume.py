"""Training checkpoint files: which one resumes, which are incomplete, which are not of this
training, and the agreement of DDP processes on the one to resume from."""
import multiprocessing
import os
import pickle
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from cldm.callbacks import AtomicCheckpointIO, StepCheckpoint
from cldm.checkpoint import CheckpointError, save_state_dict
from cldm.lightning import ColorControlModule
from cldm.resume import (LIGHTNING_KEYS, ResumeMismatchError, check_same_resume, checkpoint_step,
                         find_resume_checkpoint, incomplete_checkpoints, is_complete_checkpoint, list_checkpoints,
                         read_training_checkpoint, remove_partial_checkpoints, resume_misfit, resume_problem)
from cldm.trainable import TRAINING_KEY, export_keys
from tests.train_helpers import FakeTrainer, tiny_model


def _resume_worker(rank, store, paths, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_same_resume(paths[rank])
        results.put((rank, "ok"))
    except ResumeMismatchError as e:
        results.put((rank, str(e)))
    finally:
        torch.distributed.destroy_process_group()


def resume_verdicts(tmp_path, name, paths):
    """check_same_resume in 2 gloo processes, process k passing paths[k]: {rank: 'ok' or error}."""
    ctx = multiprocessing.get_context("fork")  # fast; the children only pickle and talk gloo
    results = ctx.Queue()
    procs = [ctx.Process(target=_resume_worker, args=(r, tmp_path / name, paths, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return out


def test_all_processes_must_resume_from_rank_zeros_checkpoint(tmp_path):
    a, b = "out/checkpoints/step=00000010.ckpt", "out/checkpoints/step=00000008.ckpt"
    assert resume_verdicts(tmp_path, "same", [a, a]) == {0: "ok", 1: "ok"}
    assert resume_verdicts(tmp_path, "fresh", [None, None]) == {0: "ok", 1: "ok"}
    # e.g. rank 1's node lists the shared folder late and sees an older newest checkpoint
    for name, paths in (("older", [a, b]), ("none", [a, None])):
        verdicts = resume_verdicts(tmp_path, name, paths)
        assert verdicts[0] == verdicts[1]  # both stop, with the same one-line reason
        assert verdicts[0] == (f"processes chose different checkpoints to resume from: global rank 0 {a}, rank 1 "
                               f"{paths[1] or 'none (fresh start)'} (1 rank(s) differ); is --out on a shared "
                               "filesystem that every node sees up to date? Rerun, or pass --resume with rank 0's "
                               "file")
    check_same_resume(a)  # one process (no group): nothing to agree on


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    for step in (3, 10):
        io.save_checkpoint({"global_step": step}, tmp_path / f"step={step:08d}.ckpt")
    (tmp_path / "step=00000020.ckpt").write_bytes(b"PK\x03\x04 truncated")  # e.g. a copy cut short
    (tmp_path / ".step=00000030.ckpt.abc.tmp").write_bytes(b"partial")       # a killed save
    assert find_resume_checkpoint(tmp_path).name == "step=00000010.ckpt"
    os.utime(tmp_path / "step=00000003.ckpt", (2e9, 2e9))  # touched later (a copy, say): the step decides
    assert find_resume_checkpoint(tmp_path).name == "step=00000010.ckpt"
    assert [p.name for p in remove_partial_checkpoints(tmp_path)] == [".step=00000030.ckpt.abc.tmp"]
    assert find_resume_checkpoint(tmp_path / "missing") is None


def test_incomplete_checkpoints_are_listed_apart_and_neither_kept_nor_deleted(tmp_path):
    """A step file cut short is no resume candidate and takes no --ckpt-keep slot; it is left for
    the user to move (a final name might be someone's copy in progress)."""
    io = AtomicCheckpointIO()
    for step in (274, 275, 276):
        io.save_checkpoint({"global_step": step}, tmp_path / f"step={step:08d}.ckpt")
    cut = tmp_path / "step=00000277.ckpt"
    cut.write_bytes((tmp_path / "step=00000276.ckpt").read_bytes()[:-30])  # the zip's directory is lost
    (tmp_path / "notes.ckpt").write_bytes(b"no step in the name")
    assert incomplete_checkpoints(tmp_path) == [cut]
    assert find_resume_checkpoint(tmp_path).name == "step=00000276.ckpt"
    StepCheckpoint(tmp_path, every_n_steps=1, keep=2).prune(FakeTrainer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.ckpt", "step=00000275.ckpt", "step=00000276.ckpt",
                                                           "step=00000277.ckpt"]
    assert incomplete_checkpoints(tmp_path / "missing") == []


def test_resume_problem_accepts_training_checkpoints_only(tmp_path):
    """An explicit --resume file must be a Lightning checkpoint written by this training: an init
    .ckpt is a zip too (it passes is_complete_checkpoint) but holds weights only."""
    module = ColorControlModule(tiny_model("v2"))
    init = tmp_path / "init.ckpt"  # as tool_add_control_sd21.py writes it with a .ckpt name
    save_state_dict(module.model.state_dict(), init)
    assert is_complete_checkpoint(init)
    assert resume_problem(init) == ("not a Lightning training checkpoint (no 'pytorch-lightning_version'; an "
                                    "--init or exported file holds weights only); resume from a file in "
                                    "OUT/checkpoints")
    ckpt = {"pytorch-lightning_version": L.__version__, "global_step": 2, "epoch": 0, "loops": {},
            "optimizer_states": [], "lr_schedulers": [], "state_dict": {}}
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    assert resume_problem(other) == "a Lightning checkpoint, but not of this training (no 'cldm' entry)"
    module.on_save_checkpoint(ckpt)  # adds what this training stores
    good = tmp_path / "step=00000002.ckpt"
    AtomicCheckpointIO().save_checkpoint(ckpt, good)
    assert resume_problem(good) is None
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:200])
    assert resume_problem(cut).startswith("truncated, or not a checkpoint written by this training (")
    legacy = tmp_path / "legacy.ckpt"  # an old torch.save format cannot be memory-mapped or resumed
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    assert resume_problem(legacy).startswith("truncated, or not a checkpoint written by this training (")
    torch.save([1, 2], other)
    assert resume_problem(other) == "holds a list, not a training checkpoint"


def training_file(path, step=3, **changes):
    """What a training checkpoint holds at the top level (no optimiser tensors), with `changes`."""
    ckpt = {**{k: {} for k in LIGHTNING_KEYS}, "global_step": step, "state_dict": {"model.w": torch.ones(2)},
            TRAINING_KEY: {"config_hash": "abc"}, **changes}
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    return path


class Evil:
    """Unpickling this creates a folder: stands in for arbitrary code in a .ckpt."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_only_this_trainings_checkpoints_are_read_and_none_runs_code(tmp_path):
    assert read_training_checkpoint(training_file(tmp_path / "good.ckpt"))["global_step"] == 3
    for name, changes in [("foreign.ckpt", {"state_dict": {"model.w": torch.ones(2), "w": torch.ones(2)}}),
                          ("entry.ckpt", {TRAINING_KEY: "v2"}), ("list.ckpt", {"state_dict": [torch.ones(2)]})]:
        assert read_training_checkpoint(training_file(tmp_path / name, **changes)) is None, name
    no_loops = training_file(tmp_path / "no_loops.ckpt")
    ckpt = torch.load(no_loops, weights_only=True)
    del ckpt["loops"]
    torch.save(ckpt, no_loops)
    assert resume_problem(no_loops).startswith("a Lightning ") and "without 'loops'" in resume_problem(no_loops)
    marker = tmp_path / "pwned"
    evil = training_file(tmp_path / "evil.ckpt", payload=Evil(marker))
    assert resume_problem(evil).startswith("holds pickled Python objects (") and resume_problem(evil).endswith(
        "), which this training's checkpoints never do: another project's or Lightning 1.x's checkpoint, which cannot "
        "be resumed"), resume_problem(evil)  # not "truncated": it is whole
    assert read_training_checkpoint(evil) is None and not marker.exists()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(training_file(tmp_path / "whole.ckpt").read_bytes()[:-100])
    assert resume_problem(cut) == "truncated, or not a checkpoint written by this training (RuntimeError)"


def test_resume_misfit_names_one_tensor_and_tolerates_an_unrecorded_config():
    model = ColorControlModule(tiny_model("v2")).model
    own = model.state_dict()
    trained = {k: own[k] for k in export_keys(model)}
    first = sorted(trained)[0]
    _, reason = resume_misfit(model, "abc", {k: v for k, v in trained.items() if k != first}, {})
    assert reason.startswith(f"lacks 1 tensor that this config trains (e.g. {first}; ")
    assert resume_misfit(model, "abc", trained, {})[1] is None  # a checkpoint that records no config hash
    assert resume_misfit(model, "", trained, {"config_hash": "abc"})[1] is None  # a caller that has none
    assert resume_misfit(model, "def", trained, {"config_hash": "abc"})[1] == \
        "trained with another model config (hash abc, this config's def)"


def test_resume_misfit_accepts_a_hash_that_an_older_checkpoint_recorded_for_this_config():
    """A checkpoint from before 2026-11-28 may record another hash of the same model config
    (config_hashes' `also`): it still resumes, while a hash in neither place is refused."""
    model = ColorControlModule(tiny_model("v2")).model
    own = model.state_dict()
    trained = {k: own[k] for k in export_keys(model)}
    assert resume_misfit(model, "new", trained, {"config_hash": "old"}, also=("older", "old"))[1] is None
    assert resume_misfit(model, "new", trained, {"config_hash": "else"}, also=("old",))[1] == \
        "trained with another model config (hash else, this config's new)"


def test_the_step_comes_from_the_name_else_the_contents(tmp_path):
    assert checkpoint_step(tmp_path / "step=00000300.ckpt") == 300  # not even read
    assert checkpoint_step(training_file(tmp_path / "last.ckpt", step=7)) == 7
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    assert checkpoint_step(tmp_path / "other.ckpt") == 0
    for step in (9, 10):  # names without zero padding: the number decides, not the text
        training_file(tmp_path / "run" / f"step={step}.ckpt", step)
    assert find_resume_checkpoint(tmp_path / "run").name == "step=10.ckpt"


def test_only_ckpt_files_are_checkpoints_and_only_dot_tmp_files_partial(tmp_path):
    training_file(tmp_path / "step=00000010.ckpt", 10)
    training_file(tmp_path / "step=00000040.ckpt.bak", 40)  # a whole copy, put aside
    (tmp_path / ".step=00000050.ckpt.1a2b3c4d.tmp").write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / ".nfs000000000001").write_bytes(b"")  # a hidden file not ours (kills matching any dot file)
    assert find_resume_checkpoint(tmp_path).name == "step=00000010.ckpt"
    assert incomplete_checkpoints(tmp_path) == []
    assert [p.name for p in remove_partial_checkpoints(tmp_path)] == [".step=00000050.ckpt.1a2b3c4d.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".nfs000000000001", "notes.tmp", "step=00000010.ckpt",
                                            "step=00000040.ckpt.bak"]


def test_a_path_and_its_string_are_the_same_choice(tmp_path):
    a = "out/checkpoints/step=00000010.ckpt"
    assert resume_verdicts(tmp_path, "mixed", [Path(a), a]) == {0: "ok", 1: "ok"}


def test_the_mismatch_counts_every_rank_that_differs(monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 4)
    monkeypatch.setattr(dist, "all_gather_object",
                        lambda out, obj, *a: out.__setitem__(slice(None), [obj, "b", obj, None]))
    with pytest.raises(CheckpointError, match=r"global rank 0 a, rank 1 b \(2 rank\(s\) differ\)"):
        check_same_resume("a")  # a CheckpointError: the training script says it in one line


@pytest.mark.parametrize("key", ["pytorch-lightning_version", "global_step", "state_dict", "optimizer_states",
                                 "lr_schedulers", "loops"])
def test_each_entry_lightning_resumes_from_is_required(tmp_path, key):
    path = training_file(tmp_path / "step=00000003.ckpt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt[key]
    torch.save(ckpt, path)
    if key == "pytorch-lightning_version":
        assert resume_problem(path) == (f"not a Lightning training checkpoint (no {key!r}; an --init or exported file "
                                        "holds weights only); resume from a file in OUT/checkpoints")
    else:  # Lightning 1.x's, say: its version says whose it is
        assert resume_problem(path) == (f"a Lightning {ckpt['pytorch-lightning_version']} checkpoint without {key!r} "
                                        "(weights only, Lightning before 1.6, or another project's), which cannot be "
                                        "resumed")
    assert read_training_checkpoint(path) is None


def test_a_state_dict_that_is_no_dict_is_no_training_checkpoint(tmp_path):
    """Even of names that look like the module's."""
    assert read_training_checkpoint(training_file(tmp_path / "names.ckpt", state_dict=["model.w"])) is None


def test_reading_a_checkpoint_warns_nothing(tmp_path):
    """torch.load's warning on an unusual pickle protocol is not passed on: the one-line problem says it."""
    path = tmp_path / "p5.ckpt"
    torch.save({k: {} for k in LIGHTNING_KEYS}, path, pickle_protocol=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resume_problem(path) == "truncated, or not a checkpoint written by this training (UnpicklingError)"
        assert read_training_checkpoint(path) is None
    assert caught == []


def test_checkpoints_are_read_onto_the_cpu_memory_mapped_and_weights_only(tmp_path, monkeypatch):
    """A checkpoint saved on a GPU opens on a host without one; a multi-GB file costs little."""
    real, calls = torch.load, []

    def load(path, **kw):
        calls.append(kw)
        return real(path, **kw)
    path = training_file(tmp_path / "last.ckpt", step=7)
    monkeypatch.setattr(torch, "load", load)
    assert resume_problem(path) is None and checkpoint_step(path) == 7
    assert calls == [dict(map_location="cpu", weights_only=True, mmap=True)] * 2


def test_the_step_read_from_the_contents_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = training_file(tmp_path / "last.ckpt", payload=Evil(marker))
    with pytest.raises(pickle.UnpicklingError):
        checkpoint_step(evil)
    assert not marker.exists()


def test_the_step_comes_from_the_files_name_not_its_folders(tmp_path):
    assert checkpoint_step(training_file(tmp_path / "step=00000300" / "last.ckpt", step=7)) == 7


def test_resume_misfit_a_tensor_of_another_shape_comes_first():
    model = ColorControlModule(tiny_model("v2")).model
    own = model.state_dict()
    trained = {k: own[k] for k in export_keys(model)}
    first, key = sorted(trained)[0], sorted(trained)[1]
    trained[key] = torch.zeros(*trained[key].shape, 2)
    del trained[first]
    report, reason = resume_misfit(model, "abc", trained, {})
    assert list(report.mismatched) == [key] and report.missing == [first]
    assert reason.startswith(f"{key} is {list(trained[key].shape)} in the checkpoint but {list(own[key].shape)} in "
                             "the model; likely ")


def test_resume_misfit_names_the_count_and_first_of_what_is_missing_or_too_much():
    model = ColorControlModule(tiny_model("v2")).model
    own = model.state_dict()
    trained = {k: own[k] for k in export_keys(model)}
    policy = "model.sd_locked and model.train_unet_input say which train"
    a, b = list(trained)[:2]  # named in the model's order
    _, reason = resume_misfit(model, "abc", {k: v for k, v in trained.items() if k not in (a, b)}, {})
    assert reason == f"lacks 2 tensors that this config trains (e.g. {a}; {policy})"
    locked = sorted(set(own) - set(trained))
    _, reason = resume_misfit(model, "abc", {**trained, locked[0]: own[locked[0]]}, {})
    assert reason == f"holds 1 tensor that this config does not train (e.g. {locked[0]}; {policy})"
    _, reason = resume_misfit(model, "abc", {**trained, "model.x": torch.ones(1), "model.a": torch.ones(1)}, {})
    assert reason == f"holds 2 tensors that this config does not train (e.g. model.x; {policy})"  # the file's order


def test_steps_are_numbers_of_any_size_in_any_step_name_of_the_folder_itself(tmp_path):
    """Step 100 is newer than 99 (and 1000 than 999); Lightning's own epoch=E-step=N names count;
    a step file in a subfolder (put aside) does not."""
    io = AtomicCheckpointIO()
    for name in ("step=99.ckpt", "step=100.ckpt", "epoch=3-step=00000120.ckpt"):
        io.save_checkpoint({"global_step": 0}, tmp_path / name)
    io.save_checkpoint({"global_step": 0}, tmp_path / "old" / "step=00000500.ckpt")
    os.utime(tmp_path / "step=99.ckpt", (2e9, 2e9))
    assert [(s, t, p.name) for s, t, p in list_checkpoints(tmp_path)][:1] == [(99, 2e9, "step=99.ckpt")]
    assert [(s, p.name) for s, _, p in list_checkpoints(tmp_path)] == [
        (99, "step=99.ckpt"), (100, "step=100.ckpt"), (120, "epoch=3-step=00000120.ckpt")]
    assert find_resume_checkpoint(tmp_path).name == "epoch=3-step=00000120.ckpt"


def test_incomplete_checkpoints_come_oldest_step_first(tmp_path):
    for step in (12, 3, 7):
        (tmp_path / f"step={step:08d}.ckpt").write_bytes(b"PK\x03\x04 cut short")
    assert [p.name for p in incomplete_checkpoints(tmp_path)] == [
        "step=00000003.ckpt", "step=00000007.ckpt", "step=00000012.ckpt"]
