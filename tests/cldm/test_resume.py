"""Training checkpoint files: which one resumes, which are incomplete, which are not of this
training, and the agreement of DDP processes on the one to resume from."""
import multiprocessing
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from cldm.callbacks import AtomicCheckpointIO, StepCheckpoint
from cldm.checkpoint import save_state_dict
from cldm.lightning import ColorControlModule
from cldm.resume import (LIGHTNING_KEYS, ResumeMismatchError, check_same_resume, checkpoint_step,
                         find_resume_checkpoint, incomplete_checkpoints, is_complete_checkpoint,
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
        msg = verdicts[0]
        assert "\n" not in msg and f"global rank 0 {a}" in msg and f"rank 1 {paths[1] or 'none'}" in msg, msg
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
    assert resume_problem(no_loops).startswith("not a Lightning training checkpoint (no 'loops'; ")
    marker = tmp_path / "pwned"
    evil = training_file(tmp_path / "evil.ckpt", payload=Evil(marker))
    assert resume_problem(evil) == "truncated, or not a checkpoint written by this training (UnpicklingError)"
    assert read_training_checkpoint(evil) is None and not marker.exists()


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
    assert find_resume_checkpoint(tmp_path).name == "step=00000010.ckpt"
    assert incomplete_checkpoints(tmp_path) == []
    assert [p.name for p in remove_partial_checkpoints(tmp_path)] == [".step=00000050.ckpt.1a2b3c4d.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp", "step=00000010.ckpt", "step=00000040.ckpt.bak"]


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
    with pytest.raises(ResumeMismatchError, match=r"global rank 0 a, rank 1 b \(2 rank\(s\) differ\)"):
        check_same_resume("a")
