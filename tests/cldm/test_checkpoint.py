"""Checkpoint I/O: safe loading (never running pickled code), atomic saving, metadata."""
import os
import re
from pathlib import Path

import pytest
import numpy as np
import torch
from safetensors import safe_open

from cldm import checkpoint, checkpoint_cli
from cldm.checkpoint import CheckpointError, load_state_dict, read_metadata, save_state_dict
from tests.helpers import Evil, assert_same, named_pipe


def sample_sd():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {"w": base, "w_t": base.T, "tied": base, "half": torch.randn(5).half(),
            "steps": torch.tensor([1, 2, 3]), "scalar": torch.tensor(2.5)}


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt", ".pt"])
def test_round_trip_keeps_values_and_dtypes(tmp_path, ext):
    sd = sample_sd()  # includes a transposed view and two names sharing one storage
    path = tmp_path / f"m{ext}"
    save_state_dict(sd, path, metadata={"variant": "v2"})
    assert_same(load_state_dict(path), sd)
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind
    if ext == ".safetensors":
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"variant": "v2"}
    else:
        assert set(torch.load(path, weights_only=True)) == {"state_dict", "metadata"}


def test_lightning_checkpoint_is_unwrapped_and_non_tensors_dropped(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2), "note": "x"}, "global_step": 7, "epoch": 1}, path)
    assert_same(load_state_dict(path), {"a": torch.ones(2)})


