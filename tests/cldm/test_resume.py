"""Training checkpoint files: which one resumes, which are incomplete, which are not of this
training, and the agreement of DDP processes on the one to resume from."""
import multiprocessing
import os

import lightning as L
import torch

from cldm.callbacks import AtomicCheckpointIO, StepCheckpoint
from cldm.checkpoint import save_state_dict
from cldm.lightning import ColorControlModule
from cldm.resume import (ResumeMismatchError, check_same_resume, find_resume_checkpoint, incomplete_checkpoints,
                         is_complete_checkpoint, remove_partial_checkpoints, resume_problem)
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
