"""cldm/training.py: the --init refusals, the data module and Trainer the train: section gives, the
export, the notes a run prints, Lightning's quieted messages, and fit with stand-in trainers (its
exit status after a stop, the export, the signal handlers). The whole run: tests/scripts/test_train.py."""
from __future__ import annotations

import logging
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning  # noqa: F401  (binds its log handler to the session's stderr, as in test_train.py)
import pytest
import torch

from cldm import training
from cldm.checkpoint import CheckpointError, save_state_dict
from cldm.lightning import ResumeRefusedError
from cldm.config import TINY_CONFIG, load_config
from cldm.run_dir import resolve_resume
from cldm.training import PROG
from cldm.weights_config import read_export_metadata
from tests.helpers import running
from tests.train_helpers import first_process, tiny_data_root, tiny_model, training_ckpt

REPO = Path(__file__).resolve().parents[2]


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
    monkeypatch.setenv("RANK", "1")  # one note per run, not per process
    training.note_nothing_to_train(ckpt, 300)
    assert capsys.readouterr().err == ""


def test_validation_asked_for_on_one_movie_is_noted(tmp_path, capsys, monkeypatch, model):
    first_process(monkeypatch)
    root = tiny_data_root(tmp_path, movies=1, frames=8, height=64, width=96)
    cfg = load_config(TINY_CONFIG, ["train.val_every=10", "train.low=0", "train.high=1", "train.min_gap=1",
                                    "train.num_workers=0"])
    a = SimpleNamespace(data=str(root), use_latent_cache=False, accelerator="cpu")
    dm = training.build_datamodule(cfg, a, model)
    assert dm.val is None
    assert capsys.readouterr().err == f"{PROG}: note: no validation: it holds out a whole movie, and {root} has no " \
                                      "second one\n"
    training.build_datamodule(load_config(cfg, ["train.val_every=0"]), a, model)  # not asked for
    monkeypatch.setenv("RANK", "1")  # one note per run, not per process
    training.build_datamodule(cfg, a, model)
    assert capsys.readouterr().err == ""



def test_a_held_out_movie_without_pairs_is_noted_by_name_without_a_python_warning(tmp_path, capsys, monkeypatch,
                                                                                  model):
    """The last movie is held out; the note said there was no second movie, untrue with two."""
    import warnings

    from tests.annotator.clips import table_from_pairs, write_fake_movie

    first_process(monkeypatch)
    write_fake_movie(tmp_path, "film_a", table_from_pairs(10, 4, {(0, 4): 0.96, (2, 6): 0.95}), size=(64, 64))
    write_fake_movie(tmp_path, "film_b", table_from_pairs(6, 4, {(1, 5): 0.5}), size=(64, 64))
    cfg = load_config(TINY_CONFIG, ["train.val_every=10", "train.num_workers=0", "train.min_gap=1"])
    a = SimpleNamespace(data=str(tmp_path), use_latent_cache=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning would print two lines of its own
        dm = training.build_datamodule(cfg, a, model)
    assert dm.val is None and dm.train.movies == ["film_a"]
    assert capsys.readouterr().err == (f"{PROG}: note: no validation: the movie it holds out, film_b (the last id), "
                                       "has no pairs in the band\n")

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


def test_sigterm_notifier_is_replaced_only_where_lightning_has_the_one_it_replaces():
    """On Lightning's Trainer the notifier sets the flag Lightning checks, without a collective
    (tests/scripts/test_train.py shows the DDP hang it avoids); a Trainer whose private connector
    is not as expected keeps Lightning's own."""
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    connector = trainer._signal_connector
    lightnings = connector._sigterm_notifier_fn
    training.no_collective_in_sigterm_handler(trainer)
    assert connector._sigterm_notifier_fn != lightnings and not trainer.received_sigterm
    connector._sigterm_notifier_fn(signal.SIGTERM, None)
    assert trainer.received_sigterm
    odd = SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False))
    training.no_collective_in_sigterm_handler(odd)  # no notifier to replace: left alone, no error
    assert vars(odd._signal_connector) == {"received_sigterm": False}


