import contextlib
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import time
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from annotator.color import rgb_to_gray
from annotator.build_many import build_all
from annotator.pairs import BuildOptions
from tests.annotator.clips import index_color, panning_clip, table_from_pairs, write_fake_movie, write_folder
from tutorial_dataset import NoPairsError, PairDataModule, PairDataset, leave_stops_to_the_run, start_loader_process

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "bigbuckbunny.mp4"


@pytest.fixture
def fake_root(tmp_path):
    """Two movies with hand-made similarities, so the pairs are known exactly."""
    w = 4
    write_fake_movie(tmp_path, "film_a", table_from_pairs(10, w, {
        (0, 3): 0.95, (0, 4): 0.96, (2, 3): 0.95, (5, 8): 0.97, (6, 9): 0.941}), size=(96, 64))
    write_fake_movie(tmp_path, "film_b", table_from_pairs(6, w, {(1, 5): 0.955}), size=(64, 128))
    return tmp_path


def test_pairs_exact(fake_root):
    ds = PairDataset(fake_root, size=64)
    got = {(m, i): sorted(p.tolist()) for m, i, p in (ds.partners(k) for k in range(len(ds)))}
    assert got == {("film_a", 0): [3, 4], ("film_a", 3): [0], ("film_a", 4): [0], ("film_a", 6): [9],
                   ("film_a", 9): [6], ("film_b", 1): [5], ("film_b", 5): [1]}
    # the band is applied at load time: a wider one needs no rebuild
    wide = PairDataset(fake_root, size=64, low=0.9, high=0.99, min_gap=1)
    assert len(wide) == len(ds) + 3  # + (2, 3) both ways and frame 5 (5, 8)


