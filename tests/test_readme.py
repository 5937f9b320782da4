"""The docs agree with what they describe: CI runs the README's commands verbatim, and the defaults,
options and file maps the docs quote are the code's."""
import re
from itertools import takewhile
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


def table_rows(text: str, header: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with `header`, separator skipped."""
    lines = text.split(header, 1)[1].splitlines()[2:]
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in takewhile(lambda line: line.startswith("|"), lines)]


def test_training_flag_table_gives_the_defaults_the_default_config_gives():
    """docs/TRAINING.md's table of the most used flags quotes the defaults that
    models/cldm_v21_color.yaml (or, for flags without a config key, the parser) gives them;
    'dataset's' means the config leaves the pair band to the dataset (null)."""
    from omegaconf import OmegaConf

    import tutorial_train_sd21_color_v2 as train
    from cldm.train_config import FLAG_KEYS

    cfg = OmegaConf.load(REPO / "models" / "cldm_v21_color.yaml")
    actions = {a.option_strings[0]: a for a in train.parser()._actions if a.option_strings}
    words = {"on": True, "off": False, "locked": True, "dataset's": None}
    rows = table_rows((REPO / "docs" / "TRAINING.md").read_text(), "| flag | default |")
    assert len(rows) >= 10
    checked = 0
    for flag_cell, default_cell, _ in rows:
        flags = [f.replace("--no-", "--") for f in re.findall(r"--[a-z0-9-]+", flag_cell)]
        flags = list(dict.fromkeys(flags))  # --grad-checkpoint / --no-grad-checkpoint: one setting
        quoted = [v.strip() for v in default_cell.split("/")]
        quoted = quoted * len(flags) if len(quoted) == 1 else quoted  # one default for a group
        assert len(quoted) == len(flags), flag_cell
        for flag, doc in zip(flags, quoted):
            dest = actions[flag].dest
            actual = OmegaConf.select(cfg, FLAG_KEYS[dest]) if dest in FLAG_KEYS else actions[flag].default
            expected = words[doc] if doc in words else type(actual)(doc) if actual is not None else doc
            assert actual == expected, f"docs/TRAINING.md: {flag} default {doc!r}, but it is {actual!r}"
            checked += 1
    assert checked >= 12


def test_inference_library_options_list_is_options_fields():
    """docs/INFERENCE.md lists the `Options` that colorize() takes as keywords besides `batch`."""
    import dataclasses

    from colorize.pipeline import Options

    text = (REPO / "docs" / "INFERENCE.md").read_text()
    listed = re.search(r"`Options`: ([a-z_, \n]+)\.", text).group(1)
    assert [w.strip() for w in listed.split(",")] == [f.name for f in dataclasses.fields(Options)
                                                      if f.name != "batch"]


def test_layouts_name_every_module():
    """README's repository layout names every top-level script, and docs/ARCHITECTURE.md's file
    map names every module of ldm/, cldm/ and annotator/, and nothing that is not there."""
    readme = (REPO / "README.md").read_text().split("## Repository layout", 1)[1].split("## ", 1)[0]
    for script in sorted(REPO.glob("*.py")):
        if script.name != "conftest.py":
            assert script.name in readme, f"README.md's layout leaves out {script.name}"
    arch = (REPO / "docs" / "ARCHITECTURE.md").read_text().split("```", 2)[1]
    listed = set(re.findall(r"^([\w/]+\.(?:py|yaml)|[\w]+/)\s", arch, re.M))
    for path in listed:
        assert (REPO / path).exists(), f"docs/ARCHITECTURE.md names {path}, which does not exist"
    for package in ("ldm", "cldm", "annotator"):
        for module in sorted((REPO / package).rglob("*.py")):
            rel = module.relative_to(REPO).as_posix()
            if module.name != "__init__.py":
                assert rel in listed, f"docs/ARCHITECTURE.md's file map leaves out {rel}"
