"""Initial trainable checkpoint from a Stable Diffusion checkpoint.

SD tensors are copied as they are; the ControlNet encoder starts as a copy of the UNet
encoder; new input channels (v2/v3) start at zero, so the fresh model's prediction equals
plain SD's; the hint block keeps its random init and the zero convs their zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cldm.checkpoint import CheckpointError
from cldm.checkpoint_fit import CONTROL, EMA_PREFIX, INPUT_CONV, UNET, guess_kind, not_sd2
from cldm.cldm import ControlLDM
from ldm.schedule import BUFFER_NAMES, schedule_mismatch


@dataclass
class InitReport:
    copied: list[str] = field(default_factory=list)         # taken from the SD file as is
    control_from_unet: list[str] = field(default_factory=list)
    widened: list[str] = field(default_factory=list)        # SD kernel + zero extra input channels
    new: list[str] = field(default_factory=list)            # fresh init (hint block, zero convs)
    schedule: list[str] = field(default_factory=list)       # noise-schedule buffers, from the config
    ignored: list[str] = field(default_factory=list)        # in the SD file, not in the model

    def summary(self) -> str:
        def groups(keys):
            counts: dict[str, int] = {}
            for k in keys:  # EMA names have no inner dots (model_ema.diffusion_modelinput_blocks00...)
                head = EMA_PREFIX[:-1] if k.startswith(EMA_PREFIX) else ".".join(k.split(".")[:2])
                counts[head] = counts.get(head, 0) + 1
            return ", ".join(f"{h}.* ({n})" for h, n in sorted(counts.items())) or "-"
        ema = any(k.startswith(EMA_PREFIX) for k in self.ignored)
        return "\n".join([
            f"copied from SD:            {len(self.copied)} tensors: {groups(self.copied)}",
            f"ControlNet from SD UNet:   {len(self.control_from_unet)} tensors",
            f"widened (zero new inputs): {', '.join(self.widened) or '-'}",
            f"new (fresh init):          {len(self.new)} tensors: {groups(self.new)}",
            f"noise schedule (config):   {len(self.schedule)} buffers",
            f"ignored from the file:     {len(self.ignored)} tensors: {groups(self.ignored)}",
            *(["  (model_ema.*: the file's EMA weights; its model.* weights were copied, as SD's own inference "
               "uses them; SD's *-ema-pruned files hold the EMA weights as model.*)"] if ema else []),
        ])


def _widenable(src: torch.Tensor, target_shape: torch.Size) -> bool:
    """The file's input conv fits the model's but for the extra input channels."""
    return src.ndim == 4 and src.shape[0] == target_shape[0] and src.shape[2:] == target_shape[2:] \
        and src.shape[1] <= target_shape[1]


def _widen(src: torch.Tensor, target_shape: torch.Size, key: str) -> torch.Tensor:
    """Pretrained kernel in the first input channels, zeros in the new ones."""
    if not _widenable(src, target_shape):
        raise CheckpointError(f"{key}: cannot widen shape {tuple(src.shape)} to {tuple(target_shape)}")
    out = torch.zeros(target_shape, dtype=src.dtype)
    out[:, : src.shape[1]] = src
    return out


def init_from_sd(model: ControlLDM, sd: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], InitReport]:
    """State dict for `model` built from an SD checkpoint's tensors `sd`.

    What the file cannot give (the ControlNet's new layers, the schedule) comes from `fresh`
    (default: `model`'s own state); so `model` may live on the meta device, which saves its
    memory when the values come from elsewhere. `dtype`: the copied weights' dtype (default:
    the model's), cast once; the schedule stays float32.

    Raises CheckpointError when the file is not the SD the config describes (a UNet, VAE or
    text-encoder tensor missing or of another shape), saying what the file looks like (e.g.
    SD1.x) and listing what differs. The one shape change allowed is widening the 4-channel
    input conv (`_widen`): that is the point of this function, not a mismatch.
    """
    report, out, problems = InitReport(), {}, []
    target = model.state_dict()
    own = target if fresh is None else fresh
    if name := schedule_mismatch(sd, own):
        problems.append(f"its noise schedule ({name}) is not the config's")
    for key, shape_of in target.items():
        want = dtype if dtype is not None and shape_of.is_floating_point() else shape_of.dtype
        if key in BUFFER_NAMES:  # from the config (see schedule_mismatch); the file's may be rounded or absent
            out[key] = own[key]
            report.schedule.append(key)
            continue
        if key.startswith(CONTROL):
            src_key = UNET + key[len(CONTROL):]
            bucket = report.control_from_unet
        else:
            src_key, bucket = key, report.copied
        src = sd.get(src_key)
        if src is None:
            if key.startswith(CONTROL):
                out[key] = own[key].to(want)
                report.new.append(key)
            else:
                problems.append(f"missing {key}")
            continue
        if src.shape != shape_of.shape:
            if key.endswith(INPUT_CONV) and _widenable(src, shape_of.shape):  # else: a mismatch like any other
                out[key] = _widen(src, shape_of.shape, key).to(want)
                report.widened.append(key)
                continue
            problems.append(f"{key}: file {tuple(src.shape)} vs model {tuple(shape_of.shape)}")
            continue
        out[key] = src.to(want)
        bucket.append(key)
    report.ignored = sorted(k for k in sd if k not in target)
    if problems:
        kind = guess_kind(sd)
        if why := not_sd2(kind):  # the list would be noise: every cross-attention and text tensor differs
            example = next((p for p in problems if " vs model " in p), problems[0])
            raise CheckpointError(f"{why} ({len(problems)} problems, e.g. {example})")
        head = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint ({kind}) does not match the model config: {head}")
    return out, report
