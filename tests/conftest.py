"""Shared fixtures: one torch thread and a Ctrl-C handler per test; the reference implementation's tiny golden
weights and outputs."""
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
SLOW_TIMEOUT = 3600  # seconds for a `slow` test without its own timeout (pytest.ini's is for the default run)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture(scope="session")
def tiny_arch() -> dict:
    return json.loads((FIXTURES / "tiny_arch.json").read_text())


@pytest.fixture(scope="session")
def tiny_weights() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(FIXTURES / "tiny_v1_weights.safetensors").items()}


@pytest.fixture(scope="session")
def tiny_io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "tiny_v1_io.safetensors")


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test with one intra-op thread, then restore the setting.

    On a shared 2-core machine two OpenMP threads that lose their core to another process
    make small steps 10-100x slower (measured 0.05 s -> 3-6 s); one thread does not. Tests
    that need more threads set them (and this puts the count back).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def ctrl_c_handler():
    """Every test runs with Python's Ctrl-C handler, as a foreground run has, then the one found is
    put back. A test run started in the background (`cmd &`, nohup) inherits SIGINT ignored, and
    Python then installs no handler: a test that sends itself SIGINT failed there, or, where the
    first stop was raised by hand, passed without the second signal ever arriving."""
    hup = getattr(signal, "SIGHUP", None)  # cliutil.hangup_as_sigterm installs its own
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    hup_before = signal.getsignal(hup) if hup is not None else None
    yield
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGTERM, before[1])  # as a test left it (cliutil.ignore_stop_signals outside run_cli)
    if hup is not None:
        signal.signal(hup, hup_before)


@pytest.fixture(autouse=True)
def no_signal_left_blocked():
    """A test that leaves a signal blocked in the main thread fails itself, and the mask is put back:
    every process a later test starts would inherit it, and one waiting for its SIGTERM would wait
    for ever (as signals_deferred once left it, cut short by a signal)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    after = signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert after == before, f"the test left {sorted(signal.Signals(s).name for s in after - before)} blocked"


@pytest.fixture(autouse=True)
def tracers_put_back():
    """The trace and profile functions found are put back after each test: the tests that sweep a
    signal over lines (a trace function) end with sys.settrace(None), which also stopped a
    coverage run's tracer for the rest of the suite, without a word (colorize/references.py read
    39 % covered after tests/colorize/test_frames_io.py instead of 97 %)."""
    trace, profile = sys.gettrace(), sys.getprofile()
    yield
    sys.settrace(trace)
    sys.setprofile(profile)


RANK_ZERO = "lightning_utilities.core.rank_zero"  # Lightning's one rank_zero_only, shared by pytorch and fabric


@contextlib.contextmanager
def process_state_kept():
    """What the code run inside changes for the whole process is put back at the end.

    A DDP Trainer built under RANK=1 (a monkeypatched SLURM job) set Lightning's rank_zero_only.rank
    to 1 for every later test: their TensorBoard and CSV loggers wrote nothing and Lightning's
    warnings were silent, for some 700 tests, until another Trainer happened to set it back.
    In-process training runs leave PL_GLOBAL_SEED and PL_SEED_WORKERS in os.environ (which
    monkeypatch cannot undo for a variable it did not set), the Trainer cudnn.benchmark, the
    loader benchmark OpenCV's thread count."""
    env = dict(os.environ)
    rank_zero = sys.modules.get(RANK_ZERO)
    rank = getattr(getattr(rank_zero, "rank_zero_only", None), "rank", None)
    cudnn, matmul = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    cv2 = sys.modules.get("cv2")
    cv2_threads = cv2.getNumThreads() if cv2 is not None else None
    try:
        yield
    finally:
        if os.environ != env:
            os.environ.clear()
            os.environ.update(env)
        if (rank_zero := sys.modules.get(RANK_ZERO)) is not None:  # imported inside: the rank of a plain run
            rank_zero.rank_zero_only.rank = 0 if rank is None else rank
        torch.backends.cudnn.benchmark = cudnn
        torch.set_float32_matmul_precision(matmul)
        if (cv2 := sys.modules.get("cv2")) is not None:
            cv2.setNumThreads(-1 if cv2_threads is None else cv2_threads)  # -1: OpenCV's default, if imported inside


@pytest.fixture(autouse=True)
def process_state_put_back():
    """Every test runs inside process_state_kept."""
    with process_state_kept():
        yield
