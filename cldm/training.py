"""A training run on PyTorch Lightning: the model from --init, the data, the Trainer with its
callbacks, the fit with its signal handling, and the export of the trained weights.

The library half of tutorial_train_sd21_color_v2.py (`args` below is its parsed command line;
the config comes from cldm.train_config). Lightning is imported inside the functions: every
DDP process imports this file.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from cldm.train_config import UsageError
from cliutil import Terminated, is_terminal, out_of_memory, too_many_files, too_many_files_error

PROG = "tutorial_train_sd21_color_v2.py"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher() -> None:
    """In a DDP process a launcher started (Lightning's, for ranks > 0; torchrun's): have Linux
    SIGKILL it when its parent ends. Without it, a rank left in a collective by a rank 0 that
    stopped (out of memory, a traceback, the OOM killer) waits for the process group's timeout,
    half an hour under NCCL, holding its GPU; Lightning watches only the other way round (rank 0
    kills all when a rank it started fails). Call first thing in the script; elsewhere (not
    Linux, no LOCAL_RANK: a process started by hand) it does nothing."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0 and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)  # the parent ended before the request could see it


def build_model(cfg, init: Path):
    """ControlLDM with the init checkpoint loaded; every tensor must match (else CheckpointError)."""
    import torch

    from cldm.checkpoint import CheckpointError, load_state_dict
    from cldm.checkpoint_fit import check_fit, load_into
    from cldm.model import create_model
    from cldm.trainable import check_recorded, is_export
    from cldm.weights_config import read_export_metadata

    try:
        sd = load_state_dict(init)
        if is_export(sd, read_export_metadata(init)):  # else "lacks N tensors": true, but no help
            raise CheckpointError(f"{init}: an export of trained weights (control.safetensors), not a full "
                                  "checkpoint; --init needs the file tool_add_control_sd21.py writes (a resume too: "
                                  "the run's own --init)")
        with torch.device("meta"):  # the checks first: building SD2.1 for real takes tens of seconds
            shapes = create_model(cfg)
        check_recorded(read_export_metadata(init), shapes, init)  # what tool_add_control_sd21.py was told
        check_fit(shapes, sd, strict_prefixes=("",))
        model = create_model(cfg)
        load_into(model, sd, strict_prefixes=("",))
    except CheckpointError as e:  # the file readers' messages start with the path already
        where = "--init " if str(e).startswith(f"{init}: ") else f"--init {init}: "
        raise CheckpointError(where + str(e)) from None
    return model


def build_datamodule(cfg, args, model):
    from cldm.color import needs_gray_latent
    from cldm.launch import is_launch_rank_zero
    from tutorial_dataset import PairDataModule

    t = cfg.train
    band = {k: t[k] for k in ("low", "high", "min_gap") if t[k] is not None}
    fingerprint = None
    if args.use_latent_cache:
        from annotator.latent_cache import vae_fingerprint
        fingerprint = vae_fingerprint(model.first_stage_model)
    dm = PairDataModule(args.data, batch_size=t.batch_size, num_workers=t.num_workers, size=t.size,
                        val_movies=None if t.val_every else [], vae_fingerprint=fingerprint,
                        gray_latents=needs_gray_latent(model.color_variant),
                        accelerator=args.accelerator, seed=t.seed, **band)
    with warnings.catch_warnings(record=True) as said:  # the data's warnings: notes, not Python's two-line form
        warnings.simplefilter("always")
        try:  # fail here, with one line, on an empty band or a missing latent cache (Lightning reuses the setup)
            dm.setup("fit")
        finally:  # before that line too: a movie of another metric may be why the band is empty
            for w in said if is_launch_rank_zero() else ():
                if not str(w.message).startswith("no validation: "):  # of a held-out movie without pairs: below
                    print(f"{PROG}: note: {w.message}", file=sys.stderr)
    if is_launch_rank_zero():
        print(f"data: {dm.train.summary()}")
        if dm.val is not None:
            print(f"validation: {', '.join(dm.val.movies)}, held out of training ({dm.val.summary()})")
        if dm.no_val:
            print(f"{PROG}: note: no validation: {dm.no_val}", file=sys.stderr)
    return dm


