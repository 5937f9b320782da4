"""DDIM: schedule against the reference fixture, and the sampler checked by construction.

An "oracle" model returns the exact eps (or v) pointing at a known x0. With eta = 0 DDIM
then keeps eps fixed along the whole trajectory, so every pred_x0 equals x0 and the result is
sqrt(a_0) x0 + sqrt(1 - a_0) eps (the reference's last step goes to alphas_cumprod[0], not 1).
"""
import pytest
import torch

from ldm.sampler import ddim_sample, ddim_schedule, ddim_step, ddim_timesteps, guided, v_to_eps_x0
from ldm.schedule import schedule_buffers
from tests.helpers import COMPONENT_TOL as TOL, CrossDeviceCopies

AC = schedule_buffers()["alphas_cumprod"]


def oracle(x0: torch.Tensor, parameterization: str = "eps", calls: list | None = None):
    """model_fn whose output is exactly right for target x0 at any (x, t)."""
    def model_fn(x, t):
        if calls is not None:
            calls.append(t.clone())
        a = AC[t].reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
    return model_fn


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)


def test_schedule_matches_reference(tiny_io):
    ts = ddim_timesteps(20)
    assert ts.dtype == torch.int64 and torch.equal(ts, tiny_io["ddim20_timesteps"])
    assert ts[0] == 1 and ts[-1] == 951
    alphas, alphas_prev, sigmas = ddim_schedule(tiny_io["alphas_cumprod"], ts, eta=0.0)
    assert torch.equal(alphas, tiny_io["ddim20_alphas"])
    assert torch.equal(alphas_prev, tiny_io["ddim20_alphas_prev"])
    assert torch.equal(sigmas, torch.zeros(20))


def test_timesteps_edge_cases():
    assert ddim_timesteps(1).tolist() == [1]
    assert len(ddim_timesteps(30)) == 31  # 1000 // 30 = 33, as in the reference
    assert ddim_timesteps(500)[-1] == 999
    # where the stride divides 999 the reference's last timestep would be 1000: dropped
    assert ddim_timesteps(3).tolist() == [1, 334, 667]
    assert len(ddim_timesteps(9)) == 9 and ddim_timesteps(9)[-1] == 889
    for n in range(1, 501):  # every allowed count: inside the schedule, at least n steps, ascending
        ts = ddim_timesteps(n)
        assert 1 <= ts[0] and ts[-1] <= 999 and len(ts) >= n and bool((ts.diff() > 0).all())
        ddim_schedule(AC, ts)  # indexes the schedule without error
    for bad in (0, 501):
        with pytest.raises(ValueError, match="DDIM steps"):
            ddim_timesteps(bad)


def test_sigmas_follow_eta():
    ts = ddim_timesteps(10)
    a, a_prev, s1 = ddim_schedule(AC, ts, eta=1.0)
    _, _, s_half = ddim_schedule(AC, ts, eta=0.5)
    expected = ((1 - a_prev.double()) / (1 - a.double()) * (1 - a.double() / a_prev.double())).sqrt()
    torch.testing.assert_close(s1, expected.float())
    torch.testing.assert_close(s_half, 0.5 * s1)
    assert torch.equal(ddim_schedule(AC, ts)[2], torch.zeros(len(ts)))  # eta 0 by default: deterministic DDIM


def test_step_with_exact_eps_keeps_x0():
    x0, eps = data()
    a, a_prev = 0.3, 0.6
    x = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    x_prev, pred_x0 = ddim_step(x, eps, a, a_prev, 0.0)
    torch.testing.assert_close(pred_x0, x0, **TOL)
    torch.testing.assert_close(x_prev, a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps, **TOL)


def test_stochastic_step_by_hand():
    """eta > 0 (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2)
    eps + sigma z, with the given noise z added, not subtracted (same in distribution, but a
    seeded run would not reproduce the reference's)."""
    x0, eps = data()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    a, a_prev, sigma = 0.3, 0.6, 0.2
    x = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    x_prev, _ = ddim_step(x, eps, a, a_prev, sigma, noise=z)
    want = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * z
    torch.testing.assert_close(x_prev, want, **TOL)


def test_step_noise_enters_linearly_however_large():
    """The noise is added as drawn, sigma * z, even for z far in the tails (a clamp or
    renormalisation would change seeded results only on rare draws, silently)."""
    x0, eps = data()
    a, a_prev, sigma = 0.3, 0.6, 0.2
    x = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    z = torch.tensor([-8.0, -4.0, 0.5, 4.0, 8.0]).repeat(2 * 4 * 8 * 8 // 5 + 1)[:2 * 4 * 8 * 8].reshape(x.shape)
    with_noise, _ = ddim_step(x, eps, a, a_prev, sigma, noise=z)
    without, _ = ddim_step(x, eps, a, a_prev, sigma)
    torch.testing.assert_close(with_noise - without, sigma * z, rtol=0, atol=1e-6)  # sigma * 8 = 1.6 at the extremes


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_oracle_sampling_recovers_x0(parameterization):
    x0, eps = data()
    a_T = AC[951]
    x_T = a_T.sqrt() * x0 + (1 - a_T).sqrt() * eps
    calls, seen = [], []
    out = ddim_sample(oracle(x0, parameterization, calls), x_T, AC, steps=20, parameterization=parameterization,
                      callback=lambda i, t, x, pred_x0: seen.append((i, t, pred_x0)))
    assert [int(t[0]) for t in calls] == ddim_timesteps(20).flip(0).tolist()
    assert all(t.shape == (2,) and t.dtype == torch.long for t in calls)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(ddim_timesteps(20).flip(0).tolist()))
    for _, _, pred_x0 in seen:
        torch.testing.assert_close(pred_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, AC[0].sqrt() * x0 + (1 - AC[0]).sqrt() * eps, **TOL)


