"""A model ready for inference: which device, which config, which weights, which dtype.

The config is chosen without the weights (`cldm.weights_config.resolve_config`: --config, a
YAML beside the weights, the config the file records, SD2.1's), so a CLI can check its options
against it before the long load. The weights are checked against the config's shapes on the
meta device first (`load_model`), and against the config the file records, so a wrong file or
config fails in a second with one line instead of colouring worse. `cast_weights` then holds
the sampling weights in the compute dtype.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from cldm.checkpoint import CheckpointError, load_state_dict
from cldm.checkpoint_fit import compare_state_dict, ema_note, guess_kind, load_into, misfit
from cldm.cldm import ControlLDM
from cldm.config import ConfigError, load_config, model_config
from cldm.model import create_model
from cldm.trainable import is_export, load_sd_plus_control, locked_digest
from cldm.weights_config import (check_saved_config, declared_parameterization, load_resolved_config,
                                 parameterization_conflict, read_export_metadata, resolve_config,
                                 saved_config_mismatch)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """--device as a torch device; anything but auto, cpu, cuda or cuda:N is refused in one line
    (torch's own message lists every device type it knows)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N (N from 0)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _remedy(weights, config, overrides: Sequence[str], source: Path | DictConfig) -> str:
    """What to leave out or fix where the config in use contradicts the one `weights` records:
    only flags that were given, and a YAML found beside the weights only if it is at fault."""
    if config is not None:
        return f"leave out --config{' and --set' if overrides else ''} to use the one saved with it"
    if isinstance(source, Path) and (not overrides or _contradicts(weights, source)):
        return f"fix or remove {source}, or pass --config"
    return "leave out --set to use the one saved with it"  # the weights' own config, or a YAML that agrees


def _contradicts(weights, yaml: Path) -> bool:
    try:
        return saved_config_mismatch(weights, load_config(yaml)) is not None
    except ConfigError:  # fine only with the overrides
        return True


def load_model(ckpt: str | os.PathLike, control: str | os.PathLike | None = None,
               config: str | os.PathLike | None = None, overrides: Sequence[str] = (),
               device: str | torch.device = "cpu", allow_pickle: bool = False,
               source: Path | DictConfig | None = None, note: Callable[[str], None] | None = None) -> ControlLDM:
    """A ControlLDM in eval mode on `device`, from a full checkpoint or SD2.1 + a ControlNet export.

    The checkpoint is checked against the config's shapes on the meta device first, so a wrong
    file fails in a second with one CheckpointError instead of after building the model.
    `source`: resolve_config(ckpt, config, control), where the caller has it already (to say
    which config it uses): the weights' metadata is then not read for it again. `device`: a
    torch.device or its name, or "auto" (resolve_device). `note`: told
    when `control` was trained on other SD weights than `ckpt` holds (None: not checked, which
    saves digesting them: ~1 s on a GPU, ~20 s on 2 CPU cores for SD2.1), and when `ckpt` holds
    EMA weights besides those used.
    """
    if device == "auto":
        device = resolve_device(device)
    source = resolve_config(ckpt, config, control) if source is None else source
    cfg = load_resolved_config(source, overrides, (("--control", control), ("--ckpt", ckpt)), config)
    weights = control if control is not None else ckpt
    check_saved_config(weights, cfg, source, overrides, lambda: _remedy(weights, config, overrides, source))
    if control is not None:
        # the SD file (or an init) under the export may record a config too: its VAE and schedule
        # are what it was made with, so a scale factor (say) of another model would colour worse,
        # silently; an init may have been trained with or without only_mid_control
        if reason := saved_config_mismatch(ckpt, cfg, free=("only_mid_control",), here="the config in use"):
            raise CheckpointError(f"--ckpt {ckpt} was saved with another model config than the one --control "
                                  f"{control} is used with: {reason}; pass the SD weights it was trained on (its "
                                  "run's --init)")
        declared = declared_parameterization(ckpt)  # 768-v under a 512 export
        if conflict := parameterization_conflict(ckpt, cfg.model.parameterization, declared):
            raise CheckpointError(f"--ckpt {conflict}")
        model = _built(cfg, device)
        meta, names, ema = load_sd_plus_control(model, ckpt, control, allow_pickle=allow_pickle)
        # a note, not a refusal: other weights (a fine-tuned SD2.1) may be meant
        if note is not None and trained_on_other_weights(model, names, meta):
            init = f" ({meta['init']})" if meta.get("init") else ""
            note(f"--control {control} was trained on other SD weights than --ckpt {ckpt} holds (its run's "
                 f"--init{init}; the digests of the locked weights differ): fine for a fine-tuned SD2.1 or the "
                 "same weights at another precision, but SD2.1 768-v under a 512-base export colours wrongly; to "
                 "be sure, pass that --init, or the SD file it was made from, as --ckpt")
        elif note is not None and "locked_digest" not in meta:  # other SD weights would colour worse, unnoticed
            note(f"--control {control} records no digest of the SD weights it was trained on (an export made "
                 "before 2026-11-28 18:47, or not by this project's training): whether --ckpt holds them is not "
                 "checked; pass its run's --init, or the SD file that was made from")
    else:
        sd = load_state_dict(ckpt, allow_pickle=allow_pickle)
        meta = read_export_metadata(ckpt, allow_pickle=allow_pickle)
        if note is not None and meta.get("made_by") == "tool_add_control_sd21.py":  # loads fine, colours at random
            note(f"--ckpt {ckpt} is an initial checkpoint of tool_add_control_sd21.py: its ControlNet is untrained "
                 "(zero convolutions), so the colours come from SD alone, not from the reference; for a trained "
                 "model pass the run's control.safetensors with --control (and this file, or the SD file, as --ckpt)")
        if is_export(sd, meta):  # else "lacks N tensors": no help
            raise CheckpointError(f"{ckpt}: an export of trained weights (control.safetensors), not a full "
                                  "checkpoint; pass it as --control, with the SD2.1 file its run started from "
                                  "as --ckpt")
        with torch.device("meta"):
            shapes = create_model(cfg).state_dict()
        report = compare_state_dict(shapes, sd)
        reason = misfit(report)
        lacking = [k for k in report.missing if k.startswith(("control_model.", "model.", "first_stage_model.",
                                                              "cond_stage_model."))]
        if reason is None and lacking:
            reason = (f"it lacks {len(lacking)} model tensors (e.g. {lacking[0]}); for SD2.1 weights "
                      "plus a trained ControlNet pass the ControlNet with --control")
        if reason is not None:
            raise CheckpointError(f"{ckpt} does not fit the config: {reason}; the file holds: {guess_kind(sd)}")
        model = _built(cfg, device)
        load_into(model, sd)
        ema = ema_note(sd, ckpt)
    if note is not None and ema is not None:
        note(ema)
    return model.eval().requires_grad_(False)


def _built(cfg, device: str | torch.device) -> ControlLDM:
    """create_model(cfg) on `device`, without drawing from the caller's random numbers: its random
    initialisation is overwritten by the load, and a seeded caller's next draw must not depend
    on whether a model was loaded in between."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"), device:
        return create_model(cfg)


def trained_on_other_weights(model: ControlLDM, names: Iterable[str], meta: dict[str, str]) -> bool:
    """Whether an export (its tensor names `names` and metadata `meta`, as load_sd_plus_control
    read them) records a digest of other locked SD weights than `model` holds (False where it
    records none: exports made before 2026-11-28 18:47, which load_model notes).
    SD2.1 768-v has 512-base's tensors to the last shape, so this digest is all that tells
    them apart."""
    recorded = meta.get("locked_digest")
    return recorded is not None and recorded != locked_digest(model, names)


def schedule_length(ckpt: str | os.PathLike, control: str | os.PathLike | None = None,
                    config: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                    source: Path | DictConfig | None = None) -> int:
    """The noise schedule length (timesteps) of the config `load_model` would use, read without
    the weights: a step count can be checked (check_steps) before the long load. `source`: as
    for load_model."""
    source = resolve_config(ckpt, config, control) if source is None else source
    cfg = load_resolved_config(source, overrides, (("--control", control), ("--ckpt", ckpt)), config)
    return int(model_config(cfg).schedule.timesteps)


def compute_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The autocast dtype for an Options.precision: auto is fp16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "fp16" if torch.device(device).type == "cuda" else "fp32"
    return PRECISIONS[precision]


def cast_weights(model: ControlLDM, dtype: torch.dtype) -> ControlLDM:
    """Hold the weights of ControlNet, UNet and VAE in `dtype` (in place): for inference only.

    Under autocast their convolutions and matmuls run in `dtype` anyway, each float32 weight
    cast at every call; without autocast's cast cache (off: CUDA graphs) that is every
    denoising step, 1.2 G parameters read and written again (~7 GB of memory traffic per step
    for SD2.1). Held in `dtype`, nothing is cast and the weights take half the memory. The
    norms keep float32 parameters: autocast runs them in float32, so the result is the same
    as with float32 weights. The noise schedule (buffers of the ControlLDM itself) and the
    text encoder (once per clip) stay float32 too. A model being trained must keep float32
    weights.
    """
    for part in (model.control_model, model.model, model.first_stage_model):
        for module in part.modules():  # the layers: parameters live only in leaf modules here
            if not any(module.children()) and not isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.to(dtype)
    return model
