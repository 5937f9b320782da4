"""The model config: YAML (OmegaConf) plus `key=value` overrides, checked before anything is built.

Every key is checked against the reference config (models/cldm_v21_color.yaml) for its type
and range, and the UNet's and VAE's keys against what their modules take, so that a bad value
is one line naming the file, the override that set it and the key, not a traceback from deep in
torch or an error hours into training. cldm.model builds the modules from a checked config.
"""
from __future__ import annotations

import difflib
import functools
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from cldm.color import VARIANTS
from cliutil import file_problem
from ldm.modules.autoencoder import Decoder, Encoder, keyword_names
from ldm.modules.text_encoder import LAYERS, FrozenOpenCLIPEmbedder
from ldm.modules.unet import UNetModel

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "models" / "cldm_v21_color.yaml"
TINY_CONFIG = REPO / "models" / "cldm_tiny_color.yaml"


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | DictConfig = DEFAULT_CONFIG, overrides: Sequence[str] = (),
                name: str | None = None) -> DictConfig:
    """YAML (or a config already loaded) plus `key=value` overrides (dotted keys, e.g.
    `model.color_variant=v3`), checked against the reference config (`config_problem`).

    The config is in struct mode, so a misspelt override key is an error, not a silent no-op.
    A bad value is a ConfigError naming the file, the override that set it, if one did, and
    the key: else it would surface as a traceback deep in torch, or only once training runs.
    The check is of the merged result, so an override can mend a bad value of the file.
    `name`: what the messages call a config given loaded (e.g. "the config X.safetensors records").
    """
    if isinstance(path, DictConfig):
        cfg, where = path.copy(), name or "the checkpoint's config"
        short, editable = where, False
    else:
        path = Path(path)
        where, short, editable = str(path), path.name, True
        if not path.exists():
            raise ConfigError(f"config not found: {path}")
        if problem := file_problem(path):  # a folder; a named pipe would block the read
            raise ConfigError(f"config {path}: {problem}")
        try:
            cfg = OmegaConf.load(path)
        except Exception as e:  # yaml's parser and scanner errors, omegaconf's own
            raise ConfigError(f"{path}: not a readable YAML config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{where}: a config must be a YAML mapping (model:, train:), not a list")
    OmegaConf.set_struct(cfg, True)
    if not isinstance(overrides, Mapping):  # a string was read by character, a generator used up by the check
        overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if isinstance(overrides, Mapping) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides must be key=value strings, e.g. ['model.color_variant=v3'], got {overrides!r}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override must look like key=value, got {bad[0]!r}")
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except Exception as e:  # omegaconf raises several types; all mean "bad override"
        check_config(cfg, where, editable=editable)  # a key the file lacks: say so, not "not in struct"
        raise ConfigError(_bad_override(cfg, overrides, e, short)) from None
    check_config(merged, where, overrides, editable)  # the merged result: an override may fix the file
    return merged


def _bad_override(cfg: DictConfig, overrides: Sequence[str], error: Exception, short: str) -> str:
    """The line for overrides that do not merge: which one, and its full key. OmegaConf's own
    message names only the last part of the key ("Key 'model_chanels' is not in struct")."""
    culprit, full_key = None, None
    for o in overrides:
        try:
            OmegaConf.merge(cfg, OmegaConf.from_dotlist([o]))
        except Exception as e:  # noqa: BLE001  (the same types as the caller's)
            culprit, error, full_key = o, e, getattr(e, "full_key", None)
            break
    first = str(error).splitlines()[0]
    if full_key and " is not in struct" in first:
        hint = first.split("Did you mean", 1)
        first = f"{full_key}: no such key" + (f" (did you mean{hint[1].rstrip('?')}?)" if len(hint) > 1 else "")
    return f"bad override{f' {culprit}' if culprit else ''} for {short}: {first}"


# The reference config gives every key's type, and the keys a config must have, except these
# (absent: not a training config / train_unet_input true / no text encoder).
REFERENCE = DEFAULT_CONFIG
OPTIONAL = ("train", "model.train_unet_input", "model.cond_stage")
# Keys that may be null, with a value of the type they take otherwise where the reference is null.
NULL_OK = {"model.cond_stage": None, "train.low": 0.5, "train.high": 0.5, "train.min_gap": 1}
CHOICES = {"model.color_variant": tuple(VARIANTS), "model.parameterization": ("eps", "v"),
           "model.cond_stage.layer": tuple(LAYERS)}


@functools.cache
def _reference() -> dict:
    return OmegaConf.to_container(OmegaConf.load(REFERENCE))


