"""colorize/audio.py: the source's sound beside the written video, copied or re-encoded."""
import wave
from fractions import Fraction
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest

from annotator.video import iter_frames, probe
from colorize.audio import FrameTimes, _timed, audio_codec, copied, frame_times, remux
from colorize.frames_io import write_video_atomic
from tests.helpers import headless_video, video_with_sound

TONE = (np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 10000).astype(np.int16)  # 1 s at 16 kHz


def packets(path, kind: str) -> list[tuple[bytes, float]]:
    """(bytes, time in seconds) of every packet of the file's first `kind` stream."""
    with av.open(str(path)) as c:
        s = next(s for s in c.streams if s.type == kind)
        return [(bytes(p), float(p.pts * p.time_base)) for p in c.demux(s) if p.pts is not None]


def sound(path) -> tuple[np.ndarray, int]:
    """The decoded first audio stream (mono float) and its sample rate."""
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        return np.concatenate([f.to_ndarray().reshape(-1).astype(np.float64) for f in c.decode(a)]), a.rate


def picture(tmp_path, frames: int = 10):
    """A silent MPEG-4 video as write_video_atomic makes it."""
    path = tmp_path / "picture.mp4"
    write_video_atomic(path, [np.full((24, 32, 3), 7 * i % 256, np.uint8) for i in range(frames)], 10)
    return path


def test_aac_is_copied_packet_for_packet_and_the_picture_too(tmp_path):
    src, video = video_with_sound(tmp_path / "film.mp4"), picture(tmp_path)
    assert remux(video, tmp_path / "out.mp4", src) == "aac copied"
    assert packets(tmp_path / "out.mp4", "video") == packets(video, "video")
    assert packets(tmp_path / "out.mp4", "audio") == packets(src, "audio")


@pytest.mark.parametrize("video_start", [0, 5])
def test_pcm_is_re_encoded_to_aac_and_still_sounds_the_same(tmp_path, video_start):
    """With the picture 0.5 s after the sound (video_start 5) the first 0.5 s are skipped, as
    when the packets are copied (below): the sound is as long as the picture either way."""
    src = video_with_sound(tmp_path / "film.mov", audio="pcm_s16le", hz=440, video_start=video_start)
    assert remux(picture(tmp_path), tmp_path / "out.mp4", src) == "pcm_s16le re-encoded to AAC"
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert [s.codec_context.name for s in c.streams] == ["mpeg4", "aac"]
    pcm, rate = sound(tmp_path / "out.mp4")
    assert rate == 16000 and abs(len(pcm) / rate - 1.0) < 0.1  # one second, up to AAC's framing
    spectrum = np.abs(np.fft.rfft(pcm))
    assert abs(np.argmax(spectrum) * rate / len(pcm) - 440) < 5  # the tone, to the FFT's resolution
    assert 0.25 < np.abs(pcm).max() < 0.4  # 10000 / 32768 = 0.31, give or take AAC's ripple


def test_sound_keeps_its_offset_to_the_picture(tmp_path):
    """The source's picture starts 0.5 s after its sound, ours at 0: every audio packet moves
    0.5 s earlier, and what now lies before 0 is skipped in playback (the MP4 edit list), so
    sound and picture start together, as they played in the source."""
    src = video_with_sound(tmp_path / "film.mp4", video_start=5)
    out = tmp_path / "out.mp4"
    remux(picture(tmp_path), out, src)
    ours, theirs = packets(out, "audio"), packets(src, "audio")
    assert [b for b, _ in ours] == [b for b, _ in theirs]
    assert [t for _, t in ours] == pytest.approx([t - 0.5 for _, t in theirs], abs=1e-9)
    played, rate = sound(out)
    assert abs(len(played) - (len(sound(src)[0]) - 0.5 * rate)) <= 1024  # up to one AAC frame


def test_a_source_without_sound_is_refused(tmp_path):
    video = picture(tmp_path)
    with pytest.raises(ValueError, match="no audio stream"):
        remux(video, tmp_path / "out.mp4", video)


def test_audio_codec_names_the_first_audio_stream_or_none(tmp_path):
    assert audio_codec(video_with_sound(tmp_path / "a.mov", audio="pcm_s16le")) == "pcm_s16le"
    assert audio_codec(picture(tmp_path)) is None
    (tmp_path / "notes.txt").write_text("not a film")
    assert audio_codec(tmp_path / "notes.txt") is None
    assert audio_codec(tmp_path / "missing.mp4") is None


