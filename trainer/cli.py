"""Command line: argparse flags built from TrainConfig's fields -> TrainConfig -> Trainer(...).fit()."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from trainer.config import GROUP_TITLES, MODEL_NAMES, TrainConfig, read_settings
from trainer.errors import ConfigError, HelpFormatter, Parser, fail
from trainer.runtime import catch_early_warnings

# Settings of where and how this command runs, never taken from a checkpoint on --resume (the
# run folder is the checkpoint's own unless --run-name branches off; see parse_config).
NOT_RESUMED = ("resume", "init_from", "cpu", "progress", "output_dir", "run_name", "mixed_precision", "threads",
               "requeue_signal")  # fmt: skip


def _flag_type(annotation: str) -> type:
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            return kind
    raise TypeError(annotation)


# What each value flag's argument is called in --help.
METAVARS = {
    "epochs": "N", "batch_size": "N", "lr": "LR", "momentum": "M", "seed": "N", "limit_train_batches": "N",
    "data_dir": "DIR", "eval_batch_size": "N", "limit_eval_batches": "N", "output_dir": "DIR", "run_name": "NAME",
    "resume": "latest|auto|PATH", "init_from": "PATH", "requeue_signal": "NAME", "save_every": "N",
    "keep_last": "K", "log_with": "NAMES",
    "threads": "N",
    "model": "NAME|MODULE:FN", "dataset": "NAME|imagefolder:PATH|hf:PATH", "input_key": "KEY", "label_key": "KEY",
    "image_size": "N|HxW", "num_workers": "N",
    "weight_decay": "W", "betas": "B1,B2", "warmup_steps": "N", "grad_accum": "K", "clip_grad_norm": "X",
    "label_smoothing": "X", "ema": "DECAY", "val_split": "N|FRACTION", "early_stop": "N", "min_delta": "X",
    "eval_every": "N", "stop_at": "TARGET",
}  # fmt: skip


def build_parser(typed_only: bool = False) -> argparse.ArgumentParser:
    """The flags, one per TrainConfig field. `typed_only`: every default is argparse.SUPPRESS, so
    that parsing returns only the flags the user typed."""
    from trainer import __version__

    parser = Parser(
        prog="trainer",
        description="Train the blog's ResNet-style CNN (or --model) on MNIST (or --dataset, an image folder too) "
        "with SGD + OneCycleLR, on 1 to N processes.",
        epilog="Several processes: accelerate launch [--config_file launch_configs/NAME.yaml] -m trainer ...; "
        "on a CPU-only machine: torchrun --nproc_per_node N -m trainer --cpu ...",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS if typed_only else None,
    )
    parser.add_argument("--version", action="version", version=f"trainer {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS if typed_only else None,
        help="take the settings of a YAML file (a run folder's config.yaml, or your own: field: value lines); the "
        "flags you type override it",
    )  # fmt: skip
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        group = groups[f.metadata["group"]]
        default = argparse.SUPPRESS if typed_only else f.default
        if bool in (
            typing.get_args(hints[f.name]) or (hints[f.name],)
        ):  # --flag, and --no-flag unless False by default
            action = argparse.BooleanOptionalAction if f.default is not False else "store_true"
            group.add_argument(flag, dest=f.name, action=action, default=default, help=f.metadata["help"])
        else:
            group.add_argument(
                flag,
                dest=f.name,
                type=str.lower if f.metadata.get("choices") else _flag_type(str(f.type)),
                default=default,
                choices=f.metadata.get("choices"),
                metavar=None if f.metadata.get("choices") else METAVARS.get(f.name, "VALUE"),
                help=f.metadata["help"],
            )
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig: TrainConfig's defaults, then (with --resume) the checkpoint's settings,
    then the flags the user typed, a --config file's settings among them (under the typed flags)."""
    values = vars(build_parser().parse_args(argv))  # --help, --version and malformed values end here
    typed = vars(build_parser(typed_only=True).parse_args(argv))
    path = values.pop("config")
    typed.pop("config", None)
    if path is not None:  # the file's settings count as typed flags: a resume checks them against its recipe
        settings = read_settings(path)
        if settings.get("resume") is not None:
            raise ConfigError(f"the config file {path} sets resume: {settings['resume']}; resuming is the command's "
                              f"choice: pass --resume {settings['resume']} with --config")  # fmt: skip
        if typed.get("resume", "auto") != "auto" and "init_from" not in typed:  # done when the run began
            settings.pop("init_from", None)
        values, typed = values | settings | typed, settings | typed
    if values["resume"] == "auto":  # a checkpoint to continue, or a fresh start (all processes agree)
        from trainer.runtime import resume_auto

        values["resume"] = typed["resume"] = resume_auto(Path(values["output_dir"]) / TrainConfig(**values).name)
        if values["resume"] is not None:  # a requeued job started --init-from: it continues its own checkpoint
            values["init_from"] = None
            typed.pop("init_from", None)
    if values["resume"] is not None:
        from trainer import checkpoint as ckpt  # torch, after the flags were settled

        TrainConfig(**values)  # the typed flags are refused before a checkpoint is read
        state = _checkpoint_state(values)
        resumed = {k: v for k, v in state["config"].items() if k in values and k not in NOT_RESUMED}
        if resumed["model"] not in MODEL_NAMES and "model" not in typed:  # a checkpoint never chooses code
            raise ConfigError(
                f"{values['resume']} was trained with --model {resumed['model']}: pass --model {resumed['model']} "
                "again to resume it (code is never imported because a checkpoint names it)"
            )
        values = values | resumed | typed
        if values["resume"] != "latest" and "output_dir" not in typed:
            # A branch (--run-name) goes beside the run it branches from; without --run-name the
            # Trainer continues in the checkpoint's own run folder.
            values["output_dir"] = str(ckpt.folder_of(values["resume"]).absolute().parent.parent)
        if "mixed_precision" not in typed and not os.environ.get("ACCELERATE_MIXED_PRECISION"):
            # The precision the run was trained in, whatever set it then (a flag, a launch config).
            values["mixed_precision"] = state["mixed_precision"]
    return TrainConfig(**values)


