"""Latent cache: every stored frame encoded once by the frozen VAE.

A training step encodes the target and the reference with the VAE - about half the FLOPs
of a step at 512 - although the VAE never changes. Encoding each frame once and storing the
posterior lets the dataset hand out latents instead. Per movie, next to the frames:

    latents.npy    float16 (N, 2, C, H/8, W/8): [:, 0] posterior mean, [:, 1] posterior std,
                   *unscaled* (the diffusion model multiplies by its scale_factor); with `gray`
                   (N, 3, ...): [:, 2] the posterior mean of the frame's BT.601 gray as RGB,
                   which colour variant v3 feeds the UNet
    latents.json   the VAE fingerprint, frame size, shape, precision; removed before a new
                   latents.npy is renamed into place and written last, so a cache without it
                   is unfinished and gets rebuilt (never new latents with old metadata)
    latents.lock   held by the run writing the cache (build_latent_cache), removed after it

latents.npy is written with plain file writes, not through a memory map: on a full disk a
write into a memory map kills the process with SIGBUS, a plain write raises an OSError that
is reported. A latents.npy whose size or shape does not fit the frames (cut short by a full
disk or a copy) counts as not built.

The fingerprint is a SHA-256 over the VAE's state_dict (names, shapes, float32 values): a
cache made with other weights is refused instead of silently feeding wrong latents.
Augmentation note: latents belong to whole frames, so crops are taken on the 8-pixel grid
and frames are not flipped in latent mode (a flipped latent is not the latent of the
flipped image).

What the cache equals: for frames exactly the training crop, VAE(crop) up to fp16 storage
(2^-11 relative per value). For larger frames the dataset cuts the crop's window out of the
whole frame's latents, which only approximates VAE(crop): the encoder's convolutions reach
past the crop and its mid-block attention mixes the whole frame. On the tiny architecture
at 64 px the window differed from VAE(crop) by 16-18 % (relative L2, trained toy VAE) and
the training loss by a median 4-5 %; measurements and the SD2.1 caveat in docs/TRAINING.md.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from annotator.color import rgb_to_gray
from annotator.pairs import frame_path, is_finished, list_movies, load_meta, read_json
from annotator.video import bgr_to_rgb, png_damaged
from atomicio import sync_folder, try_lock

LATENTS, LATENTS_META, LATENTS_LOCK = "latents.npy", "latents.json", "latents.lock"
CACHE_VERSION = 1


class LatentCacheError(Exception):
    """Missing, unfinished or foreign latent cache; str(e) is one line naming the movie."""


class BadFrameError(LatentCacheError):
    """A stored frame that cannot be encoded (unreadable, or of another size than meta.json
    gives): its movie is skipped, the others are still cached."""


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """SHA-256 (hex) of the VAE weights; equal iff the state_dicts hold equal values."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def read_frame(path: Path) -> np.ndarray:
    """A stored frame as RGB uint8 HWC; OSError naming the file if it cannot be read. Read by
    Python, decoded by OpenCV: cv2.imread crashes the process (SIGSEGV) on a path that is not
    UTF-8, such as a data root on an old Latin-1 share."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        data = np.empty(0, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size and not png_damaged(data) else None
    if img is None:
        raise OSError(f"{path}: cannot read frame")
    return bgr_to_rgb(img)


REBUILD = "rebuild the movie with build_pairs.py (remove its folder first: finished movies are skipped)"


def _stored_frame(movie_dir: Path, index: int, fmt: str, w: int, h: int) -> np.ndarray:
    """read_frame, refusing a frame of another size than meta.json gives (a frame replaced by
    hand): np.stack's "all input arrays must have the same shape" names no file, and a batch of
    such frames alone would be encoded into latents of another shape."""
    path = frame_path(movie_dir, index, fmt)
    try:
        img = read_frame(path)
    except OSError as e:
        raise BadFrameError(f"{e}; {REBUILD}") from None
    if img.shape[:2] != (h, w):
        raise BadFrameError(f"{path}: a {img.shape[1]}x{img.shape[0]} frame, but {movie_dir / 'meta.json'} says the "
                            f"movie's frames are {w}x{h}; {REBUILD}")
    return img


def partial_files(movie_dir: Path) -> tuple[Path, Path]:
    """Where encode_movie writes latents.npy and latents.json before renaming them."""
    return movie_dir / (LATENTS + ".partial"), movie_dir / (LATENTS_META + ".partial")


LATENTS_META_KEYS = ("vae_fingerprint", "frame_size")  # what the readers take without a default


def cache_info(movie_dir: str | os.PathLike) -> dict | None:
    """A movie's latents.json, None if there is none; ValueError naming it if it is not JSON or
    lacks what readers need (or holds a fingerprint that is no string), as load_meta for meta.json
    (a KeyError names no file)."""
    p = Path(movie_dir) / LATENTS_META
    if not p.is_file():
        return None
    info = read_json(p)
    if missing := [k for k in LATENTS_META_KEYS if k not in info]:
        raise ValueError(f"{p}: no {missing[0]!r} entry (not a latents.json written by build_latent_cache.py)")
    if not isinstance(info["vae_fingerprint"], str):  # readers slice and compare it: a TypeError naming nothing
        raise ValueError(f"{p}: its 'vae_fingerprint' holds a {type(info['vae_fingerprint']).__name__}, not a "
                         "string (not a latents.json written by build_latent_cache.py)")
    return info


def _npy_header(f) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of an open .npy file; ValueError if it has no whole header."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f".npy version {version}")
    shape, _, dtype = read(f)
    return shape, dtype, f.tell()


def cache_problem(movie_dir: str | os.PathLike, info: dict, meta: dict) -> str | None:
    """Why latents.npy is not the cache `info` describes for the movie's frames, or None.

    From the header and the file size, without reading the latents: a file cut short would
    otherwise count as built and fail only in training, in numpy's "mmap length is greater
    than file size"."""
    path = Path(movie_dir) / LATENTS
    n, (w, h) = meta["frame_count"], meta["size"]
    if info.get("frame_size") != [w, h]:
        return f"made from frames of {info.get('frame_size')}, the movie's are {w}x{h}"
    try:
        with open(path, "rb") as f:
            shape, dtype, offset = _npy_header(f)
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{LATENTS} is missing"
    except ValueError:
        return "not a whole .npy file"
    want = [n, 3 if info.get("gray") else 2, "C", h // 8, w // 8]
    if dtype != np.float16 or len(shape) != 5 or [*shape[:2], *shape[3:]] != want[:2] + want[3:]:
        return f"shape {list(shape)} {dtype}, but {n} frames of {w}x{h} need {want} float16"
    if size != offset + math.prod(shape) * 2:
        return f"{size} bytes, but its shape needs {offset + math.prod(shape) * 2}: cut short?"
    return None


def load_latents(movie_dir: str | os.PathLike, fingerprint: str, gray: bool = False) -> np.ndarray:
    """The movie's cached posteriors (memory-mapped), or LatentCacheError if absent/foreign
    (or, with `gray`, without the gray latents)."""
    movie_dir = Path(movie_dir)
    info = cache_info(movie_dir)
    if info is None:
        raise LatentCacheError(f"{movie_dir}: no latent cache (run build_latent_cache.py)")
    if info["vae_fingerprint"] != fingerprint:
        raise LatentCacheError(
            f"{movie_dir}: latent cache was made by other VAE weights "
            f"({info['vae_fingerprint'][:12]}..., expected {fingerprint[:12]}...); rebuild it: build_latent_cache.py --overwrite"
        )
    if gray and not info.get("gray"):
        raise LatentCacheError(f"{movie_dir}: latent cache has no gray latents, which colour variant v3 needs "
                               "(rerun build_latent_cache.py with --gray added: it rebuilds such a cache)")
    if problem := cache_problem(movie_dir, info, load_meta(movie_dir)):
        raise LatentCacheError(f"{movie_dir / LATENTS}: latent cache does not match the frames ({problem}); "
                               "rerun build_latent_cache.py")
    return np.load(movie_dir / LATENTS, mmap_mode="r")


@contextlib.contextmanager
def _writing(dest: Path, size: int):
    """An OSError of the writes inside as one line naming the cache file and, on a full disk,
    the space it needs (the bare error says only "[Errno 28] No space left on device")."""
    try:
        yield
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        need = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{math.ceil(size / 2**10)} KiB"
        hint = f"; it needs {need}: free some space and rerun" if full else ""
        raise OSError(f"{dest}: cannot write the latent cache ({e.strerror or e}){hint}") from e


def _write_npy_header(f, shape: Sequence[int]) -> None:
    """The header of a float16 .npy of `shape`; the data are appended batch by batch."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)


@torch.no_grad()
def encode_movie(
    movie_dir: str | os.PathLike,
    vae: torch.nn.Module,
    fingerprint: str | None = None,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    gray: bool = False,
) -> dict:
    """Encode every frame (with `gray`, also its gray) of one finished movie; write latents.npy
    + latents.json atomically."""
    movie_dir = Path(movie_dir)
    meta = load_meta(movie_dir)
    n, (w, h) = meta["frame_count"], meta["size"]
    if w % 8 or h % 8:
        raise LatentCacheError(f"{movie_dir}: frames are {w}x{h}; the VAE needs multiples of 8 (rebuild with --size)")
    fingerprint = fingerprint or vae_fingerprint(vae)
    param = next(vae.parameters())
    device, dtype = param.device, param.dtype
    dest = movie_dir / LATENTS
    tmp, tmp_json = partial_files(movie_dir)
    f = shape = size = None
    fmt = meta["image_format"]
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
            load = lambda b: np.stack([_stored_frame(movie_dir, i, fmt, w, h) for i in b])  # noqa: E731
            nxt = pool.submit(load, batches[0]) if batches else None
            for k, b in enumerate(batches):
                imgs = nxt.result()
                nxt = pool.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
                x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).contiguous().to(dtype) / 127.5 - 1.0
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    post = vae.encode(x)
                    parts = [post.mean, post.std]
                    if gray:  # as cldm.color.build_concat encodes the hint's gray: [0, 1] -> [-1, 1], 3 channels
                        g = torch.from_numpy(rgb_to_gray(imgs)).to(device, dtype)
                        parts.append(vae.encode((g * 2 - 1)[:, None].expand(-1, 3, -1, -1)).mean)
                moments = torch.stack(parts, dim=1).float().cpu().numpy().astype(np.float16)
                if f is None:
                    shape, size = [n, *moments.shape[1:]], 128 + n * moments[0].nbytes  # header: ~128 bytes
                    with _writing(dest, size):
                        tmp.unlink(missing_ok=True)  # a new file: never through a link left at the name
                        f = open(tmp, "xb")
                        _write_npy_header(f, shape)
                with _writing(dest, size):
                    f.write(moments.tobytes())
                if progress:
                    progress(len(b))
        with _writing(dest, size):  # on the disk before the rename publishes it (a power cut)
            f.flush()
            os.fsync(f.fileno())
            f.close()
        info = {
            "version": CACHE_VERSION,
            "vae_fingerprint": fingerprint,
            "frames": n,
            "frame_size": [w, h],
            "shape": shape,
            "dtype": "float16",
            "gray": gray,
            "layout": f"[frame, (posterior mean, posterior std{', gray posterior mean' if gray else ''}), "
                      "channel, H/8, W/8], unscaled",
            "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else None,
        }
        # the old metadata goes first: an interruption from here leaves a cache that reads as unbuilt
        (movie_dir / LATENTS_META).unlink(missing_ok=True)
        os.replace(tmp, dest)
        with _writing(movie_dir / LATENTS_META, size):
            tmp_json.unlink(missing_ok=True)
        with _writing(movie_dir / LATENTS_META, size), open(tmp_json, "x") as fj:
            fj.write(json.dumps(info, indent=1))
            fj.flush()
            os.fsync(fj.fileno())
        os.replace(tmp_json, movie_dir / LATENTS_META)  # the cache counts as finished from here
        sync_folder(movie_dir)
        return info
    except BaseException:
        if f is not None:
            with contextlib.suppress(OSError):  # its flush fails again on a full disk
                f.close()
        tmp.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
        raise


def check_movies(data_root: str | os.PathLike, movies: Sequence[str]) -> None:
    """Refuse ids that are not finished movies directly under DATA_ROOT (an id with a path in it,
    '../other_root/movie', would write a cache into another data root), and a folder where a
    movie's cache writes a file (found only at the rename, after the movie's encoding)."""
    root = Path(data_root)
    for mid in movies:
        if not mid or mid.startswith(".") or Path(mid).name != mid:  # '': DATA_ROOT itself
            raise LatentCacheError(f"{mid!r}: not a movie id of {root} (the name of a movie folder in it, "
                                   "without a path)")
        if not is_finished(root / mid):
            raise LatentCacheError(f"{root / mid}: not a finished movie (run build_pairs.py first)")
        for path in (root / mid / LATENTS, root / mid / LATENTS_META, root / mid / LATENTS_LOCK,
                     *partial_files(root / mid)):
            if path.is_dir():
                raise LatentCacheError(f"{path}: a folder where the latent cache writes a file; move it away")


def _state(movie_dir: Path, fingerprint: str, overwrite: bool, gray: bool) -> tuple[str, str | None]:
    """("build" | "existing" | "refused", the line to log or None) for one movie's cache."""
    if overwrite or (info := cache_info(movie_dir)) is None:
        return "build", None
    if info["vae_fingerprint"] != fingerprint:
        return "refused", (f"refused: {movie_dir}: cached with other VAE weights ({info['vae_fingerprint'][:12]}...); "
                           "use --overwrite to replace it")
    if problem := cache_problem(movie_dir, info, load_meta(movie_dir)):
        return "build", f"rebuilding: {movie_dir / LATENTS}: does not match the frames ({problem})"
    return ("build" if gray and not info.get("gray") else "existing"), None