def test_guidance_mixes_outputs_in_one_batched_call_per_step():
    """Eps is affine in x0, so guiding two oracles equals the oracle of the mixed target."""
    (x0_c, x0_u), (_, x_T) = data(1), data(2)
    scale, calls = 7.5, []
    cond, uncond = oracle(x0_c), oracle(x0_u)

    def both(x, t):  # the caller's batch: conditional rows, then unconditional ones
        calls.append(x.shape[0])
        half = x.shape[0] // 2
        return torch.cat([cond(x[:half], t[:half]), uncond(x[half:], t[half:])])
    got = ddim_sample(guided(both, scale), x_T, AC, steps=10)
    assert calls == [2 * x_T.shape[0]] * 10
    mixed = ddim_sample(oracle(x0_u + scale * (x0_c - x0_u)), x_T, AC, steps=10)
    torch.testing.assert_close(got, mixed, rtol=1e-4, atol=1e-4)


def test_eta_noise_is_seeded():
    x0, x_T = data()

    def run(seed):
        return ddim_sample(oracle(x0), x_T, AC, steps=10, eta=1.0, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, ddim_sample(oracle(x0), x_T, AC, steps=10, eta=0.0))


def test_half_precision_latents_keep_dtype():
    x0, eps = data()
    a_T = AC[951]
    x_T = (a_T.sqrt() * x0 + (1 - a_T).sqrt() * eps).to(torch.bfloat16)
    out = ddim_sample(lambda x, t: oracle(x0)(x.float(), t).to(x.dtype), x_T, AC, steps=10)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), AC[0].sqrt() * x0 + (1 - AC[0]).sqrt() * eps, rtol=0, atol=0.025)  # measured 0.0123


def test_noise_fn_replaces_the_generator():
    """noise_fn(shape) is asked once per step with sigma > 0, for x's shape, and its draws are
    exactly what the generator would have drawn in its place."""
    x0, x_T = data()
    shapes = []

    def noise_fn(shape, g=torch.Generator().manual_seed(5)):
        shapes.append(tuple(shape))
        return torch.randn(shape, generator=g)
    out = ddim_sample(oracle(x0), x_T, AC, steps=10, eta=1.0, noise_fn=noise_fn)
    assert shapes == [tuple(x_T.shape)] * 10  # every step has sigma > 0 with eta = 1
    ref = ddim_sample(oracle(x0), x_T, AC, steps=10, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, ref)
    shapes.clear()
    ddim_sample(oracle(x0), x_T, AC, steps=10, eta=0.0, noise_fn=noise_fn)
    assert shapes == []  # eta = 0: no noise drawn
    with pytest.raises(ValueError, match="not both"):
        ddim_sample(oracle(x0), x_T, AC, steps=10, eta=1.0, noise_fn=noise_fn, generator=torch.Generator())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_coefficients_reach_the_device_once_not_every_step(eta):
    """A CPU scalar moved to CUDA is a blocking copy (stream sync): once per step it would stop
    the loop from queueing steps ahead of the GPU. `meta` stands in for the accelerator: the
    number of host-to-device copies must not grow with the step count."""
    x_T = torch.empty(1, 4, 8, 8, device="meta")
    noise_fn = lambda shape: torch.empty(shape, device="meta")  # noqa: E731  (eta > 0: drawn on the device)
    counts = []
    for steps in (5, 10):
        with CrossDeviceCopies() as copies:
            out = ddim_sample(lambda x, t: torch.zeros_like(x), x_T, AC, steps=steps, eta=eta, noise_fn=noise_fn)
        assert out.device.type == "meta"
        counts.append(copies.count)
    assert counts[0] == counts[1] <= 3, counts


def test_v_prediction_gives_x0_directly_as_the_reference():
    """x0 = sqrt(a) x - sqrt(1 - a) v, not through eps: that path divides by sqrt(a) ~ 0.09 after
    a cancellation at the noisiest step and loses ~7 bits of float32 (errors up to 3e-6 here, 1e-6 allowed)."""
    g = torch.Generator().manual_seed(3)
    x_T, v = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    seen = []
    ddim_sample(lambda x, t: v, x_T, AC, steps=20, parameterization="v",
                callback=lambda i, t, x, pred_x0: seen.append((t, pred_x0)))
    t, pred_x0 = seen[0]
    a = AC[t].double()
    assert a.sqrt() < 0.1  # t = 951
    want = a.sqrt() * x_T.double() - (1 - a).sqrt() * v.double()
    torch.testing.assert_close(pred_x0.double(), want, rtol=0, atol=1e-6)


