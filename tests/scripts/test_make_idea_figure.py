"""tools/make_idea_figure.py: docs/figures/idea.png from two frames of the sample clip."""
import os
import sys
from pathlib import Path

import cv2
import pytest

from tests.helpers import ctrl_c_while_importing

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import make_idea_figure as F  # noqa: E402


def test_the_picture_replaces_the_old_one_by_a_rename(tmp_path, capsys):
    """Written whole beside it and renamed, as the other figure tools do: the old file is never
    written into, so a run that fails or is stopped half-way leaves it as it was."""
    out = tmp_path / "figures" / "idea.png"
    out.parent.mkdir()
    out.write_bytes(b"the old picture")
    os.link(out, tmp_path / "old.png")  # the old file itself, whatever becomes of the name
    F.draw(out)
    assert (tmp_path / "old.png").read_bytes() == b"the old picture"
    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] > 1000 and img.std() > 10  # a whole picture, not a blank
    assert os.listdir(out.parent) == ["idea.png"]  # no temporary file left
    assert capsys.readouterr().out == f"wrote {out}\n"


def test_the_command_line_takes_help_and_out_and_refuses_the_rest(tmp_path, capsys, monkeypatch):
    """Every argument was ignored: `--help` redrew the tracked docs/figures/idea.png."""
    drawn = []
    monkeypatch.setattr(F, "draw", drawn.append)
    with pytest.raises(SystemExit) as e:
        F.main(["--help"])
    assert e.value.code == 0 and "--out OUT" in capsys.readouterr().out and drawn == []
    with pytest.raises(SystemExit) as e:
        F.main(["--ot", "x.png"])
    assert e.value.code == 2 and "unrecognized arguments: --ot" in capsys.readouterr().err and drawn == []
    assert F.main(["--out", str(tmp_path)]) == 2 and drawn == []
    assert capsys.readouterr().err == f"{F.PROG}: error: --out {tmp_path} is a folder\n"
    assert F.main(["--out", str(tmp_path / "idea.png")]) == 0 and drawn == [tmp_path / "idea.png"]
    monkeypatch.setattr(F, "draw_modes", lambda out: drawn.append(("modes", out)))
    assert F.main(["--figure", "modes"]) == 0 and drawn[-1] == ("modes", REPO / "docs" / "figures" / "modes.png")
    assert F.main(["--figure", "idea"]) == 0 and drawn[-1] == REPO / "docs" / "figures" / "idea.png"


def test_the_modes_diagram_is_written_whole(tmp_path, capsys):
    out = tmp_path / "modes.png"
    F.draw_modes(out)
    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] > 900 and img.std() > 10 and os.listdir(tmp_path) == ["modes.png"]
    assert capsys.readouterr().out == f"wrote {out}\n"


def test_ctrl_c_while_matplotlib_loads_is_one_line():
    done = ctrl_c_while_importing("matplotlib", ["tools/make_idea_figure.py"])
    assert (done.returncode, done.stderr) == (130, "tools/make_idea_figure.py: interrupted\n")
