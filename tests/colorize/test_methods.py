"""colourised: every method's outputs as (name, depth, RGB) in clip order; flow's start frames."""
import dataclasses
import tempfile

import numpy as np
import pytest

from annotator.color import rgb_to_gray, to_uint8
from colorize import methods as M, pipeline as P
from colorize.baselines import iter_baseline
from tests.annotator.clips import panning_clip, write_folder
from tests.colorize.tiny_model import tiny_model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """6 colour frames of 32x48 (a cut before frame 3), and folders of them and of their gray."""
    root = tmp_path_factory.mktemp("clip")
    colour = panning_clip(6, 32, 48, speed=3, cuts=(3,))
    grays = [to_uint8(rgb_to_gray(c)) for c in colour]
    folder = write_folder([np.repeat(g[..., None], 3, 2) for g in grays], root / "gray", pattern="f{:d}")
    return dict(colour=colour, grays=grays, gray=folder, colour_folder=write_folder(colour, root / "colour"))


def references(images, frames, labels=None):
    return M.References(images, frames, labels or [f"ref {k}" for k in range(len(images))])


def run(clip, refs, frames=slice(0, None), total=None, method="reinhard", **kw):
    notes, calls = [], []
    out = list(M.colourised(clip["gray"], refs, frames, total, notes.append, calls.append, method, **kw))
    return out, notes, calls


def test_a_baseline_gives_the_range_in_clip_order_with_names_and_depths(clip):
    refs = references([clip["colour"][0]], [0])  # a frame outside the range: only flow starts from it
    out, notes, calls = run(clip, refs, slice(1, 5), 4)
    want = list(iter_baseline("reinhard", [g / 255 for g in clip["grays"][1:5]], [clip["colour"][0]]))
    assert [(name, depth) for name, depth, _ in out] == [(f"f{k}.png", 8) for k in (1, 2, 3, 4)]
    for (_, _, got), expected in zip(out, want):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert calls == [1, 1, 1, 1] and notes == []


def test_flow_walks_from_its_reference_frames_counted_from_the_range(clip):
    refs = references([clip["colour"][4], clip["colour"][2]], [4, 2])
    assert M.flow_start_indices(clip["gray"], refs, slice(1, 6), 5, print) == [3, 1]
    assert M.flow_start_indices(clip["gray"], references(refs.images, [5, 1]), slice(1, 6), 5, print) == [4, 0]
    out, _, _ = run(clip, refs, slice(1, 6), 5, "flow")
    want = list(iter_baseline("flow", [g / 255 for g in clip["grays"][1:6]], refs.images, [3, 1]))
    assert [name for name, _, _ in out] == [f"f{k}.png" for k in range(1, 6)]  # frame 1 waited for frame 2, the reference
    for (_, _, got), expected in zip(out, want):
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_flow_says_how_much_frames_before_a_late_reference_hold_and_where(clip, monkeypatch, tmp_path):
    """Frames before a reference's frame wait (a reference at frame 1000 of a 720p film: 12 GB):
    said once at the start beyond FLOW_RAM (1 GiB; lowered here to what 2 frames of 32x48 hold),
    with the folder of the temporary file they go to past it; not for a reference at the range's
    start. The outputs are those held in RAM, and nothing is left in the folder."""
    assert M.flow_held_bytes(1000, (720, 1280), 8) == 1000 * 720 * 1280 * 13 > 11.9e9
    assert M.flow_held_bytes(10, (720, 1280, 3), 16) == 10 * 720 * 1280 * 14
    assert M.flow_held_bytes(10, (720, 1280), 8, colour=True) == 10 * 720 * 1280 * 16  # their float luma
    refs = references([clip["colour"][3]], [3])
    in_ram, notes, _ = run(clip, refs, method="flow")
    assert notes == []
    monkeypatch.setattr(M, "FLOW_RAM", 2 * 32 * 48 * 13)
    made, make = [], tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda dir: made.append(dir) or make(dir=dir))
    spilled, notes, _ = run(clip, refs, method="flow", spill_to=tmp_path)
    assert made == [tmp_path]  # the 3 grays fit, then their outputs go past it
    assert notes == [f"--method flow: up to 3 frames before a reference's frame wait until it comes (their gray, then "
                     f"their outputs: about {3 * 32 * 48 * 13 / 2**30:.1f} GiB at this frame size); past "
                     f"{2 * 32 * 48 * 13 / 2**30:.1f} GiB they are held in a temporary file in {tmp_path}, deleted as "
                     "the run ends; a reference from nearer the start of the frames needs less"]
    assert [(a, b) for a, b, _ in spilled] == [(a, b) for a, b, _ in in_ram]
    assert all(np.array_equal(x, y) for (_, _, x), (_, _, y) in zip(spilled, in_ram))
    assert list(tmp_path.iterdir()) == []
    assert run(clip, references([clip["colour"][2]], [2]), method="flow")[1] == []  # 2 frames: fit
    assert run(clip, refs, slice(3, None), method="flow")[1] == []