def test_sigmas_are_computed_in_double_precision():
    """At 500 steps neighbouring alphas are close and 1 - a / a_prev cancels: float32 arithmetic is
    off by up to 7e-6 relative, the float64 one by float32's rounding alone (5e-8 measured)."""
    ts = ddim_timesteps(500)
    a, a_prev, sigmas = ddim_schedule(AC, ts, eta=1.0)
    a, a_prev = a.double(), a_prev.double()
    exact = ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    torch.testing.assert_close(sigmas.double(), exact, rtol=1e-7, atol=0)


def test_half_precision_inputs_are_computed_in_float32():
    """ddim_step gives both results in x's dtype, from float32 arithmetic (bf16 noise added as it
    is, not rounded further); v_to_eps_x0 computes in float32 from bf16 x and v."""
    x0, eps = data()
    a, a_prev, sigma = 0.3, 0.6, 0.2
    x = (a ** 0.5 * x0 + (1 - a) ** 0.5 * eps).to(torch.bfloat16)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x_prev, pred_x0 = ddim_step(x, eps, a, a_prev, sigma, noise=noise)
    assert x_prev.dtype == pred_x0.dtype == torch.bfloat16
    want_x0 = (x.float() - (1 - a) ** 0.5 * eps) / a ** 0.5
    want = a_prev ** 0.5 * want_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * noise.float()
    torch.testing.assert_close(pred_x0, want_x0.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(x_prev, want.to(torch.bfloat16), rtol=0, atol=0)

    v = eps.to(torch.bfloat16)
    got = v_to_eps_x0(x, v, AC[951])
    want = v_to_eps_x0(x.float(), v.float(), AC[951])
    assert all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_half_precision_eps_is_computed_in_float32_too():
    """A model run under autocast gives eps in bf16 like x: ddim_step still takes both to float32
    before any arithmetic (bf16 products and differences would round at every operation), and
    rounds only its results; exact."""
    x0, e = data()
    a, a_prev = 0.3, 0.6
    x = (a ** 0.5 * x0 + (1 - a) ** 0.5 * e).to(torch.bfloat16)
    eps = e.to(torch.bfloat16)
    x_prev, pred_x0 = ddim_step(x, eps, a, a_prev, 0.0)
    assert x_prev.dtype == pred_x0.dtype == torch.bfloat16
    want_x0 = (x.float() - (1 - a) ** 0.5 * eps.float()) / a ** 0.5
    want = a_prev ** 0.5 * want_x0 + (1 - a_prev) ** 0.5 * eps.float()
    torch.testing.assert_close(pred_x0, want_x0.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(x_prev, want.to(torch.bfloat16), rtol=0, atol=0)


def test_parameterization_and_the_schedule_length():
    """Only eps and v are known; the timesteps come from the schedule given (40 steps: stride 2 for
    20 DDIM steps), not SD2.1's 1000; 20 steps by default."""
    x0, x_T = data()
    with pytest.raises(ValueError, match=r"^parameterization must be 'eps' or 'v', got 'x0'$"):
        ddim_sample(oracle(x0), x_T, AC, parameterization="x0")
    short = schedule_buffers("linear", 40)["alphas_cumprod"]
    calls = []
    ddim_sample(lambda x, t: calls.append(int(t[0])) or torch.zeros_like(x), x_T, short, steps=20)
    assert calls == list(range(39, 0, -2))
    calls.clear()
    ddim_sample(lambda x, t: calls.append(int(t[0])) or torch.zeros_like(x), x_T, AC)
    assert calls == ddim_timesteps(20).flip(0).tolist()


def test_noise_is_drawn_in_float32_and_moved_to_x(capsys):
    """The generator's noise is float32 whatever x's dtype (a bf16 run draws what a float32 run
    does); noise_fn's is moved to x's device (here meta, for the accelerator); progress shows a bar."""
    x0, x_T = data()
    x_T = x_T.to(torch.bfloat16)
    model = lambda x, t: oracle(x0)(x.float(), t).to(x.dtype)  # noqa: E731

    def noise_fn(shape, g=torch.Generator().manual_seed(5)):
        return torch.randn(shape, generator=g)  # float32
    ref = ddim_sample(model, x_T, AC, steps=5, eta=1.0, noise_fn=noise_fn)
    out = ddim_sample(model, x_T, AC, steps=5, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, ref)

    meta = ddim_sample(lambda x, t: torch.zeros_like(x), torch.empty(1, 4, 8, 8, device="meta"), AC, steps=3,
                       eta=1.0, noise_fn=lambda shape: torch.randn(shape), progress=True)
    assert meta.device.type == "meta"
    assert "DDIM: 100%" in capsys.readouterr().err
