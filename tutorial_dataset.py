"""Training pairs from a DATA_ROOT built by build_pairs.py, in the ControlNet convention.

Each item starts from a reference frame i that has at least one partner j in the band
(low < sim(i, j) < high, |i - j| >= min_gap, same movie) and draws one partner at random on
every access:

    jpg   target (= the partner) RGB frame, HWC float32 in [-1, 1]
    txt   the prompt (default blank " ")
    hint  HWC float32 in [0, 1]: reference RGB (3 channels) + BT.601 gray of the target (1)
    movie, ref_index, target_index   where the pair came from

Reference and target get the same crop and the same horizontal flip. Frames are resized to
cover the crop size (kept aspect), then cropped, so non-square films work at any training
size (multiples of 64). The band is applied here, at load time, so it can change without
rebuilding DATA_ROOT. Splits are by movie: validate/test on films the model never saw.

Latent mode (vae_fingerprint=...): instead of `jpg`, items carry the cached VAE posteriors
(CHW float32, unscaled) `jpg_latent_mean`, `jpg_latent_std` (target) and `ref_latent_mean`
(reference), cut to the crop's window of the whole frame's latents: what the training step
uses, and nothing it does not (the target image, 3 MB at 512x512, and the reference's std
would only be copied to the GPU). The target still gives `hint` its gray. Crops are then on
the 8-pixel grid, frames are never flipped (a flipped latent is not the latent
of the flipped image), and the stored frames must already have the training size in one
side (build_pairs.py --size equal to the crop's short side). A window equals VAE(crop) (to
fp16) only when the frame is exactly the crop; in a larger frame it also carries context
from outside the crop (convolutions, the VAE's mid-block attention), an approximation
measured in docs/TRAINING.md.

Randomness: with seed=None every access draws from torch's RNG, that of the loader process it
runs in (so torch.manual_seed and DataLoader worker seeding make a run reproducible for a given
number of workers: another number draws other partners); with an integer seed item k is always
the same (for validation and tests).
"""
from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from functools import partial
from pathlib import Path
from typing import Sequence

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from annotator.color import rgb_to_gray
from annotator.latent_cache import LatentCacheError, load_latents, read_frame
from annotator.pairs import (
    DEFAULT_HIGH, DEFAULT_LOW, DEFAULT_MIN_GAP, frame_path, is_finished, list_movies, load_meta, load_similarity,
    pair_mask,
)
from atomicio import file_identity
from cldm.launch import DATA, run_seed


