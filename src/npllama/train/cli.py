"""`npllama train` on the command line: one option per TrainConfig field, plus --config, --resume,
--threads and --no-progress."""
from __future__ import annotations

import argparse
import dataclasses

from ..errors import ConfigError
from .config import TrainConfig, read_config_file
from .dry_run import dry_run
from .loop import train

EXTEND_OPTIONS = {"steps", "time_budget"}   # with --resume: how much longer (extend.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options: one per TrainConfig field (dashes for underscores), plus --config/--resume/--threads.

    Every default is SUPPRESS, so that the namespace holds only what was typed: the command line
    then overrides the --config file, which overrides TrainConfig's defaults.
    """
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML or JSON file of options (same names as below, e.g. lr = 1e-3)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=argparse.SUPPRESS,
                        help="continue a saved run exactly where it stopped; with --steps N or --time-budget S, "
                             "extend it (finished or not) by N steps or about S seconds, the learning rate on a "
                             "new tail of its schedule from the current rate")
    parser.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                        help="train nothing: read and split the corpus, time a few steps, and say the model's "
                             "parameters, tokens per step, and the steps and passes over the data of this budget")
    parser.add_argument("--threads", type=int, metavar="N", default=argparse.SUPPRESS,
                        help="threads npllama runs on: its own, BLAS's and the tokenizer's (default: NPLLAMA_THREADS, else all cores)")
    parser.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bar (evaluations are still printed)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flags = ["--" + f.name.replace("_", "-"), *meta["flags"]]
        default = getattr(defaults, f.name)
        # (a help that states its own default -- one that depends on other options -- is left as it is)
        shown = "" if default is None or "(default" in meta["help"] \
            else f" (default: {default!r})" if isinstance(default, str) else f" (default: {default})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=meta["help"] + shown)
        if meta["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["type"] or str
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            metavar = meta["metavar"] or {int: "N", float: "X"}.get(meta["type"])
            if metavar and not meta["choices"]:
                kwargs["metavar"] = metavar
        parser.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in fields})
    source = f"config file {args.config} + command line" if getattr(args, "config", None) else None
    return TrainConfig.from_dict(values, source=source)


def run(args: argparse.Namespace) -> int:
    progress = not getattr(args, "no_progress", False)
    if getattr(args, "dry_run", False):
        if getattr(args, "resume", None):
            raise ConfigError("--dry-run plans a new run; it does not take --resume")
        dry_run(config_from_args(args))
        return 0
    if getattr(args, "resume", None):
        fields = {f.name for f in dataclasses.fields(TrainConfig)} - EXTEND_OPTIONS
        given = sorted(k for k in vars(args) if k in fields or k == "config")
        if given:
            raise ConfigError("--resume continues the saved run exactly, with its own settings (--steps or "
                              f"--time-budget extend it); remove {', '.join('--' + g.replace('_', '-') for g in given)} "
                              "(to train on with other settings, start a new run with --init-from RUN_DIR)")
        if "steps" in vars(args) and "time_budget" in vars(args):
            raise ConfigError("extend a run by --steps N or by --time-budget SECONDS, not both")
        result = train(resume=args.resume, progress=progress, more_steps=getattr(args, "steps", None),
                       more_seconds=getattr(args, "time_budget", None))
    else:
        result = train(config_from_args(args), progress=progress)
    return result.exit_code
