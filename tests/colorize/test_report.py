"""Report files: numbers that round-trip, pictures of the expected size."""
import builtins
import csv
import errno
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from colorize.metrics import PSNR_CAP_DB, MethodMetrics
from colorize.report import (
    REPORT_FILES, TILE_HEIGHT, Strip, binned_series, frame_numbers, line_with_gaps, over_time_figure, strip_indices,
    write_report,
)


def results():
    nan = float("nan")
    return {
        "a": MethodMetrics({"psnr": np.array([PSNR_CAP_DB, 30.0, 28.0]), "ssim": np.array([1.0, 0.9, 0.8]),
                            "colourfulness": np.array([10.0, 20.0, 30.0]),
                            "warp_error": np.array([nan, 1.0, 3.0])}, cdc=0.002),
        "b": MethodMetrics({"psnr": np.array([20.0, 21.0, 22.0]), "ssim": np.array([0.5, 0.6, 0.7]),
                            "colourfulness": np.array([1.0, 2.0, 3.0]),
                            "warp_error": np.array([nan, 0.5, 0.5])}, cdc=0.001),
    }


def test_strip_indices():
    assert strip_indices(132, 3) == [0, 66, 131]
    assert strip_indices(2, 3) == [0, 1]
    assert strip_indices(0, 3) == [] and strip_indices(5, 0) == []


def test_line_with_gaps_breaks_at_left_out_frames():
    x, y = line_with_gaps([0, 1, 4, 5, 9], np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert x.tolist() == [0, 1, 2, 4, 5, 6, 9]
    assert np.array_equal(y, [1, 2, np.nan, 3, 4, np.nan, 5], equal_nan=True)
    x, y = line_with_gaps([0, 1, 3], np.array([1.0, 2.0, 3.0]))  # one frame left out is a gap too
    assert x.tolist() == [0, 1, 2, 3] and np.array_equal(y, [1, 2, np.nan, 3], equal_nan=True)
    x, y = line_with_gaps([3, 4, 5], np.array([1.0, 2.0, 3.0]))  # no gap: unchanged
    assert x.tolist() == [3, 4, 5] and y.tolist() == [1, 2, 3]


def test_plots_put_frames_at_their_numbers_on_whole_number_ticks():
    """demo.py's report: frames 101-103 of a clip whose frame 100 was left out (position 0)."""
    import matplotlib.pyplot as plt

    frames = ["frame_0101", "frame_0102", "frame_0103"]
    fig = over_time_figure(results(), "psnr", frames, "PSNR (dB)", "t", positions=[1, 2, 3])
    ax = fig.axes[0]
    assert ax.lines[0].get_xdata().tolist() == [101, 102, 103]  # b's line (a's first frame is at the cap)
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(t == int(t) for t in ticks), ticks  # not 101.5
    assert ax.get_xlabel() == "frame number (frame_0101 \u2026 frame_0103)"
    plt.close(fig)


def test_a_long_clips_plot_draws_bins_of_frames_with_their_range():
    """20000 frames (a whole film is 150k): one point per frame packed 17 to a pixel column.
    Bins of 20 frames: the line is each bin's mean, the shade its min to max; a bin of capped
    frames only is a break; the legend says what a point is. The means in the legend are the
    frames' own."""
    import matplotlib.pyplot as plt

    n = 20000
    rng = np.random.default_rng(0)
    psnr = rng.uniform(20, 30, n)
    psnr[40:60] = PSNR_CAP_DB  # bin 2 whole at the cap
    res = {"m": MethodMetrics({"psnr": psnr, "ssim": np.ones(n), "colourfulness": np.ones(n),
                               "warp_error": np.ones(n)}, cdc=0.0)}
    fig = over_time_figure(res, "psnr", [f"x{i}" for i in range(n)], "PSNR (dB)", "t")
    try:
        ax = fig.axes[0]
        line = ax.lines[0]
        y = line.get_ydata()
        assert len(y) == 1000 and np.isnan(y[2])
        assert line.get_xdata()[1] == pytest.approx(29.5) and y[1] == pytest.approx(psnr[20:40].mean(), rel=1e-12)
        shade = np.concatenate([path.vertices for path in ax.collections[0].get_paths()])  # broken at bin 2
        assert shade[:, 1].min() == pytest.approx(psnr[psnr < PSNR_CAP_DB].min())
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            f"m (mean {psnr.mean():.3g})", "identical to the ground truth (100 dB)",
            "each point the mean of 20 frames,\nshaded from their lowest to highest"]
    finally:
        plt.close(fig)


