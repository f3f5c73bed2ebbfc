"""Exact evaluation, and models rebuilt from checkpoints: what training and the tools share.

`evaluate_model` is the one evaluation loop of the package: under several processes the
evaluation data is sharded and every sample is still counted exactly once (per-sample results go
through gather_for_metrics). `load_model` rebuilds a checkpoint's model from its safetensors file
and metadata (architecture, data set, normalisation, class names, input shape).
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer import checkpoint as ckpt
from trainer.config import CUSTOM_DATA, ConfigError
from trainer.data import DATASET_INFO, NORMALIZATION, held_out_count, hold_out, load_split, model_input
from trainer.errors import first_line
from trainer.model import MODELS, build_model, logits_of


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
    step: int
    epoch: int
    weights: str = "trained"  # or "EMA": the checkpoint's exponential moving average (--ema)
    state: dict[str, Any] | None = None  # its checkpoint's state.json, checked (None for bare weights)


@dataclass(frozen=True)
class ModelFiles:
    """What a checkpoint (or a bare weights file) offers to rebuild its model from."""

    model: Path  # model.safetensors, or the weights file the user named
    manifest: dict[str, Any] | None  # the verified manifest of its checkpoint folder (None: bare weights)
    state: dict[str, Any] | None  # its state.json, checked against the schema (None: bare weights)

    @property
    def ema(self) -> Path | None:
        """The EMA's weights, when the checkpoint's manifest lists them (and so verified them)."""
        listed = self.manifest is not None and ckpt.EMA_NAME in self.manifest["files"]
        return self.model.parent / ckpt.EMA_NAME if listed else None


def model_file(checkpoint: str | os.PathLike) -> ModelFiles:
    """The model.safetensors of a checkpoint folder, a run folder (its `best`), a `best` link, or
    a weights file itself.

    A folder with a manifest (in whatever form) is verified first: exactly the files a checkpoint
    holds, each a regular file of the listed size and sha256. Only listed files are read after
    that, and a weights file must be a regular file (a FIFO would block the read for ever)."""
    path = Path(checkpoint)
    if not path.exists():  # also a dangling `best` link
        raise ckpt.CheckpointError(f"{checkpoint}: no such checkpoint folder or file")
    if path.is_dir() and not os.path.lexists(path / ckpt.MODEL_NAME) and os.path.lexists(path / ckpt.BEST_LINK):
        path = path / ckpt.BEST_LINK  # a run folder: its best checkpoint
        if not path.exists():
            raise ckpt.CheckpointError(f"{path} points to a checkpoint that is gone")
    folder = path.resolve() if path.is_dir() else path.resolve().parent
    manifest = None
    if (path.is_dir() or path.name == ckpt.MODEL_NAME) and os.path.lexists(folder / ckpt.MANIFEST_NAME):
        manifest = ckpt.verify(folder)
    elif path.is_dir():
        if not os.path.lexists(folder / ckpt.MODEL_NAME):
            raise ckpt.CheckpointError(
                f"{checkpoint} holds no {ckpt.MODEL_NAME}: pass a checkpoint folder (step_*), a run's `best` "
                f"link or a {ckpt.MODEL_NAME} file"
            )
        os.close(ckpt.open_regular(folder / ckpt.MODEL_NAME))  # inside a folder: no link, no FIFO
    else:
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)  # a file the user named: a link to it is theirs
        except OSError as exc:
            raise ckpt.CheckpointError(f"{path}: {exc.strerror}") from None
        if not regular:
            raise ckpt.CheckpointError(f"{path} is not a regular file")
    state = ckpt.read_state(folder, manifest) if manifest is not None else None
    return ModelFiles(folder / ckpt.MODEL_NAME if path.is_dir() else path.resolve(), manifest, state)


# What evaluate and predict say of a checkpoint trained on data given in Python.
IN_PYTHON = "trainer.load_weights(checkpoint, model) puts its weights into your own module there"
# Values per input of a model rebuilt from a checkpoint's metadata, at most: a 3 x 2,364 x 2,364
# image. Larger shapes are not ones this trainer trains on, and would only allocate memory.
MAX_INPUT_VALUES = 2**24


def load_model(checkpoint: str | os.PathLike, model_spec: str | None = None) -> LoadedModel:
    """Rebuilds the checkpoint's model (on the CPU, in eval mode) from its safetensors file and metadata.

    A built-in architecture is rebuilt by name. Any other model is rebuilt only from `model_spec`
    (`--model package.module:factory`), which the user typed: code is never imported because a
    checkpoint names it. The metadata is checked against the weights before a model is built."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    files = model_file(checkpoint)
    path = files.model
    try:
        with safe_open(path, framework="pt") as st:
            meta = st.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    architecture, dataset = meta.get("architecture"), meta.get("dataset")
    if model_spec is None and architecture not in MODELS:
        if dataset == CUSTOM_DATA and architecture and ":" in architecture:
            raise ConfigError(f"{path} holds a {architecture} model trained on data given in Python: {IN_PYTHON}")
        if not architecture or ":" not in architecture:
            raise ckpt.CheckpointError(f"{path}: unknown architecture {architecture!r} (known: {', '.join(MODELS)})")
        built = f"--model {meta['factory']}" if meta.get("factory") else "--model package.module:factory"
        raise ConfigError(
            f"{path} holds a {architecture} model, which is not built in: pass {built} to rebuild it "
            "(code is never imported because a checkpoint names it)"
        )
    if dataset not in DATASET_INFO and not str(dataset).startswith(("imagefolder:", "hf:")) and dataset != CUSTOM_DATA:
        raise ckpt.CheckpointError(f"{path}: unknown data set {dataset!r} (known: {', '.join(DATASET_INFO)})")
    try:
        class_names = tuple(_strings(json.loads(meta["class_names"])))
        saved = json.loads(meta["normalization"])  # {}: the inputs are not pixels
        normalization = {**NORMALIZATION, **{k: float(v) for k, v in saved.items()}} if saved else None
        input_shape = tuple(_whole(d) for d in json.loads(meta["input_shape"]))
        num_classes, step, epoch = _whole(meta["num_classes"]), _whole(meta["step"], 0), _whole(meta["epoch"], 0)
    except KeyError as exc:
        raise ckpt.CheckpointError(f"{path}: its metadata lacks {exc} (not written by this trainer?)") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ckpt.CheckpointError(f"{path}: unreadable metadata ({first_line(exc)})") from None
    if len(class_names) != num_classes:
        raise ckpt.CheckpointError(f"{path}: {len(class_names)} class names for {num_classes} classes")
    if normalization is not None and not (
        all(math.isfinite(v) for v in normalization.values()) and normalization["divide_by"] > 0 < normalization["std"]
    ):
        raise ckpt.CheckpointError(f"{path}: invalid normalization {normalization}")
    weights = sum(t.numel() for t in state.values())
    if len(input_shape) != 3 or math.prod(input_shape) > MAX_INPUT_VALUES or num_classes > weights:
        raise ckpt.CheckpointError(
            f"{path}: its metadata describes inputs {list(input_shape)} and {num_classes} classes, which its "
            f"{weights} weights cannot be (inputs are [channels, height, width] of at most {MAX_INPUT_VALUES} values)"
        )
    spec = model_spec or architecture
    if spec in MODELS:  # the shapes the metadata implies, built without memory, against the file's
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_model(spec, num_classes, input_shape).state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in state.items()}:
            raise ckpt.CheckpointError(
                f"{path} does not fit a {spec} for inputs {list(input_shape)} and {num_classes} classes, as its "
                "metadata says"
            )
    model = build_model(spec, num_classes, input_shape)
    used = "EMA" if meta.get("weights") == "EMA" else "trained"  # an exported folder says which
    if files.ema is not None:  # a checkpoint trained with --ema: its averaged weights
        try:
            state = {k: v for k, v in load_file(files.ema).items() if k != "n_averaged"}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{files.ema} is not a readable safetensors file ({first_line(exc)})") from None
        used = "EMA"
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        fit = f"{path} does not fit a {spec} with {num_classes} classes"
        raise ckpt.CheckpointError(f"{fit}: {first_line(exc)}") from None
    model.eval()
    return LoadedModel(model, path, architecture, dataset, class_names, normalization, input_shape, step, epoch,
                       used, files.state)  # fmt: skip


