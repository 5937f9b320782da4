"""Whether a state dict fits a model, by tensor name and shape, and loading it when it does.

Every loader (the colorize pipeline, training and its resume, `python -m cldm.checkpoint inspect`)
applies the one rule in `misfit`, so a file of another colour variant, SD version or config is
refused with the same one line everywhere, before any tensor is copied. Reading the files is
cldm/checkpoint.py's job.
"""
import logging
import os
from dataclasses import dataclass, field

import torch

from cldm.checkpoint import CheckpointError
from cldm.color import VARIANTS
from ldm.schedule import BUFFER_NAMES, schedule_mismatch

log = logging.getLogger(__name__)

UNET, CONTROL = "model.diffusion_model.", "control_model."
# The locked Stable Diffusion parts: a checkpoint that has any of one must have all of it.
STRICT_PREFIXES = (UNET, "first_stage_model.", "cond_stage_model.")
MIN_MATCHED = 0.5  # below this fraction of the model's tensors found, it's the wrong file
# SD's latent channels, for reading a file without a model at hand (a model has .latent_channels);
# the colour variants add VARIANTS[v] input channels to it.
LATENT_CHANNELS = 4
INPUT_CONV = "input_blocks.0.0.weight"  # of the UNet (UNET + ...) and of the ControlNet (CONTROL + ...)
VARIANT_OF_INPUT = {LATENT_CHANNELS + extra: v for v, extra in VARIANTS.items()}  # input conv channels -> variant


@dataclass
class LoadReport:
    """How a checkpoint lines up with a model, by tensor name and shape."""

    expected: int = 0  # tensors the model has
    matched: list = field(default_factory=list)  # same name and shape: these get loaded
    missing: list = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: dict = field(default_factory=dict)  # name -> (model shape, checkpoint shape)
    ignored: list = field(default_factory=list)  # checkpoint keys skipped by prefix (EMA, ...)
    kind: str = ""  # what the checkpoint looks like (guess_kind)

    @property
    def ok(self):
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, max_names=6):
        """A few lines grouping keys by prefix, e.g. '  control_model.* (340 tensors)'."""
        lines = [f"{len(self.matched)} of {self.expected} model tensors found in the checkpoint"]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("ignored", self.ignored)):
            if keys:
                lines.append(f"{title} {len(keys)}:")
                lines += [f"  {label}" for label, _ in group_keys(keys, max_names)]
        if self.mismatched:
            lines.append(f"shape mismatch {len(self.mismatched)} (model vs checkpoint):")
            for label, first in group_keys(self.mismatched, merge_loose=False):
                m, c = self.mismatched[first]
                lines.append(f"  {label}: {list(m)} vs {list(c)}" if label == first else
                             f"  {label}, e.g. {first}: {list(m)} vs {list(c)}")
        return "\n".join(lines)


def group_keys(keys, max_names=6, merge_loose=True):
    """[(label, first key)]: dotted names grouped by their first part.

    A group of more than two keys is shown as its longest common prefix + '*' and a count;
    the few loose names (schedule buffers, single tensors) share one line if `merge_loose`.
    """
    groups = {}
    for k in sorted(keys):
        groups.setdefault(k.split(".")[0], []).append(k)
    out, loose = [], []
    for names in groups.values():
        if len(names) <= 2:
            loose += names
        else:
            prefix = os.path.commonprefix([n.split(".") for n in names])
            out.append((".".join(prefix + ["*"]) + f" ({len(names)} tensors)", names[0]))
    if not merge_loose:
        return out + [(n, n) for n in loose]
    if loose:
        more = f", ... (+{len(loose) - max_names} more)" if len(loose) > max_names else ""
        out.append((", ".join(loose[:max_names]) + more, loose[0]))
    return out


def _shape(v):
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def compare_state_dict(model_or_expected_shapes, sd):
    """Compare names and shapes of a model (or a {name: shape} map) with a state dict.

    `sd` values may be tensors or shapes, so key-name fixtures can be compared without weights.
    """
    exp = model_or_expected_shapes
    if isinstance(exp, torch.nn.Module):
        exp = exp.state_dict()
    exp = {k: _shape(v) for k, v in exp.items()}
    got = {k: _shape(v) for k, v in sd.items()}
    report = LoadReport(expected=len(exp))
    for k, shape in exp.items():
        if k not in got:
            report.missing.append(k)
        elif got[k] != shape:
            report.mismatched[k] = (shape, got[k])
        else:
            report.matched.append(k)
    report.unexpected = [k for k in got if k not in exp]
    report.kind = guess_kind(got)
    return report


