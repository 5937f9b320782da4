"""colorize.loading: the config chosen, the weights checked and loaded, the device and dtype."""
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cldm.checkpoint import CheckpointError, check_checkpoint_file, save_state_dict
from cldm.config import TINY_CONFIG, ConfigError, load_config
from cldm.trainable import configure_trainable, export_control
from cldm.weights_config import read_export_metadata, resolve_config
from colorize import loading as L, pipeline as P
from tests.colorize.tiny_model import save_tiny, tiny_model

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "bigbuckbunny.mp4"
TOY = REPO / "models" / "toy" / "toy_color_v2.safetensors"


def test_devices_are_checked_in_one_line():
    assert L.resolve_device("cpu") == torch.device("cpu")
    assert L.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "mps", "meta", "cuda:x", "cuda:-1"):
        with pytest.raises(ValueError, match=rf"^--device {bad}: expected auto, cpu, cuda or cuda:N \(N from 0\)$"):
            L.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device cuda:1: CUDA is not available here$"):
            L.resolve_device("cuda:1")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=rf"^--device cuda:{n}: this machine has {n} CUDA device"):
            L.resolve_device(f"cuda:{n}")


def test_compute_dtype_is_fp16_on_cuda_only_when_auto():
    assert L.compute_dtype("auto", "cpu") == torch.float32
    assert L.compute_dtype("auto", torch.device("cuda", 0)) == torch.float16
    assert L.compute_dtype("bf16", "cuda") == torch.bfloat16 and L.compute_dtype("fp16", "cpu") == torch.float16


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(SAMPLE.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="clip.mp4: not a checkpoint file"):
        L.load_model(video, config=TINY_CONFIG)
    named = tmp_path / "weights.ckpt"  # safetensors content under a torch name
    save_file({"a": torch.zeros(2)}, str(named))
    with pytest.raises(CheckpointError, match="weights.ckpt: looks like a safetensors file.*rename it"):
        check_checkpoint_file(named)
    for name, legacy in (("zip.pt", False), ("legacy.pt", True)):  # both torch.save formats pass
        torch.save({"a": torch.zeros(2)}, tmp_path / name, _use_new_zipfile_serialization=not legacy)
        check_checkpoint_file(tmp_path / name)
    check_checkpoint_file(tmp_path / "missing.ckpt")  # left to the loader's "no such file"


def test_load_model_full_checkpoint_and_sd_plus_control(tmp_path):
    model = tiny_model(seed=1)
    full = save_tiny(model, tmp_path / "full.safetensors")
    expected = model.state_dict()
    loaded = L.load_model(full, config=TINY_CONFIG).state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    # SD weights (no ControlNet) + an export of the trained part
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    save_tiny_sd = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(save_tiny_sd))
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors")
    model.requires_grad_(False)
    both = L.load_model(save_tiny_sd, control=export, config=TINY_CONFIG).state_dict()
    assert all(torch.equal(both[k], v) for k, v in expected.items())
    # the SD file alone is not a full checkpoint: the message says what to do
    with pytest.raises(CheckpointError, match="--control"):
        L.load_model(save_tiny_sd, config=TINY_CONFIG)
    # nor is the export alone: named as one, with what to pass (not "lacks N tensors")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(export))}: an export of trained weights "
                                              r"\(control\.safetensors\), not a full checkpoint; pass it as --control"):
        L.load_model(export, config=TINY_CONFIG)
    # another architecture: refused before anything is built
    with pytest.raises(CheckpointError, match="does not fit"):
        L.load_model(full, config=TINY_CONFIG, overrides=["model.color_variant=v3"])
    # a YAML next to the checkpoint is its config
    (tmp_path / "full.yaml").write_text(TINY_CONFIG.read_text())
    assert resolve_config(full) == tmp_path / "full.yaml"


