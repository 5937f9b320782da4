"""Checkpoint I/O: safe loading, atomic saving, and refusing checkpoints of another model."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from cldm import checkpoint
from cldm.checkpoint import (CheckpointError, compare_state_dict, guess_kind, load_into,
                             load_state_dict, main, misfit, save_state_dict)

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
    assert misfit(report) == "the checkpoint's model.diffusion_model.* does not match the model (32 reshaped)"
    summary = report.summary()
    assert "model.diffusion_model.* (32 tensors), e.g." in summary and "[320, 1024] vs [320, 768]" in summary
    assert len(summary.splitlines()) < 10
    assert guess_kind(sd15) == "SD1.x weights"


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
    assert msg.splitlines()[0] == ("checkpoint (unknown SD variant (context dim 12) weights) does not fit "
                                   "TinyLDM: the checkpoint's model.diffusion_model.* does not match the "
                                   "model (1 reshaped)")
    assert "  model.diffusion_model.attn2.to_k.weight: [8, 16] vs [8, 12]" in msg.splitlines()
    assert_same(model.state_dict(), before)


def test_load_into_partial_load_casts_dtype_and_reports():
    src, model = TinyLDM(), TinyLDM()
    sd = {k: v.half() for k, v in src.state_dict().items() if not k.startswith("control_model.")}
    sd["model_ema.decay"] = torch.tensor(0.999)
    ctrl_before = model.control_model.hint.weight.clone()
    report = load_into(model, sd)
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith("control_model."))
    assert report.ignored == ["model_ema.decay"] and not report.unexpected and not report.mismatched
    w = model.model.diffusion_model.attn2.to_k.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, src.model.diffusion_model.attn2.to_k.weight.half().float(), rtol=0, atol=0)
    assert torch.equal(model.control_model.hint.weight, ctrl_before)


def test_load_into_refuses_half_a_strict_part_or_mostly_missing():
    sd = TinyLDM().state_dict()
    del sd["model.diffusion_model.out.bias"]
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.\* does not match the model \(1 missing\)"):
        load_into(TinyLDM(), sd)
    bare_unet = {k.removeprefix("model.diffusion_model."): v for k, v in TinyLDM().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"only 5 of 11 model tensors found"):
        load_into(TinyLDM(), {k: v for k, v in bare_unet.items() if not k.startswith("cond_stage")})
    # everything strict: even the new ControlNet must be there
    sd = {k: v for k, v in TinyLDM().state_dict().items() if not k.startswith("control_model.zero")}
    with pytest.raises(CheckpointError, match=r"\(all\)\* does not match the model \(2 missing\)"):
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
    assert main(["convert", str(evil), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.safetensors").exists()
