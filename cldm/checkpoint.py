"""Reading, writing and checking state dicts without ever running a checkpoint's pickled code.

`.ckpt` files are pickles: loading one with plain `torch.load` can execute arbitrary code. We
load them with `weights_only=True` and only unpickle fully when the caller says it trusts the
file. Writing defaults to safetensors (no code, memory-mappable) and is atomic so an
interrupted save never leaves a half-written checkpoint under the final name.

CLI: `python -m cldm.checkpoint inspect FILE [--config YAML]` (what it is; how it fits a model, or
for this project's training checkpoints and exports, what they are used for) and
`python -m cldm.checkpoint convert IN OUT`; exit status 0, or 2 with one line on bad input.
"""
import itertools
import logging
import os
import pickle
import pickletools
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cliutil import (OneLineParser, config_override, exit_quietly, file_problem, not_utf8, out_file_problem, path_arg,
                     quiet_startup_signals, run_cli)

PROG = "python -m cldm.checkpoint"
if __name__ == "__main__":  # Ctrl-C while torch loads: run_cli's one line, not an import traceback
    quiet_startup_signals(PROG)

import torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from atomicio import atomic_path  # noqa: E402
from cldm.color import VARIANTS  # noqa: E402
from ldm.schedule import BUFFER_NAMES, schedule_mismatch  # noqa: E402

log = logging.getLogger(__name__)

TORCH_EXTS = (".ckpt", ".pt", ".pth")
UNET, CONTROL = "model.diffusion_model.", "control_model."
# The locked Stable Diffusion parts: a checkpoint that has any of one must have all of it.
STRICT_PREFIXES = (UNET, "first_stage_model.", "cond_stage_model.")
MIN_MATCHED = 0.5  # below this fraction of the model's tensors found, it's the wrong file
# SD's latent channels, for reading a file without a model at hand (a model has .latent_channels);
# the colour variants add VARIANTS[v] input channels to it.
LATENT_CHANNELS = 4
INPUT_CONV = "input_blocks.0.0.weight"  # of the UNet (UNET + ...) and of the ControlNet (CONTROL + ...)
VARIANT_OF_INPUT = {LATENT_CHANNELS + extra: v for v, extra in VARIANTS.items()}  # input conv channels -> variant


class CheckpointError(Exception):
    """A checkpoint that cannot be read safely, or that does not fit the model.

    The message is one line; `report` (a LoadReport, when there is one) has the full comparison.
    """

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------------
# reading and writing


def load_state_dict(path, *, allow_pickle=False, map_location="cpu"):
    """Load `{name: tensor}` from `.safetensors` or `.ckpt/.pt/.pth` (weights only by default).

    SD/Lightning checkpoints wrap the weights in a top-level "state_dict" next to bookkeeping
    such as "global_step"; other trainers in a single "model"/"module"-like entry, and DDP
    prefixes every name with "module.". We unwrap those and drop every non-tensor entry
    (logged at INFO); a file with no tensors left is an error, not an empty state dict.
    """
    path = Path(path)
    if problem := file_problem(path, folder="is a folder, not a checkpoint file"):
        raise CheckpointError(f"{path}: {problem}")
    if path.suffix == ".safetensors":
        if not_utf8(path):  # else "truncated or not a safetensors file (Path ... is not valid UTF-8)"
            raise CheckpointError(f"{path}: safetensors cannot open a file name that is not UTF-8; rename it")
        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            if _is_torch_file(path):  # else "header too large": the zip's first bytes read as its length
                raise CheckpointError(f"{path}: looks like a torch checkpoint with a .safetensors extension; "
                                      "rename it to .ckpt") from None
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({e})") from None
    check_checkpoint_file(path)
    obj = _torch_load(path, map_location, allow_pickle)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    nested = [v for v in obj.values() if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())]
    if not any(isinstance(v, torch.Tensor) for v in obj.values()) and len(nested) == 1:
        obj = nested[0]  # e.g. {"model": {...}, "epoch": 3}
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if dropped := [str(k) for k in obj if k not in sd]:
        log.info("%s: ignored %d non-tensor entries (%s)", path, len(dropped), ", ".join(dropped[:5]))
    if not sd:
        keys = ", ".join(map(str, list(obj)[:5])) or "none"
        raise CheckpointError(f"{path}: holds no tensors where weights are expected (top-level keys: {keys})")
    if all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_metadata(path, *, allow_pickle=False) -> dict[str, str]:
    """The string metadata a checkpoint carries, as save_state_dict writes it (the safetensors
    header, or a .ckpt's "metadata" entry): provenance, the model config, what an export was
    trained for. {} for a file without any."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    try:  # memory-mapped: the tensors of a multi-GB file are not read
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy-format or pickled file: the loader's own rules and messages
        obj = _torch_load(path, "cpu", allow_pickle)
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse a file that is no checkpoint at all (a video, an image, ...) with a plain message,
    before torch.load would call it "truncated or corrupt (UnpicklingError ...)".

    .safetensors files are left to the loader (its message is already clear), as are missing
    files. Torch checkpoints are zip archives (torch >= 1.6) or start with a pickle
    protocol >= 2 opcode (the legacy format).
    """
    path = Path(path)
    if not path.is_file() or path.suffix == ".safetensors":
        return
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from None
    if _torch_head(head):
        return
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        raise CheckpointError(f"{path}: looks like a safetensors file with a {path.suffix or 'missing'} "
                              "extension; rename it to .safetensors")
    raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors, or a torch "
                          ".ckpt/.pt/.pth zip or pickle)")