def test_a_config_contradicting_the_checkpoints_own_is_refused(tmp_path):
    """The toy records its config (scale factor 0.57326); the tiny YAML's architecture fits its
    shapes but not its scale factor, which would only colour worse, silently."""
    toy = TOY
    with pytest.raises(CheckpointError, match=r"saved with another model config: model\.scale_factor is 0\.57326 "
                                              r"there, 0\.18215 in .*cldm_tiny_color\.yaml \(1 key"):
        L.load_model(toy, config=TINY_CONFIG)
    with pytest.raises(CheckpointError, match=r"0\.2 in .*toy_color_v2\.yaml with the overrides \(1 key\(s\) differ\); "
                                              r"leave out --set to use the one saved with it$"):  # not --config: not given
        L.load_model(toy, overrides=["model.scale_factor=0.2"])
    L.load_model(toy, overrides=["model.first_stage.ddconfig.dropout=0.1"])  # eval mode: no contradiction
    alone = tmp_path / "toy.safetensors"  # no YAML beside it: the config saved in the file is used
    shutil.copy(toy, alone)
    assert L.load_model(alone).scale_factor == 0.57326
    (tmp_path / "toy.yaml").write_text(TINY_CONFIG.read_text())  # a YAML beside it that disagrees
    with pytest.raises(CheckpointError, match=rf"1 key\(s\) differ\); fix or remove {tmp_path / 'toy.yaml'}, or pass "
                                              r"--config$"):
        L.load_model(alone)
    with pytest.raises(CheckpointError, match=r"differ\); leave out --config to use the one saved with it$"):
        L.load_model(alone, config=TINY_CONFIG)
    with pytest.raises(CheckpointError, match=r"differ\); leave out --config and --set to use the one saved with it$"):
        L.load_model(alone, config=TINY_CONFIG, overrides=["model.first_stage.ddconfig.dropout=0.1"])
    from cldm.checkpoint import load_state_dict, read_metadata, save_state_dict
    ckpt = tmp_path / "converted.ckpt"  # as `python -m cldm.checkpoint convert` writes it: metadata kept
    save_state_dict(load_state_dict(toy), ckpt, metadata=read_metadata(toy))
    assert L.load_model(ckpt).scale_factor == 0.57326  # its own config, read from the .ckpt
    with pytest.raises(CheckpointError, match=r"converted\.ckpt was saved with another model config"):
        L.load_model(ckpt, config=TINY_CONFIG)


def test_a_config_source_the_caller_found_is_not_looked_for_again(tmp_path, monkeypatch):
    """colorize_inference.py resolves the config once, to name it, and hands it to
    schedule_length and load_model (a .ckpt's recorded config can take a load of the file)."""
    alone = tmp_path / "toy.safetensors"  # the config it records
    shutil.copy(TOY, alone)
    source = resolve_config(alone)

    def again(*args, **kwargs):
        raise AssertionError("resolved again")
    monkeypatch.setattr(L, "resolve_config", again)
    assert L.schedule_length(alone, source=source) == 1000
    assert L.load_model(alone, source=source).scale_factor == 0.57326


def test_schedule_length_is_the_configs_that_load_model_would_use(tmp_path):
    """Read without the weights, so a step count is checked before the long load."""
    toy = TOY
    assert L.schedule_length(toy) == 1000  # the .yaml beside it
    assert L.schedule_length(toy, config=TINY_CONFIG, overrides=["model.schedule.timesteps=40"]) == 40
    assert L.schedule_length(tmp_path / "missing.safetensors") == 1000  # SD2.1's; the loader reports the file
    P.check_steps(40, 20)
    with pytest.raises(P.OptionError, match=r"^steps must be between 1 and 20 for the model's 40-step"):
        P.check_steps(40, 21)


def test_load_model_takes_auto_as_the_cli_does(tmp_path):
    """device="auto" was torch's "Expected one of cpu, cuda, ipu, ... device type"."""
    full = save_tiny(tiny_model(seed=1), tmp_path / "full.safetensors")
    assert L.load_model(full, config=TINY_CONFIG, device="auto").betas.device == L.resolve_device("auto")


