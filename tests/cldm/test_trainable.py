"""Training policy: what trains, the locked SD channels of the UNet input conv, export and reload."""
import pytest
import torch
from omegaconf import OmegaConf

from cldm.checkpoint import CheckpointError, load_state_dict, save_state_dict
from cldm.config import DEFAULT_CONFIG, TINY_CONFIG, load_config
from cldm.model import create_model
from cldm.trainable import (UNET_INPUT_CONV, check_optimizer, configure_trainable, export_control,
                            export_keys, load_sd_plus_control, locked_digest, param_groups, read_export_metadata,
                            tensor_checksum, trainable_state_dict)
from tests.train_helpers import tiny_batch, tiny_model, tiny_sd_state


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_policy_trains_controlnet_and_unet_input_only():
    model = tiny_model("v2")
    params = configure_trainable(model)
    names = trainable_names(model)
    control = {n for n, _ in model.named_parameters() if n.startswith("control_model.")}
    assert names == control | {UNET_INPUT_CONV}
    assert len(params) == len(names)
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())


def test_sd_unlocked_also_trains_the_unet_decoder_as_in_controlnet():
    model = tiny_model("v2")
    configure_trainable(model, sd_locked=False)
    extra = trainable_names(model) - {n for n in trainable_names(model) if n.startswith("control_model.")}
    unet = "model.diffusion_model."
    assert extra - {UNET_INPUT_CONV} == {n for n, _ in model.named_parameters()
                                    if n.startswith((unet + "output_blocks.", unet + "out."))}


def test_v1_and_flags_leave_the_unet_input_locked():
    assert UNET_INPUT_CONV not in trainable_names(_configured(tiny_model("v1")))
    assert UNET_INPUT_CONV not in trainable_names(_configured(tiny_model("v2"), train_unet_input=False))
    model = tiny_model("v2", overrides=["model.concat_to_unet=false"])
    assert UNET_INPUT_CONV not in trainable_names(_configured(model))


def test_only_mid_control_freezes_the_unused_zero_convs():
    names = trainable_names(_configured(tiny_model("v2"), only_mid_control=True))
    assert not any(n.startswith("control_model.zero_convs.") for n in names)
    assert "control_model.middle_block_out.0.weight" in names


def _configured(model, **kw):
    configure_trainable(model, **kw)
    return model


