#!/usr/bin/env python3
"""Wall time of colorize_inference.py with its PNGs encoded in threads vs. in turn, in one run.

The CLI encodes each output PNG on a worker thread while the main thread makes the next
frames (colorize/outputs.py's PNG_THREADS at once). This runs the whole CLI on the sample clip
(decode, a baseline method, PNG writing; imports excluded) three ways: as shipped; with one
encoding thread; and "serial", every PNG encoded on the main thread before the next frame
is made (the path before 2026-11-28). Runs alternate and the median of --repeat is reported,
so background load hits all alike; the outputs of all runs are compared byte for byte.

  python benchmarks/bench_png_threads.py --method reinhard-bands
  python benchmarks/bench_png_threads.py --method flow --repeat 3
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import colorize_inference as cli  # noqa: E402
from colorize import outputs  # noqa: E402
from cliutil import DefaultsFormatter, OneLineParser, positive_int  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "bigbuckbunny.mp4"


class Serial:
    """A stand-in for ThreadPoolExecutor that encodes at submit, on the caller's thread: the old path."""

    def __init__(self, workers):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future
        done = Future()
        done.set_result(fn(*args))
        return done


def timed(args, out: Path, threads: int | None) -> float:
    """Seconds of one CLI run; `threads` None: encoded in turn on the main thread."""
    shipped, pool = outputs.PNG_THREADS, outputs.ThreadPoolExecutor
    outputs.PNG_THREADS = threads or 1
    if threads is None:
        outputs.ThreadPoolExecutor = Serial
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            rc = cli.main(["--input", str(args.input), "--reference-frame", "0", "--method", args.method,
                           "--frames", f"0:{args.frames}", "--no-progress", "--overwrite", "--out", str(out)])
        seconds = time.perf_counter() - start
    finally:
        outputs.PNG_THREADS, outputs.ThreadPoolExecutor = shipped, pool
    if rc != 0:  # its one line, e.g. a missing --input
        raise SystemExit(err.getvalue().strip().splitlines()[-1])
    return seconds


def main(argv=None) -> int:
    p = OneLineParser(prog="bench_png_threads.py", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsFormatter)
    p.add_argument("--input", type=Path, default=SAMPLE, help="clip to colourise (a video or frame folder)")
    p.add_argument("--method", default="reinhard-bands", choices=["reinhard", "reinhard-bands", "flow"],
                   help="baseline to run (no model needed)")
    p.add_argument("--frames", type=positive_int, default=132, help="the first N frames")
    p.add_argument("--repeat", type=positive_int, default=3, help="runs of each kind; the median is reported")
    args = p.parse_args(argv)
    kinds = {**{f"threads ({n})": n for n in dict.fromkeys([outputs.PNG_THREADS, 1])}, "serial": None}
    times = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for name, threads in kinds.items():
                times[name].append(timed(args, Path(tmp) / name, threads))
        outs = [{p.name: p.read_bytes() for p in (Path(tmp) / name).iterdir()} for name in kinds]
        same = all(o == outs[0] for o in outs)
    serial = statistics.median(times["serial"])
    print(f"# {datetime.date.today()}, {platform.machine()} with {os.cpu_count()} CPUs, {args.method}, "
          f"{args.frames} frames of {args.input.name}, median of {args.repeat}; outputs identical: {same}")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:>12}: {m:6.2f} s  {args.frames / m:6.1f} frames/s  {serial / m:4.2f}x serial")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
