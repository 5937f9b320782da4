"""Reading and writing state dicts without ever running a checkpoint's pickled code.

`.ckpt` files are pickles: loading one with plain `torch.load` can execute arbitrary code. We
load them with `weights_only=True` and only unpickle fully when the caller says it trusts the
file. Writing defaults to safetensors (no code, memory-mappable) and is atomic so an
interrupted save never leaves a half-written checkpoint under the final name.

Whether a state dict fits a model is cldm/checkpoint_fit.py. The command line lives in
cldm/checkpoint_cli.py but runs under this module's name, the one docs and users know:
`python -m cldm.checkpoint inspect|convert`.
"""
import errno
import itertools
import json
import logging
import os
import pickle
import pickletools
import shutil
import warnings
import zipfile
from pathlib import Path

from cliutil import exit_quietly, file_problem, not_utf8, one_line, quiet_startup_signals

PROG = "python -m cldm.checkpoint"  # the CLI's name (cldm/checkpoint_cli.py): it runs as this module
if __name__ == "__main__":  # Ctrl-C while torch loads: run_cli's one line, not an import traceback
    quiet_startup_signals(PROG)

import torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from atomicio import atomic_path  # noqa: E402

log = logging.getLogger(__name__)

TORCH_EXTS = (".ckpt", ".pt", ".pth")


class CheckpointError(Exception):
    """A checkpoint that cannot be read safely, or that does not fit the model.

    The message is one line; `report` (a cldm.checkpoint_fit.LoadReport, when there is one) has the full
    comparison.
    """

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


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
    check_checkpoint_file(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise _safetensors_error(path, e) from None
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
    """Refuse a file that is no checkpoint at all (a video, an image, ...) or is cut short, with
    a plain message, in milliseconds: before a CLI says which config it uses or loads a model,
    and before torch.load would call it "truncated or corrupt (UnpicklingError ...)".

    Read are a safetensors file's header (which must cover the whole file) and a torch zip's
    directory at its end (torch >= 1.6; a legacy pickle's damage shows only when it loads).
    Missing files are left to the loader.
    """
    path = Path(path)
    if not path.is_file():
        return
    if path.suffix == ".safetensors":
        if not_utf8(path):  # else "truncated or not a safetensors file (Path ... is not valid UTF-8)"
            raise CheckpointError(f"{path}: safetensors cannot open a file name that is not UTF-8; rename it")
        try:
            with safe_open(str(path), "pt"):
                return
        except Exception as e:  # SafetensorError for a bad header; whatever else a damaged one raises
            raise _safetensors_error(path, e) from None
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path):
                return
        except Exception:  # BadZipFile, and from a damaged directory UnicodeDecodeError, NotImplementedError, ...
            raise CheckpointError(f"{path}: truncated or corrupt (its zip directory, at the end of the file, is "
                                  "missing or damaged)") from None
    if _torch_head(head):
        return
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        raise CheckpointError(f"{path}: looks like a safetensors file with a {path.suffix or 'missing'} "
                              "extension; rename it to .safetensors")
    raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors, or a torch "
                          ".ckpt/.pt/.pth zip or pickle)")


def _safetensors_error(path: Path, e: Exception) -> CheckpointError:
    try:  # safetensors says FileNotFoundError for any file it cannot open: an unreadable one was "truncated"
        open(path, "rb").close()
    except OSError as why:
        return CheckpointError(f"{path}: cannot read file ({why.strerror or why})")
    if _is_torch_file(path):  # else "header too large": the zip's first bytes read as its length
        return CheckpointError(f"{path}: looks like a torch checkpoint with a .safetensors extension; rename it "
                               "to .ckpt")
    return CheckpointError(f"{path}: truncated or not a safetensors file ({e})")


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
    needs = pickled_globals(path)
    if needs is None:
        raise CheckpointError(f"{path}: truncated or corrupt ({_first_line(err)})") from None
    if not allow_pickle:
        needs = sorted(needs, key=lambda n: n.split(".")[0] not in _RUNS_CODE)  # shown first, never behind the "..."
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


# Modules whose callables a pickle uses to run commands or code (a checkpoint needs none of them).
_RUNS_CODE = {"os", "posix", "nt", "subprocess", "builtins", "__builtin__", "runpy", "importlib", "shutil", "socket",
              "sys", "pty", "ctypes", "pickle", "marshal", "code", "codeop", "operator", "webbrowser",
              "_posixsubprocess", "multiprocessing", "timeit", "pdb", "platform"}


def pickled_globals(path):
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


def save_state_dict(sd, path, metadata=None, replace: bool = True):
    """Write `sd` atomically: safetensors for `.safetensors`, {"state_dict": sd} for `.ckpt/.pt/.pth`.

    Tensors are moved to CPU, made contiguous and un-aliased (safetensors refuses tensors that
    share storage), so the file loads the same on any device. The file gets the permissions of
    an ordinary new file (0666 less the umask; see atomicio). Without `replace`, a file that
    appeared at `path` meanwhile is kept: FileExistsError (atomicio.publish).
    """
    path = Path(path)
    check_extension(path)
    tensors, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    with atomic_path(path, keep_suffix=False, replace=replace) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
            _sort_header(tmp)
        else:
            torch.save({"state_dict": tensors, **({"metadata": dict(metadata)} if metadata else {})}, tmp)


def _sort_header(path) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place. safetensors writes
    the metadata in a hash map's order, which changes from run to run: the same weights and
    metadata gave files of other bytes, so a checksum could not tell that two runs agree. The
    sorted header is the same text reordered, so never longer; it is padded with spaces, as the
    format allows, to the length written."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        text = json.dumps(json.loads(f.read(n)), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def save_checkpoint(state: dict, out_path, metadata: dict | None = None, replace: bool = True) -> None:
    """save_state_dict, with a full disk (or quota) as one line instead of the writers' own
    errors (safetensors' SafetensorError, torch's "unexpected pos" RuntimeError, which says
    nothing of the cause): checked up front, and again if the write fails. A failed write
    leaves nothing behind (atomicio)."""
    out_path = Path(out_path)
    need = sum(t.numel() * t.element_size() for t in state.values())
    free = shutil.disk_usage(out_path.parent).free
    if free < need:
        raise _disk_full(f"{out_path}: no space left on device (the checkpoint needs {need / 2**20:.1f} MiB, "
                         f"{free / 2**20:.1f} MiB are free)")
    try:
        save_state_dict(state, out_path, metadata=metadata, replace=replace)
    except FileExistsError:
        raise
    except (SafetensorError, RuntimeError, OSError) as e:
        text = str(e)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text \
            or "quota" in text.lower() or shutil.disk_usage(out_path.parent).free < need
        reason = "no space left on device (or disk quota exceeded)" if full else one_line(e, with_type=True)
        line = f"{out_path}: cannot write the checkpoint: {reason}; nothing was written"
        raise (_disk_full(line) if full else OSError(line)) from None


def _disk_full(line: str) -> OSError:
    """OSError(line) with errno ENOSPC, what a caller's handler of a full disk looks at (the
    training's, for the export: it was safetensors' own error there, a traceback). No filename:
    str() would then be "[Errno 28] None: 'path'", not the line."""
    e = OSError(line)
    e.errno = errno.ENOSPC
    return e


if __name__ == "__main__":  # `python -m cldm.checkpoint`: the CLI, cldm/checkpoint_cli.py
    from cldm.checkpoint_cli import main
    exit_quietly(main())
