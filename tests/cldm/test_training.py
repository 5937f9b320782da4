"""cldm/training.py: the notes a run prints, the data module, Lightning's quieted messages, and
fit's exit status after a stop (with stand-in trainers). The whole run: tests/scripts/test_train.py."""
from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import lightning  # noqa: F401  (binds its log handler to the session's stderr, as in test_train.py)
import pytest

from cldm import training
from cldm.model import TINY_CONFIG, load_config
from cldm.run_dir import resolve_resume
from cldm.training import PROG
from tests.train_helpers import first_process, tiny_data_root, tiny_model, training_ckpt


def test_resume_auto_names_the_incomplete_checkpoints_it_skips(tmp_path, capsys, monkeypatch):
    first_process(monkeypatch)
    ckpts = tmp_path / "checkpoints"
    training_ckpt(ckpts / "step=00000276.ckpt", 276)
    cut = ckpts / "step=00000277.ckpt"
    cut.write_bytes(training_ckpt(tmp_path / "whole.ckpt", 277).read_bytes()[:100])
    assert resolve_resume("auto", ckpts) == ckpts / "step=00000276.ckpt"
    training.note_skipped(ckpts)
    assert capsys.readouterr().err == (f"tutorial_train_sd21_color_v2.py: note: skipped {cut}: not a whole "
                                       "checkpoint file (cut short?); not resumed from nor counted toward "
                                       "--ckpt-keep; move it away\n")
    monkeypatch.setenv("RANK", "1")  # one note per run, not per process
    training.note_skipped(ckpts)
    assert capsys.readouterr().err == ""


def test_a_resume_at_or_past_max_steps_notes_there_is_nothing_to_train(tmp_path, capsys, monkeypatch):
    first_process(monkeypatch)
    ckpt = training_ckpt(tmp_path / "step=00000300.ckpt", 300)
    for max_steps, noted in ((301, False), (-1, False), (300, True), (200, True)):
        training.note_nothing_to_train(ckpt, max_steps)
        err = capsys.readouterr().err
        assert (err == f"tutorial_train_sd21_color_v2.py: note: step=00000300.ckpt is at step 300, --max-steps is "
                       f"{max_steps}: nothing to train; its weights are exported as they are\n") is noted, err
    training.note_nothing_to_train(None, 0)
    assert capsys.readouterr().err == ""


def test_validation_asked_for_on_one_movie_is_noted(tmp_path, capsys):
    root = tiny_data_root(tmp_path, movies=1, frames=8, height=64, width=96)
    cfg = load_config(TINY_CONFIG, ["train.val_every=10", "train.low=0", "train.high=1", "train.min_gap=1",
                                    "train.num_workers=0"])
    a = SimpleNamespace(data=str(root), use_latent_cache=False, accelerator="cpu")
    dm = training.build_datamodule(cfg, a, tiny_model("v2"))
    assert dm.val is None
    assert "note: no validation: it holds out a whole movie" in capsys.readouterr().err


def test_sigterm_once_lightning_holds_it_is_left_to_lightning(tmp_path, capsys):
    """Lightning's handler calls the one it found (the script's) too: that one must then not
    raise, or the run would stop mid-step instead of at the end of the step, as Lightning does."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class LightningLike:  # installs a handler that calls the previous one, as Lightning's does
        interrupted, is_global_zero, progress_bar_callback, global_step = False, True, None, 4

        def fit(self, *a, **kw):
            found = signal.getsignal(signal.SIGTERM)
            calls = []
            signal.signal(signal.SIGTERM, lambda n, f: (calls.append(n), found(n, f)))
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                assert calls == [signal.SIGTERM]
            except KeyboardInterrupt:
                pytest.fail("the script's handler raised inside Lightning's")
            finally:
                signal.signal(signal.SIGTERM, found)
            raise SIGTERMException  # Lightning's, at the end of the step

    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    assert training.fit(a, None, LightningLike(), None, None, None) == 143
    assert capsys.readouterr().err.startswith(f"{PROG}: stopped by SIGTERM at step 4; ")


def test_lightning_messages_that_do_not_apply_are_quieted(caplog):
    """The texts as Lightning 2.6 prints them on a resumed run; anything else still shows."""
    import logging
    import warnings

    noise = ["Found 3 module(s) in eval mode at the start of training. This may lead to unexpected behavior.",
             "Checkpoint directory /x/run/checkpoints exists and is not empty.",
             "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
             "resumable. This can cause unreliable results if further training is done.",
             "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
             "treespec.is_leaf()` instead.",
             "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided "
             "during `Trainer` instantiation. Please add the following callbacks: [\"StepCheckpoint{'monitor': "
             "'step', 'mode': 'max', 'every_n_train_steps': 1, 'every_n_epochs': 0, 'train_time_interval': None}\"]."]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        training.quiet_lightning()
        for text in noise + ["something that matters"]:
            warnings.warn(text, UserWarning)
    assert [str(w.message) for w in seen] == ["something that matters"]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging and experiment tracking, try litlogger")
        log.info("Restored all states from the checkpoint")
    assert [r.getMessage() for r in caplog.records] == ["Restored all states from the checkpoint"]


@pytest.mark.parametrize("sigterm", [False, True])
def test_a_stop_says_whether_a_rerun_resumes_or_starts_over(tmp_path, capsys, sigterm):
    """Before the first checkpoint there is nothing to resume from: the line says a rerun starts over."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class Stopped:  # a trainer whose fit was stopped: Lightning sets `interrupted` on Ctrl-C
        interrupted, is_global_zero, progress_bar_callback, global_step = False, True, None, 0

        def fit(self, *a, **kw):
            if sigterm:
                raise SIGTERMException
            self.interrupted = True

    out = tmp_path / "run"
    a = SimpleNamespace(out=str(out), init="init.safetensors")
    stopped = "stopped by SIGTERM at step 0" if sigterm else "interrupted"
    status = 143 if sigterm else 130
    assert training.fit(a, None, Stopped(), None, None, None) == status
    assert capsys.readouterr().err == (f"{PROG}: {stopped}; no checkpoint saved yet (see --ckpt-every); rerun "
                                       "the same command to start over\n")
    training_ckpt(out / "checkpoints" / "step=00000001.ckpt", 1)
    assert training.fit(a, None, Stopped(), None, None, None) == status
    assert capsys.readouterr().err == (f"{PROG}: {stopped}; rerun the same command to resume from the newest "
                                       "checkpoint\n")