def test_the_sigterm_notifier_passes_the_signal_on_once_and_only_to_a_launcher():
    """As Lightning's own: the processes its launcher started get the first SIGTERM, not a second
    (kills dropping `not connector.received_sigterm`); one process (no launcher) just sets the flag."""
    kills = []
    connector = SimpleNamespace(received_sigterm=False, _sigterm_notifier_fn=None)
    trainer = SimpleNamespace(_signal_connector=connector,
                              strategy=SimpleNamespace(launcher=SimpleNamespace(kill=kills.append)))
    training.no_collective_in_sigterm_handler(trainer)
    for _ in range(2):
        connector._sigterm_notifier_fn(signal.SIGTERM, None)
    assert kills == [signal.SIGTERM] and connector.received_sigterm
    connector.received_sigterm, trainer.strategy.launcher = False, None
    connector._sigterm_notifier_fn(signal.SIGTERM, None)
    assert connector.received_sigterm and kills == [signal.SIGTERM]


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
             "'step', 'mode': 'max', 'every_n_train_steps': 1, 'every_n_epochs': 0, 'train_time_interval': None}\"].",
             "The dirpath has changed from '/x/a/checkpoints' to '/x/b/checkpoints', therefore `best_model_score`, "
             "`kth_best_model_path`, `kth_value`, `last_model_path` and `best_k_models` won't be reloaded. Only "
             "`best_model_path` will be reloaded."]
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
    caplog.clear()
    log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("[rank: 0] Received SIGTERM: 15")  # fit says it, with what to do
        log.info("[rank: 0] Received SIGUSR1: 10")
    assert [r.getMessage() for r in caplog.records] == ["[rank: 0] Received SIGUSR1: 10"]


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
    stopped = "stopped by SIGTERM at step 0" if sigterm else "interrupted at step 0"
    status = 143 if sigterm else 130
    assert training.fit(a, None, Stopped(), None, None, None) == status
    assert capsys.readouterr().err == (f"{PROG}: {stopped}; no checkpoint saved yet (see --ckpt-every); rerun "
                                       "the same command to start over\n")
    training_ckpt(out / "checkpoints" / "step=00000001.ckpt", 1)
    assert training.fit(a, None, Stopped(), None, None, None) == status
    assert capsys.readouterr().err == (f"{PROG}: {stopped}; rerun the same command to resume from the newest "
                                       "checkpoint\n")


