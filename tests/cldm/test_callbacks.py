"""Lightning plug-ins: atomic checkpoint writes, pruning of step checkpoints, and the files
the callbacks write."""
import contextlib
import hashlib
import json
import os
import threading

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from PIL import Image
from torch.utils.data import DataLoader

import atomicio
from cldm.callbacks import (GRID_COLUMNS, LATENT_TRUTH, AtomicCheckpointIO, ImageLogger, ReplicaCheck,
                            ResumeAgreement, StepCheckpoint, StepLines, _interruption, labelled_grid,
                            weights_digest)
from cldm.lightning import ColorControlModule
from cldm.resume import ResumeMismatchError, is_complete_checkpoint
from cldm.trainable import export_keys
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



def test_a_checkpoint_write_on_a_full_disk_is_the_os_error_under_the_zip_writers(tmp_path, monkeypatch):
    """torch.save says only 'unexpected pos' over a full disk's ENOSPC (as it does on a real full
    tmpfs); the run's one line needs the errno and the checkpoint's name. Other errors stay."""
    import errno

    def disk_full(obj, f, *a, **kw):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    io, path = AtomicCheckpointIO(), tmp_path / "step=00000006.ckpt"
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as e:
        io.save_checkpoint({"global_step": 6}, path)
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, "No space left on device", str(path))
    assert e.value.__suppress_context__ and os.listdir(tmp_path) == []  # no temp file left

    # under the zip writer's error: no OSError, or one that names no failed write (no errno)
    for cause in (ValueError("not a write"), OSError("a message, no errno")):
        def other(obj, f, *a, cause=cause, **kw):
            try:
                raise cause
            except Exception:
                raise RuntimeError("unexpected pos 1 vs 2")

        monkeypatch.setattr(torch, "save", other)
        with pytest.raises(RuntimeError, match="^unexpected pos 1 vs 2$"):
            io.save_checkpoint({"global_step": 6}, path)


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
    StepCheckpoint(tmp_path, every_n_steps=1, keep=2).prune(type("Rank1", (FakeTrainer,), {"is_global_zero": False}))
    assert len(list(tmp_path.iterdir())) == 5  # only global rank 0 deletes
    StepCheckpoint(tmp_path, every_n_steps=1, keep=2).prune(FakeTrainer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step=00000009.ckpt", "step=00000010.ckpt"]


def test_step_checkpoint_prune_tolerates_a_file_gone_since_the_listing(tmp_path, monkeypatch):
    """Removed by hand (or another tool) between the listing and the unlink: not an error."""
    gone = [(step, 0.0, tmp_path / f"step={step:08d}.ckpt") for step in (1, 2, 3)]
    monkeypatch.setattr("cldm.callbacks.list_checkpoints", lambda dirpath: gone)
    StepCheckpoint(tmp_path, every_n_steps=1, keep=1).prune(FakeTrainer())
    assert os.listdir(tmp_path) == []


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
    with pytest.raises(KeyboardInterrupt) as err:
        io.save_checkpoint({"global_step": 6, "w": torch.ones(100)}, path)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no zip-writer error shown above it
    assert os.listdir(tmp_path) == [path.name]
    assert torch.load(path, weights_only=True)["global_step"] == 5
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, f) if obj else 1 / 0)
    with pytest.raises(ZeroDivisionError):  # other errors stay what they are
        io.save_checkpoint({}, path)


def test_interruption_is_found_down_the_context_chain_and_a_cycle_ends_the_search():
    interrupt, closing = KeyboardInterrupt(), RuntimeError("unexpected pos")
    closing.__context__ = OSError("write")
    closing.__context__.__context__ = interrupt
    assert _interruption(closing) is interrupt
    exiting = closing.__context__.__context__ = SystemExit(1)
    assert _interruption(closing) is exiting  # an exit too, not only Ctrl-C
    a, b, found = RuntimeError("a"), ValueError("b"), []
    a.__context__, b.__context__ = b, a
    search = threading.Thread(target=lambda: found.append(_interruption(a)), daemon=True)
    search.start()
    search.join(5)
    assert found == [None]


def test_atomic_save_syncs_and_never_shows_a_ckpt_name_before_it_is_whole(tmp_path, monkeypatch):
    """The temporary name ends in .tmp (a listing never counts it as a checkpoint), the file and then
    the folder's entry are synced; a local folder with ':' in its name is no remote URL."""
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(atomicio.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    path = tmp_path / "run:2" / "checkpoints" / "step=00000001.ckpt"  # folders made as needed
    during, real_save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: during.extend(os.listdir(path.parent)) or real_save(obj, f))
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    [tmp] = during
    assert tmp.startswith(".step=00000001.ckpt.") and tmp.endswith(".tmp")
    assert synced == [str(path.parent / tmp), str(path.parent)]
    assert os.listdir(path.parent) == [path.name] and torch.load(path, weights_only=True) == {"global_step": 1}


