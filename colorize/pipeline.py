"""Colourise a grayscale clip with the colour ControlNet from one or more colour references.

Three modes, one sampler (DDIM, ldm/sampler.py):
- fixed: every frame is conditioned on the (most similar) original reference. Frames are
  independent, so they run in batches.
- recursive: each frame is conditioned on the previous *output*, so colours follow motion,
  but a mistake is copied forward (the original project saw a red spot spread over frames).
- anchored: recursive, but the propagated output first has its chroma statistics pulled
  back to the original reference's (`anchor_strength`), and every `anchor_every` frames the
  original reference is used again, so drift is bounded. anchor_every=1 is fixed mode;
  anchor_every=0 with anchor_strength=0 is recursive mode.
With several references each frame takes the most similar one (colorize/references.py); in the
sequential modes a change of reference (a scene cut) restarts the chain from that reference.

Per clip, once: the blank-prompt embedding, and each reference resized to the model frame
size with its VAE latent (v2/v3). Per frame: the hint-block features (the hint is reference
RGB + *target gray*, so they depend on the frame) and, for v3, the gray latent.

Noise (`noise`): "shared" (default) draws x_T - and with eta > 0 every DDIM step's noise -
from one generator seeded from the seed alone, so every frame of a clip starts from the
same noise and frames differ only where their conditioning (gray frame, reference) does;
independent noise per frame is what made every frame's colours flicker. "per-frame" draws
each frame's noise from its own generator seeded from (seed, frame index). Either way the
generators are on the CPU and fresh for every model call, so a frame's result does not
depend on the batch size, the device or which part of the clip (`start`) is being run.

On CUDA, fixed mode keeps one batch in flight: batch k+1 is queued on the GPU before batch k
is copied out and finished on the CPU (`Colorizer.launch`, then `finish`), so the two overlap.

Output (luminance-true unless `raw`): the decoded image, resized back to the input size,
keeps only its chroma; the luma is the full-resolution input gray (BT.601,
annotator.color.transfer_luma). Edges and faces are the input's; only colour is the model's.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from annotator.color import to_float, transfer_luma
from annotator.similarity import fast_resize
from annotator.video import (
    FrameRangeError, FrameSourceError, SourceInfo, iter_frames, list_frame_files, probe, read_image_native,
)
from cldm.cldm import ControlLDM
from cldm.color import ColorCondition, join_hint, needs_ref_latent
from cliutil import file_problem
from colorize.cuda_graph import GraphCache
from colorize.gray import array_problem, to_gray
from colorize.loading import PRECISIONS, compute_dtype
from colorize.references import ReferenceChooser, anchor_colours, chroma_stats
from ldm import sampler

MODES = ("fixed", "recursive", "anchored")
NOISES = ("shared", "per-frame")
MULTIPLE = 64  # model frame sides, whatever the model: SD2.1 needs 64 (VAE /8, then /2 at each of 3 UNet downsamplings)
MAX_MODEL_SIDE = 4096  # 8x SD2.1's training size; beyond it memory runs out long before any use


class InferenceError(ValueError):
    """Bad input or settings for inference; str(e) is one line saying what and where."""


class NoSuchFrame(InferenceError):
    """A frame index past a clip's end; `count`: the frames it has."""

    def __init__(self, source, index: int, count: int):
        super().__init__(f"{source}: has no frame {index} (counting from 0; it has {count})")
        self.count = count


