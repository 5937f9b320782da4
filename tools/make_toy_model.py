#!/usr/bin/env python3
"""Train the embedded toy model from scratch on CPU, on the bundled sample clip.

There is no pretrained tiny Stable Diffusion, so the recipe trains everything the tiny
architecture (models/cldm_tiny_color.yaml, colour variant v2) needs, unlocked:
  1. the tiny KL autoencoder (L1 + 1e-6 KL, as SD's first stage minus its GAN/LPIPS terms);
     its latent scale factor is then set to 1 / std of the training latents, as SD did;
  2. UNet + ControlNet together on (reference, target) pairs of training frames 3..19 apart,
     with the autoencoder and the (random, frozen) tiny text tower locked; latents are
     encoded once up front (the latent-cache idea), so a step never runs the VAE encoder.
     Each pair has its chroma rotated by one of 8 angles (0, 45, ..., 315 degrees) picked
     at random (the same for reference and target, in the BT.601 Cb/Cr plane, so the gray
     input is unchanged): one clip's gray frames would otherwise tell a small model their
     colours by heart, and it would learn to ignore the reference. With the hue unknowable
     from the gray, it must read it from the reference.
The held-out frames (100..131 of the clip) are never seen. The result is a toy: it shows the
pipeline end to end on a laptop, not what SD2.1 can do.

  python tools/make_toy_model.py --out /tmp/toy_repro --check models/toy/toy_color_v2.safetensors
  python tools/make_toy_model.py --overwrite       # replaces the shipped models/toy/ (about 40 min on 2 idle cores)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cliutil import (NOT_REGULAR, OneLineParser, exit_quietly, file_problem, folder_problem,  # noqa: E402
                     non_negative_int, one_line, path_arg, positive_int, quiet_startup_signals, run_cli, seed_arg)

if __name__ == "__main__":  # Ctrl-C while torch loads: one line, not an import traceback
    quiet_startup_signals()

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from annotator.color import LUMA_WEIGHTS, rgb_to_ycbcr, transfer_luma, ycbcr_to_rgb  # noqa: E402
from annotator.video import iter_frames  # noqa: E402
from atomicio import write_bytes_atomic  # noqa: E402
from cldm.checkpoint import save_state_dict  # noqa: E402
from cldm.convert import init_from_sd  # noqa: E402
from cldm.config import TINY_CONFIG, load_config  # noqa: E402
from cldm.model import create_model  # noqa: E402

PROG = "make_toy_model.py"

CLIP = REPO / "data" / "sample" / "bigbuckbunny.mp4"
NAME = "toy_color_v2"
LOSS_TOLERANCE = 0.10  # relative; the reproduction must land within 10 % of the shipped losses
HUES = 8  # chroma rotations of the training frames: 0, 45, ..., 315 degrees


def load_clip(path: Path, first: int, last: int, hw: tuple[int, int]) -> torch.Tensor:
    """Frames [first, last) resized (area) to hw, as (N, 3, H, W) float in [0, 1]."""
    frames = []
    for i, _, rgb in iter_frames(path):
        if first <= i < last:
            frames.append(cv2.resize(rgb, (hw[1], hw[0]), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, hued: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator) -> list[float]:
    """Reconstruction training on random 64x64 crops (with flips) of the training frames in
    every chroma rotation (`hued`: (hues, N, 3, H, W)), so that rotated colours decode too."""
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    hues, n, _, h, w = hued.shape
    losses = []
    for step in tqdm(range(steps), desc="autoencoder", mininterval=2):
        idx = torch.randint(0, n, (batch,), generator=gen)
        hue = torch.randint(0, hues, (batch,), generator=gen)
        y0 = torch.randint(0, h - 64 + 1, (1,), generator=gen).item()
        x0 = torch.randint(0, w - 64 + 1, (1,), generator=gen).item()
        x = hued[hue, idx, :, y0:y0 + 64, x0:x0 + 64] * 2 - 1
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        post = vae.encode(x)
        recon = vae.decode(post.sample(generator=gen))
        kl = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
        loss = (recon - x).abs().mean() + 1e-6 * kl
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def rotate_chroma(frames: torch.Tensor, angle: float) -> torch.Tensor:
    """Frames (N, 3, H, W) in [0, 1] with their Cb/Cr plane rotated by `angle` radians.

    The luma stays exactly the frame's (out-of-gamut chroma is shrunk towards gray, as in
    inference's luminance-true output), so the model's gray input does not change.
    """
    rgb = frames.permute(0, 2, 3, 1).numpy()
    ycc = rgb_to_ycbcr(rgb)
    c, s = math.cos(angle), math.sin(angle)
    cb, cr = ycc[..., 1].copy(), ycc[..., 2].copy()
    ycc[..., 1], ycc[..., 2] = c * cb - s * cr, s * cb + c * cr
    out = transfer_luma(ycbcr_to_rgb(ycc), ycc[..., 0])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def gray_of(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma, (N, 3, H, W) -> (N, 1, H, W)."""
    return torch.einsum("nchw,c->nhw", rgb, torch.from_numpy(LUMA_WEIGHTS))[:, None]


