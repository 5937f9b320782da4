"""Where a stopped run goes on: the --frames range, what a cut-off video still holds, and the line it stops with."""
import os
from types import SimpleNamespace

import pytest

from annotator.video import FrameSourceError, TruncatedVideoError
from colorize import outputs as O
from colorize.resume_advice import (RunPlan, file_identity, frames_it_holds, outputs, stopped_by, where_it_stopped,
                                    where_to_continue)

BATCH_START = " (from the start of the batch it stopped in: the frames of an uninterrupted run)"


def plan(method="reinhard", mode="fixed", batch=4, frames=slice(2, 20), refs=(), video=False, total=18, clip=None):
    return RunPlan(method, mode, batch, frames, refs, video, total, clip)


def cut_off(decoded: int) -> TruncatedVideoError:
    return TruncatedVideoError("clip.mp4", decoded, 99)


@pytest.mark.parametrize("next_frame, says", [
    (6, "--frames 6:20 continues"),  # 4 written: a whole batch
    (7, "--frames 6:20 --overwrite continues" + BATCH_START),  # 5: one into the second batch
    (9, "--frames 6:20 --overwrite continues" + BATCH_START),  # 7: three into it
])
def test_fixed_mode_goes_on_from_the_first_frame_of_the_batch_it_stopped_in(next_frame, says):
    assert where_to_continue(plan("model"), next_frame - 2, next_frame) == says


@pytest.mark.parametrize("method, mode", [("model", "recursive"), ("model", "anchored"), ("reinhard", "fixed")])
def test_what_does_not_batch_goes_on_from_the_next_frame(method, mode):
    assert where_to_continue(plan(method, mode), 5, 7) == "--frames 7:20 continues"
    assert where_to_continue(plan(method, mode, frames=slice(2, None), total=None), 5, 7) == "--frames 7: continues"


def test_flow_goes_on_from_its_first_reference_frame_before_the_next_frame():
    flow = plan("flow", frames=slice(0, None), refs=(9, 5), total=None)
    assert where_to_continue(flow, 7, 7) == ("--frames 5: --overwrite continues (flow walks again from its "
                                             "reference frame 5)")
    assert where_to_continue(flow, 5, 5) == "--frames 5: continues"  # the range from it holds it
    assert where_to_continue(plan("reinhard", frames=slice(0, None), refs=(5,)), 7, 7) == "--frames 7: continues"


def test_all_outputs_written_leaves_only_the_video():
    """The range from the clip's end (its frame count, not the range's end nor its output count)
    writes only the video; not --overwrite, which would colourise every frame again."""
    assert where_to_continue(plan(total=4), 4, 6) == "that is all of them"
    assert where_to_continue(plan(frames=slice(2, 6), total=4, video=True, clip=30), 4, 6) == (
        "only --video is missing: rerun with --frames 30: (it writes the video from the 30 outputs in --out)")
    assert where_to_continue(plan(frames=slice(0, None), total=1, video=True, clip=1), 1, 1) == (
        "only --video is missing: rerun with --frames 1: (it writes the video from the 1 output in --out)")
    # a plan that does not know the clip's length: the whole range again
    assert where_to_continue(plan(total=4, video=True), 4, 6) == "only --video is missing: rerun with --overwrite"
    assert where_to_continue(plan(total=5), 4, 6) == "--frames 6:20 continues"


def test_a_cut_off_video_is_told_the_range_of_the_frames_it_still_holds():
    # the copy's range goes over the held range's outputs (run first, say): with --overwrite
    tail = "; with a complete copy of the file, --frames 7:20 --overwrite continues"
    assert where_to_continue(plan(), 5, 7, cut_off(10)) == "--frames 7:10 colourises the rest of the frames it holds" + tail
    assert where_to_continue(plan(video=True), 5, 7, cut_off(10)) == (
        "--frames 7:10 without --video colourises the rest of the frames it holds" + tail)
    assert where_to_continue(plan(), 5, 7, cut_off(7)) == ("it holds no more frames; with a complete copy of the "
                                                           "file, --frames 7:20 continues")
    assert where_to_continue(plan(), 5, 7, FrameSourceError("clip.mp4", "bad frame")) == "--frames 7:20 continues"
    assert where_to_continue(plan("model"), 5, 7, cut_off(10)) == (
        "--frames 6:10 --overwrite colourises the rest of the frames it holds; with a complete copy of the file, "
        "--frames 6:20 --overwrite continues" + BATCH_START)


def test_a_cut_off_video_that_ends_before_flows_reference_frame_says_so():
    flow = plan("flow", frames=slice(0, None), refs=(12,), total=None)
    assert frames_it_holds(flow, 10, 0, 0, 0) == "it ends before flow's reference frame 12"
    assert frames_it_holds(plan("flow", refs=(10, 11)), 10, 0, 2, 2) == "it ends before flow's reference frame 10"
    assert frames_it_holds(plan(refs=(12,)), 10, 0, 2, 2) == "--frames 2:10 colourises the frames it holds"
    assert frames_it_holds(plan("flow", refs=(8,)), 10, 0, 2, 2) == "--frames 2:10 colourises the frames it holds"
    assert frames_it_holds(plan(), 10, 0, 10, 2) is None


@pytest.mark.parametrize("n, kind, before, says", [(1, "new ", "", "1 new output is"), (0, "", "", "0 outputs are"),
                                                   (3, "", "before it", "3 outputs before it are")])
