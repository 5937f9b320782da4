"""tool_add_control_sd21.py on tiny SD-format checkpoints written by the tests."""
import errno
import os
import re
import shutil
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from omegaconf import OmegaConf
from safetensors.torch import load_file

import tool_add_control_sd21 as tool
from cldm import checkpoint
from cldm.checkpoint import load_state_dict
from cldm.config import TINY_CONFIG, load_config
from cldm.model import create_model
from cldm.weights_config import resolve_config
from ldm.schedule import BUFFER_NAMES
from ldm.modules.unet import UNetModel
from tests.helpers import read_only_folder, refused, sub_state


def tiny_sd_state(seed: int = 0, overrides=()) -> dict:
    """A plain-SD-format state dict (no control_model.*) whose UNet is fully random."""
    torch.manual_seed(seed)
    model = create_model(load_config(TINY_CONFIG, ["model.color_variant=v1", *overrides]))
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0, 0.05)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")}


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    sd = tiny_sd_state()
    from safetensors.torch import save_file
    save_file(sd, d / "sd.safetensors")
    torch.save({"state_dict": sd, "global_step": 7}, d / "sd.ckpt")
    return sd, d


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_initial_model_predicts_exactly_what_plain_sd_predicts(sd_files, tmp_path, fmt, variant, capsys):
    sd, d = sd_files
    out = tmp_path / f"init_{variant}.safetensors"
    assert tool.main([str(d / f"sd.{fmt}"), str(out), "--config", str(TINY_CONFIG), "--variant", variant]) == 0
    printed = capsys.readouterr().out
    assert "widened (zero new inputs): model.diffusion_model.input_blocks.0.0.weight, control_model." in printed
    state = load_file(out)
    model = create_model(load_config(TINY_CONFIG, [f"model.color_variant={variant}"])).eval()
    model.load_state_dict(state, strict=True)
    # SD tensors are copied bit for bit; the ControlNet encoder starts as the UNet encoder.
    for k, v in sd.items():
        if not k.endswith("input_blocks.0.0.weight"):
            assert torch.equal(state[k], v), k
    w = state["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(w[:, :4], sd["model.diffusion_model.input_blocks.0.0.weight"])
    assert torch.count_nonzero(w[:, 4:]) == 0
    # every ControlNet tensor with a UNet twin is that twin (the input conv widened like the
    # UNet's); only the hint block, the zero convs and the middle block's zero conv are new
    copied, new = [], []
    for k, v in state.items():
        if not k.startswith("control_model."):
            continue
        twin = "model.diffusion_model." + k[len("control_model."):]
        if twin not in sd:
            new.append(k)
        elif k.endswith("input_blocks.0.0.weight"):
            assert torch.equal(v, w), k
        else:
            assert torch.equal(v, sd[twin]), k
            copied.append(k)
    assert {k.split(".")[1] for k in copied} == {"input_blocks", "middle_block", "time_embed"}
    assert {k.split(".")[1] for k in new} == {"input_hint_block", "zero_convs", "middle_block_out"}

    plain = UNetModel(**{k: v for k, v in load_config(TINY_CONFIG).model.unet.items()}, in_channels=4,
                      out_channels=4).eval()
    plain.load_state_dict(sub_state(sd, "model.diffusion_model."))
    torch.manual_seed(1)
    x_t, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999, 37]), torch.randn(2, 77, 32)
    with torch.no_grad():
        cond = model.prepare_condition(torch.rand(2, 4, 64, 64), context=ctx)
        assert cond.concat is not None and cond.concat.abs().sum() > 0
        ours, reference = model.apply_model(x_t, t, cond), plain(x_t, t, ctx)
    assert ours.abs().max() > 0.02  # a non-trivial prediction (typical max ~0.1)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)  # float32 round-off only


def test_existing_output_is_kept_without_overwrite(sd_files, tmp_path, capsys):
    _, d = sd_files
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"


def test_an_output_another_run_writes_meanwhile_is_kept_without_overwrite(sd_files, tmp_path, capsys, monkeypatch):
    """Two runs started together both passed the check before the load; the second used to
    replace the first's file, both exiting 0. A file that appears before the write is kept now,
    in one line naming it, and no temporary file is left; --overwrite replaces it."""
    _, d = sd_files
    out = tmp_path / "o.safetensors"
    load = tool.load_state_dict

    def meanwhile(*a, **k):  # as this run loads the SD file, the other writes the output
        out.write_bytes(b"the other run's")
        return load(*a, **k)

    monkeypatch.setattr(tool, "load_state_dict", meanwhile)
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG)]) == 2
    assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: {out} exists: written by another run "
                                       "meanwhile (use --overwrite to replace it); this one was not written\n")
    assert out.read_bytes() == b"the other run's" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG), "--overwrite"]) == 0
    assert len(load_state_dict(out)) > 100


