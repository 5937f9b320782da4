"""Checkpoint I/O: safe loading, atomic saving, and refusing checkpoints of another model."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from cldm import checkpoint
from cldm.checkpoint import (CheckpointError, compare_state_dict, guess_kind, load_into,
                             load_state_dict, main, misfit, read_metadata, save_state_dict)
from tests.helpers import ctrl_c_while_importing, named_pipe

FIXTURES = Path(__file__).parent.parent / "fixtures"


def sample_sd():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {"w": base, "w_t": base.T, "tied": base, "half": torch.randn(5).half(),
            "steps": torch.tensor([1, 2, 3]), "scalar": torch.tensor(2.5)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Evil:
    """Unpickling this creates a directory: stands in for arbitrary code in a .ckpt."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class TinyLDM(nn.Module):
    """The SD naming pattern in miniature; `ctx` plays the cross-attention context width."""

    def __init__(self, ctx=16):
        super().__init__()
        self.model = nn.Module()
        attn2 = nn.ModuleDict({"to_k": nn.Linear(ctx, 8)})
        self.model.diffusion_model = nn.ModuleDict({"attn2": attn2, "out": nn.Linear(8, 4)})
        self.cond_stage_model = nn.Linear(3, ctx)
        self.control_model = nn.ModuleDict({"hint": nn.Linear(4, 8), "zero": nn.Linear(8, 8)})
        self.register_buffer("betas", torch.linspace(0, 1, 10))


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


def sd21_shapes():
    keys = json.loads((FIXTURES / "sd21_controlnet_keys.json").read_text())["keys"]
    return {k: tuple(s) for k, s in keys.items()}


def test_summary_groups_keys_by_prefix():
    model = sd21_shapes()
    sd = {k: s for k, s in model.items() if not k.startswith("control_model.")}
    sd["model_ema.decay"] = ()
    report = compare_state_dict(model, sd)
    assert len(report.matched) == 1241 and len(report.missing) == 340
    lines = report.summary().splitlines()
    assert lines == ["1241 of 1581 model tensors found in the checkpoint",
                     "missing 340:", "  control_model.* (340 tensors)",
                     "unexpected 1:", "  model_ema.decay"]
    assert misfit(report) is None  # plain SD2.1 weights into ControlLDM: a normal start


def test_sd15_like_checkpoint_is_clearly_not_this_model():
    model = sd21_shapes()
    sd15 = {k: (s[0], 768) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else s
            for k, s in model.items() if not k.startswith(("control_model.", "cond_stage_model."))}
    sd15.update({f"cond_stage_model.transformer.text_model.encoder.layers.{i}.w": (4,) for i in range(12)})
    report = compare_state_dict(model, sd15)
    assert len(report.mismatched) == 32
    assert misfit(report) == (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight is [320, 768] in the "
        "checkpoint but [320, 1024] in the model (and 31 more tensors of another shape); likely SD1.x weights, "
        "not Stable Diffusion 2.x: this model needs SD2.x weights such as v2-1_512-ema-pruned")
    summary = report.summary()
    assert "model.diffusion_model.* (32 tensors), e.g." in summary and "[320, 1024] vs [320, 768]" in summary
    assert len(summary.splitlines()) < 10
    assert guess_kind(sd15) == "SD1.x weights"
    v2 = {**model, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}  # our v2 model
    assert misfit(compare_state_dict(v2, sd15)).endswith(  # not "make it with tool_add_control_sd21.py"
        "likely SD1.x weights, not Stable Diffusion 2.x: this model needs SD2.x weights such as v2-1_512-ema-pruned")


def test_guess_kind_tells_sd21_controlnet_and_our_variants_apart():
    fixture = json.loads((FIXTURES / "sd21_controlnet_keys.json").read_text())
    model = sd21_shapes()
    assert guess_kind({k: s for k, s in model.items() if not k.startswith("control_model.")}) == "SD2.x weights"
    assert guess_kind(model) == "ControlNet (3-channel hint) on SD2.x"
    for variant, overrides in fixture["variant_overrides"].items():
        assert guess_kind({**model, **overrides}) == f"ours: colour ControlNet {variant} on SD2.x"
    control_only = {k: s for k, s in model.items() if k.startswith("control_model.")}
    assert guess_kind(control_only) == "ControlNet (3-channel hint) on SD2.x, ControlNet weights only"


def test_load_into_refuses_a_different_context_width_and_leaves_model_untouched():
    model, before = TinyLDM(ctx=16), TinyLDM(ctx=16).state_dict()
    model.load_state_dict(before)
    with pytest.raises(CheckpointError) as err:
        load_into(model, TinyLDM(ctx=12).state_dict())
    msg = str(err.value)
    assert msg == ("checkpoint (unknown SD variant (context dim 12) weights) does not fit TinyLDM: "
                   "model.diffusion_model.attn2.to_k.weight is [8, 12] in the checkpoint but [8, 16] in the "
                   "model (and 2 more tensors of another shape); likely another model config (the file looks "
                   "like: unknown SD variant (context dim 12) weights)")
    assert "  model.diffusion_model.attn2.to_k.weight: [8, 16] vs [8, 12]" in err.value.report.summary().splitlines()
    assert_same(model.state_dict(), before)


