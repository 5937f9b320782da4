"""tools/make_toy_model.py: the recipe of the embedded toy model, and the shipped model itself."""
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cldm.checkpoint import load_state_dict
from colorize import loading as L
from tests.helpers import ctrl_c_while_importing, missing_under, named_pipe, refused

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "toy" / "toy_color_v2.safetensors"


def load_recipe():
    spec = importlib.util.spec_from_file_location("make_toy_model", REPO / "tools" / "make_toy_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = load_recipe()


def provenance(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["provenance"])


def test_chroma_rotation_keeps_the_gray_and_turns_the_hue():
    frames = torch.rand(2, 3, 8, 16, generator=torch.Generator().manual_seed(0))
    gray = recipe.gray_of(frames)
    torch.testing.assert_close(recipe.rotate_chroma(frames, 0.0), frames, rtol=0, atol=1e-6)
    turned = recipe.rotate_chroma(frames, math.pi / 2)
    torch.testing.assert_close(recipe.gray_of(turned), gray, rtol=0, atol=1e-6)
    assert (turned - frames).abs().mean() > 0.05
    assert turned.min() >= 0 and turned.max() <= 1
    # pure red (Cr only) turned by 180 degrees has negative Cr: more green/blue than red
    red = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1)
    flipped = recipe.rotate_chroma(red, math.pi).flatten()
    assert flipped[0] < flipped[1] and flipped[0] < flipped[2]


def test_short_run_writes_a_loadable_model_with_its_provenance(tmp_path):
    threads = torch.get_num_threads()
    try:
        prov = recipe.make_toy_model(tmp_path, vae_steps=2, diff_steps=2, train_frames=24, threads=1)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path / "toy_color_v2.safetensors"
    assert provenance(path) == prov
    assert prov["vae_steps"] == 2 and prov["diffusion_steps"] == 2 and prov["hue_rotations"] == recipe.HUES
    assert math.isfinite(prov["vae_loss"]) and math.isfinite(prov["diffusion_loss"])
    assert (tmp_path / "toy_color_v2.yaml").is_file()
    # both written under temporary names and renamed: nothing else left
    assert sorted(f.name for f in tmp_path.iterdir()) == ["toy_color_v2.safetensors", "toy_color_v2.yaml"]
    model = L.load_model(path, device=torch.device("cpu"))  # config found beside it
    assert model.scale_factor == pytest.approx(prov["scale_factor"])
    # the check against a shipped model compares both recorded losses with the tolerance
    assert recipe.check_against(prov, recipe.shipped_provenance(path)) == []
    worse = dict(prov, diffusion_loss=prov["diffusion_loss"] * (1 + 2 * recipe.LOSS_TOLERANCE))
    assert [m.split(":")[0] for m in recipe.check_against(worse, recipe.shipped_provenance(path))] == ["diffusion_loss"]


def test_shipped_toy_model_is_small_complete_and_documented():
    assert SHIPPED.stat().st_size < 16 * 2**20
    prov = provenance(SHIPPED)
    for key in ("data", "data_sha256", "seed", "vae_steps", "diffusion_steps", "hue_rotations", "vae_loss",
                "diffusion_loss", "commit", "torch", "train_seconds"):
        assert key in prov, key
    assert prov["vae_steps"] == 1500 and prov["diffusion_steps"] == 3000  # the recipe's defaults
    sd = load_state_dict(SHIPPED)
    model = L.load_model(SHIPPED, device=torch.device("cpu"))
    assert set(sd) == set(model.state_dict())


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_reproduction_with_defaults_matches_the_shipped_losses(tmp_path):
    """The full recipe (40-60 min on 2 cores): its losses land within LOSS_TOLERANCE of the shipped ones."""
    prov = recipe.make_toy_model(tmp_path)
    assert recipe.check_against(prov, recipe.shipped_provenance(SHIPPED)) == []


def test_help_prints(capsys):
    """The --check help's percent sign once crashed argparse's formatting ('%' starts a code)."""
    with pytest.raises(SystemExit) as e:
        recipe.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(beyond 10 %: exit 1, the model made kept in --out)" in out and "by default (or 0) one per core" in out
    assert "the shipped model was trained with 1" in out and "--overwrite" in out