def train_diffusion(model, hued: torch.Tensor, steps: int, batch: int, lr: float, min_gap: int,
                    max_gap: int, gen: torch.Generator) -> list[float]:
    vae = model.first_stage_model.eval().requires_grad_(False)
    images = torch.cat([hued, hued.flip(-1)])  # (2 * hues, N, 3, H, W): every hue, both orientations
    with torch.no_grad():  # latent cache: posterior mean and std of every variant
        posts = [vae.encode(f * 2 - 1) for f in images]
        mean, std = torch.stack([p.mean for p in posts]), torch.stack([p.std for p in posts])
    context = model.get_learned_conditioning([""])
    params = [p for n, p in model.named_parameters() if n.startswith(("model.", "control_model."))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.model.train()
    model.control_model.train()
    n, s = hued.shape[1], model.scale_factor
    losses = []
    for step in tqdm(range(steps), desc="unet+controlnet", mininterval=2):
        tgt = torch.randint(0, n, (batch,), generator=gen)
        gap = torch.randint(min_gap, max_gap + 1, (batch,), generator=gen)
        sign = torch.where(torch.rand(batch, generator=gen) < 0.5, -1, 1)
        ref = tgt + sign * gap
        ref = torch.where((ref < 0) | (ref >= n), tgt - sign * gap, ref).clamp(0, n - 1)
        v = torch.randint(0, images.shape[0], (batch,), generator=gen)  # hue x orientation, one per pair
        z0 = (mean[v, tgt] + std[v, tgt] * torch.randn(mean[v, tgt].shape, generator=gen)) * s
        hint = torch.cat([images[v, ref], gray_of(images[v, tgt])], dim=1)
        cond = model.prepare_condition(hint, context=context.expand(batch, -1, -1), ref_latent=mean[v, ref] * s)
        t = torch.randint(0, model.num_timesteps, (batch,), generator=gen)
        loss = model.training_loss(z0, cond, noise=torch.randn(z0.shape, generator=gen), t=t)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def tail_mean(losses: list[float], frac: float = 0.1) -> float:
    k = max(1, int(len(losses) * frac))
    return float(np.mean(losses[-k:]))


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_toy_model(out: Path, seed: int = 0, vae_steps: int = 1500, diff_steps: int = 3000, height: int = 64,
                   width: int = 128, train_frames: int = 100, threads: int | None = None) -> dict:
    """Train both stages and write OUT/toy_color_v2.{safetensors,yaml}; returns the provenance."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    frames = load_clip(CLIP, 0, train_frames, (height, width))
    hued = torch.stack([rotate_chroma(frames, 2 * math.pi * k / HUES) for k in range(HUES)])
    cfg = load_config(TINY_CONFIG, ["model.color_variant=v2"])
    model = create_model(cfg)
    vae_losses = train_vae(model.first_stage_model, hued, vae_steps, 8, 1e-3, gen)
    with torch.no_grad():
        z = model.first_stage_model.encode(frames * 2 - 1).mean
    scale = round(1.0 / z.std().item(), 5)
    cfg.model.scale_factor = scale
    model.scale_factor = scale
    # ControlNet encoder starts as a copy of the (random) UNet encoder, as for SD2.1.
    state, _ = init_from_sd(model, {k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")})
    model.load_state_dict(state)
    diff_losses = train_diffusion(model, hued, diff_steps, 16, 2e-4, 3, 19, gen)
    prov = {
        "name": NAME, "data": f"{CLIP.name} frames 0-{train_frames - 1} (held out: {train_frames}-131)",
        "data_sha256": hashlib.sha256(CLIP.read_bytes()).hexdigest(), "resolution": f"{height}x{width}",
        "seed": seed, "vae_steps": vae_steps, "diffusion_steps": diff_steps, "hue_rotations": HUES,
        "scale_factor": scale,
        "vae_loss": round(tail_mean(vae_losses), 5), "diffusion_loss": round(tail_mean(diff_losses), 5),
        "commit": git_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "train_seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.yaml").unlink(missing_ok=True)  # written last: a stop never pairs it with other weights
    sd = {k: v.half() if v.is_floating_point() and not k.startswith(tuple(model._buffers)) else v
          for k, v in model.state_dict().items()}
    save_state_dict(sd, out / f"{NAME}.safetensors",
                    metadata={"provenance": json.dumps(prov), "config": OmegaConf.to_yaml(cfg)})
    write_bytes_atomic(out / f"{NAME}.yaml", ("# Toy model config written by tools/make_toy_model.py "
                                              "(scale factor fitted to its VAE).\n" + OmegaConf.to_yaml(cfg)).encode())
    return prov


def existing_outputs(out: Path) -> list[str]:
    """The model files already in `out` (a run would replace them): by default `out` is the
    shipped models/toy/, which a slip of a reproduction run must not overwrite 40 minutes later."""
    return [name for name in (f"{NAME}.safetensors", f"{NAME}.yaml") if (out / name).exists()]


def shipped_provenance(shipped: Path) -> dict:
    """The provenance a model made by this recipe carries; ValueError (one line) if `shipped`
    is missing or not such a model, checked before training so a typo costs no 40 minutes."""
    from safetensors import safe_open

    # a named pipe would block the open; a folder was "not a readable safetensors model (No such device)"
    if (problem := file_problem(shipped)) in (NOT_REGULAR, "is a folder"):
        raise ValueError(f"--check {shipped}: {problem}")
    try:
        with safe_open(str(shipped), "pt") as f:
            return json.loads((f.metadata() or {})["provenance"])
    except FileNotFoundError:
        raise ValueError(f"--check {shipped}: no such file") from None
    except KeyError:
        raise ValueError(f"--check {shipped}: no provenance recorded (not made by this recipe)") from None
    except Exception as e:  # safetensors' own errors for a file that is not one, unreadable JSON
        raise ValueError(f"--check {shipped}: not a readable safetensors model ({one_line(e)})") from None


def check_against(prov: dict, ref: dict) -> list[str]:
    """Stage losses that differ from the shipped model's recorded ones (`ref`, its provenance) by
    more than the tolerance."""
    return [f"{k}: {prov[k]:.5f} vs shipped {ref[k]:.5f}" for k in ("vae_loss", "diffusion_loss")
            if abs(prov[k] - ref[k]) > LOSS_TOLERANCE * ref[k]]


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=lambda t: Path(path_arg(t)), default=REPO / "models" / "toy",
                   help="output folder; one that already holds the model needs --overwrite (default: %(default)s)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed for weights, batches and noise (default: 0)")
    p.add_argument("--vae-steps", type=positive_int, default=1500,
                   help="autoencoder training steps (batch 8, 64x64 crops) (default: 1500)")
    p.add_argument("--diffusion-steps", type=positive_int, default=3000,
                   help="UNet+ControlNet steps (batch 16) (default: 3000)")
    p.add_argument("--threads", type=non_negative_int, default=None,
                   help="torch CPU threads; by default (or 0) one per core, os.cpu_count(), whatever "
                        "OMP_NUM_THREADS says (the shipped model was trained with 1, on a loaded machine)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model files already in --out (refused otherwise, before training)")
    p.add_argument("--check", type=lambda t: Path(path_arg(t)), default=None,
                   help=f"compare the final losses with this shipped model's (beyond "
                        f"{100 * LOSS_TOLERANCE:.0f} %%: exit 1, the model made kept in --out); the file is "
                        "checked before training")
    args = p.parse_args(argv)
    problem = folder_problem(args.out)
    if problem:
        p.error(f"--out {args.out}: {problem}")
    there = existing_outputs(args.out)
    if there and not args.overwrite:
        p.error(f"--out {args.out} already holds {' and '.join(there)}: give another --out "
                f"(e.g. /tmp/toy_repro) or --overwrite to replace them")
    return run_cli(PROG, run, args, errors=(ValueError,))


def run(args: argparse.Namespace) -> int:
    # Read before training: with --overwrite the run may replace the very file it is checked against.
    ref = shipped_provenance(args.check) if args.check is not None else None
    prov = make_toy_model(args.out, args.seed, args.vae_steps, args.diffusion_steps, threads=args.threads)
    print(json.dumps(prov, indent=1))
    if ref is not None:
        bad = check_against(prov, ref)
        if bad:
            print(f"{PROG}: error: reproduction differs from the shipped model ({'; '.join(bad)}); the model made "
                  f"is kept in {args.out}", file=sys.stderr)
            return 1
        print(f"reproduction within {LOSS_TOLERANCE:.0%} of {args.check}")
    return 0


if __name__ == "__main__":
    exit_quietly(main())
