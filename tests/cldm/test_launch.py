"""Which process prepares OUT, how many processes a run has, and launchers that disagree with the flags."""
import os
import re

import pytest

from cldm.launch import LaunchError, check_launcher, count_devices, ddp_kwargs, is_launch_rank_zero

RANK_KEYS = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK", "SLURM_JOB_NAME", "SLURM_NTASKS")
LAUNCHER_KEYS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_JOB_NAME", "SLURM_NTASKS")
SRUN = dict(SLURM_JOB_NAME="job", SLURM_NTASKS="2")  # processes srun started


def set_env(monkeypatch, keys, env):
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("env, first", [
    ({}, True), ({"RANK": "0"}, True), ({"RANK": "3"}, False), ({"SLURM_PROCID": "1", **SRUN}, False),
    ({"SLURM_PROCID": "0", **SRUN}, True),
    # an interactive job (Lightning ignores SLURM there): the process Lightning starts inherits PROCID 0
    ({"SLURM_PROCID": "0", "SLURM_JOB_NAME": "interactive", "SLURM_NTASKS": "1", "LOCAL_RANK": "1"}, False),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash", "LOCAL_RANK": "0"}, True),
    ({"RANK": "0", "LOCAL_RANK": "1"}, True),  # the global rank decides where there is one
    ({"RANK": "1", "SLURM_PROCID": "0"}, False),  # torchrun in an `srun --pty bash` shell: RANK is the process's
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False), ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, False)])
def test_only_the_first_process_of_the_first_node_prepares_out(monkeypatch, env, first):
    set_env(monkeypatch, RANK_KEYS, env)
    assert is_launch_rank_zero() is first


@pytest.mark.parametrize("env, devices, nodes, expected", [
    ({}, "1", 1, 1),
    ({}, "0,1", 3, 6),  # a device list counts its entries
    ({}, "0,1,", 1, 2),  # a trailing comma, as Lightning reads it
    ({}, "auto", 2, 2),  # on the CPU: one process per node
    ({}, "0", 1, "--devices 0 --num-nodes 1: training needs at least one device"),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2"), "2", 1, 2),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2"), "1", 1, "torchrun's WORLD_SIZE is 2, but --devices 1 x "
                                                           "--num-nodes 1 is 1;"),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2"), "1", 2, 2),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE=" 2\n"), "2", 1, 2),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="1"), "2", 1, "torchrun's WORLD_SIZE is 1, but --devices 2 x "
                                                           "--num-nodes 1 is 2;"),  # fewer processes, too
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="0"), "1", 1, "torchrun's WORLD_SIZE is 0, but --devices 1 x "
                                                           "--num-nodes 1 is 1;"),
    (dict(SLURM_JOB_NAME="job", SLURM_NTASKS="4"), "2", 1, "SLURM_NTASKS is 4, but --devices 2 x --num-nodes 1 "
                                                          "is 2;"),
    (dict(SLURM_JOB_NAME="job", SLURM_NTASKS="4"), "2", 2, 4),
    (dict(SLURM_JOB_NAME="interactive", SLURM_NTASKS="4"), "1", 1, 1),  # Lightning ignores SLURM here too
    # torchrun inside a SLURM job (`srun torchrun`, one task per node): torchrun's variables give the
    # ranks, as Lightning reads them (SLURM_NTASKS counts launchers; it was checked, and its advice,
    # --devices 1, made lone trainings into one OUT)
    (dict(SLURM_JOB_NAME="job", SLURM_NTASKS="2", TORCHELASTIC_RUN_ID="x", WORLD_SIZE="8"), "4", 2, 8),
    (dict(SLURM_JOB_NAME="job", SLURM_NTASKS="1", TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2"), "1", 1,
     "torchrun's WORLD_SIZE is 2, but --devices 1 x --num-nodes 1 is 1;"),
    # the same product per node another way: a process past --devices crashed inside Lightning
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"), "1", 2,
     "torchrun's LOCAL_WORLD_SIZE (--nproc-per-node) is 2, but --devices 1 is 1 per node; make them equal"),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="16", LOCAL_WORLD_SIZE="8"), "4", 4,
     "torchrun's LOCAL_WORLD_SIZE (--nproc-per-node) is 8, but --devices 4 is 4 per node;"),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="16", LOCAL_WORLD_SIZE="8"), "8", 2, 16),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2"), "0,1", 2, 4),
])
def test_a_launcher_that_started_another_number_of_processes_is_refused(monkeypatch, env, devices, nodes, expected):
    """The world size, or the refusal: torchrun --nproc-per-node 2 with --devices 1 would run two
    lone trainings into one OUT."""
    set_env(monkeypatch, LAUNCHER_KEYS, env)
    if isinstance(expected, int):
        assert check_launcher(devices, nodes, "cpu") == expected
    else:
        with pytest.raises(LaunchError, match=re.escape(expected)):
            check_launcher(devices, nodes, "cpu")


