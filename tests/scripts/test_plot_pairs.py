"""tools/plot_pairs.py: the picture of which pairs a band selects."""
import os
import sys
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from annotator.build_many import build_all
from annotator.pairs import BuildOptions, frame_path, load_similarity, pair_mask
from tests.annotator.clips import panning_clip, write_folder
from tests.helpers import ctrl_c_while_importing

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


def test_a_long_movies_rows_are_binned_so_no_pair_falls_between_the_pixels():
    """20000 frames with pairs at 50 scattered frames: one row per frame drew about 1 in 43 of
    them in a 460-pixel panel. Bins of 50 frames (400 rows): a bin is red where any of its
    frames has the pair, its similarity the NaN-mean of its frames' (NaN only where all are)."""
    rng = np.random.default_rng(0)
    sim = rng.uniform(0.5, 0.9, (20000, 5))
    sim[:, 2] = 1.0
    rows = np.sort(rng.choice(20000, 50, replace=False))
    sim[rows, 4] = 0.95  # a pair 2 ahead (its partner's entry at offset -2 left out: only offset +2 is red)
    sim[:50, 0] = np.nan  # a whole bin outside the movie at offset -2
    sim[50, 0] = np.nan  # one NaN of the next bin: its mean is the other 49's
    fig = P.band_figure(sim, 0.94, 0.97, 2, "t")
    try:
        image, overlay = fig.axes[0].images
        shown = ~overlay.get_array().mask
        assert shown.shape == (400, 5) and list(image.get_extent()) == [-2.5, 2.5, 19999.5, -0.5]
        assert set(np.flatnonzero(shown[:, 4])) == set(rows // 50) and not shown[:, :4].any()
        mean = image.get_array()
        assert mean.mask[0, 0] and not mean.mask[1, 0]
        assert mean[1, 0] == pytest.approx(np.mean(sim[51:100, 0]), rel=1e-12)
        assert mean[7, 3] == pytest.approx(np.mean(sim[350:400, 3]), rel=1e-12)
    finally:
        plt.close(fig)
    assert P.binned(np.arange(10.0)[:, None], 4, "mean").ravel().tolist() == [1.5, 5.5, 8.5]  # a short last bin
    fig = P.band_figure(sim[:19990], 0.94, 0.97, 2, "t")  # the last bin 40 frames: drawn 50 tall, cut at the end
    try:
        image = fig.axes[0].images[0]
        assert list(image.get_extent()) == [-2.5, 2.5, 19999.5, -0.5] and fig.axes[0].get_ylim() == (19989.5, -0.5)
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
    (["--low", "nan"], "band ends must be numbers (low=nan, high=0.97)"),  # was "band is empty: low=nan must be <"
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


def test_a_data_root_given_for_a_movie_names_one_of_its_movies(tmp_path, capsys):
    """README's DATA_ROOT/MOVIE given as DATA_ROOT only said "not a movie folder"."""
    build_all([write_folder(panning_clip(6, 32, 48), tmp_path / "src" / "pan")], tmp_path / "data",
              BuildOptions(size=32, window=2), progress=False)
    assert P.main([str(tmp_path / "data"), "--out", str(tmp_path / "b.png")]) == 2
    assert capsys.readouterr().err == (f"{P.PROG}: error: {tmp_path / 'data'}: not a movie folder finished by "
                                       f"build_pairs.py but a data root: give one of its movie folders, e.g. "
                                       f"{tmp_path / 'data' / 'pan'}\n")


def test_a_similarity_npy_cut_short_is_one_line_naming_it(tmp_path, capsys):
    src = write_folder(panning_clip(6, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=2), progress=False)
    sim = tmp_path / "data" / "pan" / "similarity.npy"
    sim.write_bytes(sim.read_bytes()[:-8])
    assert P.main([str(tmp_path / "data" / "pan"), "--out", str(tmp_path / "b.png")]) == 2
    assert capsys.readouterr().err == f"{P.PROG}: error: {sim}: not a whole similarity table (empty, cut short or " \
                                      f"not a .npy file); delete {sim.parent} and rebuild it with build_pairs.py\n"


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


def test_the_panels_draw_frames_down_offsets_across_and_the_band_as_given():
    fig = P.band_figure(table(), 0.94, 0.97, 2, "t")
    try:
        left, right, bar = fig.axes
        image, overlay = left.images
        assert image.get_extent() == [-2.5, 2.5, 5.5, -0.5]  # frame 0 at the top, offset 0 in the middle
        assert overlay.get_extent() == image.get_extent()
        assert image.get_cmap().get_bad() == pytest.approx(matplotlib.colors.to_rgba("#9ec5e8"))  # "blue"
        assert overlay.get_cmap()(0) == matplotlib.colors.to_rgba("red") and bar.get_ylabel() == "similarity"
        span, = [p for p in right.patches if p.get_label() == "band 0.94 < sim < 0.97"]
        assert (span.get_x(), span.get_x() + span.get_width()) == pytest.approx((0.94, 0.97))
        assert [t.get_text() for t in right.get_legend().get_texts()] == ["band 0.94 < sim < 0.97"]
        bins = right.containers[0]
        assert len(bins) == 80 and bins[0].get_x() == pytest.approx(0.5)  # from the lowest similarity shown to 1
    finally:
        plt.close(fig)


@pytest.mark.parametrize("low, min_gap, floor, title", [
    (0.3, 2, 0.3, "offsets >= 2: 4 pairs, 6 of 6 frames have a partner"),  # a band below every similarity shown
    (0.94, 3, 0.94, "offsets >= 3: 0 pairs, 0 of 6 frames have a partner"),  # no offset that far: the band's low end
])
def test_the_scale_starts_at_the_bands_low_end_when_it_lies_lower(low, min_gap, floor, title):
    fig = P.band_figure(table(), low, 0.97, min_gap, "t")
    try:
        assert fig.axes[0].images[0].get_clim() == (floor, 1.0) and fig.axes[1].get_title() == title
    finally:
        plt.close(fig)


def test_an_open_band_is_drawn_to_the_panels_edges():
    """--low -inf / --high inf (no bound; pair_mask takes them) made the scale and the histogram
    start at -inf: matplotlib's "invalid value" warning and a picture without bins."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = P.band_figure(table(), -np.inf, np.inf, 2, "t")
        fig.canvas.draw()
    try:
        left, right, _ = fig.axes
        assert left.images[0].get_clim() == (0.5, 1.0)  # from the lowest similarity shown
        span, = [p for p in right.patches if p.get_label() == "band -inf < sim < inf"]
        assert (span.get_x(), span.get_x() + span.get_width()) == pytest.approx((0.5, 1.0))
        assert right.get_title() == "offsets >= 2: 4 pairs, 6 of 6 frames have a partner"
    finally:
        plt.close(fig)


def test_the_cli_draws_the_movie_with_its_band_and_title_and_closes_the_figure(tmp_path, monkeypatch):
    import struct

    src = write_folder(panning_clip(8, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=3, metric="ncc"), progress=False)
    drawn, band_figure = [], P.band_figure
    monkeypatch.setattr(P, "band_figure", lambda *a: drawn.append(a) or band_figure(*a))
    out = tmp_path / "band.png"
    (tmp_path / "old.png").write_bytes(b"old")
    os.link(tmp_path / "old.png", out)  # replaced, not written into
    assert P.main([str(tmp_path / "data" / "pan"), "--low", "0.5", "--high", "0.99", "--min-gap", "2",
                   "--out", str(out)]) == 0
    (sim, low, high, min_gap, title), = drawn
    np.testing.assert_array_equal(sim, load_similarity(tmp_path / "data" / "pan"))
    assert (low, high, min_gap, title) == (0.5, 0.99, 2, "pan: 8 frames, ncc of the gray frames")
    assert struct.unpack(">II", out.read_bytes()[16:24]) == (1100, 460)  # 11 x 4.6 inches at 100 dpi
    assert (tmp_path / "old.png").read_bytes() == b"old" and plt.get_fignums() == []


def test_characters_the_font_lacks_are_escaped_in_the_title_without_a_warning(tmp_path, monkeypatch, capsys):
    """DejaVu Sans (matplotlib's own) has 'é' but no CJK: boxes in the picture and a warning line per glyph."""
    src = write_folder(panning_clip(6, 32, 48), tmp_path / "src" / "Amélie_東京")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=2), progress=False)
    titles, band_figure = [], P.band_figure
    monkeypatch.setattr(P, "band_figure", lambda *a: titles.append(a[-1]) or band_figure(*a))
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.main([str(tmp_path / "data" / "Amélie_東京"), "--out", str(tmp_path / "b.png")]) == 0
    assert titles == ["Amélie_\\u6771\\u4eac: 6 frames, ssim of the gray frames"]
    assert capsys.readouterr().err == ""