def test_write_video_atomic_adds_the_sound_before_the_video_appears(tmp_path):
    src = video_with_sound(tmp_path / "film.mp4")
    frames = [np.full((24, 32, 3), 7 * i, np.uint8) for i in range(10)]
    assert write_video_atomic(tmp_path / "out.mp4", frames, 10, audio_from=src) == 10
    assert packets(tmp_path / "out.mp4", "audio") == packets(src, "audio")
    assert packets(tmp_path / "out.mp4", "video") == packets(picture(tmp_path), "video")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["film.mp4", "out.mp4", "picture.mp4"]


def test_write_video_atomic_without_the_sound_it_was_asked_for_writes_nothing(tmp_path):
    silent = picture(tmp_path)
    frames = [np.zeros((24, 32, 3), np.uint8)] * 3
    with pytest.raises(OSError) as e:
        write_video_atomic(tmp_path / "out.mp4", frames, 10, audio_from=silent)
    assert str(e.value) == (f"{tmp_path / 'out.mp4'}: cannot add the sound of {silent} ({silent}: no audio "
                            "stream); leave it out with --no-audio")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picture.mp4"]


def test_mp3_is_named_by_its_codec_and_copied(tmp_path):
    """FFmpeg reads MP3 with its 'mp3float' decoder; by that name MP3 was re-encoded to AAC
    (and named so in the message), though MP4 holds it as it is."""
    src = video_with_sound(tmp_path / "film.mp4", audio="mp3")
    assert audio_codec(src) == "mp3"
    assert remux(picture(tmp_path), tmp_path / "out.mp4", src) == "mp3 copied"
    assert packets(tmp_path / "out.mp4", "audio") == packets(src, "audio")


@pytest.mark.parametrize("codec, film", [("opus", "film.mp4"), ("flac", "film.mkv")])
def test_opus_and_flac_are_copied_into_mp4_but_re_encoded_into_a_mov(tmp_path, codec, film):
    """QuickTime's muxer refuses Opus and FLAC (an FFmpeg 'Invalid argument' that wrote no .mov)."""
    src, video = video_with_sound(tmp_path / film, audio=codec), picture(tmp_path)
    assert remux(video, tmp_path / "out.mp4", src) == f"{codec} copied"
    assert remux(video, tmp_path / "out.mov", src) == f"{codec} re-encoded to AAC"
    assert packets(tmp_path / "out.mov", "video") == packets(video, "video")
    pcm, rate = sound(tmp_path / "out.mov")
    assert rate == {"opus": 48000, "flac": 16000}[codec]  # Opus decodes at 48 kHz whatever went in
    assert abs(len(pcm) / rate - 1.0) < 0.1  # one second, up to AAC's framing
    assert abs(np.argmax(np.abs(np.fft.rfft(pcm))) * rate / len(pcm) - 440) < 5  # the tone, to the FFT's resolution