def test_atomic_save_leaves_remote_storage_to_lightning(monkeypatch, tmp_path):
    """With its storage options, and nothing written locally (no 's3:' folder in the working one)."""
    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint",
                        lambda self, ckpt, path, opts=None: seen.append((path, opts)))
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, "s3://bucket/run/step=00000001.ckpt", {"anon": True})
    assert seen == [("s3://bucket/run/step=00000001.ckpt", {"anon": True})]
    assert os.listdir(tmp_path) == []


class Listing(Callback):
    """The checkpoint folder as each batch starts and after training (Lightning runs checkpoint
    callbacks last, so at a batch's end they have not saved yet)."""

    def __init__(self, folder):
        self.folder, self.seen = folder, []

    def names(self):
        return sorted(p.name for p in self.folder.glob("*.ckpt"))

    def on_train_batch_start(self, trainer, *args):
        self.seen.append((trainer.global_step, self.names()))


def test_step_checkpoint_prunes_after_each_save_and_saves_the_final_step(tmp_path):
    """keep=1, every 2 steps, 5 steps: pruned as soon as step 4 is saved, and the run's end saves
    step 5 (not a save point) and prunes step 4."""
    folder = tmp_path / "checkpoints"
    listing = Listing(folder)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, default_root_dir=tmp_path,
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StepCheckpoint(folder, every_n_steps=2, keep=1), listing])
    trainer.fit(ColorControlModule(tiny_model("v2"), lr=1e-3), DataLoader([tiny_batch(1)] * 5, batch_size=None))
    assert listing.seen == [(0, []), (1, []), (2, ["step=00000002.ckpt"]), (3, ["step=00000002.ckpt"]),
                            (4, ["step=00000004.ckpt"])]
    assert listing.names() == ["step=00000005.ckpt"]
    assert torch.load(folder / "step=00000005.ckpt", weights_only=True)["global_step"] == 5


def test_step_checkpoint_writes_a_final_step_that_is_a_save_point_once(tmp_path):
    """The save at the run's end is skipped when the last step was just saved: no second write of
    a checkpoint a few GB large."""
    saved = []

    class Counting(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            saved.append(os.path.basename(path))
            super().save_checkpoint(checkpoint, path, storage_options)
    folder = tmp_path / "checkpoints"
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, default_root_dir=tmp_path,
                        plugins=[Counting()], enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StepCheckpoint(folder, every_n_steps=2, keep=3)])
    trainer.fit(ColorControlModule(tiny_model("v2"), lr=1e-3), DataLoader([tiny_batch(1)] * 4, batch_size=None))
    assert saved == ["step=00000002.ckpt", "step=00000004.ckpt"]


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # as the training script
def test_step_checkpoint_replaces_a_step_file_already_there_and_the_newest_is_best(tmp_path):
    """A file of that step left in the folder (a copy cut short: neither resumed from nor pruned) is
    replaced by the whole checkpoint, not joined by step=00000002-v1.ckpt; Lightning's "best" is the
    newest step (what ckpt_path="best" would load)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step=00000002.ckpt").write_bytes(b"PK\x03\x04 cut short")
    ckpt = StepCheckpoint(folder, every_n_steps=2, keep=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, default_root_dir=tmp_path,
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt])
    trainer.fit(ColorControlModule(tiny_model("v2"), lr=1e-3), DataLoader([tiny_batch(1)] * 4, batch_size=None))
    assert sorted(os.listdir(folder)) == ["step=00000002.ckpt", "step=00000004.ckpt"]
    assert torch.load(folder / "step=00000002.ckpt", weights_only=True)["global_step"] == 2
    assert ckpt.best_model_path == str(folder / "step=00000004.ckpt")


def fake_group(monkeypatch, others):
    """Make this process global rank 0 of a process group whose other ranks gather `others`."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 1 + len(others))

    def all_gather_object(out, obj, *a):
        out[:] = [obj, *others]
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)


def test_resume_agreement_stops_a_process_that_resumes_from_another_checkpoint(monkeypatch):
    fake_group(monkeypatch, ["out/checkpoints/step=00000008.ckpt"])
    with pytest.raises(ResumeMismatchError, match=r"global rank 0 out/checkpoints/step=00000010\.ckpt, rank 1 "
                                                  r"out/checkpoints/step=00000008\.ckpt"):
        ResumeAgreement("out/checkpoints/step=00000010.ckpt").setup(FakeTrainer(), None, "fit")
    ResumeAgreement("out/checkpoints/step=00000008.ckpt").setup(FakeTrainer(), None, "fit")


