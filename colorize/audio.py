"""The input film's sound and frame times in the colour video.

OpenCV writes video only, at one constant frame rate (a decimal one: 23.976, not 24000/1001),
so the soundtrack of a colourised film would be lost, and a film of variable frame rate (a
phone's or a screen recording) would drift away from its sound. Once the video is written,
`remux` copies its packets (not re-encoded) into a new file, with the first audio stream of a
source and/or the source video's own frame times (`frame_times`: its packets' timestamps,
read without decoding). The audio packets are copied too where the container (MP4, or
QuickTime for a .mov name) can hold the codec; anything else (PCM from a .mov or .avi,
Vorbis, Opus or FLAC into a .mov, ...) is re-encoded to AAC.
Audio is shifted by the source video's start time (a cover picture is no video), so sound and
picture keep the offset they had in the source: sound from before the first picture gets
negative times, which the MP4's edit list skips in playback (and AAC's priming packet keeps
its place before 0). PyAV (FFmpeg's libraries) does the demuxing and muxing.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import os
from fractions import Fraction
from typing import Iterator, NamedTuple

from annotator.video import film_stream

MP4_AUDIO = ("aac", "mp3", "ac3", "eac3", "alac", "opus", "flac")  # what the MP4 muxer takes as it is
MOV_AUDIO = ("aac", "mp3", "ac3", "eac3", "alac")  # QuickTime's muxer refuses Opus and FLAC


def copied(codec: str | None, dest: str | os.PathLike) -> bool:
    """Whether remux copies `codec`'s packets into `dest` (.mov: QuickTime, else MP4) as they are."""
    return codec in (MOV_AUDIO if str(dest).lower().endswith(".mov") else MP4_AUDIO)


def audio_codec(source: str | os.PathLike) -> str | None:
    """The codec of the source's first audio stream (its codec's name: 'mp3', not the decoder's
    'mp3float'), or None (no audio, or no file PyAV reads)."""
    import av

    try:
        with av.open(str(source)) as c:
            return next((s.codec_context.codec.canonical_name for s in c.streams if s.type == "audio"), None)
    except (av.FFmpegError, OSError, ValueError):
        return None


def _timed(packets, kind: int) -> Iterator[tuple[float, int, int, object]]:
    """(seconds, kind, tie-break, packet) for muxing in time order; packets without a time (a
    demuxer's final empty one) are skipped."""
    for n, p in enumerate(packets):
        t = p.dts if p.dts is not None else p.pts
        if t is not None:
            yield float(t * p.time_base), kind, n, p


class FrameTimes(NamedTuple):
    """A video's frame times: `pts[i]` is frame i's, counted from the first frame's, in units of
    `time_base` seconds; `last` is how long the last frame is shown, in the same units."""
    pts: list[int]
    time_base: Fraction
    last: int

    def uniform(self) -> bool:
        """Whether the frames are evenly spaced (to 1 % of their interval; a millisecond time
        base rounds 29.97 fps to 33 and 34)."""
        steps = [b - a for a, b in zip(self.pts, self.pts[1:])] + [self.last]
        return max(steps) - min(steps) <= max(1, 0.01 * max(steps))

    def fps(self) -> float:
        """Frames per second on average, the last frame's time on screen included."""
        return len(self.pts) / float((self.pts[-1] + self.last) * self.time_base)


