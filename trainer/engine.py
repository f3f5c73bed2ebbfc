"""class Trainer: set up, then train, evaluate and save, epoch after epoch.

The loop reads top to bottom: fetch a batch, forward, backward, step the optimizer and the
schedule, note the loss on the device, and only at the end of an epoch talk to the host and
to the other processes (one gather), evaluate, log and save a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shlex
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer import checkpoint as ckpt
from trainer import runtime
from trainer.config import ConfigError, TrainConfig
from trainer.console import Reporter
from trainer.data import DATASET_INFO, NORMALIZATION, load_split, make_loader, to_model_input
from trainer.evaluate import EvalResult, evaluate_model
from trainer.model import build_model

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.jsonl"
# With several processes, a stop request is agreed on (one tiny all-reduce) every this many steps.
STOP_CHECK_EVERY = 10
# Recipe fields a checkpoint must agree on with the run that resumes it.
RECIPE_CHECKED = (
    "model",
    "dataset",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "cycle_momentum",
    "seed",
    "limit_train_batches",
)


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; exit code 128 + signum."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class Diverged(Exception):
    """The loss or the weights stopped being finite; nothing after the last finite checkpoint was saved.
    The CLI exits with DIVERGED_EXIT_CODE."""


DIVERGED_EXIT_CODE = 3


def make_accelerator(config: TrainConfig):
    """The one Accelerator: devices, processes and precision come from it (and accelerate's config)."""
    from accelerate import Accelerator, DataLoaderConfiguration

    kwargs: dict[str, Any] = {}
    if config.mixed_precision is not None:
        kwargs["mixed_precision"] = config.mixed_precision
    device_is_cpu = config.cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if device_is_cpu or not (torch.cuda.is_available() or _mps_available()):
        precision = kwargs.get("mixed_precision", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
        if precision == "fp16":
            raise ConfigError("fp16 mixed precision needs a GPU; on the CPU use --mixed-precision bf16 or no")
    if config.compile:
        from accelerate.utils import TorchDynamoPlugin

        cuda = torch.cuda.is_available() and not device_is_cpu
        mode = config.compile_mode or ("reduce-overhead" if cuda else "default")
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=mode)
    if config.trackers:
        from accelerate.utils import ProjectConfiguration

        run_dir = Path(config.output_dir) / config.name
        kwargs["log_with"] = _check_trackers(config.trackers)
        kwargs["project_config"] = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "trackers"))
    try:
        return Accelerator(
            cpu=config.cpu,
            # Our sampler derives each epoch's order from (seed, epoch): no RNG needs syncing per epoch.
            rng_types=[],
            dataloader_config=DataLoaderConfiguration(even_batches=True),
            **kwargs,
        )
    except ValueError as exc:  # accelerate's own refusal of a precision/device pair
        raise ConfigError(str(exc).strip().splitlines()[0]) from None


