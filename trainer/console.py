"""What a person sees: a start summary, a progress bar per epoch, a table row per epoch.

Only the main process reports. On a terminal the bars are rich progress bars; otherwise (a
log file, CI, a pipe) each epoch prints one plain line and nothing redraws.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

COLUMNS = (  # (header, key in the metrics record, format)
    ("epoch", "epoch", "{:d}"),
    ("step", "step", "{:d}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("train acc", "train_acc", "{:.4f}"),
    ("valid loss", "valid_loss", "{:.4f}"),
    ("valid acc", "valid_acc", "{:.4f}"),
    ("correct/seen", None, None),
    ("lr", "lr", "{:.3g}"),
    ("time s", "epoch_time_s", "{:.1f}"),
    ("warmup s", "warmup_s", "{:.1f}"),  # shown only when some epoch had a warm-up of a second or more
    ("samples/s", "train_samples_per_s", "{:,.0f}"),
)


def _cells(record: dict[str, Any], columns: tuple[tuple[str, str | None, str | None], ...]) -> list[str]:
    cells = []
    for _, key, fmt in columns:
        if key is None:
            cells.append(f"{record['valid_correct']}/{record['valid_seen']}")
        else:
            cells.append(fmt.format(record.get(key, 0.0)))
    return cells


class Reporter:
    """Console output of one process; silent unless `enabled` (the main process)."""

    def __init__(self, enabled: bool, mode: str = "auto") -> None:
        self.enabled = enabled
        self.console = Console(highlight=False, stderr=False)
        self.bars = enabled and (mode == "bar" or (mode == "auto" and self.console.is_terminal))
        self._widths: list[int] | None = None
        self._progress: Progress | None = None
        self._task = None

    def line(self, text: str, style: str | None = None) -> None:
        if self.enabled:
            self.console.print(text, style=style, soft_wrap=True) if self.bars else print(text, flush=True)

    def warn(self, text: str) -> None:
        if self.enabled:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def summary(self, items: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bars:
            table = Table(show_header=False, box=None, pad_edge=False)
            for key, value in items.items():
                table.add_row(f"[bold]{key}[/]", str(value))
            self.console.print(table)
        else:
            print(" | ".join(f"{k}: {v}" for k, v in items.items()), flush=True)

    # -- per-epoch progress -------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        self._t0, self._done0 = time.perf_counter(), done_steps
        if not self.bars:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=done_steps, stats="")
        self._progress.start()

    def advance(self, done_steps: int, samples_per_step: int, lr: float, loss: float | None) -> None:
        if self._progress is None:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (done_steps - self._done0) * samples_per_step / elapsed if elapsed > 0 else 0.0
        loss_text = "loss   -   " if loss is None else f"loss {loss:.4f}"
        self._progress.update(
            self._task, completed=done_steps, stats=f"{loss_text}  lr {lr:.3g}  {rate:,.0f} samples/s"
        )

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def epoch_row(self, record: dict[str, Any]) -> None:
        """One row of the epoch table (the header once, before the first row)."""
        if not self.enabled:
            return
        if self._widths is None:  # the columns and their widths follow the first row, with room to grow
            self._columns = tuple(c for c in COLUMNS if c[1] != "warmup_s" or record.get("warmup_s", 0.0) >= 1.0)
            cells = _cells(record, self._columns)
            self._widths = [max(len(h), len(c) + 1) for (h, _, _), c in zip(self._columns, cells)]
            self.line("  ".join(h.rjust(w) for (h, _, _), w in zip(self._columns, self._widths)), style="bold")
        cells = _cells(record, self._columns)
        self.line("  ".join(c.rjust(w) for c, w in zip(cells, self._widths)))