def load_weights(checkpoint: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Loads a checkpoint's weights into your own `model` (a checkpoint folder, a run folder's
    `best`, a `best` link or a model.safetensors file): the EMA's when the checkpoint has them,
    as `evaluate` and `predict` use. The way back in Python to a model trained on data given in
    Python. Raises CheckpointError, in one line, when the weights do not fit `model`.

    Returns `model`, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = model_file(checkpoint)
    path = files.ema or files.model
    try:
        state = {k: v for k, v in load_file(path).items() if k != "n_averaged"}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the checkpoint holds the module's keys
    own = module.state_dict()
    wrong = [f"{k} is {list(own[k].shape)} here, {list(state[k].shape)} there"
             for k in own.keys() & state.keys() if own[k].shape != state[k].shape]  # fmt: skip
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    for what, keys in (("lacks", missing), ("has no place for", unexpected)):
        if keys:
            wrong.append(f"it {what} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    if wrong:
        why = "; ".join(sorted(wrong)[:3])
        raise ckpt.CheckpointError(f"{path} does not fit this {type(module).__qualname__}: {why}")
    module.load_state_dict(state)
    return model.eval()


def _whole(value: Any, least: int = 1) -> int:
    """An integer >= `least` from JSON or metadata text (not a bool, not a float)."""
    number = int(value) if isinstance(value, str) else value
    if type(number) is not int or number < least:
        raise ValueError(f"expected an integer >= {least}, got {value!r}")
    return number


def _strings(values: Any) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str | int) for v in values):
        raise ValueError("class_names must be a list of names")
    return [str(v) for v in values]


