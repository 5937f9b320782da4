"""CPU baselines that colourise a gray clip from colour reference(s), without any model.

They put the diffusion model's numbers in context and make the tool useful without a GPU.
Convention for every function here: gray frames are anything colorize.gray.to_gray takes
(HW, HW1, gray+alpha, or RGB(A) taken to its BT.601 luma), references HW3 RGB; both uint8,
uint16 or float in [0, 1]. Outputs are float32 HW3 in [0, 1] at the frame's size,
luminance-true: `rgb_to_gray(out) == gray` up to float rounding (annotator.color.transfer_luma),
so only colour comes from the reference.
Any aspect ratio; a reference of another size is resized to the frame size.
With several references each frame uses the most similar one, chosen as the model modes
choose it (colorize.references.ReferenceChooser: SSIM of 64x64 gray thumbnails).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from annotator.color import lab_to_rgb, rgb_to_gray, rgb_to_lab, to_float, transfer_luma
from colorize.gray import array_problem
from colorize.metrics import check_flow_size
from colorize.pipeline import gray_of
from colorize.references import ReferenceChooser

LUMA_BANDS = 32
LUT_NODES = 1024  # gray levels tabulated by reinhard (4x the 8-bit levels)
METHODS = ("reinhard", "reinhard-bands", "flow")


def _rgb(reference: np.ndarray) -> np.ndarray:
    """A reference as contiguous float RGB: an RGBA's alpha dropped, and its gray then that of its
    RGB bit for bit (the gray of a strided view differs in the last bit). ValueError for an array
    that is no RGB(A) image in [0, 1] (gray.array_problem)."""
    reference = np.asarray(reference)
    if problem := array_problem(reference, reference=True):
        raise ValueError(f"reference: {problem}")
    return np.ascontiguousarray(to_float(reference)[..., :3])


def _fit(reference: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ref = _rgb(reference)
    if ref.shape[:2] == shape:
        return ref
    h, w = shape
    interp = cv2.INTER_AREA if ref.shape[0] * ref.shape[1] > h * w else cv2.INTER_LINEAR
    return cv2.resize(ref, (w, h), interpolation=interp)


def luma_band_chroma(reference_rgb: np.ndarray, bands: int = LUMA_BANDS) -> tuple[np.ndarray, np.ndarray]:
    """The reference's mean Lab (a, b) in each band of luma: E[a, b | Y'].

    Returns (band luma, (n, 2) mean a,b) for the non-empty bands only, the band's position
    being the mean luma of its pixels, ready for piecewise-linear interpolation.
    """
    ref = _rgb(reference_rgb)
    y = np.clip(rgb_to_gray(ref).ravel(), 0.0, 1.0)
    ab = rgb_to_lab(ref)[..., 1:].reshape(-1, 2)
    idx = np.minimum((y * bands).astype(np.int64), bands - 1)
    count = np.bincount(idx, minlength=bands)
    keep = count > 0
    pos = np.bincount(idx, weights=y, minlength=bands)[keep] / count[keep]
    mean_ab = np.stack([np.bincount(idx, weights=ab[:, c], minlength=bands)[keep] for c in (0, 1)], -1)
    return pos.astype(np.float32), (mean_ab / count[keep, None]).astype(np.float32)


def reinhard(gray_frames: Iterable[np.ndarray], reference_rgb: np.ndarray) -> list[np.ndarray]:
    """Reinhard et al. 2001: global colour statistics transfer from the reference (method `reinhard`).

    Each Lab channel of the target is mapped by (x - mean_t) * std_r / std_t + mean_r (CIELab
    rather than the paper's l-alpha-beta). Lightness is the input's exactly (luminance-true),
    so only a and b are transferred; a gray target has a = b = 0 with zero spread, so they
    become the reference's mean a and b: one global tint over the input's lightness. That is
    all a global statistics transfer can do for gray input; `reinhard_bands` keeps more.
    """
    return list(iter_reinhard(gray_frames, [reference_rgb], bands=1))


def reinhard_bands(gray_frames: Iterable[np.ndarray], reference_rgb: np.ndarray,
                   bands: int = LUMA_BANDS) -> list[np.ndarray]:
    """Reinhard-style statistics transfer conditioned on lightness (method `reinhard-bands`).

    Classic Reinhard maps each target Lab channel by (x - mean_t) * std_r / std_t + mean_r.
    A gray target has a = b = 0 with zero spread, so that formula degenerates to painting the
    reference's mean chroma everywhere (`reinhard`). Instead we transfer the statistic that
    survives: the reference's mean chroma *conditioned on lightness* (per luma band, `bands`
    bands over [0, 1], linearly interpolated between bands), so a frame whose lightness
    histogram is the reference's receives the reference's mean chroma, and dark and bright
    regions keep their own tints (shadows blue, highlights warm, ...). The within-band chroma
    spread is not reproduced: without spatial correspondence it could only be noise.
    Lightness is the input's exactly. The output is a function of the gray level only, so it
    is tabulated once per reference (`LUT_NODES` levels) and interpolated per pixel.
    `bands=1` is `reinhard`.
    """
    return list(iter_reinhard(gray_frames, [reference_rgb], bands=bands))


def iter_reinhard(gray_frames: Iterable[np.ndarray], references: Sequence[np.ndarray],
                  reference_indices: Sequence[int] | None = None, bands: int = 1,
                  progress: Callable[[int], object] | None = None) -> Iterator[np.ndarray]:
    """`reinhard` (bands=1) or `reinhard_bands`, streamed frame by frame.

    With several references each frame uses the most similar one (ReferenceChooser), wherever
    they lie in the clip: the nearest one in time may be across a cut. `reference_indices` are
    accepted for callers that have them and not used. `progress(1)` is called as each frame is done.
    """
    refs = list(references)
    if not refs:
        raise ValueError("no reference image given")
    luts = [_reinhard_lut(luma_band_chroma(r, bands)) for r in refs]
    choose = ReferenceChooser(refs)
    for frame in gray_frames:
        g = gray_of(frame)
        out = _apply_lut(g, luts[choose(g)])
        if progress is not None:
            progress(1)
        yield out


def _reinhard_lut(table: tuple[np.ndarray, np.ndarray], nodes: int = LUT_NODES) -> np.ndarray:
    """(nodes, 3) RGB of the gray levels i/(nodes-1): the output depends on the gray alone."""
    pos, mean_ab = table
    g = np.linspace(0.0, 1.0, nodes, dtype=np.float32)[None, :]
    lab = rgb_to_lab(np.repeat(g[..., None], 3, axis=-1))  # L of the neutral gray, a = b = 0
    lab[..., 1] = np.interp(g, pos, mean_ab[:, 0])
    lab[..., 2] = np.interp(g, pos, mean_ab[:, 1])
    return transfer_luma(lab_to_rgb(lab), g)[0]


def _apply_lut(g: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Linear interpolation in a gray -> RGB table. Luma is linear in RGB and every node has
    luma equal to its gray level, so the result's luma is `g` (to float rounding) and stays
    inside the RGB cube: luminance-true without a per-pixel transfer_luma."""
    x = np.clip(g, 0.0, 1.0) * np.float32(len(lut) - 1)
    table = np.ascontiguousarray(lut[None], dtype=np.float32)  # a 1 x nodes RGB "image"
    out = cv2.remap(table, x, np.zeros_like(x), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(*g.shape, 3)


def _make_dis() -> tuple[cv2.DISOpticalFlow, cv2.DISOpticalFlow]:
    """(frame-to-frame, to-reference) flow. The first only initialises the second, so the
    fast preset suffices there (same PSNR on the sample clip, a third less time)."""
    return (cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST),
            cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM))


