"""build_latent_cache.py as a user runs it (the cache itself: tests/annotator/test_latent_cache.py)."""
from pathlib import Path

import build_latent_cache
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