def _crop_size(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0 or h % 64 or w % 64:
        raise ValueError(f"training size must be positive multiples of 64, got {h}x{w}")
    return h, w


def make_hint(ref: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """The ControlNet hint of a pair of RGB uint8 crops: reference RGB + target gray, HWC float32 in [0, 1]."""
    return np.concatenate([ref.astype(np.float32) / 255.0, rgb_to_gray(tgt)[..., None]], axis=-1)


class NoPairsError(ValueError):
    """The band leaves no pair in the movies given."""


def no_movies(root: Path) -> ValueError:
    """A data root without finished movies; a movie's own folder given for it is named as such."""
    if is_finished(root):
        return ValueError(f"{root}: the folder of one movie; a data root is the folder that holds the movie "
                          f"folders ({root.parent})")
    return ValueError(f"{root}: no finished movies (run build_pairs.py)")


class PairDataset(Dataset):
    def __init__(
        self,
        data_root: str | Path,
        movies: Sequence[str] | None = None,
        *,
        low: float = DEFAULT_LOW,
        high: float = DEFAULT_HIGH,
        min_gap: int = DEFAULT_MIN_GAP,
        size: int | Sequence[int] = 512,
        augment: bool = True,
        prompt: str = " ",
        seed: int | None = None,
        vae_fingerprint: str | None = None,
        gray_latents: bool = False,
    ):
        self.root = Path(data_root)
        self.movies = list(movies) if movies is not None else list_movies(self.root)
        if not self.movies:
            raise no_movies(self.root)
        self.low, self.high, self.min_gap = low, high, min_gap
        self.crop = _crop_size(size)
        self.augment, self.prompt, self.seed = augment, prompt, seed
        self.latent_mode = vae_fingerprint is not None
        self.gray_latents = gray_latents and self.latent_mode
        self.meta, self.masks, self.latents, self._latent_ids = [], [], [], []
        refs, movie_of = [], []
        for k, mid in enumerate(self.movies):
            d = self.root / mid
            if not (d / "meta.json").is_file():
                raise ValueError(f"{d}: not a finished movie")
            meta = load_meta(d)  # a broken meta.json is named
            if meta.get("metric", "ssim") != "ssim" and (low, high) == (DEFAULT_LOW, DEFAULT_HIGH):
                warnings.warn(f"{d}: similarities are {meta['metric']}, but the default band {low}-{high} was "
                              "chosen for SSIM; pass low/high that suit that metric")
            mask = pair_mask(load_similarity(d), low, high, min_gap)
            self.meta.append(meta)
            self.masks.append(mask)
            r = np.flatnonzero(mask.any(axis=1))
            refs.append(r)
            movie_of.append(np.full(len(r), k, dtype=np.int32))
            w, h = meta["size"]
            scale = max(self.crop[0] / h, self.crop[1] / w)
            if not self.latent_mode:
                if scale > 1.0:
                    warnings.warn(f"{d}: frames are {w}x{h}, smaller than the training size {self.crop[1]}x"
                                  f"{self.crop[0]}: they are upscaled to it (rebuild with build_pairs.py --size of "
                                  "the training size)")
                elif scale < 1.0:  # two resizes per item: at 720p more than all its other work
                    warnings.warn(f"{d}: frames are {w}x{h}, larger than the training size {self.crop[1]}x"
                                  f"{self.crop[0]} needs: every item downscales two of them, which slows loading "
                                  "(rebuild with build_pairs.py --size of the training size)")
            else:
                if scale != 1.0:
                    raise ValueError(f"{d}: frames are {w}x{h}; latent mode needs them to cover the training "
                                     f"size {self.crop[1]}x{self.crop[0]} exactly in one side "
                                     f"(rebuild with build_pairs.py --size)")
                self.latents.append(load_latents(d, vae_fingerprint, gray=self.gray_latents))
                self._latent_ids.append(file_identity(self.latents[-1].filename))  # the file checked, for __setstate__
        self._refs = np.concatenate(refs).astype(np.int64)
        self._movie_of = np.concatenate(movie_of)
        metrics = {mid: str(meta.get("metric", "ssim")) for mid, meta in zip(self.movies, self.meta)}
        if len(set(metrics.values())) > 1:  # a band of one metric's scale picks copies (or nothing) in another's
            by = "; ".join(f"{x}: {', '.join(mid for mid in metrics if metrics[mid] == x)}"
                           for x in sorted(set(metrics.values())))
            warnings.warn(f"{self.root}: movies scored with different similarity metrics ({by}) share one band "
                          f"{low}-{high}; rebuild them with one build_pairs.py --metric")
        if len(self._refs) == 0:
            window = max((m.shape[1] - 1) // 2 for m in self.masks)
            why = (f": no gap above {window} frames is stored (the --window they were built with); rebuild them "
                   "with a larger build_pairs.py --window, or lower the gap") if min_gap > window else ""
            raise NoPairsError(f"{self.root}: no pairs with {low} < sim < {high} and gap >= {min_gap} "
                               f"in movies {', '.join(self.movies)}{why}")

    def __len__(self) -> int:
        return len(self._refs)

    def __getstate__(self) -> dict:
        # A pickled memmap carries its whole contents: each loader process started by spawn or
        # forkserver (macOS's default, Linux's from Python 3.14) would hold a RAM copy of the
        # cache. Send the file names; the process maps the files again, those that were checked.
        state = self.__dict__.copy()
        state["latents"] = [(a.filename, checked) for a, checked in zip(self.latents, self._latent_ids)]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        latents = []
        for name, checked in self.latents:
            if file_identity(name) != checked:  # rebuilt (build_latent_cache.py --overwrite) or moved since
                raise LatentCacheError(f"{name}: the latent cache changed after the run checked it; start the run again")
            latents.append(np.load(name, mmap_mode="r"))
        self.latents = latents

    def summary(self) -> str:
        """One line: how many frames have a partner in the band (only those are drawn, as
        reference or target), out of how many, and the pairs that makes."""
        frames = sum(len(m) for m in self.masks)
        pairs = int(sum(m.sum() for m in self.masks))
        return (f"{len(self)} of {frames} frames in {len(self.movies)} movie(s) have a partner with {self.low} < sim "
                f"< {self.high} and gap >= {self.min_gap}: {pairs} (reference, target) pairs")

    def partners(self, index: int) -> tuple[str, int, np.ndarray]:
        """(movie id, reference frame, all frames that may be drawn as its target)."""
        k, i = int(self._movie_of[index]), int(self._refs[index])
        w = (self.masks[k].shape[1] - 1) // 2
        return self.movies[k], i, i + np.flatnonzero(self.masks[k][i]) - w

    def __getitem__(self, index: int) -> dict:
        if self.seed is not None:
            rng = np.random.default_rng([self.seed, index])
        else:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return self.sample(index, rng)

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        """Item `index` with all randomness (partner, crop, flip) from `rng`."""
        mid, i, choices = self.partners(index)
        j = int(choices[rng.integers(len(choices))])
        k = int(self._movie_of[index])
        d, fmt = self.root / mid, self.meta[k]["image_format"]
        ref, tgt = read_frame(frame_path(d, i, fmt)), read_frame(frame_path(d, j, fmt))

        ch, cw = self.crop
        h, w = ref.shape[:2]
        scale = max(ch / h, cw / w)
        if scale != 1.0:
            size = (max(cw, math.ceil(w * scale - 1e-6)), max(ch, math.ceil(h * scale - 1e-6)))
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
            ref, tgt = (cv2.resize(a, size, interpolation=interp) for a in (ref, tgt))
            h, w = ref.shape[:2]
        grid = 8 if self.latent_mode else 1
        if self.augment:
            y0 = grid * int(rng.integers((h - ch) // grid + 1))
            x0 = grid * int(rng.integers((w - cw) // grid + 1))
            flip = bool(rng.random() < 0.5) and not self.latent_mode
        else:
            y0, x0, flip = (h - ch) // 2 // grid * grid, (w - cw) // 2 // grid * grid, False
        ref, tgt = ref[y0 : y0 + ch, x0 : x0 + cw], tgt[y0 : y0 + ch, x0 : x0 + cw]
        if flip:
            ref, tgt = ref[:, ::-1], tgt[:, ::-1]

        item = {
            "txt": self.prompt,
            "hint": make_hint(ref, tgt),
            "movie": mid,
            "ref_index": i,
            "target_index": j,
        }
        if self.latent_mode:
            lat = self.latents[k]
            win = (slice(y0 // 8, (y0 + ch) // 8), slice(x0 // 8, (x0 + cw) // 8))
            parts = 3 if self.gray_latents else 2  # the target's mean, std and, for v3, its gray's mean
            t = np.asarray(lat[j][(slice(parts), slice(None), *win)], np.float32)
            item.update(jpg_latent_mean=t[0], jpg_latent_std=t[1],
                        ref_latent_mean=np.asarray(lat[i][(0, slice(None), *win)], np.float32))
            if self.gray_latents:
                item["gray_latent_mean"] = t[2]
        else:
            jpg = tgt.astype(np.float32)  # to [-1, 1] in place: one full-size array, not three
            jpg /= 127.5
            jpg -= 1.0
            item["jpg"] = jpg
        return item


def pin_memory_default(accelerator: str = "auto") -> bool:
    """Pin batches iff they go to a CUDA GPU: Lightning's host-to-GPU copy then runs asynchronously."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def leave_stops_to_the_run() -> None:
    """In a data loader process: ignore SIGINT and pass SIGTERM on to the parent (the run), in a
    thread of its own, rather than stop wherever either comes. A scheduler's stop signals every
    process of a job, as Ctrl-C does the terminal's: torch's handler let a loader process die of a
    SIGTERM its parent did not send, inside the loader's shared lock too (the done event's, taken
    for every batch), and the run, stopping on its own SIGTERM, then waited for that lock for
    ever. The run hears both itself and ends its loader processes as on any stop. A SIGTERM from
    the parent is the loader ending a process that would not stop: it ends it, as torch's handler
    does. (Without sigwaitinfo, not Linux, torch's handling stays.)"""
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # in this thread and every one it starts

    def relay() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)
            try:
                os.kill(parent, signal.SIGTERM)
            except OSError:  # the parent is gone: the loader's watchdog ends this process
                pass

    threading.Thread(target=relay, name="SIGTERM to the run", daemon=True).start()


def start_loader_process(worker_id: int, rank: int | None) -> None:
    """The loaders' worker_init_fn: leave_stops_to_the_run, then Lightning's per-worker seeding
    (seed_everything(workers=True) sets PL_SEED_WORKERS), which Lightning adds only to a loader
    that has no worker_init_fn of its own."""
    leave_stops_to_the_run()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function
        pl_worker_init_function(worker_id, rank)


# Which datasets a Lightning stage uses (None: all of them).
_STAGE_PARTS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}


class PairDataModule(L.LightningDataModule):
    """Train / validation / test PairDatasets split by movie.

    val_movies=None holds out the last movie (sorted id) when there are at least two; [] means
    no validation. Validation and test use centre crops and a fixed partner per item.
    `setup(stage)` builds the datasets of that stage once: calling it again (the training
    script does, before Lightning) reuses them.

    Loaders keep the accelerator fed: `num_workers` persistent worker processes, each with
    `prefetch_factor` batches in flight (default: 2, more with fewer than 2 workers, so at
    least 4 batches are queued), and pinned (page-locked) batches when `pin_memory` (default:
    `pin_memory_default(accelerator)`, i.e. when training on a CUDA GPU). A worker passes a
    SIGTERM on to the run and ignores SIGINT (leave_stops_to_the_run).
    """

    def __init__(
        self,
        data_root: str | Path,
        batch_size: int = 4,
        num_workers: int = 4,
        val_movies: Sequence[str] | None = None,
        test_movies: Sequence[str] = (),
        size: int | Sequence[int] = 512,
        low: float = DEFAULT_LOW,
        high: float = DEFAULT_HIGH,
        min_gap: int = DEFAULT_MIN_GAP,
        prompt: str = " ",
        vae_fingerprint: str | None = None,
        gray_latents: bool = False,
        eval_seed: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        accelerator: str = "auto",
    ):
        super().__init__()
        self.data_root, self.batch_size, self.num_workers = Path(data_root), batch_size, num_workers
        self.pin_memory = pin_memory_default(accelerator) if pin_memory is None else pin_memory
        if num_workers > 0:
            self.prefetch_factor = prefetch_factor or max(2, math.ceil(4 / num_workers))
        else:
            self.prefetch_factor = None  # no workers: batches are made on demand (DataLoader refuses a factor)
        self.val_movies, self.test_movies = val_movies, list(test_movies)
        self.kw = dict(low=low, high=high, min_gap=min_gap, size=size, prompt=prompt, vae_fingerprint=vae_fingerprint,
                       gray_latents=gray_latents)
        self.eval_seed, self.seed = eval_seed, seed
        self.train = self.val = self.test = None
        self.no_val: str | None = None  # why there is no validation where it was left to the split
        self._built: set[str] = set()  # parts set up (a part may be None: no movies for it)

    def split(self) -> tuple[list[str], list[str], list[str]]:
        movies = list_movies(self.data_root)
        if not movies:
            raise no_movies(self.data_root)
        test = self.test_movies
        if self.val_movies is not None:
            val = list(self.val_movies)
        else:
            rest = [m for m in movies if m not in test]
            val = rest[-1:] if len(rest) >= 2 else []
        unknown = [m for m in val + test if m not in movies]
        if unknown:
            raise ValueError(f"{self.data_root}: no finished movie named {', '.join(unknown)}")
        train = [m for m in movies if m not in val and m not in test]
        if not train:
            raise ValueError(f"{self.data_root}: no movies left for training")
        return train, val, test

    def setup(self, stage: str | None = None) -> None:
        todo = [p for p in _STAGE_PARTS.get(stage, ("train", "val", "test")) if p not in self._built]
        if not todo:
            return
        movies = dict(zip(("train", "val", "test"), self.split()))
        for part in todo:
            if part == "train":
                ds = PairDataset(self.data_root, movies[part], augment=True, **self.kw)
            elif not movies[part]:
                ds = None
                if part == "val" and self.val_movies is None:
                    self.no_val = f"it holds out a whole movie, and {self.data_root} has no second one" + \
                        (" besides the test movies" if self.test_movies else "")
            else:
                try:
                    ds = PairDataset(self.data_root, movies[part], augment=False, seed=self.eval_seed, **self.kw)
                except NoPairsError as e:
                    if part != "val" or self.val_movies is not None:  # a movie asked for by name
                        raise
                    self.no_val = f"the movie it holds out, {movies[part][0]} (the last id), has no pairs in the band"
                    warnings.warn(f"no validation: {self.no_val} ({e})")
                    ds = None
            setattr(self, part, ds)
            self._built.add(part)

    def _loader(self, ds, shuffle: bool, sampler=None, generator: torch.Generator | None = None) -> DataLoader:
        rank = None if self.trainer is None else self.trainer.global_rank
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle if sampler is None else None,
                          sampler=sampler, drop_last=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, prefetch_factor=self.prefetch_factor,
                          pin_memory=self.pin_memory, worker_init_fn=partial(start_loader_process, rank=rank),
                          generator=generator)

    def train_dataloader(self) -> DataLoader:
        """The order of the samples and the loader processes' seeds (hence the partners drawn)
        come from the run's seed and the step it starts at, so a resumed run does not replay the
        batches it already trained on. Lightning's own DistributedSampler orders an epoch by
        (seed, epoch) alone, and torch's global RNG is drawn from when Lightning first iterates
        the loader, before ColorControlModule.on_train_start reseeds it for the step."""
        trainer = self.trainer
        seed = run_seed(self.seed, DATA, 0 if trainer is None else trainer.global_step)
        sampler = None if trainer is None or trainer.world_size == 1 else \
            DistributedSampler(self.train, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=True,
                               seed=seed)
        return self._loader(self.train, shuffle=True, sampler=sampler, generator=torch.Generator().manual_seed(seed))

    def val_dataloader(self):
        return self._eval_loader(self.val)

    def test_dataloader(self):
        return self._eval_loader(self.test)

    def _eval_loader(self, ds) -> DataLoader | list:
        """Its own generator: without one, each pass over the loader took its workers' base seed
        from torch's global RNG, the one the training noise comes from, so turning validation on
        changed the trained weights."""
        return [] if ds is None else self._loader(ds, shuffle=False, generator=torch.Generator().manual_seed(0))