def test_wrong_architecture_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file
    other = tiny_sd_state(overrides=["model.unet.context_dim=16"])  # like SD1.x vs SD2.x: other context width
    save_file(other, tmp_path / "other.safetensors")
    out = tmp_path / "o.safetensors"
    assert tool.main([str(tmp_path / "other.safetensors"), str(out), "--config", str(TINY_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match" in err and "attn2.to_k.weight" in err
    assert not out.exists()


def test_truncated_file_is_refused(sd_files, tmp_path, capsys):
    _, d = sd_files
    data = (d / "sd.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    assert tool.main([str(bad), str(tmp_path / "o.safetensors"), "--config", str(TINY_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert "cut.safetensors" in err and err.count("\n") == 1


class _System:
    """Unpickling this runs a shell command through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_pickle_is_not_executed_and_named(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as f:  # a plain pickle (not torch.save), protocol 4, as a hand-made exploit would be
        pickle.dump({"state_dict": {"x": _System(str(marker))}}, f, protocol=4)
    assert tool.main([str(bad), str(tmp_path / "o.safetensors"), "--config", str(TINY_CONFIG)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert err == (f"tool_add_control_sd21.py: error: {bad}: holds pickled Python objects ({os.system.__module__}.system), not just tensors, "
                   f"and unpickling could run code; convert it with `python -m cldm.checkpoint convert {bad} "
                   f"OUT.safetensors --allow-pickle` (or pass --allow-pickle where the script offers it), only if you "
                   "trust the file\n")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("name", ["o.bin", "o.pt", "o"])
def test_output_suffix_is_checked_before_loading(tmp_path, capsys, name):
    missing = tmp_path / "not_there.safetensors"  # never opened: the suffix error comes first
    assert tool.main([str(missing), str(tmp_path / name), "--config", str(TINY_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert err == f"tool_add_control_sd21.py: error: {tmp_path / name}: output must end in .safetensors (recommended) or .ckpt\n"


def test_sd1x_file_is_named_as_such(tmp_path, capsys):
    from safetensors.torch import save_file
    sd1 = tiny_sd_state(overrides=["model.unet.context_dim=768"])  # SD1.x's cross-attention width
    sd1 = {k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}
    sd1["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)  # CLIP ViT-L
    save_file(sd1, tmp_path / "sd15.safetensors")
    assert tool.main([str(tmp_path / "sd15.safetensors"), str(tmp_path / "o.safetensors"),
                      "--config", str(TINY_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"tool_add_control_sd21.py: error: {tmp_path / 'sd15.safetensors'}: SD1.x weights "
                          "(768-wide cross-attention and a CLIP ViT-L text encoder), not Stable Diffusion 2.x: this "
                          "model needs SD2.x weights such as v2-1_512-ema-pruned (")
    assert "attn2.to_k.weight: file (32, 768) vs model (32, 32))\n" in err
    assert len(err) - len(str(tmp_path)) < 360  # 341; was ~900 characters: five problems listed


def test_ckpt_output_round_trip_and_half_precision_keeps_the_schedule_float32(sd_files, tmp_path):
    _, d = sd_files
    args = ["--config", str(TINY_CONFIG), "--variant", "v2"]
    assert tool.main([str(d / "sd.safetensors"), str(tmp_path / "init.safetensors"), *args]) == 0
    assert tool.main([str(d / "sd.safetensors"), str(tmp_path / "init.ckpt"), *args]) == 0
    st, ck = load_file(tmp_path / "init.safetensors"), load_state_dict(tmp_path / "init.ckpt")
    raw = torch.load(tmp_path / "init.ckpt", weights_only=True)  # weights only: no pickled objects in it
    meta = dict(raw["metadata"])
    recorded = OmegaConf.create(meta.pop("config"))
    assert meta == {"color_variant": "v2", "parameterization": "eps", "source": "sd.safetensors",
                    "made_by": "tool_add_control_sd21.py"}
    # the whole config it was made with: later tools (latent cache, training) take it without --config
    assert recorded == load_config(TINY_CONFIG, ["model.color_variant=v2"])
    assert resolve_config(tmp_path / "init.ckpt") == recorded == resolve_config(tmp_path / "init.safetensors")
    assert st.keys() == ck.keys() and all(torch.equal(st[k], ck[k]) for k in st)  # same seed, same tensors
    model = create_model(load_config(TINY_CONFIG, ["model.color_variant=v2"]))
    model.load_state_dict(ck, strict=True)

    assert tool.main([str(d / "sd.ckpt"), str(tmp_path / "half.ckpt"), *args, "--dtype", "float16"]) == 0
    half = load_state_dict(tmp_path / "half.ckpt")
    schedule = {k for k in half if k in BUFFER_NAMES}
    assert len(schedule) == 13
    assert {half[k].dtype for k in schedule} == {torch.float32}
    assert all(torch.equal(half[k], st[k]) for k in schedule)  # bit for bit the float32 schedule
    assert {v.dtype for k, v in half.items() if k not in schedule} == {torch.float16}
    torch.testing.assert_close(half["control_model.input_blocks.1.0.in_layers.2.weight"].float(),
                               st["control_model.input_blocks.1.0.in_layers.2.weight"], rtol=1e-3, atol=1e-4)


def test_usage_errors_and_ctrl_c_are_one_line(sd_files, tmp_path, capsys, monkeypatch):
    _, d = sd_files
    with pytest.raises(SystemExit) as e:
        tool.main([str(d / "sd.safetensors"), str(tmp_path / "o.safetensors"), "--variant", "v4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tool_add_control_sd21.py: error: argument --variant: invalid choice: 'v4'")
    assert err.count("\n") == 1
    out = tmp_path / "no" / "such" / "folder" / "o.safetensors"  # refused before the (slow) load
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert err == f"tool_add_control_sd21.py: error: {out}: there is no folder {out.parent}\n"
    # overrides may follow the options
    assert tool.main([str(d / "sd.safetensors"), str(tmp_path / "i.safetensors"), "--config", str(TINY_CONFIG),
                      "model.concat_to_unet=false"]) == 0
    capsys.readouterr()

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(tool, "load_state_dict", interrupted)
    assert tool.main([str(d / "sd.safetensors"), str(tmp_path / "o.safetensors"), "--config", str(TINY_CONFIG)]) == 130
    assert capsys.readouterr().err == "tool_add_control_sd21.py: interrupted\n"
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("dtype, less", [
    ("float32", "; --dtype float16 needs about a third of the memory (BENCHMARKS.md)"), ("float16", "")])
def test_out_of_memory_is_one_line_naming_the_cheaper_dtype(sd_files, tmp_path, capsys, monkeypatch, dtype, less):
    _, d = sd_files
    sd, out = d / "sd.safetensors", tmp_path / "o.safetensors"

    def fails(message):
        def init_from_sd(*a, **kw):
            raise RuntimeError(message)
        monkeypatch.setattr(tool, "init_from_sd", init_from_sd)

    fails("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
          "allocate 3460300800 bytes. Error code 12 (Cannot allocate memory)")
    assert tool.main([str(sd), str(out), "--config", str(TINY_CONFIG), "--dtype", dtype]) == 2
    assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: out of memory (RAM) making {out} from {sd}"
                                       f"{less}; nothing was written\n")
    assert not out.exists()
    fails("a bug")
    with pytest.raises(RuntimeError, match="^a bug$"):
        tool.main([str(sd), str(out), "--config", str(TINY_CONFIG)])


def test_piped_into_a_reader_that_has_gone_it_ends_quietly_and_the_file_stays(sd_files, tmp_path):
    """`tool_add_control_sd21.py SD OUT | head`, the reader gone before the report: exit 141 as a
    Unix tool ended by SIGPIPE, no "Exception ignored ... BrokenPipeError" at exit, and OUT,
    written before the report, stays. (With stdout unbuffered the report's print meets the closed
    pipe, and ends the same way: tests/test_cliutil.py.)"""
    _, d = sd_files
    out = tmp_path / "init.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, Python's default
    proc = subprocess.Popen([sys.executable, tool.__file__, str(d / "sd.safetensors"), str(out), "--config",
                             str(TINY_CONFIG)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert (proc.returncode, err) == (141, "")
    assert any(k.startswith("control_model.") for k in load_file(out)) and sorted(os.listdir(tmp_path)) == [out.name]


def test_an_sd_file_named_768_under_an_eps_config_gets_a_note(sd_files, tmp_path, capsys):
    """768-v has 512-base's tensors to the last shape, so only the file's name can hint at it."""
    import shutil

    named = tmp_path / "v2-1_768-ema-pruned.safetensors"
    shutil.copy(sd_files[1] / "sd.safetensors", named)
    base = [str(named), "--config", str(TINY_CONFIG)]
    assert tool.main([*base, str(tmp_path / "a.safetensors")]) == 0
    assert capsys.readouterr().err == (
        "tool_add_control_sd21.py: note: v2-1_768-ema-pruned.safetensors: the name of SD2.1 768-v, which predicts v, "
        "but the config predicts eps (512-base); the file cannot tell which it is: for 768-v use a config with "
        "model.parameterization=v (and train and sample at 768)\n")
    assert tool.main([*base, str(tmp_path / "b.safetensors"), "model.parameterization=v"]) == 0
    assert tool.main([str(sd_files[1] / "sd.safetensors"), str(tmp_path / "c.safetensors"), "--config",
                      str(TINY_CONFIG)]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("declares, says", [
    ({"modelspec.prediction_type": "v"}, "its metadata (modelspec.prediction_type: v)"),
    ({"ss_v_parameterization": "True"}, "its metadata (ss_v_parameterization: True)"),
    ("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n",
     "ft.yaml beside it (model.params.parameterization: v)"),
])
def test_an_sd_file_that_declares_v_prediction_is_refused_under_an_eps_config(sd_files, tmp_path, capsys, declares,
                                                                                says):
    """A v-prediction fine-tune not named 768 passed without a word, and then trained as eps (its
    every prediction misread). What it says of itself: Stability's model spec, kohya's key, or the
    SD-layout YAML such files come with."""
    from safetensors.torch import save_file

    ft = tmp_path / "ft.safetensors"
    if isinstance(declares, dict):
        save_file(sd_files[0], ft, metadata=declares)
    else:
        save_file(sd_files[0], ft)
        ft.with_suffix(".yaml").write_text(declares)
    out = tmp_path / "init.safetensors"
    assert tool.main([str(ft), str(out), "--config", str(TINY_CONFIG)]) == 2
    assert capsys.readouterr().err == (
        f"tool_add_control_sd21.py: error: {ft} predicts v, says {says}, but the config predicts eps (SD2.1 768-v or "
        "a v-prediction fine-tune: set model.parameterization=v and train and sample at 768)\n")
    assert not out.exists()
    assert tool.main([str(ft), str(out), "--config", str(TINY_CONFIG), "model.parameterization=v"]) == 0
    assert load_file_metadata(out)["parameterization"] == "v"
    eps = tmp_path / "eps_768.safetensors"  # a name with 768 in it, declared eps: no note either
    save_file(sd_files[0], eps, metadata={"modelspec.prediction_type": "epsilon"})
    capsys.readouterr()
    assert tool.main([str(eps), str(tmp_path / "e.safetensors"), "--config", str(TINY_CONFIG)]) == 0
    assert capsys.readouterr().err == ""
    assert tool.main([str(eps), str(tmp_path / "f.safetensors"), "--config", str(TINY_CONFIG),
                      "model.parameterization=v"]) == 2
    assert "predicts eps, says its metadata (modelspec.prediction_type: epsilon), but the config predicts v (set " \
           "model.parameterization=eps)" in capsys.readouterr().err


UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
@pytest.mark.parametrize("task, change", [
    ("inpainting weights (9 input channels: latent, mask, masked image)", {UNET_INPUT: (32, 9, 3, 3)}),
    ("depth weights (5 input channels: latent, depth map)", {UNET_INPUT: (32, 5, 3, 3)}),
    ("unCLIP weights (an image-embedding input, label_emb)", {"model.diffusion_model.label_emb.0.0.weight": (8, 8)}),
])
def test_sd2_weights_of_another_task_are_refused_by_name(sd_files, tmp_path, capsys, variant, task, change):
    """An SD2 inpainting UNet's 9 inputs are v2's count: its mask and masked-image kernels were
    copied as they are and read the reference latent and the gray (v3 and depth: widened, the
    depth kernel on the first reference channel), without a word; unCLIP's label_emb was ignored."""
    from safetensors.torch import save_file

    path = tmp_path / "other_task.safetensors"
    save_file({**sd_files[0], **{k: torch.ones(shape) for k, shape in change.items()}}, path)
    out = tmp_path / "init.safetensors"
    assert tool.main([str(path), str(out), "--config", str(TINY_CONFIG), "--variant", variant]) == 2
    assert capsys.readouterr().err == (
        f"tool_add_control_sd21.py: error: {path}: unknown SD variant (context dim 32) {task}, not the text-to-image "
        "Stable Diffusion 2.1 this model starts from (its extra inputs would read the colour inputs as theirs): use "
        "v2-1_512-ema-pruned\n")
    assert not out.exists()


def test_its_own_v_init_is_refused_as_a_controlnet_not_told_to_set_v(sd_files, tmp_path, capsys):
    """An init of this tool records its parameterization: under an eps config the advice was to set
    model.parameterization=v, which then only led to the real refusal."""
    init = tmp_path / "init_v.safetensors"
    assert tool.main([str(sd_files[1] / "sd.safetensors"), str(init), "--config", str(TINY_CONFIG),
                      "model.parameterization=v"]) == 0
    capsys.readouterr()
    assert tool.main([str(init), str(tmp_path / "again.safetensors"), "--config", str(TINY_CONFIG)]) == 2
    assert "already a ControlNet/colour checkpoint" in capsys.readouterr().err


def test_another_tasks_safetensors_is_refused_before_its_load(sd_files, tmp_path, capsys, monkeypatch):
    """The header holds the input conv's shape: a multi-GB inpainting file is not loaded first."""
    from safetensors.torch import save_file

    path = tmp_path / "inpaint.safetensors"
    save_file({**sd_files[0], UNET_INPUT: torch.ones(32, 9, 3, 3)}, path)
    monkeypatch.setattr(tool, "load_state_dict", lambda *a, **k: pytest.fail("loaded"))
    assert tool.main([str(path), str(tmp_path / "init.safetensors"), "--config", str(TINY_CONFIG)]) == 2
    assert "inpainting weights (9 input channels" in capsys.readouterr().err


def test_a_diffusers_file_is_named_as_such_not_listed_as_534_problems(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(4)}, path)
    assert tool.main([str(path), str(tmp_path / "init.safetensors"), "--config", str(TINY_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tool_add_control_sd21.py: error: {path}: diffusers format (down_blocks.*, ...), not the "
                          "single-file original format these tools read (model.diffusion_model.*, as in SD2.1's "
                          "v2-1_512-ema-pruned.safetensors) ("), err


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_help_explains_768_v(capsys):
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "SD2.1-768-v (v2-1_768-ema-pruned) has exactly the same tensor names and shapes as 512-base" in text
    assert "`parameterization: v`" in text


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_a_controlnet_checkpoint_is_refused_not_reinitialised(tmp_path, capsys, monkeypatch, fmt):
    """The toy model's trained control_model.* would be replaced by a copy of its UNet encoder."""
    from cldm.config import REPO

    toy = REPO / "models" / "toy" / "toy_color_v2.safetensors"
    src = toy
    if fmt == "ckpt":
        src = tmp_path / "toy.ckpt"
        torch.save({"state_dict": load_file(toy)}, src)
    else:  # the header tells: refused before the tensors are read
        monkeypatch.setattr(tool, "load_state_dict", lambda *a, **kw: pytest.fail("loaded the file"))
    out = tmp_path / "o.safetensors"
    assert tool.main([str(src), str(out), "--config", str(TINY_CONFIG)]) == 2
    assert capsys.readouterr().err == (
        f"tool_add_control_sd21.py: error: {src}: already a ControlNet/colour checkpoint (ours: colour ControlNet "
        "v2 on unknown SD variant (context dim 32)), whose control_model.* weights this tool would replace; it "
        "takes a plain Stable Diffusion 2.1 file such as v2-1_512-ema-pruned.safetensors\n")
    assert not out.exists()


def test_seed_draws_the_hint_blocks_init(sd_files, tmp_path):
    """--seed decides the new layers' random init: equal seeds give equal files, another seed
    another hint block (the SD part is the file's either way)."""
    _, d = sd_files
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert tool.main([str(d / "sd.safetensors"), str(tmp_path / f"{name}.safetensors"), "--config",
                          str(TINY_CONFIG), "--variant", "v2", "--seed", str(seed)]) == 0
        out[name] = load_file(tmp_path / f"{name}.safetensors")
    drawn = [k for k in out["a"] if k.startswith("control_model.input_hint_block.") and out["a"][k].any()]
    assert len(drawn) == 14  # 7 convs, weight and bias (the 8th, zero-initialised, is left out)
    assert all(torch.equal(out["a"][k], out["b"][k]) for k in out["a"])
    assert not any(torch.equal(out["a"][k], out["c"][k]) for k in drawn)
    assert all(torch.equal(out["a"][k], out["c"][k]) for k in out["a"] if k.startswith("model."))
    # and the caller's random numbers are its own (add_control seeded torch's global RNG)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tool.add_control(d / "sd.safetensors", tmp_path / "d.safetensors", TINY_CONFIG, seed=5)
    assert torch.equal(torch.rand(3), expected)


def _disk(free: int):
    return lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free)


@pytest.mark.parametrize("fmt, error", [
    ("safetensors", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ("ckpt", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 0"))])
def test_a_disk_filling_during_the_write_is_one_line(sd_files, tmp_path, capsys, monkeypatch, fmt, error):
    """What safetensors and torch.save raise when the disk fills mid-write (torch's says nothing
    of the cause: the free space, checked again, does)."""
    _, d = sd_files
    out = tmp_path / f"o.{fmt}"
    calls = []

    def full(*a, **kw):
        calls.append(1)
        monkeypatch.setattr(shutil, "disk_usage", _disk(1000))  # filled up by the write
        raise error

    monkeypatch.setattr(checkpoint, "save_state_dict", full)
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG)]) == 2
    assert calls == [1] and capsys.readouterr().err == (
        f"tool_add_control_sd21.py: error: {out}: cannot write the checkpoint: no space left on device "
        "(or disk quota exceeded); nothing was written\n")


def test_too_little_free_space_is_refused_before_writing(sd_files, tmp_path, capsys, monkeypatch):
    _, d = sd_files
    out = tmp_path / "o.safetensors"
    monkeypatch.setattr(shutil, "disk_usage", _disk(2 * 2**20))
    monkeypatch.setattr(checkpoint, "save_state_dict", lambda *a, **kw: pytest.fail("started writing"))
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"tool_add_control_sd21.py: error: {re.escape(str(out))}: no space left on device \(the "
                        r"checkpoint needs \d+\.\d MiB, 2\.0 MiB are free\)\n", err), err
    assert not out.exists()


@pytest.mark.parametrize("how", ["same", "symlink"])
def test_output_that_is_the_input_is_refused_even_with_overwrite(sd_files, tmp_path, capsys, how):
    _, d = sd_files
    src = tmp_path / "sd.safetensors"
    src.write_bytes((d / "sd.safetensors").read_bytes())
    before = src.read_bytes()
    out = src if how == "same" else tmp_path / "link.safetensors"
    if how == "symlink":
        out.symlink_to(src)
    assert tool.main([str(src), str(out), "--config", str(TINY_CONFIG), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: {out}: is the input checkpoint {src} "
                                       "itself; write to another file\n")
    assert src.read_bytes() == before


def test_output_checks_before_the_load(sd_files, tmp_path, capsys, monkeypatch):
    """Each was met only after the (slow) load of a multi-GB file, or named wrongly."""
    _, d = sd_files
    monkeypatch.setattr(tool, "load_state_dict", lambda *a, **kw: pytest.fail("loaded the file"))
    sd, cfg = str(d / "sd.safetensors"), ["--config", str(TINY_CONFIG)]
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert tool.main([sd, str(folder), *cfg, "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: {folder}: is a folder; give a file "
                                       "name for the output\n")
    new = f"{tmp_path / 'new'}/x.safetensors/"  # was written as the file new/x.safetensors
    assert tool.main([sd, new, *cfg]) == 2
    assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: {new}: ends in '/', as a folder's name "
                                       "does; give a file name for the output\n")
    assert not (tmp_path / "new").exists()
    readme = tmp_path / "README.md"
    readme.write_text("x")
    assert tool.main([sd, str(readme / "o.safetensors"), *cfg]) == 2
    assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: {readme / 'o.safetensors'}: {readme} "
                                       "is a file, not a folder\n")
    ro = read_only_folder(tmp_path / "ro", monkeypatch)  # was an OSError at the write, after the load
    assert tool.main([sd, str(ro / "o.safetensors"), *cfg]) == 2
    assert capsys.readouterr().err == f"tool_add_control_sd21.py: error: {ro / 'o.safetensors'}: {ro} is not writable\n"
    out = str(tmp_path / "o.safetensors")
    assert tool.main([sd, out, *cfg, "--variant", "v3", "model.color_variant=v1"]) == 2
    assert capsys.readouterr().err == ("tool_add_control_sd21.py: error: --variant v3 contradicts the override "
                                       "model.color_variant=v1; give one of them\n")
    for seed in ("99999999999999999999", "-1"):
        with pytest.raises(SystemExit) as e:
            tool.main([sd, out, *cfg, "--seed", seed])
        assert e.value.code == 2
        assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: argument --seed: must be in "
                                           f"0..18446744073709551615 (got {seed}) (see --help)\n")


def test_agreeing_variant_and_override_and_the_largest_seed_work(sd_files, tmp_path):
    _, d = sd_files
    out = tmp_path / "o.safetensors"
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG), "--variant", "v2",
                      "model.color_variant=v2", "--seed", str(2**64 - 1)]) == 0
    assert load_file(out)["model.diffusion_model.input_blocks.0.0.weight"].shape[1] > 4  # v2 widens the input


