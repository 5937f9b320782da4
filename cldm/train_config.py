"""A training run's config: the YAML (found as cldm.run_dir.config_source says), the `key=value`
overrides and the training script's flags, merged and checked before the model loads.

Every flag of tutorial_train_sd21_color_v2.py that has a YAML key (FLAG_KEYS) defaults to the
config's value, so the flags are overrides too; they are applied last and a bad value is named
by its flag. `args` below is that script's parsed command line.

Heavy imports (torch, the model) wait inside the functions: every DDP process imports this file.
"""
from __future__ import annotations

import math
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input found after parsing (a missing folder, say); one line, exit status 2.
    `key`: the config key at fault, where one is."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# flag -> config key (None values are left to the config)
FLAG_KEYS = {
    "size": "train.size", "low": "train.low", "high": "train.high", "min_gap": "train.min_gap",
    "num_workers": "train.num_workers", "batch_size": "train.batch_size", "accumulate": "train.accumulate",
    "lr": "train.lr", "weight_decay": "train.weight_decay", "optimizer": "train.optimizer",
    "warmup_steps": "train.warmup_steps", "grad_clip": "train.grad_clip", "precision": "train.precision",
    "max_steps": "train.max_steps", "max_epochs": "train.max_epochs", "seed": "train.seed",
    "compile": "train.compile", "ckpt_every": "train.ckpt_every", "ckpt_keep": "train.ckpt_keep",
    "image_every": "train.image_every", "log_every": "train.log_every", "val_every": "train.val_every",
    "sd_locked": "model.sd_locked", "only_mid_control": "model.only_mid_control",
    "train_unet_input": "model.train_unet_input", "grad_checkpoint": "model.unet.use_checkpoint",
}
MODEL_FLAGS = {name: key for name, key in FLAG_KEYS.items() if key.startswith("model.")}

# train: key -> (type, lowest allowed value, what it is); checked before the model loads
TRAIN_NUMBERS = {
    "size": (int, 64, "training crop in pixels"), "batch_size": (int, 1, "samples per device"),
    "accumulate": (int, 1, "batches per optimiser step"), "num_workers": (int, 0, "loader processes"),
    "lr": (float, 0.0, "learning rate"), "weight_decay": (float, 0.0, "weight decay"),
    "warmup_steps": (int, 0, "warm-up steps"), "grad_clip": (float, 0.0, "max gradient norm"),
    "max_steps": (int, -1, "last step"), "max_epochs": (int, -1, "epochs"), "seed": (int, 0, "seed"),
    "val_every": (int, 0, "validation interval"), "log_every": (int, 1, "logging interval"),
    "ckpt_every": (int, 1, "checkpoint interval"), "ckpt_keep": (int, 1, "checkpoints kept"),
    "image_every": (int, 0, "image interval"), "image_count": (int, 1, "images per grid"),
    "image_ddim_steps": (int, 1, "DDIM steps of the image grids"),
}
HIGHEST = {"seed": 2**32 - 1}  # Lightning's seed_everything (numpy's range); its refusal names no flag
NULL_OK = ("max_epochs", "grad_clip", "val_every", "image_every")  # null: no limit / off
NO_LIMIT = ("max_steps", "max_epochs")  # -1: no limit; 0 would export the init weights as trained ones


def check_train_numbers(t) -> None:
    """One-line UsageError for a train: value of the wrong type or out of range (else Lightning,
    the loader or the optimiser would fail on it with a traceback once the model has loaded)."""
    for key, (kind, low, what) in TRAIN_NUMBERS.items():
        if key not in t or (t[key] is None and key in NULL_OK):
            continue
        v = t[key]
        ok = (isinstance(v, int) or (kind is float and isinstance(v, float) and math.isfinite(v))) \
            and not isinstance(v, bool)
        flag = "--" + key.replace("_", "-")
        if not ok:
            kind_name = "an integer" if kind is int else "a finite number"
            raise UsageError(f"train.{key} ({flag}, {what}) must be {kind_name}, got {v!r}", f"train.{key}")
        if key in HIGHEST and not low <= v <= HIGHEST[key]:
            raise UsageError(f"train.{key} ({flag}, {what}) must be in {low}..{HIGHEST[key]}, got {v!r}",
                             f"train.{key}")
        if v < low or (key in ("lr", *NO_LIMIT) and v == 0):
            bound = "> 0" if key == "lr" else "-1 (no limit) or >= 1" if key in NO_LIMIT else f">= {low}"
            raise UsageError(f"train.{key} ({flag}, {what}) must be {bound}, got {v!r}", f"train.{key}")