@pytest.mark.parametrize("step, at", [(4, "at step 4"), (0, "while resuming from step=00000002.ckpt")])
def test_a_resumed_run_stopped_says_the_step_unless_it_stopped_while_restoring(tmp_path, capsys, step, at):
    """Step 0 of a resumed run: Lightning was still restoring the checkpoint; any later step is
    named (kills dropping `or trainer.global_step` from the wording's condition)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stopped(trainer):
        raise SIGTERMException

    out = tmp_path / "run"
    resume = training_ckpt(out / "checkpoints" / "step=00000002.ckpt", 2)
    a = SimpleNamespace(out=str(out), init="init.safetensors")
    assert training.fit(a, None, Trainer(stopped, global_step=step), None, None, resume) == 143
    assert capsys.readouterr().err == (f"resuming from {resume}\n{PROG}: stopped by SIGTERM {at}; rerun the same "
                                       "command to resume from the newest checkpoint\n")


def test_loader_says_follows_the_cause_chain_and_the_context_only_when_asked():
    """torch's words in an error `e` was raised from count; in one it was raised while handling
    only with context=True (kills following __context__ always, or never __cause__)."""
    said = RuntimeError(training.TERMINATED_LOADER)
    caused, handled = RuntimeError("exited unexpectedly"), RuntimeError("unexpected pos")
    caused.__cause__, handled.__context__ = said, said
    assert training.loader_says(caused, training.TERMINATED_LOADER)
    assert not training.loader_says(handled, training.TERMINATED_LOADER)
    assert training.loader_says(handled, training.TERMINATED_LOADER, context=True)


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
    cfg = load_config(TINY_CONFIG, ["train.batch_size=6", "train.size=128", f"train.precision={precision}",
                                    f"model.unet.use_checkpoint={checkpointing}"])
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity")
    with pytest.raises(training.UsageError) as caught:
        training.fit(a, cfg, OutOfMemory(error), None, None, None)
    assert str(caught.value) == (f"out of memory on cuda:1 at step 3 (--batch-size 6 at --size 128): {ways}; "
                                 "no checkpoint saved yet (see --ckpt-every); rerun the same command to start over")


def test_out_of_gpu_memory_lists_every_way_when_all_apply(tmp_path):
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


def test_a_data_loader_process_killed_by_sigkill_is_taken_for_the_oom_killer(tmp_path):
    cfg = load_config(TINY_CONFIG, ["train.num_workers=4"])
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    error = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")  # torch's words
    with pytest.raises(training.UsageError) as caught:
        training.fit(a, cfg, OutOfMemory(error), None, None, None)
    assert str(caught.value) == ("a data loader process was killed (SIGKILL: most likely the OOM killer, out of RAM) "
                                 "at step 3 (--batch-size 2, --num-workers 4 data loader processes per device): lower "
                                 "either; no checkpoint saved yet (see --ckpt-every); rerun the same command to start "
                                 "over")
    wrapped = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")  # as torch raises it in a read
    wrapped.__cause__ = error
    with pytest.raises(training.UsageError, match=r"^a data loader process was killed \(SIGKILL"):
        training.fit(a, cfg, OutOfMemory(wrapped), None, None, None)
    crashed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Segmentation fault. ")
    crashed_wrapped = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    crashed_wrapped.__cause__ = crashed
    for other in (crashed, crashed_wrapped):  # not memory
        with pytest.raises(RuntimeError, match=r"^DataLoader worker"):
            training.fit(a, cfg, OutOfMemory(other), None, None, None)


def test_a_data_loader_process_gone_without_a_word_names_the_likely_causes(tmp_path):
    """torch may find a worker dead before its SIGCHLD handler says of what (a race: a real
    SIGKILL or SIGBUS gives either form): the OOM killer and a full /dev/shm are the likely
    causes, and whatever the worker printed is above."""
    import queue
    import shutil

    cfg = load_config(TINY_CONFIG, ["train.num_workers=4"])
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    gone = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    gone.__cause__ = queue.Empty()  # as torch raises it after a read timed out
    with pytest.raises(training.UsageError) as caught:
        training.fit(a, cfg, OutOfMemory(gone), None, None, None)
    shm = Path("/dev/shm")
    room = f"{shm}: {training.size_of(shutil.disk_usage(shm).total)}" if shm.is_dir() else str(shm)
    assert str(caught.value) == (
        "a data loader process ended without saying why (torch: DataLoader worker (pid(s) 4242) exited "
        f"unexpectedly); most likely it ran out of RAM (the OOM killer) or of shared memory ({room}) at step 3 "
        "(--batch-size 2, --num-workers 4 data loader processes per device): lower either, or give /dev/shm more "
        "room (Docker: --shm-size 8g); its own message, if it left one, is above; no checkpoint saved yet (see "
        "--ckpt-every); rerun the same command to start over")



def test_data_loader_processes_short_of_shared_memory_name_it_with_its_size(tmp_path):
    """Docker gives a container 64 MB of /dev/shm, where torch hands the loaders' batches over:
    torch's words when a worker finds it full (torch fallocates; a write into a full one is a
    SIGBUS). A real full /dev/shm: tests/scripts/test_train.py."""
    import shutil

    cfg = load_config(TINY_CONFIG, ["train.num_workers=4"])
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    full = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nRuntimeError: unable to allocate shared memory(shm) "
                        "for file </torch_4242_17_0>: No space left on device (28)\n")
    bus = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's "
                       "workers are out of shared memory. Please try to raise your shared memory limit.")
    wrapped = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    wrapped.__cause__ = bus
    shm = Path("/dev/shm")
    room = f"{shm}: {training.size_of(shutil.disk_usage(shm).total)}" if shm.is_dir() else str(shm)
    rest = (f" ({room}) at step 3 (--batch-size 2, --num-workers 4 data loader processes per device): lower either, "
            f"or give {shm} more room (Docker: --shm-size 8g); no checkpoint saved yet (see --ckpt-every); rerun the "
            "same command to start over")
    for error, what in ((full, "a data loader process ran out of shared memory"),
                        (bus, "a data loader process was killed by SIGBUS, most likely for lack of shared memory"),
                        (wrapped, "a data loader process was killed by SIGBUS, most likely for lack of shared memory")):
        with pytest.raises(training.UsageError) as caught:
            training.fit(a, cfg, OutOfMemory(error), None, None, None)
        assert str(caught.value) == what + rest
    assert training.out_of_memory_line(full, cfg, 3, "cpu", tmp_path, shm=tmp_path / "no_shm").startswith(
        f"a data loader process ran out of shared memory ({tmp_path / 'no_shm'}) at step 3 ")
    assert [training.size_of(n) for n in (2**16, 2**20 - 1, 2**20, 64 * 2**20, 2**30 - 1, 2**30, 24 * 2**30,
                                          1536 * 2**20)] == [
        "64 KiB", "1024 KiB", "1 MiB", "64 MiB", "1024 MiB", "1.0 GiB", "24.0 GiB", "1.5 GiB"]  # each unit from 1



def test_running_out_of_open_files_says_the_limit_and_what_to_lower(tmp_path, monkeypatch):
    """`ulimit -n 32` with 4 data loader processes: torch's RuntimeError over an EMFILE OSError,
    a 40-frame traceback (resource audit); an EMFILE met by the run's own writes is the same."""
    import errno
    import resource

    cfg = load_config(TINY_CONFIG, ["train.num_workers=4"])
    a = SimpleNamespace(out=str(tmp_path / "run"), data=str(tmp_path / "data"), init="init.safetensors")
    torch_says = RuntimeError("Too many open files. Communication with the workers is no longer possible. Please "
                              "increase the limit using `ulimit -n` in the shell or change the sharing strategy by "
                              "calling `torch.multiprocessing.set_sharing_strategy('file_system')` at the beginning "
                              "of your code")
    torch_says.__context__ = OSError(errno.EMFILE, "Too many open files", "/tmp/pymp-x")
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1024, 1048576))
    limit = 1024
    start_over = "no checkpoint saved yet (see --ckpt-every); rerun the same command to start over"
    with pytest.raises(training.UsageError) as caught:
        training.fit(a, cfg, OutOfMemory(torch_says), None, None, None)
    assert str(caught.value) == (
        f"too many open files (this process may hold {limit}: `ulimit -n`) at step 3 (--num-workers 4 data loader "
        f"processes per device): raise the limit (ulimit -n 4096) or lower --num-workers; {start_over}")
    assert training.os_error_line(OSError(errno.EMFILE, "Too many open files", "/tmp/pymp-x"), a, 7) == (
        f"too many open files (this process may hold {limit}: `ulimit -n`) at step 7: raise the limit "
        f"(ulimit -n 4096) or lower --num-workers; {start_over}")
    monkeypatch.setattr(resource, "getrlimit", lambda what: (20000, 1048576))  # never advice to lower it
    assert "(this process may hold 20000: `ulimit -n`) at step 7: raise the limit (ulimit -n 40000) " in \
        training.os_error_line(OSError(errno.EMFILE, "Too many open files", "/tmp/pymp-x"), a, 7)
    system_wide = OSError(errno.ENFILE, "Too many open files in system", "/tmp/x")  # no ulimit raises that one
    assert training.os_error_line(system_wide, a, 7) is None
    torch_says.__context__ = system_wide
    assert training.out_of_memory_line(torch_says, cfg, 3, "cpu", tmp_path) is None


