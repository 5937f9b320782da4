"""What trains, and how the trained part is saved and put back on top of Stable Diffusion.

The training policy lives here, free of Lightning, so the trainer, the benchmarks and the
tests share one definition of it:

- The ControlNet trains; Stable Diffusion (UNet, VAE, text encoder) is locked, except
  - with `sd_locked=False` the UNet decoder (`output_blocks`, `out`) trains too, as in ControlNet;
  - with `train_unet_input` (v2/v3 with the extra channels fed to the UNet) the UNet's input
    conv trains, but only its new channels: that one tensor also holds the locked SD kernel
    (input channels 0-3), whose gradient a tensor hook zeroes. With weight decay 0, Adam(W)
    then leaves those channels bitwise unchanged (zero gradient -> zero moments -> zero update).
    bitsandbytes' 8-bit AdamW does not (its moments are quantised in blocks of 256 that share
    a scale, and zero does not come back as zero), so `make_optimizer` keeps that one tensor's
    moments in 32 bits.
- The export (`control.safetensors`) holds every `control_model.*` tensor plus the trainable
  tensors outside it: about a quarter of the full model, loaded on top of an SD2.1 file.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cldm.checkpoint import CheckpointError, load_state_dict, save_checkpoint
from cldm.checkpoint_fit import CONTROL, INPUT_CONV, UNET, LoadReport, compare_state_dict, ema_note, misfit
from cldm.cldm import ControlLDM
from cldm.convert import init_from_sd
from cldm.weights_config import config_hash, read_export_metadata

UNET_INPUT_CONV = UNET + INPUT_CONV  # the partly trainable tensor
EXPORT_FORMAT = "cldm-color-control-v1"
OPTIMIZERS = ("adamw", "adamw8bit")
# Lightning training checkpoints (cldm/lightning.py) hold the trainable tensors under the LightningModule's
# name for the ControlLDM, and what they were trained for under TRAINING_KEY.
MODULE_PREFIX, TRAINING_KEY = "model.", "cldm"


def check_optimizer(name: str) -> None:
    """Raise ValueError (one line) if optimiser `name` is unknown or cannot run here."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)")


def make_optimizer(name: str, groups: list[dict], lr: float, betas: tuple[float, float],
                   fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' AdamW8bit with 32-bit moments for the `unet_input` group (see
    the module doc). `groups` as `param_groups` makes them."""
    check_optimizer(name)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    bnb = import_bitsandbytes()

    class AdamW8bit(bnb.optim.AdamW8bit):
        """Honours a per-group 'optim_bits' (bitsandbytes reads it per optimiser only)."""

        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            config["optim_bits"] = group.get("optim_bits", config["optim_bits"])
            return config

    groups = [{**g, "optim_bits": 32} if g.get("name") == "unet_input" else g for g in groups]
    return AdamW8bit(groups, lr=lr, betas=betas)


def import_bitsandbytes():
    """bitsandbytes, without the warning its import logs on a CPU with AVX512-BF16 that lacks the
    `kernels` package (which would fetch a 4-bit matmul from the Hugging Face hub: neither
    wanted nor used by the 8-bit optimiser), "Failed to load CPU gemm_4bit_forward ...", which
    reads like a failure of a run that works."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        log.setLevel(level)
    return bitsandbytes


def unet_input_conv(model: ControlLDM) -> nn.Conv2d:
    """The UNet's first conv: SD's kernel in the first `model.latent_channels` inputs, the variant's after."""
    return model.model.diffusion_model.input_blocks[0][0]


def configure_trainable(model: ControlLDM, sd_locked: bool = True, train_unet_input: bool = True,
                        only_mid_control: bool | None = None) -> list[nn.Parameter]:
    """Set `requires_grad` by the policy above and return the trainable parameters.

    Safe to call again (e.g. with another policy): the gradient mask is installed once. With
    `only_mid_control` the ControlNet's per-skip zero convs feed nothing, so they are frozen
    (DDP refuses parameters that never get a gradient).
    """
    only_mid_control = model.only_mid_control if only_mid_control is None else only_mid_control
    model.requires_grad_(False)
    model.control_model.requires_grad_(True)
    if only_mid_control:
        model.control_model.zero_convs.requires_grad_(False)
    unet = model.model.diffusion_model
    if not sd_locked:
        unet.output_blocks.requires_grad_(True)
        unet.out.requires_grad_(True)
    conv = unet_input_conv(model)
    n_locked = model.latent_channels
    if train_unet_input and conv.in_channels > n_locked:
        conv.weight.requires_grad_(True)
        if not getattr(conv, "_locked_grad_hook", None):
            conv._locked_grad_hook = conv.weight.register_hook(functools.partial(_zero_locked, n_locked=n_locked))
    return [p for p in model.parameters() if p.requires_grad]