def make_trainer(cfg, args, out: Path, resume: Path | None = None, validate: bool = True):
    """`validate=False`: no validation even with train.val_every (the data has no held-out movie)."""
    import lightning as L
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    from cldm.callbacks import (AtomicCheckpointIO, ImageLogger, ReplicaCheck, ResumeAgreement, StepCheckpoint,
                                StepLines)
    from cldm.launch import count_devices, ddp_kwargs, devices_arg, launched_by_torchrun

    t = cfg.train
    devices = devices_arg(args.devices)
    strategy = args.strategy
    if strategy == "ddp":
        if count_devices(args.accelerator, devices) * args.num_nodes == 1:
            strategy = "auto"  # one process: no process group, no DDP wrapper, no all-reduce
        else:
            strategy = DDPStrategy(**ddp_kwargs())
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 runs, as on the original A6000s
    plugins = [AtomicCheckpointIO()]
    bar = not args.no_progress and is_terminal(sys.stderr)  # a log gets StepLines' plain lines instead
    if SLURMEnvironment.detect() and not launched_by_torchrun():  # torchrun's variables give the ranks then
        plugins.append(SLURMEnvironment(auto_requeue=False))  # one resume mechanism: --resume auto
    callbacks = [
        ResumeAgreement(resume),  # every process must resume from global rank 0's choice
        StepCheckpoint(out / "checkpoints", every_n_steps=t.ckpt_every, keep=t.ckpt_keep),
        ImageLogger(out / "images", t.image_every, t.image_count, t.image_ddim_steps, seed=t.seed),
        ReplicaCheck(out / "replicas.json"),
        TQDMProgressBar(refresh_rate=max(1, t.log_every)) if bar else StepLines(t.log_every),
    ]
    val = dict(val_check_interval=t.val_every, check_val_every_n_epoch=None) if t.val_every and validate else \
        dict(limit_val_batches=0)
    try:
        with warnings.catch_warnings(record=True) as warned:  # held until the precision is known to be the asked one
            trainer = L.Trainer(
                accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=strategy,
                precision=str(t.precision), max_steps=t.max_steps, max_epochs=t.max_epochs,
                accumulate_grad_batches=t.accumulate, gradient_clip_val=t.grad_clip or None,
                log_every_n_steps=t.log_every, callbacks=callbacks, plugins=plugins, default_root_dir=out,
                logger=[TensorBoardLogger(out, name="tb"), CSVLogger(out, name="csv")],
                num_sanity_val_steps=0, benchmark=True, enable_model_summary=False,
                enable_progress_bar=bar, **val)
    except (TypeError, ValueError, RuntimeError, MisconfigurationException) as e:  # Lightning's checks of devices,
        # strategy, precision (and of a GPU asked for where none is: Misconfiguration)
        raise UsageError(f"cannot set up training with --accelerator {args.accelerator} --devices {args.devices} "
                         f"--strategy {args.strategy} --precision {t.precision}: {str(e).strip().splitlines()[0]}") \
            from None
    if str(t.precision) in ("16", "16-mixed") and trainer.precision != "16-mixed":  # Lightning swaps in
        # bf16-mixed on the CPU, with a warning of its own (not said: this line says it)
        raise UsageError(f"--precision {t.precision} is not available with --accelerator {args.accelerator} "
                         f"(Lightning would run {trainer.precision}); choose {trainer.precision} or 32")
    for w in warned:  # the run goes on: Lightning's warnings are said after all
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    no_collective_in_sigterm_handler(trainer)
    return trainer


def no_collective_in_sigterm_handler(trainer) -> None:
    """Lightning's SIGTERM handler (2.6) broadcasts over the process group from inside the handler,
    i.e. wherever rank 0 is when the signal comes: while it writes a checkpoint, rank 1 waits in
    the barrier after the write, and the two collectives wait for each other until the group's
    timeout (30 min). Keep the rest of it: pass the signal to the processes Lightning started and
    set the flag, which every process checks at a step's end and rank 0 broadcasts at a step's
    start, both collectives every process reaches.

    Private Lightning API (checked against 2.6, which requirements.txt pins): where the connector
    is not as expected, Lightning's own handler is left in place, with its hang."""
    connector = getattr(trainer, "_signal_connector", None)
    if not (hasattr(connector, "_sigterm_notifier_fn") and hasattr(connector, "received_sigterm")):
        return

    def notified(signum, _frame) -> None:
        launcher = trainer.strategy.launcher
        if not connector.received_sigterm and launcher is not None:
            launcher.kill(signum)
        connector.received_sigterm = True

    connector._sigterm_notifier_fn = notified


