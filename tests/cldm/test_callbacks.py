"""Lightning plug-ins: atomic checkpoint writes, pruning of step checkpoints, and the files
the callbacks write."""
import os

import pytest
import torch

from cldm.callbacks import AtomicCheckpointIO, ImageLogger, ReplicaCheck, StepCheckpoint
from cldm.lightning import ColorControlModule
from cldm.resume import is_complete_checkpoint
from tests.train_helpers import FakeTrainer, tiny_batch, tiny_model


def test_atomic_save_leaves_old_file_on_failure_and_no_temp(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "step=00000005.ckpt"
    io.save_checkpoint({"global_step": 5, "w": torch.ones(3)}, path)
    assert is_complete_checkpoint(path) and os.listdir(tmp_path) == [path.name]

    def dies_half_way(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 6}, path)
    assert os.listdir(tmp_path) == [path.name]
    assert torch.load(path, weights_only=True)["global_step"] == 5


def test_atomic_save_gives_the_mode_of_an_ordinary_file(tmp_path):
    """Checkpoints, sample grids and the replica report get 0666 & ~umask, as open() would create
    them (not mkstemp's 0600), and no temporary file is left."""
    io = AtomicCheckpointIO()
    module = ColorControlModule(tiny_model("v2"))
    old = os.umask(0o027)
    try:
        for umask, mode in ((0o027, 0o640), (0o002, 0o664)):
            os.umask(umask)
            d = tmp_path / f"u{umask:03o}"
            io.save_checkpoint({"global_step": 1}, d / "step=00000001.ckpt")
            ReplicaCheck(d / "replicas.json").on_train_end(FakeTrainer(), module)
            ImageLogger(d / "images", every_n_steps=1, n=1, ddim_steps=1).on_train_batch_end(
                FakeTrainer(), module, None, tiny_batch(1), 0)
            plain = d / "plain"
            plain.write_bytes(b"")
            files = [d / "step=00000001.ckpt", d / "replicas.json", d / "images" / "step-00000001.png", plain]
            assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: mode for p in files}
            assert sorted(p.name for p in d.rglob("*")) == sorted(["images", *(p.name for p in files)])
    finally:
        os.umask(old)


def test_step_checkpoint_keeps_the_newest_of_the_whole_folder(tmp_path):
    """Files of earlier runs (a resume) count too; other files are left alone."""
    io = AtomicCheckpointIO()
    for step in (2, 10, 4, 9):
        io.save_checkpoint({"global_step": step}, tmp_path / f"step={step:08d}.ckpt")
    (tmp_path / "notes.txt").write_text("mine")
    StepCheckpoint(tmp_path, every_n_steps=1, keep=2).prune(FakeTrainer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step=00000009.ckpt", "step=00000010.ckpt"]
    StepCheckpoint(tmp_path, every_n_steps=1, keep=2).prune(type("Rank1", (FakeTrainer,), {"is_global_zero": False}))
    assert len(list(tmp_path.iterdir())) == 3  # only global rank 0 deletes


def test_ctrl_c_during_a_checkpoint_write_stays_a_ctrl_c(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside one of torch.save's writes leaves its zip writer at the wrong
    position; closing it then raises RuntimeError ('unexpected pos') over the interrupt, which
    Lightning would treat as a crash (exit 1, a traceback) instead of ending the run."""
    io = AtomicCheckpointIO()
    path = tmp_path / "step=00000005.ckpt"
    io.save_checkpoint({"global_step": 5}, path)
    real_save = torch.save

    class CutOnThirdWrite:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(b)

        def flush(self):
            self.f.flush()
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, CutOnThirdWrite(f)))
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 6, "w": torch.ones(100)}, path)
    assert os.listdir(tmp_path) == [path.name]
    assert torch.load(path, weights_only=True)["global_step"] == 5
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, f) if obj else 1 / 0)
    with pytest.raises(ZeroDivisionError):  # other errors stay what they are
        io.save_checkpoint({}, path)
