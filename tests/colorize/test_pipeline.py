"""colorize.pipeline with a random tiny model on frames of the sample clip (64 px model frames)."""
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from annotator.color import rgb_to_gray, rgb_to_lab
from annotator.similarity import fast_resize
from annotator.video import FrameSourceError, iter_frames
from benchmarks.bench_inference import fixed_serial
from cldm.color import VARIANTS
from cldm.config import TINY_CONFIG, load_config
from cldm.model import create_model
from colorize import loading as L, pipeline as P, references as R
from ldm import sampler
from ldm.schedule import schedule_buffers
from tests.colorize.tiny_model import tiny_model
from tests.helpers import CrossDeviceCopies, named_pipe

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "bigbuckbunny.mp4"
FAST = dict(size=64, steps=2)  # 64x128 model frames, 2 DDIM steps
LUMA_TOL = 1e-5  # float32 rounding of the YCbCr recombination


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def clip():
    """Colour frames 0-5 and 120-125 of the sample clip at 1/9 size: 80x143, an odd size."""
    keep = set(range(6)) | set(range(120, 126))
    frames = {}
    for i, _, rgb in iter_frames(SAMPLE, check_count=False):
        if i in keep:
            frames[i] = np.ascontiguousarray(rgb[::9, ::9])
        if i >= 125:
            break
    return frames


def grays_of(clip, idx):
    return [rgb_to_gray(clip[i]) for i in idx]


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_resize_stays_in_range_where_bicubic_overshoots():
    """Upscaling uses bicubic (annotator.similarity.fast_resize), which rings past a hard edge:
    model inputs and output frames are clipped back to [0, 1]."""
    step = np.zeros((8, 8), np.float32)
    step[:, 4:] = 1.0
    up = P.resize(step, (32, 32))
    assert up.shape == (32, 32) and up.min() == 0.0 and up.max() == 1.0
    raw = fast_resize(step, 32, 32)
    assert raw.min() < 0 and raw.max() > 1  # the overshoot that is clipped
    np.testing.assert_array_equal(up, np.clip(raw, 0, 1))


def test_model_size_rounds_to_64_keeping_aspect():
    assert P.model_size(720, 1280, 512) == (512, 896)
    assert P.model_size(1280, 720, 512) == (896, 512)
    assert P.model_size(720, 1280, 64) == (64, 128)
    assert P.model_size(80, 143, 64) == (64, 128)
    assert P.model_size(45, 67, 64) == (64, 64)  # 95 rounds to 64
    assert P.model_size(1080, 1920, 500) == (512, 896)  # 500 itself rounds to 512
    for h, w in [(33, 1000), (999, 17), (64, 64)]:
        assert all(s % 64 == 0 and s >= 64 for s in P.model_size(h, w, 256))
    assert P.model_size(100, 100, 16) == (64, 64)  # a size that rounds to 0: still one multiple
    assert P.model_size(720, 1280, 256) == (256, 448)
    assert P.model_size(720, 1280, 256, model_multiple=32) == (256, 448)  # the tiny model's: 64 still
    assert P.model_size(720, 1280, 256, model_multiple=128) == (256, 512)  # a 4th UNet downsampling's


def test_a_unet_that_needs_sides_of_128_colours():
    """Model frames were multiples of 64 whatever the model: a config with a 4th UNet downsampling (SD2.1 has 3)
    (sides of 128) passed the config check, then failed with "hint height and width must be
    multiples of 128 ... got 64x128"."""
    torch.manual_seed(0)
    model = create_model(load_config(TINY_CONFIG, ["model.unet.channel_mult=[1,2,2,2,2]"])).eval()
    assert model.size_multiple == 128
    gray = np.random.default_rng(0).random((48, 160), dtype=np.float32)
    ref = np.random.default_rng(1).random((48, 160, 3), dtype=np.float32)
    colorizer = P.Colorizer(model, gray.shape, P.Options(size=64, steps=1))
    assert colorizer.hw == (128, 256)  # 64 x 192 with sides of 64
    out = list(P.colorize(model, [gray], ref, size=64, steps=1))
    assert out[0].shape == (48, 160, 3) and np.isfinite(out[0]).all()


def test_a_model_frame_side_above_the_cap_is_refused_even_when_the_other_is_small(model):
    """The cap is on the longer side: a narrow 400x20 strip at size 512 would be 10240x512,
    refused; 4096 itself is allowed."""
    with pytest.raises(P.InferenceError, match=r"^frames of 400x20 at size 512 mean model frames of 10240x512; "
                                               r"sides above 4096 are refused"):
        P.Colorizer(model, (20, 400), P.Options(size=512))
    assert P.Colorizer(model, (64, 512), P.Options(size=512)).hw == (512, 4096)


def test_to_gray_depths_channels_and_colour_flag():
    g8 = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    gray, colour = P.to_gray(g8)
    assert not colour and np.allclose(gray, g8 / 255.0, atol=1e-7)
    gray, colour = P.to_gray(np.repeat(g8[..., None], 3, axis=2))  # gray stored as RGB
    assert not colour and np.allclose(gray, g8 / 255.0, atol=1e-6)
    g16 = np.full((3, 4), 1000, np.uint16)  # 1000/65535 is not an 8-bit level: precision kept
    assert np.allclose(P.to_gray(g16)[0], 1000 / 65535, atol=1e-7)
    assert np.allclose(P.to_gray(np.dstack([g16, g16]))[0], 1000 / 65535, atol=1e-7)  # gray + alpha
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 7
    gray, colour = P.to_gray(rgba)
    assert colour and np.allclose(gray, 0.299, atol=1e-6)


