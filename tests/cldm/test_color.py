"""Colour-variant inputs: channel counts and the exact maps concatenated to the latent."""
import pytest
import torch

from cldm import color
from cldm.color import (
    ColorCondition, build_concat, extra_channels, gray_to_latent_size, join_hint, needs_gray_latent, needs_ref_latent,
    split_hint,
)


def test_extra_channels_and_encodes_per_variant():
    """What callers ask instead of comparing names (the pipeline's reference encode, training's
    gray latents from the cache, the FLOP counts)."""
    assert [extra_channels(v) for v in ("v1", "v2", "v3")] == [0, 5, 8]
    assert [needs_ref_latent(v) for v in ("v1", "v2", "v3")] == [False, True, True]
    assert [needs_gray_latent(v) for v in ("v1", "v2", "v3")] == [False, False, True]
    for ask in (needs_ref_latent, needs_gray_latent):
        with pytest.raises(ValueError, match="color_variant must be one of"):
            ask("v4")


def test_gray_is_area_averaged_and_scaled_to_minus_one_one():
    gray = torch.zeros(1, 1, 16, 16)
    gray[..., :8, :8] = 1.0  # top-left latent cell white, rest black
    gray[..., 8:, 8:12] = 1.0  # half of the bottom-right cell white
    small = gray_to_latent_size(gray, (2, 2))
    torch.testing.assert_close(small, torch.tensor([[[[1.0, -1.0], [-1.0, 0.0]]]]))


def test_v2_concat_is_ref_latent_then_gray_and_v3_uses_gray_latent():
    ref, gray = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16)
    seen = []

    def encode(img):  # stand-in VAE: records its input, returns a recognisable latent
        seen.append(img)
        return img[:, :1, ::8, ::8].repeat(1, 4, 1, 1) + len(seen) * 10

    assert build_concat("v1", ref, gray, encode, (2, 2)) is None and seen == []
    c2 = build_concat("v2", ref, gray, encode, (2, 2))
    torch.testing.assert_close(seen[0], ref * 2 - 1)
    assert c2.shape == (2, 5, 2, 2)
    ref_latent = (ref * 2 - 1)[:, :1, ::8, ::8].repeat(1, 4, 1, 1) + 10  # encode's output for the reference
    torch.testing.assert_close(c2[:, :4], ref_latent, rtol=0, atol=0)
    torch.testing.assert_close(c2[:, 4:], gray_to_latent_size(gray, (2, 2)))
    seen.clear()
    c3 = build_concat("v3", ref, gray, encode, (2, 2))
    torch.testing.assert_close(seen[1], gray.repeat(1, 3, 1, 1) * 2 - 1)
    assert c3.shape == (2, 8, 2, 2)
    torch.testing.assert_close(c3[:, :4], ref_latent, rtol=0, atol=0)  # first encode = reference
    torch.testing.assert_close(c3[:, 4:], (gray * 2 - 1)[:, :1, ::8, ::8].repeat(1, 4, 1, 1) + 20, rtol=0, atol=0)
    cached = torch.full((2, 4, 2, 2), 7.0)
    seen.clear()
    c = build_concat("v3", ref, gray, encode, (2, 2), ref_latent=cached, gray_latent=cached)
    assert seen == [] and torch.all(c == 7)  # latent cache: no encodes


def test_condition_cat_stacks_every_field_in_order_and_keeps_a_missing_concat_missing():
    cond = ColorCondition(torch.randn(4, 77, 8), torch.randn(4, 8, 2, 2), torch.randn(4, 5, 2, 2))
    parts = [ColorCondition(cond.context[a:b], cond.guided_hint[a:b], cond.concat[a:b]) for a, b in ((0, 1), (1, 4))]
    back = ColorCondition.cat(parts)
    for a, b in zip((cond.context, cond.guided_hint, cond.concat), (back.context, back.guided_hint, back.concat)):
        assert torch.equal(a, b)
    v1 = ColorCondition.cat([ColorCondition(cond.context, cond.guided_hint, None)] * 2)
    assert v1.concat is None and len(v1) == 8 and torch.equal(v1.guided_hint[4:], cond.guided_hint)
    for mixed in ([cond, ColorCondition(cond.context, cond.guided_hint, None)],
                  [ColorCondition(cond.context, cond.guided_hint, None), cond]):  # the first alone would drop it
        with pytest.raises(ValueError, match=r"^conditions with a concat \(v2/v3\) and without \(v1\) cannot share"):
            ColorCondition.cat(mixed)
    with pytest.raises(ValueError):
        extra_channels("v9")