class OptionError(InferenceError):
    """A bad `Options` value: str(e) is "<field> <problem>", e.g. "steps must be >= 1 (got 0)"."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")


# ---- sizes and frames ---------------------------------------------------------------------


def model_size(height: int, width: int, size: int = 512, model_multiple: int = MULTIPLE) -> tuple[int, int]:
    """(H, W) the model runs at: short side ~`size`, aspect kept, both sides multiples of 64
    (and of `model_multiple`, ControlLDM.size_multiple, where a deeper UNet needs more).

    Each side is scaled by size / short side and rounded to the nearest multiple of 64
    (at least 64), so the short side is `size` rounded the same way and the aspect ratio
    changes by at most 32 px on either side (1280x720 at 512 -> 896x512, at 64 -> 128x64).
    """
    m = math.lcm(MULTIPLE, model_multiple)
    scale = size / min(height, width)
    side = lambda v: max(m, int(math.floor(v * scale / m + 0.5)) * m)
    return side(height), side(width)


def checked_model_size(frame_hw: tuple[int, int], size: int, model_multiple: int = MULTIPLE) -> tuple[int, int]:
    """model_size, refused with InferenceError where a side exceeds MAX_MODEL_SIDE. A caller
    that knows the frame size before loading the model asks here first, to fail in a second."""
    hw = model_size(*frame_hw, size, model_multiple)
    if max(hw) > MAX_MODEL_SIDE:
        raise InferenceError(f"frames of {frame_hw[1]}x{frame_hw[0]} at size {size} mean model frames of "
                             f"{hw[1]}x{hw[0]}; sides above {MAX_MODEL_SIDE} are refused (lower the size, or "
                             "crop very narrow frames)")
    return hw


def resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Anti-aliased resize of an HW or HWC float image to (H, W), clipped to [0, 1]."""
    out = fast_resize(np.ascontiguousarray(img, dtype=np.float32), hw[1], hw[0])
    return np.clip(out, 0.0, 1.0)


@dataclass
class Frame:
    index: int
    name: str  # output file name: the input's stem (folders) or the zero-padded index (videos) + .png
    gray: np.ndarray  # float32 HW in [0, 1]
    depth: int  # 8 or 16: bits per channel of the input, used for the output PNG
    colour: bool  # the input frame was colour (we colourise its luma)


def _depth(img: np.ndarray) -> int:
    return 16 if img.dtype == np.uint16 else 8


def iter_gray_frames(path: str | os.PathLike, start: int = 0, stop: int | None = None,
                     warn: Callable[[str], None] | None = None) -> Iterator[Frame]:
    """Frames start..stop-1 (stop None: to the end) of a video file or frame folder as gray
    `Frame`s, streamed in order; `Frame.index` counts from the clip's first frame.

    annotator.video.iter_frames reads them: nothing outside the range is decoded (folder files
    outside it are never read, so a broken one there does no harm; video frames before
    `start` are grab()bed), every problem (empty folder, unreadable frame, a frame of another
    size than the range's first, a range past the end, truncated video) raises
    FrameSourceError naming the file, and a video that ends a little before the frame count
    its container claims gives one warning line through `warn` (default: warnings.warn).
    Folder frames keep their 16-bit precision (keep_depth).
    """
    path = Path(path)
    for i, name, img in iter_frames(path, start=start, stop=stop, keep_depth=True, warn=warn):
        try:
            gray, colour = to_gray(img)
        except (ValueError, TypeError) as e:
            raise FrameSourceError(path / name if path.is_dir() else path, str(e)) from None
        yield Frame(i, Path(name).stem + ".png", gray, _depth(img), colour)


def output_names(path: str | os.PathLike, info: SourceInfo | None = None) -> list[str] | None:
    """The output file names for a source, known before decoding (None: video of unknown length).

    `info`: the video's probe() if the caller has it already (saves opening the file again).
    """
    path = Path(path)
    if path.is_dir():
        names = [f.stem + ".png" for f in list_frame_files(path)]
        dup = [n for n, k in Counter(names).items() if k > 1]
        if dup:
            raise FrameSourceError(path, f"two frames would both be written as {sorted(dup)[0]} "
                                         "(same name, different extensions)")
        return names
    n = (info or probe(path)).frame_count
    return None if n is None else [f"{i:06d}.png" for i in range(n)]


def read_reference(path: str | os.PathLike) -> np.ndarray:
    """Reference image file -> float32 RGB HW3 in [0, 1]."""
    if problem := file_problem(path, missing="not found"):  # before the read: a named pipe blocks it
        raise InferenceError(f"{path}: reference image {problem}")
    try:
        img = to_float(read_image_native(path))
    except FrameSourceError as e:
        raise InferenceError(f"{path}: reference {e.problem}") from None
    except ValueError as e:  # a pixel type to_float cannot scale (a 32-bit integer TIFF)
        raise InferenceError(f"{path}: reference {e}") from None
    if problem := array_problem(img):  # a float TIFF's: NaN, or 0-255 values
        raise InferenceError(f"{path}: reference image: {problem}")
    if img.ndim == 2:  # gray; decode_image gives gray HW or colour HW3 only (alpha is dropped at decode)
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img, dtype=np.float32)


