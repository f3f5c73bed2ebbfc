"""`python -m trainer.plot RUN_DIR`: a run's loss and learning rate per step and accuracy per epoch, as a PNG.

Reads only the run folder's metrics.jsonl and curves.jsonl (no torch import). matplotlib is an
optional extra: `pip install -e '.[plot]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from trainer.errors import Parser, fail

METRICS_NAME = "metrics.jsonl"  # as trainer.engine writes them; repeated here to keep torch out
CURVES_NAME = "curves.jsonl"
EMA_ACC = "valid_acc_ema"  # in each epoch's record of an --ema run
INSTALL_HINT = "plotting needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)"


class RunError(Exception):
    """A run folder without readable logs: reported in one line."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; a missing file or a broken line is a RunError."""
    if not path.is_file():
        raise RunError(f"{path} not found: pass a run folder (<output-dir>/<run-name>) with a finished epoch")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise RunError(f"{path} line {number} is not JSON") from None
    if not rows:
        raise RunError(f"{path} is empty: no epoch has finished yet")
    return rows


def best_index(run_dir: Path, metrics: list[dict[str, Any]], accuracy: list[float]) -> int:
    """The record of the epoch `best` points at (the trainer chose it: by --monitor, on the EMA's
    numbers with --ema); without the link, the highest accuracy, the first of equals."""
    found = re.fullmatch(r"step_(\d+)", os.readlink(run_dir / "best")) if (run_dir / "best").is_symlink() else None
    steps = [r["step"] for r in metrics]
    if found and int(found.group(1)) in steps:
        return steps.index(int(found.group(1)))
    return max(range(len(accuracy)), key=accuracy.__getitem__)


def step_series(curves: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Global step numbers and one per-step series ("loss" or "lr") from curves.jsonl's records.

    Each record ends at its epoch's `last_step`; counting back from there also places the series
    of an epoch that was resumed on another number of processes.
    """
    steps, values = [], []
    for record in curves:
        n = len(record[key])
        steps += range(record["last_step"] - n + 1, record["last_step"] + 1)
        values += record[key]
    return steps, values


def smooth(values: list[float], window: float) -> list[float]:
    """Exponential moving average over about `window` values, bias-corrected at the start (as TensorBoard's)."""
    weight = 1.0 - 1.0 / max(window, 1.0)
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1.0 - weight) * v
        out.append(average / (1.0 - weight**i))
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def plot_run(run_dir: Path, out: Path) -> Path:
    """Draws the run's three panels into `out` (PNG) and returns it."""
    evaluations = read_jsonl(run_dir / METRICS_NAME)
    metrics = [r for r in evaluations if not r.get("inside_epoch")]  # the epochs' records (--eval-every adds others)
    if not metrics:
        raise RunError(f"{run_dir / METRICS_NAME} holds no finished epoch yet")
    curves = read_jsonl(run_dir / CURVES_NAME)
    try:
        steps, losses = step_series(curves, "loss")
        lr_steps, lrs = step_series(curves, "lr")
        epochs = [r["epoch"] for r in metrics]
        train_acc, valid_acc = [r["train_acc"] for r in metrics], [r["valid_acc"] for r in metrics]
        valid_steps, valid_loss = [r["step"] for r in evaluations], [r["valid_loss"] for r in evaluations]
        # An --ema run logs its average's evaluation too, and its `best` follows the average's
        # accuracy (as Trainer._best_key chooses): the legend names that epoch.
        ema = all(EMA_ACC in r for r in metrics)
        valid_acc_ema = [r[EMA_ACC] for r in metrics] if ema else []
        valid_loss_ema = [r["valid_loss_ema"] for r in evaluations] if ema else []
    except (KeyError, TypeError) as exc:
        raise RunError(f"{run_dir}: logs lack the field {exc} (written by another version?)") from None
    try:
        import matplotlib
    except ImportError:
        raise RunError(INSTALL_HINT) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_acc) = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained")
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
    ax_loss.plot(steps, smooth(losses, len(losses) / 20), color="tab:blue", linewidth=1.8, label="smoothed")
    ax_loss.plot(valid_steps, valid_loss, color="tab:red", marker="o", label="validation (each evaluation)")
    if ema:
        ax_loss.plot(valid_steps, valid_loss_ema, color="tab:purple", marker="s", linestyle="--",
                     label="validation, EMA weights")  # fmt: skip
    if losses and min(losses + valid_loss + valid_loss_ema) > 0:
        ax_loss.set_yscale("log")
    if len(curves) <= 50:  # epoch boundaries, while they stay readable
        for record in curves[:-1]:
            ax_loss.axvline(record["last_step"], color="grey", linewidth=0.5, linestyle=":")
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    # Below the panel, where no point can hide under it (loc="best" searches the data: slow on long runs).
    ax_loss.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize="small", frameon=False)
    ax_lr.plot(lr_steps, lrs, color="tab:orange")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="LR")
    ax_acc.plot(epochs, train_acc, marker="o", label="train (running, during the epoch)")
    chosen = valid_acc_ema if ema else valid_acc
    best = best_index(run_dir, metrics, chosen)
    named = f"best {chosen[best]:.4f}, epoch {epochs[best]}"
    ax_acc.plot(epochs, valid_acc, marker="o", label="valid, trained weights" if ema else f"valid ({named})")
    if ema:
        ax_acc.plot(epochs, valid_acc_ema, marker="s", linestyle="--", label=f"valid, EMA weights ({named})")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy")
    if len(epochs) <= 20:
        ax_acc.set_xticks(epochs)  # whole epochs only, even for a run of one
    else:
        ax_acc.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(loc="best")  # a few points: cheap to search, and no point is hidden behind it
    n_steps = steps[-1] if steps else 0
    fig.suptitle(f"{run_dir.resolve().name}: {_count(len(epochs), 'epoch')}, {_count(n_steps, 'step')}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise RunError(f"cannot write {out}: {exc}") from None
    finally:
        plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m trainer.plot",
        description="Plot a run's training loss and LR per step and its accuracy per epoch into a PNG.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. checkpoints/mnist")
    parser.add_argument("--out", metavar="PATH", default=None, help="the PNG to write (default: RUN_DIR/curves.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Writes the plot; returns 2 (after one line on stderr) when the run or matplotlib is missing."""
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "curves.png"
    try:
        written = plot_run(run_dir, out)
    except RunError as exc:
        return fail(str(exc))
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
