"""What made an output frame, written into the frame itself (a PNG iTXt chunk).

A stopped run is continued with `--frames N:` into the same --out, and --video then stitches
the earlier frames in: with another seed, checkpoint or reference the clip mixed two looks
without a word. Each PNG carries the settings that decide its colours (not --batch, --device,
--precision or the CUDA-graph and compile switches, which change nothing but float rounding),
so a run that leaves earlier frames of --out in place compares them with its own and says
what differs. In the frame, not in a file beside it: --out stays one PNG per input frame, and
a frame copied elsewhere keeps its record.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Iterator

KEYWORD = b"colorize_inference"  # the iTXt chunk's keyword
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODEL_KEYS = ("mode", "steps", "eta", "seed", "noise", "size", "ref_guidance", "raw", "set")
ANCHORED_KEYS = ("anchor_every", "anchor_strength")
_SAMPLE = 1 << 16  # bytes hashed at each of a weights file's start, middle and end


def _file_id(path: str | None) -> str | None:
    """A weights file by name, size and a hash of three samples of it: a 5 GB checkpoint is not
    read whole at every run, yet an export rewritten after more training (same name, same size)
    differs in every sample; a copy moved elsewhere is the same file."""
    if path is None:
        return None
    p = Path(path)
    try:
        size, h = p.stat().st_size, hashlib.sha256()
        with open(p, "rb") as f:
            for at in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
                f.seek(at)
                h.update(f.read(_SAMPLE))
        return f"{p.name} ({size} bytes, sampled sha256 {h.hexdigest()[:12]})"
    except OSError:
        return p.name


def _content_id(path: str) -> str:
    try:
        return f"{Path(path).name} (sha256 {hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]})"
    except OSError:
        return Path(path).name


def _config_id(config) -> str | None:
    """The model config a run used (a YAML file, or one a weights file records), by content: left
    out, or given as the file it would have found, it is the same config."""
    if config is None:
        return None
    if isinstance(config, (str, Path)):
        return _content_id(config)
    from omegaconf import OmegaConf
    return f"recorded in the weights (sha256 {hashlib.sha256(OmegaConf.to_yaml(config).encode()).hexdigest()[:12]})"


def settings(args, config=None) -> dict:
    """The flags of colorize_inference.py's `args` that decide the colours of its frames, and the
    model `config` it resolved (a path or a DictConfig), as strings: what the record holds and
    differences compares."""
    out = {"method": args.method, "input": Path(args.input).name,
           "reference": [_content_id(r) for r in args.reference],
           "reference_frame": list(args.reference_frame)}
    if args.reference_frame:
        out["gt"] = Path(args.gt or args.input).name
    if args.method == "model":
        out.update(ckpt=_file_id(args.ckpt), control=_file_id(args.control), config=_config_id(config))
        out.update({k: getattr(args, k) for k in MODEL_KEYS})
        if args.mode == "anchored":
            out.update({k: getattr(args, k) for k in ANCHORED_KEYS})
    return {k: v if isinstance(v, (str, type(None))) else json.dumps(v) for k, v in out.items()}


def with_record(png: bytes, record: dict) -> bytes:
    """PNG bytes with `record` (JSON, UTF-8) in an iTXt chunk right after IHDR."""
    data = KEYWORD + b"\0\0\0\0\0" + json.dumps(record, sort_keys=True).encode()  # uncompressed, no language
    chunk = struct.pack(">I", len(data)) + b"iTXt" + data + struct.pack(">I", zlib.crc32(b"iTXt" + data))
    ihdr_end = len(_SIGNATURE) + 8 + struct.unpack(">I", png[8:12])[0] + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def read_record(path: str | Path) -> dict | None:
    """The record with_record put into the PNG at `path`; None for a file without one (written
    by an earlier version, or not by colorize_inference.py) or one that cannot be read. Only the
    chunks before the image data are read: the record is the second."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_SIGNATURE)) != _SIGNATURE:
                return None
            while len(head := f.read(8)) == 8:
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return None
                if kind != b"iTXt":
                    f.seek(length + 4, 1)  # data and CRC
                    continue
                data = f.read(length)
                f.seek(4, 1)
                if len(data) == length and data.startswith(KEYWORD + b"\0\0\0\0\0"):
                    record = json.loads(data[len(KEYWORD) + 5:])
                    return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None
    return None


def differences(earlier: dict, now: dict, label: str = "now") -> list[str]:
    """Each setting that differs, as "--flag earlier value (`label`: value)"."""
    shown = lambda v: "(none)" if v in (None, "[]") else v  # noqa: E731
    return [f"--{k.replace('_', '-')} {shown(earlier.get(k))} ({label}: {shown(now.get(k))})"
            for k in sorted(set(earlier) | set(now)) if earlier.get(k) != now.get(k)]


def recorded(paths) -> Iterator[tuple[Path, dict]]:
    """(path, record) of each PNG at `paths` that carries one, in their order."""
    for path in paths:
        if (record := read_record(path)) is not None:
            yield Path(path), record


def common_record(paths) -> tuple[dict | None, str | None]:
    """(the record the PNGs at `paths` share, or the first one found; a note naming two that
    differ and how, or None). Frames without a record are passed over."""
    first = first_path = None
    for path, record in recorded(paths):
        if first is None:
            first, first_path = record, path
        elif diff := differences(first, record, path.name):
            return first, f"{first_path.name} and {path.name} were made with other settings: {'; '.join(diff)}"
    return first, None
