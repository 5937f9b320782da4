"""Constants and small helpers shared by tests (importable, unlike conftest)."""
import signal

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Tolerances the reference implementation itself meets between runs (tests/fixtures/README.md).
COMPONENT_TOL = dict(rtol=1e-4, atol=1e-5)
DDIM_TOL = dict(rtol=1e-3, atol=1e-4)


def sub_state(sd: dict, prefix: str) -> dict:
    """Keys under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def refused(main, argv, capsys) -> str:
    """The one stderr line of a CLI run that must stop before any work with exit 2 (argparse's
    usage errors exit, run_cli's return), without a traceback."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def default_sigint() -> None:
    """Popen preexec_fn for a child that a test interrupts with SIGINT: a test run started as a
    background job has SIGINT ignored, children inherit that, and Python then installs no
    Ctrl-C handler; a terminal's Ctrl-C reaches a foreground job, which this restores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class SDPACalls(TorchFunctionMode):
    """Records (query, key, value) of every F.scaled_dot_product_attention call inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append(tuple(args[:3]))
        return func(*args, **(kwargs or {}))