def export(module, out: Path, cfg, step: int, init: Path) -> Path:
    """OUT/control.safetensors, plus OUT/control.yaml (its config, found by colorize_inference.py).
    `module`: a ColorControlModule (its model and locked_digest())."""
    from omegaconf import OmegaConf

    from atomicio import write_bytes_atomic
    from cldm.trainable import export_control

    out.mkdir(parents=True, exist_ok=True)  # new with --export into another OUT (a fork's)
    # The YAML beside the weights wins over the config they record: written last, after an
    # earlier export's is removed, a stop in between never pairs new YAML with old weights.
    (out / "control.yaml").unlink(missing_ok=True)
    # the locked weights' digest: inference can tell SD weights other than --init's (768-v has
    # 512-base's shapes, so nothing else can)
    path = export_control(module.model, out / "control.safetensors", step=step, cfg=cfg,
                          extra={"init": init.name, "locked_digest": module.locked_digest()})
    write_bytes_atomic(out / "control.yaml", OmegaConf.to_yaml(cfg).encode())
    return path


def export_from_checkpoint(module, ckpt: Path, out: Path, cfg, init: Path) -> Path:
    import torch

    from cldm.lightning import ResumeRefusedError

    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)  # the optimiser states stay on disk
    try:
        module.on_load_checkpoint(state)
    except ResumeRefusedError as e:
        raise refused_resume(e, ckpt, init, "export") from None
    module.load_state_dict(state["state_dict"], strict=False)
    return export(module, out, cfg, int(state.get("global_step", 0)), init)


def note_nothing_to_train(resume: Path | None, max_steps: int) -> None:
    """Say so when the resume checkpoint already reached --max-steps: Lightning stops at once, silently."""
    from cldm.launch import is_launch_rank_zero
    from cldm.resume import checkpoint_step

    if resume is None or max_steps < 0 or not is_launch_rank_zero():
        return
    step = checkpoint_step(resume)
    if step >= max_steps:
        print(f"{PROG}: note: {resume.name} is at step {step}, --max-steps is {max_steps}: nothing to train; "
              "its weights are exported as they are", file=sys.stderr)


def note_skipped(ckpt_dir: Path) -> None:
    """Name the incomplete checkpoints --resume auto skips (once per run, not per process)."""
    from cldm.launch import is_launch_rank_zero
    from cldm.resume import incomplete_checkpoints

    if is_launch_rank_zero():
        for path in incomplete_checkpoints(ckpt_dir):
            print(f"{PROG}: note: skipped {path}: not a whole checkpoint file (cut short?); not resumed from nor "
                  "counted toward --ckpt-keep; move it away", file=sys.stderr)


# Lightning messages that say nothing true about this run (checked against Lightning 2.6):
QUIET = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen VAE and text encoder, on purpose
    r"Checkpoint directory .* exists and is not empty",  # a resume writes beside its own checkpoints
    r"You're resuming from a checkpoint that ended before the epoch ended",  # the loaders reseed by step
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
    # a resume with another --ckpt-every: StepCheckpoint keeps no state worth restoring (it
    # prunes by the files in the folder)
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
    # a resume from a copied or moved OUT, or a fork: StepCheckpoint's best_* bookkeeping (by
    # step, no metric) is used for nothing, and keeping goes by the files in the folder
    r"The dirpath has changed from .* therefore `best_model_score`",
)


def _no_litlogger_tip(record) -> bool:
    return not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip:")  # an advert, on every start


def _no_sigterm_notice(record) -> bool:
    return not record.getMessage().endswith("Received SIGTERM: 15")  # train() says it, with what to do