def test_failed_save_leaves_existing_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_state_dict({"a": torch.ones(2)}, path)

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_state_dict({"a": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert_same(load_state_dict(path), {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="extension"):
        save_state_dict({"a": torch.ones(2)}, tmp_path / "m.bin")


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_saved_files_get_the_mode_of_an_ordinary_file(tmp_path, ext):
    """0666 less the umask, as open() would create it: not mkstemp's 0600, nor a fixed 0644."""
    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664)):
            os.umask(umask)
            path = tmp_path / f"m{umask:03o}{ext}"
            save_state_dict({"a": torch.ones(2)}, path)
            assert path.stat().st_mode & 0o777 == mode, (oct(umask), oct(path.stat().st_mode))
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == [f"m{u}{ext}" for u in ("002", "022", "027")]  # no temp files


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "payload": Evil(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "mkdir" in msg
    assert "python -m cldm.checkpoint convert" in msg and "--allow-pickle" in msg
    # The explicit opt-in really unpickles (and so runs the payload).
    assert_same(load_state_dict(path, allow_pickle=True), {"a": torch.ones(2)})
    assert marker.exists()


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_truncated_or_garbage_file_names_the_file(tmp_path, ext):
    path = tmp_path / f"model{ext}"
    save_state_dict({"a": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match=f"model{ext}.*(truncated|corrupt)"):
        load_state_dict(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"model{ext}"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="nope.ckpt: no such file"):
        load_state_dict(tmp_path / "nope.ckpt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_a_named_pipe_is_refused_unopened_not_called_missing(tmp_path, ext):
    with named_pipe(tmp_path / f"model{ext}") as pipe, pytest.raises(
            CheckpointError, match=rf"^{re.escape(str(pipe))}: not a regular file \(a named pipe, socket or device\)$"):
        load_state_dict(pipe)  # was "no such file"


def test_plain_pickle_check_reads_only_the_first_opcodes(tmp_path, monkeypatch):
    """Telling pickle.dump output from a legacy torch.save file needs the first pickle's first
    opcodes (PROTO, LONG1 magic, ...), not every argument of a pickle of tensors."""
    import pickle
    import pickletools
    plain, legacy = tmp_path / "plain.ckpt", tmp_path / "legacy.ckpt"
    with open(plain, "wb") as f:
        pickle.dump({"state_dict": {f"w{i}": torch.ones(2) for i in range(50)}}, f, protocol=4)
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.ckpt")
    seen, genops = [], pickletools.genops

    def counting(f):
        for op in genops(f):
            seen.append(op[0].name)
            yield op
    monkeypatch.setattr(checkpoint.pickletools, "genops", counting)
    assert checkpoint._is_plain_pickle(plain) and len(seen) <= 3, seen
    seen.clear()
    assert not checkpoint._is_plain_pickle(legacy) and seen[:2] == ["PROTO", "LONG1"] and len(seen) <= 3
    assert not checkpoint._is_plain_pickle(tmp_path / "zip.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"\xff" * 16)  # no pickle at all: not a plain one either
    assert not checkpoint._is_plain_pickle(tmp_path / "garbage.ckpt")


class System:
    """Unpickling this runs a shell command (os.system): the classic malicious .ckpt."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("writer", ["pickle-5", "pickle-4", "pickle-2", "torch-legacy", "torch-zip"])
def test_every_pickle_flavour_names_its_globals_without_running_them(tmp_path, writer):
    import pickle
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    obj = {"state_dict": {"a": torch.ones(2), "payload": System(marker)}}
    if writer.startswith("pickle"):
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(writer[-1]))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "torch-zip")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert not marker.exists()
    # os.system lives in posix (or nt); pickle.dump of tensors also needs torch.storage._load_from_bytes
    system = f"{os.system.__module__}.system"
    from_bytes = f"{system}, torch.storage._load_from_bytes"  # what runs commands first
    expected = {"pickle-5": from_bytes, "pickle-4": from_bytes, "pickle-2": from_bytes,
                "torch-legacy": system, "torch-zip": system}[writer]
    assert str(err.value) == (
        f"{path}: holds pickled Python objects ({expected}), not just tensors, and unpickling could run code; "
        f"convert it with `python -m cldm.checkpoint convert {path} OUT.safetensors --allow-pickle` (or pass "
        f"--allow-pickle where the script offers it), only if you trust the file")
    # Trusted on request, whatever the flavour (torch.load can't read plain pickles: pickle.load does).
    assert_same(load_state_dict(path, allow_pickle=True), {"a": torch.ones(2)})
    assert marker.exists()


def test_other_trainers_wrappings_are_unwrapped_and_empty_files_refused(tmp_path):
    """{"model": sd} (plus bookkeeping) and DDP's "module." prefix load as the plain state dict;
    a folder, or a file without tensors, is named as such instead of loading as nothing."""
    sd = sample_sd()
    torch.save({"model": sd, "epoch": 3}, tmp_path / "nested.ckpt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    for name in ("nested.ckpt", "ddp.pt"):
        assert_same(checkpoint.load_state_dict(tmp_path / name), sd)
    some = {("module." if i % 2 else "") + k: v for i, (k, v) in enumerate(sd.items())}
    torch.save(some, tmp_path / "some.pt")  # not all keys prefixed: not a DDP save, names kept
    assert_same(checkpoint.load_state_dict(tmp_path / "some.pt"), some)
    torch.save({"epoch": 3, "lr": 1e-5}, tmp_path / "none.ckpt")
    with pytest.raises(CheckpointError, match=r"none\.ckpt: holds no tensors where weights are expected "
                                              r"\(top-level keys: epoch, lr\)"):
        checkpoint.load_state_dict(tmp_path / "none.ckpt")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        checkpoint.load_state_dict(tmp_path)
    assert checkpoint_cli.main(["convert", str(tmp_path / "none.ckpt"), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()


def test_a_nested_state_dict_is_unwrapped_only_as_the_one_source_of_tensors(tmp_path):
    """Top-level tensors win over a nested dict; two nested state dicts are ambiguous, not the
    first one; names that are not strings are dropped like any other non-weight entry."""
    a, b = torch.ones(2), torch.zeros(3)
    torch.save({"a": a, "sub": {"b": b}}, tmp_path / "top.ckpt")
    assert_same(load_state_dict(tmp_path / "top.ckpt"), {"a": a})
    torch.save({"model": {"a": a}, "ema": {"a": b}, "epoch": 3}, tmp_path / "two.ckpt")
    with pytest.raises(CheckpointError, match=r"two\.ckpt: holds no tensors where weights are expected \(top-level "
                                              r"keys: model, ema, epoch\)$"):
        load_state_dict(tmp_path / "two.ckpt")
    torch.save({0: b, "module.a": a}, tmp_path / "int.ckpt")
    assert_same(load_state_dict(tmp_path / "int.ckpt"), {"a": a})


def test_safetensors_load_where_asked(tmp_path, monkeypatch):
    save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    devices, real = [], checkpoint.load_file
    monkeypatch.setattr(checkpoint, "load_file", lambda path, device: devices.append(device) or real(path, "cpu"))
    load_state_dict(tmp_path / "m.safetensors", map_location=torch.device("cuda", 1))
    assert devices == ["cuda:1"]


def test_read_metadata_gives_strings_and_nothing_for_a_file_without_any(tmp_path):
    from safetensors.torch import save_file
    torch.save({"state_dict": {"a": torch.ones(1)}, "metadata": {"step": 3, 4: True}}, tmp_path / "m.ckpt")
    assert read_metadata(tmp_path / "m.ckpt") == {"step": "3", "4": "True"}
    save_file({"a": torch.ones(1)}, tmp_path / "bare.safetensors")  # no metadata header at all
    assert read_metadata(tmp_path / "bare.safetensors") == {}
    torch.save({"a": torch.ones(1)}, tmp_path / "bare.ckpt")
    assert read_metadata(tmp_path / "bare.ckpt") == {}


class Calls:
    """Unpickling this calls `fn` (never done here: the load refuses it)."""

    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return self.fn, ("x",)


def test_more_than_three_pickled_globals_are_named_three_and_an_ellipsis(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "x": [Calls(f) for f in (os.mkdir, os.rmdir, os.remove,
                                                                          os.system)]}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: holds pickled Python objects \([\w.]+, [\w.]+, [\w.]+, "
                                              r"\.\.\.\), not just tensors"):
        load_state_dict(path)


def test_a_callable_that_runs_commands_is_named_before_the_ellipsis(tmp_path):
    """Three harmless-looking globals sorted before posix.system hid it behind the "..."."""
    import argparse

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "x": [argparse.Namespace(), np.float64(1.0), np.dtype("f4"),
                                                          Calls(os.system)]}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert str(err.value).startswith(f"{path}: holds pickled Python objects ({os.system.__module__}.system, ")


def test_first_line_of_an_error_is_its_first_sentence():
    assert checkpoint._first_line(RuntimeError("PytorchStreamReader failed. See the docs\nmore")) == \
        "RuntimeError: PytorchStreamReader failed"
    assert checkpoint._first_line(EOFError()) == "EOFError"
    assert checkpoint._first_line(RuntimeError("\n  zip broken. more")) == "RuntimeError: zip broken"
    assert checkpoint._first_line(ValueError("x" * 300)) == "ValueError: " + "x" * 160


def test_check_checkpoint_file_leaves_real_checkpoints_alone(tmp_path):
    for name in ("m.safetensors", "m.ckpt"):
        save_state_dict({"a": torch.ones(2)}, tmp_path / name)
        assert checkpoint.check_checkpoint_file(tmp_path / name) is None


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("cut", [1, 100, 4000])
def test_check_checkpoint_file_finds_a_file_cut_short(tmp_path, ext, cut):
    """From the header (safetensors) or the zip directory at the end (torch): what a CLI checks
    before it says which config it uses. Any cut is found, a single byte too."""
    path = tmp_path / f"m{ext}"
    save_state_dict({"a": torch.randn(4000), "b": torch.randn(10)}, path)
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(CheckpointError) as e:
        checkpoint.check_checkpoint_file(path)
    said = {".safetensors": f"{path}: truncated or not a safetensors file (Error while deserializing header: ",
            ".ckpt": f"{path}: truncated or corrupt (its zip directory, at the end of the file, is missing or damaged)"}
    assert str(e.value).startswith(said[ext]) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError) as again:  # and the loader says the same
        load_state_dict(path)
    assert str(again.value) == str(e.value)


def test_a_damaged_zip_directory_is_one_checkpoint_error_whatever_zipfile_raises(tmp_path):
    """zipfile raises more than BadZipFile on a damaged directory (UnicodeDecodeError for a name
    flagged UTF-8 that is not, NotImplementedError for a version it does not know, ...): each
    escaped as a traceback from the early check (a review found the first; a fuzz of the rest).
    Every byte of the central directory flipped: the file loads, or fails with CheckpointError."""
    import random

    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    whole = path.read_bytes()
    cd = whole.rfind(b"PK\x01\x02")  # the last central-directory entry
    bad = bytearray(whole)
    bad[cd + 9] |= 0x08  # general-purpose flag: UTF-8 names
    bad[cd + 46] = 0xC8  # its name's first byte: not UTF-8
    path.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"m\.ckpt: truncated or corrupt \("):
        load_state_dict(path)
    first = whole.find(b"PK\x01\x02")
    rng = random.Random(0)
    for i in range(first, len(whole)):
        bad = bytearray(whole)
        bad[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        try:
            load_state_dict(path)
        except CheckpointError:
            pass


def test_a_safetensors_file_whose_name_is_not_utf8_is_named_so(tmp_path):
    """safetensors cannot open such a name: the file itself is fine, so not "truncated or not a
    safetensors file"."""
    ok = tmp_path / "m.safetensors"
    save_state_dict({"a": torch.ones(2)}, ok)
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/m\xff.safetensors"))
    os.link(ok, odd)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(odd)
    assert str(e.value) == f"{odd}: safetensors cannot open a file name that is not UTF-8; rename it"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy pickle"])
def test_a_torch_checkpoint_with_a_safetensors_extension_is_named_so_on_load(tmp_path, legacy):
    """The mirror of a safetensors file under a torch extension: was "truncated or not a safetensors file
    (Error while deserializing header: header too large)"; a file that is neither is still called that."""
    path = tmp_path / "m.safetensors"
    torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    assert str(e.value) == f"{path}: looks like a torch checkpoint with a .safetensors extension; rename it to .ckpt"
    path.write_bytes(b"PK\x03")
    with pytest.raises(CheckpointError, match=r"m\.safetensors: truncated or not a safetensors file \("):
        load_state_dict(path)


def test_files_that_are_no_torch_checkpoint_are_named_so_on_load(tmp_path, monkeypatch):
    """load_state_dict checks the first bytes before torch.load would call them corrupt: a
    safetensors file under a torch extension (also cut after the header's first byte), anything
    else, and a file that cannot be read."""
    save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    st = (tmp_path / "m.safetensors").read_bytes()
    for name, data in (("m.ckpt", st), ("cut.pt", st[:9])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name}: looks like a safetensors file with a \.\w+ extension; "
                                                  r"rename it to \.safetensors$"):
            load_state_dict(tmp_path / name)
    (tmp_path / "clip.pth").write_bytes(b"\x00\x00\x00\x20ftypisom" + bytes(100))  # an MP4
    with pytest.raises(CheckpointError, match=r"clip\.pth: not a checkpoint file \(expected \.safetensors, or a "
                                              r"torch \.ckpt/\.pt/\.pth zip or pickle\)$"):
        load_state_dict(tmp_path / "clip.pth")

    def refused(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(checkpoint, "open", refused, raising=False)
    with pytest.raises(CheckpointError, match=r"m\.ckpt: cannot read file \(Permission denied\)$"):
        load_state_dict(tmp_path / "m.ckpt")
    (tmp_path / "m.safetensors").write_bytes(st)

    def as_safetensors_says(path, *a, **kw):  # for any file it cannot open: was "truncated or not a
        raise FileNotFoundError(f"No such file or directory: {path}")  # safetensors file (No such file ...)"
    monkeypatch.setattr(checkpoint, "safe_open", as_safetensors_says)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: cannot read file \(Permission denied\)$"):
        load_state_dict(tmp_path / "m.safetensors")


def test_state_dict_entry_wins_and_dropped_entries_are_logged(tmp_path, caplog):
    """A Lightning file's "state_dict" is the weights even when another entry holds tensors too
    (an optimiser's, say); what is dropped is named at INFO; an empty file and one with many
    keys name at most five of them."""
    torch.save({"state_dict": {"a": torch.ones(2), "note": "x"}, "optimizer": {"step": torch.tensor(3)},
                "global_step": 7}, tmp_path / "l.ckpt")
    with caplog.at_level("INFO", logger="cldm.checkpoint"):
        assert_same(load_state_dict(tmp_path / "l.ckpt"), {"a": torch.ones(2)})
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'l.ckpt'}: ignored 1 non-tensor entries (note)"]
    torch.save({}, tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match=r"holds no tensors where weights are expected \(top-level keys: "
                                              r"none\)$"):
        load_state_dict(tmp_path / "empty.ckpt")
    torch.save({f"k{i}": i for i in range(7)}, tmp_path / "many.ckpt")
    with pytest.raises(CheckpointError, match=r"\(top-level keys: k0, k1, k2, k3, k4\)$"):
        load_state_dict(tmp_path / "many.ckpt")


def test_map_location_reaches_torch_load_also_when_unpickling(tmp_path):
    import argparse
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "plain.ckpt")
    torch.save({"state_dict": {"a": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    assert load_state_dict(tmp_path / "plain.ckpt", map_location="meta")["a"].is_meta
    assert load_state_dict(tmp_path / "pickled.ckpt", allow_pickle=True, map_location="meta")["a"].is_meta


def test_read_metadata_of_legacy_and_pickled_files(tmp_path):
    """mmap cannot read the legacy format: the plain loader does; a file that needs unpickling is
    refused like load_state_dict refuses it, and read when trusted."""
    import argparse
    meta = {"state_dict": {"a": torch.ones(1)}, "metadata": {"step": 3}}
    torch.save(meta, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert read_metadata(tmp_path / "legacy.ckpt") == {"step": "3"}
    torch.save({**meta, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        read_metadata(tmp_path / "pickled.ckpt")
    assert read_metadata(tmp_path / "pickled.ckpt", allow_pickle=True) == {"step": "3"}


def refuses(arg):
    """Unpickled through Calls: raises, as a file's code that fails would."""
    raise ValueError(f"refused {arg}")


def test_unpickling_names_three_globals_warns_and_a_failure_is_one_line(tmp_path, caplog):
    path = tmp_path / "three.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "x": [Calls(f) for f in (os.mkdir, os.rmdir, refuses)]}, path)
    with pytest.raises(CheckpointError, match=rf"three\.ckpt: holds pickled Python objects \({os.mkdir.__module__}"
                                              rf"\.mkdir, {os.rmdir.__module__}\.rmdir, {__name__}\.refuses\), not"):
        load_state_dict(path)
    torch.save({"state_dict": {"a": torch.ones(2)}, "x": Calls(refuses)}, path)
    with caplog.at_level("WARNING", logger="cldm.checkpoint"), \
            pytest.raises(CheckpointError, match=r"three\.ckpt: could not be unpickled \(ValueError: refused x\)$"):
        load_state_dict(path, allow_pickle=True)
    assert [r.getMessage() for r in caplog.records] == [f"{path}: fully unpickling (allow_pickle=True): trusting "
                                                        "this file"]


def test_a_zip_checkpoint_missing_a_record_is_corrupt_not_pickled(tmp_path):
    """No unsafe globals in its pickle, yet torch.load fails: damaged, not 'holds pickled objects ()'."""
    import zipfile
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "whole.ckpt")
    with zipfile.ZipFile(tmp_path / "whole.ckpt") as z, zipfile.ZipFile(tmp_path / "m.ckpt", "w") as out:
        for name in z.namelist():
            if not name.endswith("/data/0"):
                out.writestr(name, z.read(name))
    with pytest.raises(CheckpointError, match=r"m\.ckpt: truncated or corrupt \(RuntimeError: PytorchStreamReader "
                                              r"failed locating file data/0: file not found\)$"):
        load_state_dict(tmp_path / "m.ckpt")


def test_pickle_protocol_warnings_are_not_passed_on(tmp_path, recwarn):
    """torch warns about pickle protocols it may not read; the refusal explains it instead."""
    import pickle
    with open(tmp_path / "p.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"a": torch.ones(2)}}, f, protocol=5)
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        load_state_dict(tmp_path / "p.ckpt")
    assert [str(w.message) for w in recwarn if "pickle protocol" in str(w.message)] == []


def test_globals_made_safe_are_not_named(tmp_path):
    """torch.serialization.safe_globals widens what weights_only loads: such a class is no reason
    to refuse, so a refusal names only the others."""
    import argparse
    import pickle
    path, marker = tmp_path / "p.ckpt", tmp_path / "pwned"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"a": torch.ones(2)}, "ns": argparse.Namespace(), "x": System(marker)}, f,
                    protocol=4)
    with torch.serialization.safe_globals([argparse.Namespace]), pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert f"({os.system.__module__}.system, torch.storage._load_from_bytes), not just" in str(err.value)
    assert not marker.exists()


def test_two_globals_of_one_module_are_both_named(tmp_path):
    """Protocol 4 pickles the module name once and fetches it from the memo (BINGET) for the
    second global: the scanner follows the memo."""
    import pickle
    path, marker = tmp_path / "p.ckpt", tmp_path / "pwned"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "x": System(marker), "y": Calls(os.mkdir)}, f, protocol=4)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    module = os.system.__module__
    assert f"holds pickled Python objects ({module}.system, {module}.mkdir), not just" in str(err.value)
    assert not marker.exists()


def test_a_damaged_pickle_is_corrupt_even_after_its_globals(tmp_path):
    """A pickle cut short is damaged, whatever globals its first half names."""
    import pickle
    path, marker = tmp_path / "p.ckpt", tmp_path / "pwned"
    data = pickle.dumps({"x": System(marker), "state_dict": {"a": torch.randn(1000)}}, protocol=4)
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"p\.ckpt: truncated or corrupt \("):
        load_state_dict(path)


def test_a_save_in_progress_never_has_a_checkpoint_extension(tmp_path, monkeypatch):
    """The temporary file ends in .tmp: a listing of *.safetensors or *.ckpt never counts it."""
    names, real = [], checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda t, f, metadata=None: names.append(Path(f).name)
                        or real(t, f, metadata=metadata))
    save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    [name] = names
    assert re.fullmatch(r"\.m\.safetensors\.[0-9a-f]{6}-\d+-[0-9a-f]{8}\.tmp", name), name
    save_state_dict({"a": torch.ones(2)}, tmp_path / "m.ckpt")  # no metadata given: no empty entry for it
    assert set(torch.load(tmp_path / "m.ckpt", weights_only=True)) == {"state_dict"}


def test_the_same_weights_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes the metadata in a hash map's order, which changed from run to run (two
    runs of one command gave files of other checksums); the header is rewritten sorted."""
    import json

    sd = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(2, dtype=torch.float16)}
    meta = {f"key{i}": f"value {i}\nwith \"quotes\" and é" for i in range(12)}
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_state_dict(sd, paths[0], metadata=meta)
    save_state_dict(sd, paths[1], metadata=dict(reversed(meta.items())))
    raw = [p.read_bytes() for p in paths]
    assert raw[0] == raw[1]
    n = int.from_bytes(raw[0][:8], "little")
    header = json.loads(raw[0][8:8 + n])
    assert list(header["__metadata__"]) == sorted(meta) and header["__metadata__"] == meta
    assert read_metadata(paths[0]) == meta
    loaded = load_state_dict(paths[0])
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in sd.items())