def reference_frame(source: str | os.PathLike, index: int) -> np.ndarray:
    """Frame `index` of a colour ground-truth folder or video as float32 RGB (8-bit precision).

    Only that frame is read (folders) or converted (videos: earlier frames are grab()bed).
    """
    frames = iter_frames(source, start=index, stop=index + 1, check_count=False)
    try:
        _, _, rgb = next(frames, (None, None, None))
        count = index
    except FrameRangeError as e:
        rgb, count = None, e.frames
    finally:
        frames.close()
    if rgb is None:
        raise NoSuchFrame(source, index, count)
    return to_float(rgb)


# ---- sampling -----------------------------------------------------------------------------


def _torch_seed(sequence: np.random.SeedSequence) -> int:
    """A torch seed from a SeedSequence. torch's CPU generator (mt19937) keeps only the low
    32 bits of its seed, so the 32 bits it keeps must already mix every input number."""
    return int(sequence.generate_state(1, np.uint32)[0])


def frame_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator of frame `index` ("per-frame" noise): distinct for every (seed, index) pair."""
    return torch.Generator().manual_seed(_torch_seed(np.random.SeedSequence(seed % 2**64, spawn_key=(index,))))


def clip_generator(seed: int) -> torch.Generator:
    """CPU generator of the clip's shared noise (x_T and DDIM step noise of every frame)."""
    return torch.Generator().manual_seed(_torch_seed(np.random.SeedSequence(seed % 2**64)))


def noise_generators(noise: str, seed: int, indices: Sequence[int]) -> torch.Generator | list[torch.Generator]:
    """What sample_latents draws from for frames `indices`: one fresh clip generator (shared)
    or one generator per frame (per-frame)."""
    if noise == "shared":
        return clip_generator(seed)
    if noise == "per-frame":
        return [frame_generator(seed, i) for i in indices]
    raise ValueError(f"unknown noise {noise!r}; choose from {', '.join(NOISES)}")


@torch.no_grad()
def sample_latents(model: ControlLDM, cond: ColorCondition, generators: torch.Generator | Sequence[torch.Generator],
                   steps: int = 20, eta: float = 0.0, uncond: ColorCondition | None = None,
                   ref_guidance: float = 1.0, graphs: GraphCache | None = None) -> torch.Tensor:
    """DDIM as ControlLDM.sample (ldm.sampler.ddim_sample), with the noise drawn on the CPU from
    `generators`.

    One generator: shared noise, one draw used by every row (x_T and each step's noise are the
    same for every frame of the batch). A sequence: row i draws all its noise from
    `generators[i]`. Either way a frame's result does not depend on the batch it is in
    (ddim_sample's own generator draws one noise tensor for the whole batch). Reference
    guidance runs cond and uncond as one batch: out = uncond + ref_guidance * (cond - uncond).
    `graphs` (CUDA tensors only): replay each step from a CUDA graph kept there (colorize.cuda_graph).
    """
    shared = isinstance(generators, torch.Generator)
    if not shared and len(generators) != len(cond):
        raise ValueError(f"{len(generators)} generators for {len(cond)} frames")
    guided = ref_guidance != 1.0
    if guided and uncond is None:
        raise ValueError("ref_guidance != 1 needs an unconditional ColorCondition")
    h, w = cond.guided_hint.shape[-2:]
    c = model.latent_channels
    # x_T and every step's noise (eta > 0: every sigma is), drawn in the sampler's order and moved
    # in one copy: a copy per step would be a blocking host-to-device copy that keeps the host
    # from queueing steps ahead of the GPU.
    draws = 1 + (len(sampler.ddim_timesteps(steps, model.num_timesteps)) if eta > 0 else 0)
    if shared:
        noise = torch.stack([torch.randn((1, c, h, w), generator=generators) for _ in range(draws)])
    else:
        noise = torch.stack([torch.stack([torch.randn((c, h, w), generator=g) for g in generators])
                             for _ in range(draws)])
    noise = iter(noise.to(cond.guided_hint.device).expand(draws, len(cond), c, h, w).unbind())
    draw = lambda *_: next(noise)  # noqa: E731

    def step(x, t, cond_):  # cond_: cond, or cond and uncond as one batch when guided
        fn = lambda x_, t_: model.apply_model(x_, t_, cond_)  # noqa: E731
        return sampler.guided(fn, ref_guidance)(x, t) if guided else fn(x, t)

    step_cond = ColorCondition.cat([cond, uncond]) if guided else cond
    x_T = draw()
    if graphs is not None:
        model_fn = graphs.step_fn(step, x_T, step_cond, tag=(id(model), ref_guidance))
    else:
        model_fn = lambda x, t: step(x, t, step_cond)  # noqa: E731
    return sampler.ddim_sample(model_fn, x_T, model.alphas_cumprod, steps, eta, model.parameterization,
                               noise_fn=draw)