def quiet_lightning() -> None:
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    for name, quiet in (("lightning.pytorch.utilities.rank_zero", _no_litlogger_tip),
                        ("lightning.pytorch.trainer.connectors.signal_connector", _no_sigterm_notice)):
        log = logging.getLogger(name)
        if quiet not in log.filters:
            log.addFilter(quiet)


def refused_resume(e, ckpt: Path, init: Path, doing: str = "resume"):
    """The one line for a checkpoint on_load_checkpoint refused (ResumeRefusedError), naming the
    file and, for other locked weights, the --init and what to do."""
    from cldm.checkpoint import CheckpointError

    if not e.locked:
        return CheckpointError(f"{ckpt}: {e.reason}" + (f" ({e.detail})" if e.detail else ""))
    other_out = ", or use another --out" if doing == "resume" else ""
    return CheckpointError(f"{ckpt} was trained on other locked SD weights than --init {init} ({e.detail}); {doing} "
                           f"with the --init the run started with{other_out}")


# torch's words for a DataLoader worker: ended by SIGKILL (how Linux's OOM killer ends a process);
# finding /dev/shm full when it fallocates a batch there, or on a write into it (SIGBUS); gone
# with no word on why (torch found it dead before its SIGCHLD handler said how)
KILLED_LOADER = "is killed by signal: Killed"
SHM_FULL, BUS_ERROR = "unable to allocate shared memory(shm)", "is killed by signal: Bus error"
LOADER_GONE, SIGNALLED = "exited unexpectedly", "is killed by signal"
# one ended by a SIGTERM that its parent did not send (torch's handler in it exits quietly on the
# parent's): the signal a scheduler sends every process of a job, or `kill -TERM -PGID`, come
# before the process had set itself up (tutorial_dataset.leave_stops_to_the_run passes it on after)
TERMINATED_LOADER = "is killed by signal: Terminated"
TOO_MANY_FILES, SYSTEM_WIDE = "Too many open files", "in system"  # EMFILE's text (ENFILE's has "in system")


