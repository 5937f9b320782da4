"""Latent cache: every stored frame encoded once by the frozen VAE.

A training step encodes the target and the reference with the VAE - about half the FLOPs
of a step at 512 - although the VAE never changes. Encoding each frame once and storing the
posterior lets the dataset hand out latents instead. Per movie, next to the frames:

    latents.npy    float16 (N, 2, C, H/8, W/8): [:, 0] posterior mean, [:, 1] posterior std,
                   *unscaled* (the diffusion model multiplies by its scale_factor); with `gray`
                   (N, 3, ...): [:, 2] the posterior mean of the frame's BT.601 gray as RGB,
                   which colour variant v3 feeds the UNet
    latents.json   the VAE fingerprint, frame size, shape, precision; written last, so a cache
                   without it is unfinished and gets rebuilt

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
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from annotator.color import rgb_to_gray
from annotator.pairs import frame_path, is_finished, list_movies, load_meta

LATENTS, LATENTS_META = "latents.npy", "latents.json"
CACHE_VERSION = 1


class LatentCacheError(Exception):
    """Missing, unfinished or foreign latent cache; str(e) is one line naming the movie."""


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """SHA-256 (hex) of the VAE weights; equal iff the state_dicts hold equal values."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def read_frame(path: Path) -> np.ndarray:
    """A stored frame as RGB uint8 HWC; OSError naming the file if it cannot be read."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"{path}: cannot read frame")
    return np.ascontiguousarray(img[:, :, ::-1])


def cache_info(movie_dir: str | os.PathLike) -> dict | None:
    p = Path(movie_dir) / LATENTS_META
    return json.loads(p.read_text()) if p.is_file() else None


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
            f"({info['vae_fingerprint'][:12]}..., expected {fingerprint[:12]}...); rebuild it with --overwrite"
        )
    if gray and not info.get("gray"):
        raise LatentCacheError(f"{movie_dir}: latent cache has no gray latents, which colour variant v3 needs "
                               "(rebuild it with build_latent_cache.py --gray --overwrite)")
    meta = load_meta(movie_dir)
    lat = np.load(movie_dir / LATENTS, mmap_mode="r")
    if lat.shape[0] != meta["frame_count"] or info["frame_size"] != meta["size"]:
        raise LatentCacheError(f"{movie_dir}: latent cache does not match the frames (rebuild with --overwrite)")
    return lat


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
    tmp = movie_dir / (LATENTS + ".partial")
    out = None
    fmt = meta["image_format"]
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
            load = lambda b: np.stack([read_frame(frame_path(movie_dir, i, fmt)) for i in b])  # noqa: E731
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
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, *moments.shape[1:]))
                out[b.start : b.stop] = moments
                if progress:
                    progress(len(b))
        shape = list(out.shape)
        out.flush()
        del out
        os.replace(tmp, movie_dir / LATENTS)
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
        tmp_json = movie_dir / (LATENTS_META + ".partial")
        tmp_json.write_text(json.dumps(info, indent=1))
        os.replace(tmp_json, movie_dir / LATENTS_META)  # the cache counts as finished from here
        return info
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    without the gray latents that `gray` asks for is rebuilt. Returns {"built", "existing",
    "refused"}: lists of movie ids, and "fingerprint": the VAE's.
    """
    from tqdm import tqdm

    root = Path(data_root)
    vae.eval()  # frozen: no dropout; gradients are off via no_grad in encode_movie
    fp = vae_fingerprint(vae)
    ids = list(movies) if movies is not None else list_movies(root)
    result = {"built": [], "existing": [], "refused": [], "fingerprint": fp}
    for mid in ids:
        if not is_finished(root / mid):
            raise LatentCacheError(f"{root / mid}: not a finished movie (run build_pairs.py first)")
    todo = []
    for mid in ids:
        info = cache_info(root / mid)
        if info is not None and not overwrite and not (gray and info["vae_fingerprint"] == fp and not info.get("gray")):
            if info["vae_fingerprint"] == fp:
                result["existing"].append(mid)
            else:
                result["refused"].append(mid)
                log(f"refused: {root / mid}: cached with other VAE weights ({info['vae_fingerprint'][:12]}...); "
                    f"use --overwrite to replace it")
            continue
        todo.append(mid)
    total = sum(load_meta(root / m)["frame_count"] for m in todo)
    with tqdm(total=total, unit="frame", desc="latents", disable=not progress) as bar:
        for mid in todo:
            (root / mid / LATENTS_META).unlink(missing_ok=True)  # unfinished until rewritten
            encode_movie(root / mid, vae, fp, batch_size, autocast_dtype, bar.update, gray=gray)
            result["built"].append(mid)
    return result