def _torch_head(head: bytes) -> bool:
    """Whether a file's first bytes are a torch checkpoint's: a zip (torch >= 1.6) or a pickle of
    protocol >= 2 (the legacy format)."""
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _is_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return _torch_head(f.read(16))
    except OSError:
        return False


def _torch_load(path, map_location, allow_pickle):
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read; we explain below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects; RuntimeError/EOFError/... on damaged files
        err = e
    needs = _pickled_globals(path)
    if needs is None:
        raise CheckpointError(f"{path}: truncated or corrupt ({_first_line(err)})") from None
    if not allow_pickle:
        what = ", ".join(needs[:3]) + (", ..." if len(needs) > 3 else "")
        raise CheckpointError(
            f"{path}: holds pickled Python objects ({what}), not just tensors, and unpickling could "
            f"run code; convert it with `python -m cldm.checkpoint convert {path} OUT.safetensors "
            f"--allow-pickle` (or pass --allow-pickle where the script offers it), only if you trust the "
            "file") from None
    log.warning("%s: fully unpickling (allow_pickle=True): trusting this file", path)
    try:
        if _is_plain_pickle(path):  # pickle.dump output: torch.load would run it, then reject the header
            with open(path, "rb") as f:
                return pickle.load(f)
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: could not be unpickled ({_first_line(e)})") from None


# Newest torch.save format is a zip with the pickle in */data.pkl; the legacy format is a few
# pickles in a row (magic number, protocol, sys info, the object, storage keys) then raw bytes.
_LEGACY_PICKLES = 4
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
               "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickled_globals(path):
    """Names of the callables the file's pickle would import but `weights_only` refuses.

    Read with `pickletools.genops` (and torch's zip-file scanner), which parse opcodes and never
    run them. None when there are none, i.e. the load failed because the file is damaged.
    """
    try:  # sorted: torch gives a set's order, which changes from run to run
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: a legacy torch.save file or a plain pickle
        scanned = _scan_globals(path)
        if scanned is None:
            return None
        allowed = _weights_only_allowed()
        names = [n for n in dict.fromkeys(scanned) if n not in allowed]
    return names or None


def _weights_only_allowed():
    """'module.name' of what `weights_only` unpickles: torch's built-in list plus add_safe_globals."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # private API moved: report every global rather than none
        allowed = set()
    return allowed | {f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals()
                      if hasattr(g, "__qualname__")}


def _scan_globals(path):
    """'module.name' of every GLOBAL / STACK_GLOBAL in the leading pickles of `path`, or None.

    Each pickle must parse up to its STOP opcode, so damaged or random bytes yield None.
    """
    names = []
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for _ in range(_LEGACY_PICKLES):
                if f.tell() >= size:
                    break
                names += _globals_of_one_pickle(f)
    except Exception:
        return None
    return names


def _globals_of_one_pickle(f):
    """Globals of the pickle starting at f's position; leaves f after its STOP."""
    names, memo, pushed = [], {}, []
    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", "."))
        elif name == "STACK_GLOBAL":
            mod, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
            names.append(f"{mod}.{attr}" if isinstance(mod, str) and isinstance(attr, str) else "?")
        if name in _STRING_OPS:
            pushed.append(arg)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.stack_after:
            pushed.append(None)
    return names


