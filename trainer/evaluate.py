"""`python -m trainer.evaluate CHECKPOINT`: accuracy, loss, per-class metrics and the confusion matrix.

What the numbers depend on (architecture, data set, input normalisation, class names) is read
from the checkpoint's model.safetensors metadata, so a checkpoint is evaluated the way it was
trained. Under `torchrun` or `accelerate launch` the test split is sharded over the processes and
every image is still counted exactly once: per-sample results go through gather_for_metrics,
exactly as during training (`evaluate_model` is the one evaluation loop of the package).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer import checkpoint as ckpt
from trainer.config import CUSTOM_DATA, PRECISIONS, ConfigError, TrainConfig
from trainer.data import DATASET_INFO, NORMALIZATION, input_shape_of, load_split, make_loader
from trainer.errors import first_line
from trainer.model import MODELS, build_model


@dataclass
class EvalResult:
    correct: int
    seen: int
    loss: float  # mean cross-entropy per image
    confusion: Tensor  # [classes, classes] int64, rows = true class, columns = prediction
    first_batch_s: float = 0.0  # host time of the first batch (where torch.compile compiles)

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else 0.0


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, with what its metadata says about its inputs and outputs."""

    model: nn.Module
    path: Path  # the model.safetensors file
    architecture: str
    dataset: str
    class_names: tuple[str, ...]
    normalization: dict[str, float] | None  # None: the inputs are not pixels
    input_shape: tuple[int, ...]  # [channels, height, width]
    step: int | None
    epoch: int | None


def model_file(checkpoint: str | os.PathLike) -> Path:
    """The model.safetensors of a checkpoint folder, a `best` link or the file itself.

    A folder with a manifest is verified first (sizes and sha256 of every file), so a truncated
    or corrupted checkpoint is refused with the reason instead of failing somewhere later.
    """
    path = Path(checkpoint)
    if not path.exists():  # also a dangling `best` link
        raise ckpt.CheckpointError(f"{checkpoint}: no such checkpoint folder or file")
    folder = path.resolve() if path.is_dir() else path.resolve().parent
    if (path.is_dir() or path.name == ckpt.MODEL_NAME) and (folder / ckpt.MANIFEST_NAME).is_file():
        ckpt.verify(folder)
    if path.is_dir():
        if not (folder / ckpt.MODEL_NAME).is_file():
            raise ckpt.CheckpointError(
                f"{checkpoint} holds no {ckpt.MODEL_NAME}: pass a checkpoint folder (step_*), a run's `best` "
                f"link or a {ckpt.MODEL_NAME} file"
            )
        return folder / ckpt.MODEL_NAME
    return path