def recorded(loaded: LoadedModel, key: str) -> Any:
    """A field of the checkpoint's state.json (its run's `config`, its `lineage`), as checked when
    the model was loaded; None for a model file on its own."""
    return loaded.state[key] if loaded.state is not None else None


def recorded_config(loaded: LoadedModel) -> dict[str, Any]:
    """The settings of the run that wrote the checkpoint, if known."""
    config = recorded(loaded, "config")
    return config if isinstance(config, dict) else {}


def load_test_split(loaded: LoadedModel, data_dir: str | None, dataset: str | None = None, split: str = "test") -> Any:
    """The test split of the checkpoint's data set (never downloaded), or of `dataset` (an image
    folder that moved since); `split="valid"`: the validation split training chose `best` on (the
    same images held out of the training split, by the recorded --val-split and --seed)."""
    from trainer.data import Split
    from trainer.imagefolder import image_folder_path, load_image_folder_splits, parse_image_size

    recorded = recorded_config(loaded)
    data_dir = data_dir or recorded.get("data_dir") or "./data"
    if loaded.dataset == CUSTOM_DATA:
        raise ConfigError(
            f"{loaded.path} was trained on data given in Python: evaluate it there ({IN_PYTHON}, then "
            "Trainer.evaluate(model) or trainer.evaluation.evaluate_model)"
        )
    if loaded.dataset.startswith("hf:"):  # the saved data set, its splits chosen as in training
        from trainer.data import hf_source

        where = dataset if dataset is not None else loaded.dataset
        if not where.startswith("hf:"):
            raise ConfigError(f"{loaded.path} was trained on {loaded.dataset}: --dataset {dataset} is not that kind")
        size = parse_image_size(recorded.get("image_size"))
        source = hf_source(where, size, lambda _: None, recorded.get("val_split") or 0, recorded.get("seed", 0),
                           recorded.get("input_key"), recorded.get("label_key"))  # fmt: skip
        return source.valid if split == "valid" else source.test
    folder = image_folder_path(loaded.dataset)
    if dataset is not None:
        if (image_folder_path(dataset) is None) != (folder is None):
            raise ConfigError(f"{loaded.path} was trained on {loaded.dataset}: --dataset {dataset} is not that kind")
        folder = image_folder_path(dataset) if folder is not None else None
        if folder is None and dataset != loaded.dataset:
            raise ConfigError(f"{loaded.path} was trained on {loaded.dataset}, not {dataset}")
    if folder is not None and not folder.exists():
        raise ConfigError(
            f"the image folder {folder} it was trained on is gone (moved?): pass --dataset imagefolder:NEW_PATH"
        )
    held = recorded.get("val_split") or 0
    if split == "valid" and held and "seed" not in recorded:
        raise ConfigError(f"{loaded.path} does not record how its validation split was held out: evaluate it from "
                          "its checkpoint folder (step_* or best), not a model file alone")  # fmt: skip
    if folder is not None:
        # The size as training asked for it (the cache is keyed by it), else the model's input size.
        size = parse_image_size(recorded["image_size"]) if "image_size" in recorded else tuple(loaded.input_shape[1:])
        splits, names, _ = load_image_folder_splits(folder, data_dir, size, say=lambda _: None)
        if names != loaded.class_names:
            raise ConfigError(f"{folder} now holds the classes {', '.join(names)}, not the checkpoint's")
        if split == "valid" and "val" in splits:  # the folder's own validation split
            return Split(*splits["val"])
        train, test = Split(*splits["train"]), Split(*splits["test"])
    else:
        test = load_split(loaded.dataset, data_dir, train=False, download=False)
        train = load_split(loaded.dataset, data_dir, train=True, download=False) if split == "valid" and held else None
    if split != "valid" or not held:  # --val-split 0: the run validated on the test split
        return test
    return hold_out(train, held_out_count(held, len(train)), recorded["seed"])[1]


@torch.no_grad()
def evaluate_model(
    accelerator: Any | None,
    model: nn.Module,
    loader: Any,
    num_classes: int,
    channels_last: bool = False,
    normalization: dict[str, float] | None = NORMALIZATION,
) -> EvalResult:
    """Exact counts over everything `loader` yields: every image once, whatever the number of processes.

    accelerate pads the last batches with repeated images so every process gets one; it drops
    those repeats only from per-sample tensors, so we gather per-sample results, never counts.
    `model` and `loader` must have gone through `accelerator.prepare`; with `accelerator` None
    (one process, plain PyTorch) the batches must already be on the model's device.
    """
    acc = accelerator or _OneProcess(next(model.parameters()).device)
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=acc.device)
    losses_seen = []  # per-image float32 losses stay on the device (no float64 there: MPS has none)
    started, first_batch_s = time.perf_counter(), 0.0
    for images, labels, *_ in loader:  # (the sample numbers are for augmentation)
        logits = logits_of(model(model_input(images, normalization, channels_last))).float()
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


class _OneProcess:
    """What evaluate_model asks of an Accelerator, for one process without one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def gather_for_metrics(tensors: Any) -> Any:
        return tensors  # nothing to gather, no padding to drop


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