def test_help_shows_the_seed_default(capsys):
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    assert "0..18446744073709551615 (default: 0)" in " ".join(capsys.readouterr().out.split())


def test_the_schedule_and_parameterization_are_the_configs(tmp_path, monkeypatch):
    """An SD file without the schedule buffers gets the config's (its timesteps, linear_start and
    linear_end), not SD2.1's; the file records the config's parameterization; the whole model is
    built on the meta device (shapes only: SD2.1's 1.2 G parameters would be drawn for nothing)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from ldm.schedule import schedule_buffers

    sd = {k: v for k, v in tiny_sd_state().items() if k not in BUFFER_NAMES}
    save_file(sd, tmp_path / "bare.safetensors")
    out = tmp_path / "o.safetensors"
    devices, real = [], tool.create_model
    monkeypatch.setattr(tool, "create_model", lambda cfg: devices.append(torch.get_default_device()) or real(cfg))
    assert tool.main([str(tmp_path / "bare.safetensors"), str(out), "--config", str(TINY_CONFIG),
                      "model.schedule.timesteps=40", "model.schedule.linear_start=0.001",
                      "model.schedule.linear_end=0.02", "model.parameterization=v"]) == 0
    assert devices == [torch.device("meta")]
    state, want = load_file(out), schedule_buffers("linear", 40, 0.001, 0.02)
    assert all(torch.equal(state[k], want[k]) for k in BUFFER_NAMES)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["parameterization"] == "v"


def test_metadata_without_variant_and_the_dtypes(sd_files, tmp_path):
    """No --variant: the config's colour variant is recorded; bfloat16 is bfloat16, not float16."""
    _, d = sd_files
    out = tmp_path / "o.safetensors"
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG), "--dtype", "bfloat16"]) == 0
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["color_variant"] == load_config(TINY_CONFIG).model.color_variant == "v2"
    state = load_file(out)
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.bfloat16
    assert {state[k].dtype for k in BUFFER_NAMES} == {torch.float32}


