"""README.md and .ci/run agree: CI runs the README's commands verbatim."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUP = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"


def fenced_commands(text: str) -> list[str]:
    """Single-line commands of ```bash blocks."""
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
            if line and not line.startswith("#")]


def test_ci_runs_the_readme_commands_verbatim():
    readme = fenced_commands((REPO / "README.md").read_text())
    demo, tests = f"{SETUP} && .venv/bin/python demo.py", f"{SETUP} && .venv/bin/python -m pytest -q"
    assert demo in readme and tests in readme
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert any(line.startswith(tests + " ") for line in ci)  # followed by its exit-status handling
    assert demo in ci
    # the "## Tests" section's command is the test command's own last part
    section = (REPO / "README.md").read_text().split("## Tests", 1)[1]
    assert fenced_commands(section)[0] == ".venv/bin/python -m pytest -q"