def test_load_into_refuses_a_reshaped_tensor_outside_the_locked_parts():
    """A new part (ControlNet) of another shape can't be loaded: an error, not a tensor left random."""
    model = TinyLDM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = TinyLDM().state_dict()
    sd["control_model.zero.weight"] = torch.ones(8, 6)
    with pytest.raises(CheckpointError) as err:
        load_into(model, sd)
    assert str(err.value) == ("checkpoint (unknown SD variant (context dim 16) weights) does not fit TinyLDM: "
                              "control_model.zero.weight is [8, 6] in the checkpoint but [8, 8] in the model; "
                              "likely another model config (the file looks like: unknown SD variant (context "
                              "dim 16) weights)")
    assert err.value.report.mismatched == {"control_model.zero.weight": ((8, 8), (8, 6))}
    assert_same(model.state_dict(), before)


def tiny_colour_model(*overrides):
    from cldm.model import TINY_CONFIG, create_model, load_config
    torch.manual_seed(0)
    return create_model(load_config(TINY_CONFIG, list(overrides)))


def test_checkpoint_of_another_colour_variant_names_the_key_shapes_and_cause(tmp_path):
    """v1 without concat_to_unet shares every shape with v2 without it except the ControlNet input conv."""
    path = tmp_path / "v1.safetensors"
    save_state_dict(tiny_colour_model("model.color_variant=v1", "model.concat_to_unet=false").state_dict(), path)
    model = tiny_colour_model("model.color_variant=v2", "model.concat_to_unet=false")
    conv_before = model.control_model.input_blocks[0][0].weight.clone()
    with pytest.raises(CheckpointError) as err:
        load_into(model, load_state_dict(path))
    assert str(err.value) == (
        "checkpoint (ours: colour ControlNet v1 on unknown SD variant (context dim 32)) does not fit ControlLDM: "
        "control_model.input_blocks.0.0.weight is [32, 4, 3, 3] in the checkpoint but [32, 9, 3, 3] in the "
        "model; likely another colour variant: the file's ControlNet takes 4 input channels (colour variant "
        "v1), this config's 9 (v2); set model.color_variant=v1")
    assert torch.equal(model.control_model.input_blocks[0][0].weight, conv_before)

    # Every loader that checks with misfit gets the same one line, e.g. the inference pipeline.
    from cldm.model import TINY_CONFIG
    from colorize.loading import load_model
    with pytest.raises(CheckpointError, match=r"does not fit the config: control_model\.input_blocks\.0\.0\.weight "
                                              r"is \[32, 4, 3, 3\] in the checkpoint but \[32, 9, 3, 3\].*"
                                              r"another colour variant") as err:
        load_model(path, config=TINY_CONFIG, overrides=["model.color_variant=v2", "model.concat_to_unet=false"])
    assert "\n" not in str(err.value)

    # The UNet's input conv differing too (default concat_to_unet=true) still leads with the ControlNet's.
    with pytest.raises(CheckpointError, match=r"control_model\.input_blocks\.0\.0\.weight .* \(and 1 more tensor "
                                              r"of another shape\); likely another colour variant"):
        load_into(tiny_colour_model("model.color_variant=v2"), load_state_dict(path))


def test_plain_sd_weights_point_to_the_init_tool():
    sd = {k: v for k, v in tiny_colour_model("model.color_variant=v1").state_dict().items()
          if not k.startswith("control_model.")}
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight is \[32, 4, 3, 3\] "
                                              r"in the checkpoint but \[32, 9, 3, 3\] in the model; likely plain Stable "
                                              r"Diffusion weights .* tool_add_control_sd21\.py"):
        load_into(tiny_colour_model("model.color_variant=v2"), sd)


def test_load_into_partial_load_casts_dtype_and_reports(caplog):
    src, model = TinyLDM(), TinyLDM()
    sd = {k: v.half() for k, v in src.state_dict().items() if not k.startswith("control_model.")}
    sd["model_ema.decay"] = torch.tensor(0.999)
    ctrl_before = model.control_model.hint.weight.clone()
    with caplog.at_level("WARNING", logger="cldm.checkpoint"):
        report = load_into(model, sd)
    # visible at the default log level, not only at INFO
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage() == ("partial load into TinyLDM:\n7 of 11 model tensors found in the "
                                              "checkpoint\nmissing 4:\n  control_model.* (4 tensors)\n"
                                              "ignored 1:\n  model_ema.decay")
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith("control_model."))
    assert report.ignored == ["model_ema.decay"] and not report.unexpected and not report.mismatched
    w = model.model.diffusion_model.attn2.to_k.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, src.model.diffusion_model.attn2.to_k.weight.half().float(), rtol=0, atol=0)
    assert torch.equal(model.control_model.hint.weight, ctrl_before)


