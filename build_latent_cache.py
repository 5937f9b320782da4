"""Encode every frame under DATA_ROOT once with the frozen VAE (see annotator/latent_cache.py);
train on it with tutorial_train_sd21_color_v2.py --use-latent-cache and the same checkpoint as
--init.

    python build_latent_cache.py data/films --ckpt models/control_sd21_color.safetensors

Training then takes the posteriors from the cache instead of running the VAE twice per
sample. The cache records which weights made it and is refused when they differ. Runs given
the same DATA_ROOT (one per GPU, say) share the movies: each locks the movie it encodes,
leaves those another run holds to the end and then waits for them, so each ends once every
movie is cached.

A movie with a frame that cannot be encoded (unreadable, or of another size than its
meta.json gives) is skipped with one line naming the frame; the others are still cached.

Exit status: 0 every movie cached, 1 a movie refused (cached with other weights) or
skipped (a bad frame), 2 bad input (one line), 130 / 143 stopped by Ctrl-C / SIGTERM
(finished movies kept; rerun to resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cliutil import (DefaultsFormatter, OneLineParser, exit_quietly, not_a_folder, out_of_memory, path_arg,
                     quiet_opencv, quiet_startup_signals, run_cli)

quiet_opencv()  # a missing frame is our one-line error, without OpenCV's warning before it
if __name__ == "__main__":
    quiet_startup_signals()

PROG = "build_latent_cache.py"
FIRST_STAGE_PREFIX = "first_stage_model."
PRECISIONS = {"32": None, "16": "float16", "bf16": "bfloat16"}
KEPT = "finished movies are kept, rerun to resume"


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter,
                      epilog="Runs on one DATA_ROOT share its movies (one per GPU, say): each ends when all "
                             "are cached. A movie with a bad frame is skipped (one line). Exit status: 0 every "
                             "movie cached, 1 a movie refused (other weights) or skipped (a bad frame), 2 bad "
                             "input, 130/143 stopped by Ctrl-C/SIGTERM.")
    p.add_argument("data_root", type=path_arg, metavar="DATA_ROOT", help="folder written by build_pairs.py")
    p.add_argument("--ckpt", type=path_arg, required=True,
                   help="checkpoint with the VAE weights: a full SD/ControlLDM checkpoint (keys "
                        "first_stage_model.*) or a bare VAE state dict (.safetensors or .ckpt)")
    p.add_argument("--config", type=path_arg, default=None,
                   help="model YAML whose model.first_stage gives the VAE architecture (default, as in "
                        "colorize_inference.py: the .yaml of the same stem beside --ckpt, else the config "
                        "the checkpoint records, else models/cldm_v21_color.yaml of this repo)")
    p.add_argument("--movies", nargs="+", default=None,
                   help="only these movie ids: folder names in DATA_ROOT (default: all finished movies)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=8,
                   help="frames per VAE call; another batch size changes a few of the stored latents by float "
                        "rounding (default: 8)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="32",
                   help="autocast precision of the encoder (16/bf16 on GPUs); the cache is float16 either way")
    p.add_argument("--gray", action="store_true",
                   help="also cache the latent of each frame's gray (colour variant v3 feeds it to the UNet; "
                        "without it v3 training refuses the cache); a cache without them is rebuilt")
    p.add_argument("--overwrite", action="store_true",
                   help="re-encode movies that are already cached (also those made by other weights)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="trust a pickled .ckpt enough to unpickle it fully (only if weights-only loading fails)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_data_root(data_root, movies) -> None:
    """Refuse, before any model is loaded, a DATA_ROOT that is not there or holds nothing to encode,
    and --movies that are not its finished movies."""
    from annotator.latent_cache import check_movies
    from annotator.pairs import is_finished, list_movies

    root = Path(data_root)
    if not root.exists():
        raise ValueError(f"DATA_ROOT {root} does not exist (build it with build_pairs.py --out {root})")
    if not root.is_dir():
        raise ValueError(f"DATA_ROOT {root} is {not_a_folder(root)}")
    if is_finished(root):  # a movie's own folder: build_pairs.py --out it would nest a movie in a movie
        raise ValueError(f"{root}: the folder of one movie; DATA_ROOT is the folder that holds the movie folders "
                         f"({root.parent}; --movies {root.name} for this one alone)")
    if movies is None and not (movies := list_movies(root)):
        raise ValueError(f"{root}: no finished movies to encode (build them with build_pairs.py --out {root})")
    check_movies(root, movies)


def load_vae(config_path, ckpt_path, allow_pickle: bool = False):
    """AutoencoderKL from the model config's first_stage section, weights from a checkpoint.

    The config is chosen as colorize_inference.py chooses it (cldm.weights_config.resolve_config):
    --config, else the .yaml beside the checkpoint, else the config it records, else SD2.1's;
    so the toy model needs no --config. A checkpoint that does not fit is refused in one line
    naming a tensor (and both shapes where they differ), before anything is loaded into the VAE."""
    from omegaconf import DictConfig, OmegaConf

    from cldm.checkpoint import load_state_dict
    from cldm.checkpoint_fit import compare_state_dict, guess_kind, misfit
    from cldm.config import model_config
    from cldm.weights_config import load_resolved_config, resolve_config
    from ldm.modules.autoencoder import AutoencoderKL

    source = resolve_config(ckpt_path, config_path)
    where = f"the config saved in {ckpt_path}" if isinstance(source, DictConfig) else str(source)
    # load_resolved_config refuses a config without model.first_stage (the VAE architecture)
    fs = model_config(load_resolved_config(source, (), [("--ckpt", ckpt_path)], config_path)).first_stage
    vae = AutoencoderKL(OmegaConf.to_container(fs.ddconfig, resolve=True), fs.embed_dim)
    sd = load_state_dict(ckpt_path, allow_pickle=allow_pickle)
    prefix = FIRST_STAGE_PREFIX if any(k.startswith(FIRST_STAGE_PREFIX) for k in sd) else ""
    vae_sd = {k: v for k, v in sd.items() if k.startswith(prefix)}
    # compared under the file's own names, so the message names a tensor as it is in the file
    report = compare_state_dict({prefix + k: v for k, v in vae.state_dict().items()}, vae_sd)
    report.kind = guess_kind(sd)
    if reason := misfit(report, strict_prefixes=("",)):  # every VAE tensor, of the same shape
        raise ValueError(f"{ckpt_path}: VAE weights do not fit {where}: {reason}")
    vae.load_state_dict({k[len(prefix):]: v for k, v in vae_sd.items()})
    return vae


def run(args: argparse.Namespace) -> int:
    import torch

    from annotator.latent_cache import build_latent_cache
    from colorize.loading import resolve_device

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")
    device = resolve_device(args.device)  # before the data root and the checkpoint are read
    movies = None if args.movies is None else list(dict.fromkeys(args.movies))  # a movie named twice: encoded once
    check_data_root(args.data_root, movies)
    vae = load_vae(args.config, args.ckpt, args.allow_pickle).to(device)
    dtype = PRECISIONS[args.precision]
    try:
        result = build_latent_cache(args.data_root, vae, movies, args.batch_size, args.overwrite,
                                    getattr(torch, dtype) if dtype else None, progress=not args.no_progress,
                                    log=lambda line: print(line, file=sys.stderr), gray=args.gray)
    except (RuntimeError, MemoryError) as e:  # RuntimeError: torch's OutOfMemoryError and its CPU allocator's
        if not out_of_memory(e):
            raise
        half = " or use --precision bf16" if dtype is None and device.type == "cuda" else ""
        raise ValueError(f"out of memory on {device} at --batch-size {args.batch_size}: lower it{half}; {KEPT}"
                         ) from None
    print(f"VAE fingerprint {result['fingerprint']} (tutorial_train_sd21_color_v2.py --use-latent-cache "
          "takes the cache when the VAE of its --init has these weights)")
    print(f"latents built: {len(result['built'])}, already cached: {len(result['existing'])}, "
          f"refused (other weights): {len(result['refused'])}, skipped (a bad frame): {len(result['skipped'])}")
    return 1 if result["refused"] or result["skipped"] else 0


def main(argv: list[str] | None = None) -> int:
    from annotator.latent_cache import LatentCacheError
    from cldm.checkpoint import CheckpointError

    # Anything else (omegaconf errors, ...) is reported with its type name.
    return run_cli(PROG, run, parser().parse_args(argv),
                   (LatentCacheError, CheckpointError, ValueError, OSError, RuntimeError),
                   interrupted=f"interrupted; {KEPT}", named=(Exception,), needs=("opencv",))


if __name__ == "__main__":
    exit_quietly(main())