def _is_plain_pickle(path):
    """True for a pickle.dump file: not a zip, and it does not start with torch's magic number.

    A legacy torch.save file starts with the pickle PROTO, LONG1 magic, STOP; only those first
    opcodes are read, never the arguments of a whole pickle (a pickle.dump's tensor bytes).
    """
    if zipfile.is_zipfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return _TORCH_MAGIC not in [arg for _, arg, _ in itertools.islice(pickletools.genops(f), 3)]
    except Exception:
        return False


def _first_line(e):
    """The first sentence of an exception: torch's load errors run to paragraphs."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_extension(path) -> None:
    """ValueError (one line) unless `path` has an extension save_state_dict can write."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in TORCH_EXTS:
        raise ValueError(f"{path}: unknown checkpoint extension (use .safetensors or {'/'.join(TORCH_EXTS)})")


def save_state_dict(sd, path, metadata=None):
    """Write `sd` atomically: safetensors for `.safetensors`, {"state_dict": sd} for `.ckpt/.pt/.pth`.

    Tensors are moved to CPU, made contiguous and un-aliased (safetensors refuses tensors that
    share storage), so the file loads the same on any device. The file gets the permissions of
    an ordinary new file (0666 less the umask; see atomicio).
    """
    path = Path(path)
    check_extension(path)
    tensors, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    with atomic_path(path, keep_suffix=False) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save({"state_dict": tensors, **({"metadata": dict(metadata)} if metadata else {})}, tmp)


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
        if any(bad):
            counts = ", ".join(f"{len(b)} {w}" for b, w in zip(bad, ("missing", "unexpected")) if b)
            first = next(b[0] for b in bad if b)
            return f"the checkpoint's {p or '(all)'}* does not match the model ({counts}, e.g. {first})"
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


def _likely_cause(key, model_shape, file_shape, kind):
    if kind.startswith(("SD1.x", "SDXL")):  # tool_add_control_sd21.py refuses these too: no pointer to it
        return f"{kind}, not Stable Diffusion 2.x: this model needs SD2.x weights such as v2-1_512-ema-pruned"
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


def load_into(model, sd, *, strict_prefixes=STRICT_PREFIXES, ignore_prefixes=("model_ema.",)):
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


# ---------------------------------------------------------------------------------------------
# CLI


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
        return f"{base} weights" + ("" if has_text else ", no text encoder")
    return "unknown (no model.diffusion_model.* or control_model.* tensors)"