def _zero_locked(grad: torch.Tensor, n_locked: int) -> torch.Tensor:
    grad = grad.clone()
    grad[:, :n_locked] = 0
    return grad


def param_groups(model: ControlLDM, weight_decay: float = 0.0) -> list[dict]:
    """Optimiser groups: the partly-locked input conv always without weight decay.

    Decoupled weight decay would shrink its locked channels even with a zero gradient.
    """
    conv_w = unet_input_conv(model).weight
    rest = [p for p in model.parameters() if p.requires_grad and p is not conv_w]
    groups = [{"params": rest, "weight_decay": weight_decay, "name": "trainable"}]
    if conv_w.requires_grad:
        groups.append({"params": [conv_w], "weight_decay": 0.0, "name": "unet_input"})
    return groups


def export_keys(model: ControlLDM) -> list[str]:
    """Names in the export: all of control_model.* plus every trainable tensor outside it."""
    keys = [k for k in model.state_dict() if k.startswith(CONTROL)]
    keys += [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(CONTROL)]
    return keys


def trainable_state_dict(model: ControlLDM) -> dict[str, torch.Tensor]:
    """The tensors `export_keys` names (detached, on their device)."""
    sd = model.state_dict()
    return {k: sd[k].detach() for k in export_keys(model)}


_PRIME = 2**31 - 1  # every product below stays inside int64
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_checksum(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """Exact checksum of a tensor's bits, computed on its own device: sum_i bits_i * (i + 1) mod
    2^31 - 1. Integer arithmetic, so it is the same on any device and in any summation order,
    and a changed or moved element changes it (but for a 1 in 2^31 chance). In chunks: the int64
    temporaries stay small next to the tensor."""
    flat = t.detach().contiguous().view(-1).view(_BITS[t.element_size()])
    total = 0
    for start in range(0, flat.numel(), chunk):
        bits = flat[start:start + chunk].long() % _PRIME
        pos = torch.arange(start + 1, start + 1 + bits.numel(), device=bits.device) % _PRIME
        total += int(((bits * pos) % _PRIME).sum())
    return total % _PRIME


def locked_digest(model: ControlLDM, trained: Iterable[str] | None = None) -> str:
    """Digest of every weight a training checkpoint leaves out (they come from --init on each
    start): names, shapes and exact bits, so a resume on top of other SD weights is caught
    however small the difference. No copy to the host: about a second for SD2.1 on a GPU.
    `trained`: the names left out, by default `export_keys` (which the model's requires_grad
    decides); at inference, the names an export holds, which are the same."""
    keep = set(export_keys(model) if trained is None else trained)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if name not in keep:
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{tensor_checksum(p)};".encode())
    return h.hexdigest()[:32]


def locked_fingerprint(model: ControlLDM) -> float:
    """What checkpoints written before 2026-11-27 20:49 record instead of locked_digest: the sum of
    squares (float64) of the same weights. Coarse (a relative 1e-7 hides a small edit), but it
    still tells other SD weights from the run's own when such a checkpoint is resumed."""
    keep = set(export_keys(model))
    return float(sum(p.detach().double().square().sum() for n, p in model.named_parameters() if n not in keep))


def export_control(model: ControlLDM, path: str | Path, *, step: int = 0, cfg: DictConfig | None = None,
                   extra: dict | None = None) -> Path:
    """Write the trainable weights to a safetensors file (atomically), with what they fit: among
    it the digest of the locked weights under them (inference notes other SD weights by it; 768-v
    has 512-base's shapes, so nothing else can), unless `extra` gives it (None: left out)."""
    meta = {"format": EXPORT_FORMAT, "color_variant": model.color_variant, "step": step,
            "concat_to_unet": model.concat_to_unet, "only_mid_control": model.only_mid_control,
            "parameterization": model.parameterization}
    if cfg is not None:  # the whole config, so the export alone says what model it belongs to
        meta["config_hash"] = config_hash(cfg)
        meta["config"] = OmegaConf.to_yaml(cfg, resolve=True)
    meta.update(extra or {})
    if "locked_digest" not in meta:
        with torch.no_grad():
            meta["locked_digest"] = locked_digest(model)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_checkpoint(trainable_state_dict(model), path, metadata=meta)  # a full disk: one line, not safetensors' error
    return Path(path)


def check_recorded(meta: dict[str, str], model: ControlLDM, path: str | Path) -> None:
    """Refuse a file whose metadata says it was made for another model (`recorded_mismatch`)."""
    if reason := recorded_mismatch(meta, model):
        raise CheckpointError(f"{path}: {reason}")


def recorded_mismatch(meta: dict[str, str], model: ControlLDM) -> str | None:
    """Why metadata `meta` says its file was made for another model, or None. These mismatches
    load without a shape error and then colour wrongly (a v1 init under a v2 config does not
    load, but eps under v, or 12 controls for 1, would)."""
    variant = meta.get("color_variant")
    if variant is not None and variant != model.color_variant:
        return (f"made for colour variant {variant}, the model is {model.color_variant} "
                f"(set model.color_variant={variant})")
    mid = meta.get("only_mid_control")  # a mismatch loads fine, then silently drops or adds 12 controls
    if mid is not None and mid != str(model.only_mid_control):
        return (f"trained with only_mid_control={mid.lower()}, the model has "
                f"{str(model.only_mid_control).lower()} (set model.only_mid_control={mid.lower()})")
    param = meta.get("parameterization")
    if param is not None and param != model.parameterization:
        return (f"made for a model that predicts {param}, this config's predicts "
                f"{model.parameterization} (set model.parameterization={param})")
    return None


def export_misfit(model: ControlLDM, control: dict) -> tuple[LoadReport, str | None]:
    """How an export's tensors line up with `model`, and why they would not load on top of SD
    weights (None: they would). No tensor of another shape, all of control_model.* or none (then
    it is no export at all), nothing the model lacks; the rest of the model comes from the SD
    file, so no share of it has to be present here."""
    report = compare_state_dict(model, control)
    reason = misfit(report, strict_prefixes=(CONTROL,), min_matched=0)
    if reason is None and not any(k.startswith(CONTROL) for k in control):
        reason = (f"no {CONTROL}* tensors (the file holds: {report.kind}); --control takes the control.safetensors "
                  "export of tutorial_train_sd21_color_v2.py")
    if reason is None and report.unexpected:
        reason = f"{len(report.unexpected)} tensors the model does not have (e.g. {report.unexpected[0]})"
    # a full checkpoint (the init, a converted training run) fits too, and would replace the SD
    # file's weights with its own, VAE and text encoder included, without a word
    if reason is None and (other := next((k for k in control if not k.startswith((CONTROL, UNET))), None)):
        reason = (f"it holds the whole model ({other} too), not the trained weights alone that go on top of "
                  "SD weights: give it as the checkpoint itself (--ckpt), without --control")
    return report, reason


def is_export(sd: dict, meta: dict[str, str]) -> bool:
    """An export by its metadata, or by its tensors: ControlNet weights and at most UNet tensors
    besides (no VAE, text encoder or schedule), which load_sd_plus_control takes as one too."""
    return meta.get("format") == EXPORT_FORMAT or (any(k.startswith(CONTROL) for k in sd) and
                                                   all(k.startswith((CONTROL, UNET)) for k in sd))


class LoadedExport(NamedTuple):
    """What load_sd_plus_control read from an export besides its tensors."""
    meta: dict[str, str]  # its metadata
    names: list[str]  # the tensor names it holds (what locked_digest leaves out at inference)
    ema_note: str | None = None  # checkpoint_fit.ema_note of the SD file


def load_sd_plus_control(model: ControlLDM, sd_path: str | Path, control_path: str | Path, *,
                         allow_pickle: bool = False) -> LoadedExport:
    """Load an SD2.1 checkpoint plus a `control.safetensors` export into `model`; returns the
    export's metadata and tensor names (read once, with its tensors).

    The SD file gives the locked parts (as `tool_add_control_sd21.py` would: new input
    channels zero, ControlNet from the UNet); the export then overwrites everything it holds.
    It must hold every `control_model.*` tensor of the model, so a ControlNet is never left
    half random. Raises CheckpointError naming the problem when the files don't fit the model.
    """
    control = load_state_dict(control_path, allow_pickle=allow_pickle)  # first: it names a missing or broken file
    meta = read_export_metadata(control_path, allow_pickle=allow_pickle)
    check_recorded(meta, model, control_path)
    report, reason = export_misfit(model, control)
    if reason is not None:
        raise CheckpointError(f"{control_path}: does not fit the model: {reason}", report)
    sd = load_state_dict(sd_path, allow_pickle=allow_pickle)
    try:
        state, _ = init_from_sd(model, sd)
    except CheckpointError as e:  # name the SD file: the message alone says "checkpoint"
        raise CheckpointError(f"{sd_path}: {e}") from None
    for k, v in control.items():
        state[k] = v.to(state[k].dtype)
    model.load_state_dict(state, strict=True)
    return LoadedExport(meta, list(control), ema_note(sd, sd_path))