def test_cast_weights_keeps_every_norm_in_float32():
    """GroupNorm and LayerNorm (the transformer blocks') keep float32 parameters; the other layers
    of ControlNet, UNet and VAE take the dtype."""
    model = L.cast_weights(tiny_model(), torch.float16)
    norms = [m for part in (model.control_model, model.model, model.first_stage_model) for m in part.modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert any(isinstance(m, torch.nn.LayerNorm) for m in norms)
    assert {p.dtype for m in norms for p in m.parameters()} == {torch.float32}
    assert model.model.diffusion_model.out[-1].weight.dtype == torch.float16
    assert model.control_model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.first_stage_model.decoder.conv_out.weight.dtype == torch.float16
    assert model.alphas_cumprod.dtype == torch.float32  # the schedule stays float32
    assert {p.dtype for p in model.cond_stage_model.parameters()} == {torch.float32}  # the text encoder too


A1111_YAML = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    linear_start: 0.00085\n"


def test_a_bad_yaml_found_beside_the_weights_says_the_user_never_named_it(tmp_path):
    """An A1111-style sd.yaml beside the SD file (or a broken YAML beside the export) is taken as
    the config: its error says where it was found and what to do; one passed as --config does not."""
    sd, control = tmp_path / "sd.safetensors", tmp_path / "control.safetensors"
    shutil.copy(TOY, sd)  # records a config, but the YAML beside it comes first
    (tmp_path / "sd.yaml").write_text(A1111_YAML)
    found = re.escape(f"{tmp_path / 'sd.yaml'}: model.target: a config in the layout of SD's and ControlNet's own "
                      "YAML files (target:, params:), which this project does not read; use "
                      "models/cldm_v21_color.yaml or one made from it")
    for load in (L.schedule_length, L.load_model):
        with pytest.raises(ConfigError, match=rf"^{found} \(found beside --ckpt: fix or remove it, or pass --config\)$"):
            load(sd)
    with pytest.raises(ConfigError, match=rf"^{found}$"):  # named by the user: no note
        L.schedule_length(sd, config=tmp_path / "sd.yaml")
    control.write_bytes(b"")
    (tmp_path / "control.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match=r"control\.yaml: not a readable YAML config .* \(found beside --control: "):
        L.schedule_length(sd, control)


def test_a_recorded_config_that_an_override_breaks_names_the_file_that_records_it(tmp_path):
    toy = tmp_path / "toy.safetensors"
    shutil.copy(TOY, toy)  # without the YAML beside it: the config it records is the one
    with pytest.raises(ConfigError, match=rf"^the config {toy} records with model\.scale_factor=-1: "
                                          r"model\.scale_factor: expected a positive number, got -1$"):
        L.schedule_length(toy, overrides=["model.scale_factor=-1"])
    with pytest.raises(ConfigError, match=rf"^bad override model\.nope=1 for the config {toy} records: "
                                          r"model\.nope: no such key$"):
        L.load_model(toy, overrides=["model.nope=1"])


def test_an_sd_file_under_control_that_records_another_config_is_refused(tmp_path):
    """--ckpt under --control may record a config (an init made by tool_add_control_sd21.py, the
    toy): one contradicting the config in use (the export's) was loaded silently, its VAE then
    scaled by another model's factor. Refused like a contradicting --config; an SD file that
    records nothing, or a config that agrees, loads."""
    model = L.load_model(TOY)  # records scale factor 0.57326
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors", cfg=load_config(TOY.with_suffix(".yaml")))
    model.requires_grad_(False)
    assert L.load_model(TOY, control=export).scale_factor == 0.57326  # the run's own init: agrees
    tiny = tmp_path / "tiny_init.safetensors"  # SD weights recording the tiny config (scale factor 0.18215)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")},
              str(tiny), metadata={"config": TINY_CONFIG.read_text()})
    with pytest.raises(CheckpointError, match=rf"^--ckpt {tiny} was saved with another model config than the one "
                                              r"--control .* is used with: model\.scale_factor is 0\.18215 there, "
                                              r"0\.57326 in the config in use \(1 key\(s\) differ\); pass the SD "
                                              r"weights it was trained on"):
        L.load_model(tiny, control=export)
    bare = tmp_path / "bare.safetensors"  # plain SD weights record nothing: nothing to contradict
    save_file(load_file(tiny), str(bare))
    assert L.load_model(bare, control=export).scale_factor == 0.57326


def test_loading_a_model_draws_none_of_the_callers_random_numbers(tmp_path):
    """create_model's random initialisation (overwritten by the load) drew from torch's global RNG:
    a seeded caller's next numbers depended on whether a model was loaded in between."""
    model = tiny_model(seed=1)
    full = save_tiny(model, tmp_path / "full.safetensors")
    sd = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")},
              str(sd))
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors")
    torch.manual_seed(123)
    expected = torch.rand(3)
    for ckpt, control in [(full, None), (sd, export)]:
        torch.manual_seed(123)
        L.load_model(ckpt, control=control, config=TINY_CONFIG)
        assert torch.equal(torch.rand(3), expected)


def test_ema_weights_in_the_weights_file_are_noted_as_unused(tmp_path):
    """A full LDM checkpoint holds model_ema.* besides model.*; they were dropped without a word.
    Both ways in (a full checkpoint, an SD file under --control) say so, once; other files do not."""
    model = tiny_model(seed=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelout2bias": torch.zeros(4)}
    full, plain = tmp_path / "full.safetensors", tmp_path / "plain.safetensors"
    save_file({**state, **ema}, str(full))
    save_file(state, str(plain))
    sd = {k: v for k, v in state.items() if not k.startswith("control_model.")}
    sd_ema, sd_plain = tmp_path / "sd_ema.safetensors", tmp_path / "sd.safetensors"
    save_file({**sd, **ema}, str(sd_ema))
    save_file(sd, str(sd_plain))
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors")
    model.requires_grad_(False)
    line = ("{} also holds EMA weights (model_ema.*, 2 tensors), which are not used: its model.* weights are, as in "
            "SD's own inference (SD's *-ema-pruned files hold the EMA weights as model.*)")
    for ckpt, control, expected in [(full, None, [line.format(full)]), (plain, None, []),
                                    (sd_ema, export, [line.format(sd_ema)]), (sd_plain, export, [])]:
        notes = []
        loaded = L.load_model(ckpt, control=control, config=TINY_CONFIG, note=notes.append).state_dict()
        assert notes == expected
        assert all(torch.equal(loaded[k], v) for k, v in state.items())  # the model.* weights, as before


def test_an_export_on_other_sd_weights_than_it_was_trained_on_is_noted(tmp_path):
    """SD2.1 768-v has 512-base's tensors, so only the export's recorded digest of the locked
    weights tells them apart: a note (fine-tuned bases are legitimate), once, naming both files."""
    from cldm.trainable import locked_digest

    model = tiny_model(seed=1)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    same, other = tmp_path / "sd.safetensors", tmp_path / "other.safetensors"
    save_file(sd, str(same))
    key = "first_stage_model.decoder.conv_out.bias"  # a locked weight, one float bit off
    save_file({**sd, key: torch.nextafter(sd[key], torch.tensor(1.0))}, str(other))
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors",
                            extra={"init": "init.safetensors", "locked_digest": locked_digest(model)})
    unrecorded = export_control(model, tmp_path / "old.safetensors", extra={"locked_digest": None})  # as before 11-28
    own = export_control(model, tmp_path / "own.safetensors")  # the digest recorded without being given
    assert "locked_digest" not in read_export_metadata(unrecorded)
    assert read_export_metadata(own)["locked_digest"] == locked_digest(model)
    model.requires_grad_(False)
    notes = []
    L.load_model(same, control=export, config=TINY_CONFIG, note=notes.append)
    assert notes == []
    L.load_model(other, control=unrecorded, config=TINY_CONFIG, note=notes.append)
    assert notes == [f"--control {unrecorded} records no digest of the SD weights it was trained on (an export made "
                     "before 2026-11-28 18:47, or not by this project's training): whether --ckpt holds them is not "
                     "checked; pass its run's --init, or the SD file that was made from"]
    notes.clear()
    loaded = L.load_model(other, control=export, config=TINY_CONFIG, note=notes.append)
    assert notes == [f"--control {export} was trained on other SD weights than --ckpt {other} holds (its run's --init "
                     "(init.safetensors); the digests of the locked weights differ): fine for a fine-tuned SD2.1 or "
                     "the same weights at another precision, but SD2.1 768-v under a 512-base export colours wrongly; "
                     "to be sure, pass that --init, or the SD file it was made from, as --ckpt"]
    assert torch.equal(loaded.state_dict()[key], load_file(other)[key])  # noted, not refused: loaded as given
    as_ckpt = tmp_path / "control.ckpt"  # a torch export: its names are read by loading it
    save_state_dict(load_file(export), as_ckpt, metadata=read_export_metadata(export))
    L.load_model(other, control=as_ckpt, config=TINY_CONFIG, note=notes.append)
    L.load_model(same, control=as_ckpt, config=TINY_CONFIG, note=notes.append)
    assert len(notes) == 2 and notes[1] == notes[0].replace(str(export), str(as_ckpt))


def test_an_initial_checkpoint_as_the_model_is_noted_as_untrained(tmp_path):
    """tool_add_control_sd21.py's output loads as a full model, and its zero-initialised
    ControlNet colours from SD alone: at random, not from the reference, and without a word."""
    import tool_add_control_sd21 as tool
    from tests.train_helpers import tiny_sd_state

    save_file(tiny_sd_state(), str(tmp_path / "sd.safetensors"))
    init = tmp_path / "init.safetensors"
    tool.add_control(tmp_path / "sd.safetensors", init, config=TINY_CONFIG)
    notes = []
    L.load_model(init, config=TINY_CONFIG, note=notes.append)
    assert notes == [f"--ckpt {init} is an initial checkpoint of tool_add_control_sd21.py: its ControlNet is "
                     "untrained (zero convolutions), so the colours come from SD alone, not from the reference; for a "
                     "trained model pass the run's control.safetensors with --control (and this file, or the SD file, "
                     "as --ckpt)"]
    notes.clear()
    L.load_model(save_tiny(tiny_model(seed=1), tmp_path / "trained.safetensors"), config=TINY_CONFIG,
                 note=notes.append)
    assert notes == []  # a full checkpoint of another making


def test_a_v_prediction_sd_file_under_an_eps_export_is_refused(tmp_path):
    """SD2.1 768-v (or a v fine-tune) under a 512-base export: refused where the SD file says
    what it predicts, before anything is built; else only the digest note can tell."""
    model = tiny_model(seed=1)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    v_file = tmp_path / "sd_v.safetensors"
    save_file(sd, str(v_file), metadata={"modelspec.prediction_type": "v"})
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors")
    with pytest.raises(CheckpointError) as e:
        L.load_model(v_file, control=export, config=TINY_CONFIG)
    assert str(e.value) == (f"--ckpt {v_file} predicts v, says its metadata (modelspec.prediction_type: v), but the "
                            "config predicts eps (SD2.1 768-v or a v-prediction fine-tune: set "
                            "model.parameterization=v and train and sample at 768)")


def test_cuda_devices_are_checked_against_what_the_machine_has(monkeypatch):
    """As on a machine with one GPU: auto picks it, cuda and cuda:0 are fine, cuda:1 is not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert L.resolve_device("auto") == torch.device("cuda")
    assert L.resolve_device("cuda") == torch.device("cuda") and L.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"^--device cuda:1: this machine has 1 CUDA device\(s\)$"):
        L.resolve_device("cuda:1")


def test_a_loaded_model_is_in_eval_mode_without_gradients_and_on_its_schedule(tmp_path):
    """A bf16 file holds a rounded noise schedule: the config's float32 one is kept (load_into)."""
    from ldm.schedule import BUFFER_NAMES, schedule_buffers
    full = tmp_path / "full.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tiny_model(seed=1).state_dict().items()}, str(full))
    model = L.load_model(full, config=TINY_CONFIG)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    exact = schedule_buffers()
    assert all(torch.equal(model.state_dict()[name], exact[name]) for name in BUFFER_NAMES)


def test_a_full_checkpoint_lacking_any_model_tensor_is_refused(tmp_path):
    """One ControlNet tensor missing, or the whole VAE (a strict part is only checked when present)."""
    sd = tiny_model(seed=1).state_dict()
    for name, drop in (("one.safetensors", lambda k: k == "control_model.middle_block_out.0.bias"),
                       ("novae.safetensors", lambda k: k.startswith("first_stage_model."))):
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in sd.items() if not drop(k)}, str(path))
        n = sum(map(drop, sd))
        with pytest.raises(CheckpointError, match=rf"{name} does not fit the config: it lacks {n} model tensors "
                                                  r"\(e\.g\. (control_model\.middle_block_out\.0\.bias|"
                                                  r"first_stage_model\.).*pass the ControlNet with --control; "
                                                  r"the file holds: "):
            L.load_model(path, config=TINY_CONFIG)


