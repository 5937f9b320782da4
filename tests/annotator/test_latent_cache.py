import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from annotator.build_many import build_all
from annotator.color import rgb_to_gray
import annotator.latent_cache
from annotator.latent_cache import (
    LATENTS, LATENTS_LOCK, LATENTS_META, LatentCacheError, build_latent_cache, cache_info, encode_movie, load_latents,
    partial_files, read_frame, vae_fingerprint,
)
from annotator.pairs import BuildOptions, frame_path
from ldm.modules import autoencoder
from tests.annotator.clips import panning_clip, write_folder


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


def test_cli(root, tmp_path, capsys):
    """The script as a user runs it (its own process, once), then in this one."""
    import build_latent_cache

    vae = tiny_vae(0)
    ckpt, cfg = vae_checkpoint(vae, tmp_path)
    args = [str(root), "--ckpt", str(ckpt), "--config", str(cfg), "--device", "cpu", "--no-progress"]
    p = subprocess.run([sys.executable, str(REPO / "build_latent_cache.py"), *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"VAE fingerprint {vae_fingerprint(vae)}" in p.stdout and "latents built: 1" in p.stdout
    assert (root / "pan" / LATENTS).is_file()
    assert build_latent_cache.main(args + ["--gray"]) == 0  # v3's gray too
    assert "latents built: 1" in capsys.readouterr().out
    assert np.load(root / "pan" / LATENTS, mmap_mode="r").shape[1] == 3
    args[2] = str(tmp_path / "missing.safetensors")
    assert build_latent_cache.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing.safetensors" in err


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


def test_vae_config_is_chosen_like_colorize_inference_and_misfits_are_named(root, tmp_path, capsys):
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
    rc = build_latent_cache.main([str(root), "--ckpt", str(ckpt), "--movies", "pan", "--no-progress"])
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
    noise = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # every channel differs
    cv2.imwrite(str(tmp_path / "n.png"), noise)
    got = read_frame(tmp_path / "n.png")
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, noise[..., ::-1])  # exactly the channels swapped, nothing else



def test_read_frame_takes_a_path_that_is_not_utf8_and_names_what_it_cannot_read(tmp_path, capfd):
    """cv2.imread crashed the process on such a path (a Latin-1 'café' folder): in a child."""
    import subprocess
    import sys

    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    folder.mkdir()
    noise = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    (folder / "n.png").write_bytes(cv2.imencode(".png", noise)[1].tobytes())
    child = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from annotator.latent_cache "
                            "import read_frame; print(read_frame(Path(sys.argv[1])).tobytes().hex())",
                            folder / "n.png"], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == 0, child.stderr
    assert bytes.fromhex(child.stdout.strip()) == noise[..., ::-1].tobytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    png = cv2.imencode(".png", noise)[1].tobytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])  # libpng would print its own error line
    for bad in (tmp_path / "missing.jpg", tmp_path / "empty.jpg", tmp_path, tmp_path / "cut.png"):
        with pytest.raises(OSError, match=f"^{re.escape(str(bad))}: cannot read frame$"):
            read_frame(bad)
    assert capfd.readouterr().err == ""

@pytest.mark.parametrize("batch_size", [8, 1])
def test_a_frame_of_another_size_than_meta_json_skips_its_movie_naming_it_and_keeps_the_old_cache(
        cached_root, batch_size):
    """A stored frame replaced by one of another size: in a batch with others it was np.stack's "all input
    arrays must have the same shape", naming no file; alone in its batch, encoded into latents of another
    shape. Now one line naming the frame, meta.json and both sizes; the old cache is not touched and the
    other movies are still cached."""
    movie = cached_root / "pan"
    shutil.copytree(movie, cached_root / "pan2")  # a second, good movie, after it in the order
    (cached_root / "pan2" / LATENTS).unlink()
    (cached_root / "pan2" / LATENTS_META).unlink()
    frame = frame_path(movie, 3)
    frame.write_bytes(cv2.imencode(".jpg", np.zeros((32, 48, 3), np.uint8))[1].tobytes())
    kept = {p: p.read_bytes() for p in (movie / LATENTS, movie / LATENTS_META)}
    lines = []
    result = build_latent_cache(cached_root, tiny_vae(1), batch_size=batch_size, overwrite=True, progress=False,
                                log=lines.append)
    assert lines == [f"skipped: {frame}: a 48x32 frame, but {movie / 'meta.json'} says the movie's frames are 160x64; "
                     "rebuild the movie with build_pairs.py (remove its folder first: finished movies are skipped)"]
    assert (result["skipped"], result["built"], result["existing"], result["refused"]) == (["pan"], ["pan2"], [], [])
    assert {p: p.read_bytes() for p in kept} == kept and sorted(os.listdir(movie)) == sorted(
        ["frames", LATENTS, LATENTS_META, "meta.json", "similarity.npy"])
    assert cache_info(cached_root / "pan2")["vae_fingerprint"] == vae_fingerprint(tiny_vae(1))


def test_the_bar_ends_full_when_a_movie_is_skipped_part_way(cached_root, capsys):
    """The bad frame is the last one, after a batch was encoded: the bar gets the movie's other frames,
    not twice the ones already counted."""
    frame_path(cached_root / "pan", N - 1).write_bytes(b"not a jpeg")
    result = build_latent_cache(cached_root, tiny_vae(1), batch_size=3, overwrite=True, log=lambda line: None)
    assert result["skipped"] == ["pan"]
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert f"{N}/{N}" in bar and "100%" in bar, bar