def test_a_plain_wav_of_unnamed_channels_is_re_encoded_channel_for_channel(tmp_path):
    """A WAV with a plain PCM header (Python's wave module, many editors) does not name its
    channels, and FFmpeg's AAC encoder refused to open for such a layout: an --audio .wav
    gave no video. Decoded as the usual layout for two (stereo), left stays left."""
    tone = (np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 10000).astype(np.int16)
    with wave.open(str(tmp_path / "track.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.stack([tone, np.zeros_like(tone)], 1).tobytes())  # the tone on the left only
    assert remux(picture(tmp_path), tmp_path / "out.mp4", tmp_path / "track.wav") == "pcm_s16le re-encoded to AAC"
    with av.open(str(tmp_path / "out.mp4")) as c:
        a = c.streams.audio[0]
        assert a.codec_context.layout.name == "stereo"
        left, right = np.concatenate([f.to_ndarray() for f in c.decode(a)], 1)
    assert abs(len(left) / 16000 - 1.0) < 0.1  # one second, up to AAC's framing
    assert 0.25 < np.abs(left).max() < 0.4 and np.abs(right).max() < 0.01  # 10000 / 32768 = 0.31; silence


@pytest.mark.parametrize("channels, layout", [(1, "mono"), (2, "stereo")])
def test_a_plain_wav_is_decoded_as_the_usual_layout_for_its_channel_count(tmp_path, channels, layout):
    with wave.open(str(tmp_path / "track.wav"), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.repeat(TONE[:, None], channels, 1).tobytes())
    remux(picture(tmp_path), tmp_path / "out.mp4", tmp_path / "track.wav")
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert c.streams.audio[0].codec_context.layout.name == layout


def test_copied_names_what_each_container_holds_as_it_is():
    """MP4 holds all seven; QuickTime (a .mov name, in any case) neither Opus nor FLAC; PCM and
    Vorbis are re-encoded into either."""
    codecs = ["aac", "mp3", "ac3", "eac3", "alac", "opus", "flac", "pcm_s16le", "vorbis", None]
    assert [c for c in codecs if copied(c, "out.mp4")] == ["aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"]
    for mov in ("out.mov", "OUT.MOV", "out.Mov"):
        assert [c for c in codecs if copied(c, mov)] == ["aac", "mp3", "ac3", "eac3", "alac"]
    assert [c for c in codecs if copied(c, "out.mov.mp4")] == ["aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"]


@pytest.mark.parametrize("name", ["out.mov", "OUT.MOV"])
def test_a_mov_name_is_written_by_quicktimes_muxer(tmp_path, name):
    """Its brand is QuickTime's ('qt  '), an MP4's is not; Opus goes in re-encoded."""
    src, video = video_with_sound(tmp_path / "film.mp4", audio="opus"), picture(tmp_path)
    assert remux(video, tmp_path / name, src) == "opus re-encoded to AAC"
    assert (tmp_path / name).read_bytes()[4:12] == b"ftypqt  "
    remux(video, tmp_path / "out.mp4", src)
    assert (tmp_path / "out.mp4").read_bytes()[4:8] == b"ftyp" and (tmp_path / "out.mp4").read_bytes()[8:12] != b"qt  "


def test_the_first_of_two_audio_streams_is_taken(tmp_path):
    """A source with PCM first and AAC second: the PCM is named and re-encoded (the AAC, copied,
    would say 'aac copied')."""
    with av.open(str(tmp_path / "two.mov"), "w") as c:
        for s in [c.add_stream(codec, rate=16000, layout="mono") for codec in ("pcm_s16le", "aac")]:
            for i in range(0, 16000, 1024):
                f = av.AudioFrame.from_ndarray(TONE[None, i:i + 1024], format="s16", layout="mono")
                f.sample_rate, f.pts = 16000, i
                c.mux(s.encode(f))
            c.mux(s.encode())
    assert audio_codec(tmp_path / "two.mov") == "pcm_s16le"
    assert remux(picture(tmp_path), tmp_path / "out.mp4", tmp_path / "two.mov") == "pcm_s16le re-encoded to AAC"


def test_the_shift_is_rounded_to_the_nearest_audio_sample(tmp_path):
    """A picture 2/3 s after the sound (frame 2 at 3 fps; 8184 of the muxer's 1/12288 s ticks)
    shifts 48 kHz sound by 31968.75 samples: by 31969 of them, not 31968."""
    src = video_with_sound(tmp_path / "film.mp4", frames=3, fps=3, video_start=2, rate=48000)
    with av.open(str(src)) as c:
        v = c.streams.video[0]
        samples = v.start_time * v.time_base * 48000
    assert 0.5 < samples % 1 < 1  # rounding and truncating differ
    remux(picture(tmp_path, 3), tmp_path / "out.mp4", src)

    def ticks(path):
        with av.open(str(path)) as c:
            a = c.streams.audio[0]
            assert a.time_base == Fraction(1, 48000)
            return [p.pts for p in c.demux(a) if p.pts is not None]
    assert ticks(tmp_path / "out.mp4") == [t - round(samples) for t in ticks(src)]


def test_timed_takes_the_dts_else_the_pts_in_seconds_and_skips_untimed_packets():
    def packet(dts, pts):
        return SimpleNamespace(dts=dts, pts=pts, time_base=Fraction(1, 4))
    ps = [packet(2, 6), packet(None, 9), packet(None, None), packet(0, None)]
    assert [(t, kind, p) for t, kind, _, p in _timed(ps, 1)] == [(0.5, 1, ps[0]), (2.25, 1, ps[1]), (0.0, 1, ps[3])]


def test_packets_reach_the_muxer_in_time_order_across_the_streams(tmp_path, monkeypatch):
    """Interleaved by their times in seconds (the video's and the audio's ticks differ), not one
    stream after the other."""
    opening, muxed = av.open, []

    class Recording:
        def __init__(self, c):
            self.c = c

        def __enter__(self):
            self.c.__enter__()
            return self

        def __exit__(self, *exc):
            return self.c.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.c, name)

        def mux(self, p):
            muxed.append((p.stream.type, float((p.pts if p.dts is None else p.dts) * p.time_base)))
            self.c.mux(p)

    video = picture(tmp_path)
    sources = [video_with_sound(tmp_path / "film.mp4"), video_with_sound(tmp_path / "film.mov", audio="pcm_s16le")]
    monkeypatch.setattr(av, "open", lambda path, mode="r", **kw: (
        Recording(opening(path, mode, **kw)) if mode == "w" else opening(path, mode, **kw)))
    for src in sources:  # AAC copied, PCM re-encoded
        muxed.clear()
        remux(video, tmp_path / "out.mp4", src)
        assert {kind for kind, _ in muxed} == {"video", "audio"} and len(muxed) > 20
        assert [t for _, t in muxed] == sorted(t for _, t in muxed)


def test_a_cover_picture_keeps_no_offset_to_the_sound(tmp_path):
    """An MP3 with its cover picture (a video stream of one attached picture, whose start FFmpeg
    takes from the sound's: 1105 samples, the MP3 encoder's delay) is copied at its own times,
    as one without: its sound was moved 69 ms earlier, the cover taken for the film's picture."""
    def mp3(path, cover: bool):
        with av.open(str(path), "w") as c:
            a = c.add_stream("mp3", rate=16000, layout="mono")
            if cover:
                v = c.add_stream("mjpeg", rate=1)
                v.width, v.height, v.pix_fmt = 32, 24, "yuvj420p"
                v.disposition = av.stream.Disposition.attached_pic
                f = av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")
                c.mux(v.encode(f.reformat(format="yuvj420p")) + v.encode())
            for i in range(0, 16000, 1152):
                f = av.AudioFrame.from_ndarray(TONE[None, i:i + 1152], format="s16", layout="mono")
                f.sample_rate, f.pts = 16000, i
                c.mux(a.encode(f))
            c.mux(a.encode())
        return path
    video = picture(tmp_path)
    for cover in (False, True):
        src = mp3(tmp_path / f"song{cover}.mp3", cover)
        with av.open(str(src)) as c:
            assert [s.type for s in c.streams] == ["audio", "video"] * cover or ["audio"]
        assert remux(video, tmp_path / "out.mp4", src) == "mp3 copied"
        assert packets(tmp_path / "out.mp4", "audio") == packets(src, "audio")
        assert frame_times(src) is None  # a cover has no frame times to give a film


def test_frame_times_are_the_packets_times_from_the_first_frame(tmp_path):
    """A variable rate: the times as written (ms), not evenly spaced, 60 frames in 3.923 s; a
    constant one (10 fps in 1/10 s units): evenly spaced, 10 fps; no video or no file: None."""
    from tests.helpers import vfr_video

    path, times = vfr_video(tmp_path / "vfr.mkv", [33] * 30 + [100] * 30)
    ft = frame_times(path)
    assert (ft.pts, ft.time_base, ft.last) == (times, Fraction(1, 1000), 33) and not ft.uniform()
    assert ft.fps() == pytest.approx(60 / 3.923, abs=1e-9)
    cfr = frame_times(video_with_sound(tmp_path / "film.mp4", frames=12, video_start=3))  # starts at 0.3 s
    assert cfr.uniform() and cfr.fps() == pytest.approx(10, abs=1e-9) and len(cfr.pts) == 12 and cfr.pts[0] == 0
    wav = tmp_path / "track.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(TONE.tobytes())
    assert frame_times(wav) is None and frame_times(tmp_path / "nope.mp4") is None
    assert FrameTimes([0, 33, 67, 100], Fraction(1, 1000), 33).uniform()  # 29.97 fps in ms: 33 and 34
    assert not FrameTimes([0, 33, 70], Fraction(1, 1000), 33).uniform()


def test_remux_puts_each_frame_at_its_given_time(tmp_path):
    """The frames of an evenly timed video (OpenCV's writer) at the given variable times: the
    packets are the same bytes, at those times, as PyAV and OpenCV both read them; the sound
    stays in step. A count that does not match is refused."""
    video = picture(tmp_path, 6)
    times = FrameTimes([0, 40, 80, 300, 340, 900], Fraction(1, 1000), 40)
    out = tmp_path / "out.mp4"
    assert remux(video, out, times=times) is None
    assert [b for b, _ in packets(out, "video")] == [b for b, _ in packets(video, "video")]
    assert [round(t * 1000, 6) for _, t in packets(out, "video")] == times.pts
    cap = cv2.VideoCapture(str(out))
    msec = []
    while cap.read()[0]:
        msec.append(round(cap.get(cv2.CAP_PROP_POS_MSEC), 6))
    assert msec == times.pts
    src = video_with_sound(tmp_path / "film.mp4", frames=10)
    assert remux(video, tmp_path / "both.mp4", src, times) == "aac copied"
    assert [round(t * 1000, 6) for _, t in packets(tmp_path / "both.mp4", "video")] == times.pts
    assert packets(tmp_path / "both.mp4", "audio") == packets(src, "audio")
    for pts in ([0, 40, 80], list(range(0, 280, 40))):
        with pytest.raises(ValueError, match=f"{len(pts)} frame times for"):
            remux(video, tmp_path / "bad.mp4", times=FrameTimes(pts, Fraction(1, 1000), 40))


def test_frame_times_leave_out_the_frames_an_edit_list_cuts(tmp_path):
    """An H.264 MP4 with B-frames whose edit list starts 2 frames in (a clip trimmed with
    `ffmpeg -ss ... -c copy`): its 2 cut packets are demuxed (marked discard) but never decoded;
    counted, the times did not match OpenCV's 28 frames and the video fell back to the nominal rate."""
    import struct

    path = tmp_path / "b.mp4"
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=24)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        v.options = {"bf": "2", "g": "12"}
        for i in range(30):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 7 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 24)
            c.mux(v.encode(f))
        c.mux(v.encode())
    data = bytearray(path.read_bytes())
    at = data.find(b"elst") + 16  # version 0, 1 entry: duration (4 bytes), then media time (4)
    (media_time,) = struct.unpack(">i", data[at:at + 4])
    with av.open(str(path)) as c:
        frame = int(1 / (24 * c.streams.video[0].time_base))  # a frame in the track's time units
    data[at:at + 4] = struct.pack(">i", media_time + 2 * frame)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(bytes(data))
    cap = cv2.VideoCapture(str(cut))
    msec = []
    while cap.read()[0]:
        msec.append(cap.get(cv2.CAP_PROP_POS_MSEC))
    ft = frame_times(cut)
    assert len(msec) == len(ft.pts) == 28 and ft.pts[0] == 0
    np.testing.assert_allclose([float(t * ft.time_base) * 1000 for t in ft.pts], msec, atol=1e-6)