def test_replica_check_reports_and_raises_when_replicas_differ(tmp_path, monkeypatch):
    module = ColorControlModule(tiny_model("v2"))
    mine = weights_digest(module)
    fake_group(monkeypatch, [mine, "f" * 64])
    with pytest.raises(RuntimeError, match="DDP replicas hold different weights at step 1"):
        ReplicaCheck(tmp_path / "r" / "replicas.json").on_train_end(FakeTrainer(), module)
    assert json.loads((tmp_path / "r" / "replicas.json").read_text()) == {
        "step": 1, "world_size": 3, "identical": False, "digests": [mine, mine, "f" * 64]}
    fake_group(monkeypatch, [mine])
    ReplicaCheck(tmp_path / "r" / "replicas.json").on_train_end(FakeTrainer(), module)
    assert json.loads((tmp_path / "r" / "replicas.json").read_text()) == {
        "step": 1, "world_size": 2, "identical": True, "digests": [mine, mine]}
    rank1 = type("Rank1", (FakeTrainer,), {"is_global_zero": False})
    ReplicaCheck(tmp_path / "rank1.json").on_train_end(rank1, module)
    assert not (tmp_path / "rank1.json").exists()  # only global rank 0 writes


def test_weights_digest_sees_every_trainable_tensor_and_no_locked_one():
    module = ColorControlModule(tiny_model("v2"))
    sd, trainable = module.model.state_dict(), list(export_keys(module.model))
    before = weights_digest(module)
    with torch.no_grad():
        sd[next(k for k in sd if k not in set(trainable))].view(-1)[0] += 1
    assert weights_digest(module) == before  # a locked tensor is no replica's business
    with torch.no_grad():
        x = sd[trainable[-1]].view(-1)
        x[0] = torch.nextafter(x[0], torch.tensor(float("inf")))  # one float32 ulp: bitwise, not to fp16
    assert weights_digest(module) != before


def test_weights_digest_is_sha256_of_each_trainable_name_then_its_bytes():
    """The replica report's digests can be recomputed from a checkpoint: name, raw bytes, in export order."""
    module = ColorControlModule(tiny_model("v2"))
    sd, h = module.model.state_dict(), hashlib.sha256()
    for k in export_keys(module.model):
        h.update(k.encode() + sd[k].contiguous().numpy().tobytes())
    assert weights_digest(module) == h.hexdigest()


def test_image_logger_samples_on_rank_zero_at_its_steps_under_the_precision_context(tmp_path):
    """Once per step that is a multiple of every_n_steps (not step 0), with n, ddim_steps and the
    seed it was given, inside the precision plugin's forward context; every_n_steps=0 is off."""
    inside, calls = [], []

    class Trainer(FakeTrainer):
        class precision_plugin:
            @staticmethod
            @contextlib.contextmanager
            def forward_context():
                inside.append(True)
                yield
                inside.pop()

    grid = torchvision.utils.make_grid(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), nrow=4)

    class Module:
        def image_grid(self, *args):
            calls.append((*args, bool(inside)))
            return grid

    batch = {"hint": None}

    def run(logger, step, trainer=Trainer):
        t = trainer()
        t.global_step = step
        logger.on_train_batch_end(t, Module(), None, batch, 0)

    log = ImageLogger(tmp_path / "a", every_n_steps=2, n=3, ddim_steps=5, seed=7)
    for step in (0, 1, 2, 3, 4, 4):
        run(log, step)
    assert calls == [(batch, 3, 5, 7, True)] * 2
    assert sorted(os.listdir(tmp_path / "a")) == ["step-00000002.png", "step-00000004.png"]
    png = np.asarray(Image.open(tmp_path / "a" / "step-00000004.png"))
    pixels = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert png.shape == (30 + 4 * pixels.shape[0], 4 * pixels.shape[1], 3)  # 32 px tiles enlarged to 128
    assert np.array_equal(png[30::4, ::4], pixels) and np.array_equal(png[33::4, 3::4], pixels)  # nearest
    head = png[:30]
    for c in range(4):  # a label over each column: dark text on white, inside the column
        column = head[:, 8 + c * 136: (c + 1) * 136]
        assert column.min() < 80 and (head[:, c * 136: c * 136 + 8] == 255).all()
    run(ImageLogger(tmp_path / "rank1", every_n_steps=2), 2, type("Rank1", (Trainer,), {"is_global_zero": False}))
    run(ImageLogger(tmp_path / "off", every_n_steps=0), 2)
    assert len(calls) == 2 and not (tmp_path / "rank1").exists() and not (tmp_path / "off").exists()


