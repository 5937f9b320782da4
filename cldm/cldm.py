"""ControlLDM: the locked SD2.1 parts, the trainable ControlNet and the colour conditioning.

Per sample, `prepare_condition` does all the work that does not depend on the noise (prompt
embedding, hint-block features, reference/gray latents); per denoising step, `apply_model`
runs only ControlNet + UNet. Sampling and the training loss are thin layers on top.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cldm.color import ColorCondition, build_concat, split_hint
from cldm.controlnet import ControlledUnetModel, ControlNet
from ldm import sampler, schedule
from ldm.modules import autoencoder, unet as unet_modules
from ldm.modules.autoencoder import AutoencoderKL


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` so names read `model.diffusion_model.*` as in SD."""

    def __init__(self, diffusion_model: ControlledUnetModel):
        super().__init__()
        self.diffusion_model = diffusion_model


class ControlLDM(nn.Module):
    def __init__(self, unet: ControlledUnetModel, control_model: ControlNet, first_stage_model: AutoencoderKL,
                 cond_stage_model: nn.Module | None, *, color_variant: str = "v2", concat_to_unet: bool = True,
                 scale_factor: float = 0.18215, parameterization: str = "eps", timesteps: int = 1000,
                 linear_start: float = 0.00085, linear_end: float = 0.012, only_mid_control: bool = False):
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        self.model = DiffusionWrapper(unet)
        self.control_model = control_model
        self.first_stage_model = first_stage_model
        self.cond_stage_model = cond_stage_model
        self.color_variant = color_variant
        self.concat_to_unet = concat_to_unet
        self.scale_factor = scale_factor
        self.parameterization = parameterization
        self.only_mid_control = only_mid_control
        for name, value in schedule.schedule_buffers("linear", timesteps, linear_start, linear_end).items():
            self.register_buffer(name, value)
        # The noisy latent's channels (SD: 4): what the UNet predicts, and the first input channels
        # of UNet and ControlNet (the colour variants' extra channels come after them).
        self.latent_channels = unet.out[-1].out_channels
        # Image sides must divide by this: the VAE (and hint block) downsample by `latent_factor`,
        # then every UNet Downsample halves the latent, and its Upsample must land on the skip size.
        self.latent_factor = 2 ** sum(isinstance(m, autoencoder.Downsample) for m in first_stage_model.modules())
        hint_factor = math.prod(m.stride[0] for m in control_model.input_hint_block.modules()
                                if isinstance(m, nn.Conv2d))
        if self.latent_factor != hint_factor:  # else a bare size error at the first step
            raise ValueError(f"the VAE downsamples by {self.latent_factor}, the ControlNet hint block by "
                             f"{hint_factor}: they must agree")
        self.size_multiple = self.latent_factor * 2 ** sum(isinstance(m, unet_modules.Downsample)
                                                           for m in unet.modules())

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    # ---- frozen encoders -------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, image: torch.Tensor, sample: bool = False,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent (posterior mean, or a sample for training targets)."""
        posterior = self.first_stage_model.encode(image)
        z = posterior.sample(generator=generator) if sample else posterior.mean
        return z * self.scale_factor

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings (B, 77, D), each distinct prompt encoded once and then reused
        (FrozenOpenCLIPEmbedder.encode_cached): with the default blank prompt a whole training
        run encodes one string."""
        if self.cond_stage_model is None:
            raise RuntimeError("this model has no text encoder; pass `context` explicitly")
        return self.cond_stage_model.encode_cached(prompts)

    # ---- conditioning and one denoising step ----------------------------------------------
    def prepare_condition(self, hint: torch.Tensor, prompts: Sequence[str] | None = None, *,
                          context: torch.Tensor | None = None, ref_latent: torch.Tensor | None = None,
                          gray_latent: torch.Tensor | None = None) -> ColorCondition:
        """Everything per sample that stays fixed across denoising steps.

        `hint` (B, 4, H, W) in [0, 1]. `ref_latent`/`gray_latent` (scaled) come from the latent
        cache when training with it, so no VAE encode happens here. The hint block trains, so
        this runs with gradients; the frozen encoders inside run without.
        """
        ref, gray = split_hint(hint)
        h, w = hint.shape[2:]
        if h % self.size_multiple or w % self.size_multiple:
            downs = (self.size_multiple // self.latent_factor).bit_length() - 1
            raise ValueError(f"hint height and width must be multiples of {self.size_multiple} (the VAE and "
                             f"hint block downsample by {self.latent_factor}, then the UNet's {downs} "
                             f"downsamples by 2 each), got {h}x{w}")
        if context is None:
            context = self.get_learned_conditioning(prompts if prompts is not None else [""] * hint.shape[0])
        latent_hw = (h // self.latent_factor, w // self.latent_factor)
        concat = build_concat(self.color_variant, ref, gray, self.encode_first_stage, latent_hw,
                              ref_latent=ref_latent, gray_latent=gray_latent)
        return ColorCondition(context=context, guided_hint=self.control_model.encode_hint(hint), concat=concat)

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: ColorCondition) -> torch.Tensor:
        """Model output (eps or v) for noisy latents `x_t` at integer timesteps `t`."""
        x_in = x_t if cond.concat is None else torch.cat([x_t, cond.concat.to(x_t.dtype)], dim=1)
        control = self.control_model(x_in, cond.guided_hint, t, cond.context)
        return self.model.diffusion_model(x_in if self.concat_to_unet else x_t, t, cond.context,
                                          control=control, only_mid_control=self.only_mid_control)

    def compile_denoiser(self, vae_decoder: bool = False, **options) -> None:
        """torch.compile, in place, what runs at every denoising step (ControlNet and UNet) and
        optionally the VAE decoder.

        Eager mode runs each GroupNorm, activation, cast and residual add as its own memory-bound
        kernel; inductor fuses them into their neighbours. In place (nn.Module.compile), so the
        state_dict names stay SD's. The first call of each new input shape compiles (minutes for
        SD2.1). `options` go to torch.compile: `dynamic=False` keeps every shape's kernels static.
        """
        parts = [self.control_model, self.model.diffusion_model]
        if vae_decoder:
            parts.append(self.first_stage_model.decoder)
        for part in parts:
            part.compile(**options)

    # ---- sampling and training ----------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: ColorCondition, x_T: torch.Tensor | None = None, steps: int = 20, eta: float = 0.0,
               guidance_scale: float = 1.0, uncond: ColorCondition | None = None,
               generator: torch.Generator | None = None, progress: bool = False,
               callback: Callable | None = None) -> torch.Tensor:
        """DDIM sampling of latents; classifier-free guidance (`uncond`, one batched forward per
        step) only when `guidance_scale != 1`."""
        if x_T is None:  # float32 even under autocast: DDIM would round a half-precision x at every step
            h, w = cond.guided_hint.shape[-2:]
            x_T = torch.randn((len(cond), self.latent_channels, h, w), generator=generator,
                              device=cond.guided_hint.device)
        model_fn = lambda x, t: self.apply_model(x, t, cond)  # noqa: E731
        if guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("guidance_scale != 1 needs an unconditional ColorCondition")
            both = ColorCondition.cat([cond, uncond])
            model_fn = sampler.guided(lambda x, t: self.apply_model(x, t, both), guidance_scale)
        return sampler.ddim_sample(model_fn, x_T, self.alphas_cumprod, steps=steps, eta=eta,
                                   parameterization=self.parameterization, generator=generator, callback=callback,
                                   progress=progress)

    def training_loss(self, z0: torch.Tensor, cond: ColorCondition, noise: torch.Tensor | None = None,
                      t: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Simple diffusion loss (MSE on eps or v) of scaled target latents `z0`.

        `t` and `noise` not given are drawn, in that order, from `generator` (default: torch's RNG).
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (z0.shape[0],), generator=generator, device=z0.device)
        if noise is None:
            noise = torch.empty_like(z0).normal_(generator=generator)  # = randn_like (z0's memory layout)
        x_t = schedule.q_sample(z0, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)
        target = noise if self.parameterization == "eps" else schedule.get_v(
            z0, noise, t, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)
        return F.mse_loss(self.apply_model(x_t, t, cond).float(), target.float())
