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

KEYWORD = b"colorize_inference"  # the iTXt chunk's keyword
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_READ_LIMIT = 1 << 13  # the chunk sits right after IHDR: a file's first bytes hold it
MODEL_KEYS = ("mode", "steps", "eta", "seed", "noise", "size", "ref_guidance", "raw", "set")
ANCHORED_KEYS = ("anchor_every", "anchor_strength")


def _file_id(path: str | None) -> str | None:
    """A weights file by name and size: a 5 GB checkpoint is not hashed at every run, and a copy
    moved elsewhere is the same file."""
    if path is None:
        return None
    p = Path(path)
    try:
        return f"{p.name} ({p.stat().st_size} bytes)"
    except OSError:
        return p.name


def _content_id(path: str) -> str:
    try:
        return f"{Path(path).name} (sha256 {hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]})"
    except OSError:
        return Path(path).name


def settings(args) -> dict:
    """The flags of colorize_inference.py's `args` that decide the colours of its frames, as
    strings (what the record holds and differences compares)."""
    out = {"method": args.method, "input": Path(args.input).name,
           "reference": [_content_id(r) for r in args.reference],
           "reference_frame": list(args.reference_frame)}
    if args.reference_frame:
        out["gt"] = Path(args.gt or args.input).name
    if args.method == "model":
        out.update(ckpt=_file_id(args.ckpt), control=_file_id(args.control),
                   config=None if args.config is None else Path(args.config).name)
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
    by an earlier version, or not by colorize_inference.py) or one that cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(_READ_LIMIT)
    except OSError:
        return None
    if not head.startswith(_SIGNATURE):
        return None
    pos = len(_SIGNATURE)
    while pos + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[pos:pos + 8])
        data = head[pos + 8:pos + 8 + length]
        if kind in (b"IDAT", b"IEND") or len(data) < length:
            return None
        if kind == b"iTXt" and data.startswith(KEYWORD + b"\0\0\0\0\0"):
            try:
                record = json.loads(data[len(KEYWORD) + 5:])
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
        pos += 12 + length
    return None


def differences(earlier: dict, now: dict, label: str = "now") -> list[str]:
    """Each setting that differs, as "--flag earlier value (`label`: value)"."""
    shown = lambda v: "(none)" if v in (None, "[]") else v  # noqa: E731
    return [f"--{k.replace('_', '-')} {shown(earlier.get(k))} ({label}: {shown(now.get(k))})"
            for k in sorted(set(earlier) | set(now)) if earlier.get(k) != now.get(k)]


def common_record(paths) -> tuple[dict | None, str | None]:
    """(the record the PNGs at `paths` share, or the first one found; a note naming two that
    differ and how, or None). Frames without a record are passed over."""
    first = first_path = None
    for path in paths:
        if (record := read_record(path)) is None:
            continue
        if first is None:
            first, first_path = record, path
        elif diff := differences(first, record, path.name):
            return first, f"{first_path.name} and {path.name} were made with other settings: {'; '.join(diff)}"
    return first, None