def test_split_hint_is_reference_rgb_then_target_gray():
    hint = torch.arange(4.0).view(1, 4, 1, 1).expand(2, 4, 3, 5)
    ref, gray = split_hint(hint)
    assert ref.shape == (2, 3, 3, 5) and gray.shape == (2, 1, 3, 5)
    assert ref[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0] and torch.all(gray == 3.0)
    with pytest.raises(ValueError, match=r"hint must be \(B, 4, H, W\)"):
        split_hint(hint[:, :3])


def test_split_hint_refuses_a_hint_of_another_rank():
    """A (4, H, W) hint with H = 4, or a 5-D one, has 4 at dim 1 too: refused, not sliced."""
    for shape in [(4, 4, 8), (1, 4, 8, 8, 1)]:
        with pytest.raises(ValueError, match=r"hint must be \(B, 4, H, W\)"):
            split_hint(torch.rand(shape))


def test_join_hint_is_the_datasets_hint_and_split_hints_inverse():
    """Inference's hint (join_hint) equals training's (make_hint, HWC numpy) channel for channel."""
    import numpy as np

    from tutorial_dataset import make_hint

    rng = np.random.default_rng(0)
    ref, tgt = (rng.integers(0, 256, (6, 10, 3), dtype=np.uint8) for _ in range(2))
    trained = torch.from_numpy(make_hint(ref, tgt)).permute(2, 0, 1)[None]
    joined = join_hint(torch.from_numpy(ref).permute(2, 0, 1)[None].float() / 255, trained[:, 3:])
    assert torch.equal(joined, trained)
    assert all(torch.equal(a, b) for a, b in zip(split_hint(joined), (joined[:, :3], joined[:, 3:])))
    with pytest.raises(ValueError, match=r"hint parts must be \(B, 3, H, W\) and \(B, 1, H, W\)"):
        join_hint(trained[:, 3:], trained[:, :3])  # the parts swapped


def test_gray_is_the_mean_over_each_latent_cell_not_a_sample():
    """One white pixel in a 4x4 cell: the cell's mean 1/16 -> 2/16 - 1 = -0.875. Bilinear
    (no antialias) would sample the cell's centre and miss it; nearest would take one corner."""
    gray = torch.zeros(1, 1, 8, 8)
    gray[..., 4, 5] = 1.0  # bottom-right cell, inside but off its centre
    torch.testing.assert_close(gray_to_latent_size(gray, (2, 2)),
                               torch.tensor([[[[-1.0, -1.0], [-1.0, -0.875]]]]), rtol=0, atol=1e-7)


def test_v2_concat_keeps_the_cached_latents_dtype():
    """A bf16 reference latent (from the latent cache) gives a bf16 concat: the gray plane is
    cast to it, not the whole concat promoted to float32."""
    ref_latent = torch.randn(1, 4, 2, 2).bfloat16()
    c = build_concat("v2", torch.rand(1, 3, 16, 16), torch.ones(1, 1, 16, 16), None, (2, 2), ref_latent=ref_latent)
    assert c.dtype == torch.bfloat16 and torch.equal(c[:, :4], ref_latent) and torch.all(c[:, 4] == 1)


def test_build_concat_refuses_an_unknown_variant_before_encoding():
    """'v4' or a typo is refused, not run as v3 (the branch every non-v2 variant falls to)."""
    seen = []
    for variant in ("v4", "V2", ""):
        with pytest.raises(ValueError, match=r"^color_variant must be one of \['v1', 'v2', 'v3'\]"):
            build_concat(variant, torch.rand(1, 3, 16, 16), torch.rand(1, 1, 16, 16),
                         lambda img: seen.append(img) or torch.zeros(1, 4, 2, 2), (2, 2))
    assert seen == []


def test_a_variant_added_to_variants_alone_is_refused_by_build_concat(monkeypatch):
    """A new variant given only its channel count in VARIANTS has no concat yet: an error, not
    v3's (the branch every variant past v2 once fell to)."""
    monkeypatch.setitem(color.VARIANTS, "v4", 4)
    with pytest.raises(ValueError, match=r"^build_concat has no rule for colour variant 'v4'$"):
        build_concat("v4", torch.rand(1, 3, 16, 16), torch.rand(1, 1, 16, 16), lambda img: torch.zeros(1, 4, 2, 2),
                     (2, 2))
