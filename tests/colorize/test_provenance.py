"""colorize/provenance.py: the settings record each output PNG carries."""
import argparse
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

from colorize import provenance as V
from colorize.frames_io import encode_png


def args(**changes):
    base = dict(method="model", input="/clips/a", reference=[], reference_frame=[0], gt=None, ckpt="/w/sd.ckpt",
                control=None, config=None, set=[], mode="fixed", steps=20, eta=0.0, seed=0, noise="shared", size=512,
                ref_guidance=1.0, raw=False, anchor_every=8, anchor_strength=1.0, batch=4, device="auto",
                precision="auto", cuda_graph=True, compile=False)
    return argparse.Namespace(**{**base, **changes})


def test_the_record_travels_in_a_png_that_every_reader_decodes_alike(tmp_path):
    rgb = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    for depth in (8, 16):
        plain = encode_png(rgb, depth)
        record = {"seed": "7", "reference": "[\"réf.png (sha256 0123)\"]"}  # UTF-8 kept (iTXt)
        path = tmp_path / f"f{depth}.png"
        path.write_bytes(V.with_record(plain, record))
        assert V.read_record(path) == record
        decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(decoded, cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_UNCHANGED))
        with Image.open(path) as im:  # Pillow checks every chunk's CRC
            im.load()
            assert im.info["colorize_inference"].startswith("{")
    (tmp_path / "plain.png").write_bytes(plain)
    assert V.read_record(tmp_path / "plain.png") is None  # an earlier version's frame
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a png")
    assert V.read_record(tmp_path / "x.jpg") is None and V.read_record(tmp_path / "missing.png") is None
    cut = V.with_record(plain, {"a": "b"})
    (tmp_path / "cut.png").write_bytes(cut[:40])  # inside the record's chunk
    assert V.read_record(tmp_path / "cut.png") is None
    bad = b"not json"
    chunk = struct.pack(">I", len(V.KEYWORD) + 5 + len(bad)) + b"iTXt" + V.KEYWORD + b"\0" * 5 + bad
    chunk += struct.pack(">I", zlib.crc32(chunk[4:]))
    (tmp_path / "bad.png").write_bytes(plain[:33] + chunk + plain[33:])
    assert V.read_record(tmp_path / "bad.png") is None


def test_settings_hold_what_decides_the_colours_not_how_they_are_computed(tmp_path):
    ref = tmp_path / "ref.png"
    ref.write_bytes(b"one")
    base = V.settings(args(reference=[str(ref)], reference_frame=[]))
    for same in (dict(batch=1), dict(device="cuda"), dict(precision="fp16"), dict(cuda_graph=False),
                 dict(compile=True), dict(input="/elsewhere/a"), dict(ckpt="/moved/sd.ckpt"), dict(config="x.yaml"),
                 dict(anchor_every=3)):  # anchoring: anchored mode only
        assert V.settings(args(reference=[str(ref)], reference_frame=[], **same)) == base, same
    for key, value in dict(seed=1, steps=10, eta=0.5, size=256, mode="recursive", noise="per-frame", raw=True,
                           ref_guidance=2.0, set=["model.x=1"], control="/w/c.safetensors", method="flow").items():
        assert V.settings(args(reference=[str(ref)], reference_frame=[], **{key: value})) != base, key
    ref.write_bytes(b"two")  # the reference's contents, not its name
    assert V.settings(args(reference=[str(ref)], reference_frame=[])) != base
    assert V.settings(args(method="reinhard")) == {"method": "reinhard", "input": "a", "reference": "[]",
                                                   "reference_frame": "[0]", "gt": "a"}
    anchored = V.settings(args(mode="anchored"))
    assert anchored["anchor_every"] == "8" and V.settings(args(mode="anchored", anchor_every=3)) != anchored


def test_weights_and_config_are_known_by_content_not_by_name_alone(tmp_path):
    """An export rewritten after more training has the same name and size: told apart. A copy
    elsewhere is the same; so is a config left out and the same file given."""
    import numpy as np

    w = tmp_path / "a" / "control.safetensors"
    w.parent.mkdir()
    rng = np.random.default_rng(0)
    w.write_bytes(rng.bytes(300_000))
    first = V.settings(args(control=str(w)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "control.safetensors").write_bytes(w.read_bytes())
    assert V.settings(args(control=str(tmp_path / "b" / "control.safetensors"))) == first
    data = bytearray(w.read_bytes())
    data[150_000] ^= 1  # one byte in the middle: more training changes every sample, one is enough here
    w.write_bytes(bytes(data))
    assert V.settings(args(control=str(w)))["control"] != first["control"]
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model: {}\n")
    from omegaconf import OmegaConf
    assert V.settings(args(), yaml) == V.settings(args(config=str(yaml)), yaml)
    assert V.settings(args(), OmegaConf.create({"model": {"a": 1}}))["config"].startswith("recorded in the weights")
    assert V.settings(args(), OmegaConf.create({"model": {"a": 2}})) != V.settings(
        args(), OmegaConf.create({"model": {"a": 1}}))


def test_a_long_record_is_read_whole(tmp_path):
    record = {"set": "[" + ", ".join(f'"model.k{i}=v{i}"' for i in range(2000)) + "]"}  # ~30 KB
    path = tmp_path / "f.png"
    path.write_bytes(V.with_record(encode_png(np.zeros((4, 4, 3), np.float32), 8), record))
    assert V.read_record(path) == record


def test_differences_name_each_flag_with_both_values():
    assert V.differences({"seed": "0", "reference": "[]", "ckpt": "a"}, {"seed": "7", "reference": "[\"r\"]"}) == [
        "--ckpt a (now: (none))", "--reference (none) (now: [\"r\"])", "--seed 0 (now: 7)"]
    assert V.differences({"seed": "0"}, {"seed": "0"}) == []