def test_load_into_refuses_half_a_strict_part_or_mostly_missing():
    sd = TinyLDM().state_dict()
    del sd["model.diffusion_model.out.bias"]
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.\* does not match the model \(1 missing, "
                                              r"e\.g\. model\.diffusion_model\.out\.bias\)$"):
        load_into(TinyLDM(), sd)
    bare_unet = {k.removeprefix("model.diffusion_model."): v for k, v in TinyLDM().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"only 5 of 11 model tensors found"):
        load_into(TinyLDM(), {k: v for k, v in bare_unet.items() if not k.startswith("cond_stage")})
    # min_matched is "at least": exactly that share fits, one tensor fewer does not
    report = compare_state_dict(TinyLDM(), {k: v for k, v in bare_unet.items() if not k.startswith("cond_stage")})
    assert len(report.matched) == 5 and misfit(report, strict_prefixes=(), min_matched=5 / 11) is None
    assert misfit(report, strict_prefixes=(), min_matched=6 / 11) == \
        "only 5 of 11 model tensors found in the checkpoint"
    # everything strict: even the new ControlNet must be there
    sd = {k: v for k, v in TinyLDM().state_dict().items() if not k.startswith("control_model.zero")}
    with pytest.raises(CheckpointError, match=r"\(all\)\* does not match the model \(2 missing, e\.g\. "
                                              r"control_model\.zero\.weight\)$"):
        load_into(TinyLDM(), sd, strict_prefixes=("",))


def test_cli_inspect_and_convert(tmp_path, capsys):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": TinyLDM().state_dict(), "global_step": 3}, ckpt)
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(ckpt), str(out)]) == 0
    assert_same(load_state_dict(out), load_state_dict(ckpt))
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tensors: 11\nparameters: 358 (0.0 M)\ndtypes: float32 11\n" in text
    assert "looks like: unknown SD variant (context dim 16) weights" in text

    evil = tmp_path / "evil.ckpt"
    torch.save({"x": Evil(tmp_path / "pwned")}, evil)
    assert main(["convert", str(evil), str(tmp_path / "o.safetensors")]) == 2  # bad input: the project's 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m cldm.checkpoint: error: {evil}: holds pickled Python objects")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.safetensors").exists()


def test_convert_keeps_the_files_metadata(tmp_path):
    """The toy's recorded config and an export's color_variant, init, step... are what later
    checks refuse mismatches by: a format change must not drop them."""
    meta = {"config": "model: {}", "color_variant": "v2", "step": "7"}
    src = tmp_path / "in.safetensors"
    save_state_dict(TinyLDM().state_dict(), src, metadata=meta)
    as_ckpt, back = tmp_path / "mid.ckpt", tmp_path / "back.safetensors"
    assert main(["convert", str(src), str(as_ckpt)]) == 0 and main(["convert", str(as_ckpt), str(back)]) == 0
    assert read_metadata(as_ckpt) == {**meta, "converted_from": "in.safetensors"}
    assert read_metadata(back) == {**meta, "converted_from": "mid.ckpt"}
    assert_same(load_state_dict(back), load_state_dict(src))
    assert main(["convert", str(src), str(tmp_path / "nodir" / "x.safetensors")]) == 2


def test_convert_keeps_an_existing_output_unless_overwrite(tmp_path, capsys):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.ckpt"
    save_state_dict({"a": torch.ones(2)}, src)
    out.write_bytes(b"keep")
    assert main(["convert", str(src), str(out)]) == 2
    assert capsys.readouterr().err == f"python -m cldm.checkpoint: error: {out}: exists; pass --overwrite to replace it\n"
    assert out.read_bytes() == b"keep"
    assert main(["convert", str(src), str(out), "--overwrite"]) == 0 and load_state_dict(out)["a"].sum() == 2
    assert main(["convert", str(src), str(src), "--overwrite"]) == 2  # would read and replace one file
    assert "the same file as the input" in capsys.readouterr().err and load_state_dict(src)["a"].sum() == 2
    (tmp_path / "link.safetensors").symlink_to(src)  # another name of the input: refused too
    assert main(["convert", str(src), str(tmp_path / "link.safetensors"), "--overwrite"]) == 2
    assert "the same file as the input" in capsys.readouterr().err and load_state_dict(src)["a"].sum() == 2