def test_sd_plus_control_checks_the_config_the_export_records_and_builds_on_the_device(tmp_path, monkeypatch):
    model = tiny_model(seed=1)
    sd = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")}, str(sd))
    made = load_config(TINY_CONFIG, ["model.scale_factor=0.5"])
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors", cfg=made)
    with pytest.raises(CheckpointError, match=r"control\.safetensors was saved with another model config: "
                                              r"model\.scale_factor is 0\.5 there"):
        L.load_model(sd, control=export, config=TINY_CONFIG)

    class Built(Exception):
        pass
    devices = []

    def create_model(cfg):
        devices.append(torch.get_default_device())
        raise Built
    monkeypatch.setattr(L, "create_model", create_model)
    with pytest.raises(Built):
        L.load_model(sd, control=export, device="meta")
    assert devices == [torch.device("meta")]


def test_a_yaml_beside_the_weights_and_overrides_get_the_remedy_of_whichever_is_at_fault(tmp_path):
    """The remedy names only what was given (it said "leave out --config and --set" with --set
    alone), and the YAML found beside the weights only where it contradicts them by itself."""
    alone = tmp_path / "toy.safetensors"
    shutil.copy(TOY, alone)
    (tmp_path / "toy.yaml").write_text(TINY_CONFIG.read_text())  # scale factor 0.18215, the toy's 0.57326
    with pytest.raises(CheckpointError, match=rf"in {tmp_path / 'toy.yaml'} with the overrides \(1 key\(s\) differ\); "
                                              rf"fix or remove {tmp_path / 'toy.yaml'}, or pass --config$"):
        L.load_model(alone, overrides=["model.first_stage.ddconfig.dropout=0.1"])
    (tmp_path / "toy.yaml").write_text((TOY.parent / "toy_color_v2.yaml").read_text())  # agrees with the weights
    with pytest.raises(CheckpointError, match=rf"in {tmp_path / 'toy.yaml'} with the overrides \(1 key\(s\) differ\); "
                                              r"leave out --set to use the one saved with it$"):
        L.load_model(alone, overrides=["model.scale_factor=0.2"])
    # a YAML that loads only with the overrides is at fault too, whatever they set
    (tmp_path / "toy.yaml").write_text((TOY.parent / "toy_color_v2.yaml").read_text().replace(
        "scale_factor: 0.57326", "scale_factor: abc"))
    with pytest.raises(CheckpointError, match=rf"fix or remove {tmp_path / 'toy.yaml'}, or pass --config$"):
        L.load_model(alone, overrides=["model.scale_factor=0.2"])


