"""The per-test time limit (pytest-timeout): a hung test fails with its stack instead of
stalling the run, and `slow` tests get a longer limit (tests/conftest.py)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SLEEPERS = '''
import time
import pytest

def test_default_sleeps():
    time.sleep(2.5)

@pytest.mark.slow
def test_slow_sleeps():
    time.sleep(2.5)

@pytest.mark.slow
@pytest.mark.timeout(1)
def test_slow_with_its_own_limit_sleeps():
    time.sleep(2.5)
'''


def run_pytest(folder: Path, *args: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pytest.ini"),
                        "--rootdir", str(folder), *args, str(folder)], capture_output=True, text=True, cwd=folder)
    return r.returncode, r.stdout + r.stderr


def test_pytest_ini_sets_a_time_limit_per_test(pytestconfig):
    assert float(pytestconfig.getini("timeout")) == 300


def test_slow_tests_get_the_long_limit_unless_they_carry_their_own():
    """The hook itself, on stand-in items (the slow test below shows it in a pytest run)."""
    from types import SimpleNamespace

    from tests.conftest import SLOW_TIMEOUT, pytest_collection_modifyitems

    def item(*marks):
        added = []
        return SimpleNamespace(added=added, add_marker=added.append,
                               get_closest_marker=lambda name: name if name in marks else None)
    slow, own, plain = item("slow"), item("slow", "timeout"), item()
    pytest_collection_modifyitems([slow, own, plain])
    assert [m.args for m in slow.added] == [(SLOW_TIMEOUT,)] and own.added == [] and plain.added == []


@pytest.mark.slow  # ~12 s: runs pytest twice (the default run checks only pytest.ini's limit, above)
def test_a_test_over_the_limit_fails_and_a_slow_one_gets_the_longer_limit(tmp_path):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")  # the hook under test
    (tmp_path / "test_sleepers.py").write_text(SLEEPERS)
    # -o timeout=1 stands in for pytest.ini's 300 s
    rc, out = run_pytest(tmp_path, "-o", "timeout=1", "-m", "not slow")
    assert rc == 1 and "1 failed" in out and "Timeout (>1.0s)" in out, out
    rc, out = run_pytest(tmp_path, "-o", "timeout=1", "-m", "slow")
    assert rc == 1 and "1 failed, 1 passed" in out, out
    assert "test_slow_with_its_own_limit_sleeps" in out.split("short test summary")[-1], out
