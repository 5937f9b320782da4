import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from annotator.build_many import build_all
from annotator.color import rgb_to_gray
from annotator.latent_cache import (
    LATENTS, LATENTS_META, LatentCacheError, build_latent_cache, load_latents, read_frame, vae_fingerprint,
)
from annotator.pairs import BuildOptions, frame_path
from tests.annotator.clips import panning_clip, write_folder

autoencoder = pytest.importorskip("ldm.modules.autoencoder", reason="ldm/modules/autoencoder.py not available")

REPO = Path(__file__).resolve().parents[2]
TINY = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                     "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                                     "attn_resolutions": [], "dropout": 0.0}}


def tiny_vae(seed: int):
    torch.manual_seed(seed)
    return autoencoder.AutoencoderKL(**TINY).eval()


N = 8  # frames


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A built movie, and a copy of it with latents cached by tiny_vae(0) (encoded once)."""
    tmp = tmp_path_factory.mktemp("latents")
    src = write_folder(panning_clip(N, 64, 160), tmp / "src" / "pan")
    build_all([src], tmp / "plain", BuildOptions(size=64, window=4), progress=False)
    shutil.copytree(tmp / "plain", tmp / "cached")
    result = build_latent_cache(tmp / "cached", tiny_vae(0), batch_size=5, progress=False)
    return tmp / "plain", tmp / "cached", result


@pytest.fixture
def root(built, tmp_path):
    shutil.copytree(built[0], tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def cached_root(built, tmp_path):
    shutil.copytree(built[1], tmp_path / "data")
    return tmp_path / "data"


def test_fingerprint_tracks_weights():
    a, b = tiny_vae(0), tiny_vae(0)
    assert vae_fingerprint(a) == vae_fingerprint(b) and len(vae_fingerprint(a)) == 64
    with torch.no_grad():
        b.encoder.conv_in.bias[0] += 1e-6
    assert vae_fingerprint(a) != vae_fingerprint(b)
    assert vae_fingerprint(tiny_vae(1)) != vae_fingerprint(a)


def test_cache_holds_the_posteriors(built, cached_root):
    root = cached_root
    vae = tiny_vae(0)
    assert built[2]["built"] == ["pan"]
    lat = load_latents(root / "pan", vae_fingerprint(vae))
    assert lat.shape == (N, 2, 4, 8, 20) and lat.dtype == np.float16
    frames = np.stack([read_frame(frame_path(root / "pan", i)) for i in range(N)])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(x)
    # float16 storage: relative error ~1e-3
    np.testing.assert_allclose(lat[:, 0], post.mean.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(lat[:, 1], post.std.numpy(), rtol=2e-3, atol=1e-4)
    info = json.loads((root / "pan" / LATENTS_META).read_text())
    assert info["vae_fingerprint"] == vae_fingerprint(vae) and info["frame_size"] == [160, 64]
    assert build_latent_cache(root, vae, progress=False)["existing"] == ["pan"]  # resumable


def test_a_centred_crop_in_latent_mode_is_on_the_8_pixel_grid(tmp_path):
    """Without augmentation the crop is centred, then put on the grid its latent window needs:
    frames 168 wide, crop 64: (168 - 64) / 2 = 52 -> 48, latent columns 6..13."""
    from tutorial_dataset import PairDataset

    src = write_folder(panning_clip(4, 64, 168), tmp_path / "src" / "wide")
    build_all([src], tmp_path / "data", BuildOptions(size=64, window=2), progress=False)
    vae = tiny_vae(0)
    build_latent_cache(tmp_path / "data", vae, progress=False)
    fp = vae_fingerprint(vae)
    item = PairDataset(tmp_path / "data", vae_fingerprint=fp, low=0.0, high=0.999, min_gap=1, size=64,
                       augment=False).sample(0, np.random.default_rng(0))
    full = read_frame(frame_path(tmp_path / "data" / "wide", item["ref_index"]))
    np.testing.assert_array_equal(np.round(item["hint"][..., :3] * 255).astype(np.uint8), full[:, 48:112])
    lat = load_latents(tmp_path / "data" / "wide", fp)
    np.testing.assert_array_equal(item["ref_latent_mean"], lat[item["ref_index"], 0][:, :, 6:14].astype(np.float32))


def test_gray_latents_are_the_vae_latents_of_the_gray_in_minus_one_to_one(root):
    """v3's cached gray latent: the VAE mean of the frame's BT.601 gray mapped to [-1, 1] and
    repeated on 3 channels, as cldm.color.build_concat encodes the hint's gray (fp16 storage)."""
    vae = tiny_vae(0)
    build_latent_cache(root, vae, batch_size=5, progress=False, gray=True)
    lat = load_latents(root / "pan", vae_fingerprint(vae), gray=True)
    gray = torch.from_numpy(np.stack([rgb_to_gray(read_frame(frame_path(root / "pan", i))) for i in range(N)]))
    with torch.no_grad():
        want = vae.encode((gray * 2 - 1)[:, None].expand(-1, 3, -1, -1)).mean
    np.testing.assert_allclose(lat[:, 2], want.numpy(), rtol=2e-3, atol=2e-3)