def test_bins_follow_the_frame_positions_and_break_at_gaps():
    """Frames 0-1499 and 3000-4499 in bins of 3: no bin mixes the two sides or lands in the gap,
    and the line breaks there (bins cut by list index bridged it with a point at x = 2500)."""
    pos = np.r_[0:1500, 3000:4500]
    y = np.arange(3000.0)
    x, mean, low, high = binned_series(pos, y, 3)
    assert len(x) == 1001 and np.isnan(x[500]) and np.isnan(mean[500])
    assert x[499] == 1498 and mean[499] == 1498 and (low[499], high[499]) == (1497, 1499)
    assert x[501] == 3001 and mean[501] == 1501
    assert not ((x > 1499) & (x < 3000)).any()
    _, mean, low, _ = binned_series(np.arange(7), np.array([np.nan] * 3 + [1, 2, np.nan, 5.0]), 3)
    assert np.isnan(mean[0]) and mean[1:].tolist() == [1.5, 5.0] and low[1] == 1  # a short last bin


def test_frame_numbers_come_from_names_that_count_like_the_positions():
    def numbers(*args):
        x, numbered = frame_numbers(*args)
        return x.tolist(), numbered

    assert numbers(["frame_0101", "frame_0103"], [1, 3]) == ([101, 103], True)
    assert numbers(["a", "b"], [4, 5]) == ([4, 5], False)  # no numbers: positions
    assert numbers(["x10", "x20"], [0, 1]) == ([0, 1], False)  # every 10th frame: not frame numbers
    assert numbers(["f7", "g"]) == ([0, 1], False)


def test_write_report_positions_checked(tmp_path):
    write_report(results(), tmp_path / "ok", frames=["f0", "f2", "f3"], positions=[0, 2, 3])
    for bad in ([0, 1], [0, 2, 2]):
        with pytest.raises(ValueError, match="3 increasing frame indices"):
            write_report(results(), tmp_path / "bad", frames=["f0", "f2", "f3"], positions=bad)


def test_write_report_numbers(tmp_path):
    paths = write_report(results(), tmp_path / "rep", frames=["f0", "f1", "f2"],
                         ground_truth={"colourfulness": 25.0, "warp_error": 0.9, "cdc": 0.0015})
    doc = json.loads(paths["json"].read_text())
    assert doc["frames"] == ["f0", "f1", "f2"]
    a = doc["methods"]["a"]
    assert a["per_frame"]["warp_error"] == [None, 1.0, 3.0]  # NaN -> null, strict JSON
    assert a["mean"] == {"psnr": (PSNR_CAP_DB + 58) / 3, "ssim": 0.9, "colourfulness": 20.0,
                         "warp_error": 2.0, "cdc": 0.002}
    assert doc["ground_truth"]["cdc"] == 0.0015 and "psnr" in doc["definitions"]
    assert doc["excluded_frames"] == []
    assert "L1" in doc["definitions"]["warp_error"] and "Lai et al. 2018" in doc["definitions"]["warp_error"]
    assert "nats" in doc["definitions"]["cdc"] and "1.4427" in doc["definitions"]["cdc"]
    assert 1 / math.log(2) == pytest.approx(1.4427, abs=5e-5)  # the factor the definition states
    doc = json.loads(write_report(results(), tmp_path / "rep2", frames=["f0", "f1", "f2"],
                                  excluded=["f9"])["json"].read_text())
    assert doc["excluded_frames"] == ["f9"]
    rows = list(csv.DictReader(paths["per_frame_csv"].open()))
    assert len(rows) == 6 and rows[0] == {"method": "a", "frame": "f0", "psnr": "100", "ssim": "1",
                                          "colourfulness": "10", "warp_error": ""}
    summary = {r["method"]: r for r in csv.DictReader(paths["summary_csv"].open())}
    assert float(summary["b"]["psnr"]) == 21.0 and float(summary["b"]["cdc"]) == 0.001
    assert summary["ground_truth"]["psnr"] == "" and float(summary["ground_truth"]["warp_error"]) == 0.9
    for key in ("psnr_plot", "warp_plot"):
        img = cv2.imread(str(paths[key]))
        assert img is not None and img.shape[1] >= 1000
    assert "strip" not in paths
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.startswith(".")]  # no temp files