def main(argv=None):
    """Exit status: 0 done, 1 inspect --config found that the file would not load, 2 bad input
    (arguments, unreadable or misfit file), 130 / 143 stopped by Ctrl-C / SIGTERM."""
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n")[0],
                       epilog="Exit status: 0 done, 1 the file would not load under --config, 2 bad input, "
                              "130 / 143 stopped by Ctrl-C / SIGTERM.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="print tensor count, parameters, dtypes and what the file looks like "
                                       "(SD weights, a full model, a training checkpoint, a --control export)")
    p.add_argument("file", type=path_arg, help=".safetensors, .ckpt, .pt or .pth file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="fully unpickle a .ckpt that needs it (runs its code: trusted files only)")
    p.add_argument("--config", type=path_arg,
                   help="also compare the file with the model of this YAML: the load summary "
                        "(found / missing / unexpected / reshaped) and whether it would load; a "
                        "training checkpoint (OUT/checkpoints/*.ckpt) against the tensors that train "
                        "under it, as a resume loads them, an export (control.safetensors) on top of "
                        "SD weights, as --control loads it")
    p.add_argument("--set", dest="overrides", action="append", type=config_override, default=[], metavar="KEY=VALUE",
                   help="config override for --config, e.g. --set model.color_variant=v3 (repeatable)")
    p = sub.add_parser("convert", help="re-save a checkpoint's tensors (format from OUT's extension)")
    p.add_argument("input", type=path_arg, help="checkpoint to read")
    p.add_argument("output", type=path_arg, help="file to write: .safetensors (recommended) or .ckpt/.pt/.pth")
    p.add_argument("--allow-pickle", action="store_true",
                   help="fully unpickle INPUT if it needs it (runs its code: trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (else refused)")
    args = ap.parse_args(argv)
    return run_cli(PROG, _inspect if args.cmd == "inspect" else _convert, args,
                   (CheckpointError, ValueError, OSError))


def _inspect(args):
    if args.overrides and not args.config:
        raise ValueError("--set needs --config (the overrides apply to its model)")
    cfg = None
    if args.config:  # before any output: a bad config is the whole answer
        from cldm.model import load_config  # cldm.model imports this module
        cfg = load_config(args.config, args.overrides)
    sd = load_state_dict(args.file, allow_pickle=args.allow_pickle)
    meta = read_metadata(args.file, allow_pickle=args.allow_pickle)
    n = sum(v.numel() for v in sd.values())
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
    tops = Counter(k.split(".")[0] for k in sd)
    print(f"file: {args.file}\ntensors: {len(sd)}\nparameters: {n:,} ({n / 1e6:.1f} M)")
    print("dtypes: " + ", ".join(f"{d} {c}" for d, c in dtypes.most_common()))
    print("top-level: " + ", ".join(f"{t}.* {c}" if c > 1 else t for t, c in tops.most_common(8)))
    from cldm import resume, trainable, weights_config  # they import this module
    training = resume.read_training_checkpoint(args.file)
    export = training is None and trainable.is_export(sd, meta)
    if training is not None:  # OUT/checkpoints/*.ckpt: the trainable tensors, under the LightningModule's name
        sd = {k.removeprefix(trainable.MODULE_PREFIX): v for k, v in sd.items()}
        kind = (f"Lightning training checkpoint of this project: {len(sd)} trainable tensors, step "
                f"{training.get('global_step', '?')}, to resume or --export ({guess_kind(sd)})")
    elif export:
        step = f", step {meta['step']}" if "step" in meta else ""
        step += f", trained on --init {meta['init']}" if "init" in meta else ""  # the SD weights it fits best
        kind = f"ControlNet export (trainable weights only{step}), for --control on top of SD weights " \
               f"({guess_kind(sd)})"
    else:
        kind = guess_kind(sd)
    print(f"looks like: {kind}")
    print("metadata: " + (", ".join(sorted(meta)) or "none"))
    if cfg is None:
        return 0
    from cldm.model import create_model
    with torch.device("meta"):
        model = create_model(cfg)
    if training is not None:  # what a resume (or --export) of a run under this config would load
        trainable.configure_trainable(model, cfg.model.sd_locked, cfg.model.get("train_unet_input", True))
        ours, *older = weights_config.config_hashes(cfg)
        report, reason = resume.resume_misfit(model, ours, sd, training[trainable.TRAINING_KEY], also=older)
        print(f"against {args.config}, the tensors that train under it:\n{report.summary()}")
        verdict = "would load to resume training (on the run's --init weights)"
    elif export:  # what colorize_inference.py --ckpt SD --control FILE would load
        report, reason = trainable.export_misfit(model, sd)
        reason = trainable.recorded_mismatch(meta, model) or reason
        print(f"against {args.config}, on top of SD weights that give the rest:\n{report.summary()}")
        verdict = "would load as --control"
    else:
        report = compare_state_dict(model, sd)
        reason = misfit(report)
        print(f"against {args.config}:\n{report.summary()}")
        verdict = "would load" + ("" if report.ok else " (partially)")
    if reason is None and training is None:  # as colorize_inference.py and training compare it
        here = str(args.config) + (" with the overrides" if args.overrides else "")
        if mismatch := weights_config.saved_config_mismatch(args.file, cfg, here=here):
            reason = f"it was saved with another model config: {mismatch}"
    print(f"would not load: {reason}" if reason else verdict)
    return 1 if reason else 0


def _convert(args):
    # all before the input is read (minutes for a large one): a folder or a file in the way of
    # OUTPUT was an error naming the temporary file beside it, an unknown extension one at the end
    if problem := out_file_problem(None, args.output):
        raise ValueError(problem)
    check_extension(args.output)
    if not Path(args.output).parent.is_dir():  # else the error names the temporary file beside it
        raise ValueError(f"{args.output}: no folder {Path(args.output).parent} to write it in")
    if Path(args.output).exists() and not args.overwrite:
        raise ValueError(f"{args.output}: exists; pass --overwrite to replace it")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"{args.output}: the same file as the input; write to another name")
    sd = load_state_dict(args.input, allow_pickle=args.allow_pickle)
    meta = read_metadata(args.input, allow_pickle=args.allow_pickle)  # the config and provenance travel along
    save_state_dict(sd, args.output, metadata={**meta, "converted_from": Path(args.input).name})
    print(f"wrote {len(sd)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    exit_quietly(main())