def test_what_the_run_cannot_write_or_read_while_training_is_one_line(tmp_path):
    """A full disk (the checkpoint's own name, from AtomicCheckpointIO), a path in OUT that
    refuses the write, a frame of the data root gone or damaged (also as a data loader process's
    traceback text); any other OSError keeps its traceback (None)."""
    import errno
    import shutil

    out, data = tmp_path / "run", tmp_path / "data"
    out.mkdir()
    a = SimpleNamespace(out=str(out), data=str(data))
    start_over = "no checkpoint saved yet (see --ckpt-every); rerun the same command to start over"
    ckpt = out / "checkpoints" / "step=00000007.ckpt"
    free = training.size_of(shutil.disk_usage(out).free)
    for code in (errno.ENOSPC, errno.EDQUOT):
        assert training.os_error_line(OSError(code, "No space left on device", str(ckpt)), a, 7) == (
            f"{ckpt}: no space left on its disk ({free} free) at step 7: free some; {start_over}")
    assert training.os_error_line(OSError(errno.ENOSPC, "No space"), a, 7).startswith(f"{out}: no space left on ")
    denied = OSError(errno.EACCES, "Permission denied", str(out / "images" / "step_7.png"))
    assert training.os_error_line(denied, a, 7) == (f"cannot write {out / 'images' / 'step_7.png'} at step 7: "
                                                   f"Permission denied; {start_over}")
    frame = data / "m0" / "frames" / "000005.jpg"
    said = f"{frame}: cannot read frame (at step 7); rebuild that movie with build_pairs.py (remove its folder " \
           f"first) or move it out of --data; {start_over}"
    assert training.os_error_line(OSError(f"{frame}: cannot read frame"), a, 7) == said
    in_a_worker = OSError(f"Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          f"last):\n  File \"x.py\", line 1, in f\nOSError: {frame}: cannot read frame\n")
    assert training.os_error_line(in_a_worker, a, 7) == said
    for other in (OSError(errno.EACCES, "Permission denied", str(tmp_path / "elsewhere")),
                  OSError(f"{tmp_path / 'data_elsewhere' / 'x.jpg'}: cannot read frame"), OSError()):
        assert training.os_error_line(other, a, 7) is None

