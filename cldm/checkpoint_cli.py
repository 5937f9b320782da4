"""Reading, writing and checking state dicts without ever running a checkpoint's pickled code.

CLI: `python -m cldm.checkpoint inspect FILE [--config YAML]` (what it is; how it fits a model, or
for this project's training checkpoints and exports, what they are used for) and
`python -m cldm.checkpoint convert IN OUT`; exit status 0, or 2 with one line on bad input.
It runs under cldm/checkpoint.py's name, which docs and users know (that module's `__main__`
calls `main`); the work is cldm.checkpoint's and cldm.checkpoint_fit's, which tests call directly.
"""
from collections import Counter
from pathlib import Path

import torch

from atomicio import remove_stale_temps
from cldm import resume, trainable, weights_config
from cldm.checkpoint import PROG, CheckpointError, check_extension, load_state_dict, read_metadata, save_checkpoint
from cldm.checkpoint_fit import compare_state_dict, guess_kind, misfit
from cldm.config import load_config
from cldm.model import create_model
from cliutil import OneLineParser, config_override, out_file_problem, path_arg, run_cli


def main(argv=None):
    """Exit status: 0 done, 1 inspect --config found that the file would not load, 2 bad input
    (arguments, unreadable or misfit file), 130 / 143 stopped by Ctrl-C / SIGTERM."""
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n")[0],
                       epilog="Exit status: 0 done, 1 the file would not load under --config, 2 bad input, "
                              "130 / 143 stopped by Ctrl-C / SIGTERM.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="print tensor count, parameters, dtypes and what the file looks like "
                                       "(SD weights, a full model, a training checkpoint, a --control export)")
    p.add_argument("file", type=path_arg, help=".safetensors, .ckpt, .pt or .pth file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="fully unpickle a .ckpt that needs it (runs its code: trusted files only)")
    p.add_argument("--config", type=path_arg,
                   help="also compare the file with the model of this YAML: the load summary "
                        "(found / missing / unexpected / reshaped) and whether it would load; a "
                        "training checkpoint (OUT/checkpoints/*.ckpt) against the tensors that train "
                        "under it, as a resume loads them, an export (control.safetensors) on top of "
                        "SD weights, as --control loads it")
    p.add_argument("--set", dest="overrides", action="append", type=config_override, default=[], metavar="KEY=VALUE",
                   help="config override for --config, e.g. --set model.color_variant=v3 (repeatable)")
    p = sub.add_parser("convert", help="re-save a checkpoint's tensors (format from OUT's extension)")
    p.add_argument("input", type=path_arg, help="checkpoint to read")
    p.add_argument("output", type=path_arg, help="file to write: .safetensors (recommended) or .ckpt/.pt/.pth")
    p.add_argument("--allow-pickle", action="store_true",
                   help="fully unpickle INPUT if it needs it (runs its code: trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (else refused)")
    args = ap.parse_args(argv)
    return run_cli(PROG, _inspect if args.cmd == "inspect" else _convert, args,
                   (CheckpointError, ValueError, OSError), needs=("open_clip",))


def _inspect(args):
    if args.overrides and not args.config:
        raise ValueError("--set needs --config (the overrides apply to its model)")
    cfg = None
    if args.config:  # before any output: a bad config is the whole answer
        cfg = load_config(args.config, args.overrides)
    sd = load_state_dict(args.file, allow_pickle=args.allow_pickle)
    meta = read_metadata(args.file, allow_pickle=args.allow_pickle)
    n = sum(v.numel() for v in sd.values())
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
    tops = Counter(k.split(".")[0] for k in sd)
    print(f"file: {args.file}\ntensors: {len(sd)}\nparameters: {n:,} ({n / 1e6:.1f} M)")
    print("dtypes: " + ", ".join(f"{d} {c}" for d, c in dtypes.most_common()))
    print("top-level: " + ", ".join(f"{t}.* {c}" if c > 1 else t for t, c in tops.most_common(8)))
    training = resume.read_training_checkpoint(args.file)
    export = training is None and trainable.is_export(sd, meta)
    if training is not None:  # OUT/checkpoints/*.ckpt: the trainable tensors, under the LightningModule's name
        sd = {k.removeprefix(trainable.MODULE_PREFIX): v for k, v in sd.items()}
        kind = (f"Lightning training checkpoint of this project: {len(sd)} trainable tensors, step "
                f"{training.get('global_step', '?')}, to resume or --export ({guess_kind(sd)})")
    elif export:
        step = f", step {meta['step']}" if "step" in meta else ""
        step += f", trained on --init {meta['init']}" if "init" in meta else ""  # the SD weights it fits best
        kind = f"ControlNet export (trainable weights only{step}), for --control on top of SD weights " \
               f"({guess_kind(sd)})"
    else:
        kind = guess_kind(sd)
    print(f"looks like: {kind}")
    print("metadata: " + (", ".join(sorted(meta)) or "none"))
    if cfg is None:
        return 0
    with torch.device("meta"):
        model = create_model(cfg)
    if training is not None:  # what a resume (or --export) of a run under this config would load
        trainable.configure_trainable(model, cfg.model.sd_locked, cfg.model.get("train_unet_input", True))
        ours, *older = weights_config.config_hashes(cfg)
        report, reason = resume.resume_misfit(model, ours, sd, training[trainable.TRAINING_KEY], also=older)
        print(f"against {args.config}, the tensors that train under it:\n{report.summary()}")
        verdict = "would load to resume training (on the run's --init weights)"
    elif export:  # what colorize_inference.py --ckpt SD --control FILE would load
        report, reason = trainable.export_misfit(model, sd)
        reason = trainable.recorded_mismatch(meta, model) or reason
        print(f"against {args.config}, on top of SD weights that give the rest:\n{report.summary()}")
        verdict = "would load as --control"
    else:
        report = compare_state_dict(model, sd)
        reason = misfit(report)
        print(f"against {args.config}:\n{report.summary()}")
        verdict = "would load" + ("" if report.ok else " (partially)")
    if reason is None and training is None:  # as colorize_inference.py and training compare it
        here = str(args.config) + (" with the overrides" if args.overrides else "")
        if mismatch := weights_config.saved_config_mismatch(args.file, cfg, here=here):
            reason = f"it was saved with another model config: {mismatch}"
    print(f"would not load: {reason}" if reason else verdict)
    return 1 if reason else 0


def _convert(args):
    # all before the input is read (minutes for a large one): a folder or a file in the way of
    # OUTPUT was an error naming the temporary file beside it, an unknown extension one at the end
    if problem := out_file_problem(None, args.output):
        raise ValueError(problem)
    check_extension(args.output)
    if not Path(args.output).parent.is_dir():  # else the error names the temporary file beside it
        raise ValueError(f"{args.output}: no folder {Path(args.output).parent} to write it in")
    if Path(args.output).exists() and not args.overwrite:
        raise ValueError(f"{args.output}: exists; pass --overwrite to replace it")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"{args.output}: the same file as the input; write to another name")
    remove_stale_temps(Path(args.output).parent)  # a killed run's hidden, whole-size output
    sd = load_state_dict(args.input, allow_pickle=args.allow_pickle)
    meta = read_metadata(args.input, allow_pickle=args.allow_pickle)  # the config and provenance travel along
    # a full disk is one line (the writers' own errors were tracebacks), as tool_add_control_sd21.py's
    save_checkpoint(sd, args.output, metadata={**meta, "converted_from": Path(args.input).name})
    print(f"wrote {len(sd)} tensors to {args.output}")
    return 0