def check_steps(num_timesteps: int, steps: int) -> None:
    """Refuse step counts a schedule of `num_timesteps` cannot space uniformly (more than half its
    length), as an OptionError of field "steps"."""
    try:
        sampler.ddim_timesteps(steps, num_timesteps)
    except ValueError:
        raise OptionError("steps", f"must be between 1 and {num_timesteps // 2} for the model's {num_timesteps}-step "
                                   f"noise schedule (got {steps})") from None


@dataclass
class Options:
    """Sampling and output settings shared by all modes; every value is checked here (OptionError),
    the CLI included, except the step count's fit to the model's schedule (check_steps)."""

    size: int = 512  # short side of the model frame (see model_size)
    steps: int = 20
    eta: float = 0.0
    seed: int = 0
    noise: str = "shared"  # shared: one x_T (and step noise) for every frame; per-frame: seeded by (seed, index)
    ref_guidance: float = 1.0  # 1 = off; >1 pushes away from the no-reference prediction (experimental)
    raw: bool = False  # True: the decoded image as is, no luminance-true recombination
    precision: str = "auto"  # auto (fp16 on CUDA, else fp32) | fp32 | fp16 | bf16
    anchor_every: int = 8  # anchored: the original reference again every N frames (0 = never)
    anchor_strength: float = 1.0  # anchored: 0..1, how far chroma statistics are pulled back
    batch: int = 4  # fixed mode: frames per model call (the sequential modes run one at a time)
    cuda_graph: bool = True  # on CUDA: replay each denoising step from a CUDA graph (colorize.cuda_graph)
    pad_batches: bool = False  # fixed mode: run a short last batch at full size (a compiled model sees one shape)

    def __post_init__(self):
        for name in ("eta", "ref_guidance", "anchor_strength"):  # NaN passes every comparison below
            if not math.isfinite(getattr(self, name)):
                raise OptionError(name, f"must be a finite number (got {getattr(self, name)})")
        for name, low in (("size", 1), ("steps", 1), ("batch", 1), ("anchor_every", 0), ("eta", 0)):
            if getattr(self, name) < low:
                raise OptionError(name, f"must be >= {low} (got {getattr(self, name)})")
        if self.eta > 1:  # DDIM's noise would exceed the step's whole variance: NaN frames
            raise OptionError("eta", f"must be <= 1 (got {self.eta})")
        if not 0 <= self.anchor_strength <= 1:
            raise OptionError("anchor_strength", f"must be in [0, 1] (got {self.anchor_strength})")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be auto or one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.noise not in NOISES:
            raise OptionError("noise", f"must be one of {', '.join(NOISES)} (got {self.noise!r})")


@dataclass
class Reference:
    """A reference at the model frame size, with its latent (None for v1)."""

    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    latent: torch.Tensor | None