def test_other_runtime_errors_keep_their_traceback(tmp_path):
    cfg = load_config(TINY_CONFIG)
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    with pytest.raises(RuntimeError, match="^a bug$"):
        training.fit(a, cfg, OutOfMemory(RuntimeError("a bug")), None, None, None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
@pytest.mark.parametrize("local_rank", [None, "1"])
def test_a_process_a_launcher_started_ends_with_its_launcher(local_rank):
    """A parent (the launcher: Lightning's rank 0, torchrun) starts a child and ends without it. The
    child, blocked as in a collective whose peer has gone, ends with it when LOCAL_RANK says a
    launcher started it; a process started by hand (no LOCAL_RANK) outlives its parent, as
    `nohup` needs."""
    child = ("import time; from cldm.training import end_with_launcher; end_with_launcher(); "
             "print('set', flush=True); time.sleep(120)")
    launcher = ("import os, subprocess, sys; "
                f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, "
                "stderr=subprocess.DEVNULL); said = c.stdout.readline().decode().strip() or 'nothing'; "
                "print(c.pid, said, flush=True); os._exit(0)")
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"} | ({"LOCAL_RANK": local_rank} if local_rank else {})
    pid, said = subprocess.run([sys.executable, "-c", launcher], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=60, check=True).stdout.split()
    pid = int(pid)
    assert said == "set"  # alive while its launcher is (kills a child that ends itself at once: `==` for `!=`)
    try:
        deadline = time.monotonic() + (10 if local_rank else 2)
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running(pid) is (local_rank is None)
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def model():
    return tiny_model("v2")


def test_an_init_that_is_an_export_or_made_for_another_model_is_named_once(tmp_path, model):
    from cldm.trainable import export_control

    export = export_control(model, tmp_path / "control.safetensors")
    init_v = tmp_path / "init_v.safetensors"  # as tool_add_control_sd21.py writes it from a v config
    save_state_dict(model.state_dict(), init_v, metadata={"color_variant": "v2", "parameterization": "v"})
    cfg = load_config(TINY_CONFIG)
    for init, says in [(export, "an export of trained weights (control.safetensors), not a full checkpoint; --init "
                                "needs the file tool_add_control_sd21.py writes (a resume too: the run's own --init)"),
                       (init_v, "made for a model that predicts v, this config's predicts eps (set "
                                "model.parameterization=v)")]:
        with pytest.raises(CheckpointError) as e:
            training.build_model(cfg, init)
        assert str(e.value) == f"--init {init}: {says}"


@pytest.fixture(scope="module")
def two_movies(tmp_path_factory):
    return tiny_data_root(tmp_path_factory.mktemp("two"), movies=2, frames=8, height=64, width=96)


def test_the_data_module_takes_the_train_section(two_movies, capsys):
    cfg = load_config(TINY_CONFIG, ["train.val_every=10", "train.low=0", "train.high=1", "train.min_gap=1",
                                    "train.seed=7", "train.batch_size=3"])
    a = SimpleNamespace(data=str(two_movies), use_latent_cache=False, accelerator="cpu")
    dm = training.build_datamodule(cfg, a, SimpleNamespace(color_variant="v2"))
    assert dm.val is not None and capsys.readouterr().err == ""  # the second movie held out
    assert (dm.data_root, dm.batch_size, dm.num_workers, dm.seed) == (two_movies, 3, 0, 7)
    assert {k: dm.kw[k] for k in ("size", "low", "high", "min_gap", "gray_latents")} == \
        dict(size=64, low=0, high=1, min_gap=1, gray_latents=False)
    dm = training.build_datamodule(load_config(cfg, ["train.val_every=0"]), a, SimpleNamespace(color_variant="v2"))
    assert dm.val is None and capsys.readouterr().err == ""  # not asked for: no held-out movie
    for variant, gray in (("v1", False), ("v3", True)):  # the gray's latents: v3's alone
        assert training.build_datamodule(cfg, a, SimpleNamespace(color_variant=variant)).kw["gray_latents"] is gray


def trainer_args(**given):
    return SimpleNamespace(**{**dict(accelerator="cpu", devices="1", num_nodes=1, strategy="ddp", no_progress=True),
                              **given})


def test_the_trainer_takes_the_train_section(tmp_path):
    from cldm.callbacks import ImageLogger, ResumeAgreement, StepCheckpoint

    cfg = load_config(TINY_CONFIG, ["train.max_steps=7", "train.max_epochs=3", "train.accumulate=2",
                                    "train.log_every=4", "train.grad_clip=0.5", "train.ckpt_every=5",
                                    "train.ckpt_keep=2", "train.image_every=6", "train.image_count=3",
                                    "train.image_ddim_steps=9", "train.seed=8", "train.val_every=11"])
    resume = tmp_path / "checkpoints" / "step=00000001.ckpt"
    trainer = training.make_trainer(cfg, trainer_args(), tmp_path, resume)
    assert (trainer.max_steps, trainer.max_epochs, trainer.accumulate_grad_batches, trainer.log_every_n_steps,
            trainer.gradient_clip_val) == (7, 3, 2, 4, 0.5)
    assert (trainer.val_check_interval, trainer.limit_val_batches) == (11, 1.0)
    callbacks = {type(c): c for c in trainer.callbacks}
    ckpt, images = callbacks[StepCheckpoint], callbacks[ImageLogger]
    assert (ckpt.dirpath, ckpt._every_n_train_steps, ckpt.keep) == (str(tmp_path / "checkpoints"), 5, 2)
    assert (images.out_dir, images.every, images.n, images.ddim_steps, images.seed) == (tmp_path / "images", 6, 3, 9, 8)
    assert callbacks[ResumeAgreement].ckpt_path == resume
    # SIGTERM without Lightning's collective in the handler (the hang itself: a slow DDP test)
    assert trainer._signal_connector._sigterm_notifier_fn.__qualname__.startswith("no_collective_in_sigterm_handler.")
    assert training.make_trainer(cfg, trainer_args(), tmp_path, validate=False).limit_val_batches == 0
    off = training.make_trainer(load_config(cfg, ["train.grad_clip=0.0", "train.val_every=0"]), trainer_args(), tmp_path)
    assert off.gradient_clip_val is None and off.limit_val_batches == 0  # 0: no clipping, no validation


def test_ddp_only_for_more_than_one_process_also_across_nodes(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from cldm.launch import ddp_kwargs

    cfg = load_config(TINY_CONFIG)
    assert isinstance(training.make_trainer(cfg, trainer_args(), tmp_path).strategy, SingleDeviceStrategy)
    two_nodes = training.make_trainer(cfg, trainer_args(num_nodes=2), tmp_path).strategy
    assert isinstance(two_nodes, DDPStrategy) and two_nodes._ddp_kwargs == ddp_kwargs() != {}


def test_under_slurm_lightnings_own_requeue_is_off(tmp_path, monkeypatch):
    for key, value in dict(SLURM_JOB_NAME="color-controlnet", SLURM_JOB_ID="4242", SLURM_NTASKS="1",
                           SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0").items():
        monkeypatch.setenv(key, value)
    env = training.make_trainer(load_config(TINY_CONFIG), trainer_args(), tmp_path)._accelerator_connector \
        .cluster_environment
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_only_16_mixed_is_refused_on_the_cpu_not_the_other_precision_names(tmp_path):
    """Lightning runs 16-mixed as bf16-mixed on the CPU: refused, without Lightning's own warning
    about the swap. Its other names for a precision (bf16, 64, 32-true) are no swap, and pass as
    they did, with Lightning's warnings about them still said."""
    for precision in ("bf16", "bf16-mixed", "32", "32-true", "64"):
        cfg = load_config(TINY_CONFIG, [f"train.precision={precision}"])
        if precision == "bf16":
            with pytest.warns(UserWarning, match="is supported for historical reasons"):
                training.make_trainer(cfg, trainer_args(), tmp_path)
        else:
            training.make_trainer(cfg, trainer_args(), tmp_path)
    for precision in ("16", "16-mixed"):
        with pytest.raises(training.UsageError, match=rf"^--precision {precision} is not available with --accelerator cpu "
                                             r"\(Lightning would run bf16-mixed\); choose bf16-mixed or 32$"):
            training.make_trainer(load_config(TINY_CONFIG, [f"train.precision={precision}"]), trainer_args(), tmp_path)


def test_torchrun_inside_a_slurm_job_gives_the_ranks(tmp_path, monkeypatch):
    """`srun torchrun ...` (one task per node) or torchrun in an sbatch script: torchrun's
    environment, as Lightning itself would choose; SLURM's would give every process SLURM_PROCID's rank."""
    for key, value in dict(SLURM_JOB_NAME="color-controlnet", SLURM_JOB_ID="4242", SLURM_NTASKS="1",
                           SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                           TORCHELASTIC_RUN_ID="x", RANK="1", LOCAL_RANK="1", GROUP_RANK="0", WORLD_SIZE="2",
                           LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    env = training.make_trainer(load_config(TINY_CONFIG), trainer_args(devices="2"), tmp_path)._accelerator_connector \
        .cluster_environment
    assert type(env).__name__ == "TorchElasticEnvironment" and env.global_rank() == 1


def test_a_trainer_built_under_rank_1_leaves_later_tests_at_rank_0(tmp_path, monkeypatch):
    """Its DDP strategy sets Lightning's process-wide rank_zero_only.rank from RANK, which
    silenced the loggers of every later test: tests/conftest.py's process_state_kept (around
    every test) puts it back."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from tests.conftest import process_state_kept

    with process_state_kept():
        with monkeypatch.context() as m:
            for key, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", TORCHELASTIC_RUN_ID="x",
                                   MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
                m.setenv(key, value)
            training.make_trainer(load_config(TINY_CONFIG), trainer_args(devices="2"), tmp_path)
            assert rank_zero_only.rank == 1  # what it did
    assert rank_zero_only.rank == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_asked_for_where_there_is_none_is_one_line(tmp_path):
    """Lightning's MisconfigurationException is no ValueError: it escaped as its bare words."""
    with pytest.raises(training.UsageError) as e:
        training.make_trainer(load_config(TINY_CONFIG), trainer_args(accelerator="gpu"), tmp_path)
    assert str(e.value) == ("cannot set up training with --accelerator gpu --devices 1 --strategy ddp --precision 32: "
                            "No supported gpu backend found!")

def test_lightnings_refusal_is_one_line_naming_the_flags_as_given(tmp_path, monkeypatch):
    cfg = load_config(TINY_CONFIG)
    with pytest.raises(training.UsageError) as e:
        training.make_trainer(cfg, trainer_args(devices="0,1"), tmp_path)  # two devices: a DDPStrategy object
    assert str(e.value) == ("cannot set up training with --accelerator cpu --devices 0,1 --strategy ddp --precision 32: "
                            "`devices` selected with `CPUAccelerator` should be an int > 0.")

    def refuses(**kw):
        raise ValueError("\n  the first line\n  and more\n")
    monkeypatch.setattr(lightning, "Trainer", refuses)
    with pytest.raises(training.UsageError, match=r": the first line$"):
        training.make_trainer(cfg, trainer_args(), tmp_path)


def test_the_export_records_the_step_the_inits_name_and_the_locked_weights_digest(tmp_path, model):
    from omegaconf import OmegaConf

    from cldm.trainable import locked_digest

    cfg = load_config(TINY_CONFIG)
    module = SimpleNamespace(model=model, locked_digest=lambda: locked_digest(model))
    path = training.export(module, tmp_path, cfg, 5, tmp_path / "deep" / "init.safetensors")
    assert path == tmp_path / "control.safetensors"
    meta = read_export_metadata(path)
    assert (meta["step"], meta["init"], meta["locked_digest"]) == ("5", "init.safetensors", locked_digest(model))
    assert OmegaConf.load(tmp_path / "control.yaml") == cfg


def test_a_stop_during_the_export_never_pairs_a_new_yaml_with_old_weights(tmp_path, model, monkeypatch):
    """control.yaml (which inference prefers to the config the weights record) was written first:
    a stop during the long weights write left the new config beside the old weights (an audit
    found v3's YAML beside v2 weights). It now goes last, the old one removed first."""
    import cldm.trainable
    from omegaconf import OmegaConf

    from cldm.trainable import locked_digest
    from cldm.weights_config import resolve_config

    module = SimpleNamespace(model=model, locked_digest=lambda: locked_digest(model))
    old = load_config(TINY_CONFIG)
    training.export(module, tmp_path, old, 5, tmp_path / "init.safetensors")
    weights = (tmp_path / "control.safetensors").read_bytes()
    new = load_config(TINY_CONFIG, ["model.only_mid_control=true"])

    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cldm.trainable, "save_checkpoint", stopped)
    with pytest.raises(KeyboardInterrupt):
        training.export(module, tmp_path, new, 9, tmp_path / "init.safetensors")
    assert (tmp_path / "control.safetensors").read_bytes() == weights and not (tmp_path / "control.yaml").exists()
    assert resolve_config(tmp_path / "control.safetensors").model == old.model  # the config the old weights record
    monkeypatch.undo()
    training.export(module, tmp_path, new, 9, tmp_path / "init.safetensors")
    assert OmegaConf.load(tmp_path / "control.yaml") == new


def test_a_full_disk_at_the_export_is_the_runs_one_line(tmp_path, model, monkeypatch):
    """It was safetensors' SafetensorError ("No space left on device (os error 28)"), which the
    training's handler of a full disk did not know: a traceback after the whole run, exit 1."""
    import safetensors.torch

    import cldm.checkpoint
    from cldm.trainable import locked_digest

    def disk_fills(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          'message: "No space left on device" })')
    monkeypatch.setattr(cldm.checkpoint, "save_file", disk_fills)
    module = SimpleNamespace(model=model, locked_digest=lambda: locked_digest(model))
    with pytest.raises(OSError) as e:
        training.export(module, tmp_path, load_config(TINY_CONFIG), 4, tmp_path / "init.safetensors")
    assert e.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []  # no half file, no temporary one
    assert str(e.value) == (f"{tmp_path / 'control.safetensors'}: cannot write the checkpoint: no space left on "
                            "device (or disk quota exceeded); nothing was written")
    line = training.os_error_line(e.value, SimpleNamespace(out=str(tmp_path), data=str(tmp_path / "d")), 4)
    assert line.startswith(f"{tmp_path}: no space left on its disk (") and " at step 4: free some; " in line


class Module:
    """What export_from_checkpoint uses of ColorControlModule; `refuse`: on_load_checkpoint raises it."""

    def __init__(self, model, refuse=None):
        self.model, self.refuse, self.loaded = model, refuse, []

    def on_load_checkpoint(self, state):
        if self.refuse:
            raise self.refuse

    def locked_digest(self):
        from cldm.trainable import locked_digest
        return locked_digest(self.model)

    def load_state_dict(self, state, strict=True):
        self.loaded.append((dict(state), strict))


def test_export_from_a_checkpoint_takes_its_step_and_names_other_locked_weights(tmp_path, model):
    ckpt, init = tmp_path / "step=00000007.ckpt", Path("init.safetensors")
    torch.save({"global_step": 7, "state_dict": {"model.x": torch.zeros(1)}}, ckpt)
    module = Module(model)
    assert training.export_from_checkpoint(module, ckpt, tmp_path, load_config(TINY_CONFIG), init) == \
        tmp_path / "control.safetensors"
    assert read_export_metadata(tmp_path / "control.safetensors")["step"] == "7"
    assert [(list(s), strict) for s, strict in module.loaded] == [(["model.x"], False)]  # the trainable part only
    refused = Module(model, ResumeRefusedError("of other SD weights", "digest a... vs b...", locked=True))
    with pytest.raises(CheckpointError) as e:
        training.export_from_checkpoint(refused, ckpt, tmp_path, load_config(TINY_CONFIG), init)
    assert str(e.value) == (f"{ckpt} was trained on other locked SD weights than --init init.safetensors (digest a... "
                            "vs b...); export with the --init the run started with")


def test_a_refused_resume_names_the_checkpoint_and_for_locked_weights_the_init():
    ckpt, init = Path("run/checkpoints/step=00000001.ckpt"), Path("init.safetensors")
    assert str(training.refused_resume(ResumeRefusedError("of another model config", "hash 1 vs 2"), ckpt, init)) == \
        f"{ckpt}: of another model config (hash 1 vs 2)"
    assert str(training.refused_resume(ResumeRefusedError("holds no training record"), ckpt, init)) == \
        f"{ckpt}: holds no training record"
    locked = ResumeRefusedError("of other SD weights", "digest a... vs b...", locked=True)
    head = f"{ckpt} was trained on other locked SD weights than --init {init} (digest a... vs b...); "
    assert str(training.refused_resume(locked, ckpt, init)) == \
        head + "resume with the --init the run started with, or use another --out"
    assert str(training.refused_resume(locked, ckpt, init, "export")) == head + "export with the --init the run started with"


class Trainer:
    """A stand-in for fit: `run(trainer)` is its trainer.fit."""

    interrupted, is_global_zero, progress_bar_callback, global_step = False, True, None, 3

    def __init__(self, run=lambda self: None, **attrs):
        self.run = run
        self.__dict__.update(attrs)

    def fit(self, *a, **kw):
        self.run(self)


def test_fit_exports_on_the_first_process_only_and_says_the_resume(tmp_path, capsys, model):
    a = SimpleNamespace(out=str(tmp_path / "run"), init=str(tmp_path / "init.safetensors"))
    resume = tmp_path / "run" / "checkpoints" / "step=00000001.ckpt"
    (tmp_path / "run").mkdir()  # made by Lightning
    assert training.fit(a, load_config(TINY_CONFIG), Trainer(is_global_zero=False), None, None, resume) == 0
    assert capsys.readouterr() == ("", "") and list((tmp_path / "run").iterdir()) == []
    assert training.fit(a, load_config(TINY_CONFIG), Trainer(), Module(model), None, resume) == 0
    assert capsys.readouterr() == (f"step 3: trained weights -> {tmp_path / 'run' / 'control.safetensors'}\n",
                                   f"resuming from {resume}\n")
    assert read_export_metadata(tmp_path / "run" / "control.safetensors")["step"] == "3"


def test_fit_off_the_main_thread_leaves_the_signals_alone(tmp_path):
    """Only the main thread may set a signal handler (ValueError elsewhere)."""
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    result = []
    thread = threading.Thread(target=lambda: result.append(training.fit(a, None, Trainer(is_global_zero=False), None,
                                                                        None, None)))
    thread.start()
    thread.join()
    assert result == [0]


def test_sigterm_before_lightning_holds_it_stops_as_sigterm_without_lightnings_ctrl_c_notice(tmp_path, capsys, caplog):
    """The script's handler raises Terminated (a KeyboardInterrupt): Lightning says "Detected
    KeyboardInterrupt" and exits; fit says SIGTERM instead, and leaves handlers and filters as found."""
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def lightning_like(trainer):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            notices.info("Detected KeyboardInterrupt, attempting graceful shutdown ...")
            trainer.interrupted = True
            raise SystemExit(1)

    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    filters, unheard = list(notices.filters), []

    def unheard_here(signum, frame):  # the test's own: the script's must be gone after fit
        unheard.append(signum)

    before = signal.signal(signal.SIGTERM, unheard_here)
    try:
        with caplog.at_level(logging.INFO, logger=notices.name):
            assert training.fit(a, None, Trainer(lightning_like), None, None, None) == 143
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err == (f"{PROG}: stopped by SIGTERM at step 3; no checkpoint saved yet (see "
                                       "--ckpt-every); rerun the same command to start over\n")
    assert caplog.records == [] and unheard == []
    assert handler is unheard_here and notices.filters == filters


def test_what_lightning_raises_from_fit(tmp_path):
    """A SystemExit without an interruption, a refused resume checkpoint, a Ctrl-C Lightning did not handle."""
    a = SimpleNamespace(out=str(tmp_path / "run"), init="init.safetensors")
    resume = tmp_path / "run" / "checkpoints" / "step=00000001.ckpt"

    def raises(e):
        def run(trainer):
            raise e
        return Trainer(run, is_global_zero=False)  # nothing to export on the way out

    with pytest.raises(SystemExit):
        training.fit(a, None, raises(SystemExit(1)), None, None, None)
    with pytest.raises(CheckpointError) as e:
        training.fit(a, None, raises(ResumeRefusedError("x", "digest a... vs b...", locked=True)), None, None, resume)
    assert str(e.value) == (f"{resume} was trained on other locked SD weights than --init init.safetensors (digest "
                            "a... vs b...); resume with the --init the run started with, or use another --out")
    with pytest.raises(KeyboardInterrupt, match="^its own words$"):
        training.fit(a, None, raises(KeyboardInterrupt("its own words")), None, None, None)
    with pytest.raises(KeyboardInterrupt) as e:
        training.fit(a, None, raises(KeyboardInterrupt()), None, None, None)
    assert str(e.value) == "interrupted; no checkpoint saved yet (see --ckpt-every); rerun the same command to start over"


def test_the_line_after_a_non_finite_loss_says_where_a_rerun_goes_on_from(tmp_path):
    """A checkpoint of the step whose loss was not finite (or later) holds the weights that gave
    it: a rerun from there meets it again, so the line says to move those away (naming the one a
    rerun then resumes from) or to start over; without one, a rerun with a lower --lr goes on."""
    from cldm.lightning import NonFiniteLossError

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    cfg = load_config(TINY_CONFIG, ["train.lr=0.001", "train.precision=16-mixed"])
    e = NonFiniteLossError(5, float("nan"))
    head = ("the loss at step 5 is nan (averaged over the step's batches and devices): stopped before that step's "
            "update, with no export; ")
    lower = "a lower --lr (now 0.001), or --precision bf16-mixed or 32 (fp16 overflows)"
    tail = "; or look for bad frames in the data"
    assert training.non_finite_line(e, cfg, tmp_path) == f"{head}rerun with {lower}{tail}"
    training_ckpt(ckpts / "step=00000003.ckpt", 3)
    assert training.non_finite_line(e, cfg, tmp_path) == \
        f"{head}rerun with {lower} (it resumes from step=00000003.ckpt){tail}"
    training_ckpt(ckpts / "step=00000005.ckpt", 5)
    assert training.non_finite_line(e, cfg, tmp_path) == (
        f"{head}step=00000005.ckpt holds the weights that gave it: move the checkpoints from it on out of {ckpts} "
        f"and rerun with {lower} (it resumes from step=00000003.ckpt), or start over in another --out{tail}")
    (ckpts / "step=00000003.ckpt").unlink()
    bf16 = load_config(TINY_CONFIG, ["train.lr=0.001", "train.precision=bf16-mixed"])
    assert training.non_finite_line(e, bf16, tmp_path) == (
        f"{head}step=00000005.ckpt holds the weights that gave it, so a rerun would meet it again: start over in "
        f"another --out with a lower --lr (now 0.001){tail}")