def check_band(t) -> None:
    """An empty pair band in one line naming both ends (else the dataset's "band is empty" line,
    after the model has loaded, with no flag in it)."""
    from annotator.pairs import DEFAULT_HIGH, DEFAULT_LOW

    low = DEFAULT_LOW if t.get("low") is None else t.low
    high = DEFAULT_HIGH if t.get("high") is None else t.high
    for key, value in (("low", low), ("high", high)):
        if value != value:  # NaN: "must be below" would not say what is wrong
            raise UsageError(f"train.{key} (--{key}) must be a number, got {value}", f"train.{key}")
    if not low < high:
        raise UsageError(f"train.low (--low) must be below train.high (--high): the pair band {low} < sim < {high} "
                         "is empty")


def run_config(args, source=None):
    """The run's config from `source` (default: cldm.run_dir.config_source), the overrides and the
    flags, checked."""
    from cldm.config import ConfigError, load_config
    from cldm.run_dir import config_source
    from cldm.weights_config import config_origin, found_note, load_resolved_config

    source = config_source(args.out, args.init, args.config, args.resume) if source is None else source
    weights = [("--init", args.init)]

    def load(overrides):  # a config found beside --init, or recorded in it, is named as such when bad
        return load_resolved_config(source, overrides, weights, args.config)

    cfg = load(list(args.overrides))
    if "train" not in cfg:  # before the flags, which set train.*
        where = source if isinstance(source, Path) else f"the config {args.init} records"
        found = config_origin(source, args.config, weights) if isinstance(source, Path) else None
        raise UsageError(f"{where}: no train: section (see models/cldm_v21_color.yaml)"
                         + (f" {found_note(found[0])}" if found else ""))
    # on the config as checked so far, so that a bad value is the flag's, said as such
    flags = {f"{key}={getattr(args, name)}": f"--{name.replace('_', '-')} {getattr(args, name)}"
             for name, key in FLAG_KEYS.items() if getattr(args, name) is not None}
    try:
        cfg = load_config(cfg, list(flags), name="the flags")
    except ConfigError as e:
        for override, flag in flags.items():
            if str(e).startswith(prefix := f"the flags with {override}: "):
                raise UsageError(f"{flag}: {str(e)[len(prefix):]}") from None
        raise
    try:
        check_train_numbers(cfg.train)
    except UsageError as e:  # a flag's value is named by its flag; say where any other one came from
        if e.key not in [FLAG_KEYS[n] for n in FLAG_KEYS if getattr(args, n) is not None]:
            setters = [o.strip() for o in args.overrides if o.split("=", 1)[0].strip() == e.key]
            where = f"the override {setters[-1]}" if setters else \
                source if isinstance(source, Path) else f"the config {args.init} records"
            raise UsageError(f"{where}: {e}") from None
        raise
    check_band(cfg.train)
    return cfg


def model_settings(args) -> list[tuple[str, str]]:
    """(what the command said, the config key it sets) for --config, the overrides and the model
    flags: what check_run_dir names as the cause of a config that differs from the run's."""
    flags = [("--" + ("" if getattr(args, n) else "no-") + n.replace("_", "-"), key)
             for n, key in MODEL_FLAGS.items() if getattr(args, n) is not None]
    return [*([("--config", "model")] if args.config is not None else []),
            *[(o, o.split("=", 1)[0].strip()) for o in args.overrides], *flags]


def saved_config_remedy(args, source) -> str:
    """What to do when --init records another model config than the run's (check_saved_config)."""
    if args.config is not None:
        return f"leave out --config{' and the model overrides' if args.overrides else ''} to use the one it records"
    if not isinstance(source, Path):  # its own config, changed by an override or flag
        return "leave out the overrides of model keys to use the one it records"
    if source == Path(args.out) / "config.yaml":
        return f"resume with the --init {args.out} was started with, or use another --out"
    if any(key.startswith("model") for _, key in model_settings(args)):  # the YAML beside --init may be fine
        return "leave out the overrides of model keys to use the one it records"
    return f"fix or remove {source}, or pass --config"  # the YAML beside --init
