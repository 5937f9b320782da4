"""FrozenOpenCLIPEmbedder: SD2.1 checkpoint names, offline tokenizer, and the block math."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, Transformer

from ldm.modules.text_encoder import FrozenOpenCLIPEmbedder, text_config

FIXTURES = Path(__file__).parent.parent / "fixtures"
SOT, EOT = 49406, 49407


def tiny(layer="penultimate", layers=3):
    torch.manual_seed(0)
    enc = FrozenOpenCLIPEmbedder(layer=layer, width=32, heads=2, layers=layers)
    with torch.no_grad():  # non-trivial biases and LN affines, so every term is exercised
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return enc


def reference_context(enc, tokens, n_blocks):
    """Independent re-implementation of OpenCLIP's text transformer with plain torch ops."""
    sd = {k.removeprefix("model."): v.double() for k, v in enc.state_dict().items()}
    width, heads = sd["positional_embedding"].shape[1], 2
    B, L = tokens.shape
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(n_blocks):
        p = {k.removeprefix(f"transformer.resblocks.{i}."): v for k, v in sd.items()
             if k.startswith(f"transformer.resblocks.{i}.")}
        h = F.layer_norm(x, (width,), p["ln_1.weight"], p["ln_1.bias"], eps=1e-5)
        q, k, v = (h @ p["attn.in_proj_weight"].T + p["attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.view(B, L, heads, -1).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, L, width)
        x = x + o @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), p["ln_2.weight"], p["ln_2.bias"], eps=1e-5)
        h = F.gelu(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"])  # exact (erf) GELU
        x = x + h @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
    return F.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)


def test_vit_h_state_dict_matches_sd21_checkpoint_names_and_shapes():
    keys = json.loads((FIXTURES / "sd21_controlnet_keys.json").read_text())["keys"]
    expected = {k.removeprefix("cond_stage_model."): tuple(s) for k, s in keys.items()
                if k.startswith("cond_stage_model.")}
    enc = FrozenOpenCLIPEmbedder(device="meta")  # ViT-H-14 text tower, no memory, no download
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == expected
    assert len(got) == 294
    assert "attn_mask" in dict(enc.model.named_buffers())  # present, but not persistent


def test_a_narrower_tower_gets_a_projection_of_its_own_width():
    """ViT-H's embed_dim (1024) was sized for its width; a tiny width override takes the
    projection along (unless embed_dim is given too)."""
    enc = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=1, device="meta")
    assert tuple(enc.model.text_projection.shape) == (32, 32)
    assert text_config(width=32)["embed_dim"] == 32 and text_config(width=32, embed_dim=8)["embed_dim"] == 8
    assert text_config()["embed_dim"] == text_config()["width"] == 1024


def test_blank_prompt_tokenizes_to_sot_eot_then_padding():
    enc = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=1, device="meta")
    tokens = enc.tokenize([" ", "a red car"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, :2].tolist() == [SOT, EOT] and tokens[0, 2:].eq(0).all()
    n = int(tokens[1].ne(0).sum())
    assert tokens[1, 0] == SOT and tokens[1, n - 1] == EOT and n == 5  # a, red, car
    long = enc.tokenize(["word " * 200])[0]
    assert long[0] == SOT and long[-1] == EOT and long.ne(0).all()  # truncated, EOT kept


@pytest.mark.parametrize("layer,n_blocks", [("penultimate", 2), ("last", 3)])
def test_context_equals_independent_reimplementation(layer, n_blocks):
    enc = tiny(layer, layers=3).double()
    tokens = enc.tokenize(["a black and white film", " "])
    got = enc.encode(["a black and white film", " "])
    assert got.shape == (2, 77, 32) and got.dtype == torch.float64
    torch.testing.assert_close(got, reference_context(enc, tokens, n_blocks), rtol=0, atol=1e-10)


def test_penultimate_differs_from_last_and_is_deterministic():
    pen, last = tiny("penultimate"), tiny("last")
    a, b = pen(["a cat"]), last(["a cat"])
    assert (a - b).abs().max() > 1e-2
    torch.testing.assert_close(pen(["a cat"]), a, rtol=0, atol=0)


def test_sequence_first_layout_gives_the_same_context():
    """Older open_clip builds (L, B, D) resblocks; the encoder must follow the block's layout."""
    enc = tiny()
    expected = enc(["a gray street", "a dog"])
    lnd = Transformer(width=32, layers=3, heads=2, batch_first=False)
    lnd.load_state_dict(enc.model.transformer.state_dict())
    enc.model.transformer = lnd
    assert enc.model.batch_first is False
    torch.testing.assert_close(enc(["a gray street", "a dog"]), expected, rtol=1e-5, atol=1e-5)


def test_frozen_by_default_and_stays_in_eval():
    enc = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=1)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    trainable = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=1, freeze=False).train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_rejects_unknown_layer():
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPEmbedder(layer="middle", width=32, heads=2, layers=1, device="meta")


def test_open_clip_is_loaded_only_by_what_builds_a_tower_or_tokenises():
    """It and its torchvision took ~2 of colorize_inference.py --help's 4 s, baselines included."""
    import subprocess
    import sys
    code = ("import sys, colorize_inference, evaluate; print('open_clip' in sys.modules); "
            "from ldm.modules.text_encoder import text_config; text_config(layers=1); print('open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.split() == ["False", "True"]


def test_a_single_prompt_string_is_one_prompt():
    """A bare string is one prompt, not a batch of its characters."""
    enc = tiny()
    got = enc.encode("a cat")
    assert got.shape == (1, 77, 32)
    torch.testing.assert_close(got, enc.encode(["a cat"]), rtol=0, atol=0)


def test_tower_activation_follows_the_architecture_config():
    """The -quickgelu architectures were trained with QuickGELU; ViT-H-14 (SD2.1) with exact GELU."""
    assert text_config("ViT-B-32-quickgelu")["quick_gelu"] is True and text_config()["quick_gelu"] is False
    quick = FrozenOpenCLIPEmbedder("ViT-B-32-quickgelu", width=32, heads=2, layers=1, device="meta")
    plain = FrozenOpenCLIPEmbedder(width=32, heads=2, layers=1, device="meta")
    assert type(quick.model.transformer.resblocks[0].mlp.gelu) is QuickGELU
    assert type(plain.model.transformer.resblocks[0].mlp.gelu) is nn.GELU


@pytest.mark.parametrize("arch,says", [("ViT-Nope", "unknown open_clip architecture 'ViT-Nope'"),
                                       ("MobileCLIP-S1", r"\['no_causal_mask'\] are not supported"),
                                       ("coca_ViT-B-32", r"\['embed_cls'\] are not supported")])
def test_unknown_or_unsupported_architecture_is_refused(arch, says):
    """A text tower this module would build differently from open_clip is refused, not approximated."""
    with pytest.raises(ValueError, match=says):
        text_config(arch)


def test_an_option_set_false_is_not_refused():
    """MobileCLIP-B spells out no_causal_mask: false, a plain causal CLIP text tower."""
    assert text_config("MobileCLIP-B")["width"] == 512
