"""The input film's sound in the colour video.

OpenCV writes video only, so the soundtrack of a colourised film would be lost. Once the
video is written, `add_audio` remuxes it (its packets copied, not re-encoded) together with
the first audio stream of the source. The audio packets are copied too where the container
(MP4, or QuickTime for a .mov name) can hold the codec; anything else (PCM from a .mov or
.avi, Vorbis, Opus or FLAC into a .mov, ...) is re-encoded to AAC.
Audio is shifted by the source video's start time (a cover picture is no video), so sound and
picture keep the offset they had in the source: sound from before the first picture gets
negative times, which the MP4's edit list skips in playback (and AAC's priming packet keeps
its place before 0). PyAV (FFmpeg's libraries) does the demuxing and muxing.
"""
from __future__ import annotations

import heapq
import itertools
import os
from typing import Iterator

MP4_AUDIO = ("aac", "mp3", "ac3", "eac3", "alac", "opus", "flac")  # what the MP4 muxer takes as it is
MOV_AUDIO = ("aac", "mp3", "ac3", "eac3", "alac")  # QuickTime's muxer refuses Opus and FLAC


def copied(codec: str | None, dest: str | os.PathLike) -> bool:
    """Whether add_audio copies `codec`'s packets into `dest` (.mov: QuickTime, else MP4) as they are."""
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


def add_audio(video: str | os.PathLike, source: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Write `dest` (MP4): the video stream of `video` and the first audio stream of `source`,
    interleaved by time; returns what happened to the audio ('aac copied', 'pcm_s16le
    re-encoded to AAC'). ValueError if `source` has no audio stream."""
    import av

    fmt = "mov" if str(dest).lower().endswith(".mov") else "mp4"
    with av.open(str(source)) as src, av.open(str(video)) as vid, av.open(str(dest), "w", format=fmt) as out:
        audio = next((s for s in src.streams if s.type == "audio"), None)
        if audio is None:
            raise ValueError(f"{source}: no audio stream")
        v_in = vid.streams.video[0]
        streams = [out.add_stream_from_template(v_in)]
        # the film's first picture; not a cover (an attached picture: an MP3's or M4A's), which has
        # no time of its own (FFmpeg gives it the sound's start: an MP3's encoder delay)
        first = next((s for s in src.streams.video if not s.disposition & av.stream.Disposition.attached_pic), None)
        start = float(first.start_time * first.time_base) if first is not None and first.start_time else 0.0
        shift = round(start / audio.time_base)  # the picture starts at 0 in `video`
        name = audio.codec_context.codec.canonical_name
        if copied(name, dest):
            streams.append(out.add_stream_from_template(audio))

            def audio_packets():
                for p in src.demux(audio):
                    if p.pts is None:  # the demuxer's last, empty packet
                        continue
                    p.pts -= shift
                    p.dts = None if p.dts is None else p.dts - shift
                    yield p
            how = f"{name} copied"
        else:
            ctx = audio.codec_context
            if ctx.layout.name == f"{ctx.layout.nb_channels} channels":  # unnamed channels (a plain WAV's)
                ctx.layout = av.AudioLayout(f"{ctx.layout.nb_channels}c")  # decoded as the usual: AAC refuses unnamed
            streams.append(out.add_stream("aac", rate=ctx.sample_rate, layout=ctx.layout))

            def audio_packets():
                for frame in itertools.chain(src.decode(audio), [None]):  # None: flush the encoder
                    if frame is not None and frame.pts is not None:
                        frame.pts -= shift
                    yield from streams[1].encode(frame)
            how = f"{name} re-encoded to AAC"

        for _, kind, _, packet in heapq.merge(_timed(vid.demux(v_in), 0), _timed(audio_packets(), 1)):
            packet.stream = streams[kind]
            out.mux(packet)
    return how