def test_both_modes_keep_size_count_and_exact_lightness(model, clip):
    grays = grays_of(clip, range(3))
    for mode in ("fixed", "recursive"):
        out = list(P.colorize(model, grays, clip[3], mode, batch=2, **FAST))
        assert len(out) == 3
        for o, g in zip(out, grays):
            assert o.shape == (80, 143, 3) and o.dtype == np.float32
            assert np.abs(rgb_to_gray(o) - g).max() < LUMA_TOL
            assert np.ptp(rgb_to_lab(o)[..., 1:]) > 1.0  # it is coloured, not gray
    raw = list(P.colorize_fixed(model, grays[:1], clip[3], raw=True, **FAST))[0]
    assert raw.shape == (80, 143, 3) and np.abs(rgb_to_gray(raw) - grays[0]).max() > 0.05


def test_decoded_values_past_minus_one_one_are_clamped_before_the_resize(model, clip, monkeypatch):
    """The decoder can overshoot [-1, 1]; its RGB is clamped to [0, 1] at model size, *then*
    resized to the frame: an overshoot of 3 is the 1 it passes, also where the resize mixes it
    with its neighbours (clipping only after the resize would mix in the 2 of (3 + 1) / 2)."""
    def step_decoder(hi):
        def decode(z):
            h, w = (s * model.latent_factor for s in z.shape[-2:])
            out = torch.full((z.shape[0], 3, h, w), -1.0)
            out[..., : w // 2] = hi  # left half bright (past the range for hi > 1), right half black
            return out
        return decode

    col = P.Colorizer(model, (80, 143), P.Options(raw=True, **FAST))
    gray, ref = grays_of(clip, [0])[0], col.reference(clip[3])
    got = {}
    for hi in (1.0, 3.0):
        monkeypatch.setattr(model, "decode_first_stage", step_decoder(hi))
        got[hi] = col.run([gray], [0], [ref])[0]
    step = np.zeros((64, 128), np.float32)
    step[:, :64] = 1.0  # the clamped decoder output as RGB in [0, 1]
    want = np.clip(fast_resize(step, 143, 80), 0, 1)  # bicubic up to 80x143, as the test above
    for hi in (1.0, 3.0):
        np.testing.assert_allclose(got[hi], np.repeat(want[..., None], 3, axis=2), rtol=0, atol=1e-6)


def test_colour_and_uint8_frames_are_taken_as_their_luma(model, clip):
    a = list(P.colorize_fixed(model, [clip[0]], clip[3], **FAST))[0]
    b = list(P.colorize_fixed(model, grays_of(clip, [0]), clip[3], **FAST))[0]
    assert np.abs(a - b).max() < 1e-6


def test_seeds_are_distinct_and_reproducible():
    """torch's CPU generator keeps the low 32 bits of a seed: (seed % 2**31) * 2**32 + index made
    every seed give the noise of seed 0. Every (seed, index) must now give its own noise."""
    draw = lambda g: torch.randn(16, generator=g)  # noqa: E731
    frame = {(s, i): draw(P.frame_generator(s, i)) for s in (0, 1, 2**31, 2**32, -1) for i in (0, 1, 5)}
    clip = {s: draw(P.clip_generator(s)) for s in (0, 1, 2**31, 2**32, -1)}  # 2**32: seed 0's, fed to torch as is
    values = list(frame.values()) + list(clip.values())
    for a in range(len(values)):
        for b in range(a):
            assert (values[a] - values[b]).abs().max() > 0.1, (a, b)
    assert torch.equal(draw(P.frame_generator(1, 5)), frame[1, 5])  # the same seed reproduces
    assert torch.equal(draw(P.clip_generator(1)), clip[1])
    assert torch.equal(draw(P.frame_generator(2**64 + 1, 5)), frame[1, 5])  # seeds are taken mod 2**64
    assert torch.equal(draw(P.clip_generator(2**64 + 1)), clip[1])


@pytest.mark.parametrize("noise", P.NOISES)
def test_seed_changes_the_result_and_reproduces(model, clip, noise):
    grays = grays_of(clip, range(2))
    run = lambda seed: list(P.colorize_fixed(model, grays, clip[3], seed=seed, noise=noise, **FAST))  # noqa: E731
    a = run(0)
    assert max_diff(run(0), a) == 0.0
    assert max_diff(run(1), a) > 1e-3
    assert max_diff(run(2**31), a) > 1e-3


@pytest.mark.parametrize("noise", P.NOISES)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_fixed_batched_equals_frame_by_frame(model, clip, eta, noise):
    grays = grays_of(clip, range(5))
    kw = dict(eta=eta, noise=noise, **FAST)
    batched = list(P.colorize_fixed(model, grays, clip[3], batch=3, **kw))
    single = list(P.colorize_fixed(model, grays, clip[3], batch=1, **kw))
    assert max_diff(batched, single) < 1e-5
    # a clip in parts (--frames): frame 2 alone, started at index 2, is the same frame
    alone = list(P.colorize_fixed(model, grays[2:3], clip[3], start=2, **kw))
    assert max_diff(alone, batched[2:3]) < 1e-5
    parts = list(P.colorize_fixed(model, grays[:2], clip[3], batch=2, **kw))
    parts += list(P.colorize_fixed(model, grays[2:], clip[3], start=2, batch=2, **kw))
    assert max_diff(parts, batched) < 1e-5
    # per-frame noise depends on the index, shared noise does not
    elsewhere = list(P.colorize_fixed(model, grays[2:3], clip[3], start=7, **kw))
    if noise == "per-frame":
        assert max_diff(elsewhere, alone) > 1e-3
    else:
        assert max_diff(elsewhere, alone) < 1e-5


def test_fixed_mode_queues_the_next_batch_before_finishing_one(model, clip, monkeypatch):
    """Batch k+1 is launched before batch k is finished (so GPU sampling overlaps CPU finishing),
    and the frames come out in order and equal to launching and finishing each batch in turn."""
    grays = grays_of(clip, range(5))
    calls = []
    launch, finish = P.Colorizer.launch, P.Colorizer.finish

    def logged_launch(self, chunk, indices, refs, **kw):
        calls.append(("launch", list(indices)))
        return launch(self, chunk, indices, refs, **kw)

    def logged_finish(self, pending, pool=None):
        calls.append(("finish", len(pending.grays)))
        return finish(self, pending, pool)

    monkeypatch.setattr(P.Colorizer, "launch", logged_launch)
    monkeypatch.setattr(P.Colorizer, "finish", logged_finish)
    out = list(P.colorize_fixed(model, grays, clip[3], batch=2, **FAST))
    assert calls == [("launch", [0, 1]), ("launch", [2, 3]), ("finish", 2), ("launch", [4]), ("finish", 2),
                     ("finish", 1)]
    monkeypatch.undo()
    serial = list(fixed_serial(model, grays, clip[3], 2, **FAST))
    assert len(out) == 5 and max_diff(out, serial) == 0.0


@pytest.mark.parametrize("noise", P.NOISES)
def test_padded_last_batch_keeps_one_shape_and_the_same_frames(model, clip, noise, monkeypatch):
    """pad_batches (set by --compile) runs a short last batch at full size: the model sees one batch
    shape only, the padding frames are dropped, and the real frames are what they are unpadded."""
    grays = grays_of(clip, range(5))
    plain = list(P.colorize_fixed(model, grays, clip[3], batch=3, noise=noise, **FAST))
    sizes, sample = [], P.sample_latents
    monkeypatch.setattr(P, "sample_latents", lambda m, cond, *a: sizes.append(len(cond)) or sample(m, cond, *a))
    padded = list(P.colorize_fixed(model, grays, clip[3], batch=3, noise=noise, pad_batches=True, **FAST))
    assert sizes == [3, 3] and len(padded) == 5
    assert max_diff(padded, plain) < 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_shared_noise_is_the_same_for_every_frame_at_every_step(model, eta):
    """Two rows with the same conditioning: equal with shared noise, different with per-frame noise.
    With eta > 0 equal rows also show that each step's noise is shared, not just x_T."""
    hint = torch.rand(1, 4, 64, 128, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    cond = model.prepare_condition(hint, [""] * 2)
    shared = P.sample_latents(model, cond, P.clip_generator(3), steps=2, eta=eta)
    torch.testing.assert_close(shared[0], shared[1], rtol=0, atol=1e-6)
    own = P.sample_latents(model, cond, [P.frame_generator(3, i) for i in (0, 1)], steps=2, eta=eta)
    assert (own[0] - own[1]).abs().max() > 0.1


@pytest.mark.parametrize("field, value, problem", [
    ("size", 0, "must be >= 1 (got 0)"), ("steps", 0, "must be >= 1 (got 0)"), ("batch", 0, "must be >= 1 (got 0)"),
    ("eta", -0.1, "must be >= 0 (got -0.1)"), ("eta", 1.5, "must be <= 1 (got 1.5)"),
    ("anchor_every", -1, "must be >= 0 (got -1)"),
    ("anchor_strength", 1.5, "must be in [0, 1] (got 1.5)"), ("noise", "none", "must be one of shared, per-frame"),
    ("precision", "fp8", "must be auto or one of fp32, fp16, bf16"),
])
def test_options_name_the_bad_field(field, value, problem):
    with pytest.raises(P.OptionError) as e:
        P.Options(**{field: value})
    assert (e.value.field, str(e.value).startswith(f"{field} {problem}")) == (field, True)
    assert isinstance(e.value, P.InferenceError)


def test_options_take_their_bounds():
    """The ends of each range are allowed: eta 0 (DDIM) and 1 (DDPM-like noise), anchoring 0 and 1."""
    for kw in (dict(eta=0.0), dict(eta=1.0), dict(anchor_strength=0.0), dict(anchor_strength=1.0),
               dict(anchor_every=0), dict(size=1, steps=1, batch=1)):
        P.Options(**kw)


def test_step_counts_the_schedule_cannot_hold_are_refused(model, clip):
    with pytest.raises(P.OptionError, match=r"^steps must be between 1 and 500 for the model's 1000-step noise "
                                            r"schedule \(got 501\)$") as e:
        list(P.colorize_fixed(model, grays_of(clip, [0]), clip[3], size=64, steps=501))
    assert e.value.field == "steps"
    calls = []  # 3 steps: spacing 333 would reach t = 1000 (the reference fails there); that one is dropped
    hook = model.control_model.register_forward_pre_hook(lambda m, a: calls.append(int(a[2][0])))
    try:
        list(P.colorize_fixed(model, grays_of(clip, [0]), clip[3], size=64, steps=3))
    finally:
        hook.remove()
    assert calls == [667, 334, 1]


def test_sample_latents_equals_core_ddim(model):
    hint = torch.rand(2, 4, 64, 128, generator=torch.Generator().manual_seed(1))
    cond = model.prepare_condition(hint, [""] * 2)
    gens = [P.frame_generator(0, i) for i in (0, 1)]
    x_T = torch.stack([torch.randn(4, 8, 16, generator=P.frame_generator(0, i)) for i in (0, 1)])
    ours = P.sample_latents(model, cond, gens, steps=2)
    core = model.sample(cond, x_T=x_T, steps=2)
    torch.testing.assert_close(ours, core, rtol=0, atol=1e-5)
    # shared noise: one x_T for both rows
    x_T = torch.randn(1, 4, 8, 16, generator=P.clip_generator(0)).repeat(2, 1, 1, 1)
    ours = P.sample_latents(model, cond, P.clip_generator(0), steps=2)
    torch.testing.assert_close(ours, model.sample(cond, x_T=x_T, steps=2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_sample_latents_with_eta_draws_fresh_noise_for_x_t_and_every_step(model, shared):
    """eta > 0: x_T, then each DDIM step's noise, are successive draws of the generator(s), as
    core ddim_sample with a noise_fn drawing in that order; reusing x_T's draw as every step's
    noise would correlate the noise with the start and still be seeded and reproducible."""
    hint = torch.rand(2, 4, 64, 128, generator=torch.Generator().manual_seed(1))
    cond = model.prepare_condition(hint, [""] * 2)
    gens = P.clip_generator(0) if shared else [P.frame_generator(0, i) for i in (0, 1)]
    ours = P.sample_latents(model, cond, gens, steps=2, eta=0.5)
    if shared:
        g = P.clip_generator(0)
        draw = lambda shape: torch.randn((1, *shape[1:]), generator=g).expand(shape)  # noqa: E731
    else:
        gs = [P.frame_generator(0, i) for i in (0, 1)]
        draw = lambda shape: torch.stack([torch.randn(shape[1:], generator=g) for g in gs])  # noqa: E731
    x_T = draw((2, 4, 8, 16))
    core = sampler.ddim_sample(lambda x, t: model.apply_model(x, t, cond), x_T, model.alphas_cumprod, steps=2,
                               eta=0.5, parameterization=model.parameterization, noise_fn=draw)
    torch.testing.assert_close(ours, core, rtol=0, atol=1e-5)  # same arithmetic, one batch: measured 0


def test_recursive_per_frame_noise_is_seeded_by_each_frames_index(model, clip):
    """Per-frame noise in the sequential modes: frame t draws from (seed, start + t), as fixed mode
    does, so a chain run from `start` is reproducible frame by frame."""
    grays = grays_of(clip, range(3))
    kw = dict(noise="per-frame", **FAST)
    rec = list(P.colorize_recursive(model, grays, clip[3], start=5, **kw))
    for t in (1, 2):
        again = list(P.colorize_fixed(model, [grays[t]], rec[t - 1], start=5 + t, **kw))[0]
        assert np.abs(again - rec[t]).max() < 1e-5
    other = list(P.colorize_fixed(model, [grays[2]], rec[1], start=5, **kw))[0]
    assert np.abs(other - rec[2]).max() > 1e-3  # and the index matters (per-frame noise)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inference_conditions_the_model_as_training_does(tmp_path, variant):
    """The pipeline feeds the model what it was trained on: for a pair of stored frames, the
    ColorCondition built from the reference frame and the target's gray (Colorizer.reference,
    .condition) equals the one training builds from the dataset's item of that pair
    (PairDataset -> ColorControlModule.condition): hint channels and ranges, reference and
    gray latents, prompt. float32 throughout; tolerance 1e-6 for summation order."""
    from torch.utils.data import default_collate

    from annotator.latent_cache import read_frame
    from annotator.pairs import frame_path
    from cldm.lightning import ColorControlModule
    from tests.train_helpers import tiny_data_root
    from tutorial_dataset import PairDataset

    data = tiny_data_root(tmp_path, movies=1, frames=6, height=64, width=128, image_format="png")
    item = PairDataset(data, low=0, high=1, min_gap=1, size=(64, 128), augment=False).sample(0, np.random.default_rng(0))
    batch = default_collate([{k: item[k] for k in ("hint", "jpg", "txt")}])
    model = tiny_model(variant=variant)
    want = ColorControlModule(model).condition(batch)

    movie = data / item["movie"]
    ref, tgt = (read_frame(frame_path(movie, item[k], "png")) for k in ("ref_index", "target_index"))
    assert ref.shape == (64, 128, 3) and (ref != tgt).any()
    c = P.Colorizer(model, tgt.shape[:2], P.Options(size=64, precision="fp32"))
    assert c.hw == (64, 128)  # no resize: the frames are at model size
    got = c.condition(c.model_grays([P.to_gray(tgt)[0]]), [c.reference(ref)])
    for field in ("context", "guided_hint", "concat"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None) == (field == "concat" and variant == "v1"), field
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=field)


def test_reference_guidance_is_uncond_plus_scale_times_the_difference(model):
    """sample_latents with ref_guidance g: each step's output is u + g (c - u), with c and u the
    model's outputs for the condition and the unconditional one, run separately here."""
    g = torch.Generator().manual_seed(3)
    hint = torch.rand(2, 4, 64, 128, generator=g)
    cond = model.prepare_condition(hint, [""] * 2)
    uncond = model.prepare_condition(torch.cat([torch.zeros(2, 3, 64, 128), hint[:, 3:]], 1), [""] * 2)
    ours = P.sample_latents(model, cond, P.clip_generator(0), steps=2, uncond=uncond, ref_guidance=2.5)
    x_T = torch.randn(1, 4, 8, 16, generator=P.clip_generator(0)).repeat(2, 1, 1, 1)

    def guided(x, t):
        c, u = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
        return u + 2.5 * (c - u)

    want = sampler.ddim_sample(guided, x_T, model.alphas_cumprod, 2, 0.0, model.parameterization)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4)  # one batch of 4 vs two of 2: summation order
    plain = P.sample_latents(model, cond, P.clip_generator(0), steps=2)
    assert (ours - plain).abs().max() > 1e-3  # guidance changed something


def test_recursive_conditions_each_frame_on_the_previous_output(model, clip):
    grays = grays_of(clip, range(4))
    rec = list(P.colorize_recursive(model, grays, clip[3], **FAST))
    fixed = list(P.colorize_fixed(model, grays, clip[3], **FAST))
    assert np.abs(rec[0] - fixed[0]).max() < 1e-5  # frame 0 uses the reference itself (batch 1 vs 4)
    for t in range(1, 4):  # by construction: frame t == fixed mode with reference = output t-1
        again = list(P.colorize_fixed(model, [grays[t]], rec[t - 1], start=t, **FAST))[0]
        assert np.abs(again - rec[t]).max() < 1e-5
        assert np.abs(rec[t] - fixed[t]).max() > 1e-3  # and that is not the fixed result


def test_anchored_pulls_back_and_reanchors(model, clip):
    grays = grays_of(clip, range(4))
    ref = clip[3]
    out = list(P.colorize_anchored(model, grays, ref, anchor_every=2, anchor_strength=0.5, **FAST))
    fixed = list(P.colorize_fixed(model, grays, ref, **FAST))
    stats = R.chroma_stats(ref)
    assert np.abs(out[0] - fixed[0]).max() < 1e-5
    assert np.abs(out[2] - fixed[2]).max() < 1e-5  # every 2nd frame: the original reference again
    for t in (1, 3):  # otherwise: the previous output at model size, its chroma statistics pulled back
        prev = R.anchor_colours(P.resize(out[t - 1], (64, 128)), stats, 0.5)
        again = list(P.colorize_fixed(model, [grays[t]], prev, start=t, **FAST))[0]
        assert np.abs(again - out[t]).max() < 1e-5


def test_several_references_switch_at_a_cut(model, clip):
    """Frames 0-2 and 120-122 (a cut between); references: colour frames 3 and 125."""
    idx = [0, 1, 2, 120, 121, 122]
    grays = grays_of(clip, idx)
    refs = [clip[3], clip[125]]
    choose = R.ReferenceChooser(refs)
    assert [choose(g) for g in grays] == [0, 0, 0, 1, 1, 1]
    for k, r in enumerate(refs):  # references are compared by their luma: a reference's own gray scores 1
        assert choose.scores(rgb_to_gray(r))[k] == pytest.approx(1.0, abs=1e-6)
    both = list(P.colorize_fixed(model, grays, refs, batch=4, **FAST))
    only_a = list(P.colorize_fixed(model, grays[:3], refs[0], **FAST))
    only_b = list(P.colorize_fixed(model, grays[3:], refs[1], start=3, **FAST))
    assert max_diff(both, only_a + only_b) < 1e-5
    rec = list(P.colorize_recursive(model, grays, refs, **FAST))
    assert np.abs(rec[3] - both[3]).max() < 1e-5  # the chain restarts from reference b at the cut
    # anchored: after the cut, outputs are pulled towards reference b's colour statistics
    anc = list(P.colorize_anchored(model, grays, refs, anchor_every=0, anchor_strength=1.0, **FAST))
    prev = R.anchor_colours(P.resize(anc[3], (64, 128)), R.chroma_stats(refs[1]), 1.0)
    again = list(P.colorize_fixed(model, [grays[4]], prev, start=4, **FAST))[0]
    assert np.abs(again - anc[4]).max() < 1e-5


def test_reference_guidance_uses_a_black_reference_as_uncond(model, clip):
    grays = grays_of(clip, range(2))
    off = list(P.colorize_fixed(model, grays, clip[3], **FAST))
    on = list(P.colorize_fixed(model, grays, clip[3], ref_guidance=3.0, batch=2, **FAST))
    single = list(P.colorize_fixed(model, grays, clip[3], ref_guidance=3.0, batch=1, **FAST))
    assert max_diff(on, single) < 1e-5 and max_diff(on, off) > 1e-3
    black = list(P.colorize_fixed(model, grays, np.zeros_like(clip[3]), **FAST))
    # with the reference black, cond == uncond, so any guidance scale changes nothing
    black_g = list(P.colorize_fixed(model, grays, np.zeros_like(clip[3]), ref_guidance=3.0, **FAST))
    assert max_diff(black, black_g) < 1e-5


def test_reduced_precision_runs_close_to_fp32(model, clip):
    grays = grays_of(clip, range(2))
    fp32 = list(P.colorize_fixed(model, grays, clip[3], **FAST))
    bf16 = list(P.colorize_fixed(model, grays, clip[3], precision="bf16", **FAST))
    fp16 = list(P.colorize_fixed(model, grays, clip[3], precision="fp16", **FAST))
    assert 1e-4 < max_diff(fp32, bf16) < 0.04  # bf16 keeps 8 bits of mantissa (measured 0.018)
    assert 1e-5 < max_diff(fp32, fp16) < 0.005  # fp16 11 bits (measured 0.0018)
    assert max_diff(bf16, fp16) > 1e-4  # each ran in its own dtype: not fp32, nor one for both


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_weights_held_in_half_precision_give_the_autocast_result(clip, precision, dtype):
    """cast_weights (the CLI's, for fp16/bf16) leaves out exactly the casts autocast made: the
    frames equal those of float32 weights under the same autocast, bit for bit. Norms, schedule
    buffers and text encoder stay float32."""
    grays = grays_of(clip, range(3))
    kw = dict(batch=3, precision=precision, **FAST)
    model = tiny_model()
    want = list(P.colorize_fixed(model, grays, clip[3], **kw))
    L.cast_weights(model, dtype)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for part in (model.control_model, model.model, model.first_stage_model):
        for module in part.modules():
            for p in module.parameters(recurse=False):
                assert p.dtype == (torch.float32 if isinstance(module, norms) else dtype)
    assert sum(p.dtype == dtype for p in model.parameters()) > 100
    assert model.alphas_cumprod.dtype == torch.float32
    assert {p.dtype for p in model.cond_stage_model.parameters()} == {torch.float32}
    got = list(P.colorize_fixed(model, grays, clip[3], **kw))
    assert max_diff(got, want) == 0.0


def test_frame_folders_keep_depth_and_names(tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    cv2.imwrite(str(d / "f2.png"), np.full((5, 7), 1000, np.uint16))
    cv2.imwrite(str(d / "f10.tif"), np.full((5, 7, 3), 40000, np.uint16))
    cv2.imwrite(str(d / "f1.jpg"), np.full((5, 7, 3), (10, 200, 30), np.uint8))  # colour (BGR)
    frames = list(P.iter_gray_frames(d))
    assert [f.name for f in frames] == ["f1.png", "f2.png", "f10.png"]
    assert [f.depth for f in frames] == [8, 16, 16]
    assert [f.colour for f in frames] == [True, False, False]
    assert np.allclose(frames[1].gray, 1000 / 65535, atol=1e-7)
    assert np.allclose(frames[2].gray, 40000 / 65535, atol=1e-6)
    assert P.output_names(d) == ["f1.png", "f2.png", "f10.png"]
    cv2.imwrite(str(d / "f1.png"), np.zeros((5, 7), np.uint8))
    with pytest.raises(FrameSourceError, match="f1.png"):
        P.output_names(d)
    (d / "f1.png").unlink()
    cv2.imwrite(str(d / "f3.png"), np.zeros((6, 7), np.uint8))
    with pytest.raises(FrameSourceError, match="f3.png: frame is 7x6"):
        list(P.iter_gray_frames(d))


def test_frame_range_reads_nothing_outside_it(tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    for i in range(6):
        cv2.imwrite(str(d / f"f{i}.png"), np.full((5, 7), 10 * i, np.uint8))
    (d / "f0.png").write_bytes(b"broken")  # before the range
    (d / "f4.png").write_bytes(b"broken")  # after it
    frames = list(P.iter_gray_frames(d, 1, 4))
    assert [(f.index, f.name) for f in frames] == [(1, "f1.png"), (2, "f2.png"), (3, "f3.png")]
    assert [float(f.gray[0, 0]) * 255 for f in frames] == pytest.approx([10, 20, 30], abs=1e-4)
    assert [f.index for f in P.iter_gray_frames(d, 5)] == [5]
    assert list(P.iter_gray_frames(d, 6)) == []
    with pytest.raises(FrameSourceError, match="f4.png: not a readable image"):
        list(P.iter_gray_frames(d, 3))
    with pytest.raises(FrameSourceError, match="f0.png"):
        list(P.iter_gray_frames(d))
    # a reference frame is read alone too
    cv2.imwrite(str(d / "f2.png"), np.full((5, 7, 3), (10, 20, 30), np.uint8))  # BGR
    np.testing.assert_allclose(P.reference_frame(d, 2)[0, 0], np.array([30, 20, 10]) / 255, atol=1e-7)
    with pytest.raises(P.InferenceError, match="has no frame 6"):
        P.reference_frame(d, 6)


def test_video_range_skips_to_the_start_and_stops(clip):
    frames = list(P.iter_gray_frames(SAMPLE, 3, 5))
    assert [(f.index, f.name, f.depth) for f in frames] == [(3, "000003.png", 8), (4, "000004.png", 8)]
    for f in frames:  # the frames a full decode gives
        assert np.abs(f.gray[::9, ::9] - rgb_to_gray(clip[f.index])).max() < 1e-6
    np.testing.assert_allclose(P.reference_frame(SAMPLE, 4)[::9, ::9], clip[4] / 255.0, atol=1e-6)
    with pytest.raises(FrameSourceError, match="video has only 132 frames"):
        list(P.iter_gray_frames(SAMPLE, 140))
    with pytest.raises(P.InferenceError, match="has no frame 200"):
        P.reference_frame(SAMPLE, 200)


def test_finish_refuses_nan_naming_the_frame(model):
    """clamp keeps NaN, which would be written as black: finish raises, naming the clip frame."""
    col = P.Colorizer(model, (8, 8), P.Options(size=64))
    grays = [np.full((8, 8), 0.5, np.float32)] * 3
    rgb = torch.full((3, 64, 64, 3), 0.5)
    assert len(col.finish(P.Pending(rgb.clone(), None, grays, [4, 5, 6]))) == 3
    rgb[1, 7, 9, 2] = float("nan")
    with pytest.raises(P.InferenceError, match="output for frame 5 is NaN"):
        col.finish(P.Pending(rgb, None, grays, [4, 5, 6]))


WEIGHTS = "the weights may be damaged or wrong (the --ckpt or --control file)"


@pytest.mark.parametrize("options, why", [
    (dict(), WEIGHTS),  # was "the weights or settings overflow (a --ref-guidance far from 1, fp16 ...)"
    (dict(ref_guidance=30.0), f"{WEIGHTS}, or the settings overflow (--ref-guidance 30: try one nearer 1)"),
    (dict(precision="fp16"), f"{WEIGHTS}, or the settings overflow (fp16, which may not hold the weights: try "
                             "--precision fp32)"),
    (dict(precision="bf16", ref_guidance=0.0), f"{WEIGHTS}, or the settings overflow (--ref-guidance 0: try one "
                                               "nearer 1; bf16, which may not hold the weights: try --precision fp32)"),
])
def test_a_nan_output_blames_the_weights_and_only_the_settings_the_run_has(model, options, why):
    """A damaged checkpoint gives NaN in a plain fp32 run too, where --precision fp32 and a
    --ref-guidance near 1 are already so."""
    col = P.Colorizer(model, (8, 8), P.Options(size=64, **options))
    rgb = torch.full((1, 64, 64, 3), float("nan"))
    with pytest.raises(P.InferenceError) as e:
        col.finish(P.Pending(rgb, None, [np.full((8, 8), 0.5, np.float32)], [3]))
    assert str(e.value) == f"the model's output for frame 3 is NaN or infinite: {why}"

def test_video_outputs_are_numbered_from_zero(tmp_path):
    from tests.annotator.clips import panning_clip, write_video

    video = write_video(panning_clip(3, 32, 48), tmp_path / "v.avi")
    assert P.output_names(video) == ["000000.png", "000001.png", "000002.png"]


@pytest.mark.parametrize("shared", [True, False])
def test_a_batchs_noise_reaches_the_device_in_one_copy(shared):
    """x_T and every step's noise (eta > 0) are drawn on the CPU; moved step by step, each copy
    would be a blocking host-to-device copy, so the host could not queue steps ahead of the GPU.
    `meta` stands in for the accelerator: the copies must not grow with the step count."""
    with torch.device("meta"):
        model = create_model(load_config(TINY_CONFIG)).eval()
        cond = model.prepare_condition(torch.empty(2, 4, 64, 64), context=torch.empty(2, 77, 32))
    model.alphas_cumprod = schedule_buffers()["alphas_cumprod"]  # the sampler reads its schedule on the CPU
    counts = []
    for steps in (3, 6):
        gens = torch.Generator() if shared else [torch.Generator(), torch.Generator()]
        with CrossDeviceCopies() as copies:
            z = P.sample_latents(model, cond, gens, steps=steps, eta=1.0)
        assert z.device.type == "meta" and z.shape == (2, 4, 8, 8)
        counts.append(copies.count)
    assert counts[0] == counts[1] <= 4, counts


def test_a_reference_of_32_bit_integers_is_refused_naming_it(tmp_path):
    """Its int32 pixels went through as floats in [0, 1] (a reference nearly white), or, now that
    to_float refuses them, as a bare ValueError and a traceback."""
    ref = tmp_path / "ref.tif"
    assert cv2.imwrite(str(ref), np.full((8, 8, 3), 100, np.int32))
    with pytest.raises(P.InferenceError, match=f"^{ref}: reference unsupported pixel type int32$"):
        P.read_reference(ref)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_read_reference_says_what_is_no_image_file(tmp_path):
    with pytest.raises(P.InferenceError, match=r"nope\.png: reference image not found$"):
        P.read_reference(tmp_path / "nope.png")
    with pytest.raises(P.InferenceError, match=r": reference image is a folder$"):
        P.read_reference(tmp_path)
    with named_pipe(tmp_path / "ref.png") as pipe, pytest.raises(
            P.InferenceError, match=r"ref\.png: reference image not a regular file \(a named pipe, socket or "
                                    r"device\)$"):
        P.read_reference(pipe)  # was "not found"; the read would block


def test_a_reference_with_alpha_or_gray_reads_as_rgb(tmp_path):
    """Gray+alpha and RGBA files (as PIL and OpenCV write them) come out of read_reference as
    RGB HW3, alpha ignored: decode_image drops alpha, so read_reference needs no branch of its
    own for 2- or 4-channel arrays (such a branch was removed as unreachable)."""
    from PIL import Image

    gray = np.full((4, 5), 51, np.uint8)
    Image.fromarray(np.dstack([gray, np.full_like(gray, 7)]), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([np.full((4, 5, 3), (10, 20, 30), np.uint8), np.full_like(gray, 7)]),
                    "RGBA").save(tmp_path / "rgba.png")
    bgra16 = np.zeros((4, 5, 4), np.uint16)
    bgra16[...] = (3000, 2000, 1000, 0)  # BGRA on disk
    assert cv2.imwrite(str(tmp_path / "rgba16.png"), bgra16)
    assert cv2.imwrite(str(tmp_path / "g.png"), gray)
    for name, want in [("la.png", [51 / 255] * 3), ("rgba.png", [10 / 255, 20 / 255, 30 / 255]),
                       ("rgba16.png", [1000 / 65535, 2000 / 65535, 3000 / 65535]), ("g.png", [51 / 255] * 3)]:
        ref = P.read_reference(tmp_path / name)
        assert ref.shape == (4, 5, 3) and ref.dtype == np.float32 and ref.flags.c_contiguous, name
        np.testing.assert_allclose(ref, np.broadcast_to(want, ref.shape), atol=1e-7, err_msg=name)


def test_library_calls_are_checked_at_the_call_and_follow_cast_weights():
    """A notebook's mistakes: settings and references were checked only at the first next() (a
    typo of a mode returned a generator), a CHW reference came out as stripes, and weights held
    in bfloat16 met float32 inputs deep in a convolution unless precision was set by hand."""
    model = tiny_model()
    gray, ref = np.full((32, 48), 0.5, np.float32), np.full((32, 48, 3), 0.4, np.float32)
    with pytest.raises(ValueError, match="^unknown mode 'fixd'"):
        P.colorize(model, [gray], ref, "fixd")
    with pytest.raises(P.OptionError, match="^steps must be >= 1"):
        P.colorize(model, [gray], ref, steps=0)
    with pytest.raises(P.OptionError, match=r"^steps must be between 1 and \d+ for the model"):  # its schedule
        P.colorize(model, [gray], ref, steps=5000)
    with pytest.raises(P.InferenceError, match=r"^reference: pixel type int64: pass uint8, uint16 or float"):
        P.colorize(model, [gray], np.full((32, 48, 3), 100))
    with pytest.raises(P.InferenceError, match=r"^reference: expected an HxWx3 \(or x4\) RGB image, got shape "
                                               r"\(3, 32, 48\)$"):
        P.colorize(model, [gray], np.ascontiguousarray(ref.transpose(2, 0, 1)))
    with pytest.raises(P.InferenceError, match=r"^frame: float pixels are taken as \[0, 1\]"):
        next(P.colorize(model, [gray * 255], ref, size=32, steps=1))
    fp32 = next(P.colorize(model, [gray], ref, size=32, steps=2))
    L.cast_weights(model, torch.bfloat16)
    bf16 = next(P.colorize(model, [gray], ref, size=32, steps=2))  # "auto" follows the weights
    assert bf16.shape == fp32.shape and np.abs(bf16 - fp32).max() < 0.05
    with pytest.raises(P.InferenceError, match=r"^the model's weights are held in torch\.bfloat16 \(cast_weights\): "
                                               r"precision must be auto or the same, got 'fp32'$"):
        P.colorize(model, [gray], ref, size=32, steps=2, precision="fp32")  # at the call


def test_frames_carry_their_own_index_for_per_frame_noise(tmp_path):
    """Frames 3.. read as `Frame`s (iter_gray_frames(start=3)) seeded frame 0's noise unless
    start=3 was given as well: their result differed from the same frames in a whole run."""
    model = tiny_model()
    clip = [np.full((32, 48), v, np.float32) for v in (0.2, 0.3, 0.4, 0.5, 0.6)]
    ref = np.full((32, 48, 3), 0.4, np.float32)
    kw = dict(size=32, steps=2, noise="per-frame", eta=1.0, batch=1)
    whole = list(P.colorize(model, clip, ref, **kw))
    frames = [P.Frame(i, f"{i}.png", g, 8, False) for i, g in enumerate(clip)]
    part = list(P.colorize(model, frames[3:], ref, **kw))
    assert all(np.array_equal(a, b) for a, b in zip(part, whole[3:]))
    first = next(P.colorize(model, frames[3:], ref, "recursive", **kw))  # a chain's start: as fixed mode's frame 3
    assert np.array_equal(first, whole[3])
    gapped = list(P.colorize(model, frames[::2], ref, **kw))  # each Frame its own index, not the first's + k
    assert all(np.array_equal(a, b) for a, b in zip(gapped, whole[::2]))
    assert not np.array_equal(list(P.colorize(model, clip[3:], ref, **kw))[0], whole[3])  # arrays: start=0