def test_default_band_on_another_metric_is_warned(fake_root):
    meta = fake_root / "film_b" / "meta.json"
    meta.write_text(meta.read_text().replace('"metric": "ssim"', '"metric": "ncc"'))
    with pytest.warns(UserWarning, match="film_b: similarities are ncc, but the default band 0.94-0.97 was chosen "
                                         "for SSIM"):
        PairDataset(fake_root, ["film_b"], size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a band chosen for the metric: no warning
        PairDataset(fake_root, ["film_b"], size=64, low=0.9, high=0.99)
        PairDataset(fake_root, ["film_b"], size=64, high=0.99)  # either end chosen is a band chosen
        PairDataset(fake_root, ["film_b"], size=64, low=0.9)
    # movies of two metrics under one band: one of them gets the wrong pairs, whatever the band
    with pytest.warns(UserWarning) as said:
        PairDataset(fake_root, size=64, low=0.9, high=0.99)
    assert [str(w.message) for w in said] == [f"{fake_root}: movies scored with different similarity metrics (ncc: "
                                              "film_b; ssim: film_a) share one band 0.9-0.99; rebuild them with one "
                                              "build_pairs.py --metric"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a meta.json without "metric" (built before there was a choice) holds SSIM
        meta.write_text(meta.read_text().replace('"metric": "ncc", ', "").replace(', "metric": "ncc"', ""))
        assert "metric" not in meta.read_text()
        PairDataset(fake_root, size=64)


def test_the_summary_counts_frames_with_a_partner_and_pairs(fake_root):
    """Only frames with a partner in the band are drawn: 5 of film_a's 10 and 2 of film_b's 6;
    the pairs as test_pairs_exact lists them, each way."""
    assert PairDataset(fake_root, size=64).summary() == ("7 of 16 frames in 2 movie(s) have a partner with 0.94 < sim "
                                                         "< 0.97 and gap >= 3: 8 (reference, target) pairs")
    assert PairDataset(fake_root, ["film_b"], size=64, low=0.9, high=0.99, min_gap=1).summary() == \
        "2 of 6 frames in 1 movie(s) have a partner with 0.9 < sim < 0.99 and gap >= 1: 2 (reference, target) pairs"


def test_a_gap_beyond_the_stored_window_says_so(fake_root):
    """Was "no pairs with ... and gap >= 5 in movies ...": true, but no band could help (window 4 here)."""
    with pytest.raises(NoPairsError) as e:
        PairDataset(fake_root, size=64, low=0.0, high=1.0, min_gap=5)
    assert str(e.value) == (f"{fake_root}: no pairs with 0.0 < sim < 1.0 and gap >= 5 in movies film_a, film_b: no gap "
                            "above 4 frames is stored (the --window they were built with); rebuild them with a larger "
                            "build_pairs.py --window, or lower the gap")
    with pytest.raises(NoPairsError) as e:  # within the window: only the band is at fault
        PairDataset(fake_root, size=64, low=0.98, high=0.99, min_gap=4)
    assert str(e.value).endswith("in movies film_a, film_b")


def test_a_broken_meta_json_is_named(fake_root):
    """json's own message ("Expecting value: line 1 column 1 (char 0)") says nothing of which file."""
    meta = fake_root / "film_b" / "meta.json"
    meta.write_text("")  # a disk that filled up while it was written, say
    with pytest.raises(ValueError, match=f"^{meta}: not valid JSON \\(Expecting value: line 1 column 1\\)$"):
        PairDataset(fake_root, size=64)


def test_a_broken_similarity_npy_is_named(fake_root):
    """numpy's own error for an empty file is an EOFError ("No data left in file"), naming nothing."""
    sim = fake_root / "film_b" / "similarity.npy"
    sim.write_bytes(b"")
    with pytest.raises(ValueError, match=f"^{sim}: not a whole similarity table \\(empty, cut short or not a .npy "
                                         f"file\\); delete {sim.parent} and rebuild it with build_pairs.py$"):
        PairDataset(fake_root, size=64)


def test_item_convention_and_partner_frames(fake_root):
    ds = PairDataset(fake_root, ["film_a"], size=64, prompt="a film still", seed=0)
    for k in range(len(ds)):
        item = ds[k]
        movie, i, partners = ds.partners(k)
        j = item["target_index"]
        assert item["ref_index"] == i and j in partners and item["movie"] == "film_a"
        assert item["txt"] == "a film still"
        jpg, hint = item["jpg"], item["hint"]
        assert jpg.shape == (64, 64, 3) and jpg.dtype == np.float32 and -1 <= jpg.min() and jpg.max() <= 1
        assert hint.shape == (64, 64, 4) and hint.dtype == np.float32 and 0 <= hint.min() and hint.max() <= 1
        target_rgb = np.array(index_color(j), np.float32)
        np.testing.assert_allclose(jpg[0, 0], target_rgb / 127.5 - 1, atol=1e-6)
        np.testing.assert_allclose(hint[0, 0, :3], np.array(index_color(i)) / 255, atol=1e-6)
        # BT.601 luma of the target: 0.299 R + 0.587 G + 0.114 B (not the BGR-swapped weights)
        np.testing.assert_allclose(hint[0, 0, 3], target_rgb @ [0.299, 0.587, 0.114] / 255, atol=1e-6)


def test_random_partner_and_determinism(fake_root):
    ds = PairDataset(fake_root, ["film_a"], size=64)
    k = next(k for k in range(len(ds)) if len(ds.partners(k)[2]) == 2)
    torch.manual_seed(0)
    draws = [ds[k]["target_index"] for _ in range(40)]
    assert set(draws) == {3, 4}  # a new partner is drawn on every access
    torch.manual_seed(0)
    assert [ds[k]["target_index"] for _ in range(40)] == draws  # reproducible from torch's seed
    fixed = PairDataset(fake_root, ["film_a"], size=64, seed=7)
    assert len({fixed[k]["target_index"] for _ in range(10)}) == 1  # seeded: item k is fixed
    again = PairDataset(fake_root, ["film_a"], size=64, seed=7)
    for a, b in zip((fixed[n] for n in range(len(fixed))), (again[n] for n in range(len(again)))):
        np.testing.assert_array_equal(a["jpg"], b["jpg"])
        np.testing.assert_array_equal(a["hint"], b["hint"])


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory):
    """A real built movie: panning texture (so crops and flips are visible), wide frames."""
    root = tmp_path_factory.mktemp("clips")
    src = write_folder(panning_clip(40, 64, 160, speed=1), root / "src" / "pan")
    build_all([src], root / "data", BuildOptions(size=64, window=6, image_format="png"), progress=False)
    return root / "data"


def test_seeded_items_draw_from_the_seed_and_index_together(clip_root):
    """Item k of a seeded dataset draws partner, crop and flip from default_rng([seed, k]): a
    stream of its own for every pair, so another eval_seed gives other items, not the same
    draws shifted by one item (as seed + k would: item 1 at seed 7 = item 0 at seed 8)."""
    ds = PairDataset(clip_root, size=64, low=0.0, high=0.999, min_gap=1, seed=7)
    for k in (0, 1, len(ds) - 1):
        want = ds.sample(k, np.random.default_rng([7, k]))
        got = ds[k]
        assert (got["ref_index"], got["target_index"]) == (want["ref_index"], want["target_index"])
        np.testing.assert_array_equal(got["hint"], want["hint"])  # same crop and flip
        np.testing.assert_array_equal(got["jpg"], want["jpg"])


def test_same_crop_and_flip_for_reference_and_target(clip_root):
    ds = PairDataset(clip_root, size=64, low=0.0, high=0.999, min_gap=1)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(20):
        k = int(rng.integers(len(ds)))
        item = ds.sample(k, np.random.default_rng(int(rng.integers(1 << 30))))
        i, j = item["ref_index"], item["target_index"]
        ref = item["hint"][..., :3]
        tgt = (item["jpg"] + 1) / 2
        # the texture pans 1 px/frame to the right: target = reference shifted by (j - i) px,
        # in the flipped direction if the pair was flipped
        d = j - i
        plain = np.abs(ref[:, d:] - tgt[:, :-d]).max() if d > 0 else np.abs(ref[:, :d] - tgt[:, -d:]).max()
        mirrored = np.abs(ref[:, :-d] - tgt[:, d:]).max() if d > 0 else np.abs(ref[:, -d:] - tgt[:, :d]).max()
        assert min(plain, mirrored) < 1e-6
        flips += mirrored < 1e-6
        np.testing.assert_allclose(item["hint"][..., 3], rgb_to_gray(tgt), atol=1e-5)
    assert 0 < flips < 20


def test_crop_sizes_and_no_augment(clip_root):
    band = dict(low=0.0, high=0.999, min_gap=1)
    ds = PairDataset(clip_root, size=(64, 128), seed=1, **band)
    assert ds[0]["jpg"].shape == (64, 128, 3) and ds[0]["hint"].shape == (64, 128, 4)
    with pytest.warns(UserWarning, match=r"frames are 160x64, smaller than the training size 128x128: they are "
                                         r"upscaled to it \(rebuild with build_pairs\.py --size of the training size\)"):
        up = PairDataset(clip_root, size=128, seed=1, **band)  # frames upscaled to cover 128x128 (said: a library
    assert up[0]["jpg"].shape == (128, 128, 3)  # user's PairDataset defaults to 512 on frames built at any size)
    centre = PairDataset(clip_root, size=64, augment=False, seed=1, **band)
    a, b = centre[3], centre[3]
    np.testing.assert_array_equal(a["jpg"], b["jpg"])
    src = panning_clip(40, 64, 160, speed=1)  # what clip_root was built from (lossless PNG)
    np.testing.assert_allclose(a["hint"][..., :3], src[a["ref_index"]][:, 48:112] / 255, atol=1e-6)
    np.testing.assert_allclose(a["jpg"], src[a["target_index"]][:, 48:112] / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 64"):
        PairDataset(clip_root, size=100, **band)
    with pytest.raises(ValueError, match=f"^{re.escape(str(clip_root))}: no pairs with 0.9999 < sim < 0.99999 and "
                                         f"gap >= 3 in movies pan$"):
        PairDataset(clip_root, size=64, low=0.9999, high=0.99999)


def test_sample_clip_batches(tmp_path):
    build_all([SAMPLE], tmp_path, BuildOptions(size=64), progress=False)
    ds = PairDataset(tmp_path, size=64)
    assert abs(len(ds) - 75) <= 2  # measured: 75 frames with a partner (~1e-3 shifts may flip a few)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=True, num_workers=0)))
    assert batch["jpg"].shape == (4, 64, 64, 3) and batch["hint"].shape == (4, 64, 64, 4)
    assert batch["txt"] == [" "] * 4
    assert ((batch["target_index"] - batch["ref_index"]).abs() >= 3).all()


@pytest.mark.parametrize("workers", [0, 1])
def test_validation_and_test_passes_leave_the_training_noise_alone(fake_root, workers):
    """Each pass over a loader without a generator of its own took its base seed from torch's
    global RNG, which the training noise is drawn from: a run with validation trained on other
    noise after its first validation (every weight differed from the same run without)."""
    torch.manual_seed(0)
    expected = torch.randn(4)
    for part in ("val", "test"):
        movies = {"val_movies": [], "test_movies": [], f"{part}_movies": ["film_b"]}
        dm = PairDataModule(fake_root, batch_size=1, num_workers=workers, size=64, **movies)
        dm.setup()
        torch.manual_seed(0)
        batches = list(getattr(dm, f"{part}_dataloader")())
        assert batches and torch.equal(torch.randn(4), expected)


def test_datamodule_splits_by_movie(fake_root):
    dm = PairDataModule(fake_root, batch_size=2, num_workers=0, size=64)
    dm.setup("fit")
    assert dm.train.movies == ["film_a"] and dm.val.movies == ["film_b"] and dm.test is None
    batch = next(iter(dm.train_dataloader()))
    assert batch["jpg"].shape == (2, 64, 64, 3) and set(batch["movie"]) == {"film_a"}
    assert batch["txt"] == [" ", " "]  # the default blank prompt
    assert len(list(dm.val_dataloader())) == 1
    dm = PairDataModule(fake_root, num_workers=0, size=64, prompt="a colour film still")
    dm.setup("fit")
    assert dm.train[0]["txt"] == dm.val[0]["txt"] == "a colour film still"
    dm = PairDataModule(fake_root, num_workers=0, size=64, val_movies=[], test_movies=["film_a"])
    dm.setup()
    assert dm.train.movies == ["film_b"] and dm.val is None and dm.test.movies == ["film_a"]
    with pytest.raises(ValueError, match="no finished movie named nope"):
        PairDataModule(fake_root, val_movies=["nope"]).setup()
    # film_b's only pair is 0.955 apart: a band without it leaves the held-out movie empty
    dm = PairDataModule(fake_root, num_workers=0, size=64, low=0.956)
    with pytest.warns(UserWarning, match=r"^no validation: the movie it holds out, film_b \(the last id\), has no "
                                         r"pairs in the band \(.*film_b.*\)$"):
        dm.setup("fit")
    assert dm.train.movies == ["film_a"] and dm.val is None
    assert dm.no_val == "the movie it holds out, film_b (the last id), has no pairs in the band"
    with pytest.raises(ValueError, match="no pairs"):  # asked for by name: an error
        PairDataModule(fake_root, num_workers=0, size=64, low=0.956, val_movies=["film_b"]).setup("fit")


def test_distributed_order_shards_the_data_and_changes_with_the_resume_step(fake_root):
    """Under DDP each process gets its own share, and a run resumed at step k does not replay
    the order of the run that started at step 0 (Lightning's sampler would: seed and epoch only)."""
    dm = PairDataModule(fake_root, batch_size=1, num_workers=0, size=64, val_movies=[], seed=7)
    dm.setup("fit")

    def order(rank, step):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, global_step=step)
        return list(dm.train_dataloader().sampler)

    a, b, n = order(0, 0), order(1, 0), len(dm.train)
    assert set(a + b) == set(range(n)) and len(a) == len(b) == -(-n // 2)  # all covered (padded to equal shares)
    assert len(set(a) & set(b)) == len(a) + len(b) - n  # overlapping only by the padding
    assert order(0, 0) == order(0, 0) and order(0, 40) != order(0, 0)
    dm.seed = 8
    assert order(0, 0) != a  # the run's seed orders it too
    dm.trainer = SimpleNamespace(world_size=3, global_rank=2, global_step=0)
    assert len(list(dm.train_dataloader().sampler)) == -(-n // 3)  # one share of three
    dm.trainer = None  # one process: torch's RNG orders the data (see ColorControlModule.on_train_start)
    assert not isinstance(dm.train_dataloader().sampler, torch.utils.data.DistributedSampler)


@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_loader_draws_other_batches_whatever_torchs_rng(tmp_path, world):
    """Order and partners come from (seed, step): with loader processes, torch's RNG was drawn
    from (by Lightning's first iter(), before on_train_start reseeded it) as seed_everything left
    it, so each resume replayed the first run's first batches, partners included (found by an
    audit: steps 3-5 after a resume were steps 0-2). Every frame here has 4 partners or more."""
    write_fake_movie(tmp_path, "film", table_from_pairs(12, 6, {(i, j): 0.95 for i in range(12) for j in range(12)
                                                                   if 3 <= abs(i - j) <= 6}), size=(64, 64))
    dm = PairDataModule(tmp_path, batch_size=2, num_workers=2, size=64, val_movies=[], seed=7)
    dm.setup("fit")

    def batches(step, rng_seed):
        torch.manual_seed(rng_seed)  # the global RNG as a run might have left it: no say in the order
        dm.trainer = SimpleNamespace(world_size=world, global_rank=0, global_step=step)
        loader = dm.train_dataloader()
        try:
            return [(b["ref_index"].tolist(), b["target_index"].tolist()) for b in loader]
        finally:
            loader._iterator = None  # its persistent workers end with it

    first = batches(0, 0)
    assert len(first) == -(-len(dm.train) // world) // 2 and first == batches(0, 123)  # a share, whole batches
    resumed = [batches(step, 0) for step in (3, 40)]
    assert all(r != first for r in resumed) and resumed[0] != resumed[1]


def test_datamodule_setup_builds_each_stages_datasets_once(fake_root, monkeypatch):
    """The training script calls setup("fit") to fail early, then Lightning calls it again (on
    every rank): the datasets are built once; other stages build only theirs."""
    import tutorial_dataset
    built = []

    class Counting(PairDataset):
        def __init__(self, root, movies, **kw):
            built.append(tuple(movies))
            super().__init__(root, movies, **kw)
    monkeypatch.setattr(tutorial_dataset, "PairDataset", Counting)
    dm = PairDataModule(fake_root, num_workers=0, size=64, test_movies=["film_b"], val_movies=[])
    dm.setup("fit")
    train = dm.train
    dm.setup("fit")
    dm.setup("validate")
    assert built == [("film_a",)] and dm.train is train and dm.val is None and dm.test is None
    dm.setup("test")
    dm.setup("test")
    dm.setup()
    assert built == [("film_a",), ("film_b",)] and dm.test.movies == ["film_b"] and dm.train is train
    dm = PairDataModule(fake_root, num_workers=0, size=64)
    dm.setup("predict")  # no datasets at all
    assert built[2:] == [] and dm.train is None and dm.val is None
    dm.setup("test")  # no test movies: nothing to build
    dm.setup("validate")
    assert dm.train is None and dm.test is None and dm.val.movies == ["film_b"]
    assert built[2:] == [("film_b",)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine: built, not run
def test_loaders_pin_memory_for_cuda_and_prefetch_with_workers(fake_root, monkeypatch):
    dm = PairDataModule(fake_root, batch_size=2, num_workers=0, size=64)  # defaults: pin iff CUDA
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.pin_memory == torch.cuda.is_available() and loader.prefetch_factor is None
    assert not loader.persistent_workers
    for accelerator, cuda, pinned in (("cpu", True, False), ("auto", True, True), ("gpu", True, True),
                                      ("auto", False, False)):  # only batches bound for a CUDA GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert PairDataModule(fake_root, accelerator=accelerator).pin_memory is pinned, (accelerator, cuda)
    monkeypatch.undo()
    for workers, factor in ((1, 4), (2, 2), (3, 2), (4, 2)):  # >= 4 batches queued, at least 2 per worker
        dm = PairDataModule(fake_root, batch_size=2, num_workers=workers, size=64, pin_memory=False)
        dm.setup("fit")
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (workers, factor, True)
            assert loader.pin_memory is False
    dm = PairDataModule(fake_root, batch_size=2, num_workers=1, size=64, pin_memory=True, prefetch_factor=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.pin_memory and loader.prefetch_factor == 3
    with pytest.warns(UserWarning, match="pin_memory") if not torch.cuda.is_available() else contextlib.nullcontext():
        batch = next(iter(loader))  # CPU-only: DataLoader warns and hands out unpinned batches
    assert batch["jpg"].shape == (2, 64, 64, 3) and batch["jpg"].is_pinned() == torch.cuda.is_available()


def test_latent_mode_cuts_the_cached_window_on_the_8_pixel_grid_and_never_flips(clip_root, tmp_path):
    from annotator.latent_cache import build_latent_cache, load_latents
    from tests.train_helpers import tiny_model

    root = Path(shutil.copytree(clip_root, tmp_path / "data"))
    fp = build_latent_cache(root, tiny_model("v2").first_stage_model, progress=False)["fingerprint"]
    ds = PairDataset(root, size=64, low=0.0, high=0.999, min_gap=1, vae_fingerprint=fp)
    cache = load_latents(root / ds.movies[0], fp)
    src = panning_clip(40, 64, 160, speed=1)  # what clip_root was built from (lossless PNG)
    offsets = set()
    for seed in range(20):
        item = ds.sample(seed % len(ds), np.random.default_rng(seed))
        i, j = item["ref_index"], item["target_index"]
        # where the crop sits: the (unflipped) reference crop is src[i][:, x0:x0+64] for one x0
        ref = item["hint"][..., :3]
        x0s = [x for x in range(160 - 64 + 1) if np.abs(ref - src[i][:, x : x + 64] / 255).max() < 1e-6]
        assert len(x0s) == 1 and x0s[0] % 8 == 0, x0s
        x0 = x0s[0]
        offsets.add(x0)
        # the target gives the hint its gray, from the same (unflipped) crop
        np.testing.assert_allclose(item["hint"][..., 3], rgb_to_gray(src[j][:, x0 : x0 + 64]), atol=1e-6)
        # only what the latent step uses: no target image (3 MB at 512x512), no reference std
        assert set(item) == {"txt", "hint", "movie", "ref_index", "target_index",
                             "jpg_latent_mean", "jpg_latent_std", "ref_latent_mean"}
        win = np.s_[:, :, x0 // 8 : x0 // 8 + 8]
        np.testing.assert_array_equal(item["jpg_latent_mean"], cache[j, 0][win].astype(np.float32))
        np.testing.assert_array_equal(item["jpg_latent_std"], cache[j, 1][win].astype(np.float32))
        np.testing.assert_array_equal(item["ref_latent_mean"], cache[i, 0][win].astype(np.float32))
    assert len(offsets) > 3  # the crops do move
    from annotator.latent_cache import LatentCacheError
    # what a spawn/forkserver loader process receives: the cache's file names, mapped again there,
    # not its contents (the pickle of memmaps held a copy of the whole cache)
    blob = pickle.dumps(ds)
    assert len(blob) < cache.nbytes / 4, (len(blob), cache.nbytes)
    copy = pickle.loads(blob)
    assert isinstance(copy.latents[0], np.memmap) and copy.latents[0]._mmap is not None
    for seed in range(3):
        a, b = ds.sample(seed, np.random.default_rng(seed)), copy.sample(seed, np.random.default_rng(seed))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(LatentCacheError, match="latent cache has no gray latents"):  # v3 on a cache without them
        PairDataset(root, size=64, low=0.0, high=0.999, min_gap=1, vae_fingerprint=fp, gray_latents=True)
    # a cache rebuilt after the run checked it (another VAE, --gray added) is not read unchecked
    build_latent_cache(root, tiny_model("v2").first_stage_model, progress=False, gray=True, overwrite=True)
    with pytest.raises(LatentCacheError, match=r"latents\.npy: the latent cache changed after the run checked it; "
                                               r"start the run again$"):
        pickle.loads(blob)


def test_training_sizes_and_movies_that_cannot_be_used_are_refused(fake_root, tmp_path):
    for size in ((64, 100), (100, 64), 0, -64, (0, 64), (64, 0), (64, -64)):
        with pytest.raises(ValueError, match="training size must be positive multiples of 64"):
            PairDataset(fake_root, size=size)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'empty'}: no finished movies \(run build_pairs\.py\)$"):
        PairDataset(tmp_path / "empty", size=64)
    with pytest.raises(ValueError, match=rf"^{fake_root / 'nope'}: not a finished movie$"):
        PairDataset(fake_root, ["film_a", "nope"], size=64)
    write_fake_movie(tmp_path / "big", "film_c", table_from_pairs(6, 4, {(1, 5): 0.955}), size=(192, 128))
    with pytest.raises(ValueError, match=r"film_c: frames are 192x128; latent mode needs them to cover the training "
                                         r"size 64x64 exactly in one side \(rebuild with build_pairs\.py --size\)$"):
        # refused before any cache is read
        PairDataset(tmp_path / "big", size=64, vae_fingerprint="any")


class Extreme:
    """A generator stub that always draws the last (or the first) choice, and never flips."""

    def __init__(self, last: bool):
        self.last = last

    def integers(self, n):
        return n - 1 if self.last else 0

    def random(self):
        return 0.9


def test_random_crops_reach_both_edges_of_the_frame(clip_root):
    ds = PairDataset(clip_root, size=64, low=0.0, high=0.999, min_gap=1)
    src = panning_clip(40, 64, 160, speed=1)  # what clip_root was built from (lossless PNG)
    for last, x0 in ((False, 0), (True, 160 - 64)):
        item = ds.sample(5, Extreme(last))
        assert item["target_index"] == ds.partners(5)[2][-1 if last else 0]
        np.testing.assert_allclose(item["hint"][..., :3], src[item["ref_index"]][:, x0 : x0 + 64] / 255, atol=1e-6)


def test_seeded_items_draw_independently_of_each_other(clip_root):
    """Item k is fixed by (seed, k); different items do not repeat one another's draws."""
    ds = PairDataset(clip_root, size=64, low=0.0, high=0.999, min_gap=1, seed=7)
    src = panning_clip(40, 64, 160, speed=1)
    offsets = set()
    for k in range(12):
        item = ds[k]
        ref = item["hint"][..., :3]
        i = item["ref_index"]
        found = [x for x in range(160 - 64 + 1) if np.abs(ref - src[i][:, x : x + 64] / 255).max() < 1e-6 or
                 np.abs(ref[:, ::-1] - src[i][:, x : x + 64] / 255).max() < 1e-6]
        offsets.update(found)
    assert len(offsets) > 3


@pytest.mark.parametrize("height, width, size, resized, interpolation, x0", [
    (128, 192, 64, (96, 64), "INTER_AREA", 16),  # scaled by 1/2, area averaging (no aliasing)
    (96, 160, 128, (214, 128), "INTER_CUBIC", 43),  # by 4/3 to 214x128, rounded up so the crop is covered
])
def test_frames_are_resized_to_the_crop_then_centre_cropped(tmp_path, height, width, size, resized, interpolation,
                                                            x0):
    """Larger frames are area-averaged down, smaller ones bicubic-upscaled; then centre-cropped."""
    import cv2

    from annotator.latent_cache import read_frame
    from annotator.pairs import frame_path

    src = write_folder(panning_clip(8, height, width, blur=0.7), tmp_path / "src")
    build_all([src], tmp_path / "d", BuildOptions(size=0, window=3, threads=1, image_format="png"), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = PairDataset(tmp_path / "d", size=size, augment=False, seed=0, low=0.0, high=0.999, min_gap=1)
    said = {"INTER_AREA": f"frames are {width}x{height}, larger than the training size {size}x{size} needs: every "
                          "item downscales two of them, which slows loading (rebuild with build_pairs.py --size of "
                          "the training size)",
            "INTER_CUBIC": f"frames are {width}x{height}, smaller than the training size {size}x{size}: they are "
                           "upscaled to it (rebuild with build_pairs.py --size of the training size)"}[interpolation]
    assert [str(w.message) for w in caught] == [f"{tmp_path / 'd' / 'src'}: {said}"]
    item = ds[2]
    frame = read_frame(frame_path(tmp_path / "d" / "src", item["target_index"], "png"))
    want = cv2.resize(frame, resized, interpolation=getattr(cv2, interpolation))[:, x0 : x0 + size]
    np.testing.assert_allclose(item["jpg"], want / 127.5 - 1, atol=1e-6)


def test_a_side_that_is_whole_but_for_float_rounding_is_not_rounded_up(tmp_path):
    """273x91 frames at size 64: 273 * (64 / 91) is 192.00000000000003 in floats; the frame is
    resized to 192 wide, as 273 * 64 / 91 = 192 says, not 193."""
    import cv2

    from annotator.pairs import frame_path

    d = write_fake_movie(tmp_path, "m", table_from_pairs(6, 4, {(1, 5): 0.955}), size=(273, 91))
    rng = np.random.default_rng(0)
    frames = {i: rng.integers(0, 256, (91, 273, 3), dtype=np.uint8) for i in (1, 5)}  # texture shows the resize
    for i, rgb in frames.items():
        cv2.imwrite(str(frame_path(d, i, "png")), rgb[..., ::-1])
    with pytest.warns(UserWarning, match="larger than the training size 64x64 needs"):
        item = PairDataset(tmp_path, size=64, augment=False, seed=0)[0]
    want = cv2.resize(frames[item["target_index"]], (192, 64), interpolation=cv2.INTER_AREA)[:, 64:128]
    np.testing.assert_allclose(item["jpg"], want / 127.5 - 1, atol=1e-6)


def test_datamodule_split_edge_cases(fake_root, tmp_path):
    """One movie trains (no validation); test movies are never held out for validation; a split
    that leaves nothing to train on, or test movies without pairs, are errors."""
    dm = PairDataModule(fake_root, num_workers=0, size=64, test_movies=["film_b"])
    dm.setup()
    assert dm.train.movies == ["film_a"] and dm.val is None and dm.test.movies == ["film_b"]
    assert dm.train.augment and not dm.test.augment
    assert sum(len(batch["movie"]) for batch in dm.test_dataloader()) == len(dm.test) == 2
    one = tmp_path / "one"
    shutil.copytree(fake_root / "film_a", one / "film_a")
    dm = PairDataModule(one, num_workers=0, size=64)
    dm.setup("fit")
    assert dm.train.movies == ["film_a"] and dm.val is None and dm.val_dataloader() == []
    assert dm.no_val == f"it holds out a whole movie, and {one} has no second one"
    dm = PairDataModule(fake_root, num_workers=0, size=64, test_movies=["film_b"])
    dm.setup("fit")
    assert dm.no_val == f"it holds out a whole movie, and {fake_root} has no second one besides the test movies"
    for val in ([], ["film_b"]):  # none or one asked for: nothing left to the split
        dm = PairDataModule(fake_root, num_workers=0, size=64, val_movies=val)
        dm.setup("fit")
        assert dm.no_val is None
    with pytest.raises(ValueError, match="no movies left for training"):
        PairDataModule(fake_root, val_movies=["film_a"], test_movies=["film_b"]).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'empty'}: no finished movies \(run build_pairs\.py\)$"):
        PairDataModule(tmp_path / "empty").setup()  # not "none left": there were none
    for ds in (lambda root: PairDataModule(root).setup(), PairDataset):  # a movie's folder given as the data root
        with pytest.raises(ValueError, match=rf"^{one / 'film_a'}: the folder of one movie; a data root is the folder "
                                             rf"that holds the movie folders \({one}\)$"):
            ds(one / "film_a")
    with pytest.raises(ValueError, match="no pairs"):
        PairDataModule(fake_root, num_workers=0, size=64, low=0.956, test_movies=["film_b"]).setup("test")


def test_validation_and_test_items_are_fixed_with_the_default_eval_seed_0(fake_root):
    """Seed 0 is a seed: validation and test draw item k's partner the same way every epoch."""
    dm = PairDataModule(fake_root, num_workers=0, size=64, val_movies=[], test_movies=["film_a"])
    dm.setup()
    k = next(k for k in range(len(dm.test)) if len(dm.test.partners(k)[2]) == 2)  # frame 0: partners 3 and 4
    torch.manual_seed(0)
    assert len({dm.test[k]["target_index"] for _ in range(20)}) == 1
    ds = PairDataset(fake_root, ["film_a"], size=64, seed=0)
    assert len({ds[k]["target_index"] for _ in range(20)}) == 1


def test_loaders_drop_only_a_short_training_batch_and_one_process_keeps_torchs_order(fake_root, monkeypatch):
    dm = PairDataModule(fake_root, batch_size=2, num_workers=0, size=64, accelerator="cuda")
    dm.setup("fit")
    assert dm.train_dataloader().drop_last and not dm.val_dataloader().drop_last
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=5)
    assert not isinstance(dm.train_dataloader().sampler, torch.utils.data.DistributedSampler)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert PairDataModule(fake_root, accelerator="cuda").pin_memory


def test_latent_mode_windows_of_a_wide_crop_a_tall_frame_and_the_gray_latent(clip_root, tmp_path):
    """Crop 64x128 of 64x160 frames: a latent window 16 wide; 168-high frames centre-cropped at
    y0 = 48 (on the grid), not 52, and 168-wide ones at x0 = 48; v3's gray latent is the target's;
    the data module hands its datasets the cache's fingerprint and the gray latents."""
    from annotator.latent_cache import build_latent_cache, load_latents
    from tests.train_helpers import tiny_model

    root = Path(shutil.copytree(clip_root, tmp_path / "data"))
    tall, broad = panning_clip(4, 168, 64, speed=1), panning_clip(4, 64, 168, speed=1)
    build_all([write_folder(tall, tmp_path / "src" / "tall"), write_folder(broad, tmp_path / "src" / "wide")], root,
              BuildOptions(size=64, window=2, image_format="png"), progress=False)
    fp = build_latent_cache(root, tiny_model("v2").first_stage_model, progress=False, gray=True)["fingerprint"]
    band = dict(low=0.0, high=0.999, min_gap=1, vae_fingerprint=fp, gray_latents=True)
    wide = PairDataset(root, ["pan"], size=(64, 128), augment=False, seed=0, **band)
    cache = load_latents(root / "pan", fp, gray=True)
    item = wide[3]
    j = item["target_index"]
    win = np.s_[:, :, 2:18]  # x0 = (160 - 128) // 2 = 16: latent columns 2 to 17
    assert item["jpg_latent_mean"].shape == (4, 8, 16)
    np.testing.assert_array_equal(item["jpg_latent_mean"], cache[j, 0][win].astype(np.float32))
    np.testing.assert_array_equal(item["gray_latent_mean"], cache[j, 2][win].astype(np.float32))
    item = PairDataset(root, ["tall"], size=64, augment=False, seed=0, **band)[1]
    np.testing.assert_allclose(item["hint"][..., :3], tall[item["ref_index"]][48:112] / 255, atol=1e-6)
    item = PairDataset(root, ["wide"], size=64, augment=False, seed=0, **band)[1]
    np.testing.assert_allclose(item["hint"][..., :3], broad[item["ref_index"]][:, 48:112] / 255, atol=1e-6)
    dm = PairDataModule(root, num_workers=0, size=64, low=0.0, high=0.999, min_gap=1, val_movies=["tall"],
                        test_movies=["wide"], vae_fingerprint=fp, gray_latents=True)
    dm.setup()
    for ds in (dm.train, dm.val, dm.test):
        assert {"jpg_latent_mean", "gray_latent_mean"} <= set(ds[0]) and "jpg" not in ds[0]


class Second:
    """A generator stub that draws the second choice (index 1) where there is one, and never flips."""

    def integers(self, n):
        return min(1, n - 1)

    def random(self):
        return 0.9


def test_latent_mode_random_crops_move_in_steps_of_8_in_both_directions(tmp_path):
    """Frames 168 high x 64 wide, crop 64: the crop may start at any multiple of 8 from 0 to 104
    (the second choice is 8, not 16; the last 104), and the latent window follows the crop down
    the frame: rows y0 / 8 to y0 / 8 + 8, as float32 (kills a coarser grid, a window that ignores y0
    and a float16 reference latent)."""
    from annotator.latent_cache import build_latent_cache, load_latents
    from tests.train_helpers import tiny_model

    tall = panning_clip(4, 168, 64, speed=1)
    build_all([write_folder(tall, tmp_path / "src" / "tall")], tmp_path / "data",
              BuildOptions(size=64, window=2, image_format="png"), progress=False)
    fp = build_latent_cache(tmp_path / "data", tiny_model("v2").first_stage_model, progress=False)["fingerprint"]
    ds = PairDataset(tmp_path / "data", size=64, low=0.0, high=0.999, min_gap=1, vae_fingerprint=fp)
    cache = load_latents(tmp_path / "data" / "tall", fp)
    for rng, y0 in ((Second(), 8), (Extreme(True), 104), (Extreme(False), 0)):
        item = ds.sample(1, rng)
        i, j = item["ref_index"], item["target_index"]
        np.testing.assert_allclose(item["hint"][..., :3], tall[i][y0 : y0 + 64] / 255, atol=1e-6)
        win = np.s_[:, y0 // 8 : y0 // 8 + 8, :]
        assert item["jpg_latent_mean"].shape == (4, 8, 8)
        assert {item[k].dtype for k in ("jpg_latent_mean", "jpg_latent_std", "ref_latent_mean")} == {np.dtype(np.float32)}
        np.testing.assert_array_equal(item["jpg_latent_mean"], cache[j, 0][win].astype(np.float32))
        np.testing.assert_array_equal(item["jpg_latent_std"], cache[j, 1][win].astype(np.float32))
        np.testing.assert_array_equal(item["ref_latent_mean"], cache[i, 0][win].astype(np.float32))


def _relaying(ready, go):
    leave_stops_to_the_run()
    ready.send("set")
    go.recv()  # the test's signals come meanwhile
    time.sleep(30)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="Linux: sigwaitinfo")
def test_a_loader_process_passes_a_sigterm_on_to_the_run_ignores_ctrl_c_and_ends_on_its_parents():
    """A scheduler's SIGTERM to every process of the job: a loader process that died of it inside the
    loader's shared lock left the run waiting for that lock for ever (a CI run hung)."""
    ctx = multiprocessing.get_context("fork")  # as DataLoader starts its workers on Linux
    ready, ready_child = ctx.Pipe()
    go_child, go = ctx.Pipe()
    heard = []
    signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))  # conftest puts pytest's back
    child = ctx.Process(target=_relaying, args=(ready_child, go_child), daemon=True)
    child.start()
    try:
        assert ready.poll(30) and ready.recv() == "set"
        subprocess.run(["kill", "-TERM", str(child.pid)], check=True)  # from another process, as a scheduler's
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            time.sleep(0.01)
        assert heard == [signal.SIGTERM] and child.is_alive()
        subprocess.run(["kill", "-INT", str(child.pid)], check=True)  # Ctrl-C: the terminal's whole group has it
        time.sleep(0.2)
        assert child.is_alive()
        go.send("on")
        os.kill(child.pid, signal.SIGTERM)  # the parent's: the loader ending a process that would not stop
        child.join(10)
        assert child.exitcode == 0 and heard == [signal.SIGTERM]
    finally:
        if child.is_alive():
            child.kill()


class _Draws(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, k):
        return torch.tensor([torch.rand(()).item(), np.random.rand(), random.random()], dtype=torch.float64)


def _draws(worker_init_fn) -> torch.Tensor:
    torch.manual_seed(7)
    return torch.cat(list(DataLoader(_Draws(), batch_size=2, num_workers=2, worker_init_fn=worker_init_fn)))


def test_loader_processes_are_seeded_as_lightning_seeds_them_and_by_rank(fake_root, monkeypatch):
    """The loaders' own worker_init_fn (the SIGTERM relay) replaces the one Lightning adds after
    seed_everything(workers=True): its seeding must stay, or the ranks of a DDP run draw the
    same partners (torch seeds a worker from the base seed and its id alone)."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)  # as the shell that runs the tests may set it
    plain = _draws(None)
    assert torch.equal(_draws(partial(start_loader_process, rank=0)), plain)  # no seed_everything(workers=True)
    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    ranks = [_draws(partial(start_loader_process, rank=r)) for r in (0, 1)]
    for r, drawn in enumerate(ranks):
        assert torch.equal(drawn, _draws(partial(pl_worker_init_function, rank=r)))
    assert not torch.equal(ranks[0], plain) and not torch.isin(ranks[0], ranks[1]).any()
    dm = PairDataModule(fake_root, batch_size=2, num_workers=1, size=64, pin_memory=False)
    dm.setup("fit")
    assert dm.train_dataloader().worker_init_fn.keywords == {"rank": None}  # Lightning's own rank_zero_only.rank
    dm.trainer = SimpleNamespace(world_size=1, global_rank=3, global_step=0)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert (loader.worker_init_fn.func, loader.worker_init_fn.keywords) == (start_loader_process, {"rank": 3})
