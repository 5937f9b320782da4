"""What of tests/test_cuda.py can be checked without a GPU, so a GPU session (rare, short) is not
spent on a crash a CPU would have shown: the tests that do not depend on CUDA itself run here
with the device set to the CPU, and no module binds one imported name to two things (test_cuda.py
imported lightning as L, then colorize.loading as L: its Lightning test failed on the GPU only)."""
import ast
import subprocess
from pathlib import Path

import pytest
import torch

import tests.test_cuda as gpu

REPO = Path(__file__).resolve().parent.parent


def import_bindings(tree: ast.Module):
    """(name, what it is bound to, line) of each module-level import."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                yield (a.asname, a.name, node.lineno) if a.asname else (a.name.split(".")[0], a.name.split(".")[0],
                                                                         node.lineno)
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                yield a.asname or a.name, f"{'.' * node.level}{node.module or ''}:{a.name}", node.lineno


def python_files() -> list[Path]:
    """The repo's Python files: git's list (not the data folders' thousands of frames), else a walk."""
    try:
        listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
        return [REPO / f for f in listed.stdout.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        return [f for f in REPO.rglob("*.py") if not any(p.startswith(".") for p in f.relative_to(REPO).parts)]


def test_no_module_binds_an_imported_name_to_two_things():
    files = python_files()
    assert REPO / "tests" / "test_cuda.py" in files
    clashes = []
    for f in files:
        seen = {}
        for name, target, line in import_bindings(ast.parse(f.read_text(), str(f))):
            if seen.setdefault(name, (target, line))[0] != target:
                clashes.append(f"{f.relative_to(REPO)}:{line}: {name} was {seen[name][0]} (line {seen[name][1]}), "
                               f"now {target}")
    assert clashes == []


@pytest.mark.parametrize("name, args", [
    ("test_reference_conformance_on_cuda", ["tiny_weights", "tiny_io"]),
    ("test_autocast_sampling_stays_close_to_float32", ["tiny_weights", "tiny_io", torch.bfloat16]),
    ("test_locked_digest_is_the_same_on_cuda_as_on_cpu", []),
])
def test_device_agnostic_gpu_tests_run_on_the_cpu(name, args, monkeypatch, request):
    """The library calls these make (renamed or moved functions, changed signatures) are the
    same on both devices; the others need CUDA itself (graphs, fp16 kernels, Lightning on "cuda")
    or, for bf16 training, a GPU's numbers."""
    monkeypatch.setattr(gpu, "CUDA", torch.device("cpu"))
    getattr(gpu, name)(*(request.getfixturevalue(a) if isinstance(a, str) else a for a in args))