def _u8(g: np.ndarray) -> np.ndarray:
    return (np.clip(g, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _pack(g: np.ndarray) -> np.ndarray:
    """The smallest array `_gray` turns back into exactly `g`: uint8 for 8-bit input (a quarter
    of float32), uint16 for 16-bit, else g itself (e.g. the luma of a colour frame)."""
    for dtype, top in ((np.uint8, 255.0), (np.uint16, 65535.0)):
        q = (np.clip(g, 0.0, 1.0) * top + 0.5).astype(dtype)
        if np.array_equal(to_float(q), g):
            return q
    return g


class _Held:
    """Arrays held in order while flow waits for a reference frame or walks back from it: in RAM
    up to `ram` bytes (None: no limit), past that all in an anonymous temporary file in `folder`
    (the system's if None; unlinked when made, so it is gone once closed, even after a kill),
    read back one at a time. Each comes back bit for bit as it went in."""

    def __init__(self, ram: int | None = None, folder: str | Path | None = None):
        self.ram, self.folder = ram, folder
        self.where = folder or tempfile.gettempdir()  # as errors name it
        self.items = []  # the arrays; once spilled, (offset, shape, dtype) of each in the file
        self.file, self.end, self.in_ram = None, 0, 0

    def __len__(self) -> int:
        return len(self.items)

    def append(self, a: np.ndarray) -> None:
        if self.file is None and self.ram is not None and self.in_ram + a.nbytes > self.ram:
            try:
                self.file = tempfile.TemporaryFile(dir=self.folder)
            except OSError as e:
                raise OSError(f"cannot make a temporary file in {self.where} for "
                              f"flow's waiting frames: {e.strerror or e}") from None
            self.items, self.in_ram = [self._write(x) for x in self.items], 0
        if self.file is None:
            self.items.append(a)
            self.in_ram += a.nbytes
        else:
            self.items.append(self._write(a))

    def _write(self, a: np.ndarray) -> tuple[int, tuple[int, ...], np.dtype]:
        a = np.ascontiguousarray(a)
        try:
            self.file.seek(self.end)
            self.file.write(a.data.cast("B"))
        except OSError as e:  # a full disk's error names no file (and this one has none)
            raise OSError(f"cannot hold flow's waiting frames in a temporary file in "
                          f"{self.where}: {e.strerror or e}") from None
        self.end += a.nbytes
        return self.end - a.nbytes, a.shape, a.dtype

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> np.ndarray:
        if self.file is None:
            return self.items[i]
        offset, shape, dtype = self.items[i]
        a = np.empty(shape, dtype)
        self.file.seek(offset)
        if self.file.readinto(a.data.cast("B")) != a.nbytes:
            raise OSError(f"flow's temporary file in {self.where} came back short")
        return a

    def pop(self) -> np.ndarray:
        a = self[-1]
        self.items.pop()
        return a

    def close(self) -> None:
        """Drop everything held (the file with it)."""
        if self.file is not None:
            self.file.close()
        self.items, self.file, self.end, self.in_ram = [], None, 0, 0


class _Walk:
    """Propagation away from one frame: the reference frame (its displacement taken as zero),
    or with `direct` any frame, its map into the reference then DIS flow straight to it.

    Each frame's map into the reference starts from the previous frame's map composed with
    the frame-to-frame flow (robust to large accumulated motion), and is then refined by DIS
    directly against the reference (removes the drift that pure chaining accumulates).
    Holds only the reference, the current map and the previous frame's 8-bit gray.
    """

    def __init__(self, ref: np.ndarray, ref_u8: np.ndarray, start_gray: np.ndarray, dis, direct: bool = False):
        h, w = ref.shape[:2]
        self.ref, self.ref_u8, self.dis = ref, ref_u8, dis
        self.gx = np.broadcast_to(np.arange(w, dtype=np.float32)[None, :], (h, w))
        self.gy = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (h, w))
        self.prev_u8 = _u8(start_gray)
        # frame pixel -> reference position, minus grid
        self.disp = dis[1].calc(self.prev_u8, ref_u8, None) if direct else np.zeros((h, w, 2), np.float32)

    def colour(self, gray: np.ndarray) -> np.ndarray:
        """The frame at the current map (the reference frame itself: zero displacement)."""
        warped = cv2.remap(self.ref, self.gx + self.disp[..., 0], self.gy + self.disp[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        return transfer_luma(warped, gray)

    def step(self, gray: np.ndarray) -> np.ndarray:
        """Move one frame further from the reference and colour that frame."""
        cur_u8 = _u8(gray)
        step = self.dis[0].calc(cur_u8, self.prev_u8, None)
        mx, my = self.gx + step[..., 0], self.gy + step[..., 1]
        chained = cv2.remap(self.disp, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) + step
        self.disp = self.dis[1].calc(cur_u8, self.ref_u8, np.ascontiguousarray(chained))
        self.prev_u8 = cur_u8
        return self.colour(gray)


def flow_propagate(
    gray_frames: Iterable[np.ndarray],
    reference_rgb: np.ndarray | Sequence[np.ndarray],
    reference_index: int | Sequence[int] = 0,
) -> list[np.ndarray]:
    """Warp the reference's colour to every frame along DIS optical flow; luma from the input.

    Flow is neither purely chained nor purely direct: chaining frame-to-frame accumulates
    drift, direct flow to the reference fails on large motion. Each frame's flow to the
    reference is computed directly (DIS medium) but initialised with the chained estimate
    (previous frame's flow composed with the frame-to-frame flow, DIS fast). On the sample
    clip at 640x360 (132 frames from frame 0) this gives 31.8 dB mean PSNR against 30.5 for
    direct flow and 29.6 for chained flow; at 1280x720 about 0.1-0.2 s a frame on 2 cores.
    The reference is the colour version of frame `reference_index`: that frame's flow is zero.
    Several references (with their frame indices): each frame is coloured from the most
    similar one (`iter_flow` says how it walks there). Pixels mapped outside the reference take
    the colour of its nearest border pixel; nothing else marks occlusions. All in memory:
    `iter_flow` streams.
    """
    refs = [reference_rgb] if isinstance(reference_rgb, np.ndarray) else list(reference_rgb)
    idxs = [reference_index] if np.ndim(reference_index) == 0 else list(reference_index)
    return list(iter_flow(gray_frames, refs, idxs))


def iter_flow(gray_frames: Iterable[np.ndarray], references: Sequence[np.ndarray], reference_indices: Sequence[int],
              progress: Callable[[int], object] | None = None, ram: int | None = None,
              spill_to: str | Path | None = None) -> Iterator[np.ndarray]:
    """`flow_propagate`, streamed in frame order. Only the frames that wait for their run's
    reference frame (below) are held, but all of them: a reference far into a long film holds
    thousands (about 13 bytes a pixel each for 8-bit frames). Past `ram` bytes (None: no limit)
    they are held in a temporary file in `spill_to` instead (_Held), with the same outputs.

    Each frame takes its colours from the most similar reference (ReferenceChooser, as the
    model modes), so a run of consecutive frames choosing the same reference is one shot, and
    flow never walks across a cut. A run that holds its reference's frame (`reference_indices`:
    positions in `gray_frames`) walks from it both ways: frames before it wait until it
    arrives, only their gray kept, packed (uint8 for 8-bit input), and their outputs are then
    yielded together; frames after it are coloured as they arrive. A run without its
    reference's frame (the reference's shot seen again after a cut, or a reference frame
    whose own frame is more like another reference) walks forward from its first frame, that
    frame's map into the reference being DIS flow straight to it. With one reference the whole
    clip is one run. `progress(1)` is called as each frame is coloured.
    """
    refs, idxs = list(references), [int(i) for i in reference_indices]
    if len(refs) != len(idxs):
        raise ValueError(f"{len(refs)} references but {len(idxs)} reference indices")
    if any(i < 0 for i in idxs):
        raise ValueError(f"reference index {min(idxs)} outside the clip (indices start at 0)")
    if len(set(idxs)) != len(idxs):
        dup = next(i for i in idxs if idxs.count(i) > 1)
        raise ValueError(f"two references for frame {dup}; give one reference per frame")
    choose = ReferenceChooser(refs)
    dis, shape, fitted, n = _make_dis(), None, {}, 0
    run, walk, waiting = None, None, _Held(ram, spill_to)  # the run's reference, its walk (None: not started),
    # the frames waiting
    done = progress or (lambda k: None)

    def reference(k):  # (RGB at the frame size, its 8-bit gray), once per reference
        if k not in fitted:
            ref = _fit(refs[k], shape)
            fitted[k] = ref, _u8(rgb_to_gray(ref))
        return fitted[k]

    def direct(packed):  # a run whose reference frame never came: forward from its first frame
        w = None
        for p in packed:
            g = gray_of(p)
            if w is None:
                w = _Walk(*reference(run), g, dis, direct=True)
                out = w.colour(g)
            else:
                out = w.step(g)
            done(1)
            yield out

    for t, frame in enumerate(gray_frames):
        g = gray_of(frame)
        n = t + 1
        if shape is None:
            check_flow_size(g.shape)
            shape = g.shape
        if g.shape != shape:
            raise ValueError(f"frame {t} is {g.shape}, frame 0 is {shape}")
        k = choose(g)
        if k != run:  # a new run (a cut): what waited for the last run's reference frame goes now
            yield from direct(waiting)
            waiting.close()
            run, walk = k, None
        if walk is not None:
            out = walk.step(g)
            done(1)
            yield out
        elif t < idxs[k]:  # this run's reference frame may still come: wait for it
            waiting.append(_pack(g))
        elif t > idxs[k]:
            walk = _Walk(*reference(k), g, dis, direct=True)
            done(1)
            yield walk.colour(g)
        else:
            back_walk = _Walk(*reference(k), g, dis)
            back = _Held(None if ram is None else max(ram - waiting.in_ram, 0), spill_to)
            for i in reversed(range(len(waiting))):
                back.append(back_walk.step(gray_of(waiting[i])))
                done(1)
            waiting.close()
            walk = _Walk(*reference(k), g, dis)  # and forward from it
            done(1)
            while back:  # nearest the reference last; each dropped once yielded
                yield back.pop()
            back.close()
            yield walk.colour(g)
    # frames still waiting wait for their run's reference frame, which lies past the end: so
    # this raises whenever any frame is left unyielded (a new run flushes the last one's)
    if n and max(idxs) >= n:
        raise ValueError(f"reference index {max(idxs)} outside the clip (0..{n - 1})")


def iter_baseline(
    method: str,
    gray_frames: Iterable[np.ndarray],
    references: np.ndarray | Sequence[np.ndarray],
    reference_indices: int | Sequence[int] | None = None,
    progress: Callable[[int], object] | None = None,
    ram: int | None = None,
    spill_to: str | Path | None = None,
) -> Iterator[np.ndarray]:
    """Dispatch for `colorize_inference.py --method reinhard|reinhard-bands|flow`, streamed.

    `references`: one RGB image or a list. `reference_indices`: the position in the clip of
    the frame each reference is the colour version of; needed by `flow` for several
    references (default frame 0 for a single one), where a walk along the clip starts;
    `reinhard`/`reinhard-bands` do not use them. With several references every method gives
    each frame the most similar one (ReferenceChooser, as the model modes), never the nearest
    in time, which may be across a cut. `progress(1)` is called per frame done. `ram`,
    `spill_to`: where `flow` holds frames that wait for a reference frame (iter_flow).
    """
    refs = [references] if isinstance(references, np.ndarray) else list(references)
    if not refs:
        raise ValueError("no reference image given")
    if reference_indices is not None and np.ndim(reference_indices) == 0:
        reference_indices = [reference_indices]
    if method == "flow":
        if reference_indices is None:
            if len(refs) > 1:
                raise ValueError("flow with several references needs their frame indices")
            reference_indices = [0]
        return iter_flow(gray_frames, refs, reference_indices, progress, ram, spill_to)
    if method in ("reinhard", "reinhard-bands"):
        bands = 1 if method == "reinhard" else LUMA_BANDS
        return iter_reinhard(gray_frames, refs, reference_indices, bands, progress)
    raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(METHODS)}")


def run_baseline(
    method: str,
    gray_frames: Iterable[np.ndarray],
    references: np.ndarray | Sequence[np.ndarray],
    reference_indices: int | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """`iter_baseline` as a list (the whole clip in memory: for tests and small clips)."""
    return list(iter_baseline(method, gray_frames, references, reference_indices))