@pytest.mark.parametrize("accelerator, devices, cuda, expected", [
    ("gpu", "auto", True, 4), ("cuda", "-1", True, 4), ("auto", "auto", True, 4),  # every GPU there is
    ("cpu", "auto", True, 1), ("auto", "auto", False, 1), ("gpu", "-1", False, 1),  # no GPU asked for, or none there
    ("gpu", "0,2", True, 2), ("gpu", 3, True, 3)])
def test_auto_or_minus_one_devices_count_the_gpus_only_where_gpus_are_used(monkeypatch, accelerator, devices, cuda,
                                                                            expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert count_devices(accelerator, devices) == expected


def test_ddp_broadcasts_buffers_once_where_torch_can_say_so(monkeypatch):
    """torch >= 2.13: forward_sync_buffers=False, not the deprecated broadcast_buffers."""
    from torch.nn.parallel import DistributedDataParallel

    def new_init(self, module, device_ids=None, broadcast_buffers=None, find_unused_parameters=False,
                 gradient_as_bucket_view=False, forward_sync_buffers=None):
        pass

    monkeypatch.setattr(DistributedDataParallel, "__init__", new_init)
    assert ddp_kwargs() == dict(find_unused_parameters=False, gradient_as_bucket_view=True, forward_sync_buffers=False)


def test_ddp_without_forward_sync_buffers_falls_back_to_broadcast_buffers(monkeypatch):
    """torch before 2.13 (e.g. a GPU image's own) has no forward_sync_buffers argument."""
    from torch.nn.parallel import DistributedDataParallel

    def old_init(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,
                 find_unused_parameters=False, gradient_as_bucket_view=False):
        pass

    monkeypatch.setattr(DistributedDataParallel, "__init__", old_init)
    assert ddp_kwargs() == dict(find_unused_parameters=False, gradient_as_bucket_view=True, broadcast_buffers=False)


@pytest.mark.parametrize("env, name", [(dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="abc"), "WORLD_SIZE"),
                                       (dict(SLURM_JOB_NAME="job", SLURM_NTASKS=""), "SLURM_NTASKS")])
def test_a_launcher_count_that_is_no_number_is_named(monkeypatch, env, name):
    set_env(monkeypatch, LAUNCHER_KEYS, env)
    with pytest.raises(LaunchError, match=f"^the environment variable {name} is '{env[name]}', not a process count$"):
        check_launcher("1", 1, "cpu")


def test_the_rank_test_warns_nothing_in_an_interactive_job_with_srun_on_path(monkeypatch, tmp_path):
    """Lightning's SLURM check warns when `srun` is on PATH but not used; called for the rank of
    an interactive job's process, that warning came out as a "note:" line of the data summary."""
    import warnings

    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    set_env(monkeypatch, RANK_KEYS, {"SLURM_PROCID": "0", "SLURM_JOB_NAME": "bash", "SLURM_NTASKS": "1"})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert is_launch_rank_zero() is True
        assert check_launcher("1", 1, "cpu") == 1
    assert [str(w.message) for w in said] == []
