"""What a person sees: a start summary, a progress bar per epoch, a table row per epoch.

Only the main process reports. On a terminal the bars are rich progress bars; otherwise (a
log file, CI, a pipe) plain lines: the epoch's progress every 10% of its steps (or 30 s), then
its row; nothing redraws. A closed stdout (`trainer ... | head`, a `tee` killed by the same
Ctrl-C, `trainer ... >&-`) never stops the run: the lines that matter go to stderr instead.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

PLAIN_EVERY_S = 30.0  # without a terminal, a progress line at least this often (and every 10% of an epoch)


def _next_tenth(fraction: float) -> float:
    return (int(fraction * 10 + 1e-9) + 1) / 10


def _write(stream: Any, text: str) -> bool:
    """Writes a line; False when the reader of the pipe has gone, or the stream was never open."""
    if stream is None:  # Python's sys.stdout or sys.stderr when it started with that fd closed (`>&-`)
        return False
    try:
        stream.write(text + "\n")
        stream.flush()
        return True
    except (OSError, ValueError):  # a reader gone (EPIPE), a hung-up terminal (EIO), a closed stream
        return False


def _hold(fd: int) -> None:
    """Puts /dev/null on a standard fd the process started without (`>&-`): else the next file
    opened (seen: the run folder's lock) takes its number and gets whatever a library or a child
    process writes to stdout or stderr."""
    try:
        os.fstat(fd)
    except OSError:
        null = os.open(os.devnull, os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)


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
# The widest value each column takes in practice ("6.49e-05", "188,000"): rows stay aligned.
WIDEST = {"epoch": 5, "step": 7, "lr": 8, "epoch_time_s": 7, "warmup_s": 7, "train_samples_per_s": 9}
# On a narrow terminal, columns go in this order until the table fits.
DROP_ORDER = ("warmup_s", "train_samples_per_s", "epoch_time_s", "step", "train_loss", "lr", "valid_loss")


def _cells(record: dict[str, Any], columns: tuple[tuple[str, str | None, str | None], ...]) -> list[str]:
    cells = []
    for _, key, fmt in columns:
        if key is None:
            cells.append(f"{record['valid_correct']}/{record['valid_seen']}")
        else:
            value = record.get(key)
            cells.append("-" if value is None else fmt.format(value))
    return cells


def table_console() -> tuple[Console, dict[str, Any]]:
    """A console for a command's tables, and the Table options that suit it: rich's boxes on a
    terminal; plain columns on whole lines in a log file or a pipe (read by people and scripts)."""
    console = Console(highlight=False)
    if console.is_terminal:
        return console, {}
    return Console(highlight=False, width=10_000), {"box": None, "show_edge": False}


class Reporter:
    """Console output of one process; silent unless `enabled` (the main process)."""

    def __init__(self, enabled: bool, mode: str = "auto") -> None:
        self.enabled = enabled
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            if stream is None:  # Python found the fd closed at start-up
                _hold(fd)
        self.console = Console(highlight=False, stderr=False)
        self.bars = enabled and (mode == "bar" or (mode == "auto" and self.console.is_terminal))
        self._widths: list[int] | None = None
        self._progress: Progress | None = None
        self._task = None
        self._stdout_closed = sys.stdout is None  # started with stdout closed (`>&-`): as if its reader had gone
        self._plain_next = (0.0, 0.0)  # the next plain progress line: at this fraction, or at this time

    def line(self, text: str, style: str | None = None) -> None:
        if not self.enabled:
            return
        if self._stdout_closed:
            _write(sys.stderr, text)
        elif self.bars:
            try:
                self.console.print(text, style=style, soft_wrap=True)
            except OSError:
                self._close_stdout(text)
        elif not _write(sys.stdout, text):
            self._close_stdout(text)

    def _close_stdout(self, text: str | None = None) -> None:
        """stdout's reader is gone (a closed pipe, a hung-up terminal): later writes (and Python's
        flush at exit) go nowhere, quietly; `text` goes to stderr instead."""
        self._stdout_closed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        if text is not None:
            _write(sys.stderr, text)

    def _draw(self, action: Any) -> None:
        """Starts or stops a bar or a spinner; a terminal that is gone only ends the drawing."""
        try:
            action()
        except OSError:
            self._close_stdout()

    def warn(self, text: str) -> None:
        self.say(f"warning: {text}")

    def say(self, text: str) -> None:
        """A line on stderr (where errors go), from the main process."""
        if self.enabled:
            _write(sys.stderr, text)

    def summary(self, items: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bars:
            table = Table(show_header=False, box=None, pad_edge=False)
            for key, value in items.items():
                table.add_row(f"[bold]{key}[/]", str(value))
            try:
                self.console.print(table)
            except OSError:
                self._close_stdout(" | ".join(f"{k}: {v}" for k, v in items.items()))
        else:
            self.line(" | ".join(f"{k}: {v}" for k, v in items.items()))

    # -- per-epoch progress -------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        self._t0, self._done0 = time.perf_counter(), done_steps
        self._epoch_text, self._total = f"epoch {epoch}/{epochs}", total_steps
        self._plain_next = (_next_tenth(done_steps / max(total_steps, 1)), self._t0 + PLAIN_EVERY_S)
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
        self._draw(self._progress.start)

    def advance(self, done_steps: int, samples_per_step: int, lr: float, loss: float | None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self._t0
        rate = (done_steps - self._done0) * samples_per_step / elapsed if elapsed > 0 else 0.0
        loss_text = "loss   -   " if loss is None else f"loss {loss:.4f}"
        stats = f"{loss_text}  lr {lr:.3g}  {rate:,.0f} samples/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=done_steps, stats=stats)
            return
        fraction = done_steps / max(self._total, 1)
        if done_steps < self._total and (fraction >= self._plain_next[0] or now >= self._plain_next[1]):
            self.line(f"{self._epoch_text}: {fraction:4.0%} ({done_steps}/{self._total} steps)  {stats}")
            self._plain_next = (_next_tenth(fraction), now + PLAIN_EVERY_S)

    def evaluating(self, images: int) -> None:
        """Said once before an evaluation; on a terminal a transient spinner stands for it."""
        if not self.enabled:
            return
        if self.bars:
            self._status = self.console.status(f"{self._epoch_text}: evaluating {images:,} images", spinner="dots")
            self._draw(self._status.start)
        else:
            self.line(f"{self._epoch_text}: evaluating {images:,} images")

    def close(self) -> None:
        """Leaves the terminal as it was (cursor shown, bar finished) on every way out of a run."""
        self.end_epoch()
        self.evaluated()

    def evaluated(self) -> None:
        status = getattr(self, "_status", None)
        if status is not None:
            self._status = None
            self._draw(status.stop)

    def end_epoch(self) -> None:
        if self._progress is not None:
            progress, self._progress = self._progress, None
            self._draw(progress.stop)

    def epoch_row(self, record: dict[str, Any]) -> None:
        """One row of the epoch table (the header once, before the first row)."""
        if not self.enabled:
            return
        if self._widths is None:  # the columns follow the first row (and the terminal's width)
            columns = [c for c in COLUMNS if c[1] != "warmup_s" or record.get("warmup_s", 0.0) >= 1.0]
            cells = _cells(record, tuple(columns))
            widths = {c[0]: max(len(c[0]), len(v), WIDEST.get(c[1] or "", 0)) for c, v in zip(columns, cells)}
            limit = self.console.width if self.bars else None  # a log file or a pipe keeps every column
            for key in DROP_ORDER:
                if limit is None or sum(widths[c[0]] + 2 for c in columns) - 2 <= limit:
                    break
                columns = [c for c in columns if c[1] != key]
            self._columns = tuple(columns)
            self._widths = [widths[c[0]] for c in columns]
            self.line("  ".join(h.rjust(w) for (h, _, _), w in zip(self._columns, self._widths)), style="bold")
        cells = _cells(record, self._columns)
        self.line("  ".join(c.rjust(w) for c, w in zip(cells, self._widths)))
