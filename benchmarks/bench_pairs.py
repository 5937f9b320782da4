#!/usr/bin/env python3
"""Speed of build_pairs.py against its two yardsticks, in one run on one machine.

1. decode-only: OpenCV reading every frame of the video with its default settings and doing
   nothing else - the physical limit (goal: build_pairs >= 70 % of it);
2. naive: decode + for every frame a full-resolution SSIM with each of its `window` later
   neighbours (each pair once), i.e. what scoring pairs costs without the small-gray,
   batched scheme (goal: build_pairs >= 10x faster). Measured on a few frames and
   extrapolated; the naive pipeline writes no frames, so it is flattered.

build_pairs is timed as the library call the CLI makes (annotator.pairs.build_movie, default
options: 512 short side, JPEG 95, window 19, SSIM at 64x64, encoder threads = CPU cores),
writing to a temporary folder. Decode and build runs alternate and the median is reported,
so background load hits both alike.

3. stages (--stages): the CPU time of each step of the build on one thread (best of several
   passes over the clip's frames), with the alternatives that were considered for the slow
   ones: where a frame's time goes, and why the goal is or is not reachable on this machine.

  python benchmarks/bench_pairs.py                       # the sample clip
  python benchmarks/bench_pairs.py --video film.mkv --repeat 3
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cliutil import (DefaultsFormatter, OneLineParser, non_negative_int, positive_int, quiet_opencv,  # noqa: E402
                     run_cli)

quiet_opencv()  # before cv2 loads: a bad --video is our one line, not OpenCV's warnings too
import cv2  # noqa: E402

from annotator.color import rgb_to_gray  # noqa: E402
from annotator.pairs import BuildOptions, build_movie  # noqa: E402
from annotator.similarity import ssim  # noqa: E402
from annotator.video import FrameSourceError, iter_frames, probe  # noqa: E402

PROG = "bench_pairs.py"
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "bigbuckbunny.mp4"


def decode_only(video: Path) -> tuple[float, float]:
    """(frames/s, CPU ms per frame summed over all threads)."""
    cap = cv2.VideoCapture(str(video))
    t, c = time.perf_counter(), time.process_time()
    n = 0
    while cap.read()[0]:
        n += 1
    dt, dc = time.perf_counter() - t, time.process_time() - c
    cap.release()
    return n / dt, dc / n * 1000


def build(video: Path, options: BuildOptions) -> tuple[float, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench_pairs_"))
    try:
        t, c = time.perf_counter(), time.process_time()
        n = build_movie(video, tmp, options=options)["frame_count"]
        return n / (time.perf_counter() - t), (time.process_time() - c) / n * 1000
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def naive(video: Path, window: int, frames: int) -> tuple[float, float]:
    """(frames/s of decode + `window` full-res SSIMs per frame, seconds per pair)."""
    grays = [rgb_to_gray(f) for _, _, f in iter_frames(video, stop=frames + window)]
    t = time.perf_counter()
    pairs = 0
    for i in range(frames):
        for d in range(1, window + 1):
            ssim(grays[i], grays[i + d])
            pairs += 1
    per_pair = (time.perf_counter() - t) / pairs
    t, n = time.perf_counter(), 0
    for _, _, f in iter_frames(video):
        rgb_to_gray(f)
        n += 1
    decode_gray = (time.perf_counter() - t) / n
    return 1.0 / (decode_gray + window * per_pair), per_pair


def stage_costs(video: Path, opts: BuildOptions, passes: int = 5) -> list[str]:
    """CPU ms per frame of each build step on one thread (OpenCV single-threaded), best of `passes`."""
    import numpy as np

    from annotator.pairs import stored_size
    from annotator.similarity import NeighbourTable, fast_resize, small_gray

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_stages_"))
    try:
        def cpu(fn, items) -> float:
            best = float("inf")
            for _ in range(passes):
                t = time.process_time()
                for x in items:
                    fn(x)
                best = min(best, (time.process_time() - t) / len(items))
            return best * 1000

        def decode(_):
            cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
            while cap.read()[0]:
                pass

        frames = [f for _, _, f in iter_frames(video, bgr=True)]
        w, h = stored_size(frames[0].shape[1], frames[0].shape[0], opts.size)
        stored = [fast_resize(f, w, h) for f in frames]
        q = [cv2.IMWRITE_JPEG_QUALITY, opts.quality]
        jpgs = [cv2.imencode(".jpg", f, q)[1] for f in stored]
        smalls = [small_gray(f, opts.sim_size, bgr=True) for f in stored]
        names = iter(range(10**9))

        def push_all(_):
            table = NeighbourTable(opts.window, opts.metric)
            for s in smalls:
                table.push(s)

        def old_small_gray(f):  # colour downscale first, then gray (the version before 2026-11-25)
            small = fast_resize(f, opts.sim_size, opts.sim_size)[:, :, ::-1]
            return small.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]) / 255

        n = len(frames)
        rows = [
            ("decode, 1 decoder thread", cpu(decode, [0]) / n),
            (f"resize to {w}x{h}: halvings + bilinear (used)", cpu(lambda f: fast_resize(f, w, h), frames)),
            (f"resize to {w}x{h}: INTER_AREA (rejected)", cpu(
                lambda f: cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA), frames)),
            (f"JPEG {opts.quality} encode (used; OpenCV default: no Huffman optimisation)",
             cpu(lambda f: cv2.imencode(".jpg", f, q), stored)),
            (f"JPEG {opts.quality} encode with IMWRITE_JPEG_OPTIMIZE=1 (rejected)",
             cpu(lambda f: cv2.imencode(".jpg", f, q + [cv2.IMWRITE_JPEG_OPTIMIZE, 1]), stored)),
            ("write the file", cpu(lambda b: b.tofile(tmp / f"{next(names)}.jpg"), jpgs)),
            (f"{opts.sim_size}x{opts.sim_size} gray: gray first, then downscale (used)",
             cpu(lambda f: small_gray(f, opts.sim_size, bgr=True), stored)),
            (f"{opts.sim_size}x{opts.sim_size} gray: downscale colour, then gray (before)",
             cpu(old_small_gray, stored)),
            (f"{opts.metric.upper()} against {opts.window} earlier neighbours", cpu(push_all, [0]) / n),
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        cv2.setNumThreads(threads)
    return [f"| {name} | {ms:.2f} |" for name, ms in rows]


def make_1080p(src: Path, dst: Path) -> Path:
    """The sample upscaled to 1920x1080 and re-encoded (MPEG-4 Part 2, the encoder OpenCV
    ships): closer to a film's decode cost per frame than the small 720p clip."""
    out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), 25, (1920, 1080))
    for _, _, f in iter_frames(src, bgr=True):
        out.write(cv2.resize(f, (1920, 1080), interpolation=cv2.INTER_CUBIC))
    out.release()
    return dst