@pytest.mark.parametrize("argv, says", [
    (["--check", "MISSING/toy.safetensors"], "--check MISSING/toy.safetensors: no such file"),
    (["--check", "README.md"], "--check README.md: not a readable safetensors model"),
    (["--vae-steps", "0"], "argument --vae-steps: expected an integer >= 1"),
    (["--diffusion-steps", "-1"], "argument --diffusion-steps: expected an integer >= 1"),
    (["--threads", "-1"], "argument --threads: expected an integer >= 0"),
    (["--out", "README.md"], "README.md is a file, not a folder"),
    # an empty --out was the current folder: 40 minutes of training into wherever the shell stood
    (["--out", ""], "argument --out: empty path"),
    (["--check", ""], "argument --check: empty path"),
    (["--check", "docs"], "--check docs: is a folder"),  # was "not a readable safetensors model (No such device)"
    # torch.manual_seed's range (its "Overflow when unpacking long long" named no flag)
    (["--seed", str(2**64)], f"argument --seed: must be in 0..{2**64 - 1} (got {2**64})"),
    (["--seed", "-1"], f"argument --seed: must be in 0..{2**64 - 1} (got -1)"),
])
def test_bad_arguments_are_refused_before_training(argv, says, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(recipe, "make_toy_model", lambda *a, **k: pytest.fail("trained despite a bad argument"))
    out = [] if "--out" in argv else ["--out", str(tmp_path / "new")]
    argv, says = missing_under(tmp_path, argv, says)
    assert says in refused(recipe.main, argv + out, capsys)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_as_check_is_refused_unopened(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(recipe, "make_toy_model", lambda *a, **k: pytest.fail("trained despite a bad argument"))
    with named_pipe(tmp_path / "toy.safetensors") as pipe:  # safetensors' open blocked on it
        err = refused(recipe.main, ["--check", str(pipe), "--out", str(tmp_path / "new")], capsys)
    assert err == f"make_toy_model.py: error: --check {pipe}: not a regular file (a named pipe, socket or device)\n"


def no_training(monkeypatch) -> list:
    """Stand-ins for the training stages that record that they ran (a refusal must come first)."""
    ran = []
    for name in ("load_clip", "train_vae", "train_diffusion"):
        monkeypatch.setattr(recipe, name, lambda *a, name=name, **k: ran.append(name) or pytest.fail(f"{name} ran"))
    return ran


@pytest.mark.parametrize("present", [["toy_color_v2.safetensors"], ["toy_color_v2.yaml"],
                                     ["toy_color_v2.safetensors", "toy_color_v2.yaml"]])
def test_an_out_that_holds_the_model_is_refused_before_training(present, capsys, monkeypatch, tmp_path):
    """The default --out is the shipped models/toy/: a run without --out must not overwrite it."""
    ran = no_training(monkeypatch)
    for name in present:
        (tmp_path / name).write_bytes(b"shipped")
    err = refused(recipe.main, ["--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} already holds {' and '.join(present)}" in err and "--overwrite" in err
    assert ran == [] and all((tmp_path / n).read_bytes() == b"shipped" for n in present)


def test_the_default_out_is_the_shipped_model_and_is_refused(capsys, monkeypatch):
    ran = no_training(monkeypatch)
    before = SHIPPED.stat().st_mtime_ns
    err = refused(recipe.main, [], capsys)
    assert "toy_color_v2.safetensors and toy_color_v2.yaml" in err and "--overwrite" in err
    assert ran == [] and SHIPPED.stat().st_mtime_ns == before


def test_overwrite_lets_a_run_replace_the_model(monkeypatch, tmp_path):
    (tmp_path / "toy_color_v2.safetensors").write_bytes(b"old")
    calls = []
    monkeypatch.setattr(recipe, "make_toy_model", lambda out, *a, **k: calls.append(out) or {"name": "x"})
    assert recipe.main(["--out", str(tmp_path), "--overwrite"]) == 0
    assert calls == [tmp_path]
    # an empty or new folder needs no --overwrite
    assert recipe.main(["--out", str(tmp_path / "new")]) == 0
    assert calls == [tmp_path, tmp_path / "new"]


def test_check_reads_the_shipped_provenance_up_front():
    assert recipe.shipped_provenance(SHIPPED) == provenance(SHIPPED)


def test_check_compares_with_the_model_as_it_was_before_an_overwrite(monkeypatch, tmp_path, capsys):
    """--overwrite --check OUT/toy_color_v2.safetensors: the run replaces the file it is checked
    against, so its provenance is read before training (read after, the run passed against itself)."""
    import shutil

    from safetensors.torch import save_file
    target = tmp_path / "toy_color_v2.safetensors"
    shutil.copy(SHIPPED, target)
    poor = {"name": "toy_color_v2", "vae_loss": 0.5, "diffusion_loss": 0.9}

    def replaces_it(out, *args, **kwargs):
        save_file({"w": torch.zeros(1)}, out / target.name, metadata={"provenance": json.dumps(poor)})
        return poor
    monkeypatch.setattr(recipe, "make_toy_model", replaces_it)
    assert recipe.main(["--out", str(tmp_path), "--overwrite", "--check", str(target)]) == 1
    shipped = provenance(SHIPPED)
    assert capsys.readouterr().err.strip() == (
        f"make_toy_model.py: error: reproduction differs from the shipped model (vae_loss: 0.50000 vs shipped "
        f"{shipped['vae_loss']:.5f}; diffusion_loss: 0.90000 vs shipped {shipped['diffusion_loss']:.5f}); the model "
        f"made is kept in {tmp_path}")


def test_ctrl_c_while_the_libraries_load_is_one_line():
    """Seconds of imports (torch among them) before run_cli takes over: Ctrl-C there was a
    KeyboardInterrupt traceback out of the import."""
    done = ctrl_c_while_importing("torch", ["tools/make_toy_model.py", "--out", "toy_out_never_made"])
    assert (done.returncode, done.stderr) == (130, "make_toy_model.py: interrupted\n")



def test_load_clip_takes_frames_first_to_last_exclusive(monkeypatch):
    """[first, last): the frames after the training range are the held-out ones, never seen."""
    def frames(path):
        for i in range(10):
            yield i, f"{i:06d}", np.full((8, 12, 3), i, np.uint8)
    monkeypatch.setattr(recipe, "iter_frames", frames)
    clip = recipe.load_clip(Path("clip.mp4"), 2, 5, (4, 6))
    assert clip.shape == (3, 3, 4, 6)
    assert clip.amax(dim=(1, 2, 3)).mul(255).round().tolist() == [2, 3, 4]


def test_cosine_lr_warms_up_from_the_first_step_then_decays_to_the_floor():
    """Step 0 already trains (peak / warmup, not 0); after the warm-up a half cosine from the
    peak down to floor x peak at the last step."""
    lr = recipe.cosine_lr
    assert lr(0, 1100, 1.0) == pytest.approx(0.01) and lr(99, 1100, 1.0) == pytest.approx(1.0)
    assert lr(100, 1100, 1.0) == pytest.approx(1.0)
    assert lr(600, 1100, 1.0) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lr(1100, 1100, 2.0) == pytest.approx(0.2)


def test_chroma_rotation_turns_the_cb_cr_plane_counterclockwise():
    """By +90 degrees (Cb, Cr) becomes (-Cr, Cb), as the angle's sign says; a small chroma stays
    in gamut, so nothing is shrunk."""
    from annotator.color import rgb_to_ycbcr

    pixel = torch.tensor([0.55, 0.5, 0.45]).view(1, 3, 1, 1)
    before = rgb_to_ycbcr(pixel.permute(0, 2, 3, 1).numpy()).ravel()
    after = rgb_to_ycbcr(recipe.rotate_chroma(pixel, math.pi / 2).permute(0, 2, 3, 1).numpy()).ravel()
    np.testing.assert_allclose(after, [before[0], -before[2], before[1]], atol=1e-6)


def test_tail_mean_is_the_mean_of_the_last_tenth_and_at_least_one_loss():
    """The recorded losses --check compares; a short run's is its last loss, not all of them."""
    assert recipe.tail_mean([float(i) for i in range(1, 21)]) == 19.5  # the last 2 of 20
    assert recipe.tail_mean([5.0, 1.0, 4.0]) == 4.0  # fewer than 10: the last one


def test_check_against_flags_a_loss_far_below_the_shipped_one_too():
    """A reproduction is within the tolerance either way: a much lower loss is not the recipe either."""
    ref = {"vae_loss": 0.1, "diffusion_loss": 0.2}
    assert recipe.check_against({"vae_loss": 0.105, "diffusion_loss": 0.19}, ref) == []
    assert recipe.check_against({"vae_loss": 0.05, "diffusion_loss": 0.2}, ref) == ["vae_loss: 0.05000 vs shipped "
                                                                                  "0.10000"]


@pytest.mark.parametrize("metadata", [None, {"config": "model: {}"}])
def test_check_of_a_safetensors_file_without_provenance_says_so(tmp_path, metadata):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata=metadata)
    with pytest.raises(ValueError, match=rf"^--check {re.escape(str(path))}: no provenance recorded \(not made by "
                                         r"this recipe\)$"):
        recipe.shipped_provenance(path)


def test_the_flags_and_their_defaults_reach_the_recipe(monkeypatch, tmp_path):
    """--seed included (a seed parsed and dropped reproduces seed 0); the defaults are the shipped model's."""
    calls = []
    monkeypatch.setattr(recipe, "make_toy_model", lambda *a, **k: calls.append((a, k)) or {"name": "x"})
    assert recipe.main(["--out", str(tmp_path / "a"), "--seed", "5", "--vae-steps", "3", "--diffusion-steps", "4",
                        "--threads", "2"]) == 0
    assert recipe.main(["--out", str(tmp_path / "b")]) == 0
    assert calls == [((tmp_path / "a", 5, 3, 4), {"threads": 2}), ((tmp_path / "b", 0, 1500, 3000), {"threads": None})]


@pytest.mark.parametrize("threads", [None, 0])
def test_threads_default_to_one_per_core(monkeypatch, tmp_path, threads):
    """As --help says: no --threads (or 0) is os.cpu_count(), set before the first stage."""
    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop
    monkeypatch.setattr(recipe, "load_clip", stop)
    monkeypatch.setattr(recipe.os, "cpu_count", lambda: 3)
    before = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            recipe.make_toy_model(tmp_path, threads=threads)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