def test_outputs_agree_in_number(n, kind, before, says):
    assert outputs(n, kind, before) == says


def test_a_run_that_wrote_no_png_and_is_stopped_as_it_finishes_names_only_the_video(tmp_path):
    """An input of unknown length with no frames left in the range writes only --video from --out;
    stopped in its last lines it said "all 0 outputs and V are written and complete". Without
    --video nothing was written, which run_cli's own line says (None here)."""
    writer = O.OrderedWriter(tmp_path, 4)
    plan = RunPlan("reinhard", "fixed", 1, slice(4, None), video=True)
    args = SimpleNamespace(video=str(tmp_path / "v.mp4"))
    said = where_it_stopped(args, slice(4, None), tmp_path, writer, plan, False, True, None)
    assert said == f"interrupted as it finished; {tmp_path / 'v.mp4'} is written and complete"
    args.video = None
    assert where_it_stopped(args, slice(4, None), tmp_path, writer, plan, False, True, None) is None


@pytest.mark.parametrize("clip, then", [
    (6, ": colourise frame 1 again with --frames 1:2 --overwrite without --video, then --frames 6: writes the video"),
    (None, ""),  # an input that does not say its length: no "--frames None:"
])
def test_an_unreadable_earlier_output_after_new_ones_says_how_to_mend_it_where_the_clip_is_known(tmp_path, clip, then):
    writer = O.OrderedWriter(tmp_path, 3)
    writer.count, writer.next_frame = 2, 5
    plan = RunPlan("reinhard", "fixed", 1, slice(3, None), video=True, clip=clip)
    e = O.EarlierOutputError("out/000001.png: unreadable", unreadable=1)
    assert stopped_by(e, SimpleNamespace(size=512, batch=4), None, writer, plan) == (
        f"out/000001.png: unreadable (the 2 new outputs are written and complete; only --video is missing{then})")


@pytest.mark.parametrize("run, error, before", [
    (plan("model", frames=slice(0, 8), total=8), FrameSourceError("f6.png", "bad"), "before its batch, frames 4-7,"),
    (plan("model", frames=slice(0, 6), total=6), FrameSourceError("f5.png", "bad"), "before its batch, frames 4-5,"),
    (plan("model", frames=slice(0, None), total=None), FrameSourceError("f6.png", "bad"),
     "before its batch, frames 4-7,"),
    (plan("model", frames=slice(0, 5), total=5), FrameSourceError("f4.png", "bad"), "before it"),  # a batch of one
    (plan("model", batch=1, frames=slice(0, 8), total=8), FrameSourceError("f4.png", "bad"), "before it"),
    (plan("model", "recursive", frames=slice(0, 8), total=8), FrameSourceError("f4.png", "bad"), "before it"),
    (plan("reinhard", frames=slice(0, 8), total=8), FrameSourceError("f4.png", "bad"), "before it"),
    (plan("model", frames=slice(0, 8), total=8), OSError("cannot write f4.png"), "before it"),  # writing frame 4
])
def test_a_stop_before_a_batchs_outputs_names_the_batch_not_every_frame_before_it(tmp_path, run, error, before):
    """A frame that stops fixed mode stops its whole batch: with frame 6 bad at --batch 4, frames
    4 and 5 have no output either, so "the 4 outputs before it" named frames that were not written."""
    writer = O.OrderedWriter(tmp_path, 0)
    writer.count, writer.next_frame = 4, 4
    said = stopped_by(error, SimpleNamespace(size=512, batch=4), None, writer, run)
    assert said == f"{error} (the 4 outputs {before} are written and complete; --frames 4:" \
                   f"{run.frames.stop or ''} continues)"

def test_a_video_gone_from_where_an_old_one_was_is_not_taken_for_the_runs_own(tmp_path):
    """--overwrite's old --video removed during the run (nothing there at the stop): the stop came
    before this run's video was renamed into place, so it goes on; not "as it finished"."""
    old = tmp_path / "old.mp4"
    old.write_bytes(b"old")
    video_was = file_identity(old)
    old.unlink()
    writer = O.OrderedWriter(tmp_path, 0)
    writer.count, writer.next_frame = 2, 2
    plan = RunPlan("reinhard", "fixed", 1, slice(0, None), video=True, total=4, clip=4)
    args = SimpleNamespace(video=str(old))
    assert where_it_stopped(args, slice(0, None), tmp_path, writer, plan, False, False, video_was) == (
        "interrupted; the 2 outputs written so far are complete: --frames 2: continues")


def test_file_identity_tells_a_replaced_file_of_the_same_size_and_time_and_is_none_where_none_can_be(tmp_path):
    """The inode tells the renamed-into-place video from the old one even where size and mtime agree
    (a coarse clock); a path that cannot be a file (under a file) is none, as a missing one is."""
    old, new = tmp_path / "v.mp4", tmp_path / "v.tmp"
    old.write_bytes(b"12345")
    new.write_bytes(b"54321")
    st = os.stat(old)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    was = file_identity(old)
    os.replace(new, old)
    assert os.stat(old).st_size == st.st_size and os.stat(old).st_mtime_ns == st.st_mtime_ns
    assert file_identity(old) != was
    assert file_identity(tmp_path / "v.mp4" / "x") is None and file_identity(tmp_path / "gone") is None
    assert file_identity(None) is None and file_identity("") is None
