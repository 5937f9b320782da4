"""Which config goes with a weights file, and whether the config a command uses contradicts it.

A file can say what it is: a YAML beside it with the same stem, or the whole config in its
metadata (tool_add_control_sd21.py, training exports and the toy model record it). Every tool
takes its config by one rule (`resolve_config`) and refuses one that contradicts what the file
records (`check_saved_config`): a scale factor, schedule or parameterisation of another model
loads without a shape error and just colours, or trains, worse.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from cldm.checkpoint import CheckpointError, read_metadata
from cldm.config import DEFAULT_CONFIG, ConfigError, load_config, model_config


# Optional model keys and what leaving one out means (cldm.config.OPTIONAL): a config without
# one is the same model as one that writes the default, so both hash and compare alike.
OPTIONAL_DEFAULTS = {"train_unet_input": True, "cond_stage": None}


def model_section(cfg: DictConfig | dict, *, defaults: bool = True) -> dict:
    """The resolved `model:` section (or `cfg` itself where it has none) as a plain dict, with the
    optional keys it leaves out filled in (`defaults`)."""
    m = OmegaConf.to_container(model_config(cfg), resolve=True)
    if defaults:
        for k, v in OPTIONAL_DEFAULTS.items():
            m.setdefault(k, v)
    return m


def config_hash(cfg: DictConfig | dict, *, defaults: bool = True) -> str:
    """Short SHA-256 of the `model:` section: which architecture and training policy weights belong to.

    Gradient checkpointing is left out: it changes memory and speed, not the weights.
    `defaults=False`: the hash as checkpoints before 2026-11-28 recorded it, where a left-out
    optional key counted as another model (see config_hashes).
    """
    m = model_section(cfg, defaults=defaults)
    m.get("unet", {}).pop("use_checkpoint", None)
    text = OmegaConf.to_yaml(OmegaConf.create(m), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hashes(cfg: DictConfig | dict) -> tuple[str, ...]:
    """The hashes a checkpoint of `cfg`'s model may record: config_hash first, then those that
    checkpoints before 2026-11-28 recorded for it, where an optional key at its default could be
    written or left out (two different hashes then), so such runs still resume."""
    m = model_section(cfg)
    at_default = [k for k, v in OPTIONAL_DEFAULTS.items() if m[k] is v]
    hashes = [config_hash(m)]
    for n in range(1, len(at_default) + 1):
        for left_out in itertools.combinations(at_default, n):
            hashes.append(config_hash({k: v for k, v in m.items() if k not in left_out}, defaults=False))
    return tuple(dict.fromkeys(hashes))


def read_export_metadata(path: str | Path, *, allow_pickle: bool = False) -> dict[str, str]:
    """The metadata of an init file or export (what it was made for), in either format: a file
    converted to .ckpt (`python -m cldm.checkpoint convert` keeps it) is checked as strictly."""
    path = Path(path)
    try:
        return read_metadata(path, allow_pickle=allow_pickle)
    except CheckpointError:
        raise
    except Exception as e:
        kind = "safetensors" if path.suffix == ".safetensors" else "checkpoint"
        raise CheckpointError(f"{path}: not a readable {kind} file ({e})") from None


def saved_config(weights: str | Path) -> DictConfig | None:
    """The config a checkpoint records in its metadata (tool_add_control_sd21.py, training exports
    and the toy model do), or None (also for unreadable files: the loader says what is wrong)."""
    try:
        text = read_export_metadata(weights).get("config") if Path(weights).is_file() else None
        return OmegaConf.create(text) if text else None
    except Exception:  # unreadable, or its 'config' is not YAML: as if there were none
        return None


def declared_parameterization(weights: str | Path) -> tuple[str, str] | None:
    """("eps" or "v", where the file says so) for a weights file that says what it predicts, else
    None: SD2.1 768-v and v fine-tunes have 512-base's tensors to the last shape, so this and the
    file's name are all there is to go by. Read: the metadata this project writes
    (parameterization), Stability's model spec (modelspec.prediction_type), kohya's
    (ss_v_parameterization), and a YAML of SD's own layout beside the file
    (model.params.parameterization, as in SD's v2-inference-v.yaml)."""
    weights = Path(weights)
    try:
        meta = read_metadata(weights) if weights.is_file() else {}
    except Exception:  # unreadable: the loader says what is wrong
        meta = {}
    found = {"parameterization": {"eps": "eps", "v": "v"},
             "modelspec.prediction_type": {"epsilon": "eps", "v": "v", "v_prediction": "v"},
             "ss_v_parameterization": {"true": "v", "false": "eps"}}
    for key, values in found.items():
        if (value := values.get(str(meta.get(key, "")).strip().lower())) is not None:
            return value, f"its metadata ({key}: {meta[key]})"
    yaml = weights.with_suffix(".yaml")
    try:
        params = OmegaConf.load(yaml).model.params if yaml.is_file() else None
        value = params.get("parameterization") if isinstance(params, DictConfig) else None
    except Exception:  # not YAML, or not SD's layout: not a declaration
        value = None
    if value in ("eps", "v"):
        return value, f"{yaml.name} beside it (model.params.parameterization: {value})"
    return None


def parameterization_conflict(weights: str | Path, parameterization: str,
                              declared: tuple[str, str] | None) -> str | None:
    """Why `weights` does not fit a model predicting `parameterization`, by what the file
    `declared` (declared_parameterization(weights), read once by the caller), or None: loaded as
    the other, a model's every output is misread, and only its colours show it."""
    if declared is None or declared[0] == parameterization:
        return None
    value, where = declared
    fix = "SD2.1 768-v or a v-prediction fine-tune: " if value == "v" else ""
    return (f"{weights} predicts {value}, says {where}, but the config predicts {parameterization} ({fix}set "
            f"model.parameterization={value}{' and train and sample at 768' if value == 'v' else ''})")


# Keys that only say how a model is trained: they may differ between a checkpoint and the config
# (so may dropout rates: inference runs in eval mode).
TRAINING_ONLY = ("sd_locked", "train_unet_input", "unet.use_checkpoint")
NOT_HASHED = ("unet.use_checkpoint",)  # memory and speed, not the weights: config_hash leaves it out
ABSENT = "absent"  # how a key one config lacks is shown


def saved_config_mismatch(weights: str | Path, cfg: DictConfig, free: Sequence[str] = (),
                          here: str = "this config") -> str | None:
    """How `cfg` (from `here`) contradicts the config `weights` records ("model.k is A there, B in
    HERE (n key(s) differ)"), or None. A scale factor, schedule or parameterisation of another model
    loads without a shape error and just colours (or trains) worse. `free`: model keys the
    caller may choose anew (training from an init may change only_mid_control)."""
    saved = saved_config(weights)
    if saved is None:
        return None
    try:
        ours, theirs = inference_leaves(cfg), inference_leaves(saved)
    except Exception:  # e.g. an interpolation only the training side could resolve: nothing to compare
        return None
    diff = differing_keys(theirs, ours, free, missing=None)  # an optional key left out is null
    return config_difference(theirs, ours, diff, here) if diff else None


def check_saved_config(weights: str | Path, cfg: DictConfig, source, overrides: Sequence[str] = (),
                       remedy: str | Callable[[], str] = "leave out --config and --set to use the one saved with it",
                       free: Sequence[str] = ()) -> None:
    """Refuse a config that contradicts the one the checkpoint records (saved_config_mismatch).
    `source` and `overrides`: where `cfg` came from (a YAML path or the checkpoint's own config);
    `remedy`: what the caller's user can do about it (a callable: worked out only if needed)."""
    here = (str(source) if isinstance(source, Path) else "its own config") + \
        (" with the overrides" if overrides else "")
    if reason := saved_config_mismatch(weights, cfg, free, here):
        raise CheckpointError(f"{weights} was saved with another model config: {reason}; "
                              f"{remedy() if callable(remedy) else remedy}")


def model_leaves(cfg: DictConfig, leave_out: Sequence[str] = NOT_HASHED) -> dict:
    """The model config as {dotted key: value}, less the keys in `leave_out` (by default, as
    config_hash counts it)."""
    return {k: v for k, v in config_leaves(model_section(cfg)) if k not in leave_out}


def inference_leaves(cfg: DictConfig) -> dict:
    """The model config as {dotted key: value}, less what does not change inference."""
    return {k: v for k, v in model_leaves(cfg, TRAINING_ONLY).items() if not k.endswith("dropout")}


def differing_keys(theirs: dict, ours: dict, free: Sequence[str] = (), missing=ABSENT) -> list[str]:
    """The keys of two model_leaves dicts whose values differ, less `free`; a key one side lacks
    differs unless the other holds `missing` (None: absent counts as null)."""
    return [k for k in sorted(theirs.keys() | ours.keys())
            if theirs.get(k, missing) != ours.get(k, missing) and k not in free]


def config_difference(theirs: dict, ours: dict, diff: Sequence[str], here: str) -> str:
    """'model.k is A there, B in HERE (n key(s) differ)' for the first of `diff` (differing_keys)."""
    k = diff[0]
    return f"model.{k} is {theirs.get(k, ABSENT)} there, {ours.get(k, ABSENT)} in {here} ({len(diff)} key(s) differ)"


def config_leaves(d: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from config_leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + str(k), v


def resolve_config(ckpt: str | os.PathLike, config: str | os.PathLike | None = None,
                   control: str | os.PathLike | None = None) -> Path | DictConfig:
    """--config if given, else what the weights say about themselves, the ControlNet export first
    (it describes the trained model, the SD file only the base): a YAML next to them with the same
    stem, else the config the file records (metadata 'config'); else SD2.1's."""
    if config is not None:
        return Path(config)
    found = _found_config((control, ckpt))
    return found[0] if found is not None else DEFAULT_CONFIG


def _found_config(weights) -> tuple[Path | DictConfig, Path] | None:
    """(config, the weights it belongs to) for the first of `weights` (paths, or None) with a YAML
    beside it or a config it records; None if none has either."""
    for w in weights:
        if w is None:
            continue
        if Path(w).with_suffix(".yaml").is_file():
            return Path(w).with_suffix(".yaml"), Path(w)
        if (saved := saved_config(w)) is not None:
            return saved, Path(w)
    return None


def config_origin(source, config, weights: Sequence[tuple[str, str | os.PathLike | None]]) -> tuple[str, Path] | None:
    """(flag, file) of the weights that `source` (resolve_config's choice) came from without the
    user naming it: a YAML found beside them, or the config they record; None for --config, SD2.1's
    default or another source (a run's own config.yaml). `weights`: (flag, path or None) in the
    order resolve_config looks (an export first)."""
    found = None if config is not None else _found_config([w for _, w in weights])
    if found is None:
        return None
    chosen, path = found
    if (chosen != source) if isinstance(chosen, Path) else not isinstance(source, DictConfig):
        return None
    return next(flag for flag, w in weights if w is not None and Path(w) == path), path


def found_note(flag: str) -> str:
    return f"(found beside {flag}: fix or remove it, or pass --config)"


def load_resolved_config(source, overrides: Sequence[str] = (), weights=(), config=None) -> DictConfig:
    """load_config for a `source` resolve_config chose: a bad config the user never named (a YAML
    found beside the weights: an A1111-style sd.yaml, say) says so, and a bad recorded one names
    the file that records it. `weights` and `config`: as for config_origin."""
    origin = config_origin(source, config, weights)
    if origin is not None and isinstance(source, DictConfig):
        return load_config(source, overrides, name=f"the config {origin[1]} records")
    try:
        return load_config(source, overrides)
    except ConfigError as e:
        if origin is None or (overrides and _loads(source)):  # the overrides' fault, not the file's
            raise
        raise ConfigError(f"{e} {found_note(origin[0])}") from None


def _loads(source) -> bool:
    try:
        load_config(source)
    except ConfigError:
        return False
    return True
