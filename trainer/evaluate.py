"""`python -m trainer.evaluate CHECKPOINT`: accuracy, loss, per-class metrics and the confusion matrix.

What the numbers depend on (architecture, data set, input normalisation, class names) is read
from the checkpoint's model.safetensors metadata, so a checkpoint is evaluated the way it was
trained. Under `torchrun` or `accelerate launch` the test split is sharded over the processes and
every image is still counted exactly once, by the same loop as in training
(`trainer.evaluation.evaluate_model`).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from rich.table import Table

from trainer import checkpoint as ckpt
from trainer.config import PRECISIONS, ConfigError, TrainConfig
from trainer.console import table_console
from trainer.data import input_shape_of, make_loader
from trainer.errors import HelpFormatter, Parser, add_json_flag, fail, write_json
from trainer.evaluation import (
    EvalResult,
    LoadedModel,
    class_metrics,
    evaluate_model,
    load_model,
    load_test_split,
    recorded,
)


def report(result: EvalResult, loaded: LoadedModel, **extra: Any) -> dict[str, Any]:
    """The evaluation as a JSON-ready dict (what `--json` writes)."""
    m = class_metrics(result.confusion)
    per_class = [
        {"class": k, "name": name, "precision": m["precision"][k], "recall": m["recall"][k], "f1": m["f1"][k],
         "support": m["support"][k]}
        for k, name in enumerate(loaded.class_names)
    ]  # fmt: skip
    return {
        "checkpoint": str(loaded.path),
        "architecture": loaded.architecture,
        "dataset": loaded.dataset,
        "step": loaded.step,
        "epoch": loaded.epoch,
        "weights": loaded.weights,
        "accuracy": result.accuracy,
        "correct": result.correct,
        "seen": result.seen,
        "loss": result.loss,
        "macro_precision": m["macro_precision"],
        "macro_recall": m["macro_recall"],
        "macro_f1": m["macro_f1"],
        "per_class": per_class,
        "class_names": list(loaded.class_names),
        "confusion_matrix": result.confusion.tolist(),
        **extra,
    }


def print_report(summary: dict[str, Any]) -> None:
    """The summary line, the per-class table and the confusion matrix, as rich tables."""
    console, box = table_console()
    names = summary["class_names"]
    # MNIST's names are its digits; other data sets' names are worth a column.
    named = names != [str(k) for k in range(len(names))]
    where = f"step {summary['step']}, epoch {summary['epoch']}"
    where += ", its EMA weights" if summary["weights"] == "EMA" else ""
    console.print(f"checkpoint {summary['checkpoint']} ({summary['architecture']}, {where})", soft_wrap=True)
    if summary.get("lineage"):
        parent = summary["lineage"]
        console.print(f"started from {parent['parent']} (step {parent['step']}, weights sha256 "
                      f"{parent['sha256'][:12]}...)", soft_wrap=True)  # fmt: skip
    split = "validation" if summary.get("split") == "valid" else "test"
    console.print(
        f"{summary['dataset']} {split} split: accuracy [bold]{summary['accuracy']:.4f}[/] "
        f"({summary['correct']}/{summary['seen']})  loss {summary['loss']:.4f}  macro-F1 {summary['macro_f1']:.4f}"
    )
    per_class = Table(title="per class", title_justify="left", **box)
    per_class.add_column("class", justify="right")
    if named:
        per_class.add_column("name")
    for header in ("precision", "recall", "F1", "support"):
        per_class.add_column(header, justify="right")
    for row in summary["per_class"]:
        cells = [str(row["class"])] + ([row["name"]] if named else [])
        cells += [f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"])]
        per_class.add_row(*cells)
    per_class.add_section()
    totals = ["macro"] + ([""] if named else [])
    totals += [f"{summary[f'macro_{k}']:.4f}" for k in ("precision", "recall", "f1")] + [str(summary["seen"])]
    per_class.add_row(*totals, style="bold")
    console.print(per_class)
    matrix = Table(title="confusion matrix (rows: true class, columns: predicted)", title_justify="left", **box)
    matrix.add_column("true \\ pred", justify="right")
    for k in range(len(names)):
        matrix.add_column(str(k), justify="right")
    for k, row in enumerate(summary["confusion_matrix"]):
        label = f"{k} {names[k]}" if named else str(k)
        cells = (f"[bold]{v}[/]" if j == k else (str(v) if v else "[dim]0[/]") for j, v in enumerate(row))
        matrix.add_row(label, *cells)
    console.print(matrix)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m trainer.evaluate",
        description="Evaluate a checkpoint on its data set's test split: accuracy, loss, per-class precision, "
        "recall and F1, and the confusion matrix.",
        epilog="Several processes: torchrun --nproc_per_node N -m trainer.evaluate CHECKPOINT --cpu (or accelerate "
        "launch -m trainer.evaluate ...); the numbers are the same for any N.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "checkpoint", help="a checkpoint folder (step_*), a `best` link, a model.safetensors, a run folder (its best)"
    )
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help="folder holding (or receiving) the data sets and image caches (default: the training run's, else ./data)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1024, metavar="N", help="evaluation batch size per process")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    parser.add_argument("--mixed-precision", choices=PRECISIONS, type=str.lower, default=None,
                        help="no, fp16 or bf16 (default: accelerate's config)")  # fmt: skip
    parser.add_argument(
        "--dataset", default=None, metavar="imagefolder:PATH",
        help="where the image folder the model was trained on is now (default: where it was)",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None, metavar="MODULE:FN",
        help="rebuild a model that is not built in with this factory (as in training); never taken from the checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--split", choices=("test", "valid"), default="test",
        help="test: the data set's test split; valid: the validation split training chose `best` on (the images "
        "held out of the training split, or the test split when it was trained with --val-split 0)",
    )  # fmt: skip
    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluates a checkpoint; returns the exit code (2 for a user error, reported in one line)."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        return _run(args)
    except (ConfigError, ckpt.CheckpointError) as exc:
        return fail(str(exc))


def _run(args: argparse.Namespace) -> int:
    from trainer.runtime import check_distributed, device_defaults, make_accelerator

    acc = make_accelerator(TrainConfig(cpu=args.cpu, mixed_precision=args.mixed_precision))
    check_distributed(acc, "evaluate everything and print it")
    loaded = load_model(args.checkpoint, args.model)
    with acc.main_process_first():  # one process downloads or decodes; the others then read the files
        split = load_test_split(loaded, args.data_dir, args.dataset, args.split)
    if input_shape_of(split) != loaded.input_shape:
        raise ConfigError(
            f"{loaded.dataset} images are {input_shape_of(split)}, the checkpoint expects {loaded.input_shape}"
        )
    # The device's memory format, as training chooses it by default.
    channels_last = device_defaults(acc.device)["channels_last"]
    model = loaded.model.to(memory_format=torch.channels_last) if channels_last else loaded.model
    # Evaluation only: device placement and autocast, no DistributedDataParallel wrapper.
    model = acc.prepare_model(model, evaluation_mode=True)
    loader = acc.prepare(make_loader(split, args.batch_size, train=False, seed=0, device=acc.device))
    result = evaluate_model(acc, model, loader, len(loaded.class_names), channels_last, loaded.normalization)
    summary = report(result, loaded, split=args.split, num_processes=acc.num_processes,
                     mixed_precision=acc.mixed_precision, lineage=recorded(loaded, "lineage"))  # fmt: skip
    if acc.is_main_process:
        if args.json != "-":
            print_report(summary)
        if args.json is not None:
            return write_json(summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
