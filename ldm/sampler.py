"""DDIM sampling (Song et al., 2021), step for step as in the reference latent-diffusion sampler.

The model is a plain function `model_fn(x, t) -> eps or v`, so the sampler knows nothing about
UNets, ControlNets or conditioning; callers close over those.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Size], torch.Tensor]


def ddim_timesteps(num_steps: int, num_train: int = 1000) -> torch.Tensor:
    """Uniform DDIM timesteps arange(0, num_train, num_train // num_steps) + 1 (int64, ascending).

    The +1 and the integer stride come from the reference; when num_steps does not divide
    num_train this yields more than num_steps timesteps (31 for 30), as there. Where the stride
    divides num_train - 1 (3, 9, 27, 37 steps, ...) the last one would be num_train, past the end
    of the schedule (the reference fails there with an index error): it is dropped.
    """
    if not 1 <= num_steps <= num_train // 2:
        raise ValueError(f"DDIM steps must be between 1 and {num_train // 2}, got {num_steps}")
    t = torch.arange(0, num_train, num_train // num_steps, dtype=torch.int64) + 1
    return t[t < num_train]


def ddim_schedule(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                  eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alphas, alphas_prev, sigmas) for each DDIM step, float32, in ascending timestep order.

    As in the reference, the step from the first timestep goes to alphas_cumprod[0] rather than
    1, so the returned sample still carries a trace (sqrt(1 - a_0) ~ 0.03) of the last eps.
    """
    ac = alphas_cumprod.detach().float().cpu()
    t = timesteps.long().cpu()
    alphas = ac[t]
    alphas_prev = torch.cat([ac[:1], ac[t[:-1]]])
    a, a_prev = alphas.double(), alphas_prev.double()
    sigmas = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return alphas, alphas_prev, sigmas.float()


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a: float | torch.Tensor, a_prev: float | torch.Tensor,
              sigma: float | torch.Tensor, noise: torch.Tensor | None = None,
              pred_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_prev; returns (x_prev, pred_x0). `noise` is needed only if sigma > 0.
    `pred_x0`: the model's x0 where it gives one directly (v-prediction), else it comes from eps.

    Arithmetic is float32 whatever x's dtype; the results come back in x's dtype, so keep x
    float32 (a half-precision x would be rounded at every step).
    """
    a, a_prev, sigma = (torch.as_tensor(v, dtype=torch.float32, device=x.device) for v in (a, a_prev, sigma))
    xf, eps = x.float(), eps.float()
    pred_x0 = (xf - (1 - a).sqrt() * eps) / a.sqrt() if pred_x0 is None else pred_x0.float()
    dir_xt = (1 - a_prev - sigma ** 2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma * noise.float()
    return x_prev.to(x.dtype), pred_x0.to(x.dtype)


def v_to_eps_x0(x: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) from a v-prediction (Salimans & Ho, 2022) at alphas_cumprod `a`, float32, both
    directly as the reference does: x0 through eps would divide by sqrt(a) after a cancellation,
    losing ~7 bits at the noisiest timesteps (sqrt(a) < 0.1)."""
    xf, v, a = x.float(), v.float(), torch.as_tensor(a, dtype=torch.float32, device=x.device)
    return a.sqrt() * v + (1 - a).sqrt() * xf, a.sqrt() * xf - (1 - a).sqrt() * v


def guided(model_fn: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance as a model function: `model_fn` gets x and t twice over, as one
    batch (2B) whose first half is conditional and second unconditional (the caller closes over
    conditions stacked that way), and the raw outputs are mixed,
    out = uncond + scale * (cond - uncond). One batched forward, not two."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out, out_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return out_uncond + scale * (out - out_uncond)
    return fn


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int = 20,
                eta: float = 0.0, parameterization: str = "eps", generator: torch.Generator | None = None,
                callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
                progress: bool = False, noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """Run DDIM from x_T (pure noise at the last timestep) down to the final latent.

    model_fn(x, t) takes x (B, ...) and t (B,) int64 and returns eps or v (`parameterization`);
    for classifier-free guidance pass `guided(...)`.
    `generator` draws the eta > 0 noise (on x_T's device), or `noise_fn(shape)` does, returning
    a tensor of that shape (moved to x_T's device), for callers that decide how each row's noise
    is drawn (e.g. per-frame CPU generators). `callback(i, t, x_prev, pred_x0)` runs after step i
    (0 = the noisiest step), e.g. for previews.
    """
    if parameterization not in ("eps", "v"):
        raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
    if generator is not None and noise_fn is not None:
        raise ValueError("give a generator or a noise_fn, not both")
    timesteps = ddim_timesteps(steps, num_train=alphas_cumprod.shape[0])
    alphas, alphas_prev, sigmas = ddim_schedule(alphas_cumprod, timesteps, eta)
    # On x's device once: a CPU scalar moved there at every step is a blocking copy (a stream
    # sync on CUDA), which would stop the loop from queueing steps ahead of the GPU.
    coefs = [c.to(x_T.device) for c in (alphas, alphas_prev, sigmas)]
    x = x_T
    order = list(reversed(range(len(timesteps))))
    for i, index in enumerate(tqdm(order, desc="DDIM", disable=not progress)):
        t = torch.full((x.shape[0],), int(timesteps[index]), dtype=torch.long, device=x.device)
        out = model_fn(x, t)
        a, a_prev, sigma = (c[index] for c in coefs)
        eps, pred_x0 = v_to_eps_x0(x, out, a) if parameterization == "v" else (out, None)
        noise = None
        if sigmas[index] > 0:
            if noise_fn is not None:
                noise = noise_fn(x.shape).to(x.device)
            else:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x, pred_x0 = ddim_step(x, eps, a, a_prev, sigma, noise, pred_x0)
        if callback is not None:
            callback(i, int(timesteps[index]), x, pred_x0)
    return x
