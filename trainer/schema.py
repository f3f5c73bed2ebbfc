"""What a checkpoint must hold, checked before anything is restored or any process is changed.

The schema is data: MANIFEST and STATE below, and, for what depends on the run that resumes (the
model's tensors, the optimizer's groups, the schedule, the scaler), the live objects themselves as
examples. `conform` is the one check. A checkpoint that differs in any way is refused with one
line that names the file, the field and what was expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import PRECISIONS, ConfigError, TrainConfig
from trainer.errors import CheckpointError

# 3: --ema's ema.safetensors, (loss, correct, gradient norm) per step, the recipe's new fields, the
# lineage, no optimizer_other_state. docs/checkpoints.md says what changes bump it.
FORMAT_VERSION = 5
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
PROGRESS_NAME = "progress.safetensors"
EMA_NAME = "ema.safetensors"  # only with --ema
STATE_NAME = "state.json"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Check:
    """A value that passes `test`; `what` says what was expected."""

    what: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class Map:
    """A dict of any keys that pass `key`, each value of `value`."""

    key: Check
    value: Any


@dataclass(frozen=True)
class Optional:
    """A key of a dict spec that may be absent; when present, its value is of `spec`."""

    spec: Any


@dataclass(frozen=True)
class Like:
    """The same structure as `example` (a live object's state): the same keys, values of the same kind."""

    example: Any


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


NATURAL = Check("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
POSITIVE = Check("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
NUMBER = Check("a finite number", _number)
SECONDS = Check("a number of seconds >= 0", lambda v: _number(v) and v >= 0)
SHA256 = Check("64 hexadecimal digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)
TENSOR_FILES = (MODEL_NAME, OPTIMIZER_NAME, RNG_NAME, PROGRESS_NAME, EMA_NAME)
REQUIRED_FILES = (MODEL_NAME, OPTIMIZER_NAME, RNG_NAME, PROGRESS_NAME, STATE_NAME)  # and EMA_NAME with --ema
FILE_NAME = Check(f"one of {', '.join((*TENSOR_FILES, STATE_NAME))}", lambda v: v in (*TENSOR_FILES,
                                                                                          STATE_NAME))  # fmt: skip

MANIFEST = {
    "format_version": int,
    "step": NATURAL,
    "world_size": POSITIVE,
    "files": Map(FILE_NAME, {"size": NATURAL, "sha256": SHA256}),
}
FRACTION = Check("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
# One line of metrics.jsonl: an epoch's record (engine.Trainer._epoch_record).
RECORD = {
    "epoch": POSITIVE,
    "step": NATURAL,
    "train_loss": NUMBER,
    "train_acc": FRACTION,
    "train_samples": NATURAL,
    "valid_loss": NUMBER,
    "valid_acc": FRACTION,
    "valid_correct": NATURAL,
    "valid_seen": NATURAL,
    # What the valid_* numbers are of (data.HELD_OUT, VAL_FOLDER, EVAL_DATA, TEST_SPLIT).
    "validation": Check(
        "one of held-out, val, eval_data, test", lambda v: v in ("held-out", "val", "eval_data", "test")
    ),  # fmt: skip
    "lr": NUMBER,
    "epoch_time_s": SECONDS,
    "eval_time_s": SECONDS,
    "warmup_s": SECONDS,
    "train_samples_per_s": (SECONDS, None),
    "num_processes": POSITIVE,
    "mixed_precision": Check(f"one of {', '.join(PRECISIONS)}", lambda v: v in PRECISIONS),
    "grad_norm_mean": Optional(NUMBER),  # with --clip-grad-norm
    "grad_norm_max": Optional(NUMBER),
    "valid_loss_ema": Optional(NUMBER),  # with --ema
    "valid_acc_ema": Optional(FRACTION),
    "valid_correct_ema": Optional(NATURAL),
    # The run's last record: the test split's score of `best` (when it is not the validation split),
    # why the run ended before its last epoch, and what reaching --stop-at's target took.
    "test_loss": Optional(NUMBER),
    "test_acc": Optional(FRACTION),
    "test_correct": Optional(NATURAL),
    "test_seen": Optional(NATURAL),
    "test_epoch": Optional(POSITIVE),
    "test_step": Optional(NATURAL),  # of the weights scored: `best`'s evaluation
    "test_time_s": Optional(SECONDS),
    "stopped": Optional(str),
    "target_train_s": Optional(SECONDS),
    "target_eval_s": Optional(SECONDS),
    "target_steps": Optional(NATURAL),
    "target_samples": Optional(NATURAL),
}
# One line of metrics.jsonl for an evaluation inside an epoch (--eval-every): no training numbers.
EVALUATION = {
    "inside_epoch": Check("true", lambda v: v is True),
    **{k: v for k, v in RECORD.items() if not k.startswith(("train_", "grad_norm")) and k not in (
        "lr", "epoch_time_s", "warmup_s")},
}  # fmt: skip
STATE = {
    "format_version": int,
    "trainer_version": str,
    "step": NATURAL,
    "epoch": NATURAL,
    "samples_in_epoch": NATURAL,
    "data_order": {"seed": NATURAL, "rule": str},
    "config": dict,  # then TrainConfig's own checks
    "scheduler": dict,  # then Like(the run's schedule)
    "optimizer_param_groups": [dict],  # then Like(the run's optimizer)
    "epoch_lrs": [NUMBER],
    "epoch_loss_curve": [(NUMBER, Check("NaN or infinity", lambda v: isinstance(v, float)))],
    "epoch_time_before_s": SECONDS,
    "grad_scaler": (dict, None),
    "world_size": POSITIVE,
    # The samples --limit-train-batches gives each epoch, fixed when the run starts (its steps times
    # the first world size's samples per step), so that a resume on N processes trains the same epochs.
    "limit_samples": (POSITIVE, None),
    "mixed_precision": Check(f"one of {', '.join(PRECISIONS)}", lambda v: v in PRECISIONS),
    "history": [(RECORD, EVALUATION)],
    "curves": [Map(Check("a curve's name", lambda v: isinstance(v, str)), (NATURAL, [NUMBER]))],
    "data_digest": (SHA256, None),
    "lineage": ({"parent": str, "step": NATURAL, "sha256": SHA256}, None),
}
# The per-process random generators in rng.safetensors: int64 [world size, *shape].
RNG = {"torch": (5056,), "python_mt": (625,), "python_gauss_bits": (1,)}
RNG_OPTIONAL = {"numpy_keys": (624,), "numpy_rest_bits": (3,), "cuda": (16,)}
# The optimizer's per-parameter tensors in optimizer.safetensors, by optimizer: (name, same shape as the parameter).
OPTIMIZER_STATE = {"sgd": {"momentum_buffer": True}, "adamw": {"exp_avg": True, "exp_avg_sq": True, "step": False}}


class Invalid(ValueError):
    """Where in a value the schema was not met, and how."""


def conform(value: Any, spec: Any, where: str = "") -> None:
    """Raises Invalid naming the first place in `value` that `spec` does not describe."""
    here = where or "the top level"
    if isinstance(spec, tuple):  # any of
        errors = []
        for option in spec:
            try:
                return conform(value, option, where)
            except Invalid as exc:
                errors.append(str(exc))
        raise Invalid(errors[0] if len(errors) == 1 else f"{here}: none of the forms it may take ({errors[0]})")
    if spec is None:
        if value is not None:
            raise Invalid(f"{here}: expected null, got {_short(value)}")
    elif isinstance(spec, Check):
        if not spec.test(value):
            raise Invalid(f"{here}: expected {spec.what}, got {_short(value)}")
    elif isinstance(spec, Map):
        _kind(value, dict, here)
        for key, item in value.items():
            conform(key, spec.key, f"{where}[{key!r}]")
            conform(item, spec.value, f"{where}.{key}" if where else str(key))
    elif isinstance(spec, dict):
        _kind(value, dict, here)
        required = {k for k, v in spec.items() if not isinstance(v, Optional)}
        missing, extra = sorted(required - set(value)), sorted(set(value) - set(spec))
        if missing or extra:
            raise Invalid(f"{here}: " + (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"))
        for key, item_spec in spec.items():
            if key in value:
                item_spec = item_spec.spec if isinstance(item_spec, Optional) else item_spec
                conform(value[key], item_spec, f"{where}.{key}" if where else key)
    elif isinstance(spec, list):
        _kind(value, list, here)
        for i, item in enumerate(value):
            conform(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, Like):
        conform(value, _like(spec.example), where)
    elif spec in (int, bool):
        if type(value) is not spec:
            raise Invalid(f"{here}: expected {spec.__name__}, got {_short(value)}")
    else:
        _kind(value, spec, here)


def _like(example: Any) -> Any:
    """The spec of values shaped as `example`."""
    if isinstance(example, dict):
        return {str(k): _like(v) for k, v in example.items()}
    if isinstance(example, list | tuple):
        return [_like(example[0])] if example else list
    if isinstance(example, torch.Tensor):
        return [NUMBER] if example.dim() else NUMBER
    if isinstance(example, bool):
        return bool
    if isinstance(example, int | float):
        return NUMBER
    return type(example) if example is not None else (None, NUMBER, str, bool)


def _kind(value: Any, kind: type, where: str) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise Invalid(f"{where}: expected {kind.__name__}, got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{type(value).__name__} {text[:30]}..."


def check_manifest(folder: Path, manifest: Any) -> None:
    try:
        conform(manifest, MANIFEST)
    except Invalid as exc:
        raise CheckpointError(f"{folder / MANIFEST_NAME}: {exc}") from None
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format version {manifest['format_version']}; this trainer reads version "
            f"{FORMAT_VERSION} (docs/checkpoints.md says what changes between versions)"
        )
    listed = set(manifest["files"])
    if listed - {EMA_NAME} != set(REQUIRED_FILES):
        odd = sorted(set(REQUIRED_FILES) - listed)
        raise CheckpointError(f"{folder / MANIFEST_NAME} does not list {odd[0]}: every checkpoint holds "
                              f"{', '.join(REQUIRED_FILES)}")  # fmt: skip


def check_state(folder: Path, state: Any) -> TrainConfig:
    """state.json against STATE and its own consistency; returns its config."""
    path = folder / STATE_NAME
    try:
        conform(state, STATE)
    except Invalid as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    fields = set(TrainConfig.__dataclass_fields__)
    if set(state["config"]) != fields:
        odd = sorted(set(state["config"]) ^ fields)[0]
        raise CheckpointError(f"{path}: config.{odd} is {'missing' if odd in fields else 'unexpected'}")
    try:
        config = TrainConfig(**state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: config: {exc} (the flag's name stands for the field)") from None
    per_step = config.samples_per_step(state["world_size"])
    if state["epoch"] > config.epochs or (state["epoch"] == config.epochs and state["samples_in_epoch"]):
        raise CheckpointError(f"{path}: epoch {state['epoch']} and sample {state['samples_in_epoch']} lie "
                                   f"beyond the run's {config.epochs} epochs")  # fmt: skip
    if state["samples_in_epoch"] % per_step or len(state["epoch_lrs"]) < state["samples_in_epoch"] // per_step:
        raise CheckpointError(
            f"{path}: samples_in_epoch {state['samples_in_epoch']} is not a whole number of optimizer steps of "
            f"{per_step} samples, or more than its {len(state['epoch_lrs'])} epoch_lrs"
        )
    limit, per_batch = config.limit_train_batches, config.samples_per_step(1)
    if (state["limit_samples"] is None) != (limit is None) or (limit and state["limit_samples"] % (limit * per_batch)):
        raise CheckpointError(f"{path}: limit_samples {state['limit_samples']} is not --limit-train-batches "
                              f"{limit} steps of {per_batch} samples per process")  # fmt: skip
    if state["data_order"]["seed"] != config.seed:
        raise CheckpointError(f"{path}: data_order.seed {state['data_order']['seed']} is not config.seed")
    history = state["history"]
    ends = [r for r in history if not r.get("inside_epoch")]
    if [r["epoch"] for r in ends] != list(range(1, state["epoch"] + 1)) or any(
        r["epoch"] > state["epoch"] + 1 for r in history
    ):
        raise CheckpointError(f"{path}: history does not hold one record for each of its {state['epoch']} epochs")
    for i, record in enumerate(history):
        for key, setting in (("grad_norm_mean", config.clip_grad_norm), ("grad_norm_max", config.clip_grad_norm),
                             ("valid_loss_ema", config.ema), ("valid_acc_ema", config.ema),
                             ("valid_correct_ema", config.ema)):  # fmt: skip
            if key.startswith("grad_norm") and record.get("inside_epoch"):
                continue
            if (key in record) != (setting is not None):
                raise CheckpointError(f"{path}: history[{i}] {'has' if key in record else 'lacks'} {key}")
        for suffix in ("", "_ema") if config.ema is not None else ("",):
            if not record[f"valid_correct{suffix}"] <= record["valid_seen"] or record["step"] > state["step"]:
                raise CheckpointError(f"{path}: history[{i}] counts more than it saw, or lies beyond the step")
        if "test_correct" in record and not record["test_correct"] <= record.get("test_seen", -1):
            raise CheckpointError(f"{path}: history[{i}] counts more test images right than it saw")
        if "stopped" in record and i != len(history) - 1:
            raise CheckpointError(f"{path}: history[{i}] ended the run, and more epochs follow it")
    return config


def check_tensors(folder: Path, loaded: Any, live: dict[str, Any], steps_per_epoch: int) -> None:
    """The safetensors files and the live-shaped parts of state.json against the run that resumes:
    `live` holds its model's state_dict, optimizer, scheduler, grad scaler and EMA (or None)."""
    state, world = loaded.state, loaded.state["world_size"]

    def tensors(name: str, found: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"holds an unexpected {extra[0]!r}"
            raise CheckpointError(f"{folder / name} {what}")
        for key, (shape, dtype) in expected.items():
            if tuple(found[key].shape) != shape or found[key].dtype != dtype:
                raise CheckpointError(
                    f"{folder / name}: {key} is {found[key].dtype} {list(found[key].shape)}, expected {dtype} "
                    f"{list(shape)}"
                )

    model = {k: (tuple(v.shape), v.dtype) for k, v in live["model"].items()}
    tensors(MODEL_NAME, loaded.model, model)
    if (live["ema"] is not None) != bool(loaded.ema):
        raise CheckpointError(f"{folder}: {'no' if live['ema'] is not None else 'an'} {EMA_NAME}, "
                                   f"{'but' if live['ema'] is not None else 'and no'} --ema")  # fmt: skip
    if live["ema"] is not None:
        tensors(EMA_NAME, loaded.ema, {**model, "n_averaged": ((), torch.int64)})
    optimizer, params = live["optimizer"], [p for g in live["optimizer"].param_groups for p in g["params"]]
    expected = {}
    for pid in {int(k.split(".")[1]) for k in loaded.optimizer if re.fullmatch(r"state\.\d+\.\w+", k)}:
        if pid < len(params):
            per_param = OPTIMIZER_STATE[live["kind"]].items()
            expected |= {f"state.{pid}.{n}": (tuple(params[pid].shape) if same else (), torch.float32)
                         for n, same in per_param}  # fmt: skip
    tensors(OPTIMIZER_NAME, loaded.optimizer, expected)
    rng = {k: ((world, *shape), torch.int64) for k, shape in RNG.items()}
    present = set(RNG_OPTIONAL) & set(loaded.rng)
    present |= {"numpy_keys", "numpy_rest_bits"} if present & {"numpy_keys", "numpy_rest_bits"} else set()
    rng |= {k: ((world, *RNG_OPTIONAL[k]), torch.int64) for k in present}
    tensors(RNG_NAME, loaded.rng, rng)
    done = len(state["epoch_lrs"]) if state["samples_in_epoch"] else 0
    progress = {}
    if state["samples_in_epoch"]:  # this segment's steps of every process, and what an earlier world size did
        found = loaded.progress.get("epoch_stats")
        carry = loaded.progress.get("epoch_carry", torch.zeros(0, 3))
        segment = done if carry.numel() == 0 else (found.shape[1] if found is not None and found.dim() == 3 else 1)
        progress = {"epoch_stats": ((world, min(max(segment, 1), done), 3), torch.float32),
                    "epoch_carry": ((len(carry), 3) if carry.dim() == 2 else (0, 3), torch.float32)}  # fmt: skip
    tensors(PROGRESS_NAME, loaded.progress, progress)
    if done >= steps_per_epoch and world == live["world"]:
        raise CheckpointError(f"{folder / STATE_NAME}: {done} steps into an epoch of {steps_per_epoch}")
    same_world = world == live["world"]
    # What the recipe decides must be this run's; only what the schedule moves (and, on another
    # number of processes, the schedule's length) may differ, each within its range.
    moving_schedule = {"last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step"}
    for name, value, example, moving in (
        ("optimizer_param_groups", state["optimizer_param_groups"], optimizer.state_dict()["param_groups"],
         {"lr", "momentum", "betas"}),
        ("scheduler", state["scheduler"], live["scheduler"].state_dict(),
         moving_schedule if same_world else moving_schedule | {"total_steps", "_schedule_phases"}),
        ("grad_scaler", state["grad_scaler"], live["scaler"].state_dict() if live["scaler"] is not None else None,
         {"scale", "_growth_tracker", "growth_factor", "backoff_factor", "growth_interval"}),  # the scaler's own
    ):  # fmt: skip
        try:
            conform(value, Like(example) if example is not None else None, name)
            _same_apart_from(value, jsonable(example), moving, name)
            for where, kind in _ranged(name, value):
                conform(where[0], kind, where[1])
        except Invalid as exc:
            raise CheckpointError(f"{folder / STATE_NAME}: {exc}") from None
    total = getattr(live["scheduler"], "total_steps", None)
    if total is not None and same_world and not state["scheduler"]["last_epoch"] <= total:
        raise CheckpointError(f"{folder / STATE_NAME}: scheduler.last_epoch is not a position in its {total} steps")


def _same_apart_from(value: Any, example: Any, moving: set[str], where: str) -> None:
    """`value` equals `example` but for the keys in `moving` (at any depth)."""
    if isinstance(example, dict):
        for key in example:
            if key not in moving:
                _same_apart_from(value[key], example[key], moving, f"{where}.{key}")
    elif isinstance(example, list):
        if len(value) != len(example):
            raise Invalid(f"{where}: holds {len(value)} items, this run's {len(example)}")
        for i, (mine, theirs) in enumerate(zip(value, example)):
            _same_apart_from(mine, theirs, moving, f"{where}[{i}]")
    elif value != example:
        raise Invalid(f"{where}: {_short(value)}, where this run's recipe gives {_short(example)}")


RATE = Check("a number >= 0", lambda v: _number(v) and v >= 0)
UNIT = Check("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
SCALE = Check("a number > 0", lambda v: _number(v) and v > 0)


def _ranged(name: str, value: Any) -> list[tuple[tuple[Any, str], Any]]:
    """The moving values of a part of state.json, each with the range it must lie in."""
    if name == "optimizer_param_groups":
        found = []
        for i, group in enumerate(value):
            found.append(((group["lr"], f"{name}[{i}].lr"), RATE))
            for key in ("momentum", "betas"):
                for k, v in enumerate(group[key] if isinstance(group.get(key), list) else [group.get(key, 0)]):
                    found.append(((v, f"{name}[{i}].{key}[{k}]"), UNIT))
        return found
    if name == "scheduler":
        return [((value["last_epoch"], f"{name}.last_epoch"), NATURAL),
                ((value.get("_step_count", 0), f"{name}._step_count"), NATURAL),
                *(((v, f"{name}._last_lr[{i}]"), RATE) for i, v in enumerate(value.get("_last_lr", [])))]  # fmt: skip
    if name == "grad_scaler" and value is not None:
        return [((value["scale"], f"{name}.scale"), SCALE), ((value["_growth_tracker"], f"{name}._growth_tracker"),
                                                              NATURAL)]  # fmt: skip
    return []


def jsonable(obj: Any) -> Any:
    """A live object's state as state.json holds it (tensors as lists, tuples as lists)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON")