def test_the_remedy_is_worked_out_only_for_a_mismatch(tmp_path, monkeypatch):
    """Working it out may reread the weights' config and the YAML beside them: a load whose config
    agrees (here with a --set that matches) does not (kills passing _remedy(...) eagerly)."""
    alone = tmp_path / "toy.safetensors"
    shutil.copy(TOY, alone)
    (tmp_path / "toy.yaml").write_text((TOY.parent / "toy_color_v2.yaml").read_text())
    calls = []
    monkeypatch.setattr(L, "_remedy", lambda *a: calls.append(a) or "remedy")
    L.load_model(alone, overrides=["model.scale_factor=0.57326"])
    assert calls == []
    with pytest.raises(CheckpointError, match="; remedy$"):
        L.load_model(alone, overrides=["model.scale_factor=0.2"])
    assert len(calls) == 1


def test_pickled_files_load_with_allow_pickle_full_or_under_control(tmp_path):
    """A Lightning-style .ckpt (tensors plus pickled hyper-parameters) is refused without
    allow_pickle and loads with it, as a full checkpoint and as the SD file under --control."""
    import argparse

    model = tiny_model(seed=1)
    expected = model.state_dict()
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": expected, "hyper_parameters": argparse.Namespace(lr=1e-4)}, full)
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        L.load_model(full, config=TINY_CONFIG)
    loaded = L.load_model(full, config=TINY_CONFIG, allow_pickle=True).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    sd = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {k: v for k, v in expected.items() if not k.startswith("control_model.")},
                "hyper_parameters": argparse.Namespace(lr=1e-4)}, sd)
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors")
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        L.load_model(sd, control=export, config=TINY_CONFIG)
    loaded = L.load_model(sd, control=export, config=TINY_CONFIG, allow_pickle=True).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_an_init_trained_with_only_mid_control_fits_an_export_without(tmp_path):
    """only_mid_control is free between the SD file under --control (an init) and the export; any
    other key that differs is not (test_an_sd_file_under_control_that_records_another_config_is_refused)."""
    model = tiny_model(seed=1)
    init = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")},
              str(init), metadata={"config": TINY_CONFIG.read_text().replace("only_mid_control: false",
                                                                               "only_mid_control: true")})
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors", cfg=load_config(TINY_CONFIG))
    assert L.load_model(init, control=export).only_mid_control is False