def test_allow_pickle_is_passed_to_the_loader(sd_files, tmp_path, capsys):
    import argparse

    sd, _ = sd_files
    src = tmp_path / "hparams.ckpt"  # a Lightning-style file: tensors plus pickled hyper-parameters
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4)}, src)
    argv = [str(src), str(tmp_path / "o.safetensors"), "--config", str(TINY_CONFIG)]
    assert tool.main(argv) == 2
    assert "holds pickled Python objects (argparse.Namespace)" in capsys.readouterr().err
    assert tool.main([*argv, "--allow-pickle"]) == 0
    assert torch.equal(load_file(tmp_path / "o.safetensors")["model.diffusion_model.out.2.weight"],
                       sd["model.diffusion_model.out.2.weight"])


def test_the_free_space_needed_is_the_checkpoints_bytes(sd_files, tmp_path, capsys, monkeypatch):
    """Exactly the bytes of the tensors written: one byte less is refused, naming them in MiB."""
    _, d = sd_files
    argv = [str(d / "sd.safetensors"), str(tmp_path / "o.safetensors"), "--config", str(TINY_CONFIG)]
    assert tool.main(argv) == 0
    capsys.readouterr()
    need = sum(t.numel() * t.element_size() for t in load_file(tmp_path / "o.safetensors").values())
    assert need > 2**20
    monkeypatch.setattr(shutil, "disk_usage", _disk(need - 1))
    assert tool.main([*argv, "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: {tmp_path / 'o.safetensors'}: no space left "
                                       f"on device (the checkpoint needs {need / 2**20:.1f} MiB, "
                                       f"{(need - 1) / 2**20:.1f} MiB are free)\n")
    monkeypatch.setattr(shutil, "disk_usage", _disk(need))
    assert tool.main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.EDQUOT, "write failed"), "no space left on device (or disk quota exceeded)"),
    (SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"),
     "no space left on device (or disk quota exceeded)"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0"),
     "RuntimeError: [enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0")])
