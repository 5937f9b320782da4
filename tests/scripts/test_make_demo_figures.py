"""tools/make_demo_figures.py: README's demo pictures from a demo.py output folder."""
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import ctrl_c_while_importing

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import make_demo_figures as F  # noqa: E402


def fake_demo_out(root: Path, frames=(100, 101, 102, 103)) -> Path:
    """What demo.py leaves: data/{colour,gray,reference.png} and one folder per method."""
    y, x = np.mgrid[0:24, 0:40]
    colour = {i: np.stack([4 * x + i, 8 * y, 255 - 5 * x], -1).clip(0, 255).astype(np.uint8) for i in frames}
    folders = {"data/colour": lambda c: c, "data/gray": lambda c: np.repeat(c.mean(-1, keepdims=True), 3, -1),
               **{m: lambda c, k=k: np.clip(c.astype(int) + 3 * k, 0, 255) for k, m in enumerate(F.METHODS)}}
    for folder, make in folders.items():
        (root / folder).mkdir(parents=True)
        for i, c in colour.items():
            cv2.imwrite(str(root / folder / f"frame_{i:04d}.png"), make(c).astype(np.uint8))
    cv2.imwrite(str(root / "data" / "reference.png"), colour[frames[0]])
    return root


def test_writes_the_strip_scaled_to_the_width_and_the_psnr_plot(tmp_path, capsys):
    out = fake_demo_out(tmp_path / "demo_out")
    F.make(out, tmp_path / "full", width=100_000)  # wider than the strip: kept as evaluate.py drew it
    full = cv2.imread(str(tmp_path / "full" / "demo_strip.jpg"))
    assert F.main([str(out), "--figures", str(tmp_path / "fig"), "--width", "300"]) == 0
    strip = cv2.imread(str(tmp_path / "fig" / "demo_strip.jpg"))
    assert 300 < full.shape[1] < 100_000 and strip.shape[1] == 300
    assert strip.shape[0] == round(full.shape[0] * 300 / full.shape[1])  # the aspect kept
    assert np.abs(cv2.resize(full, (300, strip.shape[0]), interpolation=cv2.INTER_AREA).astype(int)
                  - strip).mean() < 8  # the same picture up to JPEG, whose ringing at the tiny captions is most of it
    plot = (tmp_path / "fig" / "demo_psnr.png").read_bytes()
    assert plot[:8] == b"\x89PNG\r\n\x1a\n" and plot == (tmp_path / "full" / "demo_psnr.png").read_bytes()
    said = capsys.readouterr().out.splitlines()
    assert said[-2:] == [f"wrote {tmp_path / 'fig' / name}" for name in ("demo_strip.jpg", "demo_psnr.png")]
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["demo_psnr.png", "demo_strip.jpg"]