def test_locked_sd_channels_get_zero_gradient_and_stay_bitwise_under_adamw():
    model = tiny_model("v2")
    configure_trainable(model)
    configure_trainable(model)  # idempotent: one hook, not two
    w = model.model.diffusion_model.input_blocks[0][0].weight
    before = w.detach().clone()
    # weight decay 0.01 on the rest must not reach the partly locked conv
    groups = param_groups(model, weight_decay=0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and groups[1]["params"] == [w]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    b = tiny_batch(2)
    hint = b["hint"].permute(0, 3, 1, 2)
    z0 = torch.randn(2, 4, 8, 8)
    model.train()
    for step in range(3):
        cond = model.prepare_condition(hint, context=torch.randn(2, 77, 32))
        loss = model.training_loss(z0, cond)
        opt.zero_grad()
        loss.backward()
        assert torch.count_nonzero(w.grad[:, :4]) == 0
        assert torch.count_nonzero(w.grad[:, 4:]) > 0
        opt.step()
    assert torch.equal(w[:, :4], before[:, :4])          # SD kernel bitwise unchanged
    assert (w[:, 4:] - before[:, 4:]).abs().max() > 1e-4  # new channels trained


def test_weight_decay_alone_would_move_the_locked_channels():
    """Why the input conv's group has decay 0: AdamW decays weights even with zero gradient."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.01)
    w.grad = torch.zeros(3)
    opt.step()
    assert not torch.equal(w.detach(), torch.ones(3))


def test_export_reloads_on_top_of_sd(tmp_path):
    sd = tiny_sd_state(seed=3)
    model = tiny_model("v2", sd=sd)
    configure_trainable(model)
    exported = set(export_keys(model))
    with torch.no_grad():  # stand-in for training: perturb everything the export holds
        for n, p in model.named_parameters():
            if n in exported:
                p.add_(torch.randn_like(p) * 0.01)
        model.model.diffusion_model.input_blocks[0][0].weight[:, :4] = \
            sd[UNET_INPUT_CONV]  # training never moves the SD channels
    save_state_dict(sd, tmp_path / "sd.safetensors")
    path = export_control(model, tmp_path / "control.safetensors", step=7,
                          cfg=load_config(TINY_CONFIG))
    meta = read_export_metadata(path)
    assert meta["color_variant"] == "v2" and meta["step"] == "7" and len(meta["config_hash"]) == 16
    assert OmegaConf.create(meta["config"]) == load_config(TINY_CONFIG)  # the export alone names its model

    fresh = create_model(load_config(TINY_CONFIG))
    load_sd_plus_control(fresh, tmp_path / "sd.safetensors", path)
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def load_into_tiny_v2(tmp_path, control_name):
    """load_sd_plus_control into a fresh tiny v2 model, from tmp_path's sd.safetensors and `control_name`."""
    return load_sd_plus_control(create_model(load_config(TINY_CONFIG)), tmp_path / "sd.safetensors",
                                tmp_path / control_name)


def test_export_refuses_another_variant_and_an_incomplete_controlnet(tmp_path):
    sd = tiny_sd_state()
    save_state_dict(sd, tmp_path / "sd.safetensors")
    model = tiny_model("v2", sd=sd)
    configure_trainable(model)
    export_control(model, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="variant v2.*model is v3"):
        load_sd_plus_control(create_model(load_config(TINY_CONFIG, ["model.color_variant=v3"])),
                             tmp_path / "sd.safetensors", tmp_path / "c.safetensors")
    save_state_dict({"foo.weight": torch.zeros(3)}, tmp_path / "notsd.safetensors")
    with pytest.raises(CheckpointError, match=r"notsd\.safetensors: checkpoint \(.*\) does not match the model config"):
        load_sd_plus_control(create_model(load_config(TINY_CONFIG)), tmp_path / "notsd.safetensors",
                             tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="only_mid_control=false, the model has true"):
        load_sd_plus_control(create_model(load_config(TINY_CONFIG, ["model.only_mid_control=true"])),
                             tmp_path / "sd.safetensors", tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match=r"c\.safetensors: made for a model that predicts eps, this "
                                              r"config's predicts v \(set model\.parameterization=eps\)"):
        load_sd_plus_control(create_model(load_config(TINY_CONFIG, ["model.parameterization=v"])),
                             tmp_path / "sd.safetensors", tmp_path / "c.safetensors")
    part = {k: v for k, v in trainable_state_dict(model).items() if "hint_block" not in k}
    save_state_dict(part, tmp_path / "part.safetensors")
    with pytest.raises(CheckpointError, match=r"part\.safetensors: does not fit the model: the checkpoint's "
                                              r"control_model\.\* does not match the model \(\d+ missing, e\.g\. "
                                              r"control_model\.input_hint_block\.0\.weight\)$"):
        load_into_tiny_v2(tmp_path, "part.safetensors")
    none = {k: v for k, v in trainable_state_dict(model).items() if not k.startswith("control_model.")}
    save_state_dict(none, tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match=r"none\.safetensors: does not fit the model: no control_model\.\* "
                                              r"tensors \(the file holds: unknown SD variant weights, no text "
                                              r"encoder\); --control takes the "
                                              r"control\.safetensors export of tutorial_train_sd21_color_v2\.py$"):
        load_into_tiny_v2(tmp_path, "none.safetensors")


def test_a_full_checkpoint_as_control_is_refused_not_loaded_over_the_sd_weights(tmp_path):
    """--ckpt toy.safetensors --control init.safetensors coloured with the init's every weight,
    VAE and text encoder included, and never used --ckpt: every tensor fits the model. A file with
    anything but ControlNet and UNet tensors is named as a whole model now."""
    save_state_dict(tiny_sd_state(), tmp_path / "sd.safetensors")
    full = tiny_model("v2").state_dict()
    save_state_dict(full, tmp_path / "full.safetensors")
    other = next(k for k in load_state_dict(tmp_path / "full.safetensors")  # the first the file holds
                 if not k.startswith(("control_model.", "model.diffusion_model.")))
    with pytest.raises(CheckpointError) as e:
        load_into_tiny_v2(tmp_path, "full.safetensors")
    assert str(e.value) == (f"{tmp_path / 'full.safetensors'}: does not fit the model: it holds the whole model "
                            f"({other} too), not the trained weights alone that go on top of SD weights: give it as "
                            "the checkpoint itself (--ckpt), without --control")


def test_an_export_converted_to_ckpt_is_checked_by_its_metadata_too(tmp_path):
    """`python -m cldm.checkpoint convert` keeps the metadata; --control must read it from a .ckpt
    as from a .safetensors (it read none, so a parameterisation mismatch, which no shape shows,
    loaded and coloured wrongly)."""
    sd = tiny_sd_state()
    save_state_dict(sd, tmp_path / "sd.safetensors")
    model = tiny_model("v2", sd=sd)
    configure_trainable(model)
    export_control(model, tmp_path / "c.safetensors")
    meta = read_export_metadata(tmp_path / "c.safetensors")
    save_state_dict(load_state_dict(tmp_path / "c.safetensors"), tmp_path / "c.ckpt", metadata=meta)
    assert read_export_metadata(tmp_path / "c.ckpt") == meta
    with pytest.raises(CheckpointError, match=r"c\.ckpt: made for a model that predicts eps, this "
                                              r"config's predicts v \(set model\.parameterization=eps\)"):
        load_sd_plus_control(create_model(load_config(TINY_CONFIG, ["model.parameterization=v"])),
                             tmp_path / "sd.safetensors", tmp_path / "c.ckpt")
    loaded = load_sd_plus_control(create_model(load_config(TINY_CONFIG)), tmp_path / "sd.safetensors",
                                  tmp_path / "c.ckpt")
    assert loaded.meta == meta and loaded.names == list(load_state_dict(tmp_path / "c.ckpt"))
    with pytest.raises(CheckpointError, match=r"missing\.ckpt: no such file"):
        load_sd_plus_control(create_model(load_config(TINY_CONFIG)), tmp_path / "sd.safetensors",
                             tmp_path / "missing.ckpt")


def test_export_without_metadata_gets_the_colour_variant_diagnosis_and_extra_keys_are_refused(tmp_path):
    """A bare state dict (no metadata to compare variants by) of another variant is named as such,
    by cldm.checkpoint_fit.misfit, the rule every loader shares; keys the model lacks are refused."""
    sd = tiny_sd_state()
    save_state_dict(sd, tmp_path / "sd.safetensors")
    v1 = tiny_model("v1", sd=sd)
    configure_trainable(v1)
    save_state_dict(trainable_state_dict(v1), tmp_path / "v1.safetensors")  # no metadata
    with pytest.raises(CheckpointError) as err:
        load_into_tiny_v2(tmp_path, "v1.safetensors")
    assert str(err.value) == (
        f"{tmp_path / 'v1.safetensors'}: does not fit the model: control_model.input_blocks.0.0.weight is "
        "[32, 4, 3, 3] in the checkpoint but [32, 9, 3, 3] in the model; likely another colour variant: the "
        "file's ControlNet takes 4 input channels (colour variant v1), this config's 9 (v2); set "
        "model.color_variant=v1")
    assert err.value.report.mismatched  # the full comparison comes along

    v2 = tiny_model("v2", sd=sd)
    configure_trainable(v2)
    extra = {**trainable_state_dict(v2), "model_ema.decay": torch.tensor(0.999)}
    save_state_dict(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra\.safetensors: does not fit the model: 1 tensors the model "
                                              r"does not have \(e\.g\. model_ema\.decay\)$"):
        load_into_tiny_v2(tmp_path, "extra.safetensors")


def test_optimizer_names_and_bitsandbytes_are_checked_in_one_place(monkeypatch):
    check_optimizer("adamw")
    with pytest.raises(ValueError, match=r"^optimizer must be one of adamw, adamw8bit, got 'adam'$"):
        check_optimizer("adam")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"adamw8bit needs bitsandbytes \(pip install bitsandbytes\)"):
        check_optimizer("adamw8bit")
    from cldm.lightning import ColorControlModule
    with pytest.raises(ValueError, match="adamw8bit needs bitsandbytes"):
        ColorControlModule(tiny_model("v2"), optimizer="adamw8bit")