def test_a_failed_write_says_why(sd_files, tmp_path, capsys, monkeypatch, error, reason):
    """A quota by its errno or its words is a full disk; another failure (the disk not full) is
    named with its type."""
    _, d = sd_files
    out = tmp_path / "o.safetensors"

    def fails(*a, **kw):
        raise error
    monkeypatch.setattr(checkpoint, "save_state_dict", fails)
    assert tool.main([str(d / "sd.safetensors"), str(out), "--config", str(TINY_CONFIG)]) == 2
    assert capsys.readouterr().err == (f"tool_add_control_sd21.py: error: {out}: cannot write the checkpoint: "
                                       f"{reason}; nothing was written\n")


def test_the_arguments_are_checked_in_full(sd_files, tmp_path, capsys, monkeypatch):
    """A --seed that is no number, an override without '=', a variant named twice in the overrides,
    an existing output (the remedy named), all before the load; and add_control's own seed check."""
    _, d = sd_files
    monkeypatch.setattr(tool, "load_state_dict", lambda *a, **kw: pytest.fail("loaded the file"))
    sd, out, cfg = str(d / "sd.safetensors"), tmp_path / "o.safetensors", ["--config", str(TINY_CONFIG)]
    assert refused(tool.main, [sd, str(out), *cfg, "--seed", "x"], capsys) == (
        "tool_add_control_sd21.py: error: argument --seed: expected an integer, got 'x' (see --help)\n")
    assert refused(tool.main, [sd, str(out), *cfg, "nokey"], capsys) == (
        "tool_add_control_sd21.py: error: argument key=value: override must look like key=value, got 'nokey' "
        "(see --help)\n")
    assert refused(tool.main, [sd, str(out), *cfg, "--variant", "v2", "model.color_variant=v2",
                               "model.color_variant=v3"], capsys) == (
        "tool_add_control_sd21.py: error: --variant v2 contradicts the override model.color_variant=v3; give one of "
        "them\n")
    assert tool.variant_overrides("v2", ["model.color_variant= v2"])[-1] == "model.color_variant=v2"
    out.write_bytes(b"keep me")
    assert refused(tool.main, [sd, str(out), *cfg], capsys) == (
        f"tool_add_control_sd21.py: error: {out} exists (use --overwrite to replace it)\n")
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=rf"^--seed must be in 0\.\.18446744073709551615 \(got {seed}\)$"):
            tool.add_control(sd, tmp_path / "p.safetensors", TINY_CONFIG, seed=seed)


def test_header_shapes_reads_safetensors_files_alone(sd_files, tmp_path):
    """A .safetensors header gives every name and shape; a file of another suffix gives nothing,
    even one holding safetensors bytes (the loader names that), as does a missing file."""
    sd, d = sd_files
    shapes = tool.header_shapes(d / "sd.safetensors")
    assert shapes == {k: list(v.shape) for k, v in sd.items()}
    misnamed = tmp_path / "sd.ckpt"
    misnamed.write_bytes((d / "sd.safetensors").read_bytes())
    assert tool.header_shapes(misnamed) == {} == tool.header_shapes(tmp_path / "missing.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_header_shapes_opens_no_named_pipe_or_folder(tmp_path, monkeypatch):
    """Only a regular file's header is read: opening a named pipe called x.safetensors blocks
    until something writes to it, before the loader could refuse it in one line."""
    opened = []

    def spy(path, *args, **kwargs):
        opened.append(path)
        raise AssertionError("opened")
    monkeypatch.setattr(tool, "safe_open", spy)
    os.mkfifo(tmp_path / "pipe.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    assert tool.header_shapes(tmp_path / "pipe.safetensors") == {} == tool.header_shapes(tmp_path / "folder.safetensors")
    assert opened == []
