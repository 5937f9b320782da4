"""Which process prepares OUT, how many processes a run has, and launchers that disagree with the flags."""
import re

import pytest

from cldm.launch import LaunchError, check_launcher, ddp_kwargs, is_launch_rank_zero

RANK_KEYS = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")
LAUNCHER_KEYS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "SLURM_JOB_NAME", "SLURM_NTASKS")


def set_env(monkeypatch, keys, env):
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("env, first", [
    ({}, True), ({"RANK": "0"}, True), ({"RANK": "3"}, False), ({"SLURM_PROCID": "1"}, False),
    ({"RANK": "0", "LOCAL_RANK": "1"}, True),  # the global rank decides where there is one
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False), ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, False)])
def test_only_the_first_process_of_the_first_node_prepares_out(monkeypatch, env, first):
    set_env(monkeypatch, RANK_KEYS, env)
    assert is_launch_rank_zero() is first


@pytest.mark.parametrize("env, devices, nodes, expected", [
    ({}, "1", 1, 1),
    ({}, "0,1", 3, 6),  # a device list counts its entries
    ({}, "auto", 2, 2),  # on the CPU: one process per node
    ({}, "0", 1, "--devices 0 --num-nodes 1: training needs at least one device"),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2"), "2", 1, 2),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2"), "1", 1, "torchrun's WORLD_SIZE is 2, but --devices 1 x "
                                                           "--num-nodes 1 is 1;"),
    (dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2"), "1", 2, 2),
    (dict(SLURM_JOB_NAME="job", SLURM_NTASKS="4"), "2", 1, "SLURM_NTASKS is 4, but --devices 2 x --num-nodes 1 "
                                                          "is 2;"),
    (dict(SLURM_JOB_NAME="job", SLURM_NTASKS="4"), "2", 2, 4),
    (dict(SLURM_JOB_NAME="interactive", SLURM_NTASKS="4"), "1", 1, 1),  # Lightning ignores SLURM here too
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