def test_a_lead_moves_the_sound_and_drops_the_frame_times_before_the_first_decodable_frame(tmp_path):
    """A stream cut before a key frame (headless_video): FFmpeg decodes nothing before it, so the
    first frame written is `lead` seconds after the picture's start, and its sound must start
    there too (it started at the picture's start: 0.32 s early, the picture ahead of the sound)."""
    src = headless_video(tmp_path / "cut.mp4")
    lead = probe(src).lead
    assert lead == pytest.approx(0.32)
    decoded = sum(1 for _ in iter_frames(src, warn=lambda line: None))
    every, kept = frame_times(src), frame_times(src, lead)
    assert len(kept.pts) == decoded < len(every.pts) and kept.pts[0] == 0 and kept.uniform()
    assert kept.pts == [t - every.pts[len(every.pts) - decoded] for t in every.pts[-decoded:]]
    out = tmp_path / "out.mp4"
    remux(picture(tmp_path, decoded), out, src, kept, lead)
    with av.open(str(src)) as c:
        v = c.streams.video[0]
        start = v.start_time * v.time_base
    ours, theirs = packets(out, "audio"), packets(src, "audio")
    assert [b for b, _ in ours] == [b for b, _ in theirs]
    assert [t for _, t in ours] == pytest.approx([t - float(start) - lead for _, t in theirs], abs=1 / 8000)