def test_image_logger_leaves_no_partial_png_when_its_write_fails(tmp_path, monkeypatch):
    """The grid is written beside its name and renamed (atomicio): a write cut short (a full disk,
    Ctrl-C) leaves no step-N.png, nor a temporary file (kills a plain save_image to the final name)."""
    import torchvision

    def cut_short(grid, fp, format=None):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torchvision.utils, "save_image", cut_short)

    class Module:
        def image_grid(self, *args):
            return torch.zeros(3, 4, 4)

    t = FakeTrainer()
    t.global_step = 2
    with pytest.raises(OSError):
        ImageLogger(tmp_path / "img", every_n_steps=2).on_train_batch_end(t, Module(), None, "batch", 0)
    assert os.listdir(tmp_path / "img") == []


def test_image_logger_defaults_and_tensorboard(tmp_path):
    """By default every 500 steps, 4 samples, 20 DDIM steps, seed 0; the grid also goes to each
    TensorBoard logger as "samples" at its step, and to no other logger."""
    calls = []
    grid = torchvision.utils.make_grid(torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0)))

    class Module:
        def image_grid(self, *args):
            calls.append(args)
            return grid

    class Experiment:
        def __init__(self):
            self.images = []

        def add_image(self, *args):
            self.images.append(args)

    class TensorBoard(TensorBoardLogger):
        @property
        def experiment(self):
            return self.recorded

    tb, other = TensorBoard(tmp_path / "tb"), type("CSV", (), {"experiment": Experiment()})()
    tb.recorded = Experiment()

    class Trainer(FakeTrainer):
        loggers = [other, tb]

    log = ImageLogger(tmp_path / "img")
    for step in (250, 500):
        t = Trainer()
        t.global_step = step
        log.on_train_batch_end(t, Module(), None, "batch", 0)
    assert calls == [("batch", 4, 20, 0)]
    assert [(tag, step) for tag, _, step in tb.recorded.images] == [("samples", 500)] and other.experiment.images == []
    assert torch.equal(tb.recorded.images[0][1], labelled_grid(grid, GRID_COLUMNS))  # 128 px tiles: not enlarged
    assert torch.equal(tb.recorded.images[0][1][:, 30:], grid.mul(255).add(0.5).floor().div(255))
    assert os.listdir(tmp_path / "img") == ["step-00000500.png"]


def test_the_grid_names_a_latent_batchs_truth_column_as_a_decode(tmp_path):
    """With the latent cache the batch holds no image: the last column is the cached latent
    decoded by the VAE, and its header says so; the other three are the same either way."""
    grid = torchvision.utils.make_grid(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), nrow=4)

    class Module:
        def image_grid(self, *args):
            return grid

    heads = {}
    for kind, batch in (("image", {"jpg": 0, "hint": 0}), ("latent", {"jpg_latent_mean": 0, "hint": 0})):
        t = FakeTrainer()
        t.global_step = 2
        ImageLogger(tmp_path / kind, every_n_steps=2).on_train_batch_end(t, Module(), None, batch, 0)
        heads[kind] = np.asarray(Image.open(tmp_path / kind / "step-00000002.png"))[:30]
    want = labelled_grid(grid, (*GRID_COLUMNS[:3], LATENT_TRUTH)).mul(255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(heads["latent"], want[:30])
    split = 3 * 132 + 2  # the last column's header (64 px tiles enlarged 2x)
    assert np.array_equal(heads["image"][:, :split], heads["latent"][:, :split])
    assert not np.array_equal(heads["image"][:, split:], heads["latent"][:, split:])


def test_step_lines_say_the_step_loss_rate_and_time_every_n_steps(capsys, monkeypatch):
    """Rank 0, once per optimiser step (several batches end at one with --accumulate), every
    `every` steps; the loss and learning rate as logged for the step."""
    import cldm.callbacks

    clock = iter([100.0, 103.0, 106.0])
    monkeypatch.setattr(cldm.callbacks.time, "perf_counter", lambda: next(clock))
    t = FakeTrainer()
    t.global_step, t.max_steps = 10, 20
    t.callback_metrics = {"train/loss": torch.tensor(0.123456), "lr-AdamW/control": torch.tensor(1e-5)}
    lines = StepLines(2)
    lines.on_train_start(t, None)  # at step 10: a resumed run's time counts from here
    for step in (11, 12, 12, 13, 14):
        t.global_step = step
        lines.on_train_batch_end(t, None, None, None, 0)
    assert capsys.readouterr().out == ("step 12/20, loss 0.1235, lr 1e-05, 1.5 s/step\n"
                                       "step 14/20, loss 0.1235, lr 1e-05, 1.5 s/step\n")
    t.is_global_zero, t.global_step = False, 16
    lines.on_train_batch_end(t, None, None, None, 0)
    t.is_global_zero, t.max_steps, t.callback_metrics = True, -1, {}
    t.global_step = 18
    monkeypatch.setattr(cldm.callbacks.time, "perf_counter", lambda: 124.0)
    lines.on_train_batch_end(t, None, None, None, 0)  # by epochs, before anything is logged
    assert capsys.readouterr().out == "step 18, 3 s/step\n"
