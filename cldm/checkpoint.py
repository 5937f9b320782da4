"""Reading, writing and checking state dicts without ever running a checkpoint's pickled code.

`.ckpt` files are pickles: loading one with plain `torch.load` can execute arbitrary code. We
load them with `weights_only=True` and only unpickle fully when the caller says it trusts the
file. Writing defaults to safetensors (no code, memory-mappable) and is atomic so an
interrupted save never leaves a half-written checkpoint under the final name.

CLI: `python -m cldm.checkpoint inspect FILE` and `python -m cldm.checkpoint convert IN OUT`.
"""
import argparse
import logging
import os
import pickle
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

TORCH_EXTS = (".ckpt", ".pt", ".pth")
# The locked Stable Diffusion parts: a checkpoint that has any of one must have all of it.
STRICT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
MIN_MATCHED = 0.5  # below this fraction of the model's tensors found, it's the wrong file


class CheckpointError(Exception):
    """A checkpoint that cannot be read safely, or that does not fit the model."""


# ---------------------------------------------------------------------------------------------
# reading and writing


def load_state_dict(path, *, allow_pickle=False, map_location="cpu"):
    """Load `{name: tensor}` from `.safetensors` or `.ckpt/.pt/.pth` (weights only by default).

    SD/Lightning checkpoints wrap the weights in a top-level "state_dict" next to bookkeeping
    such as "global_step"; we unwrap it and drop every non-tensor entry (logged at INFO).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({e})") from None
    obj = _torch_load(path, map_location, allow_pickle)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if dropped := [str(k) for k in obj if k not in sd]:
        log.info("%s: ignored %d non-tensor entries (%s)", path, len(dropped), ", ".join(dropped[:5]))
    return sd


def _torch_load(path, map_location, allow_pickle):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        needs = _pickled_globals(path, e)
        if needs is None:
            raise CheckpointError(f"{path}: truncated or corrupt ({_first_line(e)})") from None
        if not allow_pickle:
            what = f" ({', '.join(needs[:3])}{', ...' if len(needs) > 3 else ''})" if needs else ""
            raise CheckpointError(
                f"{path}: holds pickled Python objects{what}, not just tensors, and unpickling "
                f"could run code; only if you trust the file, re-save it with `python -m "
                f"cldm.checkpoint convert {path} OUT.safetensors --allow-pickle`") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/KeyError/... on damaged files
        raise CheckpointError(f"{path}: truncated or corrupt ({_first_line(e)})") from None
    log.warning("%s: fully unpickling (allow_pickle=True): trusting this file", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: could not be unpickled ({_first_line(e)})") from None


def _pickled_globals(path, err):
    """Python callables the pickle would import (read without running it); None if it's damaged.

    An empty list means "needs unpickling, names unknown" (legacy non-zip files can't be listed).
    """
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return [] if "GLOBAL" in str(err) else None
    return names or None


def _first_line(e):
    """The first sentence of an exception: torch's load errors run to paragraphs."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def save_state_dict(sd, path, metadata=None):
    """Write `sd` atomically: safetensors for `.safetensors`, {"state_dict": sd} for `.ckpt/.pt/.pth`.

    Tensors are moved to CPU, made contiguous and un-aliased (safetensors refuses tensors that
    share storage), so the file loads the same on any device.
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in TORCH_EXTS:
        raise ValueError(f"{path}: unknown checkpoint extension (use .safetensors or {'/'.join(TORCH_EXTS)})")
    tensors, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save({"state_dict": tensors, **({"metadata": dict(metadata)} if metadata else {})}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary shareable file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# checking a state dict against a model


@dataclass
class LoadReport:
    """How a checkpoint lines up with a model, by tensor name and shape."""

    expected: int = 0  # tensors the model has
    matched: list = field(default_factory=list)  # same name and shape: these get loaded
    missing: list = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: dict = field(default_factory=dict)  # name -> (model shape, checkpoint shape)
    ignored: list = field(default_factory=list)  # checkpoint keys skipped by prefix (EMA, ...)

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
    return report


def misfit(report, strict_prefixes=STRICT_PREFIXES, min_matched=MIN_MATCHED):
    """Why a checkpoint is clearly not this model (None if it fits well enough to load).

    The rule: (1) every strict part (prefix) the checkpoint has any tensor of must match the
    model key for key, names and shapes; a locked SD part loaded halfway, or with other shapes
    (e.g. SD1.x's 768-wide cross-attention instead of SD2.x's 1024), is a different model.
    (2) At least `min_matched` of the model's tensors must be found, else it's another file
    (e.g. a bare UNet without the `model.diffusion_model.` prefix). Missing or reshaped tensors
    outside the strict parts (a new ControlNet, say) are only reported, and keep their values.
    """
    present = {k for k in report.matched + report.unexpected + list(report.mismatched)}
    for p in strict_prefixes:
        if not any(k.startswith(p) for k in present):
            continue
        bad = ([k for k in report.missing if k.startswith(p)],
               [k for k in report.unexpected if k.startswith(p)],
               [k for k in report.mismatched if k.startswith(p)])
        if any(bad):
            counts = ", ".join(f"{len(b)} {w}" for b, w in zip(bad, ("missing", "unexpected", "reshaped")) if b)
            return f"the checkpoint's {p or '(all)'}* does not match the model ({counts})"
    if report.expected and len(report.matched) < min_matched * report.expected:
        return f"only {len(report.matched)} of {report.expected} model tensors found in the checkpoint"
    return None


def load_into(model, sd, *, strict_prefixes=STRICT_PREFIXES, ignore_prefixes=("model_ema.",)):
    """Copy the matching tensors of `sd` into `model` (casting dtype), refusing a misfit first.

    Raises CheckpointError (reason + summary) under the rule in `misfit`, before touching the
    model. Keys starting with `ignore_prefixes` (EMA copies) are skipped; pass
    `strict_prefixes=("",)` to require an exact match of everything.
    """
    ignored = [k for k in sd if k.startswith(tuple(ignore_prefixes))]
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(ignore_prefixes))}
    report = compare_state_dict(model, sd)
    report.ignored = ignored
    if reason := misfit(report, strict_prefixes):
        raise CheckpointError(f"checkpoint ({guess_kind(sd)}) does not fit {type(model).__name__}: "
                              f"{reason}\n{report.summary()}")
    model.load_state_dict({k: sd[k] for k in report.matched}, strict=False)
    if not report.ok:
        log.info("partial load into %s:\n%s", type(model).__name__, report.summary())
    return report


# ---------------------------------------------------------------------------------------------
# CLI


def guess_kind(shapes):
    """What a {name: shape} map looks like: SD2.x / SD1.x / a ControlNet / ours (colour v1-v3)."""
    shapes = {k: _shape(v) for k, v in shapes.items()}
    ctx = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    base = {1024: "SD2.x", 768: "SD1.x", 2048: "SDXL"}.get(ctx, f"unknown SD variant (context dim {ctx})") \
        if ctx else "unknown SD variant"
    has_unet = any(k.startswith("model.diffusion_model.") for k in shapes)
    hint = shapes.get("control_model.input_hint_block.0.weight")
    if hint is not None:
        if hint[1] == 4:  # reference RGB + target gray
            in_ch = shapes.get("control_model.input_blocks.0.0.weight", (0, 0))[1]
            kind = f"ours: colour ControlNet {({4: 'v1', 9: 'v2', 12: 'v3'}).get(in_ch, '?')}"
        else:
            kind = f"ControlNet ({hint[1]}-channel hint)"
        return f"{kind} on {base}" + ("" if has_unet else ", ControlNet weights only")
    if has_unet:
        has_text = any(k.startswith("cond_stage_model.") for k in shapes)
        return f"{base} weights" + ("" if has_text else ", no text encoder")
    return "unknown (no model.diffusion_model.* or control_model.* tensors)"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cldm.checkpoint", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="print tensor count, parameters, dtypes and what the file looks like")
    p.add_argument("file", help=".safetensors, .ckpt, .pt or .pth file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="fully unpickle a .ckpt that needs it (runs its code: trusted files only)")
    p = sub.add_parser("convert", help="re-save a checkpoint's tensors (format from OUT's extension)")
    p.add_argument("input", help="checkpoint to read")
    p.add_argument("output", help="file to write: .safetensors (recommended) or .ckpt/.pt/.pth")
    p.add_argument("--allow-pickle", action="store_true",
                   help="fully unpickle INPUT if it needs it (runs its code: trusted files only)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "inspect":
            sd = load_state_dict(args.file, allow_pickle=args.allow_pickle)
            n = sum(v.numel() for v in sd.values())
            dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
            tops = Counter(k.split(".")[0] for k in sd)
            print(f"file: {args.file}\ntensors: {len(sd)}\nparameters: {n:,} ({n / 1e6:.1f} M)")
            print("dtypes: " + ", ".join(f"{d} {c}" for d, c in dtypes.most_common()))
            print("top-level: " + ", ".join(f"{t}.* {c}" if c > 1 else t for t, c in tops.most_common(8)))
            print(f"looks like: {guess_kind(sd)}")
        else:
            sd = load_state_dict(args.input, allow_pickle=args.allow_pickle)
            save_state_dict(sd, args.output, metadata={"converted_from": Path(args.input).name})
            print(f"wrote {len(sd)} tensors to {args.output}")
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
