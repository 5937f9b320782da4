"""build_latent_cache.py as a user runs it (the cache itself: tests/annotator/test_latent_cache.py)."""
import re
from pathlib import Path

import pytest
import torch

import build_latent_cache
from annotator import latent_cache
from annotator.build_many import build_all
from annotator.latent_cache import LATENTS_META
from annotator.pairs import BuildOptions
from tests.annotator.clips import panning_clip, write_folder

TOY = Path(__file__).resolve().parents[2] / "models" / "toy" / "toy_color_v2.safetensors"


def test_a_movie_named_twice_in_movies_is_encoded_once(tmp_path, capsys, monkeypatch):
    """--movies pan pan encoded pan twice and said "latents built: 2" for one movie."""
    root = tmp_path / "data"
    build_all([write_folder(panning_clip(3, 16, 24), tmp_path / "pan")], root, BuildOptions(size=16, window=2),
              progress=False, log=lambda line: None)
    encoded = []
    real = build_latent_cache.load_vae

    def counting_vae(*args):
        vae = real(*args)
        encode = vae.encode
        vae.encode = lambda x: encoded.append(len(x)) or encode(x)
        return vae

    monkeypatch.setattr(build_latent_cache, "load_vae", counting_vae)
    rc = build_latent_cache.main([str(root), "--ckpt", str(TOY), "--device", "cpu", "--movies", "pan", "pan",
                                  "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "latents built: 1, already cached: 0" in out and sum(encoded) == 3
    assert (root / "pan" / LATENTS_META).is_file()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A DATA_ROOT with one finished movie, "pan" (3 frames of 16x24)."""
    tmp = tmp_path_factory.mktemp("blc")
    build_all([write_folder(panning_clip(3, 16, 24), tmp / "pan")], tmp / "data", BuildOptions(size=16, window=2),
              progress=False, log=lambda line: None)
    return tmp / "data"


class Spy:
    """Stands in for annotator.latent_cache.build_latent_cache: records what run() passes, logs a
    line and returns `result`."""

    def __init__(self, result=None, error=None):
        self.calls, self.error = [], error
        self.result = result or {"fingerprint": "0123456789abcdef", "built": ["pan"], "existing": [], "refused": [],
                                 "skipped": []}

    def __call__(self, data_root, vae, movies, batch_size, overwrite, autocast_dtype, *, progress, log, gray):
        self.calls.append(dict(data_root=data_root, vae=vae, movies=movies, batch_size=batch_size, overwrite=overwrite,
                               autocast_dtype=autocast_dtype, progress=progress, gray=gray))
        log("a line of the cache's")
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    monkeypatch.setattr(latent_cache, "build_latent_cache", s)
    return s


@pytest.mark.parametrize("extra, want", [
    ([], dict(batch_size=8, overwrite=False, autocast_dtype=None, progress=True, gray=False, movies=None)),
    (["--batch-size", "3", "--overwrite", "--precision", "bf16", "--no-progress", "--gray", "--movies", "pan"],
     dict(batch_size=3, overwrite=True, autocast_dtype=torch.bfloat16, progress=False, gray=True, movies=["pan"])),
    (["--precision", "16"], dict(autocast_dtype=torch.float16)),
    (["--precision", "32"], dict(autocast_dtype=None))])
def test_the_options_reach_the_cache_builder(data_root, spy, capsys, extra, want):
    assert build_latent_cache.main([str(data_root), "--ckpt", str(TOY), "--device", "cpu", *extra]) == 0
    (call,) = spy.calls
    assert {k: call[k] for k in want} == want and call["data_root"] == str(data_root)
    out, err = capsys.readouterr()
    assert err == "a line of the cache's\n"  # the builder's log goes to stderr
    assert out == ("VAE fingerprint 0123456789abcdef (tutorial_train_sd21_color_v2.py --use-latent-cache takes the "
                   "cache when the VAE of its --init has these weights)\n"
                   "latents built: 1, already cached: 0, refused (other weights): 0, skipped (a bad frame): 0\n")


def test_a_refused_movie_is_exit_1_and_counted(data_root, spy, capsys):
    spy.result = {"fingerprint": "f", "built": ["a", "b"], "existing": ["c"], "refused": ["d", "e", "f"], "skipped": []}
    assert build_latent_cache.main([str(data_root), "--ckpt", str(TOY), "--device", "cpu"]) == 1
    assert capsys.readouterr().out.endswith("latents built: 2, already cached: 1, refused (other weights): 3, "
                                            "skipped (a bad frame): 0\n")


def test_a_skipped_movie_is_exit_1_and_counted(data_root, spy, capsys):
    spy.result = {"fingerprint": "f", "built": ["a"], "existing": [], "refused": [], "skipped": ["b", "c"]}
    assert build_latent_cache.main([str(data_root), "--ckpt", str(TOY), "--device", "cpu"]) == 1
    assert capsys.readouterr().out.endswith("latents built: 1, already cached: 0, refused (other weights): 0, "
                                            "skipped (a bad frame): 2\n")


def test_config_checkpoint_pickle_and_device_are_passed_on(data_root, spy, monkeypatch):
    import colorize.loading

    seen = []
    real_vae, real_device = build_latent_cache.load_vae, colorize.loading.resolve_device
    monkeypatch.setattr(build_latent_cache, "load_vae", lambda *a: seen.append(a) or real_vae(None, TOY))
    monkeypatch.setattr(colorize.loading, "resolve_device", lambda name: seen.append(name) or real_device("cpu"))
    config = str(TOY.with_suffix(".yaml"))
    assert build_latent_cache.main([str(data_root), "--ckpt", "w.ckpt", "--config", config, "--allow-pickle",
                                    "--device", "meta-ish"]) == 0
    assert seen == ["meta-ish", (config, "w.ckpt", True)]
    seen.clear()
    assert build_latent_cache.main([str(data_root), "--ckpt", "w.ckpt"]) == 0
    assert seen == ["auto", (None, "w.ckpt", False)]


@pytest.mark.parametrize("error, line", [
    (RuntimeError("CUDA error: device-side assert triggered"),
     "build_latent_cache.py: error: CUDA error: device-side assert triggered\n"),
    (KeyError("latents"), "build_latent_cache.py: error: KeyError: 'latents'\n"),
    (KeyboardInterrupt(), "build_latent_cache.py: interrupted; finished movies are kept, rerun to resume\n")])
def test_errors_and_ctrl_c_while_encoding_are_one_line(data_root, monkeypatch, capsys, error, line):
    monkeypatch.setattr(latent_cache, "build_latent_cache", Spy(error=error))
    rc = build_latent_cache.main([str(data_root), "--ckpt", str(TOY), "--device", "cpu"])
    assert (rc, capsys.readouterr().err) == (130 if isinstance(error, KeyboardInterrupt) else 2,
                                             f"a line of the cache's\n{line}")


@pytest.mark.parametrize("signum, status, line", [
    ("SIGTERM", 143, "terminated (SIGTERM); finished movies are kept, rerun to resume"),
    ("SIGINT", 130, "interrupted; finished movies are kept, rerun to resume"),
])
def test_a_stop_that_a_library_turns_into_its_own_error_still_ends_as_a_stop(data_root, monkeypatch, capsys, signum,
                                                                              status, line):
    """A SIGTERM while safetensors read the checkpoint came out of it as a ValueError, and the run said
    "error: ...: truncated or not a safetensors file (could not determine the shape of object type
    'torch.storage.UntypedStorage')", exit 2 (seen stopping real runs at random moments); Ctrl-C too."""
    import signal

    from cldm.checkpoint import CheckpointError

    def load_vae(config, ckpt, allow_pickle):
        try:
            signal.raise_signal(getattr(signal, signum))  # run_cli's handler raises in here
        except KeyboardInterrupt:  # what the C code does with the pending exception
            raise CheckpointError(f"{ckpt}: truncated or not a safetensors file (could not determine the shape of "
                                  "object type 'torch.storage.UntypedStorage')") from None
        pytest.fail("no handler")

    monkeypatch.setattr(build_latent_cache, "load_vae", load_vae)
    monkeypatch.setattr(latent_cache, "build_latent_cache", lambda *a, **k: pytest.fail("went on"))
    rc = build_latent_cache.main([str(data_root), "--ckpt", str(TOY), "--device", "cpu"])
    assert (rc, capsys.readouterr().err) == (status, f"build_latent_cache.py: {line}\n")


class OnDevice:
    """A VAE stand-in that "moves" to any device (the encoding itself is the Spy's)."""

    def to(self, device):
        return self


@pytest.mark.parametrize("device, error, extra, advice", [
    ("cpu", MemoryError(), [], "lower it"),
    ("cpu", RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"), [],
     "lower it"),
    ("cuda:1", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), [],
     "lower it or use --precision bf16"),
    ("cuda:1", torch.OutOfMemoryError("CUDA out of memory."), ["--precision", "16"], "lower it"),
])
def test_out_of_memory_says_what_to_lower(data_root, monkeypatch, capsys, device, error, extra, advice):
    import colorize.loading

    monkeypatch.setattr(build_latent_cache, "load_vae", lambda *a: OnDevice())
    monkeypatch.setattr(colorize.loading, "resolve_device", lambda name: torch.device(device))
    monkeypatch.setattr(latent_cache, "build_latent_cache", Spy(error=error))
    rc = build_latent_cache.main([str(data_root), "--ckpt", str(TOY), "--batch-size", "6", *extra])
    line = (f"build_latent_cache.py: error: out of memory on {device} at --batch-size 6: {advice}; finished movies "
            "are kept, rerun to resume")
    assert (rc, capsys.readouterr().err) == (2, f"a line of the cache's\n{line}\n")