class OutOfMemory:
    """A trainer whose fit runs out of memory at step 3 (on its device)."""
    interrupted, is_global_zero, progress_bar_callback, global_step = False, True, None, 3
    strategy = SimpleNamespace(root_device="cuda:1")

    def __init__(self, error):
        self.error = error

    def fit(self, *a, **kw):
        raise self.error


LOWER = "lower --batch-size (raise --accumulate to keep the samples per optimiser step)"


@pytest.mark.parametrize("checkpointing, precision, ways", [
    ("true", "32", f"{LOWER} or train in --precision bf16-mixed"),
    ("true", "bf16-mixed", LOWER),
    ("false", "16-mixed", f"{LOWER} or turn on --grad-checkpoint"),
])
def test_out_of_gpu_memory_is_one_line_with_the_flags_to_lower(tmp_path, checkpointing, precision, ways):
    import torch

    cfg = load_config(TINY_CONFIG, ["train.batch_size=6", "train.size=128", f"train.precision={precision}",
                                    f"model.unet.use_checkpoint={checkpointing}"])
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity")
    with pytest.raises(training.UsageError) as caught:
        training.fit(a, cfg, OutOfMemory(error), None, None, None)
    assert str(caught.value) == (f"out of memory on cuda:1 at step 3 (--batch-size 6 at --size 128): {ways}; "
                                 "no checkpoint saved yet (see --ckpt-every); rerun the same command to start over")


def test_out_of_gpu_memory_lists_every_way_when_all_apply(tmp_path):
    import torch

    cfg = load_config(TINY_CONFIG, ["model.unet.use_checkpoint=false", "train.precision=32"])
    training_ckpt(tmp_path / "run" / "checkpoints" / "step=00000002.ckpt", 2)
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    with pytest.raises(training.UsageError) as caught:
        training.fit(a, cfg, OutOfMemory(torch.OutOfMemoryError("CUDA out of memory.")), None, None, None)
    assert str(caught.value) == (
        f"out of memory on cuda:1 at step 3 (--batch-size 2 at --size 64): {LOWER}, turn on --grad-checkpoint or "
        "train in --precision bf16-mixed; rerun the same command to resume from the newest checkpoint")


@pytest.mark.parametrize("error", [
    MemoryError("Caught MemoryError in DataLoader worker process 0."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 8589934592 bytes."),
])
def test_out_of_host_memory_names_the_batch_and_the_loader_processes(tmp_path, error):
    cfg = load_config(TINY_CONFIG, ["train.num_workers=4"])
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    with pytest.raises(training.UsageError) as caught:
        training.fit(a, cfg, OutOfMemory(error), None, None, None)
    assert str(caught.value) == ("out of memory (RAM) at step 3 (--batch-size 2, --num-workers 4 data loader "
                                 "processes per device): lower either; no checkpoint saved yet (see --ckpt-every); "
                                 "rerun the same command to start over")


def test_other_runtime_errors_keep_their_traceback(tmp_path):
    cfg = load_config(TINY_CONFIG)
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    with pytest.raises(RuntimeError, match="^a bug$"):
        training.fit(a, cfg, OutOfMemory(RuntimeError("a bug")), None, None, None)
