"""How many processes a training run has, who started them, and which one may touch the run folder.

Every process of a DDP run calls these before the process group exists, so they read the
environment the launcher (torchrun, SLURM, Lightning itself) set, not torch.distributed.
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

NOISE, DATA, VALIDATION = 0, 1, 2  # what a seed of a training run is for: run_seed keeps their streams apart


def run_seed(seed: int, purpose: int, *parts: int) -> int:
    """A torch seed for one `purpose` of a training run (NOISE: a rank's at a step; DATA: the
    order from a step; VALIDATION: a batch's), every input mixed by a SeedSequence. Seeds made
    by adding the parts shared streams: a seed-0 run resumed at step k drew the noise of a
    fresh run of seed k. 63 bits, so that a sampler's seed + epoch stays a valid torch seed;
    a negative seed is taken modulo 2**64, as torch takes it."""
    return int(np.random.SeedSequence([seed % 2**64, purpose, *parts]).generate_state(1, np.uint64)[0]) >> 1


class LaunchError(ValueError):
    """Devices, nodes and the launcher's process count disagree (one line, bad input)."""


def is_launch_rank_zero() -> bool:
    """True in the one process that should write to OUT before the process group exists:
    torchrun's RANK (inside a SLURM job too), else SLURM's SLURM_PROCID where SLURM started the
    processes (an interactive job's processes are Lightning's, which inherit PROCID 0), else
    Lightning's own NODE_RANK and LOCAL_RANK."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "SLURM_PROCID" in env and slurm_started():
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", 0)) == 0 and int(env.get("LOCAL_RANK", 0)) == 0


def devices_arg(devices: str) -> int | str:
    """--devices as Lightning takes it: a count as an int, 'auto' or a list like '0,1' as is."""
    return int(devices) if devices.isdigit() else devices


def count_devices(accelerator: str, devices: int | str) -> int:
    """Processes per node that `devices` means, as Lightning will resolve it."""
    if isinstance(devices, int):
        return devices
    if devices.strip() in ("auto", "-1"):
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu else 1
    return len([d for d in devices.split(",") if d.strip()])


def slurm_started() -> bool:
    """Whether srun started this process, as Lightning tells (SLURM_NTASKS set, and a job name other
    than "bash" or "interactive", which it leaves to another launcher); without its check's
    side effect, a warning when `srun` is on PATH but not used, which a rank test would print."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (inside a SLURM job too: `srun torchrun ...`, one
    task per node, or torchrun in an sbatch script), whose variables then give the ranks."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    return TorchElasticEnvironment.detect()


def launched_processes() -> tuple[int, str] | None:
    """(processes, what says so) when torchrun or SLURM started this run's processes, else None.
    torchrun first, as Lightning looks (training hands it SLURM's environment only without
    torchrun): inside a SLURM job that runs torchrun, SLURM_NTASKS counts torchrun launchers."""
    if launched_by_torchrun():
        return _count("WORLD_SIZE"), "torchrun's WORLD_SIZE"
    if slurm_started():
        return _count("SLURM_NTASKS"), "SLURM_NTASKS"
    return None


def _count(name: str) -> int:
    value = os.environ[name]
    if not value.strip().isdigit():
        raise LaunchError(f"the environment variable {name} is {value!r}, not a process count")
    return int(value)


def check_launcher(devices: str, num_nodes: int, accelerator: str = "auto") -> int:
    """The run's world size, --devices x --num-nodes; refused (LaunchError) when it is below one or a
    launcher started another number of processes (with one process per run each would train alone,
    no DDP, all into the same OUT), or torchrun another number per node than --devices (the same
    product: Lightning's check passes, and a process whose local rank is past --devices crashes)."""
    world = count_devices(accelerator, devices_arg(devices)) * num_nodes
    if world < 1:
        raise LaunchError(f"--devices {devices} --num-nodes {num_nodes}: training needs at least one device")
    launched = launched_processes()
    if launched is not None and launched[0] != world:
        count, source = launched
        raise LaunchError(f"{source} is {count}, but --devices {devices} x --num-nodes {num_nodes} is {world}; "
                          "make them equal (docs/TRAINING.md)")
    per_node = world // num_nodes
    if launched_by_torchrun() and "LOCAL_WORLD_SIZE" in os.environ and _count("LOCAL_WORLD_SIZE") != per_node:
        raise LaunchError(f"torchrun's LOCAL_WORLD_SIZE (--nproc-per-node) is {os.environ['LOCAL_WORLD_SIZE']}, "
                          f"but --devices {devices} is {per_node} per node; make them equal (docs/TRAINING.md)")
    return world


def ddp_kwargs() -> dict:
    """Buffers are constants (the noise schedule): broadcast once when DDP wraps the model, not
    every step. torch >= 2.13 says so with forward_sync_buffers=False and deprecates
    broadcast_buffers=False (which also skipped the first broadcast); older torch (a GPU image's
    own, say) knows only the latter."""
    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return dict(find_unused_parameters=False, gradient_as_bucket_view=True,
                **({"forward_sync_buffers": False} if new else {"broadcast_buffers": False}))