def loader_says(e: BaseException | None, words: str, context: bool = False) -> bool:
    """Whether `e`, or an error it was raised from, holds torch's `words` about a data loader
    process: a worker's death may come as the cause of torch's "exited unexpectedly" (its
    SIGCHLD handler's error lands in the queue read it wraps). `context`: also an error it was
    raised while handling, for errors torch's SIGCHLD handler raises wherever the main process is
    (inside torch.save's writes, whose zip writer raises 'unexpected pos' over it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if words in str(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or (e.__context__ if context else None)
    return False


def size_of(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def out_of_memory_line(e: BaseException, cfg, step: int, device, out: Path,
                       shm: Path = Path("/dev/shm")) -> str | None:
    """The one line for a run out of memory: where, at which settings, what to lower, and what a
    rerun does (the flags are train: values, free to change on a resume); None if `e` says no
    such thing (it keeps its traceback). Out of file descriptors too (torch's loaders pass
    batches as files: `ulimit -n 32` ran out at 4 of them). The data loader processes' cases
    count: one killed by SIGKILL (Linux's OOM killer), a full `shm` (where torch hands their
    batches over; Docker gives a container 64 MB), and one gone without a word, for which those
    two are the likely causes (a known other signal, a segfault say, is not)."""
    import shutil

    import torch

    from cldm.run_dir import rerun_hint

    t = cfg.train
    loaders = f"at step {step} (--batch-size {t.batch_size}, --num-workers {t.num_workers} data loader processes " \
              "per device): lower either"
    room = lambda: f"{shm}: {size_of(shutil.disk_usage(shm).total)}" if shm.is_dir() else str(shm)  # noqa: E731
    more_shm = f"give {shm} more room (Docker: --shm-size 8g)"
    if isinstance(e, torch.OutOfMemoryError):  # the GPU's
        ways = ["lower --batch-size (raise --accumulate to keep the samples per optimiser step)"]
        if not cfg.model.unet.get("use_checkpoint", False):
            ways.append("turn on --grad-checkpoint")
        if str(t.precision) == "32":
            ways.append("train in --precision bf16-mixed")
        ways = ", ".join(ways[:-1]) + " or " + ways[-1] if len(ways) > 1 else ways[0]
        what = f"out of memory on {device} at step {step} (--batch-size {t.batch_size} at --size {t.size}): {ways}"
    elif loader_says(e, SHM_FULL):
        what = f"a data loader process ran out of shared memory ({room()}) {loaders}, or {more_shm}"
    elif loader_says(e, BUS_ERROR):
        what = (f"a data loader process was killed by SIGBUS, most likely for lack of shared memory ({room()}) "
                f"{loaders}, or {more_shm}")
    elif loader_says(e, KILLED_LOADER):
        what = f"a data loader process was killed (SIGKILL: most likely the OOM killer, out of RAM) {loaders}"
    elif out_of_memory(e):  # the host's: the training process on a CPU, or a data loader process
        what = f"out of memory (RAM) {loaders}"
    elif loader_says(e, TOO_MANY_FILES, context=True) and not loader_says(e, SYSTEM_WIDE, context=True):
        what = too_many_files(f"at step {step} (--num-workers {t.num_workers} data loader processes per device)",
                              "--num-workers")
    elif LOADER_GONE in str(e) and not loader_says(e, SIGNALLED):
        what = (f"a data loader process ended without saying why (torch: {str(e).splitlines()[0]}); most likely it "
                f"ran out of RAM (the OOM killer) or of shared memory ({room()}) {loaders}, or {more_shm}; its own "
                "message, if it left one, is above")
    else:
        return None
    return f"{what}; {rerun_hint(out)}"


def os_error_line(e: OSError, args, step: int) -> str | None:
    """The one line for what the run could not write in OUT (a full disk above all) or read
    from the data root while training (a frame gone or damaged since the start), with what a
    rerun does; None for any other OSError (it keeps its traceback)."""
    import re
    import shutil

    from cldm.run_dir import rerun_hint

    out, data = Path(args.out), Path(args.data)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(e.filename) if e.filename else out
        disk = next(p for p in (where, *where.parents) if p.exists())
        return (f"{where}: no space left on its disk ({size_of(shutil.disk_usage(disk).free)} free) at step {step}: "
                f"free some; {rerun_hint(out)}")
    if too_many_files_error(e):
        return f"{too_many_files(f'at step {step}', '--num-workers')}; {rerun_hint(out)}"
    if e.filename and out.resolve() in Path(e.filename).resolve().parents:
        return f"cannot write {e.filename} at step {step}: {e.strerror}; {rerun_hint(out)}"
    # a data loader process's error comes as its traceback's text, whose last line is the error
    said = re.sub(r"^\w+: ", "", (str(e).strip().splitlines() or [""])[-1])
    if said.startswith(f"{data}{os.sep}"):
        return (f"{said} (at step {step}); rebuild that movie with build_pairs.py (remove its folder first) or move "
                f"it out of --data; {rerun_hint(out)}")
    return None


def non_finite_line(e, cfg, out: Path) -> str:
    """The line for a diverged run (cldm.lightning.NonFiniteLossError): stopped before the step's
    update, no export; and where to go on from. A checkpoint of that step (or later) holds the
    weights that gave the loss, so resuming from it meets the same loss whatever --lr is."""
    from cldm.resume import list_checkpoints

    t = cfg.train
    half = ", or --precision bf16-mixed or 32 (fp16 overflows)" if str(t.precision) in ("16", "16-mixed") else ""
    found = list_checkpoints(out / "checkpoints")
    gave = [p for step, _, p in found if step >= e.step]
    earlier = [p for step, _, p in found if step < e.step]
    lower = f"a lower --lr (now {t.lr:g}){half}"
    if not gave:
        where = f"rerun with {lower}" + (f" (it resumes from {earlier[-1].name})" if earlier else "")
    elif earlier:
        where = (f"{gave[0].name} holds the weights that gave it: move the checkpoints from it on out of "
                 f"{out / 'checkpoints'} and rerun with {lower} (it resumes from {earlier[-1].name}), or start over "
                 "in another --out")
    else:
        where = (f"{gave[0].name} holds the weights that gave it, so a rerun would meet it again: start over in "
                 f"another --out with {lower}")
    return f"{e} (averaged over the step's batches and devices): stopped before that step's update, with no " \
           f"export; {where}; or look for bad frames in the data"


def fit(args, cfg, trainer, module, dm, resume) -> int:
    """trainer.fit, then the export; the exit status: 0 done, 130 interrupted, 143 stopped by
    SIGTERM (each said with what a rerun does)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cldm.lightning import NonFiniteLossError, ResumeRefusedError
    from cldm.run_dir import rerun_hint

    out = Path(args.out)
    received = []

    def before_lightning(signum, _frame):
        # SIGTERM while Lightning sets up (the checkpoint restore, seconds) would end the run
        # unseen: stop as on Ctrl-C. Once Lightning's handler holds SIGTERM it calls this one
        # too, and stops the run itself at the end of a step: then step aside.
        if signal.getsignal(signal.SIGTERM) is before_lightning:
            received.append(signum)
            raise Terminated

    def no_ctrl_c_notice(record) -> bool:
        # Lightning's "Detected KeyboardInterrupt": fit's own line says it, with what a rerun does
        # (after SIGTERM, which before_lightning raises as Terminated, the notice is untrue)
        return "Detected KeyboardInterrupt" not in record.getMessage()

    hook = threading.current_thread() is threading.main_thread()  # signals are the main thread's
    previous = signal.signal(signal.SIGTERM, before_lightning) if hook else None
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    notices.addFilter(no_ctrl_c_notice)
    try:
        if resume is not None and trainer.is_global_zero:
            print(f"resuming from {resume}", file=sys.stderr)
        # Lightning ends a run it stopped itself with SystemExit: 1 after the first Ctrl-C, 0 (a
        # SIGTERMException) after SIGTERM, which a scheduler or `&&` would take for success.
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=resume)
        except SIGTERMException:
            received.append(signal.SIGTERM)
        except SystemExit:
            if not trainer.interrupted:
                raise
        except ResumeRefusedError as e:
            raise refused_resume(e, resume, Path(args.init)) from None
        except NonFiniteLossError as e:
            raise UsageError(non_finite_line(e, cfg, out)) from None
        except (RuntimeError, MemoryError) as e:  # RuntimeError: torch's OutOfMemoryError and its CPU allocator's
            if loader_says(e, TERMINATED_LOADER, context=True):  # a SIGTERM to every process of the run (a
                received.append(signal.SIGTERM)  # scheduler's stop): a data loader process died of it first
            else:
                line = out_of_memory_line(e, cfg, trainer.global_step, trainer.strategy.root_device, out)
                if line is None:
                    raise
                raise UsageError(line) from None
        bar_line = "\n" if trainer.progress_bar_callback is not None else ""  # the bar's line is unfinished
        # the line is global rank 0's (under DDP every process stops, with the same status); step 0
        # of a resumed run: stopped while Lightning restored the checkpoint
        at = f"at step {trainer.global_step}" if resume is None or trainer.global_step else \
            f"while resuming from {Path(resume).name}"
        if received:
            if trainer.is_global_zero:
                print(f"{bar_line}{PROG}: stopped by SIGTERM {at}; {rerun_hint(out)}", file=sys.stderr)
            return 143
        if trainer.interrupted:
            if trainer.is_global_zero:
                print(f"{bar_line}{PROG}: interrupted {at}; {rerun_hint(out)}", file=sys.stderr)
            return 130
        if trainer.is_global_zero:
            path = export(module, out, cfg, trainer.global_step, Path(args.init))
            print(f"step {trainer.global_step}: trained weights -> {path}")
        return 0
    except KeyboardInterrupt as e:  # one Lightning did not handle, or in the export (after the final checkpoint):
        # run_cli says it, with what is true now (its own hint was worded before training began)
        if str(e).strip():
            raise
        raise type(e)(f"interrupted; {rerun_hint(out)}") from None
    except OSError as e:  # in a step (a checkpoint, a frame) or the export
        line = os_error_line(e, args, trainer.global_step)
        if line is None:
            raise
        raise UsageError(line) from None
    finally:
        notices.removeFilter(no_ctrl_c_notice)
        if hook:
            signal.signal(signal.SIGTERM, previous)