def test_convert_unpickles_only_when_allowed_and_os_errors_are_one_line(tmp_path, capsys):
    import argparse
    src = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, src)
    assert main(["convert", str(src), str(tmp_path / "o.safetensors")]) == 2
    assert "holds pickled Python objects" in capsys.readouterr().err and not (tmp_path / "o.safetensors").exists()
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--allow-pickle"]) == 0
    assert_same(load_state_dict(tmp_path / "o.safetensors"), {"a": torch.ones(2)})
    long = tmp_path / ("x" * 300 + ".safetensors")  # the OS refuses the name (ENAMETOOLONG)
    assert main(["convert", str(src), str(long), "--allow-pickle"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m cldm.checkpoint: error: ") and "File name too long" in err
    assert err.count("\n") == 1


def test_cli_usage_errors_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: the following arguments are required: file (see --help)" in err
    assert main(["inspect", str(tmp_path / "nope.ckpt")]) == 2
    assert capsys.readouterr().err == f"python -m cldm.checkpoint: error: {tmp_path / 'nope.ckpt'}: no such file\n"

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "load_state_dict", interrupted)
    assert main(["inspect", str(tmp_path / "nope.ckpt")]) == 130
    assert capsys.readouterr().err == "python -m cldm.checkpoint: interrupted\n"


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
    from_bytes = f"torch.storage._load_from_bytes, {system}"
    expected = {"pickle-5": from_bytes, "pickle-4": from_bytes, "pickle-2": from_bytes,
                "torch-legacy": system, "torch-zip": system}[writer]
    assert str(err.value) == (
        f"{path}: holds pickled Python objects ({expected}), not just tensors, and unpickling could run code; "
        f"convert it with `python -m cldm.checkpoint convert {path} OUT.safetensors --allow-pickle` (or pass "
        f"--allow-pickle where the script offers it), only if you trust the file")
    # Trusted on request, whatever the flavour (torch.load can't read plain pickles: pickle.load does).
    assert_same(load_state_dict(path, allow_pickle=True), {"a": torch.ones(2)})
    assert marker.exists()


def test_cli_inspect_compares_with_a_config(tmp_path, capsys):
    path = tmp_path / "v1.safetensors"
    save_state_dict(tiny_colour_model("model.color_variant=v1").state_dict(), path)
    from cldm.model import TINY_CONFIG
    assert main(["inspect", str(path), "--config", str(TINY_CONFIG), "--set", "model.color_variant=v2"]) == 1
    out = capsys.readouterr().out
    assert (f"against {TINY_CONFIG}:\n715 of 717 model tensors found in the checkpoint\n"
            "shape mismatch 2 (model vs checkpoint):\n"
            "  control_model.input_blocks.0.0.weight: [32, 9, 3, 3] vs [32, 4, 3, 3]\n"
            "  model.diffusion_model.input_blocks.0.0.weight: [32, 9, 3, 3] vs [32, 4, 3, 3]\n"
            "would not load: control_model.input_blocks.0.0.weight is [32, 4, 3, 3]") in out
    assert main(["inspect", str(path), "--config", str(TINY_CONFIG), "--set", "model.color_variant=v1"]) == 0
    assert capsys.readouterr().out.endswith("717 of 717 model tensors found in the checkpoint\nwould load\n")
    # the config is checked before anything is printed; --set without it is no silent no-op
    assert main(["inspect", str(path), "--config", str(TINY_CONFIG), "--set", "model.unet.model_channels=abc"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "model.unet.model_channels: expected a positive integer" in err
    assert main(["inspect", str(path), "--set", "model.color_variant=v1"]) == 2
    assert capsys.readouterr().err == "python -m cldm.checkpoint: error: --set needs --config (the overrides apply to its model)\n"
    save_state_dict({"a": torch.ones(1)}, path, metadata={"config": "x", "step": "3"})
    assert main(["inspect", str(path)]) == 0 and "metadata: config, step\n" in capsys.readouterr().out


def test_schedule_comes_from_the_config_not_from_a_rounded_file():
    """An fp16/bf16 file holds a rounded schedule (bf16 makes alphas_cumprod[0] exactly 1): both
    loaders keep the config's float32 one; a file without it loads too; another schedule is refused."""
    from cldm.convert import init_from_sd
    from ldm.schedule import BUFFER_NAMES, schedule_buffers

    exact = schedule_buffers()
    sd = tiny_colour_model().state_dict()
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    assert bf16["alphas_cumprod"][0].item() == 1.0  # what rounding does to it
    for state in (bf16, {k: v for k, v in sd.items() if k not in BUFFER_NAMES}):
        model = tiny_colour_model()
        load_into(model, state)
        out, _ = init_from_sd(tiny_colour_model(), {k: v for k, v in state.items() if not k.startswith("control_")})
        for name in BUFFER_NAMES:
            assert torch.equal(model.state_dict()[name], exact[name]) and torch.equal(out[name], exact[name]), name
    other = {**sd, "betas": sd["betas"] * 1.5}
    with pytest.raises(CheckpointError, match=r"noise schedule \(betas\) is not the config's"):
        load_into(tiny_colour_model(), other)
    with pytest.raises(CheckpointError, match=r"noise schedule \(betas\) is not the config's"):
        init_from_sd(tiny_colour_model(), other)


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
    assert checkpoint.main(["convert", str(tmp_path / "none.ckpt"), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()


def inspect_run(capsys, *argv):
    """(exit status, stdout) of `inspect ARGV...`, which must say nothing on stderr."""
    rc = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    assert err == "", err
    return rc, out


def test_cli_inspect_tells_a_training_checkpoint_and_checks_it_as_a_resume(tmp_path, capsys):
    """OUT/checkpoints/*.ckpt holds only the trainable tensors, under the LightningModule's
    `model.` prefix: not a broken full model, but what a resume under the config loads."""
    from omegaconf import OmegaConf

    from cldm.callbacks import AtomicCheckpointIO
    from cldm.lightning import ColorControlModule
    from cldm.model import TINY_CONFIG, load_config
    from tests.train_helpers import saving, tiny_model
    cfg = load_config(TINY_CONFIG)
    module = saving(ColorControlModule(tiny_model("v2"), config=OmegaConf.to_container(cfg, resolve=True)))
    ckpt = {"state_dict": module.state_dict(), "global_step": 7, "epoch": 0, "pytorch-lightning_version": "2.x",
            "optimizer_states": [], "lr_schedulers": [], "loops": {}}
    module.on_save_checkpoint(ckpt)  # what the training's checkpoints hold
    path = tmp_path / "step=00000007.ckpt"
    AtomicCheckpointIO().save_checkpoint(ckpt, path)

    tiny = ("--config", TINY_CONFIG)
    rc, out = inspect_run(capsys, path)
    assert rc == 0 and ("top-level: model.* 171\nlooks like: Lightning training checkpoint of this project: 171 "
                        "trainable tensors, step 7, to resume or --export (ours: colour ControlNet v2 on unknown SD "
                        "variant (context dim 32))\nmetadata: none\n") in out
    rc, out = inspect_run(capsys, path, *tiny)
    assert rc == 0 and out.endswith(f"against {TINY_CONFIG}, the tensors that train under it:\n171 of 171 model "
                                    "tensors found in the checkpoint\nwould load to resume training (on the run's "
                                    "--init weights)\n")
    for override, reason in [
            ("model.color_variant=v3", "control_model.input_blocks.0.0.weight is [32, 9, 3, 3] in the checkpoint but "
                                       "[32, 12, 3, 3] in the model (and 1 more tensor of another shape); likely "
                                       "another colour variant"),
            ("model.sd_locked=false", "lacks 184 tensors that this config trains (e.g. model.diffusion_model."
                                      "output_blocks.0.0.in_layers.0.weight; model.sd_locked and "
                                      "model.train_unet_input say which train)"),
            ("model.train_unet_input=false", "holds 1 tensor that this config does not train (e.g. "
                                             "model.diffusion_model.input_blocks.0.0.weight; "),
            ("model.only_mid_control=true", "trained with another model config (hash ")]:  # same tensors
        rc, out = inspect_run(capsys, path, *tiny, "--set", override)
        assert rc == 1 and f"\nwould not load: {reason}" in out, (override, out)
    # a config without model.train_unet_input trains the UNet input conv, as the training does
    no_key = tmp_path / "no_train_unet_input.yaml"
    no_key.write_text(Path(TINY_CONFIG).read_text().replace("  train_unet_input: true\n", ""))
    assert "train_unet_input" not in no_key.read_text()
    module = saving(ColorControlModule(tiny_model("v2"), config=OmegaConf.to_container(load_config(no_key),
                                                                                    resolve=True)))
    ckpt = {**ckpt, "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    rc, out = inspect_run(capsys, path, "--config", no_key)
    assert rc == 0 and out.endswith("\nwould load to resume training (on the run's --init weights)\n"), out

    # a checkpoint that needs unpickling is still refused in one line, its code not run
    torch.save({**ckpt, "payload": Evil(tmp_path / "pwned")}, path)
    assert main(["inspect", str(path), *map(str, tiny)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: holds pickled Python objects ({os.mkdir.__module__}.mkdir" in err
    assert not (tmp_path / "pwned").exists()


def test_cli_inspect_tells_an_export_and_checks_it_as_control(tmp_path, capsys):
    """OUT/control.safetensors holds only trainable weights: checked as --control loads it on top
    of SD weights (load_sd_plus_control), by its tensors and by what its metadata says."""
    from cldm.model import TINY_CONFIG, load_config
    from cldm.trainable import configure_trainable, export_control, load_sd_plus_control
    from tests.train_helpers import tiny_model
    model = tiny_model("v2")
    configure_trainable(model)  # as training leaves it
    path = export_control(model, tmp_path / "control.safetensors", step=5, cfg=load_config(TINY_CONFIG),
                          extra={"init": "init.safetensors"})

    tiny = ("--config", TINY_CONFIG)
    rc, out = inspect_run(capsys, path)
    assert rc == 0 and ("\nlooks like: ControlNet export (trainable weights only, step 5, trained on --init "
                        "init.safetensors), for --control on top of SD weights (ours: colour ControlNet v2 on "
                        "unknown SD variant (context dim 32))\n") in out
    rc, out = inspect_run(capsys, path, *tiny)
    assert rc == 0 and f"against {TINY_CONFIG}, on top of SD weights that give the rest:\n171 of 717 model " \
        "tensors found in the checkpoint\nmissing 546:\n" in out and out.endswith("\nwould load as --control\n")
    rc, out = inspect_run(capsys, path, *tiny, "--set", "model.sd_locked=false")  # how it trained: no matter
    assert rc == 0 and out.endswith("\nwould load as --control\n")
    for override, reason in [("model.color_variant=v3", "made for colour variant v2, the model is v3 (set "
                                                        "model.color_variant=v2)"),
                             ("model.parameterization=v", "made for a model that predicts eps, this config's "
                                                          "predicts v (set model.parameterization=eps)")]:
        rc, out = inspect_run(capsys, path, *tiny, "--set", override)
        assert rc == 1 and out.endswith(f"\nwould not load: {reason}\n"), (override, out)

    # without metadata, by its tensors alone; the reasons are load_sd_plus_control's
    from cldm.model import create_model
    sd = load_state_dict(path)
    bare = tmp_path / "bare.safetensors"
    save_state_dict(sd, bare)
    rc, out = inspect_run(capsys, bare)
    assert rc == 0 and "\nlooks like: ControlNet export (trainable weights only), for --control" in out
    v3 = ("control_model.input_blocks.0.0.weight is [32, 9, 3, 3] in the checkpoint but [32, 12, 3, 3] in the model "
          "(and 1 more tensor of another shape); likely another colour variant")
    half = ("the checkpoint's control_model.* does not match the model (1 missing, e.g. "
            "control_model.middle_block_out.0.bias)")
    for override, drop, reason in [("model.color_variant=v3", None, v3),
                                   ("model.color_variant=v2", "control_model.middle_block_out.0.bias", half)]:
        save_state_dict({k: v for k, v in sd.items() if k != drop}, bare)
        rc, out = inspect_run(capsys, bare, *tiny, "--set", override)
        assert rc == 1 and f"\nwould not load: {reason}" in out, (override, out)
        with pytest.raises(CheckpointError, match=f"does not fit the model: {re.escape(reason)}"):
            load_sd_plus_control(create_model(load_config(TINY_CONFIG, [override])), tmp_path / "unused", bare)


def test_cli_inspect_compares_the_config_a_file_records_as_the_tools_do(capsys, tmp_path):
    """The toy records its config (scale factor 0.57326), an export its run's: the tiny YAML fits
    their shapes but not that, which inference and training refuse: inspect must not say "would load"."""
    from cldm.model import REPO, TINY_CONFIG, create_model, load_config
    from cldm.trainable import configure_trainable, export_control
    toy = REPO / "models" / "toy" / "toy_color_v2.safetensors"
    rc, out = inspect_run(capsys, toy, "--config", TINY_CONFIG)
    assert rc == 1
    assert out.splitlines()[-1] == (f"would not load: it was saved with another model config: model.scale_factor is "
                                    f"0.57326 there, 0.18215 in {TINY_CONFIG} (1 key(s) differ)")
    rc, out = inspect_run(capsys, toy, "--config", TINY_CONFIG, "--set", "model.scale_factor=0.57326")
    assert rc == 0 and out.splitlines()[-1] == "would load"
    rc, out = inspect_run(capsys, toy, "--config", TINY_CONFIG, "--set", "model.scale_factor=0.5")
    assert rc == 1 and out.splitlines()[-1] == (f"would not load: it was saved with another model config: "
                                                f"model.scale_factor is 0.57326 there, 0.5 in {TINY_CONFIG} with the "
                                                f"overrides (1 key(s) differ)")
    made = load_config(TINY_CONFIG, ["model.scale_factor=0.5"])
    model = create_model(made)
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors", cfg=made)
    rc, out = inspect_run(capsys, export, "--config", TINY_CONFIG)
    assert rc == 1 and out.splitlines()[-1] == (
        f"would not load: it was saved with another model config: model.scale_factor is 0.5 there, 0.18215 in "
        f"{TINY_CONFIG} (1 key(s) differ)")
    rc, out = inspect_run(capsys, export, "--config", TINY_CONFIG, "--set", "model.scale_factor=0.5")
    assert rc == 0 and out.splitlines()[-1] == "would load as --control"


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


def test_first_line_of_an_error_is_its_first_sentence():
    assert checkpoint._first_line(RuntimeError("PytorchStreamReader failed. See the docs\nmore")) == \
        "RuntimeError: PytorchStreamReader failed"
    assert checkpoint._first_line(EOFError()) == "EOFError"
    assert checkpoint._first_line(RuntimeError("\n  zip broken. more")) == "RuntimeError: zip broken"
    assert checkpoint._first_line(ValueError("x" * 300)) == "ValueError: " + "x" * 160


def test_unexpected_tensors_make_a_partial_load_and_keys_group_by_prefix():
    model = {"u.a": (2,), "u.b": (2,), "u.c": (2,)}
    report = compare_state_dict(model, {**model, "ema.x": (1,), "ema.y": (1,), "ema.z": (1,), "step": ()})
    assert not report.ok and misfit(report) is None
    assert report.summary() == ("3 of 3 model tensors found in the checkpoint\nunexpected 4:\n  ema.* (3 tensors)\n"
                                "  step")
    # groups of up to two names are loose names, on one line with the others
    assert checkpoint.group_keys(["c.x.1", "c.x.2", "c.y", "a.b.1", "a.b.2", "z"]) == [
        ("c.* (3 tensors)", "c.x.1"), ("a.b.1, a.b.2, z", "a.b.1")]
    assert checkpoint.group_keys([f"k{i}" for i in range(8)], max_names=6) == [("k0, k1, k2, k3, k4, k5, ... (+2 more)",
                                                                               "k0")]


def test_a_unet_input_conv_of_another_concat_setting_is_not_called_plain_sd():
    """Our own file (not plain SD) whose UNet takes 4 channels: saved with concat_to_unet=false."""
    sd = tiny_colour_model("model.color_variant=v2", "model.concat_to_unet=false").state_dict()
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight is \[32, 4, 3, 3\] "
                                              r"in the checkpoint but \[32, 9, 3, 3\] in the model; likely another "
                                              r"colour variant or concat_to_unet setting: the file's UNet takes 4 "
                                              r"input channels, this config's 9 \(model\.color_variant, "
                                              r"model\.concat_to_unet\)$"):
        load_into(tiny_colour_model("model.color_variant=v2"), sd)


def test_guess_kind_of_unusual_files():
    unet = "model.diffusion_model.x."
    assert guess_kind({unet + "attn2.to_k.weight": (4, 1024)}) == "SD2.x weights, no text encoder"
    assert guess_kind({unet + "attn2.to_k.weight": (4,)}) == "unknown SD variant weights, no text encoder"
    assert guess_kind({"control_model.input_hint_block.0.weight": (16, 6, 3, 3)}) == \
        "ControlNet (6-channel hint) on unknown SD variant, ControlNet weights only"
    # a 4-channel hint without the ControlNet's input conv: no variant to read (not v1's 4 channels)
    assert guess_kind({"control_model.input_hint_block.0.weight": (16, 4, 3, 3)}) == \
        "ours: colour ControlNet ? on unknown SD variant, ControlNet weights only"
    assert guess_kind({unet + "attn2.to_k.weight": (4, 2048)}) == "SDXL weights, no text encoder"


def test_loose_names_are_listed_up_to_max_names_six_by_default():
    keys = [f"k{i}" for i in range(7)]
    assert checkpoint.group_keys(keys[:6]) == [("k0, k1, k2, k3, k4, k5", "k0")]
    assert checkpoint.group_keys(keys) == [("k0, k1, k2, k3, k4, k5, ... (+1 more)", "k0")]
    assert checkpoint.group_keys(keys[:2], max_names=2) == [("k0, k1", "k0")]
    report = compare_state_dict({}, {k: (1,) for k in keys})
    assert report.summary().splitlines()[1:] == ["unexpected 7:", "  k0, k1, k2, k3, k4, k5, ... (+1 more)"]
    assert report.summary(max_names=2).splitlines()[-1] == "  k0, k1, ... (+5 more)"


def test_check_checkpoint_file_leaves_real_checkpoints_alone(tmp_path):
    for name in ("m.safetensors", "m.ckpt"):
        save_state_dict({"a": torch.ones(2)}, tmp_path / name)
        assert checkpoint.check_checkpoint_file(tmp_path / name) is None


def test_convert_into_a_missing_folder_names_the_folder(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    save_state_dict({"a": torch.ones(2)}, src)
    out = tmp_path / "nodir" / "x.safetensors"
    assert main(["convert", str(src), str(out)]) == 2
    assert capsys.readouterr().err == (f"python -m cldm.checkpoint: error: {out}: no folder {out.parent} to write "
                                       "it in\n")


def test_convert_refuses_an_output_it_cannot_write_before_reading_the_input(tmp_path, capsys, monkeypatch):
    """A folder at OUTPUT (even with --overwrite), a file in the way of its folder, or an extension
    it cannot write: one line naming OUTPUT, before a large input is read; the rename's error named
    the temporary file, and the extension was checked only once the input was loaded."""
    src = tmp_path / "in.safetensors"
    save_state_dict({"a": torch.ones(2)}, src)
    (tmp_path / "dir.safetensors").mkdir()
    monkeypatch.setattr(checkpoint, "load_state_dict", lambda *a, **kw: pytest.fail("read the input"))
    for out, said in [(tmp_path / "dir.safetensors", f"{tmp_path / 'dir.safetensors'} is a folder"),
                      (src / "x.ckpt", f"{src / 'x.ckpt'}: {src} is a file, not a folder"),
                      (tmp_path / "out.bin", f"{tmp_path / 'out.bin'}: unknown checkpoint extension "
                                             "(use .safetensors or .ckpt/.pt/.pth)")]:
        assert main(["convert", str(src), str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err == f"python -m cldm.checkpoint: error: {said}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "in.safetensors"]


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


@pytest.mark.parametrize("argv, flag", [(["inspect", ""], "file"), (["inspect", "F", "--config", ""], "--config"),
                                        (["convert", "", "o.ckpt"], "input"), (["convert", "F", ""], "output")])
def test_cli_refuses_an_empty_path_naming_it(tmp_path, capsys, argv, flag):
    """An empty path ("$CKPT" unset) was the current folder ("convert IN ''": ": exists"), and an
    empty --config was no config at all: inspect said nothing of it."""
    src = tmp_path / "in.safetensors"
    save_state_dict({"a": torch.ones(2)}, src)
    with pytest.raises(SystemExit) as e:
        main([str(src) if a == "F" else a for a in argv])
    assert e.value.code == 2
    said = f"python -m cldm.checkpoint {argv[0]}: error: argument {flag}: empty path (see --help)\n"
    assert capsys.readouterr().err == said


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
    assert f"(torch.storage._load_from_bytes, {os.system.__module__}.system), not just" in str(err.value)
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


def test_a_strict_part_is_checked_key_for_key_whatever_comes_before_it():
    """A strict part counts as present by any of its names, matched or unexpected; a strict part
    the file lacks does not end the check of the next; the example is the first name found."""
    sd = TinyLDM().state_dict()  # no first_stage_model.*: the check goes on to cond_stage_model.*
    del sd["cond_stage_model.bias"]
    assert misfit(compare_state_dict(TinyLDM(), sd)) == ("the checkpoint's cond_stage_model.* does not match the "
                                                         "model (1 missing, e.g. cond_stage_model.bias)")
    renamed = {k: v for k, v in TinyLDM().state_dict().items() if not k.startswith("cond_stage_model.")}
    renamed["cond_stage_model.proj.weight"] = torch.ones(1)
    assert misfit(compare_state_dict(TinyLDM(), renamed)) == (
        "the checkpoint's cond_stage_model.* does not match the model (2 missing, 1 unexpected, e.g. "
        "cond_stage_model.weight)")
    extra = {**TinyLDM().state_dict(), "cond_stage_model.x": torch.ones(1), "cond_stage_model.y": torch.ones(1)}
    assert misfit(compare_state_dict(TinyLDM(), extra)) == (
        "the checkpoint's cond_stage_model.* does not match the model (2 unexpected, e.g. cond_stage_model.x)")


def test_a_differing_input_conv_is_named_before_any_other_tensor():
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    model = {"control_model.a.weight": (2,), conv: (32, 9, 3, 3)}
    report = compare_state_dict(model, {"control_model.a.weight": (3,), conv: (32, 4, 3, 3)})
    assert not report.ok
    assert misfit(report).startswith(f"{conv} is [32, 4, 3, 3] in the checkpoint but [32, 9, 3, 3] in the model "
                                     "(and 1 more tensor of another shape); likely plain Stable Diffusion weights")


def test_likely_causes_of_other_files():
    """SDXL is named like SD1.x; a file's ControlNet of an unknown channel count gets no
    `set model.color_variant=` hint; another ControlNet's (4-channel) UNet is no plain SD."""
    key = "model.diffusion_model.input_blocks.1.1.attn2.to_k.weight"
    assert misfit(compare_state_dict({key: (320, 1024)}, {key: (320, 2048)})).endswith(
        "likely SDXL weights, no text encoder, not Stable Diffusion 2.x: this model needs SD2.x weights such as "
        "v2-1_512-ema-pruned")
    conv = "control_model.input_blocks.0.0.weight"
    assert misfit(compare_state_dict({conv: (32, 9, 3, 3)}, {conv: (32, 7, 3, 3)})).endswith(
        "likely another colour variant: the file's ControlNet takes 7 input channels (colour variant unknown), this "
        "config's 9 (v2)")
    model = sd21_shapes()
    unet_conv = "model.diffusion_model.input_blocks.0.0.weight"
    assert misfit(compare_state_dict({**model, unet_conv: (320, 9, 3, 3)}, model)).endswith(
        "likely another colour variant or concat_to_unet setting: the file's UNet takes 4 input channels, this "
        "config's 9 (model.color_variant, model.concat_to_unet)")


def test_a_save_in_progress_never_has_a_checkpoint_extension(tmp_path, monkeypatch):
    """The temporary file ends in .tmp: a listing of *.safetensors or *.ckpt never counts it."""
    names, real = [], checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda t, f, metadata=None: names.append(Path(f).name)
                        or real(t, f, metadata=metadata))
    save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    [name] = names
    assert re.fullmatch(r"\.m\.safetensors\.[0-9a-f]{8}\.tmp", name), name
    save_state_dict({"a": torch.ones(2)}, tmp_path / "m.ckpt")  # no metadata given: no empty entry for it
    assert set(torch.load(tmp_path / "m.ckpt", weights_only=True)) == {"state_dict"}


def test_cli_inspect_names_eight_top_level_parts_and_dtypes_by_count(tmp_path, capsys):
    sd = {f"t{i}.{j}": torch.zeros(1) for i in range(9) for j in range(9 - i)}  # t0: 9 tensors ... t8: 1
    sd["t8.0"] = sd["t8.0"].half()
    save_state_dict(sd, tmp_path / "m.safetensors")
    rc, out = inspect_run(capsys, tmp_path / "m.safetensors")
    assert rc == 0 and ("tensors: 45\nparameters: 45 (0.0 M)\ndtypes: float32 44, float16 1\n"
                        "top-level: t0.* 9, t1.* 8, t2.* 7, t3.* 6, t4.* 5, t5.* 4, t6.* 3, t7.* 2\n") in out
    save_state_dict({"a.x": torch.zeros(1), "b": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert "\ntop-level: a, b\n" in inspect_run(capsys, tmp_path / "m.safetensors")[1]


def test_cli_inspect_says_a_file_without_the_controlnet_would_load_partially(tmp_path, capsys):
    from cldm.model import TINY_CONFIG
    sd = {k: v for k, v in tiny_colour_model().state_dict().items() if not k.startswith("control_model.")}
    save_state_dict(sd, tmp_path / "sd.safetensors")
    rc, out = inspect_run(capsys, tmp_path / "sd.safetensors", "--config", TINY_CONFIG)
    assert rc == 0 and out.endswith("\nwould load (partially)\n") and "\nmissing " in out


def test_ctrl_c_while_the_libraries_load_is_one_line():
    """Seconds of imports (torch among them) before run_cli takes over: Ctrl-C there was a
    KeyboardInterrupt traceback out of the import."""
    done = ctrl_c_while_importing("torch", ["-m", "cldm.checkpoint", "inspect", "x.safetensors"])
    assert (done.returncode, done.stderr) == (130, "python -m cldm.checkpoint: interrupted\n")



def test_ctrl_c_while_torch_loads_names_the_module_as_it_is_run():
    """`python -m cldm.checkpoint`, as run_cli names it later, not the file's name (kills
    quiet_startup_signals ignoring its `prog`)."""
    done = ctrl_c_while_importing("torch", ["-m", "cldm.checkpoint", "inspect", "x.safetensors"])
    assert (done.returncode, done.stderr) == (130, "python -m cldm.checkpoint: interrupted\n")