def check_config(cfg: DictConfig, where: str, overrides: Sequence[str] = (), editable: bool = False) -> None:
    """ConfigError for the first problem `config_problem` finds, saying where it came from: the
    last override that set the key (or a section above it), else the file. `editable`: `where` is
    a YAML file the user can mend (a run's config.yaml written by an earlier version may hold a
    resolver call, which stopped its resume without saying what to do; a checkpoint's recorded
    config is not)."""
    resolver = _resolver_call(OmegaConf.to_container(cfg, resolve=False))
    if resolver:
        found = resolver[0], (f"{resolver[1]!r} calls a resolver, which a config (often a shared one) may not: the "
                              "value would be recorded in checkpoints and logs (${oc.env:...} would copy an "
                              "environment variable there)")
    else:
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
            found = unknown_key(plain) or config_problem(plain)  # a misspelt key first: it is also "missing"
        except Exception as e:  # an interpolation that does not resolve
            raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    if found:
        key, problem = found
        keys = (key, *TIED.get(key, ()))
        setters = [o for o in overrides if any(f"{k}.".startswith(o.split("=", 1)[0].strip() + ".") for k in keys)]
        if resolver:  # the call is in the value of `key` itself: an override of a key tied to it holds none
            setters = [o for o in setters if f"{key}.".startswith(o.split("=", 1)[0].strip() + ".")]
            if setters or editable:
                problem += f"; write the value itself in {'the override' if setters else 'its place'}"
        raise ConfigError(f"{where}{f' with {setters[-1]}' if setters else ''}: {key}: {problem}")


# ${name:...}; a plain ${key.path} only copies another key, and \${...} is a literal string
_RESOLVER = re.compile(r"(?<!\\)\$\{\s*[\w.\-]+\s*:")


def _resolver_call(node, key: str = "") -> tuple[str, str] | None:
    """(key, value) of the first string that calls an OmegaConf resolver."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return (key, node) if isinstance(node, str) and _RESOLVER.search(node) else None
    for k, v in items:
        if found := _resolver_call(v, f"{key}.{k}" if key else str(k)):
            return found
    return None


def unknown_key(cfg: dict) -> tuple[str, str] | None:
    """(key, problem) for a key nothing reads: a misspelt `sd_lockd: false`, or a key of another
    project's config (`guess_mode`), would otherwise be ignored without a word. The
    `model.unet`, `model.first_stage.ddconfig` and `model.cond_stage` keys are the arguments their
    modules take (create_model would refuse others, naming no file); elsewhere the reference
    config's keys."""
    if not isinstance(cfg, dict):
        return None
    ref = _reference()
    m = cfg.get("model")
    if isinstance(m, dict) and "target" in m and "params" in m:  # before its data:, lightning: sections are named
        return "model.target", (f"a config in the layout of SD's and ControlNet's own YAML files (target:, params:), "
                                f"which this project does not read; use models/{REFERENCE.name} or one made from it")
    if found := _not_taken("", cfg, {"model", "train"}):
        return found
    if isinstance(cfg.get("train"), dict) and (found := _not_taken("train", cfg["train"], set(ref["train"]))):
        return found
    if not isinstance(m, dict):
        return None
    if found := _not_taken("model", m, set(ref["model"])):
        return found
    for section in ("schedule", "control", "first_stage"):
        if isinstance(m.get(section), dict) and (found := _not_taken(f"model.{section}", m[section],
                                                                     set(ref["model"][section]))):
            return found
    if isinstance(m.get("unet"), dict) and (found := unet_key_problem(m["unet"])):
        return found
    if isinstance(m.get("cond_stage"), dict) and (
            found := _not_taken("model.cond_stage", m["cond_stage"],
                                keyword_names(FrozenOpenCLIPEmbedder) - {"device", "freeze"})):
        return found
    ddconfig = m["first_stage"].get("ddconfig") if isinstance(m.get("first_stage"), dict) else None
    if isinstance(ddconfig, dict):
        return _not_taken("model.first_stage.ddconfig", ddconfig, keyword_names(Encoder) | keyword_names(Decoder))
    return None


def _not_taken(section: str, keys, known: set[str]) -> tuple[str, str] | None:
    """(key, problem) for the first of `keys` not in `known`, with the likely intended one."""
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(sorted(known))}"
            return f"{section}.{key}" if section else str(key), f"unknown key{hint}"
    return None