def test_real_config_export_is_about_a_quarter_of_the_model():
    with torch.device("meta"):
        model = create_model(load_config(DEFAULT_CONFIG))
    configure_trainable(model)
    sd = model.state_dict()
    n_export = sum(sd[k].numel() for k in export_keys(model))
    n_all = sum(v.numel() for v in sd.values())
    assert 0.2 < n_export / n_all < 0.3, n_export / n_all  # ~364M of ~1.3G


def test_tensor_checksum_is_exact_and_position_sensitive():
    """sum_i bits_i * (i + 1) mod 2^31 - 1, worked by hand; any changed or moved element changes it."""
    assert tensor_checksum(torch.tensor([1, 2, 3], dtype=torch.int32)) == 1 * 1 + 2 * 2 + 3 * 3
    assert tensor_checksum(torch.tensor([1.0])) == 0x3F800000  # float32 bits of 1.0, below the modulus
    assert tensor_checksum(torch.tensor([-1], dtype=torch.int32)) == 2**31 - 2  # -1 mod 2^31 - 1
    assert tensor_checksum(torch.tensor([1.0, 2.0], dtype=torch.bfloat16)) == 0x3F80 + 2 * 0x4000
    x = torch.randn(5, 7)
    assert tensor_checksum(x, chunk=3) == tensor_checksum(x) == tensor_checksum(x.t().contiguous().t())
    y = x.clone()
    y[2, 3] = torch.nextafter(y[2, 3], torch.tensor(1e9))  # one float32 step
    z = x.clone()
    z[0, 0], z[0, 1] = x[0, 1], x[0, 0]
    assert len({tensor_checksum(x), tensor_checksum(y), tensor_checksum(z)}) == 3