def _check_trackers(names: list[str]) -> list[str]:
    """--log-with names that accelerate knows and whose package is installed; else a ConfigError.
    accelerate itself would skip a missing tracker with a debug-level message only."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    if "all" in names:
        return ["all"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(sorted(LOGGER_TYPE_TO_CLASS))
            raise ConfigError(f"--log-with: unknown tracker {name!r}; accelerate knows {known}, all")
        if name in LoggerType.list() and name not in available:
            raise ConfigError(f"--log-with {name}: the {name} package is not installed (pip install {name})")
    return names


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


class Trainer:
    """Trains `config.model` on `config.dataset` with the OneCycle recipe.

    Typical use: `Trainer(TrainConfig(epochs=10)).fit()`. Raises ConfigError / CheckpointError on
    user errors, Stopped after a signal-triggered save.
    """

    def __init__(self, config: TrainConfig, accelerator=None) -> None:
        self.config = config = _placed(config)
        runtime.launcher_argv()  # noted now, while the launcher lives (for the printed resume command)
        self.accelerator = accelerator or make_accelerator(config)
        self.threads: tuple[int, str] | None = None
        if self.accelerator.device.type == "cpu" or config.threads is not None:
            self.threads = runtime.cpu_threads(config.threads)
            torch.set_num_threads(self.threads[0])
        self.report = Reporter(self.accelerator.is_main_process, config.progress)
        if self._compile_text() != "no":  # inductor's note that a CUDA build of torch found no GPU is noise here
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.run_dir = Path(config.output_dir) / config.name
        self.num_processes = self.accelerator.num_processes
        self._check_processes()
        from accelerate.utils import set_seed

        set_seed(config.seed)
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_schedule()
        # All at once, as accelerate expects: its optimizer wrapper keeps the step that the scheduler
        # wrapped (a scheduler made later makes torch warn about an overridden step in fp16 runs).
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler
        )
        if self._steps_in(0, 0) != self.steps_per_epoch:
            raise RuntimeError(f"{self._steps_in(0, 0)} prepared steps per epoch, {self.steps_per_epoch} planned")
        # Bookkeeping of where the run is: the next epoch (0-based) and the position inside it.
        self.global_step = 0
        self.epoch = 0
        self.samples_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.curves: list[dict[str, Any]] = []
        self._stats = torch.zeros(self.steps_per_epoch, 2, device=self.accelerator.device)  # per step: loss, correct
        self._stats_filled = 0
        self._carry = torch.zeros(0, 2)  # an interrupted epoch's per-step stats from another world size
        self._carry_curve: list[float] = []  # per-step mean loss of that part, for curves.jsonl
        self._epoch_lrs: list[float] = []
        self._epoch_time_before = 0.0
        self._stop_signal: int | None = None
        # This process's first training step and first evaluation batch (compilation, lazy set-up).
        self._warmup: dict[str, float | None] = {"train": None, "eval": None}
        self._warmup_reported = 0.0
        self.command_args: list[str] | None = None  # the CLI's flags, for the printed resume command
        self._prepare_run_dir()

    # ------------------------------------------------------------------ setup
    def _check_processes(self) -> None:
        launched = runtime.world_size()
        if launched > 1 and self.num_processes == 1:
            raise ConfigError(
                f"{launched} processes were launched but accelerate sees no distributed setup, so each would "
                "train alone and write the same files; on a CPU-only machine pass --cpu (gloo)"
            )

    def _setup_data(self) -> None:
        cfg, acc = self.config, self.accelerator
        error = None
        with acc.local_main_process_first():  # one process per machine downloads; the others then read
            try:
                train = load_split(cfg.dataset, cfg.data_dir, train=True)
                test = load_split(cfg.dataset, cfg.data_dir, train=False)
            except ConfigError as exc:  # data missing on one machine must stop the others too
                error = exc
        runtime.agree(error, f"load the {cfg.dataset} data")
        self.class_names = DATASET_INFO[cfg.dataset][1]
        self.train_size, self.test_size = len(train.labels), len(test.labels)
        per_step = cfg.batch_size * self.num_processes
        if self.train_size < per_step:
            raise ConfigError(
                f"the training split has {self.train_size} images, fewer than one step needs "
                f"({cfg.batch_size} per process x {self.num_processes} processes)"
            )
        self.train_loader = make_loader(train, cfg.batch_size, train=True, seed=cfg.seed, device=acc.device)
        self.eval_loader = make_loader(test, cfg.eval_batch_size, train=False, seed=cfg.seed, device=acc.device)
        self.train_sampler = self.train_loader.sampler
        self.eval_sampler = self.eval_loader.sampler

    def _setup_model(self) -> None:
        self.model = build_model(self.config.model, num_classes=len(self.class_names))
        if self.config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _setup_optimizer(self) -> None:
        cfg = self.config
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    def _steps_in(self, epoch: int, start: int) -> int:
        """Optimizer steps left in `epoch` from sample `start` on; positions the sampler there."""
        cfg = self.config
        stop = None
        if cfg.limit_train_batches is not None:
            stop = min(self.train_size, cfg.limit_train_batches * self.num_processes * cfg.batch_size)
        self.train_sampler.set_position(epoch, start, stop)
        return len(self.train_loader)

    def _setup_schedule(self) -> None:
        """OneCycle over the run, in units of one per-process batch of data.

        accelerate's prepared scheduler advances the wrapped one `num_processes` units per
        optimizer step (each step consumes that many batches). Sizing the schedule in units makes
        its position the amount of data seen, whatever the process count; sizing it as
        `(steps - 1) * N + 1` units puts the last optimizer step exactly on OneCycle's final LR.
        """
        cfg = self.config
        samples = self.train_size
        if cfg.limit_train_batches is not None:
            samples = min(samples, cfg.limit_train_batches * self.num_processes * cfg.batch_size)
        # What accelerate's sharding of the drop_last loader gives each process (checked after prepare).
        self.steps_per_epoch = samples // cfg.batch_size // self.num_processes
        total_steps = self.steps_per_epoch * cfg.epochs
        self.scheduler = self._new_onecycle((total_steps - 1) * self.num_processes + 1)

    def _new_onecycle(self, total_units: int) -> torch.optim.lr_scheduler.OneCycleLR:
        raw = getattr(self.optimizer, "optimizer", self.optimizer)  # the one accelerate wraps, once prepared
        return torch.optim.lr_scheduler.OneCycleLR(
            raw, max_lr=self.config.lr, total_steps=max(total_units, 2), cycle_momentum=self.config.cycle_momentum
        )

    def _prepare_run_dir(self) -> None:
        """Locks the run folder (the main process), then checks it or resumes from it."""
        cfg, acc = self.config, self.accelerator
        self._lock = ckpt.RunLock(self.run_dir)
        error: Exception | None = None
        if acc.is_main_process:
            try:
                self._lock.acquire()  # before anything is written: one writer per run folder
                ckpt.remove_stale_temporaries(self.run_dir)
                holds = [p.name for p in (self.run_dir / METRICS_NAME, *ckpt.list_checkpoints(self.run_dir))
                         if p.exists()]  # fmt: skip
                if cfg.resume is None and holds:
                    error = ConfigError(
                        f"run folder {self.run_dir} already holds results ({', '.join(holds[:3])}); pass "
                        "--resume latest to continue it, or choose another --run-name"
                    )
            except OSError as exc:
                error = ConfigError(f"cannot create the run folder {self.run_dir}: {exc.strerror}")
            except ckpt.CheckpointError as exc:
                error = exc
        try:
            runtime.agree(error, f"use the run folder {self.run_dir}")
            if cfg.resume is not None:
                self._resume(self._find_resume_point(cfg.resume))
            acc.wait_for_everyone()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the run folder for another run (fit() does this when it ends)."""
        self._lock.release()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict[str, Any]]:
        """Trains until `config.epochs` epochs are done; returns the per-epoch metrics records."""
        if self.epoch >= self.config.epochs:
            self.report.line(f"run already complete ({self.config.epochs} epochs): {self.run_dir}")
            self.close()
            return self.history
        try:
            self._announce()
            if self.accelerator.log_with:
                settings = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                            for k, v in self.config.to_dict().items() if v is not None}  # fmt: skip
                self.accelerator.init_trackers(self.config.name, config=settings)
            return self._fit()
        finally:
            # Not accelerator.end_training(): it also destroys the process group, which the caller may still use.
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self.report.close()
            self.close()

    def _fit(self) -> list[dict[str, Any]]:
        with _StopSignals(self):
            while self.epoch < self.config.epochs:
                train = self.train_epoch()
                if train is None:  # stopped mid-epoch; a checkpoint was written
                    raise Stopped(self._stop_signal, self._last_saved)
                first_evaluation, eval_started = self._warmup["eval"] is None, time.perf_counter()
                self.report.evaluating(self._eval_images())
                valid = self.evaluate()
                self.report.evaluated()
                # The first evaluation batch of this process is warm-up (warmup_s), not evaluation.
                train["eval_time_s"] = time.perf_counter() - eval_started - (valid.first_batch_s * first_evaluation)
                self._check_finite(train["curve"]["loss"], valid.loss)
                record = self._epoch_record(train, valid)
                self.history.append(record)
                self.epoch, self.samples_in_epoch = self.epoch + 1, 0
                self._write_epoch_logs(record, train["curve"])
                self._log_to_trackers(record, train["curve"])
                self.report.epoch_row(record)
                self._save(best_candidate=True)
                # Every process takes part in this agreement, also one that already holds a signal.
                # After the last epoch there is nothing left to stop: the run is complete.
                if self.epoch < self.config.epochs and self._stop_agreed(force=True):
                    self._print_resume_hint()
                    raise Stopped(self._stop_signal or signal.SIGTERM, self._last_saved)
        if self._stop_signal is not None:
            self.report.line(f"{signal.Signals(self._stop_signal).name} came after the last step: the run is complete")
        return self.history

    def train_epoch(self) -> dict[str, Any] | None:
        """Trains from the current position to the end of the epoch; None if stopped by a signal."""
        cfg, acc = self.config, self.accelerator
        epoch, per_step = self.epoch, cfg.batch_size * self.num_processes
        if self.samples_in_epoch == 0:
            self._stats = torch.zeros(self.steps_per_epoch, 2, device=acc.device)  # per step: loss, correct
            self._stats_filled, self._epoch_lrs, self._epoch_time_before = 0, [], 0.0
        first = self._stats_filled
        remaining = self._steps_in(epoch, self.samples_in_epoch)
        self.model.train()
        raw_opt = self.optimizer.optimizer
        # Without a grad scaler or accumulation, accelerate's optimizer wrapper only adds per-step
        # checks (an import lookup, an inspect.signature): step the wrapped optimizer directly.
        fast = acc.scaler is None and acc.gradient_accumulation_steps == 1
        probe = _LossProbe(acc.device)
        show_every = max(1, remaining // 50)
        self.report.start_epoch(epoch + 1, cfg.epochs, first + remaining, first)
        t0 = time.perf_counter()
        for i, (images, labels) in enumerate(self.train_loader, start=first):
            logits = self.model(to_model_input(images, cfg.channels_last))
            loss = F.cross_entropy(logits, labels)
            acc.backward(loss)
            self._epoch_lrs.append(raw_opt.param_groups[0]["lr"])  # the LR this step uses
            if fast:
                raw_opt.step()
                raw_opt.zero_grad(set_to_none=True)
            else:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self._stats[i, 0] = loss.detach()
            self._stats[i, 1] = (logits.detach().argmax(dim=1) == labels).sum()
            self._stats_filled = i + 1
            self.global_step += 1
            self.samples_in_epoch += per_step
            if self._warmup["train"] is None:  # this process's first step: torch.compile compiles here
                self._warmup["train"] = time.perf_counter() - t0
                t0 = time.perf_counter()  # the epoch's time leaves it out: it is reported as warmup_s
            if self.report.enabled and (i + 1 - first) % show_every == 0:  # the main process shows progress
                self.report.advance(i + 1, per_step, self._epoch_lrs[-1], probe.read_then_copy(loss))
            last = i + 1 == first + remaining
            if not last and self._stop_agreed(step=i + 1):
                self.report.end_epoch()
                self._epoch_time_before += time.perf_counter() - t0
                self._save(best_candidate=False)
                self._print_resume_hint()
                return None
            if not last and cfg.save_every and self.global_step % cfg.save_every == 0:
                self._epoch_time_before += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._save(best_candidate=False)
        self.report.end_epoch()
        # The one sync of the epoch: every process's per-step loss and correct count (float32; the
        # sums are exact in double precision on the host).
        stats = acc.gather(self._stats[: self._stats_filled].unsqueeze(0)).cpu()  # [N, steps, 2]
        all_steps = torch.cat([self._carry, stats.reshape(-1, 2)]).tolist()
        curve = self._carry_curve + stats[:, :, 0].mean(dim=0).tolist()
        self._carry, self._carry_curve = torch.zeros(0, 2), []
        samples = len(all_steps) * cfg.batch_size
        elapsed = self._epoch_time_before + time.perf_counter() - t0
        return {
            "loss": math.fsum(loss for loss, _ in all_steps) * cfg.batch_size / samples,
            "acc": math.fsum(correct for _, correct in all_steps) / samples,
            "samples": samples,
            "time_s": elapsed,
            "curve": {"loss": curve, "lr": list(self._epoch_lrs)},
        }

    def _eval_images(self) -> int:
        cfg = self.config
        if cfg.limit_eval_batches is None:
            return self.test_size
        return min(self.test_size, cfg.limit_eval_batches * self.num_processes * cfg.eval_batch_size)

    def evaluate(self) -> EvalResult:
        """Exact counts over the test split (or its first --limit-eval-batches batches per process)."""
        cfg = self.config
        self.eval_sampler.set_position(0, 0, self._eval_images())
        result = evaluate_model(
            self.accelerator, self.model, self.eval_loader, len(self.class_names), cfg.channels_last
        )
        if self._warmup["eval"] is None:
            self._warmup["eval"] = result.first_batch_s
        return result

    # ------------------------------------------------------------------ stopping
    def _stop_agreed(self, step: int = 0, force: bool = False) -> bool:
        """True when some process was asked to stop; all processes answer the same at the same step."""
        if self.num_processes == 1:
            return self._stop_signal is not None
        if not force and step % STOP_CHECK_EVERY:
            return False
        # One tiny gather carries both questions: a stop signal, and a loss that stopped being finite.
        device = self.accelerator.device
        signum = torch.tensor([0 if self._stop_signal is None else int(self._stop_signal)], device=device)
        diverged = (~torch.isfinite(self._stats[: self._stats_filled, 0])).any().reshape(1).to(torch.int64)
        agreed, bad = self.accelerator.gather(torch.stack([signum, diverged], dim=1)).max(dim=0).values.tolist()
        if bad:
            raise Diverged(self._diverged_message(f"the training loss stopped being finite by step {self.global_step}"))
        if agreed and self._stop_signal is None:
            self._stop_signal = agreed
        return agreed > 0

    def _check_finite(self, losses: list[float], valid_loss: float) -> None:
        """The epoch's per-step losses and its validation loss are finite (host values: no sync)."""
        bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
        if bad is not None:
            step = self.global_step - len(losses) + bad + 1
            raise Diverged(self._diverged_message(f"the training loss was {losses[bad]} at step {step}"))
        if not math.isfinite(valid_loss):
            raise Diverged(
                self._diverged_message(f"the validation loss was {valid_loss} after step {self.global_step}")
            )

    def _diverged_message(self, what: str) -> str:
        last = getattr(self, "_last_saved", None)
        kept = f"the last checkpoint, {last.name}, is finite" if last else "no checkpoint was written"
        return (
            f"training diverged: {what} (epoch {self.epoch + 1}); {kept}; "
            f"lower --lr (this run: {self.config.lr}) or use fp32"
        )

    def request_stop(self, signum: int) -> None:
        """Asks the loop to save and stop after the current step (what the signal handlers call)."""
        self._stop_signal = signum

    def _print_resume_hint(self) -> None:
        self.report.line(f"stopped by {signal.Signals(self._stop_signal).name}; checkpoint saved: {self._last_saved}")
        self.report.line(f"resume with: {resume_command(self.command_args)}")

    # ------------------------------------------------------------------ output
    def _announce(self) -> None:
        acc, cfg = self.accelerator, self.config
        items = {
            "run": str(self.run_dir),
            "device": str(acc.device),
            "processes": self.num_processes,
            "precision": acc.mixed_precision,
            "compile": self._compile_text(),
            "global batch": cfg.batch_size * self.num_processes,
            "steps/epoch": self.steps_per_epoch,
            "epochs": cfg.epochs,
            "train/test images": f"{self.train_size}/{self.test_size}",
        }
        if self.threads is not None:
            items["threads"] = f"{self.threads[0]} ({self.threads[1]})"
        if self.global_step:
            items["resumed at"] = f"step {self.global_step} (epoch {self.epoch + 1}, sample {self.samples_in_epoch})"
        self.report.summary(items)
        for record in self.history:  # a resumed run's table continues where it was
            self.report.epoch_row(record)

    def _take_warmup(self) -> float:
        """The warm-up seconds not reported yet (all of them in this process's first epoch, then 0)."""
        seconds = sum(v for v in self._warmup.values() if v is not None) - self._warmup_reported
        self._warmup_reported += seconds
        return seconds

    def _compile_text(self) -> str:
        plugin = self.accelerator.state.dynamo_plugin
        backend = str(getattr(plugin.backend, "value", plugin.backend)).lower()
        return "no" if backend == "no" else f"{backend} ({plugin.mode or 'default'})"

    def _epoch_record(self, train: dict[str, Any], valid: EvalResult) -> dict[str, Any]:
        return {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "train_loss": train["loss"],
            "train_acc": train["acc"],
            "train_samples": train["samples"],
            "valid_loss": valid.loss,
            "valid_acc": valid.accuracy,
            "valid_correct": valid.correct,
            "valid_seen": valid.seen,
            "lr": train["curve"]["lr"][-1],  # the LR of the epoch's last step (the scheduler is one ahead)
            "epoch_time_s": train["time_s"],
            "eval_time_s": train["eval_time_s"],
            # Only in the first epoch this process runs: its first step and first evaluation batch
            # (left out of epoch_time_s and eval_time_s).
            "warmup_s": self._take_warmup(),
            "train_samples_per_s": train["samples"] / train["time_s"] if train["time_s"] > 0 else 0.0,
            "num_processes": self.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
        }

    def _write_epoch_logs(self, record: dict[str, Any], curve: dict[str, Any]) -> None:
        self.curves.append({"epoch": record["epoch"], "last_step": record["step"], **curve})
        self._write_logs()

    def _log_to_trackers(self, record: dict[str, Any], curve: dict[str, Any]) -> None:
        """--log-with: the per-step loss and LR, then the epoch's metrics, at their optimizer steps."""
        acc = self.accelerator
        if not acc.log_with:
            return
        first = record["step"] - len(curve["lr"]) + 1
        for i, (loss, lr) in enumerate(zip(curve["loss"], curve["lr"])):
            acc.log({"train/step_loss": loss, "train/lr": lr}, step=first + i)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        acc.log({f"epoch/{k}": v for k, v in scalars.items()} | {"epoch": record["epoch"]}, step=record["step"])

    def _write_logs(self) -> None:
        """metrics.jsonl and curves.jsonl as the run's history so far, each file replaced whole: a
        full disk leaves the previous file, never half a line. After a resume, lines that belonged
        to a lost future are gone."""
        error = None
        if self.accelerator.is_main_process:
            try:
                for name, rows in ((METRICS_NAME, self.history), (CURVES_NAME, self.curves)):
                    ckpt.write_lines_atomic(self.run_dir / name, rows)
            except OSError as exc:
                error = ckpt.SaveError(ckpt.describe_write_error(exc, "the run's logs", self.run_dir))
            except Exception as exc:  # a bug: its traceback, after the other processes were told
                error = exc
        runtime.agree(error, "write the run's logs")

    # ------------------------------------------------------------------ checkpoints
    def _save(self, best_candidate: bool) -> None:
        """Every process calls this: gathers what only it knows, the main process writes, all wait."""
        acc = self.accelerator
        # Never a checkpoint of a diverged run: its weights (and this epoch's losses so far) must be finite.
        finite = [torch.isfinite(t).all() for t in self.model.state_dict().values() if t.is_floating_point()]
        finite.append(torch.isfinite(self._stats[: self._stats_filled, 0]).all())
        bad = (~torch.stack(finite).all()).reshape(1).to(torch.int64)
        if int(acc.gather(bad).max().item()):
            raise Diverged(self._diverged_message(f"the weights or the loss are not finite at step {self.global_step}"))
        rng = {k: acc.gather(v.to(acc.device).unsqueeze(0)).cpu() for k, v in _rng_state().items()}
        progress = {}
        if self.samples_in_epoch:  # mid-epoch: the interrupted epoch's per-step stats of every process
            progress["epoch_stats"] = acc.gather(self._stats[: self._stats_filled].unsqueeze(0)).cpu()
            progress["epoch_carry"] = self._carry
        failure: BaseException | None = None
        if acc.is_main_process:
            try:
                folder = ckpt.save(self.run_dir, self.global_step, self._checkpoint_contents(rng, progress))
                self._after_save(folder, best_candidate)
            except ckpt.SaveError as exc:
                failure = exc
            except OSError as exc:  # updating `best` or pruning, after the new checkpoint is complete
                failure = ckpt.SaveError(ckpt.describe_write_error(exc, "the run folder's links", self.run_dir))
            except Exception as exc:  # a bug: its traceback, after the other processes were told
                failure = exc
        status = torch.tensor([0 if failure is None else 1], device=acc.device)
        if int(acc.reduce(status, reduction="sum").item()):
            raise failure if failure is not None else runtime.PeerError("process 0 could not save a checkpoint")
        self._last_saved = self.run_dir / ckpt.step_dir_name(self.global_step)

    def _after_save(self, folder: Path, best_candidate: bool) -> None:
        if best_candidate:
            best = max(self.history, key=lambda r: r["valid_acc"])
            if best is self.history[-1]:
                ckpt.update_best(self.run_dir, folder)
        ckpt.prune(self.run_dir, self.config.keep_last)

    def _checkpoint_contents(self, rng: dict[str, Tensor], progress: dict[str, Tensor]) -> ckpt.CheckpointContents:
        from trainer import __version__

        acc, cfg = self.accelerator, self.config
        raw_opt = self.optimizer.optimizer
        model_state = self._plain_model().state_dict()
        opt_state = raw_opt.state_dict()
        optimizer_tensors = {
            f"state.{pid}.{name}": value
            for pid, entry in opt_state["state"].items()
            for name, value in entry.items()
            if isinstance(value, Tensor)
        }
        last = self.history[-1] if self.history else {}
        metadata = {
            "format": "pt",
            "trainer_version": __version__,
            "architecture": cfg.model,
            "dataset": cfg.dataset,
            "num_classes": str(len(self.class_names)),
            "class_names": json.dumps(self.class_names),
            "normalization": json.dumps(NORMALIZATION),
            "input_shape": json.dumps([1, 28, 28]),
            "epoch": str(self.epoch),
            "step": str(self.global_step),
            "valid_acc": "" if not last else repr(last["valid_acc"]),
        }
        state = {
            "format_version": ckpt.FORMAT_VERSION,
            "trainer_version": __version__,
            "step": self.global_step,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "world_size": self.num_processes,
            "data_order": {"seed": cfg.seed, "rule": "randperm(n, seed * 1000003 + epoch)"},
            "config": cfg.to_dict(),
            "scheduler": _jsonable(self.scheduler.scheduler.state_dict()),
            "optimizer_param_groups": opt_state["param_groups"],
            "optimizer_other_state": {
                str(pid): {k: v for k, v in entry.items() if not isinstance(v, Tensor)}
                for pid, entry in opt_state["state"].items()
            },
            "epoch_lrs": self._epoch_lrs if self.samples_in_epoch else [],
            "epoch_loss_curve": (
                self._carry_curve + progress["epoch_stats"][:, :, 0].mean(dim=0).tolist()
                if self.samples_in_epoch
                else []
            ),
            "epoch_time_before_s": self._epoch_time_before if self.samples_in_epoch else 0.0,
            "history": self.history,
            "curves": self.curves,
            "mixed_precision": acc.mixed_precision,
            # fp16's loss scale and its growth tracker (plain numbers): a resumed fp16 run scales as the unbroken one.
            "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        }
        return ckpt.CheckpointContents(model_state, metadata, optimizer_tensors, rng, progress, state)

    def _find_resume_point(self, resume: str) -> Path:
        folder = runtime.agree_on_checkpoint(resume, self.run_dir, warn=self.report.warn)
        if resume == "latest":
            return folder
        newer = [p.name for p in ckpt.list_checkpoints(self.run_dir) if ckpt.step_of(p) > ckpt.step_of(folder)]
        if newer and folder.parent.resolve() == self.run_dir.resolve():
            raise ConfigError(
                f"{self.run_dir} has checkpoints newer than {folder.name} ({', '.join(newer[:3])}); resuming "
                "the older one here would overwrite them: pass a new --run-name to branch from it"
            )
        return folder

    def _resume(self, folder: Path) -> None:
        acc, cfg = self.accelerator, self.config
        contents = ckpt.load(folder)
        state = contents.state
        saved = TrainConfig.from_dict(state["config"])
        for name in RECIPE_CHECKED:
            if getattr(saved, name) != getattr(cfg, name):
                raise ConfigError(
                    f"checkpoint {folder} was trained with {name}={getattr(saved, name)!r}, this run has "
                    f"{name}={getattr(cfg, name)!r}; a resumed run keeps its recipe"
                )
        if contents.model_metadata.get("architecture") != cfg.model:
            raise ConfigError(
                f"{folder / ckpt.MODEL_NAME} holds a {contents.model_metadata.get('architecture')!r} model"
            )
        self._check_precision(folder, state.get("mixed_precision", "no"))
        try:
            self._plain_model().load_state_dict(contents.model)
        except RuntimeError as exc:
            raise ckpt.CheckpointError(
                f"{folder / ckpt.MODEL_NAME} does not fit the model: {str(exc).splitlines()[0]}"
            ) from None
        raw_opt = self.optimizer.optimizer
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["optimizer_param_groups"]}
        for pid, extra in state["optimizer_other_state"].items():
            opt_state["state"][int(pid)] = dict(extra)
        for key, value in contents.optimizer.items():
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = value
        raw_opt.load_state_dict(opt_state)
        self.scheduler.scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("grad_scaler"):
            acc.scaler.load_state_dict(state["grad_scaler"])
        saved_world = state["world_size"]
        rank = acc.process_index
        _set_rng_state({k: v[rank % v.shape[0]] for k, v in contents.rng.items()})
        self.global_step = state["step"]
        self.epoch = state["epoch"]
        self.samples_in_epoch = state["samples_in_epoch"]
        self.history, self.curves = state["history"], state["curves"]
        self._epoch_lrs = list(state["epoch_lrs"])
        self._epoch_time_before = state["epoch_time_before_s"]
        if self.samples_in_epoch:
            stats = contents.progress["epoch_stats"]  # [saved world, steps done, 2]
            carry = contents.progress["epoch_carry"].to(torch.float32)  # older checkpoints: float64
            self._stats = torch.zeros(self.steps_per_epoch, 2, device=acc.device)
            self._stats_filled = 0
            if saved_world == self.num_processes and carry.numel() == 0:
                self._stats[: stats.shape[1]] = stats[rank].to(acc.device)
                self._stats_filled = stats.shape[1]
            else:  # elastic: the finished part of this epoch is kept aside, in the same units
                self._carry = torch.cat([carry, stats.reshape(-1, 2)])
                self._carry_curve = list(state["epoch_loss_curve"])
        if saved_world != self.num_processes:
            self._rescale_schedule()
            self.report.warn(
                f"resuming a {saved_world}-process checkpoint on {self.num_processes} processes: the data "
                "order and LR position carry over; results will not be bitwise equal to an unbroken run"
            )
        self._last_saved = folder
        self._write_logs()
        if self.epoch < cfg.epochs:
            self.report.line(f"resumed from {folder} (step {self.global_step})")

    def _plain_model(self) -> torch.nn.Module:
        """The user's module itself: no DDP wrapper, no torch.compile wrapper (whose state_dict keys
        gain an `_orig_mod.` prefix), so checkpoints are the same with and without --compile."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _check_precision(self, folder: Path, saved: str) -> None:
        """A resumed run keeps its precision, unless --mixed-precision asks for another one (a warning)."""
        now = self.accelerator.mixed_precision
        if now == saved:
            return
        if self.config.mixed_precision is None:  # from accelerate's config or environment: not chosen here
            raise ConfigError(
                f"checkpoint {folder} was trained in {saved} precision, and this launch would resume it in {now} "
                f"(accelerate's config or ACCELERATE_MIXED_PRECISION); launch it as it was started (the printed "
                f"resume command does), or pass --mixed-precision {now} to change precision on purpose"
            )
        self.report.warn(
            f"resuming a checkpoint trained in {saved} with --mixed-precision {now}: the run will not equal an "
            "unbroken one"
        )

    def _rescale_schedule(self) -> None:
        """Another world size: keep the units done, size the rest to the steps that remain now."""
        old = self.scheduler.scheduler
        done_units = old.last_epoch
        steps_left = (
            self._steps_in(self.epoch, self.samples_in_epoch)
            + (self.config.epochs - self.epoch - 1) * self.steps_per_epoch
        )
        fresh = self._new_onecycle(done_units + max(steps_left - 1, 0) * self.num_processes + 1)
        fresh.last_epoch = done_units - 1
        fresh._step_count = done_units
        fresh.step()  # sets the optimizer's LR (and momentum) for position `done_units`
        self.scheduler.scheduler = fresh


class _StopSignals:
    """SIGINT/SIGTERM ask the trainer to save and stop after the current step; a second Ctrl-C stops at once.

    Python runs a signal's handler only between bytecodes, so two Ctrl-Cs during one long step
    (a backward pass in C++) reach `_handle` once. The C-level handler still writes one byte per
    signal to the wakeup fd, so counting those bytes tells a double press from a single one.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.previous: dict[int, Any] = {}
        self._wakeup: tuple[Any, Any] | None = None
        self._previous_fd = -1

    def __enter__(self) -> _StopSignals:
        import socket

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        return self

    def _presses(self) -> int:
        """SIGINTs delivered since the last look (each wrote its number to the wakeup socket)."""
        if self._wakeup is None:
            return 0
        count = 0
        try:
            while data := self._wakeup[0].recv(4096):
                count += data.count(bytes([signal.SIGINT]))
        except (BlockingIOError, OSError):
            pass
        return count

    def _handle(self, signum: int, frame: Any) -> None:
        double = signum == signal.SIGINT and self._presses() >= 2  # both pressed during one long step
        if self.trainer._stop_signal is not None or double:
            # Only a second Ctrl-C means "now". A SIGTERM after a Ctrl-C is usually the launcher
            # dying from the same Ctrl-C (see cli.die_with_launcher): the save must go on.
            if signum == signal.SIGINT:
                signal.signal(signum, signal.SIG_DFL)
                raise KeyboardInterrupt
            return
        self.trainer.request_stop(signum)
        self.trainer.report.warn(
            f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
            "(press Ctrl-C again to stop at once)"
        )

    def __exit__(self, *exc: Any) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        if self._wakeup is not None:
            for end in self._wakeup:
                end.close()
            self._wakeup = None
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _LossProbe:
    """The latest loss for the progress bar, read without making the host wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.value = torch.zeros((), pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False
        self.last: float | None = None

    def read_then_copy(self, loss: Tensor) -> float | None:
        if self.pending and (not self.cuda or self.event.query()):
            self.last, self.pending = float(self.value), False
        if not self.pending:
            self.value.copy_(loss.detach(), non_blocking=self.cuda)
            if self.cuda:
                self.event.record()
            self.pending = True
        return self.last


def resume_command(args: list[str] | None = None) -> str:
    """The command line that continues this run (the launcher is named when we know it)."""
    args = list(sys.argv[1:] if args is None else args)
    cleaned, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume="):
            continue
        cleaned.append(arg)
    cleaned += ["--resume", "latest"]
    launcher = runtime.launcher_argv()
    if launcher is not None:  # the launcher as it was started: its config file sets the precision again
        return shlex.join([*launcher, "-m", "trainer", *cleaned])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", "1"), "-m", "trainer"]
    elif any(k.startswith("ACCELERATE_") for k in os.environ):
        launcher = ["accelerate", "launch", "-m", "trainer"]
    else:
        launcher = ["python", "-m", "trainer"]
    return shlex.join(launcher + cleaned)


def _placed(config: TrainConfig) -> TrainConfig:
    """The config with absolute paths (a resume never depends on the working directory), and, when
    it resumes a checkpoint by path without naming a run, that checkpoint's own run folder."""
    import dataclasses

    changes: dict[str, Any] = {
        "data_dir": str(Path(config.data_dir).absolute()),
        "output_dir": str(Path(config.output_dir).absolute()),
    }
    if config.resume not in (None, "latest") and config.run_name is None:
        folder = Path(config.resume)
        folder = folder.parent if folder.name == ckpt.MODEL_NAME else folder
        run = folder.absolute().parent
        changes.update(output_dir=str(run.parent), run_name=run.name)
    return dataclasses.replace(config, **changes)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON")


def _rng_state() -> dict[str, Tensor]:
    """This process's random generators as fixed-size int64 tensors, to be gathered on the training
    device: uint8 states by value (gloo's uint8 gather returned invalid rows for process 1 here),
    Python's and numpy's float parts by their bits (MPS has no float64)."""
    version, mt, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().to(torch.int64),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_gauss_bits": _float_bits([float("nan") if gauss is None else gauss]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().to(torch.int64)
    try:
        import numpy as np

        _, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        state["numpy_rest_bits"] = _float_bits([pos, has_gauss, cached])
    except ImportError:
        pass
    return state


def _float_bits(values: list[float]) -> Tensor:
    """Doubles as the int64 tensor of their IEEE-754 bits (exact, and no float64 tensor anywhere)."""
    return torch.tensor(struct.unpack(f"<{len(values)}q", struct.pack(f"<{len(values)}d", *values)))


def _floats(state: dict[str, Tensor], name: str) -> list[float]:
    """Undoes `_float_bits` (`name`_bits); checkpoints of format 1 hold `name` as float64."""
    if name in state:
        return state[name].tolist()
    bits = state[f"{name}_bits"].tolist()
    return list(struct.unpack(f"<{len(bits)}d", struct.pack(f"<{len(bits)}q", *bits)))


def _set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8).clone())  # a row view: torch reads its storage
    (gauss,) = _floats(state, "python_gauss")
    random.setstate((3, tuple(int(v) for v in state["python_mt"].tolist()), None if gauss != gauss else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).clone())
    if "numpy_keys" in state:
        import numpy as np

        pos, has_gauss, cached = _floats(state, "numpy_rest")
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"), int(pos), int(has_gauss), cached))
