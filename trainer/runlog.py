"""A run's logs: config.yaml (its settings), metrics.jsonl (one line per epoch), curves.jsonl
(per-step loss and LR) and the experiment trackers accelerate talks to (--log-with).

The two files are the run's history so far, each replaced whole at every epoch's end: a full
disk leaves the previous file, never half a line, and after a resume the lines of a lost future
are gone. Only the main process writes; every process learns whether it worked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer import checkpoint as ckpt
from trainer import runtime
from trainer.config import SETTINGS_LIMIT, TrainConfig

CONFIG_NAME = "config.yaml"  # the run's settings as it used them: `trainer --config` runs them again
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.jsonl"
WANDB_ID_NAME = "wandb-run-id"
NOTES_NAME = "run.log"  # how each run in the folder started and ended, with the command that resumes it


class RunLog:
    """metrics.jsonl, curves.jsonl and the trackers of one run folder."""

    def __init__(self, accelerator: Any, run_dir: Path) -> None:
        self.accelerator, self.run_dir = accelerator, run_dir
        self.history: list[dict[str, Any]] = []  # one record per finished epoch
        self.curves: list[dict[str, Any]] = []  # per epoch: the loss and LR of every step

    def write_config(self, config: TrainConfig) -> None:
        """config.yaml as `config`, unless it holds that already (a resume that changed no setting
        leaves it); replaced whole, by the main process; every process learns whether it worked."""
        error = None
        if self.accelerator.is_main_process:
            path, text = self.run_dir / CONFIG_NAME, config.to_yaml()
            try:
                if _read_text(path) != text:
                    ckpt.write_text_atomic(path, text)
            except OSError as exc:
                error = ckpt.SaveError(ckpt.describe_write_error(exc, "the run's config.yaml", self.run_dir))
            except Exception as exc:  # a bug: its traceback, after the other processes were told
                error = exc
        runtime.agree(error, "write the run's config.yaml")

    def start_trackers(self, config: TrainConfig) -> None:
        """The trackers continue the run where they can: TensorBoard writes into the run folder's
        trackers/ again, and W&B is given the run id kept there (a resumed or requeued job logs to
        the same W&B run)."""
        if not self.accelerator.log_with:
            return
        settings = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in config.to_dict().items() if v is not None}  # fmt: skip
        init_kwargs = {}
        if any(str(getattr(t, "value", t)) in ("wandb", "all") for t in self.accelerator.log_with):
            init_kwargs["wandb"] = {"id": self._wandb_id(), "resume": "allow"}
        self.accelerator.init_trackers(config.name, config=settings, init_kwargs=init_kwargs)

    def _wandb_id(self) -> str:
        """The W&B run id of this run folder, made once and kept in trackers/wandb-run-id."""
        import secrets

        path = self.run_dir / "trackers" / WANDB_ID_NAME
        if path.is_file():
            return path.read_text().strip()
        run_id = secrets.token_hex(8)
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(run_id + "\n")
        return run_id

    def finish_trackers(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, which the caller may still use.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    def add_epoch(self, record: dict[str, Any], curve: dict[str, Any]) -> None:
        """Appends the epoch, rewrites both files, and logs it to the trackers."""
        self.history.append(record)
        self.curves.append({"epoch": record["epoch"], "last_step": record["step"], **curve})
        self.write()
        self._log_to_trackers(record, curve)

    def add_evaluation(self, record: dict[str, Any]) -> None:
        """Appends an evaluation inside an epoch (--eval-every), rewrites metrics.jsonl, logs it to the trackers."""
        self.history.append(record)
        self.write()
        if self.accelerator.log_with:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("step", "epoch")}
            self.accelerator.log({f"eval/{k}": v for k, v in scalars.items()}, step=record["step"])

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

    def note(self, text: str) -> None:
        """Appends a timestamped line to run.log (main process; a failed write is not worth a failure:
        the same line went to the console)."""
        if not self.accelerator.is_main_process:
            return
        import time

        try:
            with open(self.run_dir / NOTES_NAME, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        except OSError:
            pass

    def write(self) -> None:
        """Both files as the history so far, each replaced whole (every process takes part)."""
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


def _read_text(path: Path) -> str | None:
    """The text of a regular file of settings at `path`; None when there is none to read (missing,
    a link, a FIFO, too large, not UTF-8)."""
    try:
        return ckpt.read_bytes(path, SETTINGS_LIMIT).decode("utf-8")
    except (ckpt.CheckpointError, UnicodeDecodeError):
        return None