def test_what_a_full_checkpoint_lacks_is_named_and_a_misfit_comes_first(tmp_path):
    """The first tensor it lacks in the model's order, the text encoder's too (a part missing whole:
    one missing in part is refused by misfit's strict parts); a tensor of another
    shape is the reason where there is one, rather than those missing."""
    sd = tiny_model(seed=1).state_dict()
    cases = [("two.safetensors", lambda k: k.startswith("control_model.middle_block_out.0."), {},
              r"it lacks 2 model tensors \(e\.g\. control_model\.middle_block_out\.0\.weight\)"),
             ("notext.safetensors", lambda k: k.startswith("cond_stage_model."), {},  # the whole text encoder
              rf"it lacks {sum(k.startswith('cond_stage_model.') for k in sd)} model tensors \(e\.g\. "
              r"cond_stage_model\."),
             ("both.safetensors", lambda k: k == "control_model.middle_block_out.0.bias",
              {"model.diffusion_model.out.2.bias": torch.zeros(5)},
              r"model\.diffusion_model\.out\.2\.bias is \[5\] in the checkpoint but \[4\] in the model")]
    for name, drop, replace, reason in cases:
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in {**sd, **replace}.items() if not drop(k)}, str(path))
        with pytest.raises(CheckpointError, match=rf"{name} does not fit the config: {reason}"):
            L.load_model(path, config=TINY_CONFIG)


