"""The DDPM noise schedule of SD2.1 and the small formulas that use it.

Buffers are computed in float64 and cast to float32 exactly like the reference
latent-diffusion code, so they equal the `betas`, `alphas_cumprod`, ... stored in SD
checkpoints (which therefore load with or without them).
"""
from __future__ import annotations

import torch

BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
)


def schedule_mismatch(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first schedule buffer of a checkpoint `sd` that is not the `expected` one (a model's,
    computed from its config) up to the rounding of the file's dtype, or None.

    Loaders take the schedule from the config, never from the file: an fp16/bf16 file rounds
    it (bf16 makes alphas_cumprod[0] exactly 1, which breaks the last DDIM step). A file whose
    schedule really differs belongs to another model (or the config to another file).
    """
    for name in BUFFER_NAMES:
        src, want = sd.get(name), expected.get(name)
        if src is None or want is None:
            continue
        rounded = want.detach().cpu().to(src.dtype).float()
        if src.shape != want.shape or not torch.allclose(src.float().cpu(), rounded, rtol=1e-3, atol=1e-7):
            return name
    return None


def make_beta_schedule(schedule: str = "linear", n_timestep: int = 1000, linear_start: float = 0.00085,
                       linear_end: float = 0.012) -> torch.Tensor:
    """float64 betas. SD's "linear" is linear in sqrt(beta), not in beta."""
    if schedule != "linear":
        raise ValueError(f"unsupported beta schedule {schedule!r} (only 'linear' is implemented)")
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2


def schedule_buffers(schedule: str = "linear", timesteps: int = 1000, linear_start: float = 0.00085,
                     linear_end: float = 0.012) -> dict[str, torch.Tensor]:
    """The 13 float32 schedule buffers of an SD checkpoint, keyed by their state_dict names."""
    betas = make_beta_schedule(schedule, timesteps, linear_start, linear_end)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        # posterior_variance is 0 at t=0; clip so the log stays finite.
        "posterior_log_variance_clipped": posterior_variance.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        "logvar": torch.zeros(timesteps, dtype=torch.float64),
    }
    return {k: v.float() for k, v in buffers.items()}


def extract(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """coef[t] per batch element, shaped (B, 1, 1, ...) to broadcast against x, on x's device."""
    out = coef.to(x.device)[t.to(x.device).long()]
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
             sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (a = alphas_cumprod)."""
    return extract(sqrt_alphas_cumprod, t, x0) * x0 + extract(sqrt_one_minus_alphas_cumprod, t, x0) * noise


def get_v(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
          sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v-parameterisation target v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho, 2022)."""
    return extract(sqrt_alphas_cumprod, t, x0) * noise - extract(sqrt_one_minus_alphas_cumprod, t, x0) * x0