def load_model(checkpoint: str | os.PathLike, model_spec: str | None = None) -> LoadedModel:
    """Rebuilds the checkpoint's model (on the CPU, in eval mode) from its safetensors file and metadata.

    A built-in architecture is rebuilt by name. Any other model is rebuilt only from `model_spec`
    (`--model package.module:factory`), which the user typed: code is never imported because a
    checkpoint names it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = model_file(checkpoint)
    try:
        with safe_open(path, framework="pt") as st:
            meta = st.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    architecture, dataset = meta.get("architecture"), meta.get("dataset")
    if model_spec is None and architecture not in MODELS:
        if not architecture or ":" not in architecture:
            raise ckpt.CheckpointError(f"{path}: unknown architecture {architecture!r} (known: {', '.join(MODELS)})")
        raise ConfigError(
            f"{path} holds a {architecture} model, which is not built in: pass --model package.module:factory "
            "to rebuild it (code is never imported because a checkpoint names it)"
        )
    if dataset not in DATASET_INFO and not str(dataset).startswith("imagefolder:") and dataset != CUSTOM_DATA:
        raise ckpt.CheckpointError(f"{path}: unknown data set {dataset!r} (known: {', '.join(DATASET_INFO)})")
    try:
        names = tuple(str(n) for n in json.loads(meta["class_names"])) if "class_names" in meta else None
        class_names = names or DATASET_INFO[dataset][1]
        saved = json.loads(meta.get("normalization", "{}"))
        normalization = {**NORMALIZATION, **{k: float(v) for k, v in saved.items()}} if saved else None
        if dataset in DATASET_INFO:
            normalization = normalization or NORMALIZATION  # checkpoints before the normalisation was recorded
        input_shape = tuple(int(d) for d in json.loads(meta.get("input_shape", "[1, 28, 28]")))
        num_classes = int(meta.get("num_classes", len(class_names)))
        step = int(meta["step"]) if meta.get("step") else None
        epoch = int(meta["epoch"]) if meta.get("epoch") else None
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ckpt.CheckpointError(f"{path}: unreadable metadata ({first_line(exc)})") from None
    if len(class_names) != num_classes:
        raise ckpt.CheckpointError(f"{path}: {len(class_names)} class names for {num_classes} classes")
    if normalization is not None and (normalization["divide_by"] <= 0 or normalization["std"] <= 0):
        raise ckpt.CheckpointError(f"{path}: invalid normalization {normalization}")
    image = tuple(input_shape[1:]) if len(input_shape) == 3 else (28, 28)
    model = build_model(model_spec or architecture, num_classes, in_channels=input_shape[0], image_size=image)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(
            f"{path} does not fit a {model_spec or architecture} with {num_classes} classes: {first_line(exc)}"
        ) from None
    model.eval()
    return LoadedModel(model, path, architecture, dataset, class_names, normalization, input_shape, step, epoch)


def recorded_config(loaded: LoadedModel) -> dict[str, Any]:
    """The settings of the run that wrote the checkpoint (state.json beside model.safetensors), if any."""
    try:
        config = json.loads((loaded.path.parent / ckpt.STATE_NAME).read_text())["config"]
        return config if isinstance(config, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def load_test_split(loaded: LoadedModel, data_dir: str | None) -> Any:
    """The test split the checkpoint's model was evaluated on in training."""
    from trainer.data import image_folder_path, load_image_folder, parse_image_size

    recorded = recorded_config(loaded)
    data_dir = data_dir or recorded.get("data_dir") or "./data"
    folder = image_folder_path(loaded.dataset)
    if loaded.dataset == CUSTOM_DATA:
        raise ConfigError(
            f"{loaded.path} was trained on data given in Python: evaluate it there (trainer.evaluate.evaluate_model)"
        )
    if folder is not None:
        # The size as training asked for it (the cache is keyed by it), else the model's input size.
        size = parse_image_size(recorded["image_size"]) if "image_size" in recorded else tuple(loaded.input_shape[1:])
        _, test, names = load_image_folder(folder, data_dir, size, say=lambda _: None)
        if names != loaded.class_names:
            raise ConfigError(f"{folder} now holds the classes {', '.join(names)}, not the checkpoint's")
        return test
    return load_split(loaded.dataset, data_dir, train=False)


def model_input(
    pixels: Tensor, normalization: dict[str, float] | None = NORMALIZATION, channels_last: bool = False
) -> Tensor:
    """Pixel values [B, H, W] or [B, C, H, W] (uint8, or floats on the 0-255 scale) -> the float
    [B, C, H, W] the model was trained on (`normalization` None: inputs that are not pixels, as they are).

    With the default normalisation these are the operations of `trainer.data.to_model_input`, so a
    uint8 image gives bit-identical inputs here, in training and in `trainer.predict`.
    """
    if normalization is None:  # inputs that are not pixels go to the model as they are
        return pixels.contiguous(memory_format=torch.channels_last) if channels_last and pixels.dim() == 4 else pixels
    x = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels
    x = x.to(torch.float32).div(normalization["divide_by"])  # never in place: may alias `pixels`
    mean, std = normalization.get("mean", 0.0), normalization.get("std", 1.0)
    if mean != 0.0 or std != 1.0:
        x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate_model(
    accelerator: Any,
    model: nn.Module,
    loader: Any,
    num_classes: int,
    channels_last: bool = False,
    normalization: dict[str, float] | None = NORMALIZATION,
) -> EvalResult:
    """Exact counts over everything `loader` yields: every image once, whatever the number of processes.

    accelerate pads the last batches with repeated images so every process gets one; it drops
    those repeats only from per-sample tensors, so we gather per-sample results, never counts.
    `model` and `loader` must have gone through `accelerator.prepare`.
    """
    acc = accelerator
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=acc.device)
    losses_seen = []  # per-image float32 losses stay on the device (no float64 there: MPS has none)
    started, first_batch_s = time.perf_counter(), 0.0
    for images, labels in loader:
        logits = model(model_input(images, normalization, channels_last)).float()
        if not losses_seen:
            first_batch_s = time.perf_counter() - started
        losses = F.cross_entropy(logits, labels, reduction="none")
        predicted = logits.argmax(dim=1)
        losses, predicted, labels = acc.gather_for_metrics((losses, predicted, labels))
        losses_seen.append(losses)
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    confusion = confusion.view(num_classes, num_classes).cpu()
    seen = int(confusion.sum())
    # One transfer at the end; the sum is exact in double precision on the host.
    loss_sum = math.fsum(torch.cat(losses_seen).tolist()) if losses_seen else 0.0
    correct = int(confusion.diagonal().sum())
    return EvalResult(correct, seen, loss_sum / max(seen, 1), confusion, first_batch_s)