@pytest.fixture
def figure_texts(monkeypatch) -> list[str]:
    """Every text the report's figures write (captions, row labels), in order."""
    import matplotlib.figure

    texts = []
    real = matplotlib.figure.Figure.text
    monkeypatch.setattr(matplotlib.figure.Figure, "text", lambda self, x, y, s, **kw: texts.append(s) or real(
        self, x, y, s, **kw))
    return texts


def test_strip_captions_give_each_rows_frame_scores(tmp_path, figure_texts):
    """Rows show frames 0 and 2: their captions carry those frames' PSNR and SSIM (not rows 0, 1)."""
    texts = figure_texts
    gt = [np.full((45, 80, 3), 100, np.uint8)] * 2
    strip = Strip([0, 2], [g[..., 0] for g in gt], gt, {"a": gt, "b": gt})
    write_report(results(), tmp_path, frames=["f0", "f1", "f2"], strip=strip)
    assert ["f0", "f2"] == [t for t in texts if t in ("f0", "f1", "f2")]
    assert "PSNR \u2265 100 dB (identical)" in texts  # a's frame 0 is at the PSNR cap
    assert [t for t in texts if "SSIM" in t] == [  # a: frame 2; b: frames 0 and 2
        "PSNR 28.00 dB  SSIM 0.800", "PSNR 20.00 dB  SSIM 0.500", "PSNR 22.00 dB  SSIM 0.700"]