def test_a_cache_of_frames_at_another_size_is_refused(cached_root):
    """A movie rebuilt at another --size keeps its frame count: the recorded frame size tells."""
    info = json.loads((cached_root / "pan" / LATENTS_META).read_text())
    (cached_root / "pan" / LATENTS_META).write_text(json.dumps({**info, "frame_size": [320, 128]}))
    with pytest.raises(LatentCacheError, match="does not match the frames"):
        load_latents(cached_root / "pan", info["vae_fingerprint"])


def test_foreign_or_unfinished_cache_is_refused(cached_root):
    root = cached_root
    other = tiny_vae(1)
    lines = []
    assert build_latent_cache(root, other, progress=False, log=lines.append)["refused"] == ["pan"]
    assert "other VAE weights" in lines[0]
    with pytest.raises(LatentCacheError, match="other VAE weights"):
        load_latents(root / "pan", vae_fingerprint(other))
    assert build_latent_cache(root, other, overwrite=True, progress=False)["built"] == ["pan"]
    load_latents(root / "pan", vae_fingerprint(other))
    (root / "pan" / LATENTS_META).unlink()  # as if killed before the cache was finished
    with pytest.raises(LatentCacheError, match="no latent cache"):
        load_latents(root / "pan", vae_fingerprint(other))