def _checkpoint_state(args: dict[str, Any]) -> dict[str, Any]:
    """state.json of the checkpoint that --resume names (all processes agree on which)."""
    from trainer import checkpoint as ckpt
    from trainer.runtime import agree_on_checkpoint

    run_dir = Path(args["output_dir"]) / TrainConfig(**{**args, "resume": None}).name
    state = ckpt.read_state(agree_on_checkpoint(args["resume"], run_dir))
    try:
        state["config"]["epochs"], state["mixed_precision"]  # noqa: B018 (a state without these is unreadable)
    except (KeyError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{args['resume']}: unreadable run configuration ({exc})") from None
    return state


def on_the_cpu(args: list[str]) -> bool:
    """--cpu, typed or in the --config file: the processes start before the settings are complete."""
    typed = vars(build_parser(typed_only=True).parse_args(args))
    return bool(typed.get("cpu", "config" in typed and read_settings(typed["config"]).get("cpu", False)))


# The setting a refusal is about: its subject (`--epochs must ...`, `epochs (--epochs) must ...`), or
# the recipe field a checkpoint disagrees on (`... was trained with lr=0.5, ...`).
SUBJECT = re.compile(r"^--(?P<flag>[a-z-]+)|^(?P<field>[a-z_]+) \(--| was trained with (?P<recipe>[a-z_]+)=")


def name_the_file(message: str, args: list[str]) -> str:
    """A refusal about a setting that the --config file gave (and no flag typed over) names the file."""
    typed = vars(build_parser(typed_only=True).parse_args(args))
    path, found = typed.pop("config", None), SUBJECT.search(message)
    if path is None or found is None:
        return message
    name = (found["flag"] or "").replace("-", "_") or found["field"] or found["recipe"]
    try:
        from_file = name in read_settings(path) and name not in typed
    except ConfigError:  # the refusal is the file's own
        return message
    return f"{message} ({path} sets {name})" if from_file else message


def die_with_launcher() -> None:
    """When `accelerate launch` or torchrun started us, their death becomes our SIGTERM.

    `accelerate launch` with one process waits on its child without forwarding signals, so a
    SIGTERM to the launcher alone (what `kill PID` and many schedulers send) would leave the
    trainer running as an orphan. Linux's PR_SET_PDEATHSIG turns the launcher's death into a
    SIGTERM for us, which the trainer answers like any SIGTERM: save, then exit.
    """
    from trainer.runtime import launcher_argv

    parent = os.getppid()
    if launcher_argv() is None:
        return  # started from a shell (`nohup python -m trainer &` must survive the shell), or not Linux
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (argparse itself exits 2 on malformed flags)."""
    if argv is None:
        die_with_launcher()
    args = list(sys.argv[1:] if argv is None else argv)
    resuming = any(a == "--resume" or a.startswith("--resume=") for a in args)
    if not resuming:
        try:  # settle flag errors before the slow torch import; every process sees the same flags
            config = parse_config(args)
        except ConfigError as exc:
            return fail(name_the_file(str(exc), args), everywhere=False)
    from trainer.checkpoint import CheckpointError
    from trainer.engine import DIVERGED_EXIT_CODE, Diverged, Stopped, Trainer
    from trainer.runtime import PeerError, start_processes, world_size

    try:
        if resuming:
            if world_size() > 1:  # the processes agree on the checkpoint before reading its settings
                start_processes(cpu=on_the_cpu(args))
            config = parse_config(args)  # reads the checkpoint's settings
        trainer = Trainer(config, command_args=args)
        # From here, Ctrl-C belongs to the trainer (save, then stop); once it has stopped, a late press
        # (a quick double Ctrl-C) finds SIGINT ignored while the process ends, instead of a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        trainer.fit()
    except PeerError as exc:  # another process failed and said why; the main process names it
        return fail(str(exc), everywhere=False)
    except Diverged as exc:  # every process saw the same non-finite values
        return fail(str(exc), DIVERGED_EXIT_CODE, everywhere=False)
    except ConfigError as exc:
        return fail(name_the_file(str(exc), args))
    except CheckpointError as exc:
        return fail(str(exc))
    except Stopped as exc:
        return 128 + int(exc.signum)
    except KeyboardInterrupt:
        return fail("interrupted; no checkpoint was written for the current step", 130)
    return 0


def main_entry() -> None:
    """Entry point of `trainer` and `python -m trainer`."""
    catch_early_warnings()
    try:
        code = main()
    except KeyboardInterrupt:  # before training began (torch's import takes seconds): nothing to save
        code = fail("interrupted before training began; nothing was written", 130)
    raise SystemExit(code)