def test_write_report_strip(tmp_path):
    rng = np.random.default_rng(0)
    gt = [rng.integers(0, 256, (45, 80, 3), dtype=np.uint8) for _ in range(2)]
    gray = [g.mean(-1).astype(np.uint8) for g in gt]
    strip = Strip([0, 2], gray, gt, {"a": gt, "b": [g // 2 for g in gt]}, reference=gt[0][:40, :40])
    paths = write_report(results(), tmp_path, frames=["f0", "f1", "f2"], strip=strip)
    img = cv2.imread(str(paths["strip"]))
    # 5 columns (gray, reference, a, b, ground truth) of 16:9 tiles; 2 rows plus a header.
    tile_w = round(TILE_HEIGHT * 80 / 45)
    assert img.shape[1] == 8 + 5 * (tile_w + 8)
    assert img.shape[0] == 34 + 2 * (TILE_HEIGHT + 26 + 8)


def disk_full_at(monkeypatch, name):
    """Make the disk fill when `name` (or a temporary file for it, .STEM.*) is written: the file
    is created, empty, and the write fails with ENOSPC, as on a real full disk."""
    real = builtins.open
    stem = Path(name).stem

    def fake_open(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        base = os.path.basename(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        if "w" in mode and (base == name or base.startswith(f".{stem}.")):
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_full_disk_leaves_no_half_report_and_keeps_an_earlier_one(tmp_path, monkeypatch):
    """A write failing with ENOSPC half-way through the report (the PSNR plot, after the JSON and
    CSVs): an OSError naming that file, no report file or temporary file left, a folder made for
    the report removed, and an earlier report in the folder byte for byte as it was."""
    gt = [np.full((45, 80, 3), 100, np.uint8)] * 2
    strip = Strip([0, 2], [g[..., 0] for g in gt], gt, {"a": gt, "b": gt})
    old = tmp_path / "old"
    write_report(results(), old, frames=["f0", "f1", "f2"], strip=strip)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    assert sorted(before) == sorted(REPORT_FILES.values())
    disk_full_at(monkeypatch, "psnr.png")
    for out in (tmp_path / "new" / "rep", old):
        with pytest.raises(OSError) as e:
            write_report(results(), out, frames=["g0", "g1", "g2"])
        assert str(e.value) == (f"{out / 'psnr.png'}: cannot write the report (No space left on device); "
                                "nothing of it was written")
        assert e.value.errno == errno.ENOSPC
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # the strip too: not this run's to drop


def test_a_folder_at_a_report_files_name_is_found_before_any_rename(tmp_path):
    """A folder at psnr.png: the JSON and both CSVs were renamed into place before its rename
    failed, under "nothing of it was written"."""
    out = tmp_path / "rep"
    write_report(results(), out, frames=["f0", "f1", "f2"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "psnr.png").unlink()
    (out / "psnr.png").mkdir()
    del before["psnr.png"]
    with pytest.raises(OSError) as e:
        write_report(results(), out, frames=["g0", "g1", "g2"])
    assert str(e.value) == f"{out / 'psnr.png'}: cannot write the report (Is a directory); nothing of it was written"
    assert e.value.errno == errno.EISDIR
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no temporary file either
    assert (out / "psnr.png").is_dir()


def test_a_link_to_a_folder_at_a_report_files_name_is_replaced_not_refused(tmp_path):
    """A rename replaces a symbolic link itself, whatever it points at: the link goes, the folder
    it pointed to is left alone."""
    out, elsewhere = tmp_path / "rep", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "psnr.png").symlink_to(elsewhere, target_is_directory=True)
    write_report(results(), out, frames=["f0", "f1", "f2"])
    assert not (out / "psnr.png").is_symlink() and (out / "psnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert elsewhere.is_dir() and list(elsewhere.iterdir()) == []


def test_a_rename_failing_after_others_removes_them_and_says_so(tmp_path, monkeypatch):
    """A rename no check foresees failing (EPERM: another user's file in a sticky folder) after two
    others: those two are removed again, not left as half a report, and the message says that the
    earlier report's files they replaced are gone."""
    old = tmp_path / "old"
    write_report(results(), old, frames=["f0", "f1", "f2"])
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    real, calls = os.replace, []

    def third_fails(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        real(src, dst)

    monkeypatch.setattr(os, "replace", third_fails)
    with pytest.raises(OSError) as e:
        write_report(results(), old, frames=["g0", "g1", "g2"])
    assert str(e.value) == (f"{old / 'summary.csv'}: cannot write the report (Operation not permitted); nothing of "
                            "it is left; the earlier report's metrics.json, per_frame.csv, which it had replaced, "
                            "are gone")
    del before["metrics.json"], before["per_frame.csv"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    calls.clear()
    with pytest.raises(OSError) as e:  # no earlier report: nothing is gone, and the folder made for it is removed
        write_report(results(), tmp_path / "new", frames=["g0", "g1", "g2"])
    assert str(e.value) == (f"{tmp_path / 'new' / 'summary.csv'}: cannot write the report (Operation not "
                            "permitted); nothing of it is left")
    assert not (tmp_path / "new").exists()


def test_ctrl_c_during_the_renames_comes_after_the_whole_report(tmp_path, monkeypatch):
    """A Ctrl-C between two renames left the earlier report partly replaced (or, by the clean-up,
    partly removed), and a stale strip beside a new report: the renames and the stale strip's
    removal now hold it, and it is raised once the new report is whole."""
    import signal

    out = tmp_path / "rep"
    gt = [np.full((9, 16, 3), 80, np.uint8)] * 2
    strip = Strip([0, 2], [g[..., 0] for g in gt], gt, {"a": gt, "b": gt})
    write_report(results(), out, frames=["f0", "f1", "f2"], strip=strip)
    assert (out / "strip.png").is_file()
    real, calls = os.replace, []

    def ctrl_c_at_the_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)

    monkeypatch.setattr(os, "replace", ctrl_c_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        write_report(results(), out, frames=["g0", "g1", "g2"])
    assert len(calls) == 5 and sorted(p.name for p in out.iterdir()) == \
        ["metrics.json", "per_frame.csv", "psnr.png", "summary.csv", "warp_error.png"]  # no strip, no temporary file
    assert json.loads((out / "metrics.json").read_text())["frames"] == ["g0", "g1", "g2"]


def test_an_earlier_strip_that_cannot_be_removed_leaves_the_new_report_whole(tmp_path, monkeypatch):
    """Its removal failing (a read-only file in a sticky folder, say) rolled the new report back,
    which had already replaced the earlier one: both were lost (a review found it)."""
    out = tmp_path / "rep"
    gt = [np.full((9, 16, 3), 80, np.uint8)] * 2
    write_report(results(), out, frames=["f0", "f1", "f2"], strip=Strip([0, 2], [g[..., 0] for g in gt], gt,
                                                                         {"a": gt, "b": gt}))
    real = Path.unlink

    def strip_refuses(self, missing_ok=False):
        if self.name == "strip.png":
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(self))
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", strip_refuses)
    write_report(results(), out, frames=["g0", "g1", "g2"])
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_frame.csv", "psnr.png", "strip.png",
                                                     "summary.csv", "warp_error.png"]
    assert json.loads((out / "metrics.json").read_text())["frames"] == ["g0", "g1", "g2"]


# Mutation round 10: the plots' capped PSNR handling, the strip's tiles and labels, JSON/CSV values,
# input checks, and a stale strip.
import matplotlib.pyplot as plt  # noqa: E402

from colorize import report as R  # noqa: E402


def test_strip_indices_of_no_or_a_negative_count_of_frames():
    assert strip_indices(-2, 3) == [] and strip_indices(3, 5) == [0, 1, 2]


def test_clean_makes_json_values():
    assert R._clean({"i": np.int64(3), "t": (np.float32(1.5), float("inf")), "a": np.array([np.nan, 2.0])}) == \
        {"i": 3, "t": [1.5, None], "a": [None, 2.0]}
    assert type(R._clean(np.int64(3))) is int


def test_frame_numbers_must_end_the_names():
    x, numbered = frame_numbers(["f1a", "f2a"])
    assert x.tolist() == [0, 1] and not numbered


def test_psnr_plot_puts_capped_frames_on_the_top_edge_and_means_include_them():
    fig = over_time_figure(results(), "psnr", ["a", "b", "c"], "PSNR (dB)", "the title")
    ax = fig.axes[0]
    a, tri, b = ax.lines[:3]
    assert np.array_equal(a.get_ydata(), [np.nan, 30, 28], equal_nan=True)  # the capped frame: a break
    assert tri.get_marker() == "^" and tri.get_xdata().tolist() == [0] and tri.get_ydata().tolist() == [33.0]
    assert b.get_ydata().tolist() == [20, 21, 22]
    assert ax.get_ylim() == (17.0, 33.0)  # 3 dB around the uncapped values
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "a (mean 52.7)", "b (mean 21)", "identical to the ground truth (100 dB)"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("frame index (a \u2026 c)", "PSNR (dB)", "the title")
    plt.close(fig)


def test_other_metrics_are_never_capped_and_long_series_have_no_markers():
    n = 31
    res = {"m": MethodMetrics({"psnr": np.full(n, 30.0), "ssim": np.ones(n), "colourfulness": np.ones(n),
                               "warp_error": np.full(n, 150.0)}, cdc=0.0)}
    fig = over_time_figure(res, "warp_error", [f"x{i}" for i in range(n)], "w", "t")
    ax = fig.axes[0]
    assert len(ax.lines) == 1 and ax.lines[0].get_ydata().tolist() == [150.0] * n
    assert ax.lines[0].get_marker() in (None, "None")
    plt.close(fig)


def test_fit_tile_keeps_colour_and_aspect_centred_on_white():
    red = np.zeros((10, 10, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, 7  # RGBA: the alpha is dropped, not read as a colour
    tile = R._fit_tile(red, 40, 20)
    assert tile.shape == (20, 40, 3)
    assert (tile[:, :10] == 255).all() and (tile[:, 30:] == 255).all()
    assert (tile[:, 10:30] == (255, 0, 0)).all()
    gray = R._fit_tile(np.full((10, 20), 0.5), 20, 10)  # float [0, 1] gray
    assert gray.dtype == np.uint8 and (gray == 128).all()


def test_fit_tile_averages_when_it_shrinks():
    """Shrunk, a tile's pixel is the mean of the source pixels it covers (area interpolation), not
    a sample of a few: fine detail (grain, noise) does not alias into speckle."""
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3)).astype(np.uint8)
    tile = R._fit_tile(noise, 40, 40).astype(float)
    means = noise.astype(float).reshape(40, 4, 40, 4, 3).mean(axis=(1, 3))
    assert np.abs(tile - means).max() <= 0.5 + 1e-9  # rounded to uint8
    assert tile.std() < noise.std() / 3  # about std / 4 for a 4x4 mean of independent pixels


def test_strip_rows_use_the_given_labels(tmp_path, figure_texts):
    texts = figure_texts
    gt = [np.full((45, 80, 3), 100, np.uint8)] * 2
    write_report(results(), tmp_path, frames=["f0", "f1", "f2"],
                 strip=Strip([0, 2], [g[..., 0] for g in gt], gt, {"a": gt}, labels=["first", "last"]))
    assert "first" in texts and "last" in texts and "f0" not in texts


def test_write_report_refuses_no_results_and_series_of_another_length(tmp_path):
    with pytest.raises(ValueError, match="^no results to report$"):
        write_report({}, tmp_path)
    with pytest.raises(ValueError, match=r"^a: per-frame metrics do not match the 2 frames$"):
        write_report(results(), tmp_path, frames=["f0", "f1"])
    res = results()
    res["b"].per_frame["ssim"] = np.array([0.5, 0.6])  # one series of one method short
    with pytest.raises(ValueError, match=r"^b: per-frame metrics do not match the 3 frames$"):
        write_report(res, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_report_every_value_in_its_row(tmp_path, monkeypatch):
    calls = []
    real = R.over_time_figure
    monkeypatch.setattr(R, "over_time_figure", lambda res, key, *a: calls.append((key, a[1])) or real(res, key, *a))
    res = results()
    res["b"].per_frame["ssim"] = np.array([0.123456789, 0.6, 0.7])
    paths = write_report(res, tmp_path)  # no frame names: positions as names
    doc = json.loads(paths["json"].read_text())
    assert doc["frames"] == ["0", "1", "2"] and list(doc["methods"]) == ["a", "b"]
    assert doc["methods"]["b"]["per_frame"]["psnr"] == [20.0, 21.0, 22.0]
    rows = list(csv.reader(paths["per_frame_csv"].open()))
    assert rows[1:] == [
        ["a", "0", "100", "1", "10", ""], ["a", "1", "30", "0.9", "20", "1"], ["a", "2", "28", "0.8", "30", "3"],
        ["b", "0", "20", "0.123457", "1", ""], ["b", "1", "21", "0.6", "2", "0.5"], ["b", "2", "22", "0.7", "3", "0.5"]]
    assert [k for k, _ in calls] == ["psnr", "warp_error"] and calls[1][1] == "warp error (0..255 levels)"


def test_a_report_without_a_strip_removes_an_earlier_runs_strip(tmp_path):
    gt = [np.full((45, 80, 3), 100, np.uint8)] * 2
    write_report(results(), tmp_path, strip=Strip([0, 2], [g[..., 0] for g in gt], gt, {"a": gt}))
    assert (tmp_path / "strip.png").is_file()
    write_report(results(), tmp_path)
    assert not (tmp_path / "strip.png").exists()


def test_names_the_font_cannot_draw_are_escaped_in_the_plots_without_a_warning(tmp_path):
    """evaluate.py --pred 日本語=DIR: DejaVu Sans (matplotlib's own) has no CJK, so each glyph was a
    box and a warning line on stderr; escaped ('\\u65e5'), the name stays readable. 'é' it has."""
    import warnings

    import matplotlib
    import matplotlib.pyplot as plt

    from colorize.report import drawable, strip_figure

    assert drawable("Amélie 日本") == "Amélie \\u65e5\\u672c"
    gt = [np.full((8, 8, 3), v, np.uint8) for v in (60, 120)]
    res = {"日本": MethodMetrics({"psnr": np.array([25.0, 30.0]), "ssim": np.array([0.9, 0.8]),
                               "colourfulness": np.ones(2), "warp_error": np.array([np.nan, 1.0])}, cdc=0.0)}
    strip = Strip(indices=[0, 1], gray=gt, gt=gt, methods={"日本": gt}, reference=gt[0])
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}), warnings.catch_warnings():
        warnings.simplefilter("error")
        for fig in (over_time_figure(res, "psnr", ["a", "b"], "PSNR", "t"), strip_figure(strip, res, ["東.png", "b"])):
            fig.canvas.draw()
            texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
            assert any("\\u65e5\\u672c" in t for t in texts) and not any("日" in t or "東" in t for t in texts)
            plt.close(fig)


def test_importing_the_report_leaves_matplotlibs_backend_alone():
    """It called matplotlib.use("Agg") on import: a notebook importing it lost its inline plots."""
    import subprocess
    import sys

    code = "import matplotlib, colorize.report; print(matplotlib.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], env={**os.environ, "MPLBACKEND": "svg"}).stdout
    assert out.strip() == "svg"


def _text_boxes(fig):
    """(text, its drawn box in pixels) of every non-empty text of `fig`, rendered by Agg."""
    import matplotlib.text
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(matplotlib.text.Text)
            if t.get_text() and t.get_visible()]


@pytest.mark.parametrize("h, w, tile_w, tile_h", [(150, 60, 224, TILE_HEIGHT), (180, 1920, 640, 60)])
def test_strip_headers_and_captions_stay_in_their_columns(h, w, tile_w, tile_h):
    """A portrait frame's tiles were 86 px wide, under headers and captions twice that: they ran
    into each other ("desatground trut"); an 84-character method name covered its neighbours'
    headers; a 1920x180 frame's tiles were 2300 px wide (an 11568 px strip). Tiles are now 224 to
    640 px wide (a wide frame's shorter), and each text is shortened to its tile's width."""
    from colorize.report import strip_figure

    long = "a method with a very long name, " * 2 + "version 17"
    gt = [np.full((h, w, 3), v, np.uint8) for v in (60, 120)]
    res = {long: MethodMetrics({"psnr": np.array([24.26, PSNR_CAP_DB]), "ssim": np.array([0.981, 1.0]),
                                "colourfulness": np.ones(2), "warp_error": np.array([np.nan, 1.0])}, cdc=0.0),
           "desat": MethodMetrics({"psnr": np.array([21.5, 22.25]), "ssim": np.array([0.9, 0.8]),
                                   "colourfulness": np.ones(2), "warp_error": np.array([np.nan, 1.0])}, cdc=0.0)}
    strip = Strip([0, 1], gt, gt, {long: gt, "desat": gt}, reference=gt[0])
    fig = strip_figure(strip, res, ["frame_with_a_long_file_name_0001.png", "b.png"])
    columns = 5
    assert (fig.bbox.width, fig.bbox.height) == pytest.approx((8 + columns * (tile_w + 8), 34 + 2 * (tile_h + 26 + 8)))
    boxes = _text_boxes(fig)
    for text, box in boxes:
        column = (box.x0 - 8) // (tile_w + 8)
        left = 8 + column * (tile_w + 8)
        assert left - 0.5 <= box.x0 and box.x1 <= left + tile_w + 0.5, (text, box.x0, box.x1, left)
    texts = [t for t, _ in boxes]
    header = next(t for t in texts if t.startswith("a method"))
    start, end = header.split("\u2026")  # its two ends, which tell names apart
    assert len(start) >= 5 and len(end) >= 5 and long.startswith(start) and long.endswith(end)
    assert {"desat", "input (gray)", "ground truth", "PSNR 24.26 dB  SSIM 0.981", "PSNR \u2265 100 dB (identical)"} \
        <= set(texts)
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plots_keep_the_legend_off_the_data_and_tell_many_methods_apart():
    """The legend was drawn inside the axes (loc="best"), over the demo's own flow curve; beyond
    matplotlib's 10 colours, method 11 looked like method 1."""
    n = 3
    res = {f"m{i}": MethodMetrics({"psnr": np.full(n, 20.0 + i), "ssim": np.ones(n), "colourfulness": np.ones(n),
                                   "warp_error": np.ones(n)}, cdc=0.0) for i in range(12)}
    fig = over_time_figure(res, "psnr", ["a", "b", "c"], "PSNR (dB)", "t")
    ax = fig.axes[0]
    boxes = dict(_text_boxes(fig))
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1 and legend.x1 <= fig.bbox.width
    assert boxes["m11 (mean 31)"].x1 <= fig.bbox.width
    styles = [(line.get_color(), line.get_linestyle()) for line in ax.lines]
    assert styles[10] == (styles[0][0], "--") and styles[0][1] == "-" and len(set(styles)) == 12
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plots_of_one_or_two_frames_and_of_tiny_differences_read_right():
    """One frame: its axis read -0.045 .. 0.045 and the warp plot was empty with 'mean nan'; two
    frames 0.009 dB apart were drawn full height, a collapse to the eye."""
    import matplotlib.pyplot as plt

    one = {"m": MethodMetrics({"psnr": np.array([25.0]), "ssim": np.ones(1), "colourfulness": np.ones(1),
                               "warp_error": np.array([np.nan])}, cdc=np.nan)}
    fig = over_time_figure(one, "warp_error", ["a"], "w", "t")
    ax = fig.axes[0]
    assert ax.get_xlim() == (-0.5, 0.5) and [t for t in ax.get_xticks() if -0.5 <= t <= 0.5] == [0]
    texts = [t for t, _ in _text_boxes(fig)]
    assert "m (mean n/a)" in texts and "no values (a warp error needs two consecutive frames)" in texts
    plt.close(fig)
    two = {"m": MethodMetrics({"psnr": np.array([22.188, 22.179]), "ssim": np.ones(2), "colourfulness": np.ones(2),
                               "warp_error": np.array([np.nan, 0.2])}, cdc=0.0)}
    fig = over_time_figure(two, "psnr", ["a", "b"], "PSNR (dB)", "t")
    assert fig.axes[0].get_ylim() == pytest.approx((22.1835 - 0.5, 22.1835 + 0.5), abs=1e-9)  # MIN_SPAN 1 dB
    assert fig.axes[0].get_xlim() == (-0.5, 1.5)
    plt.close(fig)
    spread = {"m": MethodMetrics({"psnr": np.array([20.0, 25.0]), "ssim": np.ones(2), "colourfulness": np.ones(2),
                                  "warp_error": np.array([np.nan, 0.2])}, cdc=0.0)}
    fig = over_time_figure(spread, "psnr", ["f1", "f2"], "PSNR (dB)", "t")
    lo, hi = fig.axes[0].get_ylim()
    assert lo < 20.0 and 25.0 < hi < 26.0  # matplotlib's own margins where the data span more
    plt.close(fig)
    still = {"m": MethodMetrics({"psnr": np.ones(3), "ssim": np.ones(3), "colourfulness": np.ones(3),
                                 "warp_error": np.array([np.nan, 0.1, 0.12])}, cdc=0.0)}
    fig = over_time_figure(still, "warp_error", ["a", "b", "c"], "w", "t")
    assert fig.axes[0].get_ylim() == (0.0, 0.5)  # a still clip: no negative warp error on the axis
    plt.close(fig)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        assert over_time_figure({}, "psnr", [], "PSNR", "t").axes[0].get_legend() is None  # no methods: empty


def test_a_method_identical_in_every_frame_has_a_triangle_in_the_legend():
    import matplotlib.pyplot as plt

    res = {"copy": MethodMetrics({"psnr": np.full(3, PSNR_CAP_DB), "ssim": np.ones(3), "colourfulness": np.ones(3),
                                  "warp_error": np.ones(3)}, cdc=0.0), **results()}
    fig = over_time_figure(res, "psnr", ["a", "b", "c"], "PSNR (dB)", "t")
    copy = fig.axes[0].get_legend().legend_handles[0]
    assert copy.get_marker() == "^" and copy.get_linestyle() == "None"
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "copy (mean 100)"
    plt.close(fig)