def class_metrics(confusion: Tensor) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows = true class).

    A ratio with nothing to divide by is 0 (as scikit-learn's zero_division=0), and macro averages
    run over all classes, so a class the model never predicts pulls macro-F1 down.
    """
    c = confusion.to(torch.float64)
    hits, predicted, support = c.diagonal(), c.sum(dim=0), c.sum(dim=1)

    def ratio(num: Tensor, den: Tensor) -> Tensor:  # counts: a positive denominator is at least 1
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    precision, recall = ratio(hits, predicted), ratio(hits, support)
    f1 = ratio(2 * hits, predicted + support)  # = 2PR / (P + R), without dividing by a zero P + R
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": [int(s) for s in support.tolist()],
        "macro_precision": precision.mean().item(),
        "macro_recall": recall.mean().item(),
        "macro_f1": f1.mean().item(),
    }


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


def print_report(summary: dict[str, Any], console: Any = None) -> None:
    """The summary line, the per-class table and the confusion matrix, as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=10_000)
    # Boxes on a terminal; plain columns in a log file or a pipe, as the trainer prints.
    box = {} if console.is_terminal else {"box": None, "show_edge": False}
    names = summary["class_names"]
    # MNIST's names are its digits; other data sets' names are worth a column.
    named = names != [str(k) for k in range(len(names))]
    where = f"step {summary['step']}, epoch {summary['epoch']}" if summary["step"] is not None else "no step recorded"
    console.print(f"checkpoint {summary['checkpoint']} ({summary['architecture']}, {where})", soft_wrap=True)
    console.print(
        f"{summary['dataset']} test split: accuracy [bold]{summary['accuracy']:.4f}[/] "
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
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Evaluate a checkpoint on its data set's test split: accuracy, loss, per-class precision, "
        "recall and F1, and the confusion matrix.",
        epilog="Several processes: torchrun --nproc_per_node N -m trainer.evaluate CHECKPOINT --cpu (or accelerate "
        "launch -m trainer.evaluate ...); the numbers are the same for any N.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (step_*), a run's `best` link or a model.safetensors")
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help="folder holding (or receiving) the data sets and image caches (default: the training run's, else ./data)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1024, help="evaluation batch size per process")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    parser.add_argument("--mixed-precision", choices=PRECISIONS, default=None, help="default: accelerate's config")
    parser.add_argument(
        "--model", default=None, metavar="MODULE:FN",
        help="rebuild a model that is not built in with this factory (as in training); never taken from the checkpoint",
    )  # fmt: skip
    from trainer.errors import add_json_flag

    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluates a checkpoint; returns the exit code (2 for a user error, reported in one line)."""
    from trainer.errors import fail

    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        return _run(args)
    except (ConfigError, ckpt.CheckpointError) as exc:
        return fail(str(exc))


def _run(args: argparse.Namespace) -> int:
    from trainer.errors import write_json
    from trainer.runtime import make_accelerator

    acc = make_accelerator(TrainConfig(cpu=args.cpu, mixed_precision=args.mixed_precision))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes == 1:  # each process would evaluate everything and print it
        raise ConfigError(
            f"{launched} processes were launched but accelerate sees no distributed setup; "
            "on a CPU-only machine pass --cpu (gloo)"
        )
    loaded = load_model(args.checkpoint, args.model)
    with acc.main_process_first():  # one process downloads or decodes; the others then read the files
        split = load_test_split(loaded, args.data_dir)
    if input_shape_of(split) != loaded.input_shape:
        raise ConfigError(
            f"{loaded.dataset} images are {input_shape_of(split)}, the checkpoint expects {loaded.input_shape}"
        )
    # channels_last as in training (the default there): the same numbers, the faster layout on GPUs.
    channels_last = True
    model = loaded.model.to(memory_format=torch.channels_last)
    # Evaluation only: device placement and autocast, no DistributedDataParallel wrapper.
    model = acc.prepare_model(model, evaluation_mode=True)
    loader = acc.prepare(make_loader(split, args.batch_size, train=False, seed=0, device=acc.device))
    result = evaluate_model(acc, model, loader, len(loaded.class_names), channels_last, loaded.normalization)
    summary = report(result, loaded, num_processes=acc.num_processes, mixed_precision=acc.mixed_precision)
    if acc.is_main_process:
        if args.json != "-":
            print_report(summary)
        if args.json is not None:
            return write_json(summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
