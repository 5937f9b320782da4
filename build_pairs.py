"""Cut films into training frames and score every frame against its neighbours.

    python build_pairs.py film1.mkv film2.mp4 frames_of_film3/ --out data/films

Each input (a video file or a folder of frames) is one movie, stored under
DATA_ROOT/<movie id>/ (layout: annotator/pairs.py). Finished movies are skipped, so the
same command resumes a killed run. Pairs are chosen at load time (tutorial_dataset.py)
from the stored similarities, so the band can change without a rebuild.

A movie another run is building (on the same DATA_ROOT) is left to the end and waited for,
then counted as built by that run, or built here if that run died.

Exit status: 0 all inputs built or already built, 1 some input skipped (listed in the
summary), 2 bad arguments, inputs skipped and DATA_ROOT left without any movie (nothing to
train on), a --strict stop or a DATA_ROOT that is full or read-only (one line; a full disk
is not the movie's fault, so the run stops), 130 / 143 stopped by Ctrl-C / SIGTERM (the
movies being built are dropped, finished ones kept; rerun to resume).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from atomicio import removed_if_left_empty
from cliutil import (DefaultsFormatter, OneLineParser, exit_quietly, one_line, out_folder_problem, path_arg,
                     quiet_opencv, quiet_startup_signals, run_cli, too_many_files, too_many_files_error)

quiet_opencv()
if __name__ == "__main__":
    quiet_startup_signals()

from annotator.build_many import build_all
from annotator.pairs import (DEFAULT_WINDOW, IMAGE_FORMATS, MAX_SIM_SIZE, MAX_SIZE, MIN_SIM_SIZE, BuildOptions,
                             list_movies)
from annotator.similarity import METRICS, SIM_SIZE


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return i, n


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        description=__doc__.split("\n\n")[0] + " Each input file or folder is one movie.",
        epilog="Layout: DATA_ROOT/<movie id>/{frames/000000.jpg..., similarity.npy, meta.json}; the movie id "
               "is the file stem or folder name with letters and digits of any script, '_', '-' and '.' kept, "
               "any other character -> '_', leading dots dropped ('my film-1.v2.mp4' -> 'my_film-1.v2', "
               "'.hidden.mp4' -> 'hidden'). Finished movies are skipped, so rerunning resumes; one that another run "
               "is building is waited for at the end. Exit status: 0 all built or already built, 1 some input "
               "skipped, 2 bad arguments, inputs skipped and no movie in DATA_ROOT, a --strict stop or a "
               "full/read-only DATA_ROOT, 130/143 stopped by Ctrl-C/SIGTERM.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("inputs", type=path_arg, nargs="+", metavar="INPUT",
                   help="video files (mp4, mkv, avi, mov, ...) and/or folders of frame images; each is one movie. "
                        "A frame folder holds only images (sorted naturally: f2 before f10); hidden files and "
                        "sub-folders are ignored, any other file (a stray Thumbs.db) skips the whole folder")
    p.add_argument("--out", type=path_arg, required=True, metavar="DATA_ROOT", help="output folder (created if missing)")
    p.add_argument("--size", type=int, default=512,
                   help=f"short side of the stored frames in pixels: a multiple of 8 up to {MAX_SIZE} (an 8K "
                        "film's short side; training uses 512-768), aspect kept, long side rounded to a multiple "
                        "of 8; 0 keeps the source's short side, rounded down to a multiple of 8")
    p.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="jpg",
                   help="stored frame format")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (1-100)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help="neighbours scored on each side of every frame (capped at a movie's frame count - 1); "
                        "time and similarity.npy grow linearly with it: frames x (2 x window + 1) scores, 4 bytes "
                        "each")
    p.add_argument("--metric", choices=METRICS, default="ssim",
                   help="similarity: SSIM, correlation (ncc) or 1 - mean abs diff (l1) of the small gray frame")
    p.add_argument("--sim-size", type=int, default=SIM_SIZE,
                   help="the similarity is computed on the 8-bit BT.601 gray of the frame downscaled to this "
                        "square size (exact 2x pixel-averaging halvings, then one bilinear step); "
                        f"{MIN_SIM_SIZE} to {MAX_SIM_SIZE} (SSIM's 11x11 window needs {MIN_SIM_SIZE}; the last "
                        "--window frames are held at this size, 4 MB each at 512 for SSIM)")
    p.add_argument("--workers", type=int, default=1, help="movies built in parallel (processes)")
    p.add_argument("--threads", type=int, default=0,
                   help="resize/encode threads per movie; 0 = CPU cores divided by workers")
    p.add_argument("--decode-threads", type=int, default=0,
                   help="video decoder threads per movie; 0 = 1 when a movie has <= 2 threads (least CPU "
                        "per frame), else FFmpeg's default")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                   help="build only shard I of N (0-based; every N-th movie id in sorted order) so N "
                        "machines can split one collection; give all machines the same inputs "
                        "(default: everything)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad input instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    options = BuildOptions(size=args.size, window=args.window, metric=args.metric, sim_size=args.sim_size,
                           image_format=args.image_format, quality=args.quality, threads=args.threads,
                           decode_threads=args.decode_threads)
    options.validate()
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {args.workers})")
    if problem := out_folder_problem("--out", args.out):  # else a raw "[Errno 20] Not a directory"
        raise ValueError(problem)
    with removed_if_left_empty(args.out):  # a run that built nothing (every input bad) leaves no DATA_ROOT it made
        try:  # what the checks above cannot see (/proc/x, /sys/x): the OS's bare "[Errno 2] ...: '/proc/x'"
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"--out {args.out}: cannot make the folder ({e.strerror or one_line(e)})") from None
        # Ctrl-C or SIGTERM stops the workers and removes the partial output of unfinished movies
        try:
            summary = build_all(args.inputs, args.out, options, workers=args.workers, shard=args.shard or (0, 1),
                                strict=args.strict, progress=not args.no_progress)
        except OSError as e:  # else the bare "[Errno 24] Too many open files"
            if not too_many_files_error(e):
                raise
            raise OSError(f"{too_many_files(f'with --workers {args.workers}', '--workers')}; finished movies are "
                          "kept, rerun to resume") from None
    print(summary.text())
    if summary.stopped or (summary.skipped and not list_movies(args.out)):
        return 2  # DATA_ROOT holds no movie: a script's `$? = 1` must not read as "something to train on"
    return 1 if summary.skipped else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("build_pairs.py", run, parser().parse_args(argv), (ValueError, OSError),
                   interrupted="interrupted; finished movies are kept, rerun to resume", needs=("opencv", "av"))


if __name__ == "__main__":
    exit_quietly(main())