def build_latent_cache(
    data_root: str | os.PathLike,
    vae: torch.nn.Module,
    movies: Sequence[str] | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    gray: bool = False,
) -> dict:
    """Cache latents for every finished movie (or `movies`) under DATA_ROOT.

    Movies already cached with the same weights (and gray latents if `gray`) are skipped; a
    cache made with other weights is refused (reported, left alone) unless `overwrite`. One
    without the gray latents that `gray` asks for, or whose latents.npy does not fit the
    frames (cut short, say; logged), is rebuilt. A movie is written under its lock
    (<movie>/latents.lock, atomicio.try_lock): one that another run is encoding is left to the
    end, then waited for and taken as that run left it (built, or built here if that run died),
    so runs given the same movies share the work, never write into each other's files, and
    each ends once all its movies are cached. A movie with a frame that cannot be encoded
    (BadFrameError) is skipped with a line naming the frame, its old cache (if any) kept, and
    the others still cached: one bad file should not cost a night's encoding. Returns {"built",
    "existing", "refused", "skipped"}: lists of movie ids, and "fingerprint": the VAE's.
    """
    from tqdm import tqdm

    from cliutil import bar_options

    root = Path(data_root)
    vae.eval()  # frozen: no dropout; gradients are off via no_grad in encode_movie
    fp = vae_fingerprint(vae)
    ids = list(movies) if movies is not None else list_movies(root)
    result = {"built": [], "existing": [], "refused": [], "skipped": [], "fingerprint": fp}
    check_movies(root, ids)
    todo = []
    for mid in ids:
        state, why = _state(root / mid, fp, overwrite, gray)
        (todo if state == "build" else result[state]).append(mid)
        if why:
            log(why)
    if read_only := [m for m in todo if not os.access(root / m, os.W_OK)]:  # the lock would fail: Errno 13
        raise LatentCacheError(f"{root / read_only[0]}: cannot write its latent cache there, the folder is read-only "
                               f"({len(read_only)} such movie(s) to encode); make it writable, or leave it out with "
                               "--movies")
    for mid in (m for m in ids if m not in todo):  # what a killed run (SIGKILL, a power cut) left: maybe GBs
        stale = [p for p in partial_files(root / mid) if p.exists()]
        left_lock = (root / mid / LATENTS_LOCK).exists()  # killed after the cache was published: try_lock removes it
        if (stale or left_lock) and os.access(root / mid, os.W_OK):
            with try_lock(root / mid / LATENTS_LOCK) as mine:
                if mine:  # else another run is writing them
                    for p in stale:
                        p.unlink(missing_ok=True)
                        log(f"removed {p}: left by an interrupted run")
    total = sum(load_meta(root / m)["frame_count"] for m in todo)
    with tqdm(total=total, unit="frame", desc="latents", **bar_options(disable=not progress)) as bar:
        def settle(mid: str, state: str, why: str | None) -> None:
            if state == "build":  # its why, if any, was logged by the first look
                start = bar.n
                try:
                    encode_movie(root / mid, vae, fp, batch_size, autocast_dtype, bar.update, gray=gray)
                except BadFrameError as e:
                    log(f"skipped: {e}")
                    result["skipped"].append(mid)
                    bar.update(load_meta(root / mid)["frame_count"] - (bar.n - start))  # the bar ends full
                    return
                result["built"].append(mid)
            else:  # another run finished it since the first look
                result[state].append(mid)
                if why:
                    log(why)
                bar.update(load_meta(root / mid)["frame_count"])  # the bar ends full

        busy = []
        for mid in todo:  # an interrupted rebuild keeps the old cache: encode_movie replaces it at the end
            with try_lock(root / mid / LATENTS_LOCK) as mine:
                if not mine:
                    busy.append(mid)
                    log(f"later: {root / mid}: another run is encoding its latents; this one waits for it at the end")
                else:
                    settle(mid, *(("build", None) if overwrite else _state(root / mid, fp, False, gray)))
        for mid in busy:  # finished by the other run, or left unfinished (it died): then built here
            with try_lock(root / mid / LATENTS_LOCK, wait=True):
                state, why = _state(root / mid, fp, False, gray)
                settle(mid, *((state, why) if state == "existing" or not overwrite else ("build", None)))
    return result