def test_a_temporary_frame_left_by_a_killed_demo_is_not_taken_for_the_reference(tmp_path, capsys):
    """The reference frame (left out of the scores) was the smallest name in data/colour: a killed
    demo's .frame_0100.<token>.tmp.png sorted first, and evaluate.py refused to exclude it (an
    audit found it; demo.py --overwrite leaves such files alone)."""
    out = fake_demo_out(tmp_path / "demo_out")
    (out / "data" / "colour" / ".frame_0100.1a2b3c4d.tmp.png").write_bytes(b"half a PNG")
    assert F.main([str(out), "--figures", str(tmp_path / "fig")]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == sorted(F.FIGURES)


def test_a_width_that_rounds_the_height_to_zero_keeps_one_row(tmp_path):
    """--width 1 of a strip wider than high: OpenCV's resize to a height of 0 was a traceback."""
    out = fake_demo_out(tmp_path / "demo_out")
    assert F.main([str(out), "--figures", str(tmp_path / "fig"), "--width", "1"]) == 0
    assert cv2.imread(str(tmp_path / "fig" / "demo_strip.jpg")).shape[:2] == (1, 1)


@pytest.mark.parametrize("remove", ["data/reference.png", "anchored"])
def test_an_unfinished_demo_is_one_line(tmp_path, capsys, remove):
    out = fake_demo_out(tmp_path / "demo_out")
    target = out / remove
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    assert F.main([str(out), "--figures", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{F.PROG}: error: {out}: not a finished demo.py run ({target} is missing)"
    assert not (tmp_path / "fig").exists()


def test_outputs_evaluate_refuses_are_its_one_line_and_nothing_written(tmp_path, capsys):
    out = fake_demo_out(tmp_path / "demo_out")
    cv2.imwrite(str(out / "flow" / "frame_0102.png"), np.zeros((12, 20, 3), np.uint8))  # not the frames' size
    assert F.main([str(out), "--figures", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error:") and "frame_0102" in err[0]
    assert not (tmp_path / "fig").exists()


def test_ctrl_c_while_the_libraries_load_is_one_line():
    """Seconds of imports (cv2 among them) before run_cli takes over: Ctrl-C there was a
    KeyboardInterrupt traceback out of the import."""
    done = ctrl_c_while_importing("cv2", ["tools/make_demo_figures.py", "x"])
    assert (done.returncode, done.stderr) == (130, "tools/make_demo_figures.py: interrupted\n")


def test_figures_that_cannot_be_written_are_refused_before_the_scoring(tmp_path, capsys, monkeypatch):
    """A file at --figures or above it, or a folder at a picture's name: one line naming --figures
    before evaluate.py runs twice (was a raw errno after it, or one naming a temporary file)."""
    out = fake_demo_out(tmp_path / "demo_out")
    monkeypatch.setattr(F, "_evaluate", lambda *a: pytest.fail("scored"))
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "fig" / "demo_strip.jpg").mkdir(parents=True)
    for figures, said in [(tmp_path / "file", f"{tmp_path / 'file'} is a file, not a folder"),
                          (tmp_path / "file" / "sub", f"{tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, "
                                                      "not a folder"),
                          (tmp_path / "fig", f"{tmp_path / 'fig' / 'demo_strip.jpg'} is a folder")]:
        assert F.main([str(out), "--figures", str(figures)]) == 2
        assert capsys.readouterr().err == f"{F.PROG}: error: --figures {said}\n"
    assert (tmp_path / "file").read_bytes() == b"x" and os.listdir(tmp_path / "fig") == ["demo_strip.jpg"]


def test_a_folder_at_the_second_pictures_name_is_refused_before_the_scoring(tmp_path, capsys, monkeypatch):
    """demo_psnr.png is checked up front as demo_strip.jpg is (kills checking FIGURES[:1] only)."""
    out = fake_demo_out(tmp_path / "demo_out")
    monkeypatch.setattr(F, "_evaluate", lambda *a: pytest.fail("scored"))
    (tmp_path / "fig" / "demo_psnr.png").mkdir(parents=True)
    assert F.main([str(out), "--figures", str(tmp_path / "fig")]) == 2
    assert capsys.readouterr().err == f"{F.PROG}: error: --figures {tmp_path / 'fig' / 'demo_psnr.png'} is a folder\n"
    assert os.listdir(tmp_path / "fig") == ["demo_psnr.png"]


@pytest.mark.parametrize("argv, flag", [(["", "--figures", "F"], "DEMO_OUT"), (["D", "--figures", ""], "--figures")])
def test_an_empty_path_is_refused_naming_it(tmp_path, capsys, argv, flag):
    """Was the current folder: an empty --figures wrote the pictures wherever the shell stood."""
    out = fake_demo_out(tmp_path / "demo_out")
    with pytest.raises(SystemExit) as e:
        F.main([{"D": str(out), "F": str(tmp_path / "fig")}.get(a, a) for a in argv])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"{F.PROG}: error: argument {flag}: empty path (see --help)\n"
