"""Synthetic clips with known motion and known cuts, written as frame folders or videos."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np


def texture(h: int, w: int, seed: int, blur: float = 2.0) -> np.ndarray:
    """Smooth random colour texture, RGB uint8."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h, w, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), blur)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255 + 0.5).astype(np.uint8)


def panning_clip(n: int, h: int = 64, w: int = 96, speed: int = 1, cuts: tuple[int, ...] = (), seed: int = 0):
    """n RGB frames panning right by `speed` px per frame; a new scene starts at each cut.

    Within a scene frames i and j show the same texture shifted by (j - i) * speed, so their
    similarity falls with |i - j|; across a cut they show unrelated textures.
    """
    frames, scene, start = [], -1, 0
    for i in range(n):
        if i == 0 or i in cuts:
            scene += 1
            start = i
            tex = texture(h, w + n * speed, seed * 100 + scene)
        x = (i - start) * speed
        frames.append(np.ascontiguousarray(tex[:, x : x + w]))
    return frames


def write_folder(frames, folder: Path, ext: str = "png", pattern: str = "frame{:d}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / (pattern.format(i) + "." + ext)), f[:, :, ::-1])
    return folder


def write_video(frames, path: Path, fps: float = 25.0) -> Path:
    fourcc = {".avi": "MJPG", ".mp4": "mp4v", ".mov": "mp4v", ".mkv": "mp4v"}[path.suffix]
    h, w = frames[0].shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert out.isOpened(), path
    for f in frames:
        out.write(np.ascontiguousarray(f[:, :, ::-1]))
    out.release()
    return path


def index_color(k: int) -> tuple[int, int, int]:
    """A solid colour that encodes frame index k (k < 256) in its red channel."""
    return k, 255 - k, 60


def write_fake_movie(root: Path, movie_id: str, sim: np.ndarray, size=(96, 64)) -> Path:
    """A finished movie in the frame-store layout with a hand-made similarity table and
    solid frames whose red channel is the frame index (so a test can tell which was read)."""
    d = root / movie_id
    (d / "frames").mkdir(parents=True)
    w, h = size
    for k in range(len(sim)):
        img = np.empty((h, w, 3), np.uint8)
        img[:] = index_color(k)
        cv2.imwrite(str(d / "frames" / f"{k:06d}.png"), img[:, :, ::-1])
    np.save(d / "similarity.npy", sim.astype(np.float32))
    meta = {"movie_id": movie_id, "frame_count": len(sim), "size": [w, h], "image_format": "png",
            "window": (sim.shape[1] - 1) // 2, "metric": "ssim"}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def table_from_pairs(n: int, window: int, values: dict[tuple[int, int], float], fill: float = 0.5) -> np.ndarray:
    """Similarity table with `fill` everywhere inside the movie and `values` on given pairs."""
    sim = np.full((n, 2 * window + 1), np.nan, np.float32)
    for i in range(n):
        for d in range(-window, window + 1):
            if 0 <= i + d < n:
                sim[i, window + d] = 1.0 if d == 0 else fill
    for (i, j), v in values.items():
        sim[i, window + j - i] = v
        sim[j, window + i - j] = v
    return sim
