"""Model selection from a run's evaluations (its metrics.jsonl records): which one is `best`, and
whether the run ends before its last epoch (--early-stop, --stop-at).

Everything here is a function of the records alone, which every checkpoint holds: a run stopped
and resumed between two evaluations chooses the same `best` and stops at the same step as the
unbroken run, on any number of processes.
"""

from __future__ import annotations

import operator
from typing import Any

from trainer.config import TrainConfig

COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def monitored(config: TrainConfig) -> str:
    """The record key `best` and early stopping follow: --monitor, of the EMA's weights with --ema
    (the weights evaluate and predict use)."""
    return f"{config.monitor}_ema" if config.ema is not None else config.monitor


def _higher_is_better(key: str) -> bool:
    return "_acc" in key


def best_index(history: list[dict[str, Any]], key: str) -> int:
    """The index of the best record by `key` (highest accuracy, lowest loss); the first of equals."""
    sign = 1 if _higher_is_better(key) else -1
    return max(range(len(history)), key=lambda i: sign * history[i][key])


def evaluations_without_improvement(history: list[dict[str, Any]], key: str, min_delta: float) -> int:
    """How many evaluations in a row, up to the last, did not improve on the best so far by more
    than `min_delta` (the first evaluation sets the best; as Keras' and Lightning's EarlyStopping)."""
    sign = 1 if _higher_is_better(key) else -1
    best, waited = None, 0
    for record in history:
        value = sign * record[key]
        if best is None or value - min_delta > best:
            best, waited = value, 0
        else:
            waited += 1
    return waited


def target_met(record: dict[str, Any], target: tuple[str, str, float]) -> bool:
    metric, comparison, value = target
    return COMPARE[comparison](record[metric], value)


def why_stop(history: list[dict[str, Any]], config: TrainConfig) -> str | None:
    """Why the run ends after its last evaluation before its last epoch, or None: --stop-at's target
    is met, or --early-stop's patience ran out."""
    if config.target is not None and target_met(history[-1], config.target):
        return f"target {''.join(str(v) for v in config.target)} met"
    if config.early_stop is not None:
        key = monitored(config)
        waited = evaluations_without_improvement(history, key, config.min_delta)
        if waited >= config.early_stop:
            more = f" by more than {config.min_delta:g}" if config.min_delta else ""
            return f"early stop: {key} did not improve{more} in {waited} evaluations"
    return None


def time_to_target(history: list[dict[str, Any]], train_s: float = 0.0, samples: int = 0) -> dict[str, float | int]:
    """What reaching the last record took: training and evaluation seconds (warm-up counted with
    training), optimizer steps and training samples; `train_s` and `samples` are those of an epoch
    that the record is inside of (--eval-every)."""
    epochs = [r for r in history if not r.get("inside_epoch")]
    return {
        "target_train_s": sum(r["epoch_time_s"] + r["warmup_s"] for r in epochs) + train_s,
        "target_eval_s": sum(r["eval_time_s"] for r in history),
        "target_steps": history[-1]["step"],
        "target_samples": sum(r["train_samples"] for r in epochs) + samples,
    }