def frame_times(source: str | os.PathLike, lead: float = 0.0) -> FrameTimes | None:
    """The frame times of `source`'s video stream, from its packets' timestamps (one per frame:
    OpenCV decodes the same frames, at the same times), or None where they are not plain: no
    PyAV, no video stream, a packet without a time, two frames at one time. Reads through the
    file (no decoding): a pass over a film's bytes. `lead`: seconds before the first decodable
    frame (SourceInfo.lead), whose packets OpenCV never gives as frames: left out."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(source)) as c:
            stream = film_stream(c)
            if stream is None:
                return None
            # not the demuxer's last, empty one, nor those an MP4's edit list cuts (a clip trimmed
            # with `ffmpeg -ss ... -c copy`): decoded, they are dropped, and OpenCV never gives them
            packets = [(p.pts, p.duration) for p in c.demux(stream) if p.size and not p.is_discard]
            time_base = stream.time_base
    except (av.FFmpegError, OSError, ValueError):
        return None
    if not packets or any(t is None for t, _ in packets):
        return None
    packets.sort()
    if lead > 0 and len(packets) > 1:  # cut half a frame early: a time rounded to the millisecond stays in
        step = min(b - a for (a, _), (b, _) in zip(packets, packets[1:]))
        cut = packets[0][0] + round(lead / time_base) - step / 2
        packets = [p for p in packets if p[0] >= cut]
    pts = [t - packets[0][0] for t, _ in packets]
    if any(b <= a for a, b in zip(pts, pts[1:])):
        return None
    last = packets[-1][1] or (pts[-1] - pts[-2] if len(pts) > 1 else 0)
    if last <= 0:
        return None
    return FrameTimes(pts, Fraction(time_base), last)


def remux(video: str | os.PathLike, dest: str | os.PathLike, audio_from: str | os.PathLike | None = None,
          times: FrameTimes | None = None, lead: float = 0.0) -> str | None:
    """Write `dest` (MP4): the video stream of `video` with its frames at `times` if given (one
    time per frame; else as they are), and the first audio stream of `audio_from` if given,
    interleaved by time; `lead` seconds of that sound after the source's picture starts are
    skipped too (SourceInfo.lead: those before its first decodable frame, `video`'s first).
    Returns what happened to the audio ('aac copied', 'pcm_s16le re-encoded to AAC'; None
    without audio). ValueError if `audio_from` has no audio stream or `times` does not hold
    one time per frame."""
    import av

    fmt = "mov" if str(dest).lower().endswith(".mov") else "mp4"
    with contextlib.ExitStack() as stack:
        src = None if audio_from is None else stack.enter_context(av.open(str(audio_from)))
        vid = stack.enter_context(av.open(str(video)))
        out = stack.enter_context(av.open(str(dest), "w", format=fmt))
        v_in = vid.streams.video[0]
        streams = [out.add_stream_from_template(v_in)]
        pictures = vid.demux(v_in)
        if times is not None:
            streams[0].time_base = times.time_base
            pictures = _retimed(pictures, times)
        timed, how = [_timed(pictures, 0)], None
        if src is not None:
            how, sound = _audio(src, dest, out, streams, lead)
            timed.append(_timed(sound, 1))
        for _, kind, _, packet in heapq.merge(*timed):
            packet.stream = streams[kind]
            out.mux(packet)
    return how


def _retimed(packets, times: FrameTimes):
    """`packets` (one frame each, in order: OpenCV's MPEG-4 Part 2 has no B-frames) at `times`."""
    n = 0
    for p in packets:
        if not p.size:  # the demuxer's last, empty packet
            continue
        if n == len(times.pts) or p.pts != p.dts:
            raise ValueError(f"{len(times.pts)} frame times for more frames" if n == len(times.pts) else
                             "its frames are stored out of order")
        end = times.pts[n + 1] if n + 1 < len(times.pts) else times.pts[-1] + times.last
        p.time_base, p.pts, p.dts, p.duration = times.time_base, times.pts[n], times.pts[n], end - times.pts[n]
        n += 1
        yield p
    if n != len(times.pts):
        raise ValueError(f"{len(times.pts)} frame times for {n} frames")


def _audio(src, dest, out, streams: list, lead: float = 0.0) -> tuple[str, Iterator]:
    """(what happens to it, its packets for `out`): the first audio stream of the opened `src`,
    added to `out` and `streams`; its times shifted so that the first picture of `src`, `lead`
    seconds on, is at 0."""
    import av

    audio = next((s for s in src.streams if s.type == "audio"), None)
    if audio is None:
        raise ValueError(f"{src.name}: no audio stream")
    first = film_stream(src)
    start = float(first.start_time * first.time_base) if first is not None and first.start_time else 0.0
    shift = round((start + lead) / audio.time_base)  # the picture starts at 0 in `video`
    name = audio.codec_context.codec.canonical_name
    if copied(name, dest):
        streams.append(out.add_stream_from_template(audio))

        def packets():
            for p in src.demux(audio):
                if p.pts is None:  # the demuxer's last, empty packet
                    continue
                p.pts -= shift
                p.dts = None if p.dts is None else p.dts - shift
                yield p
        return f"{name} copied", packets()
    ctx = audio.codec_context
    if ctx.layout.name == f"{ctx.layout.nb_channels} channels":  # unnamed channels (a plain WAV's)
        ctx.layout = av.AudioLayout(f"{ctx.layout.nb_channels}c")  # decoded as the usual: AAC refuses unnamed
    streams.append(out.add_stream("aac", rate=ctx.sample_rate, layout=ctx.layout))

    def encoded():
        for frame in itertools.chain(src.decode(audio), [None]):  # None: flush the encoder
            if frame is not None and frame.pts is not None:
                frame.pts -= shift
            yield from streams[1].encode(frame)
    return f"{name} re-encoded to AAC", encoded()