@pytest.mark.parametrize("w,h", [(80, 64), (160, 32)])
def test_a_frame_differing_in_one_side_only_is_refused_too(cached_root, w, h):
    """The size check compares both sides (the movie's frames are 160x64): a frame of another width
    but the same height, or the reverse, is refused naming both sizes, and encode_movie's error
    is a LatentCacheError (BadFrameError) that build_latent_cache turns into a skip. (Found by a
    mutant that compared the height only.)"""
    movie = cached_root / "pan"
    frame = frame_path(movie, 3)
    frame.write_bytes(cv2.imencode(".jpg", np.zeros((h, w, 3), np.uint8))[1].tobytes())
    line = (f"{frame}: a {w}x{h} frame, but {movie / 'meta.json'} says the movie's frames are 160x64; rebuild the "
            "movie with build_pairs.py (remove its folder first: finished movies are skipped)")
    with pytest.raises(LatentCacheError) as e:
        encode_movie(movie, tiny_vae(1), batch_size=8)
    assert str(e.value) == line
    lines = []
    result = build_latent_cache(cached_root, tiny_vae(1), batch_size=8, overwrite=True, progress=False,
                                log=lines.append)
    assert lines == [f"skipped: {line}"] and result["skipped"] == ["pan"]


def test_the_bar_ends_full_when_a_later_movie_is_skipped_part_way(cached_root, capsys):
    """The skipped movie is the second: the bar gets its frames not yet counted (the count since
    its own start, not since the bar's), so it ends at both movies' frames, not short of them."""
    shutil.copytree(cached_root / "pan", cached_root / "pan2")
    frame_path(cached_root / "pan2", N - 1).write_bytes(b"not a jpeg")
    result = build_latent_cache(cached_root, tiny_vae(1), batch_size=3, overwrite=True, log=lambda line: None)
    assert (result["built"], result["skipped"]) == (["pan"], ["pan2"])
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert f"{2 * N}/{2 * N}" in bar and "100%" in bar, bar


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


