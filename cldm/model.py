"""Build a ControlLDM from YAML: the one place where config becomes modules.

`color_variant` decides every input channel count (nobody edits `in_channels`): the latent has
`latent_channels` (4) and the variant adds 0 / 5 / 8 channels to the ControlNet and, with
`concat_to_unet`, to the UNet.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from cldm.checkpoint import load_state_dict  # noqa: F401  (public API: cldm.model.load_state_dict)
from cldm.cldm import ControlLDM
from cldm.color import extra_channels
from cldm.controlnet import ControlledUnetModel, ControlNet
from ldm.modules.autoencoder import AutoencoderKL, keyword_names
from ldm.modules.text_encoder import FrozenOpenCLIPEmbedder
from ldm.modules.unet import UNetModel

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "models" / "cldm_v21_color.yaml"
TINY_CONFIG = REPO / "models" / "cldm_tiny_color.yaml"


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | DictConfig = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> DictConfig:
    """YAML (or a config already loaded) plus `key=value` overrides (dotted keys, e.g.
    `model.color_variant=v3`).

    The config is in struct mode, so a misspelt override key is an error, not a silent no-op.
    """
    if isinstance(path, DictConfig):
        cfg, path = path.copy(), Path("the checkpoint's config")
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config not found: {path}")
        try:
            cfg = OmegaConf.load(path)
        except Exception as e:  # yaml's parser and scanner errors, omegaconf's own
            raise ConfigError(f"{path}: not a readable YAML config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a YAML mapping (model:, train:), not a list")
    OmegaConf.set_struct(cfg, True)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override must look like key=value, got {bad[0]!r}")
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # omegaconf raises several types; all mean "bad override"
        raise ConfigError(f"bad override for {path.name}: {str(e).splitlines()[0]}") from None


def model_config(cfg: DictConfig | dict) -> DictConfig:
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return cfg.model if "model" in cfg else cfg


# Input/output channels follow from latent_channels and color_variant; never set by hand.
DERIVED_UNET_KEYS = ("in_channels", "out_channels")


def check_unet_keys(unet_kw: dict) -> None:
    """Refuse `model.unet` keys the UNet does not take, naming the key (and the likely intended one).

    The UNet and ControlNet accept exactly their arguments, so this only turns Python's
    TypeError into a config error that says where the key is.
    """
    known = keyword_names(UNetModel) - set(DERIVED_UNET_KEYS)
    for key in unet_kw:
        if key in DERIVED_UNET_KEYS:
            raise ConfigError(f"model.unet.{key}: set from latent_channels and color_variant, remove it")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"model.unet.{key}: unknown key{hint}")


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