def test_the_defaults_are_the_datasets_band_and_pairs_png():
    from annotator.pairs import DEFAULT_HIGH, DEFAULT_LOW, DEFAULT_MIN_GAP

    ns = P.parser().parse_args(["m"])
    assert (ns.low, ns.high, ns.min_gap, ns.out) == (DEFAULT_LOW, DEFAULT_HIGH, DEFAULT_MIN_GAP, Path("pairs.png"))


def test_a_bad_band_is_named_before_the_out(tmp_path, capsys):
    src = write_folder(panning_clip(6, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=2), progress=False)
    assert P.main([str(tmp_path / "data" / "pan"), "--low", "0.9", "--high", "0.8",
                   "--out", str(tmp_path / "missing" / "b.png")]) == 2
    assert "band is empty: low=0.9 must be < high=0.8" in capsys.readouterr().err


def test_ctrl_c_while_the_libraries_load_is_one_line():
    """Seconds of imports (matplotlib among them) before run_cli takes over: Ctrl-C there was a
    KeyboardInterrupt traceback out of the import."""
    done = ctrl_c_while_importing("matplotlib", ["tools/plot_pairs.py", "x"])
    assert (done.returncode, done.stderr) == (130, "tools/plot_pairs.py: interrupted\n")



def test_an_out_in_the_movies_frames_folder_is_refused_and_the_frame_kept(tmp_path, capsys):
    """--out data/pan/frames/000001.jpg replaced a training frame with the plot; a picture beside
    the frames folder, in the movie folder, is fine."""
    src = write_folder(panning_clip(6, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=2), progress=False)
    movie = tmp_path / "data" / "pan"
    frame = frame_path(movie, 1)
    before = frame.read_bytes()
    for out in (frame, movie / "frames" / "band.png", movie / "x" / ".." / "frames" / "new.png"):
        (movie / "x").mkdir(exist_ok=True)
        assert P.main([str(movie), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"{P.PROG}: error: --out {out} is in the frames folder of {movie}; write " \
                                          "the picture elsewhere\n"
    assert frame.read_bytes() == before and not (movie / "frames" / "band.png").exists()
    assert P.main([str(movie), "--out", str(movie / "band.png")]) == 0


def test_an_out_in_a_folder_inside_the_frames_folder_is_refused_too(tmp_path, capsys):
    """Anywhere under frames/, not only right in it (kills `in parents` -> `== parent`)."""
    src = write_folder(panning_clip(6, 32, 48), tmp_path / "src" / "pan")
    build_all([src], tmp_path / "data", BuildOptions(size=32, window=2), progress=False)
    movie = tmp_path / "data" / "pan"
    (movie / "frames" / "sub").mkdir()
    out = movie / "frames" / "sub" / "band.png"
    assert P.main([str(movie), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"{P.PROG}: error: --out {out} is in the frames folder of {movie}; write " \
                                      "the picture elsewhere\n"
    assert not out.exists()