def test_locked_digest_covers_the_locked_weights_only():
    model = tiny_model("v2")
    configure_trainable(model)
    before = locked_digest(model)
    with torch.no_grad():
        model.control_model.input_hint_block[0].weight.add_(1.0)  # trainable: not in the digest
    assert locked_digest(model) == before
    with torch.no_grad():
        model.first_stage_model.decoder.conv_out.bias[0] += 1e-6  # locked (the VAE)
    assert locked_digest(model) != before



# Mutation round 10: optimiser settings, the default policy's source, exact checksums, the digest's
# inputs, the export's metadata and what counts as an export.
from cldm.trainable import EXPORT_FORMAT, is_export, make_optimizer  # noqa: E402

P = 2**31 - 1


def test_make_optimizer_adamw_keeps_lr_betas_and_each_groups_decay():
    model = _configured(tiny_model("v2"))
    opt = make_optimizer("adamw", param_groups(model, weight_decay=0.05), lr=3e-4, betas=(0.8, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["lr"], g["betas"], g["weight_decay"]) for g in opt.param_groups] == [
        ("trainable", 3e-4, (0.8, 0.95), 0.05), ("unet_input", 3e-4, (0.8, 0.95), 0.0)]


def test_adamw8bit_keeps_32_bit_moments_for_the_partly_locked_conv_only():
    pytest.importorskip("bitsandbytes")
    model = _configured(tiny_model("v2"))
    opt = make_optimizer("adamw8bit", param_groups(model), lr=1e-3, betas=(0.9, 0.99))
    bits = {g["name"]: opt.get_config(i, 0, g)["optim_bits"] for i, g in enumerate(opt.param_groups)}
    assert bits == {"trainable": 8, "unet_input": 32}


def test_the_models_only_mid_control_is_the_default_policy():
    model = tiny_model("v2", overrides=["model.only_mid_control=true"])
    names = trainable_names(_configured(model))
    assert names and not any(n.startswith("control_model.zero_convs.") for n in names)
    assert any(n.startswith("control_model.zero_convs.")  # an explicit argument still wins
               for n in trainable_names(_configured(model, only_mid_control=False)))


def test_configure_trainable_installs_the_gradient_mask_once():
    model = tiny_model("v2")
    for _ in range(3):
        configure_trainable(model)
    assert len(model.model.diffusion_model.input_blocks[0][0].weight._backward_hooks) == 1


def test_a_locked_unet_input_conv_gets_no_optimiser_group():
    groups = param_groups(_configured(tiny_model("v1")), weight_decay=0.01)
    assert [g["name"] for g in groups] == ["trainable"]