def config_problem(cfg, ref: dict | None = None, prefix: str = "") -> tuple[str, str] | None:
    """The first (key, problem) where `cfg` (plain containers) departs from the reference config.

    A reference bool must be a bool, an int a positive int (every integer of model: is a size or
    a count), a float a number (positive in model:, dropout in [0, 1)), a list one of positive
    integers. A model: section may be just first_stage: a VAE config (build_latent_cache.py).
    The train: numbers and strings are cldm.train_config's to check (it names their flags).
    """
    ref = {"model": _reference()["model"], "train": _reference()["train"]} if ref is None else ref
    if prefix == "" and "model" not in cfg:
        return "model", f"missing; expected a mapping (as in {REFERENCE.name})"
    vae_only = prefix == "model." and set(cfg) == {"first_stage"}
    for name, r in ref.items():
        key = prefix + name
        r = NULL_OK.get(key) if r is None else r
        if r is None:  # null in the reference, type unknown
            continue
        test, what = _expect(key, r)
        if name not in cfg:
            if key in OPTIONAL or vae_only:
                continue
            return key, f"missing; expected {what}"
        v = cfg[name]
        if (v is None and key in NULL_OK) or test is None:
            continue
        if not test(v):
            return key, f"expected {what}{' or null' if key in NULL_OK else ''}, got {v!r}"
        if isinstance(r, dict) and (found := config_problem(v, r, key + ".")):
            return found
    return _latent_mismatch(cfg["model"]) if prefix == "" else None


TIED = {"model.latent_channels": ("model.first_stage.embed_dim",)}  # a key's problem that another key can cause


def _latent_mismatch(m: dict) -> tuple[str, str] | None:
    """The UNet's latent_channels must be the VAE latent's (first_stage.embed_dim), and the VAE
    must downsample by 8 as the ControlNet hint block does (HINT_LAYERS): either mismatch builds,
    then fails at the first step with a bare size error from a convolution or an add."""
    first = m.get("first_stage")
    ch_mult = (first.get("ddconfig") or {}).get("ch_mult") if isinstance(first, dict) else None
    if "unet" in m and isinstance(ch_mult, list) and len(ch_mult) != 4:
        return "model.first_stage.ddconfig.ch_mult", (f"needs 4 levels: the VAE halves the image between levels, "
                                                      "3 times, as the ControlNet hint block downsamples by 8; got "
                                                      f"{len(ch_mult)}")
    if "latent_channels" in m and isinstance(first, dict) and "embed_dim" in first \
            and m["latent_channels"] != first["embed_dim"]:
        return "model.latent_channels", (f"must equal model.first_stage.embed_dim ({first['embed_dim']}), the "
                                         f"channels of the VAE's latents; got {m['latent_channels']}")
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _expect(key: str, ref) -> tuple:
    """(test, or None where it is not checked here; what it expects) for `key`, by its reference value."""
    if key in CHOICES:
        return (lambda v: v in CHOICES[key]), f"one of {', '.join(CHOICES[key])}"
    if isinstance(ref, bool):
        return (lambda v: isinstance(v, bool)), "true or false"
    if isinstance(ref, dict):
        return (lambda v: isinstance(v, dict)), "a mapping"
    if isinstance(ref, list):
        return (lambda v: isinstance(v, list) and all(map(_positive_int, v))), "a list of positive integers"
    if key.startswith("train.") and key not in NULL_OK:
        return None, "a number" if isinstance(ref, (int, float)) else "a string"
    if isinstance(ref, int):
        return _positive_int, "a positive integer"
    if isinstance(ref, float) and key.endswith("dropout"):
        return (lambda v: _number(v) and 0 <= v < 1), "a number in [0, 1)"
    if isinstance(ref, float) and key.startswith("model."):
        return (lambda v: _number(v) and v > 0), "a positive number"
    if isinstance(ref, float):
        return _number, "a number"
    return (lambda v: isinstance(v, str)), "a string"


def model_config(cfg: DictConfig | dict) -> DictConfig:
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return cfg.model if "model" in cfg else cfg


# Input/output channels follow from latent_channels and color_variant; never set by hand.
DERIVED_UNET_KEYS = ("in_channels", "out_channels")


def unet_key_problem(unet_kw: dict) -> tuple[str, str] | None:
    """(key, problem) for a `model.unet` key the UNet does not take (naming the likely intended
    one), or one derived from latent_channels and color_variant."""
    for key in unet_kw:
        if key in DERIVED_UNET_KEYS:
            return f"model.unet.{key}", "set from latent_channels and color_variant, remove it"
    return _not_taken("model.unet", unet_kw, keyword_names(UNetModel) - set(DERIVED_UNET_KEYS))


def check_unet_keys(unet_kw: dict) -> None:
    """Refuse `model.unet` keys the UNet does not take, naming the key (and the likely intended one).

    The UNet and ControlNet accept exactly their arguments, so this only turns Python's
    TypeError into a config error that says where the key is.
    """
    if found := unet_key_problem(unet_kw):
        raise ConfigError(": ".join(found))