class FullDisk:
    """A file opened for writing on a disk with `room` bytes left: a write past it raises ENOSPC,
    as a real full disk does under plain writes (under a memory map it is a SIGBUS instead)."""

    def __init__(self, path, mode="r", room=0):
        self.f, self.room = open(path, mode), room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_cli_a_full_disk_is_one_line_and_leaves_no_partial_file(root, tmp_path, capsys, monkeypatch):
    """Room for the .npy header and one batch of 5 frames (8 frames: 2 batches), then ENOSPC."""
    import build_latent_cache as cli

    ckpt, cfg = vae_checkpoint(tiny_vae(0), tmp_path)
    batch = 5 * 2 * 4 * 8 * 20 * 2  # frames x (mean, std) x C x H/8 x W/8 x fp16
    monkeypatch.setattr(annotator.latent_cache, "open", lambda p, mode="r": FullDisk(p, mode, 128 + batch),
                        raising=False)
    args = [str(root), "--ckpt", str(ckpt), "--config", str(cfg), "--device", "cpu", "--no-progress",
            "--batch-size", "5"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err == (f"build_latent_cache.py: error: {root / 'pan' / LATENTS}: cannot write the "
                                       "latent cache (No space left on device); it needs 21 KiB: free some space "
                                       "and rerun\n")
    assert sorted(p.name for p in (root / "pan").iterdir()) == ["frames", "meta.json", "similarity.npy"]


def test_broken_json_files_are_named(cached_root):
    """json's message alone ("Expecting property name enclosed in double quotes: ...") names no file."""
    vae = tiny_vae(0)
    info = cached_root / "pan" / LATENTS_META
    info.write_text("{'vae_fingerprint': 1}")
    for call in (lambda: build_latent_cache(cached_root, vae, progress=False),
                 lambda: load_latents(cached_root / "pan", vae_fingerprint(vae))):
        with pytest.raises(ValueError, match=f"^{info}: not valid JSON \\(Expecting property name enclosed in "
                                             "double quotes: line 1 column 2\\)$"):
            call()
    assert build_latent_cache(cached_root, vae, overwrite=True, progress=False)["built"] == ["pan"]  # not read
    meta = cached_root / "pan" / "meta.json"
    meta.write_text("")
    with pytest.raises(ValueError, match=f"^{meta}: not valid JSON"):
        build_latent_cache(cached_root, vae, progress=False)


@pytest.mark.parametrize("content, key", [("{}", "vae_fingerprint"), ('{"vae_fingerprint": "ab"}', "frame_size")])
def test_a_latents_json_without_what_readers_need_is_named_like_a_broken_one(cached_root, content, key):
    """Valid JSON without the keys was a KeyError ('vae_fingerprint'), naming no file: now refused as a
    latents.json that is not JSON is (test above), and --overwrite rebuilds it without reading it."""
    vae = tiny_vae(0)
    info = cached_root / "pan" / LATENTS_META
    info.write_text(content)
    for call in (lambda: build_latent_cache(cached_root, vae, progress=False),
                 lambda: load_latents(cached_root / "pan", vae_fingerprint(vae))):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == f"{info}: no '{key}' entry (not a latents.json written by build_latent_cache.py)"
    assert build_latent_cache(cached_root, vae, overwrite=True, progress=False)["built"] == ["pan"]


@pytest.mark.parametrize("value, kind", [("12", "int"), ("null", "NoneType"), ('["ab"]', "list")])
def test_a_latents_json_whose_fingerprint_is_no_string_is_named_like_a_broken_one(cached_root, value, kind):
    """A number was a TypeError traceback ('int' object is not subscriptable), a list a refusal quoting it:
    now the one line of a broken latents.json, and --overwrite rebuilds it without reading it."""
    vae = tiny_vae(0)
    info = cached_root / "pan" / LATENTS_META
    info.write_text(f'{{"vae_fingerprint": {value}, "frame_size": [160, 64]}}')
    for call in (lambda: build_latent_cache(cached_root, vae, progress=False),
                 lambda: load_latents(cached_root / "pan", vae_fingerprint(vae))):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == (f"{info}: its 'vae_fingerprint' holds a {kind}, not a string (not a latents.json "
                                "written by build_latent_cache.py)")
    assert build_latent_cache(cached_root, vae, overwrite=True, progress=False)["built"] == ["pan"]


@pytest.mark.parametrize("keep, problem", [
    (1000, "1000 bytes, but its shape needs 20608: cut short?"),
    (50, "not a whole .npy file"),
])
def test_a_cut_short_cache_is_rebuilt_and_refused_by_training(cached_root, keep, problem):
    """A latents.npy cut short (a full disk, an interrupted copy) with a finished latents.json: the
    builder rebuilds it, saying why; training refuses it in one line, not numpy's "mmap length is
    greater than file size"."""
    from tutorial_dataset import PairDataset

    vae = tiny_vae(0)
    fp, path = vae_fingerprint(vae), cached_root / "pan" / LATENTS
    whole = np.load(path)
    path.write_bytes(path.read_bytes()[:keep])
    refused = f"{path}: latent cache does not match the frames ({problem}); rerun build_latent_cache.py"
    with pytest.raises(LatentCacheError) as e:
        PairDataset(cached_root, vae_fingerprint=fp, low=0.0, high=0.999, min_gap=1, size=64)
    assert str(e.value) == refused
    lines = []
    assert build_latent_cache(cached_root, vae, progress=False, log=lines.append)["built"] == ["pan"]
    assert lines == [f"rebuilding: {path}: does not match the frames ({problem})"]
    # the same encoding; float16 sums may round differently with another thread count: 1 ulp (~1e-3)
    np.testing.assert_allclose(load_latents(cached_root / "pan", fp), whole, rtol=2e-3, atol=1e-6)


def test_a_replacement_interrupted_before_its_metadata_reads_as_not_built(cached_root, monkeypatch):
    """Killed between the renames of latents.npy and latents.json: the new latents must not pass
    for the old cache (its fingerprint, its gray flag)."""
    old, new = tiny_vae(0), tiny_vae(1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(annotator.latent_cache.json, "dumps", killed)  # the latents.json it writes last
    with pytest.raises(KeyboardInterrupt):
        encode_movie(cached_root / "pan", new)
    monkeypatch.undo()
    for vae in (old, new):
        with pytest.raises(LatentCacheError, match="no latent cache"):
            load_latents(cached_root / "pan", vae_fingerprint(vae))
    assert not list((cached_root / "pan").glob("*.partial"))
    assert build_latent_cache(cached_root, new, progress=False)["built"] == ["pan"]


def test_cli_refuses_movie_ids_with_a_path_or_none(root, tmp_path, capsys):
    """'../other_root/movie' would write into another data root: refused in one line, before the
    checkpoint is read (the one given does not exist); so are --movies without an id and the id ''
    (DATA_ROOT itself: it was called "not a finished movie")."""
    import build_latent_cache as cli

    other = Path(shutil.copytree(root, tmp_path / "other"))
    for mid in ("../other/pan", str(other / "pan"), "..", ".partial", "pan/", ""):
        rc = cli.main([str(root), "--ckpt", str(tmp_path / "none.safetensors"), "--movies", mid])
        assert rc == 2 and capsys.readouterr().err == (
            f"build_latent_cache.py: error: {mid!r}: not a movie id of {root} (the name of a movie folder in it, "
            "without a path)\n")
    with pytest.raises(SystemExit) as e:
        cli.main([str(root), "--ckpt", str(tmp_path / "none.safetensors"), "--movies"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("build_latent_cache.py: error: argument --movies: expected at least one "
                                       "argument (see --help)\n")
    assert not (other / "pan" / LATENTS).exists()


def test_cli_a_missing_frame_is_one_line_without_opencv_warnings(root, tmp_path):
    """OpenCV's own "[ WARN:0@3.5] global loadsave.cpp:278 findDecoder ..." before our line is
    silenced as build_pairs.py silences it (cliutil.quiet_opencv). The movie is skipped: exit 1."""
    ckpt, cfg = vae_checkpoint(tiny_vae(0), tmp_path)
    frame = frame_path(root / "pan", 3)
    frame.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    p = subprocess.run([sys.executable, str(REPO / "build_latent_cache.py"), str(root), "--ckpt", str(ckpt),
                        "--config", str(cfg), "--device", "cpu", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1 and p.stderr == (f"skipped: {frame}: cannot read frame; rebuild the movie "
                                            "with build_pairs.py (remove its folder first: finished movies are "
                                            "skipped)\n")
    assert p.stdout.endswith("latents built: 0, already cached: 0, refused (other weights): 0, "
                             "skipped (a bad frame): 1\n")


def test_cli_tells_how_to_train_on_the_cache(root, capsys):
    """A CLI user is pointed at the training script's flag, not at a library argument."""
    import build_latent_cache as cli

    toy = REPO / "models" / "toy" / "toy_color_v2.safetensors"
    assert cli.main([str(root), "--ckpt", str(toy), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for text in (out, cli.parser().format_help()):
        assert "tutorial_train_sd21_color_v2.py --use-latent-cache" in " ".join(text.split())
        assert "tutorial_dataset" not in text and "vae_fingerprint" not in text


def test_cli_a_bad_yaml_found_beside_the_checkpoint_says_it_was_found_there(root, tmp_path, capsys):
    """An A1111-style sd.yaml beside the SD file is not a config of this project; the user never named it."""
    import build_latent_cache

    ckpt = tmp_path / "sd.safetensors"
    shutil.copy(REPO / "models" / "toy" / "toy_color_v2.safetensors", ckpt)
    beside = tmp_path / "sd.yaml"
    beside.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params: {}\n")
    for extra, note in (([], " (found beside --ckpt: fix or remove it, or pass --config)"),
                        (["--config", str(beside)], "")):
        assert build_latent_cache.main([str(root), "--ckpt", str(ckpt), "--no-progress", *extra]) == 2
        assert capsys.readouterr().err == (f"build_latent_cache.py: error: {beside}: model.target: a config in the "
                                           "layout of SD's and ControlNet's own YAML files (target:, params:), which "
                                           "this project does not read; use models/cldm_v21_color.yaml or one made "
                                           f"from it{note}\n")


def test_fingerprint_covers_names_shapes_and_every_tensor():
    class One(torch.nn.Module):
        def __init__(self, shape, name="w"):
            super().__init__()
            self.register_parameter(name, torch.nn.Parameter(torch.arange(6.0).reshape(shape)))
    assert vae_fingerprint(One((2, 3))) != vae_fingerprint(One((3, 2)))  # the same bytes
    assert vae_fingerprint(One((2, 3))) != vae_fingerprint(One((2, 3), "v"))
    a, b = tiny_vae(0), tiny_vae(0)
    last = sorted(b.state_dict())[-1]
    with torch.no_grad():
        b.state_dict()[last].view(-1)[0] += 1
    assert vae_fingerprint(a) != vae_fingerprint(b)


def test_load_latents_memory_maps_and_refuses_what_does_not_fit(cached_root):
    """Memory-mapped; a missing latents.npy, one in float32, one with bytes past its data, or of a
    .npy version it cannot read, is named; gray latents asked of a cache without them are refused."""
    movie, vae = cached_root / "pan", tiny_vae(0)
    fp, path = vae_fingerprint(vae), cached_root / "pan" / LATENTS
    lat = load_latents(movie, fp)
    assert isinstance(lat, np.memmap)
    whole = np.array(lat)
    del lat
    with pytest.raises(LatentCacheError, match=r"^.*pan: latent cache has no gray latents, which colour variant v3 "
                                                r"needs \(rerun build_latent_cache\.py with --gray added"):
        load_latents(movie, fp, gray=True)

    def refused(problem):
        with pytest.raises(LatentCacheError) as e:
            load_latents(movie, fp)
        assert str(e.value) == (f"{path}: latent cache does not match the frames ({problem}); "
                                "rerun build_latent_cache.py")
    np.save(path, whole.astype(np.float32))
    refused(f"shape [{N}, 2, 4, 8, 20] float32, but {N} frames of 160x64 need [{N}, 2, 'C', 8, 20] float16")
    np.save(path, whole)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    refused(f"{size + 16} bytes, but its shape needs {size}: cut short?")
    data = bytearray(path.read_bytes()[:size])
    data[6] = 3  # the .npy format's major version
    path.write_bytes(bytes(data))
    refused("not a whole .npy file")
    path.unlink()
    refused(f"{LATENTS} is missing")
    lines = []
    assert build_latent_cache(cached_root, vae, progress=False, log=lines.append)["built"] == ["pan"]
    assert lines == [f"rebuilding: {path}: does not match the frames ({LATENTS} is missing)"]


def test_encode_movie_reports_progress_per_batch_and_runs_under_autocast(root, built, tmp_path):
    vae, done = tiny_vae(0), []
    info = encode_movie(root / "pan", vae, batch_size=5, autocast_dtype=torch.bfloat16, progress=done.append)
    assert done == [5, 3] and info["autocast"] == "bfloat16"
    other = Path(shutil.copytree(built[0], tmp_path / "fp32"))
    encode_movie(other / "pan", vae, batch_size=5)  # float32, with this test's thread count
    fp = vae_fingerprint(vae)
    bf16, fp32 = load_latents(root / "pan", fp), load_latents(other / "pan", fp)
    assert not np.array_equal(bf16, fp32)  # the VAE ran in bfloat16 ...
    np.testing.assert_allclose(bf16, fp32, rtol=0.1, atol=0.05)  # ... on the same frames
    assert np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32) < 0.02  # bf16's rounding, not a scale error


@pytest.mark.parametrize("size", [[160, 60], [156, 64]])
def test_frames_off_the_8_pixel_grid_are_refused(root, size):
    meta = json.loads((root / "pan" / "meta.json").read_text())
    (root / "pan" / "meta.json").write_text(json.dumps({**meta, "size": size}))
    with pytest.raises(LatentCacheError, match=rf"pan: frames are {size[0]}x{size[1]}; the VAE needs multiples of 8"):
        encode_movie(root / "pan", tiny_vae(0))


def test_build_latent_cache_ends_the_run_on_frames_off_the_8_pixel_grid(root):
    """Only a bad frame (BadFrameError) skips its movie: frames off the VAE's 8-pixel grid (a
    movie built with a --size the VAE cannot take) are a LatentCacheError that ends the run
    (build_latent_cache.py: exit 2), not a skip. (Found by a mutant that skipped on any
    LatentCacheError.)"""
    meta = json.loads((root / "pan" / "meta.json").read_text())
    (root / "pan" / "meta.json").write_text(json.dumps({**meta, "size": [160, 60]}))
    lines = []
    with pytest.raises(LatentCacheError, match=r"pan: frames are 160x60; the VAE needs multiples of 8") as e:
        build_latent_cache(root, tiny_vae(0), progress=False, log=lines.append)
    assert type(e.value) is LatentCacheError and lines == []


def test_build_latent_cache_checks_the_movie_ids_and_freezes_the_vae(root, tmp_path):
    vae = tiny_vae(0).train()
    with pytest.raises(LatentCacheError, match=r"'\.\./x': not a movie id of "):
        build_latent_cache(root, vae, movies=["../x"], progress=False)
    (root / "half").mkdir()
    with pytest.raises(LatentCacheError,
                       match=rf"^{root / 'half'}: not a finished movie \(run build_pairs\.py first\)$"):
        build_latent_cache(root, vae, movies=["half"], progress=False)
    assert build_latent_cache(root, vae, movies=["pan"], progress=False)["built"] == ["pan"]
    assert not vae.training


def test_write_errors_name_the_cache_and_on_a_full_disk_the_space_it_needs(tmp_path):
    from annotator.latent_cache import _writing

    dest = tmp_path / LATENTS
    for size, err, hint in [(3 * 2**20, errno.ENOSPC, "; it needs 3.0 MiB: free some space and rerun"),
                            (1500, errno.EDQUOT, "; it needs 2 KiB: free some space and rerun"),
                            (1500, errno.EIO, "")]:
        with pytest.raises(OSError) as e:
            with _writing(dest, size):
                raise OSError(err, os.strerror(err))
        assert str(e.value) == f"{dest}: cannot write the latent cache ({os.strerror(err)}){hint}"


def test_a_failed_write_closes_the_partial_file(root, monkeypatch):
    monkeypatch.setattr(annotator.latent_cache, "open", lambda p, mode="r": FullDisk(p, mode, 200), raising=False)
    with pytest.raises(OSError, match="No space left on device") as e:
        encode_movie(root / "pan", tiny_vae(0), batch_size=5)
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.islink(f"/proc/self/fd/{fd}")]
    # not even while the traceback lives (this root's only: an earlier test's map may await the collector)
    assert not [p for p in open_files if LATENTS in p and p.startswith(str(root))], open_files
    assert e.value is not None and not list((root / "pan").glob("*.partial"))


def test_both_cache_files_reach_the_disk_before_their_renames_publish_them(root, monkeypatch):
    """fsync before each rename, then the folder: a power cut after the cache counts as built
    cannot leave it holding empty or short files."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", Path(a).name))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    encode_movie(root / "pan", tiny_vae(0))
    monkeypatch.undo()
    partial = [e for e in events if e[1].endswith(".partial")]
    assert partial == [("fsync", "latents.npy.partial"), ("replace", "latents.npy.partial"),
                       ("fsync", "latents.json.partial"), ("replace", "latents.json.partial")], events
    assert events[-1] == ("fsync", "pan")  # the renames themselves made durable


def test_partial_files_left_by_a_killed_run_are_removed_and_named(cached_root):
    """SIGKILL (or a power cut) during an --overwrite rebuild leaves latents.npy.partial, maybe
    gigabytes; a later run that keeps the cache removes it and says so."""
    stale = [cached_root / "pan" / "latents.npy.partial", cached_root / "pan" / "latents.json.partial"]
    for f in stale:
        f.write_bytes(b"half")
    logged = []
    result = build_latent_cache(cached_root, tiny_vae(0), progress=False, log=logged.append)
    assert result["existing"] == ["pan"] and result["built"] == []
    assert not any(f.exists() for f in stale)
    assert logged == [f"removed {f}: left by an interrupted run" for f in stale]


def test_the_lock_a_killed_run_left_beside_a_finished_cache_is_removed(cached_root):
    """SIGKILL between publishing latents.json (then an fsync of the folder) and removing the
    lock left latents.lock, which every later run kept, the cache being finished: the data root
    never became what an uninterrupted run makes (found by a real-process stress run). Nothing to
    name: it holds no data."""
    (cached_root / "pan" / LATENTS_LOCK).touch()  # what the kill leaves
    logged = []
    result = build_latent_cache(cached_root, tiny_vae(0), progress=False, log=logged.append)
    assert result["existing"] == ["pan"] and logged == []
    assert not (cached_root / "pan" / LATENTS_LOCK).exists()


@contextlib.contextmanager
def held_by_another_run(movie_dir: Path, seconds: float | None = None, finish=None):
    """The lock a build_latent_cache run encoding `movie_dir` holds (another open file, as
    another process would have). With `seconds`, that run lets go by itself, on a thread, after
    so long, first calling `finish()` (what it leaves: a finished cache, or nothing if it died)."""
    fd = os.open(movie_dir / LATENTS_LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def let_go():
        time.sleep(seconds)
        if finish is not None:
            finish()
        os.close(fd)

    later = threading.Thread(target=let_go) if seconds is not None else None
    try:
        if later is not None:
            later.start()
        yield
    finally:
        if later is not None:
            later.join()
        else:
            os.close(fd)


def test_a_movie_another_run_is_encoding_is_waited_for_at_the_end_untouched(built, root, tmp_path, capsys,
                                                                             monkeypatch):
    """Two runs on one data root (one per GPU, or one by mistake): the second must not write
    into the first one's partial files. It leaves the movie to the end, says so, waits for the
    other run, and takes the cache it made (not encoded again): exit 0, the bar full."""
    import build_latent_cache as cli

    theirs = annotator.latent_cache.partial_files(root / "pan")[0]
    theirs.write_bytes(b"the other run's latents")
    seen = []

    def finish():  # what the other run does at its end: its cache, by the same weights, in place
        seen.append(theirs.read_bytes())
        for name in (LATENTS, LATENTS_META):
            shutil.copy(built[1] / "pan" / name, root / "pan" / name)
        theirs.unlink()

    monkeypatch.setattr(annotator.latent_cache, "encode_movie", lambda *a, **k: pytest.fail("encoded it again"))
    ckpt, cfg = vae_checkpoint(tiny_vae(0), tmp_path)
    with held_by_another_run(root / "pan", seconds=1.0, finish=finish):
        assert cli.main([str(root), "--ckpt", str(ckpt), "--config", str(cfg), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "latents built: 0, already cached: 1, refused (other weights): 0" in out
    assert f"later: {root / 'pan'}: another run is encoding its latents; this one waits for it at the end\n" in err
    assert f"{N}/{N}" in err and seen == [b"the other run's latents"]  # untouched while that run held it
    assert (root / "pan" / LATENTS).read_bytes() == (built[1] / "pan" / LATENTS).read_bytes()
    assert not (root / "pan" / LATENTS_LOCK).exists()


def test_a_movie_another_run_left_unfinished_is_built_after_waiting(root):
    """The other run died (or was stopped) without finishing: its lock goes with it, and the
    waiting run encodes the movie itself."""
    logged = []
    with held_by_another_run(root / "pan", seconds=0.5):
        result = build_latent_cache(root, tiny_vae(0), progress=False, log=logged.append)
    assert result["built"] == ["pan"] and result["existing"] == [] and len(logged) == 1
    assert load_latents(root / "pan", vae_fingerprint(tiny_vae(0))).shape[0] == N
    assert not (root / "pan" / LATENTS_LOCK).exists()


def test_partial_files_of_a_rebuild_another_run_holds_are_left_alone(cached_root):
    """A run that keeps the cache removes partial files only when no run holds the movie:
    these belong to an --overwrite rebuild still writing them."""
    theirs = annotator.latent_cache.partial_files(cached_root / "pan")
    for f in theirs:
        f.write_bytes(b"being written")
    logged = []
    with held_by_another_run(cached_root / "pan"):
        result = build_latent_cache(cached_root, tiny_vae(0), progress=False, log=logged.append)
    assert result["existing"] == ["pan"] and logged == []
    assert all(f.read_bytes() == b"being written" for f in theirs)


def test_a_movie_encoded_under_its_lock_and_not_again_if_another_run_finished_it(built, root, monkeypatch):
    """The lock is held while the movie is encoded; a movie another run finished between the
    first look and the lock counts as cached and is not encoded again."""
    seen = []

    def encode(movie_dir, *args, **kwargs):
        fd = os.open(movie_dir / LATENTS_LOCK, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen.append(movie_dir)
        return real_encode(movie_dir, *args, **kwargs)

    real_encode, real_lock = annotator.latent_cache.encode_movie, annotator.latent_cache.try_lock
    monkeypatch.setattr(annotator.latent_cache, "encode_movie", encode)
    result = build_latent_cache(root, tiny_vae(0), progress=False)
    assert result["built"] == ["pan"] and seen == [root / "pan"]

    @contextlib.contextmanager
    def finished_meanwhile(path, **kwargs):
        for name in (LATENTS, LATENTS_META):  # the other run's cache, by the same weights
            shutil.copy(built[1] / "pan" / name, path.parent / name)
        with real_lock(path, **kwargs) as mine:
            yield mine

    shutil.rmtree(root)
    shutil.copytree(built[0], root)
    monkeypatch.setattr(annotator.latent_cache, "try_lock", finished_meanwhile)
    result = build_latent_cache(root, tiny_vae(0), progress=False)
    assert result["existing"] == ["pan"] and result["built"] == [] and len(seen) == 1


def test_fingerprint_is_of_values_not_of_their_dtype_nor_the_order_of_registration():
    """A VAE held in float16 or bfloat16 has the fingerprint of the float32 VAE of the same
    values; two modules registering the same tensors in another order have one fingerprint."""
    vae = tiny_vae(0)
    for dtype in (torch.float16, torch.bfloat16):
        low = tiny_vae(0).to(dtype)
        assert vae_fingerprint(low) == vae_fingerprint(tiny_vae(0).to(dtype).float()) != vae_fingerprint(vae)

    class Two(torch.nn.Module):
        def __init__(self, names):
            super().__init__()
            for name in names:
                self.register_parameter(name, torch.nn.Parameter(torch.full((2,), float(ord(name)))))
    assert list(Two("ab").state_dict()) == ["a", "b"] and list(Two("ba").state_dict()) == ["b", "a"]
    assert vae_fingerprint(Two("ab")) == vae_fingerprint(Two("ba"))


def test_read_frame_gives_three_channels_of_gray_or_rgba_pngs(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(read_frame(tmp_path / "g.png"), np.repeat(gray[..., None], 3, 2))
    bgra = np.zeros((3, 4, 4), np.uint8)
    bgra[..., 2], bgra[..., 3] = 200, 7  # red, nearly transparent: the alpha is dropped
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    rgb = read_frame(tmp_path / "a.png")
    assert rgb.shape == (3, 4, 3) and rgb[..., 0].min() == 200 and rgb[..., 1:].max() == 0


def test_encode_movie_records_what_it_wrote(root):
    """latents.json: the format version, the fingerprint it is given (not computed again), the
    frame count, size and shape, and the layout, with or without the gray latents."""
    vae = tiny_vae(0)
    for gray in (False, True):
        info = encode_movie(root / "pan", vae, fingerprint="f" * 64, batch_size=5, gray=gray)
        assert info == json.loads((root / "pan" / LATENTS_META).read_text()) == {
            "version": 1, "vae_fingerprint": "f" * 64, "frames": N, "frame_size": [160, 64],
            "shape": [N, 3 if gray else 2, 4, 8, 20], "dtype": "float16", "gray": gray,
            "layout": f"[frame, (posterior mean, posterior std{', gray posterior mean' if gray else ''}), channel, "
                      "H/8, W/8], unscaled", "autocast": None}


def test_load_latents_maps_read_only_and_reads_a_version_2_npy(cached_root):
    """The dataset cannot change the cache through its map; np.save writes .npy 2.0 for headers
    past 64 KiB, and such a file is read too."""
    fp, path = vae_fingerprint(tiny_vae(0)), cached_root / "pan" / LATENTS
    lat = load_latents(cached_root / "pan", fp)
    with pytest.raises(ValueError, match="read-only"):
        lat[0, 0, 0, 0, 0] = 1
    whole = np.array(lat)
    del lat
    with open(path, "wb") as f:
        np.lib.format.write_array(f, whole, version=(2, 0))
    np.testing.assert_array_equal(load_latents(cached_root / "pan", fp), whole)


def test_what_does_not_fit_the_frames_is_named_in_full(cached_root):
    movie = cached_root / "pan"
    info = json.loads((movie / LATENTS_META).read_text())
    fp, path = info["vae_fingerprint"], movie / LATENTS

    def refused(problem):
        with pytest.raises(LatentCacheError) as e:
            load_latents(movie, fp)
        assert str(e.value) == f"{path}: latent cache does not match the frames ({problem}); rerun build_latent_cache.py"
    (movie / LATENTS_META).write_text(json.dumps({**info, "frame_size": [320, 128]}))
    refused("made from frames of [320, 128], the movie's are 160x64")
    whole = np.load(path)
    np.save(path, np.concatenate([whole, whole[:, :1]], 1))  # three latents a frame, but not recorded as gray
    (movie / LATENTS_META).write_text(json.dumps(info))
    refused(f"shape [{N}, 3, 4, 8, 20] float16, but {N} frames of 160x64 need [{N}, 2, 'C', 8, 20] float16")


def test_a_cache_of_other_weights_names_both_fingerprints(cached_root):
    other = vae_fingerprint(tiny_vae(1))
    mine = json.loads((cached_root / "pan" / LATENTS_META).read_text())["vae_fingerprint"]
    with pytest.raises(LatentCacheError) as e:
        load_latents(cached_root / "pan", other)
    assert str(e.value) == (f"{cached_root / 'pan'}: latent cache was made by other VAE weights ({mine[:12]}..., "
                            f"expected {other[:12]}...); rebuild it: build_latent_cache.py --overwrite")
    lines = []
    build_latent_cache(cached_root, tiny_vae(1), progress=False, log=lines.append)
    assert lines == [f"refused: {cached_root / 'pan'}: cached with other VAE weights ({mine[:12]}...); use "
                     "--overwrite to replace it"]


def test_write_errors_keep_their_cause_and_a_message_without_strerror(tmp_path):
    from annotator.latent_cache import _writing

    dest = tmp_path / LATENTS
    with pytest.raises(OSError) as e:
        with _writing(dest, 2**20):  # exactly 1 MiB
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(e.value).endswith("; it needs 1.0 MiB: free some space and rerun")
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    with pytest.raises(OSError) as e:
        with _writing(dest, 10):
            raise OSError("the file system said no")
    assert str(e.value) == f"{dest}: cannot write the latent cache (the file system said no)"


def test_an_empty_list_of_movies_is_none_of_them(root):
    assert build_latent_cache(root, tiny_vae(0), movies=[], progress=False) == {
        "built": [], "existing": [], "refused": [], "skipped": [], "fingerprint": vae_fingerprint(tiny_vae(0))}
    assert not (root / "pan" / LATENTS).exists()


def test_partial_files_of_a_movie_to_build_are_overwritten_without_a_note(root):
    for f in annotator.latent_cache.partial_files(root / "pan"):
        f.write_bytes(b"half")
    logged = []
    assert build_latent_cache(root, tiny_vae(0), progress=False, log=logged.append)["built"] == ["pan"]
    assert logged == [] and not list((root / "pan").glob("*.partial"))


def test_the_bar_counts_the_frames_to_encode_only(cached_root, tmp_path, capsys):
    src = write_folder(panning_clip(4, 64, 64), tmp_path / "src" / "small")
    build_all([src], cached_root, BuildOptions(size=64, window=2), progress=False)
    result = build_latent_cache(cached_root, tiny_vae(0), batch_size=3, progress=True, log=lambda line: None)
    assert result["built"] == ["small"] and result["existing"] == ["pan"]
    renders = re.findall(r"latents: +(\d+)%\|[^|]*\| (\d+)/(\d+)", capsys.readouterr().err)
    assert renders[-1] == ("100", "4", "4")


def test_build_latent_cache_encodes_in_the_batches_it_is_given(root, monkeypatch):
    sizes, real = [], annotator.latent_cache.encode_movie

    def encode(movie_dir, vae, fp, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return real(movie_dir, vae, fp, batch_size, *args, **kwargs)
    monkeypatch.setattr(annotator.latent_cache, "encode_movie", encode)
    build_latent_cache(root, tiny_vae(0), batch_size=3, progress=False)
    assert sizes == [3]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_movie_another_run_finished_with_other_weights(built, root, overwrite):
    """Waited for, then refused and said so; with --overwrite built here."""
    def finish():
        for name in (LATENTS, LATENTS_META):  # by tiny_vae(0)
            shutil.copy(built[1] / "pan" / name, root / "pan" / name)
    logged = []
    with held_by_another_run(root / "pan", seconds=0.5, finish=finish):
        result = build_latent_cache(root, tiny_vae(1), overwrite=overwrite, progress=False, log=logged.append)
    if overwrite:
        assert result["built"] == ["pan"] and result["refused"] == []
        assert load_latents(root / "pan", vae_fingerprint(tiny_vae(1))).shape[0] == N
    else:
        assert result["refused"] == ["pan"] and result["built"] == []
        assert logged[-1].startswith(f"refused: {root / 'pan'}: cached with other VAE weights (")


def test_with_overwrite_a_movie_another_run_just_rebuilt_with_these_weights_is_kept(built, root, monkeypatch):
    def finish():
        for name in (LATENTS, LATENTS_META):
            shutil.copy(built[1] / "pan" / name, root / "pan" / name)
    monkeypatch.setattr(annotator.latent_cache, "encode_movie", lambda *a, **k: pytest.fail("encoded it again"))
    with held_by_another_run(root / "pan", seconds=0.5, finish=finish):
        result = build_latent_cache(root, tiny_vae(0), overwrite=True, progress=False, log=lambda line: None)
    assert result["existing"] == ["pan"] and result["built"] == []


@pytest.mark.parametrize("name", [LATENTS, "latents.json", "latents.lock", LATENTS + ".partial"])
def test_a_folder_where_the_cache_writes_a_file_is_refused_before_any_encoding(root, tmp_path, capsys, name):
    """It failed at the rename, after the movie was encoded ("[Errno 21] Is a directory: ...");
    now before the checkpoint is read (the one given does not exist), with or without --movies."""
    import build_latent_cache as cli

    (root / "pan" / name).mkdir()
    for movies in ([], ["--movies", "pan"]):
        rc = cli.main([str(root), "--ckpt", str(tmp_path / "none.safetensors"), "--overwrite", *movies])
        assert rc == 2 and capsys.readouterr().err == (
            f"build_latent_cache.py: error: {root / 'pan' / name}: a folder where the latent cache writes a file; "
            "move it away\n")
    with pytest.raises(LatentCacheError, match=f"{name}: a folder where"):
        build_latent_cache(root, tiny_vae(0), progress=False)


def read_only(path: Path, monkeypatch) -> Path:
    """Make the existing folder `path` read-only, as tests.helpers.read_only_folder does a new one."""
    path.chmod(0o555)
    if os.access(path, os.W_OK):  # root writes anyway: have os.access say what it says for anyone else
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path and mode & os.W_OK else
                            real(p, mode))  # only writing: a read-only folder is still readable
    return path


def test_the_read_only_refusal_counts_the_read_only_movies_to_encode_only(built, tmp_path, monkeypatch):
    """Two read-only movies among three to encode: "2 such movie(s)", the first named (kills counting
    every movie to encode)."""
    root = shutil.copytree(built[0], tmp_path / "data")
    for mid in ("qan", "ran"):
        shutil.copytree(root / "pan", root / mid)
    try:
        read_only(root / "pan", monkeypatch)
        read_only(root / "ran", monkeypatch)
        monkeypatch.setattr(annotator.latent_cache, "encode_movie", lambda *a, **k: pytest.fail("encoded"))
        with pytest.raises(LatentCacheError, match=rf"^{re.escape(str(root / 'pan'))}: cannot write its latent cache "
                                                   r"there, the folder is read-only \(2 such movie\(s\) to encode\); "):
            build_latent_cache(root, tiny_vae(0), progress=False)
    finally:
        for mid in ("pan", "ran"):
            (root / mid).chmod(0o755)


def test_a_read_only_movie_to_encode_is_named_before_any_encoding_and_one_already_cached_is_fine(
        built, tmp_path, monkeypatch):
    """Its lock failed as "[Errno 13] Permission denied: .../latents.lock"."""
    root, cached_root = shutil.copytree(built[0], tmp_path / "plain"), shutil.copytree(built[1], tmp_path / "cached")
    (cached_root / "pan" / (LATENTS + ".partial")).write_bytes(b"left by a killed run")  # cannot be removed: kept
    try:
        read_only(root / "pan", monkeypatch)
        monkeypatch.setattr(annotator.latent_cache, "encode_movie", lambda *a, **k: pytest.fail("encoded"))
        with pytest.raises(LatentCacheError, match=rf"^{re.escape(str(root / 'pan'))}: cannot write its latent cache "
                                                   r"there, the folder is read-only \(1 such movie\(s\) to encode\); "
                                                   "make it writable, or leave it out with --movies$"):
            build_latent_cache(root, tiny_vae(0), progress=False)
        read_only(cached_root / "pan", monkeypatch)
        result = build_latent_cache(cached_root, tiny_vae(0), progress=False, log=pytest.fail)
        assert result["existing"] == ["pan"] and (cached_root / "pan" / (LATENTS + ".partial")).exists()
    finally:
        for folder in (root / "pan", cached_root / "pan"):
            folder.chmod(0o755)


def test_links_left_at_the_partial_names_are_replaced_not_written_through(root, tmp_path):
    """A shared data root can hold links named like the cache's temporary files: opening them for
    writing truncated and filled the files they point at (the user's, anywhere)."""
    victims = []
    for partial in partial_files(root / "pan"):
        victim = tmp_path / f"victim_{partial.name}"
        victim.write_text("keep me")
        partial.symlink_to(victim)
        victims.append(victim)
    encode_movie(root / "pan", tiny_vae(0))
    assert [v.read_text() for v in victims] == ["keep me", "keep me"]
    assert not any(p.is_symlink() for p in (root / "pan").iterdir())
    assert load_latents(root / "pan", cache_info(root / "pan")["vae_fingerprint"]).shape[0] == N