def measure(video: Path, opts: BuildOptions, repeat: int, naive_frames: int) -> list[str]:
    decode, builds = [], []
    build(video, opts)  # warm-up: imports, file cache
    for _ in range(repeat):
        decode.append(decode_only(video))
        builds.append(build(video, opts))
    decode_fps, build_fps = [d[0] for d in decode], [b[0] for b in builds]
    dec, bld = statistics.median(decode_fps), statistics.median(build_fps)
    dec_cpu, bld_cpu = statistics.median(d[1] for d in decode), statistics.median(b[1] for b in builds)
    naive_fps, per_pair = naive(video, opts.window, naive_frames)
    cap = cv2.VideoCapture(str(video))
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    return [
        f"| {video.name} {w}x{h} | decode only (OpenCV defaults) | {dec:.0f} | CPU {dec_cpu:.1f} ms/frame |",
        f"| | build_pairs (library call) | {bld:.0f} | {bld / dec:.0%} of decode-only (goal >= 70 %); "
        f"CPU {bld_cpu:.1f} ms/frame |",
        f"| | naive per-pair full-res SSIM ({per_pair * 1000:.0f} ms/pair) | {naive_fps:.2f} | "
        f"build_pairs {bld / naive_fps:.0f}x faster (goal >= 10x) |",
        f"<!-- {video.name} runs (decode, build): "
        + ", ".join(f"({d:.0f}, {b:.0f})" for d, b in zip(decode_fps, build_fps)) + " -->",
    ]


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--video", type=Path, default=SAMPLE, help="video file to measure on")
    p.add_argument("--no-1080p", action="store_true",
                   help="skip the second measurement on the video upscaled to 1080p")
    p.add_argument("--repeat", type=positive_int, default=5,
                   help="alternating decode/build runs; the median is reported")
    p.add_argument("--naive-frames", type=positive_int, default=3, help="frames the naive SSIM is timed on")
    p.add_argument("--size", type=int, default=512, help="build_pairs --size (0 or a multiple of 8)")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="build_pairs --threads, 0 = CPU cores")
    p.add_argument("--decode-threads", type=non_negative_int, default=None,
                   help="decoder threads in build (default: library's)")
    p.add_argument("--stages", action="store_true",
                   help="also time each build step on one thread (CPU ms per frame), with the rejected alternatives")
    return run_cli(PROG, run, p.parse_args(argv), errors=(FrameSourceError, ValueError))


def run(args: argparse.Namespace) -> int:
    opts = BuildOptions(size=args.size, threads=args.threads or (os.cpu_count() or 1))
    if args.decode_threads is not None:
        opts = BuildOptions(**{**opts.__dict__, "decode_threads": args.decode_threads})
    opts.validate()
    info = probe(args.video)  # a missing or unreadable file fails here, not in the middle of the timings
    if info.kind != "video":
        raise ValueError(f"--video {args.video}: a folder; the yardsticks decode a video file")
    if info.frame_count is not None and args.naive_frames + opts.window > info.frame_count:
        raise ValueError(f"--naive-frames {args.naive_frames}: the naive SSIM needs {opts.window} frames after "
                         f"each, and {args.video.name} has {info.frame_count} frames")
    load_before = os.getloadavg()[0]
    rows = measure(args.video, opts, args.repeat, args.naive_frames)
    if not args.no_1080p:
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure(make_1080p(args.video, Path(tmp) / f"{args.video.stem}_1080p.mp4"), opts,
                            args.repeat, args.naive_frames)
    stage_rows = stage_costs(args.video, opts) if args.stages else []
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {datetime.date.today()}; "
          f"1-min load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"build: --size {opts.size}, JPEG {opts.quality}, window {opts.window}, SSIM on "
          f"{opts.sim_size}x{opts.sim_size}, {opts.threads} encoder threads, decoder threads "
          f"{opts.decode_threads or 'auto'}; medians of {args.repeat} alternating runs")
    print()
    print("| video | pipeline | frames/s | |")
    print("|---|---|---:|---|")
    print("\n".join(r for r in rows if not r.startswith("<!--")))
    print()
    print("\n".join(r[5:-4] for r in rows if r.startswith("<!--")))
    if stage_rows:
        print()
        print(f"| {args.video.name}: build step, one thread | CPU ms/frame |")
        print("|---|---:|")
        print("\n".join(stage_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