def misfit(report, strict_prefixes=STRICT_PREFIXES, min_matched=MIN_MATCHED):
    """Why a checkpoint is clearly not this model, in one line (None if it fits well enough to load).

    The rule: (1) no tensor of the file may have another shape than the model's tensor of that
    name, anywhere: it could not be loaded, and leaving it at its random init silently would
    be a different model (e.g. a file of another colour variant). (2) Every strict part
    (prefix) the checkpoint has any tensor of must match the model key for key; a locked SD part
    loaded halfway is a different model. (3) At least `min_matched` of the model's tensors must
    be found, else it's another file (e.g. a bare UNet without the `model.diffusion_model.`
    prefix). Tensors missing outside the strict parts (a new ControlNet, say) are only reported,
    and keep their values. Widening SD's 4-channel input conv for v2/v3 is not loading but
    initialising: `cldm.convert.init_from_sd` (tool_add_control_sd21.py) does it.
    """
    if report.mismatched:
        return _mismatch_reason(report)
    present = {k for k in report.matched + report.unexpected}
    for p in strict_prefixes:
        if not any(k.startswith(p) for k in present):
            continue
        bad = ([k for k in report.missing if k.startswith(p)], [k for k in report.unexpected if k.startswith(p)])
        if any(bad):  # each count with its own example: "e.g. betas" after "171 unexpected" read as one of those
            counts = "; ".join(f"{len(b)} {w}, e.g. {b[0]}" for b, w in zip(bad, ("missing", "unexpected")) if b)
            return f"the checkpoint's {p or '(all)'}* does not match the model ({counts})"
    if report.expected and len(report.matched) < min_matched * report.expected:
        return f"only {len(report.matched)} of {report.expected} model tensors found in the checkpoint"
    return None


def _mismatch_reason(report):
    """'KEY is [file shape] in the checkpoint but [model shape] in the model (...); likely CAUSE'.

    Names an input conv first when one differs (its channel count tells the colour variant),
    then the ControlNet's and the UNet's tensors (e.g. cross-attention width tells SD1.x).
    """
    parts = (CONTROL, UNET)
    keys = sorted(report.mismatched, key=lambda k: (not k.endswith(INPUT_CONV),
                                                    next((i for i, p in enumerate(parts) if k.startswith(p)), 2), k))
    key = keys[0]
    model_shape, file_shape = (list(s) for s in report.mismatched[key])
    n = len(keys) - 1
    more = f" (and {n} more tensor{'s' if n > 1 else ''} of another shape)" if n else ""
    return (f"{key} is {file_shape} in the checkpoint but {model_shape} in the model{more}; "
            f"likely {_likely_cause(key, model_shape, file_shape, report.kind)}")


def not_sd2(kind: str) -> str | None:
    """Why weights of another Stable Diffusion generation or file layout (guess_kind's `kind`) cannot
    serve, or None."""
    if kind.startswith(("diffusers format", "UNet or ControlNet tensors without")):  # self-explanatory
        return kind
    if not kind.startswith(("SD1.x", "SDXL")):
        return None
    why = " (768-wide cross-attention and a CLIP ViT-L text encoder)" if kind.startswith("SD1.x") else ""
    return f"{kind}{why}, not Stable Diffusion 2.x: this model needs SD2.x weights such as v2-1_512-ema-pruned"


# SD2 models of other tasks, by their UNet's input channels (in a whole SD file: an export's input
# conv is ours) or extra inputs; their weights have text-to-image SD2's names, and an inpainting
# UNet's 9 inputs are even v2's count
SD_TASKS = {9: "inpainting weights (9 input channels: latent, mask, masked image)",
            5: "depth weights (5 input channels: latent, depth map)"}
UNCLIP = "unCLIP weights (an image-embedding input, label_emb)"


def not_text_to_image(kind: str) -> str | None:
    """Why SD2 weights of another task (guess_kind's `kind`) cannot start this model, or None:
    their extra input kernels would read the colour inputs as a mask or a depth map."""
    if not any(task in kind for task in (*SD_TASKS.values(), UNCLIP)):
        return None
    return (f"{kind}, not the text-to-image Stable Diffusion 2.1 this model starts from (its extra inputs would "
            "read the colour inputs as theirs): use v2-1_512-ema-pruned")


def _likely_cause(key, model_shape, file_shape, kind):
    if why := not_sd2(kind):  # tool_add_control_sd21.py refuses these too: no pointer to it
        return why
    if kind.startswith("ControlNet ("):  # its input conv would suggest v1, whose advice then fails on the hint
        return (f"a ControlNet of another task ({kind}: canny, depth, pose, ...), which cannot colourise (a colour "
                "ControlNet's hint is reference RGB + gray, 4 channels): use a ControlNet trained by "
                "tutorial_train_sd21_color_v2.py")
    if key.endswith(INPUT_CONV) and len(model_shape) == len(file_shape) == 4 and model_shape[1] != file_shape[1]:
        f_in, m_in = file_shape[1], model_shape[1]
        if key.startswith(CONTROL):
            fv, mv = VARIANT_OF_INPUT.get(f_in, "unknown"), VARIANT_OF_INPUT.get(m_in, "unknown")
            fix = f"; set model.color_variant={fv}" if fv != "unknown" else ""
            return (f"another colour variant: the file's ControlNet takes {f_in} input channels "
                    f"(colour variant {fv}), this config's {m_in} ({mv}){fix}")
        if f_in == LATENT_CHANNELS and not kind.startswith(("ours", "ControlNet")):
            return (f"plain Stable Diffusion weights ({kind}, {f_in} input channels): make the initial "
                    f"checkpoint with tool_add_control_sd21.py, which widens the input conv")
        return (f"another colour variant or concat_to_unet setting: the file's UNet takes {f_in} input "
                f"channels, this config's {m_in} (model.color_variant, model.concat_to_unet)")
    return f"another model config (the file looks like: {kind})"