def test_tensor_checksum_pins_unsigned_bytes_signed_wider_words_and_large_values():
    """The digest is stored in training checkpoints and compared on resume, so its definition
    may not drift: bytes unsigned, 2/4/8-byte words signed, each term and the sum reduced mod P."""
    assert tensor_checksum(torch.tensor([200, 1], dtype=torch.uint8)) == 200 + 2
    assert tensor_checksum(torch.tensor([-56], dtype=torch.int8)) == 200  # same bits as uint8 200
    assert tensor_checksum(torch.tensor([-1.0], dtype=torch.bfloat16)) == P - (0x10000 - 0xBF80)  # int16 bits
    assert tensor_checksum(torch.tensor([0, 2**62], dtype=torch.int64)) == 2  # 2^62 = 1 mod P, at position 2
    assert tensor_checksum(torch.tensor([P - 1, P - 1], dtype=torch.int32), chunk=1) == P - 3  # -1 - 2 mod P
    n = 100_000  # sum of (P - 1) * i would pass 2^63 without reducing each product
    assert tensor_checksum(torch.full((n,), P - 1, dtype=torch.int32)) == (-(n * (n + 1) // 2)) % P


class _Named(torch.nn.Module):
    """Stand-in with a ControlNet part (exported, so not in the digest) and one locked weight."""

    def __init__(self, name, weight):
        super().__init__()
        self.control_model = torch.nn.Linear(2, 2)
        self.register_parameter(name, torch.nn.Parameter(weight.clone(), requires_grad=False))


def test_locked_digest_covers_names_and_shapes_not_only_bits():
    w = torch.arange(6.0)
    digest = locked_digest(_Named("a", w))
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert locked_digest(_Named("a", w)) == digest
    assert locked_digest(_Named("b", w)) != digest                 # same bits under another name
    assert locked_digest(_Named("a", w.view(2, 3))) != digest      # same bits in another shape


def test_export_metadata_records_what_the_weights_fit(tmp_path):
    model = _configured(tiny_model("v2"))
    path = export_control(model, tmp_path / "c.safetensors", step=5, extra={"note": "x", "step": "9"})
    assert read_export_metadata(path) == {
        "format": EXPORT_FORMAT, "color_variant": "v2", "step": "9", "concat_to_unet": "True",
        "only_mid_control": "False", "parameterization": "eps", "note": "x",  # extra wins
        "locked_digest": locked_digest(model)}  # inference's check that --ckpt holds the weights it was trained on
    path = export_control(model, tmp_path / "c.safetensors", extra={"locked_digest": "given"})
    assert read_export_metadata(path)["locked_digest"] == "given"
    assert "locked_digest" not in read_export_metadata(export_control(model, tmp_path / "c.safetensors",
                                                                      extra={"locked_digest": None}))


def test_is_export_by_metadata_or_by_controlnet_plus_unet_tensors_only():
    c, u, vae = "control_model.a", "model.diffusion_model.b", "first_stage_model.c"
    assert is_export({c: 0, u: 0}, {})
    assert is_export({c: 0}, {})
    assert not is_export({c: 0, vae: 0}, {})            # a full model
    assert not is_export({u: 0}, {})                    # plain SD UNet
    assert not is_export({}, {})
    assert is_export({c: 0, vae: 0}, {"format": EXPORT_FORMAT})


def test_locked_digest_covers_the_dtype_too():
    """The same 16 bits as float16 and as bfloat16 are other weights (kills leaving the dtype out)."""
    w = torch.arange(6.0, dtype=torch.float16)
    assert locked_digest(_Named("a", w)) != locked_digest(_Named("a", w.view(torch.bfloat16)))


# Mutation round 11: the fused flag reaches AdamW.

def test_make_optimizer_passes_fused_through_to_adamw():
    """The trainer asks for the fused kernel on CUDA (one launch per step instead of one per
    tensor); make_optimizer must hand the flag on, not drop it (kills `fused=False`)."""
    groups = param_groups(_configured(tiny_model("v2")))
    assert make_optimizer("adamw", groups, lr=1e-3, betas=(0.9, 0.999), fused=True).defaults["fused"] is True
    assert not make_optimizer("adamw", groups, lr=1e-3, betas=(0.9, 0.999)).defaults["fused"]


@pytest.mark.slow  # ~13 s: two processes importing torch and bitsandbytes
def test_adamw8bit_does_not_log_bitsandbytes_hub_kernel_warning():
    """On a CPU with AVX512-BF16 and no `kernels` package, `import bitsandbytes` logs "Failed to
    load CPU gemm_4bit_forward from kernels-community" (a 4-bit kernel from the hub, unused by
    the 8-bit optimiser): on a run that works. Skipped where the bare import says nothing."""
    import subprocess
    import sys
    from pathlib import Path

    def stderr(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2]).stderr

    if "kernels-community" not in stderr("import bitsandbytes"):
        pytest.skip("this CPU's bitsandbytes import logs nothing")
    err = stderr("import torch\nfrom cldm.trainable import make_optimizer\n"
                 "make_optimizer('adamw8bit', [{'params': [torch.nn.Parameter(torch.zeros(300))]}], 1e-3, (0.9, 0.999))")
    assert "kernels-community" not in err and "Failed" not in err, err
