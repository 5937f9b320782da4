"""Synthetic clips with known motion and known cuts, written as frame folders or videos."""
from __future__ import annotations

import json
import struct
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


def panning_clip(n: int, h: int = 64, w: int = 96, speed: int = 1, cuts: tuple[int, ...] = (), seed: int = 0,
                 blur: float = 2.0):
    """n RGB frames panning right by `speed` px per frame; a new scene starts at each cut.

    Within a scene frames i and j show the same texture shifted by (j - i) * speed, so their
    similarity falls with |i - j| (more slowly for a larger texture `blur`); across a cut
    they show unrelated textures.
    """
    return list(iter_panning_clip(n, h, w, speed, cuts, seed, blur))


def iter_panning_clip(n: int, h: int = 64, w: int = 96, speed: int = 1, cuts: tuple[int, ...] = (), seed: int = 0,
                      blur: float = 2.0):
    """panning_clip one frame at a time (for long clips)."""
    scene, start = -1, 0
    for i in range(n):
        if i == 0 or i in cuts:
            scene += 1
            start = i
            tex = texture(h, w + n * speed, seed * 100 + scene, blur)
        x = (i - start) * speed
        yield np.ascontiguousarray(tex[:, x : x + w])


def write_folder(frames, folder: Path, ext: str = "png", pattern: str = "frame{:d}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / (pattern.format(i) + "." + ext)), f[:, :, ::-1])
    return folder


def write_video(frames, path: Path, fps: float = 25.0) -> Path:
    """RGB frames (any iterable) -> a video file (MJPG for .avi, MPEG-4 Part 2 otherwise)."""
    fourcc = {".avi": "MJPG", ".mp4": "mp4v", ".mov": "mp4v", ".mkv": "mp4v"}[path.suffix]
    out = None
    for f in frames:
        if out is None:
            h, w = f.shape[:2]
            out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
            assert out.isOpened(), path
        out.write(np.ascontiguousarray(f[:, :, ::-1]))
    out.release()
    return path


def truncate_avi(src: Path, dst: Path, keep: int) -> Path:
    """Copy of an AVI cut right after its first `keep` frames, as a transfer that broke off
    would leave it: the header still claims every frame, the index at the end is gone."""
    data = Path(src).read_bytes()
    pos, n = data.index(b"movi") + 4, 0
    while n < keep:
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        pos += 8 + size + (size & 1)
        n += chunk[2:] in (b"dc", b"db")
    Path(dst).write_bytes(data[:pos])
    return Path(dst)


def rotate_mp4(src: Path, dst: Path, degrees: int) -> Path:
    """Copy of an MP4 whose video track carries a display rotation, as a phone records
    portrait video: the frames stay stored as they are, the track header's matrix says to
    turn them `degrees` (90, 180, 270) clockwise for display."""
    data = bytearray(Path(src).read_bytes())
    tkhd = data.index(b"tkhd")
    assert data[tkhd + 4] == 0, "version 0 track header expected"
    matrix = tkhd + 4 + 4 + 5 * 4 + 8 + 8  # version/flags, times/id/duration, reserved, layer..volume
    a, b = {90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees]  # cos, sin in the 16.16 matrix
    data[matrix : matrix + 36] = struct.pack(">9i", a << 16, b << 16, 0, -b << 16, a << 16, 0, 0, 0, 1 << 30)
    Path(dst).write_bytes(data)
    return Path(dst)


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
