#!/usr/bin/env python3
"""Training data loading: samples/s per loader process, and how many a GPU needs.

The training step is timed without data (bench_train.py); this times the other side, what
each DataLoader worker does per sample: read two stored frames (JPEG), crop, build the hint
(reference RGB + target gray as float32), and with the latent cache cut the crop's window
out of the cached posteriors. One process on one thread, as a loader worker runs (torch
sets one thread in workers; OpenCV is set to one here), so the rate is per worker and
per core. Then whole batches through `PairDataModule.train_dataloader()` (collation
included) with 0 and `--workers` worker processes.

Data: the embedded sample clip built by build_pairs at `--size` (912x512 frames at 512),
the default band. The latent cache is made by a stand-in encoder (8x8 average pooling to
SD's 4 latent channels, so the files have SD2.1's shapes): what the dataset reads does not
depend on the VAE's weights, and the real VAE would take minutes per frame batch on a CPU.

  python benchmarks/bench_loader.py                 # 512, latent cache and pixels, 2 workers
  python benchmarks/bench_loader.py --target 154    # workers needed for 154 samples/s per GPU
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from annotator.latent_cache import LatentCacheError, build_latent_cache, read_frame, vae_fingerprint  # noqa: E402
from annotator.pairs import BuildOptions, build_movie, frame_path, is_finished, list_movies, load_meta  # noqa: E402
from benchmarks.cliargs import json_problem, write_json  # noqa: E402
from cliutil import (DefaultsFormatter, OneLineParser, folder_problem, non_negative_int, positive_float,  # noqa: E402
                     positive_int, run_cli)
from tutorial_dataset import PairDataModule, PairDataset, make_hint  # noqa: E402

PROG = "bench_loader.py"

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "bigbuckbunny.mp4"
# Samples/s per GPU the loaders must keep up with: measured (bench_train.py --compile, batch 16,
# NVIDIA H200, BENCHMARKS.md) and issue #4's goal (40 % MFU on an H100 at 2.577 TFLOP/sample).
TARGETS = {"measured on an H200 (compiled)": 109.5, "40 % MFU on an H100": 154.0}


class PoolEncoder(nn.Module):
    """Stand-in VAE for the cache's shapes: 8x8 average pool, SD's 4 latent channels."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))  # encode_movie reads the dtype/device of a parameter

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        m = nn.functional.avg_pool2d(x, 8) * self.gain
        mean = torch.cat([m, m[:, :1]], dim=1)
        return SimpleNamespace(mean=mean, std=torch.ones_like(mean))


def built_at(root: Path) -> int | None:
    """The --size an earlier run built DATA_ROOT's sample at (None: nothing built yet): another
    size's frames do not fit this run's crops, and prepare() would reuse them."""
    for movie in list_movies(root) if root.is_dir() else []:
        if is_finished(root / movie):
            return load_meta(root / movie).get("short_side")
    return None


def prepare(root: Path, size: int) -> str:
    """DATA_ROOT with the sample at `size` and a stand-in latent cache; returns the fingerprint."""
    vae = PoolEncoder()
    if not any(is_finished(root / m) for m in list_movies(root)):
        build_movie(SAMPLE, root, options=BuildOptions(size=size))
    build_latent_cache(root, vae, progress=False, log=lambda line: None)
    return vae_fingerprint(vae)