def test_a_full_checkpoint_is_checked_on_meta_and_built_on_the_device(tmp_path, monkeypatch):
    full = save_tiny(tiny_model(seed=1), tmp_path / "full.safetensors")

    class Built(Exception):
        pass
    devices, real = [], L.create_model

    def create_model(cfg):
        devices.append(torch.get_default_device())
        if len(devices) == 2:
            raise Built
        return real(cfg)
    monkeypatch.setattr(L, "create_model", create_model)
    with pytest.raises(Built):
        L.load_model(full, config=TINY_CONFIG, device="meta")
    assert devices == [torch.device("meta"), torch.device("meta")]
    devices.clear()
    with pytest.raises(Built):
        L.load_model(full, config=TINY_CONFIG, device="cpu")
    assert devices == [torch.device("meta"), torch.device("cpu")]


def test_a_pickled_export_given_allow_pickle_is_digested_too(tmp_path):
    """A .ckpt export that only loads with --allow-pickle: the digest of the weights under it is
    checked as for any export (its tensor names come from that one load)."""
    from types import SimpleNamespace

    from cldm.trainable import locked_digest

    model = tiny_model(seed=1)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    same = tmp_path / "sd.safetensors"
    save_file(sd, str(same))
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors",
                            extra={"init": "init.safetensors", "locked_digest": locked_digest(model)})
    pickled = tmp_path / "control.ckpt"
    torch.save({"state_dict": load_file(export), "metadata": read_export_metadata(export),
                "made_by": SimpleNamespace(tool="a notebook")}, pickled)
    with pytest.raises(CheckpointError, match="allow"):
        L.load_model(same, control=pickled, config=TINY_CONFIG)
    notes = []
    L.load_model(same, control=pickled, config=TINY_CONFIG, allow_pickle=True, note=notes.append)
    assert notes == []


