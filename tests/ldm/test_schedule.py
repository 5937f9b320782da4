"""Schedule buffers and forward-diffusion formulas against the reference fixture."""
import numpy as np
import pytest
import torch

from ldm.schedule import BUFFER_NAMES, extract, get_v, make_beta_schedule, q_sample, schedule_buffers
from tests.helpers import COMPONENT_TOL


@pytest.fixture(scope="module")
def buffers(tiny_arch) -> dict:
    d = tiny_arch["diffusion"]
    return schedule_buffers("linear", d["timesteps"], d["linear_start"], d["linear_end"])


def test_beta_schedule_is_linear_in_sqrt_beta():
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    torch.testing.assert_close(betas[[0, -1]], torch.tensor([0.00085, 0.012], dtype=torch.float64))
    steps = betas.sqrt().diff()
    torch.testing.assert_close(steps, steps[:1].expand_as(steps))
    with pytest.raises(ValueError, match="cosine"):
        make_beta_schedule("cosine")


def test_buffers_match_checkpoint(buffers, tiny_weights):
    """Every schedule buffer stored with the weights is reproduced (float32 round-off)."""
    assert set(buffers) == set(BUFFER_NAMES) and set(BUFFER_NAMES) <= set(tiny_weights)
    for name in BUFFER_NAMES:
        assert buffers[name].dtype == torch.float32 and buffers[name].shape == (1000,)
        torch.testing.assert_close(buffers[name], tiny_weights[name], rtol=1e-6, atol=0, msg=name)


def test_alphas_cumprod_matches_reference(buffers, tiny_io):
    torch.testing.assert_close(buffers["alphas_cumprod"], tiny_io["alphas_cumprod"], rtol=1e-6, atol=0)


def test_q_sample_matches_reference(buffers, tiny_io):
    x_t = q_sample(tiny_io["z"], tiny_io["t"], tiny_io["q_noise"], buffers["sqrt_alphas_cumprod"],
                   buffers["sqrt_one_minus_alphas_cumprod"])
    torch.testing.assert_close(x_t, tiny_io["q_sample"], **COMPONENT_TOL)


def test_extract_broadcasts_per_sample():
    coef = torch.arange(10.0)
    out = extract(coef, torch.tensor([3, 7]), torch.zeros(2, 4, 5, 5))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [3.0, 7.0]


def test_v_target_inverts_as_the_sampler_inverts_it(buffers):
    """The training target v (get_v) and x_t (q_sample) give back the noise and x0 by the
    identities ldm.sampler uses for v-models: eps = sqrt(a) v + sqrt(1-a) x_t, x0 = sqrt(a) x_t - sqrt(1-a) v."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    sa, s1ma = buffers["sqrt_alphas_cumprod"], buffers["sqrt_one_minus_alphas_cumprod"]
    x_t = q_sample(x0, t, noise, sa, s1ma)
    v = get_v(x0, noise, t, sa, s1ma)
    a, b = extract(sa, t, x_t), extract(s1ma, t, x_t)
    torch.testing.assert_close(v, a * noise - b * x0, rtol=0, atol=0)
    torch.testing.assert_close(a * v + b * x_t, noise, **COMPONENT_TOL)
    torch.testing.assert_close(a * x_t - b * v, x0, **COMPONENT_TOL)


def test_schedule_mismatch_tells_rounding_from_another_schedule():
    """A half-precision copy of the schedule is the same schedule; linear_end 0.012 -> 0.01201
    (buffers differ by at most 0.38 % relative, above the 0.1 % tolerance) is another one."""
    from ldm.schedule import schedule_buffers, schedule_mismatch

    ours = schedule_buffers()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert schedule_mismatch({k: v.to(dtype) for k, v in ours.items()}, ours) is None, dtype
    other = schedule_buffers("linear", 1000, 0.00085, 0.01201)
    assert schedule_mismatch(other, ours) is not None
    # another schedule stays another one in an fp16 file (fp16 rounds by <= 0.05 %): the file's
    # dtype only sets how the expected buffers are rounded, it never skips the comparison
    assert schedule_mismatch({k: v.half() for k, v in other.items()}, ours) is not None


def test_defaults_are_sd21s_and_the_betas_are_float64_throughout():
    """SD2.1's schedule by default: 1000 steps from 0.00085 to 0.012, linear in sqrt(beta),
    computed in float64 (a float32 linspace would be off by ~1e-8 relative)."""
    betas = make_beta_schedule()
    want = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    torch.testing.assert_close(betas, torch.from_numpy(want), rtol=1e-15, atol=0)
    default = schedule_buffers()
    explicit = schedule_buffers("linear", 1000, 0.00085, 0.012)
    assert all(torch.equal(default[k], explicit[k]) for k in BUFFER_NAMES)
    with pytest.raises(ValueError, match=r"^unsupported beta schedule 'cosine' \(only 'linear' is implemented\)$"):
        make_beta_schedule("cosine")


def test_every_buffer_has_the_schedules_length():
    assert {tuple(v.shape) for v in schedule_buffers("linear", 40).values()} == {(40,)}


def test_extract_shapes_for_any_rank_and_keeps_the_coefficients_values():
    coef = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32)
    t = torch.tensor([2, 0])
    assert extract(coef, t, torch.zeros(2, 5)).shape == (2, 1)
    assert extract(coef, t, torch.zeros(2, 3, 4, 5, 6)).shape == (2, 1, 1, 1, 1)
    out = extract(coef, t, torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16))  # float32 values, not rounded to bf16
    assert out.dtype == torch.float32 and out.flatten().tolist() == [coef[2].item(), coef[0].item()]


def test_schedule_mismatch_names_the_first_buffer_that_differs():
    """In BUFFER_NAMES order, from betas; a buffer missing on either side is no mismatch; one of
    another length is (not an error); near zero 1e-7 absolute is allowed, not more."""
    from ldm.schedule import schedule_mismatch

    ours = schedule_buffers()
    # linear_end 0.08 % off: within betas' tolerance, not within alphas_cumprod's (0.38 % at the end)
    assert schedule_mismatch(schedule_buffers("linear", 1000, 0.00085, 0.01201), ours) == "alphas_cumprod"
    # betas[0] 5e-6 off (0.6 %): betas is named, not a later buffer it changes more
    assert schedule_mismatch(schedule_buffers("linear", 1000, 0.000855, 0.012), ours) == "betas"
    assert schedule_mismatch({"betas": ours["betas"]}, ours) is None
    assert schedule_mismatch(ours, {"logvar": ours["logvar"]}) is None
    assert schedule_mismatch({}, ours) is None
    assert schedule_mismatch(schedule_buffers("linear", 40), ours) == "betas"
    only_ac = {"alphas_cumprod": ours["alphas_cumprod"].clone()}
    only_ac["alphas_cumprod"][-1] += 2e-7  # alphas_cumprod[-1] ~ 0.0047: 1e-7 + 1e-3 * 0.0047 allowed
    assert schedule_mismatch(only_ac, ours) is None
    only_ac["alphas_cumprod"][-1] += 5e-6
    assert schedule_mismatch(only_ac, ours) == "alphas_cumprod"