@pytest.mark.parametrize("frame, frames, total", [(0, slice(1, 6), 5), (6, slice(1, 6), 5), (3, slice(1, 3), 2)])
def test_a_reference_frame_outside_the_range_is_refused_for_flow(clip, frame, frames, total):
    refs = references([clip["colour"][frame % 6]], [frame])
    with pytest.raises(M.MethodError) as e:
        run(clip, refs, frames, total, "flow")
    go_on = f"; to continue a stopped run, start at it: --frames {frame}:{frames.stop} --overwrite" \
        if frame < frames.start else ""  # a flow run continued with --frames N: meets it
    assert str(e.value) == (f"--reference-frame {frame} lies outside the frames being colourised (flow starts from "
                            f"it){go_on}")
    assert M.flow_start_indices(clip["gray"], refs, slice(frame, None), None, print) == [0]  # unknown length: no end


def test_two_references_on_one_frame_are_refused_naming_both(clip):
    refs = references([clip["colour"][4], clip["colour"][4]], [None, 4], ["--reference a.png", "--reference-frame 4"])
    with pytest.raises(M.MethodError) as e:
        M.flow_start_indices(clip["gray"], refs, slice(1, 6), 5, print, show_progress=False)
    assert str(e.value) == ("--method flow: --reference a.png and --reference-frame 4 are both frame 4 (a --reference "
                            "image is placed at its most similar frame); flow takes one reference per frame")
    refs = references([clip["colour"][4]] * 2, [4, None], ["--reference-frame 4", "--reference a.png"])
    with pytest.raises(M.MethodError, match=r"are both frame 4 \(a --reference image is placed"):
        M.flow_start_indices(clip["gray"], refs, slice(1, 6), 5, print)
    refs = references([clip["colour"][2]] * 2, [2, 2], ["--reference-frame 2", "--reference-frame 2"])
    with pytest.raises(M.MethodError, match=r"^--method flow: --reference-frame 2 and --reference-frame 2 are both "
                                            r"frame 2; flow"):
        M.flow_start_indices(clip["gray"], refs, slice(1, 6), 5, print)


def test_a_reference_image_is_placed_at_its_most_similar_frame(clip):
    refs = references([clip["colour"][4], clip["colour"][1]], [None, 1])
    assert M.flow_start_indices(clip["gray"], refs, slice(1, 6), 5, print) == [3, 0]


def test_a_baselines_value_error_names_the_method(clip, monkeypatch):
    def failing(*a, **k):
        raise ValueError("no good")
        yield
    monkeypatch.setattr(M, "iter_baseline", failing)
    with pytest.raises(M.MethodError, match=r"^--method reinhard-bands: no good$"):
        run(clip, references([clip["colour"][0]], [None]), method="reinhard-bands")


@pytest.mark.parametrize("method, stretched", [("reinhard", False), ("flow", True)])
def test_notes_say_colour_frames_and_a_stretched_reference(clip, method, stretched):
    wide = np.ascontiguousarray(np.tile(clip["colour"][0], (1, 2, 1)))  # 32x96: twice the frames' aspect ratio
    notes = []
    list(M.colourised(clip["colour_folder"], references([wide], [0]), slice(0, 2), 2, notes.append, print, method))
    assert notes[0] == f"{clip['colour_folder']}: frames are colour; colourising their BT.601 luma"
    assert ("a reference of 96x32 is stretched to the frames' 48x32 shape; crop it to their aspect ratio for "
            "undistorted colours" in notes) == stretched


@pytest.mark.parametrize("mode, other", [("fixed", "recursive"), ("recursive", "fixed")])
def test_the_model_gets_the_range_its_start_the_mode_and_the_options(clip, mode, other):
    model, ref = tiny_model(), clip["colour"][0]
    options = P.Options(size=64, steps=2, batch=2, noise="per-frame")
    out, _, calls = run(clip, references([ref], [None]), slice(2, 5), 3, "model", model=model, mode=mode,
                        options=options)
    settings = dataclasses.asdict(options)
    want = list(P.colorize(model, clip["grays"][2:5], ref, mode, start=2, **settings))
    assert [name for name, _, _ in out] == ["f2.png", "f3.png", "f4.png"] and calls == [1, 1, 1]
    for (_, _, got), expected in zip(out, want):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    otherwise = list(P.colorize(model, clip["grays"][2:5], ref, other, start=2, **settings))
    assert np.abs(otherwise[2] - want[2]).max() > 1e-3  # the mode matters, so passing it on is tested
    from_0 = list(P.colorize(model, clip["grays"][2:5], ref, mode, start=0, **settings))
    assert np.abs(from_0[0] - want[0]).max() > 1e-3  # so does the start (per-frame noise)