def check_fit(model, sd, strict_prefixes=STRICT_PREFIXES):
    """The LoadReport of `sd` against `model`, or CheckpointError (one line) under the rule in
    `misfit`. Names and shapes only, so `model` may live on the meta device: a misfit is found
    before a large model is built for real."""
    report = compare_state_dict(model, sd)
    if reason := misfit(report, strict_prefixes):
        raise CheckpointError(f"checkpoint ({report.kind}) does not fit {type(model).__name__}: {reason}", report)
    return report


EMA_PREFIX = "model_ema."  # a full LDM training checkpoint's EMA copy: model_ema.<UNet name without dots>


def ema_note(sd, path) -> str | None:
    """The line saying that `path` (its tensors `sd`) holds EMA weights that are not used, or None.
    SD's own inference loads model.* and leaves model_ema.* too; the released *-ema-pruned files
    hold the EMA weights as model.*, so only a full training checkpoint has both."""
    n = sum(k.startswith(EMA_PREFIX) for k in sd)
    if not n:
        return None
    return (f"{path} also holds EMA weights ({EMA_PREFIX}*, {n} tensors), which are not used: its model.* "
            "weights are, as in SD's own inference (SD's *-ema-pruned files hold the EMA weights as model.*)")


def load_into(model, sd, *, strict_prefixes=STRICT_PREFIXES, ignore_prefixes=(EMA_PREFIX,)):
    """Copy the matching tensors of `sd` into `model` (casting dtype), refusing a misfit first.

    Raises CheckpointError (one line; the comparison in `.report`) under the rule in `misfit`,
    before touching the model. Keys starting with `ignore_prefixes` (EMA copies) are skipped;
    pass `strict_prefixes=("",)` to require an exact match of everything. Returns the
    LoadReport; a partial load (tensors left at their init) is also logged as a WARNING, so
    it is visible even where the caller does not print `report.summary()`.
    """
    ignored = [k for k in sd if k.startswith(tuple(ignore_prefixes))]
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(ignore_prefixes))}
    report = check_fit(model, sd, strict_prefixes)
    report.ignored = ignored
    own = model.state_dict()
    if name := schedule_mismatch(sd, own):
        raise CheckpointError(f"checkpoint ({report.kind}): its noise schedule ({name}) is not the config's "
                              "(timesteps, linear_start, linear_end)", report)
    # the schedule stays the model's own, computed from the config: the file's may be rounded
    model.load_state_dict({k: sd[k] for k in report.matched if k not in BUFFER_NAMES}, strict=False)
    if not report.ok:
        log.warning("partial load into %s:\n%s", type(model).__name__, report.summary())
    return report


def guess_kind(shapes):
    """What a {name: shape} map looks like: SD2.x / SD1.x / a ControlNet / ours (colour v1-v3)."""
    shapes = {k: _shape(v) for k, v in shapes.items()}
    ctx = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    base = {1024: "SD2.x", 768: "SD1.x", 2048: "SDXL"}.get(ctx, f"unknown SD variant (context dim {ctx})") \
        if ctx else "unknown SD variant"
    has_unet = any(k.startswith(UNET) for k in shapes)
    hint = shapes.get(CONTROL + "input_hint_block.0.weight")
    if hint is not None:
        if hint[1] == 4:  # reference RGB + target gray
            in_ch = shapes.get(CONTROL + INPUT_CONV, (0, 0))[1]
            kind = f"ours: colour ControlNet {VARIANT_OF_INPUT.get(in_ch, '?')}"
        else:
            kind = f"ControlNet ({hint[1]}-channel hint)"
        return f"{kind} on {base}" + ("" if has_unet else ", ControlNet weights only")
    if has_unet:
        has_text = any(k.startswith("cond_stage_model.") for k in shapes)
        in_ch = shapes.get(UNET + INPUT_CONV, (0, 0))
        task = SD_TASKS.get(in_ch[1] if len(in_ch) == 4 else 0) if has_text else None  # not a part of ours
        if any(k.startswith(UNET + "label_emb.") for k in shapes):
            task = UNCLIP
        return f"{base} {task or 'weights'}" + ("" if has_text else ", no text encoder")
    if any(k.startswith(("down_blocks.", "controlnet_cond_embedding.", "encoder.down_blocks.", "text_model."))
           for k in shapes):
        return ("diffusers format (down_blocks.*, ...), not the single-file original format these tools read "
                "(model.diffusion_model.*, as in SD2.1's v2-1_512-ema-pruned.safetensors)")
    if any(k.startswith(("input_blocks.", "input_hint_block.")) for k in shapes):
        return "UNet or ControlNet tensors without their model.diffusion_model. or control_model. prefix"
    return "unknown (no model.diffusion_model.* or control_model.* tensors)"