def per_item(ds: PairDataset, n: int) -> float:
    """Seconds per item over n random items (after 3 warm-up items)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(ds), (n + 3,), generator=g).tolist()
    for i in idx[:3]:
        ds[i]
    t0 = time.perf_counter()
    for i in idx[3:]:
        ds[i]
    return (time.perf_counter() - t0) / n


def loader_rate(root: Path, fingerprint: str | None, size: int, batch: int, workers: int, batches: int) -> float:
    """Samples/s out of PairDataModule.train_dataloader() (the first batch, worker start-up
    included in it, is not timed)."""
    dm = PairDataModule(root, batch_size=batch, num_workers=workers, size=size, vae_fingerprint=fingerprint,
                        pin_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = (b for _ in iter(int, 1) for b in loader)  # epoch after epoch: the sample has ~100 items
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t0)
    it.close()
    return rate


def parts(root: Path, size: int, n: int) -> dict:
    """Milliseconds of an item's main parts, each alone: reading one stored frame, the hint."""
    d = root / list_movies(root)[0]
    paths = [frame_path(d, i) for i in range(n)]
    t0 = time.perf_counter()
    frames = [read_frame(p) for p in paths]
    read = (time.perf_counter() - t0) / n
    crops = [f[:size, :size] for f in frames]
    t0 = time.perf_counter()
    for ref, tgt in zip(crops, crops[1:] + crops[:1]):
        make_hint(ref, tgt)
    return {"read_frame_ms": read * 1e3, "hint_ms": (time.perf_counter() - t0) / n * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--size", type=positive_int, default=512,
                   help="stored frames' short side and training crop (a multiple of 64)")
    p.add_argument("--items", type=positive_int, default=100, help="items timed one by one per mode")
    p.add_argument("--batch-size", type=positive_int, default=16, help="batch size of the DataLoader runs")
    p.add_argument("--batches", type=positive_int, default=12, help="batches timed per DataLoader run")
    p.add_argument("--workers", type=non_negative_int, default=2,
                   help="worker processes of the second DataLoader run")
    p.add_argument("--data-root", type=Path,
                   help="keep the built data here, for reuse at the same --size (default: a temporary folder)")
    p.add_argument("--target", type=positive_float, action="append",
                   help="samples/s per GPU to size the workers for (repeatable; default: the TARGETS table)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.size % 64:
        p.error(f"--size {args.size}: must be a multiple of 64 (a training crop)")
    if args.data_root is not None:
        problem = folder_problem(args.data_root)
        if problem:
            p.error(f"--data-root {args.data_root}: {problem}")
        built = built_at(args.data_root)
        if built is not None and built != args.size:
            p.error(f"--data-root {args.data_root} holds the sample built at --size {built}: use --size {built} "
                    "or another folder")
    problem = json_problem(args.json)
    if problem:
        p.error(problem)
    return run_cli(PROG, run, args, errors=(ValueError, LatentCacheError))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or Path(tmp) / "data"
        fingerprint = prepare(root, args.size)
        results: dict = {"size": args.size, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                         "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                         "opencv": cv2.__version__}
        results.update(parts(root, args.size, min(args.items, 32)))
        for mode, fp in (("latent", fingerprint), ("pixels", None)):
            ds = PairDataset(root, size=args.size, vae_fingerprint=fp)
            s = per_item(ds, args.items)
            results[f"{mode}_item_ms"] = s * 1e3
            results[f"{mode}_items_per_s"] = 1 / s
        for workers in sorted({0, args.workers}):
            results[f"loader_latent_w{workers}_samples_per_s"] = loader_rate(
                root, fingerprint, args.size, args.batch_size, workers, args.batches)

    targets = {f"{v:g} samples/s": v for v in args.target} if args.target else TARGETS
    per_worker = results["latent_items_per_s"]
    results["workers_per_gpu"] = {name: math.ceil(v / per_worker) for name, v in targets.items()}
    print(f"{results['machine']}, torch {results['torch']}, OpenCV {results['opencv']}, {args.size} px crops")
    print(f"parts: read one frame {results['read_frame_ms']:.2f} ms, build the hint {results['hint_ms']:.2f} ms")
    for mode in ("latent", "pixels"):
        print(f"one item, {mode:6s}: {results[f'{mode}_item_ms']:6.2f} ms = "
              f"{results[f'{mode}_items_per_s']:6.1f} samples/s per worker")
    for workers in sorted({0, args.workers}):
        print(f"DataLoader, latent, batch {args.batch_size}, {workers} workers: "
              f"{results[f'loader_latent_w{workers}_samples_per_s']:.1f} samples/s")
    for name, n in results["workers_per_gpu"].items():
        print(f"workers per GPU for {targets[name]:g} samples/s ({name}): {n} (at {per_worker:.0f} per worker here)")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