def test_an_export_is_read_once_for_its_tensors_and_their_names(tmp_path, monkeypatch):
    """load_model(note=...) digests the locked weights outside the export's tensor names: those
    come from the load that took its tensors, not from reading the file again (export_names did:
    a second full torch.load of a .ckpt export, or the tensor names of its safetensors header;
    reads of the metadata alone are not counted here)."""
    import safetensors

    from cldm import checkpoint, trainable

    model = tiny_model(seed=1)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    save_file(sd, str(tmp_path / "sd.safetensors"))
    configure_trainable(model)
    export = export_control(model, tmp_path / "control.safetensors", extra={"locked_digest": "0" * 32})
    as_ckpt = tmp_path / "control.ckpt"
    save_state_dict(load_file(export), as_ckpt, metadata=read_export_metadata(export))
    reads, real_load, real_open, real_load_file = [], torch.load, safetensors.safe_open, checkpoint.load_file

    class Header:  # a safe_open handle that notes what is read from it
        def __init__(self, f, *a, **kw):
            self.name, self.handle = Path(f).name, real_open(f, *a, **kw)

        def __enter__(self):
            self.f = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def __getattr__(self, attr):
            reads.append((self.name, attr))  # keys, get_tensor, metadata, ...
            return getattr(self.f, attr)

    def counting_load(f, *a, **kw):
        reads.append((Path(f).name, "torch.load mmap" if kw.get("mmap") else "torch.load"))
        return real_load(f, *a, **kw)

    def counting_load_file(f, *a, **kw):
        reads.append((Path(f).name, "load_file"))
        return real_load_file(f, *a, **kw)
    monkeypatch.setattr(torch, "load", counting_load)
    for module in (safetensors, checkpoint, trainable, L):  # wherever a reader would take it from
        monkeypatch.setattr(module, "safe_open", Header, raising=False)
    monkeypatch.setattr(checkpoint, "load_file", counting_load_file)
    for control, once in ((as_ckpt, "torch.load"), (export, "load_file")):
        notes = []
        reads.clear()
        L.load_model(tmp_path / "sd.safetensors", control=control, config=TINY_CONFIG, note=notes.append)
        assert len(notes) == 1 and "other SD weights" in notes[0]  # the digest was checked
        tensors_or_names = [how for name, how in reads if name == control.name and how != "metadata"
                            and how != "torch.load mmap"]  # (the metadata: no tensors, no names)
        assert tensors_or_names == [once], reads
