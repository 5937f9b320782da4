"""tools/plot_pairs.py: the picture of which pairs a band selects."""
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from annotator.build_many import build_all
from annotator.pairs import BuildOptions, pair_mask
from tests.annotator.clips import panning_clip, write_folder

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import plot_pairs as P  # noqa: E402


def table() -> np.ndarray:
    """6 frames, window 2: [i, 2 + d] = sim(i, i + d), NaN outside the movie, symmetric."""
    s = {1: [0.99, 0.95, 0.90, 0.96, 0.98], 2: [0.95, 0.50, 0.955, 0.80]}  # sim(i, i+d) for d = 1, 2
    sim = np.full((6, 5), np.nan)
    sim[:, 2] = 1.0
    for d, values in s.items():
        for i, v in enumerate(values):
            sim[i, 2 + d] = sim[i + d, 2 - d] = v
    return sim


def test_the_panels_show_the_band_of_pair_mask_and_count_pairs_and_frames():
    sim = table()
    fig = P.band_figure(sim, 0.94, 0.97, 2, "t")
    try:
        left, right = fig.axes[:2]  # then the colour bar
        image, overlay = left.images
        # pairs at d = 2 in the band: (0, 2) 0.95 and (2, 4) 0.955; at d = 1 not (gap 2)
        assert right.get_title() == "offsets >= 2: 2 pairs, 3 of 6 frames have a partner"
        np.testing.assert_array_equal(~overlay.get_array().mask, pair_mask(sim, 0.94, 0.97, 2))
        np.testing.assert_array_equal(image.get_array().mask, np.isnan(sim))
        assert sum(bar.get_height() for bar in right.containers[0]) == 8  # 4 at |d| = 2, each stored twice
        assert image.get_clim() == (0.5, 1.0)  # from the lowest similarity shown
        assert fig._suptitle.get_text() == "t"
    finally:
        plt.close(fig)


def test_cli_writes_the_png_of_a_built_movie(tmp_path, capsys):
    src = write_folder(panning_clip(8, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=3), progress=False)
    out = tmp_path / "band.png"
    assert P.main([str(tmp_path / "data" / "pan"), "--low", "0.5", "--high", "0.99", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["band.png", "data", "src"]  # no temporary file left


def test_the_picture_is_in_the_format_of_its_extension(tmp_path, capsys):
    src = write_folder(panning_clip(8, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=3), progress=False)
    for name, magic in [("band.jpg", b"\xff\xd8\xff"), ("band.JPEG", b"\xff\xd8\xff"), ("band.pdf", b"%PDF"),
                        ("band", b"\x89PNG")]:
        assert P.main([str(tmp_path / "data" / "pan"), "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes()[:len(magic)] == magic, name
    assert P.main([str(tmp_path / "data" / "pan"), "--out", str(tmp_path / "band.docx")]) == 2
    assert capsys.readouterr().err.startswith(f"{P.PROG}: error: --out {tmp_path}/band.docx: cannot draw .docx "
                                              "pictures; use one of ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["band", "band.JPEG", "band.jpg", "band.pdf", "data", "src"]


@pytest.mark.parametrize("args, says", [
    (["--low", "0.9", "--high", "0.8"], "band is empty: low=0.9 must be < high=0.8"),
    (["--min-gap", "0"], "argument --min-gap: expected an integer >= 1"),
])
def test_a_bad_band_is_one_line(tmp_path, capsys, args, says):
    src = write_folder(panning_clip(6, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=2), progress=False)
    try:
        status = P.main([str(tmp_path / "data" / "pan"), *args, "--out", str(tmp_path / "b.png")])
    except SystemExit as e:  # argparse's own check
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and not (tmp_path / "b.png").exists()


def test_a_folder_that_is_no_built_movie_is_one_line(tmp_path, capsys):
    assert P.main([str(tmp_path), "--out", str(tmp_path / "b.png")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"{P.PROG}: error: {tmp_path}: not a movie folder finished by build_pairs.py"


@pytest.mark.parametrize("out, says", [
    ("band", "--out {tmp}/band is a folder"),
    ("missing/b.png", "--out {tmp}/missing/b.png: there is no folder {tmp}/missing"),
])
def test_an_unusable_out_is_named_as_given(tmp_path, capsys, out, says):
    """Not the temporary file beside it ("[Errno 21] Is a directory: '.band.1a2b3c4d.tmp' -> 'band'")."""
    src = write_folder(panning_clip(6, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=2), progress=False)
    (tmp_path / "band").mkdir()
    assert P.main([str(tmp_path / "data" / "pan"), "--out", str(tmp_path / out)]) == 2
    assert capsys.readouterr().err.strip() == f"{P.PROG}: error: " + says.format(tmp=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["band", "data", "src"]