def test_bad_arguments_are_refused_before_the_checkpoint_is_read(tmp_path, data_root, capsys, monkeypatch):
    monkeypatch.setattr(build_latent_cache, "load_vae", lambda *a: pytest.fail("read the checkpoint"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    ckpt = ["--ckpt", str(tmp_path / "none.safetensors")]
    for argv, problem in [
            ([str(tmp_path / "missing")], f"DATA_ROOT {tmp_path / 'missing'} does not exist (build it with "
                                          f"build_pairs.py --out {tmp_path / 'missing'})"),
            ([str(tmp_path / "a_file")], f"DATA_ROOT {tmp_path / 'a_file'} is a file, not a folder"),
            ([str(tmp_path / "empty")], f"{tmp_path / 'empty'}: no finished movies to encode (build them with "
                                        f"build_pairs.py --out {tmp_path / 'empty'})"),
            ([str(tmp_path / "empty"), "--movies", "pan"], f"{tmp_path / 'empty' / 'pan'}: not a finished movie "
                                                           "(run build_pairs.py first)"),
            ([str(data_root), "--movies", "pan", "tilt"], f"{data_root / 'tilt'}: not a finished movie (run "
                                                          "build_pairs.py first)"),
            ([str(data_root), "--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
            ([str(tmp_path / "missing"), "--device", "foo"], "--device foo: expected auto, cpu, cuda or cuda:N (N "
                                                             "from 0)")]:
        assert build_latent_cache.main([*argv, *ckpt, "--no-progress"]) == 2
        assert capsys.readouterr().err == f"build_latent_cache.py: error: {problem}\n"


def test_a_movie_folder_given_for_data_root_names_its_parent(data_root, tmp_path, capsys, monkeypatch):
    """DATA_ROOT/pan given for DATA_ROOT said "no finished movies to encode (build them with
    build_pairs.py --out DATA_ROOT/pan)": advice that nests a movie inside a movie."""
    monkeypatch.setattr(build_latent_cache, "load_vae", lambda *a: pytest.fail("read the checkpoint"))
    rc = build_latent_cache.main([str(data_root / "pan"), "--ckpt", str(tmp_path / "none.safetensors"),
                                  "--no-progress"])
    assert (rc, capsys.readouterr().err) == (
        2, f"build_latent_cache.py: error: {data_root / 'pan'}: the folder of one movie; DATA_ROOT is the folder "
           f"that holds the movie folders ({data_root}; --movies pan for this one alone)\n")


def test_a_movie_folder_given_for_data_root_is_named_so_with_movies_given_too(data_root, tmp_path, capsys,
                                                                          monkeypatch):
    """`DATA_ROOT/pan --movies pan` is the same mistake: said the same way, not as a --movies
    problem of a root that holds no movies (kills checking is_finished only without --movies)."""
    monkeypatch.setattr(build_latent_cache, "load_vae", lambda *a: pytest.fail("read the checkpoint"))
    rc = build_latent_cache.main([str(data_root / "pan"), "--movies", "pan", "--ckpt",
                                  str(tmp_path / "none.safetensors"), "--no-progress"])
    assert (rc, capsys.readouterr().err) == (
        2, f"build_latent_cache.py: error: {data_root / 'pan'}: the folder of one movie; DATA_ROOT is the folder "
           f"that holds the movie folders ({data_root}; --movies pan for this one alone)\n")


def test_load_vae_takes_a_full_checkpoint_or_a_bare_vae_and_refuses_misfits(tmp_path):
    """Prefixed (first_stage_model.*) or bare VAE weights load the same; one tensor missing, or
    one of another shape, is refused naming the config (or the checkpoint that records it) and
    what the file looks like."""
    from cldm.checkpoint_fit import guess_kind
    from safetensors.torch import load_file, save_file

    full = load_file(TOY)
    vae = {k[len("first_stage_model."):]: v for k, v in full.items() if k.startswith("first_stage_model.")}
    config = TOY.with_suffix(".yaml")
    save_file(vae, tmp_path / "bare.safetensors")
    loaded = build_latent_cache.load_vae(config, tmp_path / "bare.safetensors").state_dict()
    assert loaded.keys() == vae.keys() and all(torch.equal(loaded[k], v) for k, v in vae.items())
    loaded = build_latent_cache.load_vae(None, TOY).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vae.items())

    lacking = {k: v for k, v in full.items() if k != "first_stage_model.decoder.conv_out.bias"}
    save_file(lacking, tmp_path / "lacking.safetensors", metadata={"config": config.read_text()})
    lack = re.escape(str(tmp_path / "lacking.safetensors"))
    with pytest.raises(ValueError, match=rf"^{lack}: VAE weights do not fit the config saved in {lack}: "
                                         r"the checkpoint's \(all\)\* does not match the model \(1 missing, e\.g\. "
                                         r"first_stage_model\.decoder\.conv_out\.bias\)$"):
        build_latent_cache.load_vae(None, tmp_path / "lacking.safetensors")
    wide = {**full, "first_stage_model.encoder.conv_in.weight": torch.zeros(7, 3, 3, 3)}  # the whole file's kind
    save_file(wide, tmp_path / "wide.safetensors")
    assert guess_kind(wide).startswith("ours: colour ControlNet v2")
    with pytest.raises(ValueError, match=rf"; likely .*\(the file looks like: {re.escape(guess_kind(wide))}\)$"):
        build_latent_cache.load_vae(config, tmp_path / "wide.safetensors")
