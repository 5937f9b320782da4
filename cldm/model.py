"""Build a ControlLDM from a config (cldm.config): the one place where config becomes modules.

`color_variant` decides every input channel count (nobody edits `in_channels`): the latent has
`latent_channels` (4) and the variant adds 0 / 5 / 8 channels to the ControlNet and, with
`concat_to_unet`, to the UNet.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cldm.cldm import ControlLDM
from cldm.color import extra_channels
from cldm.config import ConfigError, check_unet_keys, load_config, model_config
from cldm.controlnet import ControlledUnetModel, ControlNet
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.text_encoder import FrozenOpenCLIPEmbedder


def create_control_net(config: DictConfig | dict) -> ControlNet:
    """The config's ControlNet alone (freshly initialised): ControlLDM.control_model."""
    m = model_config(config)
    unet_kw = OmegaConf.to_container(m.unet, resolve=True)
    try:
        return ControlNet(in_channels=m.latent_channels + extra_channels(m.color_variant),
                          hint_channels=m.control.hint_channels, **unet_kw)
    except ValueError as e:
        raise ConfigError(f"model.unet: {e}") from None


def create_model(config: DictConfig | dict | str | Path) -> ControlLDM:
    """ControlLDM with freshly initialised weights (load a checkpoint on top).

    Build under `with torch.device("meta"):` to get shapes without memory.
    """
    if isinstance(config, (str, Path)):
        config = load_config(config)
    m = model_config(config)
    extra = extra_channels(m.color_variant)
    unet_kw = OmegaConf.to_container(m.unet, resolve=True)
    check_unet_keys(unet_kw)
    latent = m.latent_channels
    try:
        unet = ControlledUnetModel(in_channels=latent + (extra if m.concat_to_unet else 0),
                                   out_channels=latent, **unet_kw)
    except ValueError as e:
        raise ConfigError(f"model.unet: {e}") from None
    control = create_control_net(config)
    try:
        vae = AutoencoderKL(OmegaConf.to_container(m.first_stage.ddconfig, resolve=True), m.first_stage.embed_dim)
    except ValueError as e:
        raise ConfigError(f"model.first_stage: {e}") from None
    text = None
    if m.get("cond_stage") is not None:
        text = FrozenOpenCLIPEmbedder(**OmegaConf.to_container(m.cond_stage, resolve=True))
    s = m.schedule
    return ControlLDM(unet, control, vae, text, color_variant=m.color_variant, concat_to_unet=m.concat_to_unet,
                      scale_factor=m.scale_factor, parameterization=m.parameterization,
                      timesteps=s.timesteps, linear_start=s.linear_start, linear_end=s.linear_end,
                      only_mid_control=m.only_mid_control)