def _run_dtype(model: ControlLDM, precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (compute_dtype), or, for weights held in half precision
    (loading.cast_weights), theirs: "auto" follows them, another precision is refused (float32
    inputs met bfloat16 weights deep inside a convolution)."""
    held = model.model.diffusion_model.input_blocks[0][0].weight.dtype
    if held == torch.float32:
        return compute_dtype(precision, device)
    if precision not in ("auto", *(p for p, d in PRECISIONS.items() if d == held)):
        raise InferenceError(f"the model's weights are held in {held} (cast_weights): precision must be auto or "
                             f"the same, got {precision!r}")
    return held


class Colorizer:
    """One clip's colouriser: the model, the frame sizes and what is computed once per clip (the
    sampling itself is sample_latents, over ldm/sampler.py's DDIM)."""

    def __init__(self, model: ControlLDM, frame_hw: tuple[int, int], options: Options):
        self.model, self.opt = model, options
        self.frame_hw = tuple(frame_hw)
        self.hw = checked_model_size(self.frame_hw, options.size, model.size_multiple)
        self.device = model.betas.device
        self.dtype = _run_dtype(model, options.precision, self.device)
        check_steps(model.num_timesteps, options.steps)
        self.context = model.get_learned_conditioning([""])  # fp32: the model caches it across runs
        self._no_reference: Reference | None = None
        self.graphs = GraphCache() if options.cuda_graph and self.device.type == "cuda" else None

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        # no cast cache: a CUDA graph must not capture casts that autocast would reuse outside it
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def reference(self, rgb: np.ndarray) -> Reference:
        """Resize a reference (HW3/HW4 RGB(A), any size: stretched to the frame) and encode it, once."""
        if problem := array_problem(rgb, reference=True):
            raise InferenceError(f"reference: {problem}")
        return self._encode(rgb)

    @torch.no_grad()
    def _encode(self, rgb: np.ndarray) -> Reference:
        """reference without its check: for images checked already or made here (a previous
        output, each frame of the sequential modes; the black reference)."""
        img = resize(to_float(rgb)[..., :3], self.hw)
        image = torch.from_numpy(img).permute(2, 0, 1)[None].to(self.device)
        latent = None
        if needs_ref_latent(self.model.color_variant):
            with self._autocast():
                latent = self.model.encode_first_stage(image * 2 - 1)
        return Reference(image, latent)

    def no_reference(self) -> Reference:
        """The unconditional branch of reference guidance: a black reference, in the hint and in
        the latent (the VAE latent of a black image, not zeros), as if the reference was dropped."""
        if self._no_reference is None:
            self._no_reference = self._encode(np.zeros((*self.hw, 3), np.float32))
        return self._no_reference

    def model_grays(self, grays: Sequence[np.ndarray]) -> torch.Tensor:
        """Full-size gray frames (HW float in [0, 1]) -> (B, 1, H, W) at model size on the device."""
        return torch.from_numpy(np.stack([resize(g, self.hw) for g in grays]))[:, None].to(self.device)

    def condition(self, gray: torch.Tensor, refs: Sequence[Reference]) -> ColorCondition:
        """The model's condition for gray frames at model size ((B, 1, H, W) in [0, 1]) and their
        references: the hint as training builds it (reference RGB + gray in [0, 1]), the
        reference latents encoded once per clip, the blank prompt's embedding."""
        b = gray.shape[0]
        hint = join_hint(torch.cat([r.image for r in refs]), gray)
        latent = None if refs[0].latent is None else torch.cat([r.latent for r in refs])
        return self.model.prepare_condition(hint, context=self.context.expand(b, -1, -1), ref_latent=latent)

    @torch.no_grad()
    def launch(self, grays: Sequence[np.ndarray], indices: Sequence[int], refs: Sequence[Reference],
               pad_to: int = 0) -> Pending:
        """Start colourising full-size gray frames (frame `indices[i]` with `refs[i]`) as one batch.

        On CUDA this returns once the work is queued (the decoded batch lands in pinned memory
        when the GPU gets there), so the caller can finish the previous batch meanwhile.
        `pad_to`: run fewer frames than this as a batch of this size, the last frame repeated (its
        copies are dropped): a compiled model then never meets a new shape, which would mean
        minutes of compiling for the last few frames of a clip. Frames are independent, so the
        real frames' results are the same either way (up to float rounding).
        """
        for g in grays:
            if g.shape != self.frame_hw:
                raise InferenceError(f"frame is {g.shape[1]}x{g.shape[0]}, the clip's first was "
                                     f"{self.frame_hw[1]}x{self.frame_hw[0]}")
        grays, pad = list(grays), max(0, pad_to - len(grays))
        indices, refs = [*indices, *[indices[-1]] * pad], [*refs, *[refs[-1]] * pad]
        small = self.model_grays(grays + grays[-1:] * pad)
        gens = noise_generators(self.opt.noise, self.opt.seed, indices)
        with self._autocast():
            cond = self.condition(small, refs)
            uncond = None
            if self.opt.ref_guidance != 1.0:
                uncond = self.condition(small, [self.no_reference()] * len(small))
            z = sample_latents(self.model, cond, gens, self.opt.steps, self.opt.eta, uncond, self.opt.ref_guidance,
                               self.graphs)
            decoded = self.model.decode_first_stage(z)
        rgb = ((decoded[:len(grays)].float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        indices = list(indices[:len(grays)])
        if rgb.device.type != "cuda":
            return Pending(rgb.cpu(), None, grays, indices)
        host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
        host.copy_(rgb, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(rgb.device))
        return Pending(host, done, grays, indices)

    def finish(self, pending: Pending, pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
        """Wait for a launched batch and return float32 HW3 RGB in [0, 1] at the input size
        (luminance-true unless raw). `pool`: threads to finish the frames in parallel (numpy and
        OpenCV release the GIL; resizing back and recombining is tens of ms per full-size frame)."""
        if pending.done is not None:
            pending.done.synchronize()
        rgb = pending.rgb.numpy()
        broken = ~np.isfinite(rgb).all(axis=(1, 2, 3))
        if broken.any():  # clamp keeps NaN, and NaN would be written as black
            raise InferenceError(f"the model's output for frame {pending.indices[int(broken.argmax())]} is NaN or "
                                 f"infinite: {self._why_not_finite()}")
        if pool is None or len(rgb) == 1:
            return [self._finish(c, g) for c, g in zip(rgb, pending.grays)]
        return list(pool.map(self._finish, rgb, pending.grays))

    def _why_not_finite(self) -> str:
        """What can make the output NaN: damaged weights always (a plain fp32 run with default
        settings has nothing else to blame), and only the settings this run has that can overflow."""
        settings = []
        if self.opt.ref_guidance != 1.0:
            settings.append(f"--ref-guidance {self.opt.ref_guidance:g}: try one nearer 1")
        if self.dtype != torch.float32:
            name = next(k for k, v in PRECISIONS.items() if v == self.dtype)
            settings.append(f"{name}, which may not hold the weights: try --precision fp32")
        why = "the weights may be damaged or wrong (the --ckpt or --control file)"
        return why + (f", or the settings overflow ({'; '.join(settings)})" if settings else "")

    def run(self, grays: Sequence[np.ndarray], indices: Sequence[int], refs: Sequence[Reference],
            pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
        """launch, then finish: one batch, synchronously."""
        return self.finish(self.launch(grays, indices, refs), pool)

    def _finish(self, color: np.ndarray, gray: np.ndarray) -> np.ndarray:
        color = resize(color, self.frame_hw)
        return color if self.opt.raw else transfer_luma(color, gray)


@dataclass
class Pending:
    """A launched batch: its decoded RGB (B, H, W, 3) on the host once `done` (a CUDA event, or
    None when already there) has passed, the full-size gray frames to finish it with, and
    their frame indices."""

    rgb: torch.Tensor
    done: torch.cuda.Event | None
    grays: list[np.ndarray]
    indices: list[int]


# ---- modes --------------------------------------------------------------------------------


def gray_of(frame) -> np.ndarray:
    """A frame's gray (float32 HW in [0, 1]): a `Frame`'s own, else that of an array `to_gray`
    takes; InferenceError (a ValueError) naming what is wrong with any other."""
    if isinstance(frame, Frame):
        return frame.gray
    if problem := array_problem(frame):
        raise InferenceError(f"frame: {problem}")
    return to_gray(frame)[0]


def colorize(model: ControlLDM, frames: Iterable, references: np.ndarray | Sequence[np.ndarray],
             mode: str = "fixed", *, batch: int = 4, start: int = 0, **options) -> Iterator[np.ndarray]:
    """Colourised frames (float32 HW3 RGB in [0, 1], input size), in input order, streamed.

    `frames`: gray frames (anything `to_gray` takes, or `Frame`s), all of one size.
    `references`: one RGB image or several (each frame then uses the most similar).
    `start`: index of the first frame, which seeds its per-frame noise (for running a clip in
    parts); `Frame`s carry their own.
    `batch`: frames per model call in fixed mode; the sequential modes run one at a time.
    `options`: the other fields of `Options`.
    The settings and references are checked here, at the call; the frames as they are read.
    """
    opt = Options(batch=batch, **options)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    refs = [references] if isinstance(references, np.ndarray) else list(references)
    if not refs:
        raise ValueError("no reference image given")
    for r in refs:
        if problem := array_problem(r, reference=True):
            raise InferenceError(f"reference: {problem}")
    check_steps(model.num_timesteps, opt.steps)
    _run_dtype(model, opt.precision, model.betas.device)
    return _colorize(model, iter(frames), refs, mode, opt, start)


def _colorize(model: ControlLDM, frames: Iterator, refs: list[np.ndarray], mode: str, opt: Options,
              start: int) -> Iterator[np.ndarray]:
    first = next(frames, None)
    if first is None:
        return
    first_gray = gray_of(first)

    def index(frame, k: int) -> int:  # a Frame's own (its per-frame noise), else counted from `start`
        return frame.index if isinstance(frame, Frame) else start + k

    numbered = chain([(index(first, 0), first_gray)], ((index(f, k), gray_of(f)) for k, f in enumerate(frames, 1)))
    col = Colorizer(model, first_gray.shape, opt)
    entries = [col._encode(r) for r in refs]  # checked by colorize
    choose = ReferenceChooser(refs)
    if mode == "fixed":
        # One batch in flight: batch k+1 is queued on the GPU before batch k is finished on the
        # CPU, so the two overlap (on the CPU, the same work in the same order).
        with ThreadPoolExecutor(min(opt.batch, os.cpu_count() or 1)) as pool:
            pending = None
            while True:
                try:
                    chunk = list(islice(numbered, opt.batch))
                    grays = [g for _, g in chunk]
                    launched = col.launch(grays, [i for i, _ in chunk], [entries[choose(g)] for g in grays],
                                          pad_to=opt.batch if opt.pad_batches else 0) if chunk else None
                except Exception:  # a bad next frame: deliver the frames already sampled first
                    if pending is not None:
                        yield from col.finish(pending, pool)
                    raise
                if pending is not None:
                    yield from col.finish(pending, pool)
                if not chunk:
                    return
                pending = launched
    stats = [chroma_stats(r) for r in refs] if mode == "anchored" else None
    prev, prev_k, since = None, None, 0
    for i, g in numbered:
        k = choose(g)
        anchor_due = mode == "anchored" and opt.anchor_every > 0 and since >= opt.anchor_every
        if prev is None or k != prev_k or anchor_due:
            ref, since = entries[k], 0
        else:  # the previous output, at the model frame size
            small = resize(prev, col.hw)
            ref = col._encode(anchor_colours(small, stats[k], opt.anchor_strength) if mode == "anchored" else small)
        prev, prev_k = col.run([g], [i], [ref])[0], k
        since += 1
        yield prev


def colorize_fixed(model, frames, reference, batch: int = 4, **kw) -> Iterator[np.ndarray]:
    """Every frame conditioned on the original reference; batched."""
    return colorize(model, frames, reference, "fixed", batch=batch, **kw)


def colorize_recursive(model, frames, reference, **kw) -> Iterator[np.ndarray]:
    """Each frame conditioned on the previous output (the first on the reference)."""
    return colorize(model, frames, reference, "recursive", **kw)


def colorize_anchored(model, frames, reference, anchor_every: int = 8, anchor_strength: float = 1.0,
                      **kw) -> Iterator[np.ndarray]:
    """Recursive with chroma statistics pulled back to the reference and periodic re-anchoring."""
    return colorize(model, frames, reference, "anchored", anchor_every=anchor_every,
                    anchor_strength=anchor_strength, **kw)