def test_dataset_latent_mode(built):
    from tutorial_dataset import PairDataset

    fp = vae_fingerprint(tiny_vae(0))
    band = dict(low=0.0, high=0.999, min_gap=1, size=64)
    with pytest.raises(LatentCacheError, match="no latent cache"):
        PairDataset(built[0], vae_fingerprint=fp, **band)
    root = built[1]
    ds = PairDataset(root, vae_fingerprint=fp, **band)
    lat = load_latents(root / "pan", fp).astype(np.float32)
    for n in range(10):
        item = ds.sample(n % len(ds), np.random.default_rng(n))
        i, j = item["ref_index"], item["target_index"]
        assert item["jpg_latent_mean"].shape == (4, 8, 8) and item["jpg_latent_mean"].dtype == np.float32
        # the crop is on the 8-pixel grid, never flipped: find it in the reference frame; the
        # target (no image in latent mode) gives the hint's gray, from the same crop
        assert "jpg" not in item
        ref = np.round(item["hint"][..., :3] * 255).astype(np.uint8)
        full = read_frame(frame_path(root / "pan", i))
        x0 = next(x for x in range(0, 160 - 64 + 1) if np.array_equal(full[:, x : x + 64], ref))
        assert x0 % 8 == 0
        tgt = read_frame(frame_path(root / "pan", j))[:, x0 : x0 + 64]
        np.testing.assert_allclose(item["hint"][..., 3], rgb_to_gray(tgt), atol=1e-6)
        np.testing.assert_array_equal(item["jpg_latent_mean"], lat[j, 0][:, :, x0 // 8 : x0 // 8 + 8])
        np.testing.assert_array_equal(item["jpg_latent_std"], lat[j, 1][:, :, x0 // 8 : x0 // 8 + 8])
        np.testing.assert_array_equal(item["ref_latent_mean"], lat[i, 0][:, :, x0 // 8 : x0 // 8 + 8])
    with pytest.raises(ValueError, match="latent mode needs"):
        PairDataset(root, vae_fingerprint=fp, **{**band, "size": 128})
    with pytest.raises(LatentCacheError, match="other VAE weights"):
        PairDataset(root, vae_fingerprint=vae_fingerprint(tiny_vae(1)), **band)


def vae_checkpoint(vae, folder: Path) -> tuple[Path, Path]:
    """A checkpoint holding only `vae` (as first_stage_model.*) and a config for it."""
    from safetensors.torch import save_file

    ckpt, cfg = folder / "vae.safetensors", folder / "tiny.yaml"
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in vae.state_dict().items()}, ckpt)
    cfg.write_text(json.dumps({"model": {"first_stage": TINY}}))  # JSON is YAML
    return ckpt, cfg


def test_cli(root, tmp_path):
    vae = tiny_vae(0)
    ckpt, cfg = vae_checkpoint(vae, tmp_path)
    cmd = [sys.executable, str(REPO / "build_latent_cache.py"), str(root), "--ckpt", str(ckpt), "--config", str(cfg),
           "--device", "cpu", "--no-progress"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"VAE fingerprint {vae_fingerprint(vae)}" in p.stdout and "latents built: 1" in p.stdout
    assert (root / "pan" / LATENTS).is_file()
    p = subprocess.run(cmd + ["--gray"], cwd=REPO, capture_output=True, text=True, timeout=120)  # v3's gray too
    assert p.returncode == 0 and "latents built: 1" in p.stdout, p.stderr
    assert np.load(root / "pan" / LATENTS, mmap_mode="r").shape[1] == 3
    p = subprocess.run(cmd[:4] + [str(tmp_path / "missing.safetensors")] + cmd[5:], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "missing.safetensors" in p.stderr


def test_cli_refuses_a_missing_or_empty_data_root(tmp_path, capsys):
    """One line and exit 2, before any checkpoint is read (the one given does not exist)."""
    import build_latent_cache

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".partial" / "half").mkdir(parents=True)  # only an unfinished movie
    (tmp_path / "a_file").write_text("x")
    for root, problem in [(tmp_path / "missing", f"DATA_ROOT {tmp_path / 'missing'} does not exist"),
                          (tmp_path / "a_file", f"DATA_ROOT {tmp_path / 'a_file'} is a file, not a folder"),
                          (tmp_path / "empty", f"{tmp_path / 'empty'}: no finished movies to encode")]:
        rc = build_latent_cache.main([str(root), "--ckpt", str(tmp_path / "none.safetensors"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"build_latent_cache.py: error: {problem}") and len(err.splitlines()) == 1


def test_cli_missing_checkpoint_is_one_plain_line(root, tmp_path, capsys):
    import build_latent_cache

    assert build_latent_cache.main([str(root), "--ckpt", str(tmp_path / "nope.safetensors"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"build_latent_cache.py: error: {tmp_path / 'nope.safetensors'}: no such file\n"


def test_cli_device_is_one_line(root, tmp_path, capsys):
    import build_latent_cache

    assert build_latent_cache.main([str(root), "--ckpt", str(tmp_path / "x.safetensors"), "--device", "foo"]) == 2
    assert capsys.readouterr().err == ("build_latent_cache.py: error: --device foo: expected auto, cpu, cuda or "
                                       "cuda:N (N from 0)\n")


def test_cli_toy_model_needs_no_config(root, capsys):
    """Its config is the .yaml beside it, as colorize_inference.py finds it (not SD2.1's: another VAE)."""
    import build_latent_cache

    toy = REPO / "models" / "toy" / "toy_color_v2.safetensors"
    rc = build_latent_cache.main([str(root), "--ckpt", str(toy), "--device", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "latents built: 1" in out and (root / "pan" / LATENTS_META).is_file()


def test_vae_config_is_chosen_like_colorize_inference_and_misfits_are_named(tmp_path, capsys):
    """--config, else the .yaml beside the checkpoint, else the config it records; a VAE of another
    shape is refused in one line naming a tensor and both shapes."""
    import build_latent_cache
    from safetensors.torch import save_file

    vae = tiny_vae(0)
    ckpt = tmp_path / "model.safetensors"
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in vae.state_dict().items()}, ckpt,
              metadata={"config": json.dumps({"model": {"first_stage": TINY}})})
    assert vae_fingerprint(build_latent_cache.load_vae(None, ckpt)) == vae_fingerprint(vae)  # the recorded config
    wider = {**TINY, "ddconfig": {**TINY["ddconfig"], "ch": 64}}
    beside = tmp_path / "model.yaml"
    beside.write_text(json.dumps({"model": {"first_stage": wider}}))  # preferred to the recorded one
    rc = build_latent_cache.main([str(tmp_path), "--ckpt", str(ckpt), "--movies", "pan", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert re.fullmatch(
        rf"build_latent_cache\.py: error: {re.escape(str(ckpt))}: VAE weights do not fit {re.escape(str(beside))}: "
        r"first_stage_model\.[\w.]+ is \[\d+(, \d+)*\] in the checkpoint but \[\d+(, \d+)*\] in the model "
        r"\(and \d+ more tensors of another shape\); likely another model config \(the file looks like: .*\)\n", err)
    other = tmp_path / "tiny.yaml"
    other.write_text(json.dumps({"model": {"first_stage": TINY}}))
    assert vae_fingerprint(build_latent_cache.load_vae(other, ckpt)) == vae_fingerprint(vae)  # --config first


def test_read_frame_gives_rgb(tmp_path):
    """Stored frames are decoded to RGB (OpenCV reads BGR): a red pixel stays red in the latents' input."""
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 2] = 200  # red, in OpenCV's order
    cv2.imwrite(str(tmp_path / "f.png"), bgr)
    rgb = read_frame(tmp_path / "f.png")
    assert rgb.flags.c_contiguous and rgb[..., 0].min() == 200 and rgb[..., 1:].max() == 0


def test_a_cache_with_fewer_latents_than_frames_is_refused(cached_root):
    lat = np.load(cached_root / "pan" / LATENTS)
    np.save(cached_root / "pan" / LATENTS, lat[:-1])  # a movie rebuilt with one frame more, say
    info = json.loads((cached_root / "pan" / LATENTS_META).read_text())
    with pytest.raises(LatentCacheError, match="does not match the frames"):
        load_latents(cached_root / "pan", info["vae_fingerprint"])


def test_cli_precision_and_exit_status(cached_root, tmp_path, capsys):
    """--precision 16 / bf16 encode under float16 / bfloat16 autocast (recorded in latents.json);
    a movie refused because its cache was made by other VAE weights makes the exit status 1."""
    import build_latent_cache as cli

    ckpt, cfg = vae_checkpoint(tiny_vae(1), tmp_path)  # other weights than the cache's
    args = [str(cached_root), "--ckpt", str(ckpt), "--config", str(cfg), "--device", "cpu", "--no-progress"]
    assert cli.main(args) == 1
    assert "refused (other weights): 1" in capsys.readouterr().out
    for flag, dtype in (("16", "float16"), ("bf16", "bfloat16"), ("32", None)):
        assert cli.main(args + ["--overwrite", "--precision", flag]) == 0
        assert json.loads((cached_root / "pan" / LATENTS_META).read_text())["autocast"] == dtype
