"""Your own data and model given to the Python API (issue 30), drawn by hypothesis.

A drawn case is data (a TensorDataset, a plain map-style Dataset with or without `targets` or
`labels`, an IterableDataset with or without `__len__`, an empty one), inputs of a drawn shape
(features [N, F], images [N, C, H, W], grey [N, H, W], uint8 stored [N, H, W, C]; uint8, float32
or float64, as tensors or numpy arrays), labels as ints, int tensors or numpy ints with now and
then an odd one (1.7, 2.0, -1, None, a class only one split has), a model (one that fits, with
BatchNorm, with an unused parameter, of the wrong output width, for other inputs, failing with an
error of two lines, returning [B, C, 1], frozen, or the default network), class_names (none,
right, too few or none at all, too many, a name twice), --augment, batch sizes from 1,
accumulation and a limit.

The property: every case either trains, with records that agree with the data (train_samples =
steps x samples per step, valid_seen = len(eval_data), the classes the model tells apart), or
`Trainer(...)` or `fit()` raises a `ConfigError` of one line for one of the reasons that
docs/your-data-and-model.md gives, before anything is half written; never another exception.
`refusals` is the oracle: which reasons apply, from the case alone.

CI runs a small derandomized budget (conftest's `ci` profile) plus the explicit examples, each a
mistake issue 30 found; `TRAINER_HYPOTHESIS=deep` runs fifty times as many random examples."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import budget, reset_accelerate
from hypothesis import HealthCheck, event, example, given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from trainer import TrainConfig, Trainer
from trainer import checkpoint as ckpt
from trainer.config import ConfigError
from trainer.data import epoch_permutation

SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
INT_TENSORS = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
ODD = {"fraction": lambda v, c: v + 0.7, "whole-float": lambda v, c: float(v), "negative": lambda v, c: -1,
       "beyond": lambda v, c: c, "none": lambda v, c: None}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One drawn case, printed as it is when the property fails."""

    layout: str = "features"  # features [F] | image [C, H, W] | grey [H, W] | hwc [H, W, 3]
    shape: tuple[int, ...] = (5,)
    dtype: str = "float32"  # float32 | uint8 | float64
    classes: int = 3  # the labels are drawn from 0..classes-1
    n_train: int = 24
    n_eval: int = 7
    train: str = "tensors"  # tensors | dataset | targets | labels (the attribute) | iterable | iterable-len | empty
    eval: str = "tensors"
    tensor_labels: str = "int64"  # a TensorDataset's labels: int64 | int32 | uint8 | float | onehot
    label_type: str = "int"  # what a Dataset returns for an int label: int | numpy | tensor
    odd: tuple[str, int, str] | None = None  # (split, index, kind): one label of ODD's kinds
    numpy_inputs: bool = False  # a Dataset returns numpy arrays
    model: str = "fit"  # fit | bn | unused | default; wrong: wide | narrow | misfit | raises | 3d-logits | frozen
    names: str = "none"  # none | right | short | long | twice
    batch_size: int = 4
    grad_accum: int = 1
    eval_batch_size: int = 8
    limit_train_batches: int | None = None
    augment: bool = False
    seed: int = 12
    data_seed: int = 0

    def n(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_eval

    def container(self, split: str) -> str:
        return self.train if split == "train" else self.eval

    @property
    def width(self) -> int:
        """The model's outputs (the default network: as many as the classes it is built for)."""
        return self.classes + {"wide": 1, "narrow": -1}.get(self.model, 0)

    @property
    def class_names(self) -> list[str] | None:
        w = self.width
        twice = [f"c{k}" for k in range(w - 1)] + ["c0"] if w > 1 else ["c0", "c0"]
        return {"none": None, "right": [f"c{k}" for k in range(w)], "short": [f"c{k}" for k in range(w - 1)],
                "long": [f"c{k}" for k in range(w + 1)], "twice": twice}[self.names]  # fmt: skip


# ---------------------------------------------------------------- building the data and the model
class Samples(Dataset):
    """A plain map-style Dataset of (input, label) pairs; `attr` names the attribute (`targets` or
    `labels`) that holds the labels too, as torchvision's data sets have."""

    def __init__(self, inputs: list, labels: list, attr: str | None) -> None:
        self._inputs, self._labels = inputs, labels
        if attr is not None:
            setattr(self, attr, labels)

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index: int):
        return self._inputs[index], self._labels[index]


class Stream(IterableDataset):
    def __init__(self, samples: Dataset) -> None:
        self.samples = samples

    def __iter__(self):
        return (self.samples[i] for i in range(len(self.samples)))


class StreamWithLength(Stream):
    def __len__(self) -> int:
        return len(self.samples)


def labels_of(case: Case, split: str) -> list:
    """The labels a split's samples hold, as Python objects (ints, numpy ints, 0-d tensors, floats, None)."""
    g = torch.Generator().manual_seed(case.data_seed * 2 + (split == "eval"))
    values: list = torch.randint(0, case.classes, (case.n(split),), generator=g).tolist()
    odd = case.odd
    if odd is not None and odd[0] == split and odd[1] < len(values):
        values[odd[1]] = ODD[odd[2]](values[odd[1]], case.classes)
    if case.container(split) == "tensors":
        return list(labels_tensor(case, values))  # what TensorDataset[i] returns
    convert = {"int": int, "numpy": np.int64, "tensor": torch.tensor}[case.label_type]
    floats = {"numpy": np.float64, "tensor": torch.tensor}.get(case.label_type, float)
    return [convert(v) if isinstance(v, int) else floats(v) if isinstance(v, float) else v for v in values]


def labels_tensor(case: Case, values: list) -> torch.Tensor:
    if case.tensor_labels == "onehot":
        return torch.eye(case.classes)[torch.tensor(values).clamp(0, case.classes - 1)]
    return torch.tensor(values, dtype=INT_TENSORS.get(case.tensor_labels, torch.float32))


def split_of(case: Case, split: str) -> Dataset:
    n, container = case.n(split), case.container(split)
    g = torch.Generator().manual_seed(case.data_seed * 2 + (split == "eval") + 100)
    inputs = torch.randint(0, 256, (n, *case.shape), generator=g, dtype=torch.uint8)
    if case.dtype != "uint8":
        inputs = inputs.to(getattr(torch, case.dtype)) / 255
    if container == "empty":
        return TensorDataset(inputs[:0], torch.zeros(0, dtype=torch.int64))
    labels = labels_of(case, split)
    if container == "tensors":
        return TensorDataset(inputs, torch.stack(labels) if labels else torch.zeros(0))
    rows = [x.numpy() if case.numpy_inputs else x for x in inputs]
    samples = Samples(rows, labels, container if container in ("targets", "labels") else None)
    return {"iterable": Stream, "iterable-len": StreamWithLength}.get(container, lambda s: s)(samples)


class AddChannel(nn.Module):
    """Grey images [B, H, W] -> [B, 1, H, W] (uint8 ones arrive with the channel already)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 3 else x


class Failing(nn.Module):
    """A model that cannot take its input and says so in two lines, as some of torch's errors do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"cannot take {list(x.shape)}\nhint: a second line")


class WithUnused(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.unused = inner, nn.Linear(2, 2)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def model_of(case: Case) -> nn.Module | None:
    """The model a user would write for the inputs (or, by `case.model`, one that is wrong)."""
    if case.model == "default":
        return None
    if case.model == "raises":
        return Failing()
    bn, misfit = case.model == "bn", int(case.model == "misfit")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if case.layout in ("features", "hwc"):
            layers = [nn.Flatten(), nn.Linear(math.prod(case.shape) + misfit, 8), *[nn.BatchNorm1d(8)] * bn, nn.ReLU(),
                      nn.Linear(8, case.width)]  # fmt: skip
        else:
            channels = (case.shape[0] if case.layout == "image" else 1) + misfit
            layers = [AddChannel(), nn.Conv2d(channels, 4, 3, padding=1), *[nn.BatchNorm2d(4)] * bn, nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, case.width)]  # fmt: skip
        model = nn.Sequential(*layers)
    if case.model == "unused":
        return WithUnused(model)
    if case.model == "3d-logits":
        return nn.Sequential(model, nn.Unflatten(1, (case.width, 1)))
    return model.requires_grad_(False) if case.model == "frozen" else model


# ---------------------------------------------------------------- the oracle
def class_of(label: object) -> int | None:
    """The class a label names, as the docs define it: a whole number; None for anything else
    (1.7, None, a float tensor even of a whole number, a tensor of more than one element)."""
    if isinstance(label, torch.Tensor):
        return int(label) if label.numel() == 1 and not label.is_floating_point() else None
    if isinstance(label, float | np.floating):
        return int(label) if float(label).is_integer() else None
    return int(label) if isinstance(label, int | np.integer) else None


def readable(case: Case, split: str, labels: list) -> bool:
    """Labels read without the inputs: integer tensors, or `targets` / `labels` of integers."""
    if case.container(split) == "tensors":
        return case.tensor_labels in INT_TENSORS
    return case.container(split) in ("targets", "labels") and all(
        isinstance(v, int | np.integer) or (isinstance(v, torch.Tensor) and not v.is_floating_point()) for v in labels
    )


def samples_per_epoch(case: Case) -> int:
    sps = case.batch_size * case.grad_accum
    extent = case.n_train if case.limit_train_batches is None else min(case.n_train, case.limit_train_batches * sps)
    return extent // sps * sps


def input_dims(case: Case) -> int:
    """How many dimensions one input has for the trainer: grey uint8 tensors gain their channel."""
    if case.layout == "grey":
        tensors = case.train == "tensors" and case.tensor_labels in INT_TENSORS  # the fast path of tensors
        return 3 if case.dtype == "uint8" and tensors else 2
    return 1 if case.layout == "features" else 3


def classes_of(case: Case, labels: dict[str, list]) -> int | None:
    """How many classes the trained model tells apart (None: it cannot be known)."""
    names = case.class_names
    if case.model != "default":
        return case.width
    if names is not None:
        return len(names)
    if all(readable(case, s, labels[s]) for s in labels):
        return max(class_of(v) for s in labels for v in labels[s]) + 1
    return None


def refusals(case: Case) -> set[str]:
    """A fragment of each one-line refusal that the docs give for this case; empty: it trains."""
    containers = (case.train, case.eval)
    early = set()
    if any(c.startswith("iterable") for c in containers):
        early.add("must be a map-style Dataset with a length")
    if "empty" in containers:
        early.add("is empty")
    if early:
        return early
    labels = {s: labels_of(case, s) for s in ("train", "eval")}
    found = set()
    if class_of(labels["train"][0]) is None:
        found.add("is not an integer class")
    if case.layout == "hwc" and case.dtype == "uint8":
        found.add("uint8 images must be channels first")
    if case.augment and input_dims(case) != 3:
        found.add("--augment needs image inputs")
    if case.n_train < case.batch_size * case.grad_accum:
        found.add("fewer than one step needs")
    names = case.class_names
    if names is not None and len(set(names)) < len(names):
        found.add("name a class more than once")
    if names is not None and case.model != "default" and len(names) != case.width:
        found.add("for a model with")
    if names == []:
        found.add("class_names is empty")
    if case.dtype == "float64" or case.model in ("misfit", "raises"):  # the models' weights are float32
        found.add("the model cannot take one input")
    if case.model == "3d-logits":
        found.add("the model must return logits [batch, classes]")
    classes = classes_of(case, labels)
    if classes is None:
        found.add("needs to know how many classes")
    elif classes == 0:  # class_names=[] for the default network
        found.add("the model cannot take one input")
    else:
        read = set(epoch_permutation(case.n_train, case.seed, 0)[: samples_per_epoch(case)].tolist())
        for split, values in labels.items():
            bad = [i for i, v in enumerate(values) if class_of(v) is None or not 0 <= class_of(v) < classes]
            if split == "train" and not readable(case, split, values):  # read sample by sample, when they are
                bad = [i for i in bad if i == 0 or i in read]
            found |= {"is not an integer class" if class_of(values[i]) is None else "outside the model's" for i in bad}
    if case.model == "frozen":
        found.add("has no parameters that require grad")
    one_value = case.layout in ("features", "hwc") or math.prod(case.shape[-2:]) == 1  # per channel, in a batch of 1
    if case.batch_size == 1 and (case.model == "default" or (case.model == "bn" and one_value)):
        found.add("BatchNorm needs at least 2 samples")
    return found


# ---------------------------------------------------------------- the property
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check(case: Case, out: Path) -> str:
    """Runs the case in `out` and checks the property; returns what happened ("trained" or the refusal)."""
    expected = refusals(case)
    model = model_of(case)
    cfg = TrainConfig(epochs=1, batch_size=case.batch_size, grad_accum=case.grad_accum, lr=0.05,
                      eval_batch_size=case.eval_batch_size, limit_train_batches=case.limit_train_batches,
                      augment=case.augment, seed=case.seed, output_dir=str(out), run_name="run", cpu=True,
                      progress="plain", channels_last=False)  # fmt: skip
    run, trainer = out / "run", None
    reset_accelerate()
    try:
        trainer = Trainer(cfg, model=model, train_data=split_of(case, "train"), eval_data=split_of(case, "eval"),
                          class_names=case.class_names)  # fmt: skip
        history = trainer.fit()
    except ConfigError as exc:
        message = str(exc)
        assert message.strip() and len(message.splitlines()) == 1, f"not one line: {message!r}"
        assert expected, f"refused what the docs let train: {message}"
        assert any(f in message for f in expected), f"refused for another reason than {sorted(expected)}: {message}"
        # Nothing half written: no temporary left, every checkpoint whole (a failure inside an epoch
        # saves its last whole step), no epoch recorded; a refusal before fit() wrote nothing at all.
        if run.exists():
            assert not [p.name for p in run.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)], list(run.iterdir())
            assert read_jsonl(run / "metrics.jsonl") == []
            for folder in ckpt.list_checkpoints(run):
                assert trainer is not None, f"a refusal before fit() wrote {folder}"
                ckpt.verify(folder)
        return "refused: " + next(f for f in sorted(expected) if f in message)
    finally:
        reset_accelerate()
    assert not expected, f"trained where the docs refuse it ({sorted(expected)})"
    labels = {s: labels_of(case, s) for s in ("train", "eval")}
    sps = case.batch_size * case.grad_accum
    steps = samples_per_epoch(case) // sps
    assert history == read_jsonl(run / "metrics.jsonl")
    assert [(r["epoch"], r["step"], r["train_samples"], r["valid_seen"]) for r in history] == [
        (1, steps, steps * sps, case.n_eval)
    ], history
    assert len(trainer.class_names) == classes_of(case, labels)
    if case.class_names is not None:
        assert list(trainer.class_names) == case.class_names
    if model is not None:
        assert trainer.model is model  # the user's own module, trained, unwrapped
    assert [len(c["lr"]) for c in read_jsonl(run / "curves.jsonl")] == [steps]
    ckpt.verify(ckpt.find_latest(run))
    return "trained"


# What a case may get wrong; `cases` draws none, one or two of them, and every other field valid.
MISTAKES = ("iterable", "empty", "float-labels", "odd-label", "float64", "hwc", "augment", "batch", "model", "names",
            "batch-1")  # fmt: skip


@st.composite
def cases(draw) -> Case:
    mistakes = draw(
        st.lists(st.sampled_from(MISTAKES), max_size=draw(st.sampled_from([0, 0, 1, 1, 2]))), label="mistakes"
    )
    layout = (
        "hwc" if "hwc" in mistakes else draw(st.sampled_from(["features", "image", "image", "grey"]), label="layout")
    )
    side = st.integers(1, 7)
    shape = {
        "features": lambda: (draw(st.integers(1, 6)),),
        "image": lambda: (draw(st.sampled_from([1, 3])), draw(side), draw(side)),
        "grey": lambda: (draw(side), draw(side)),
        "hwc": lambda: (draw(st.integers(5, 8)), draw(side), 3),  # H is no channel count: [H, W, C]
    }[layout]()
    dtype = "float64" if "float64" in mistakes else draw(st.sampled_from(["float32", "uint8"]), label="dtype")
    classes = draw(st.integers(1, 4), label="classes")
    n_train, n_eval = draw(st.integers(16, 48), label="train samples"), draw(st.integers(1, 9), label="eval samples")
    kinds = ["tensors", "tensors", "dataset", "targets", "labels"]
    train, evaluation = draw(st.sampled_from(kinds), label="train"), draw(st.sampled_from(kinds), label="eval")
    for mistake, kinds in (("iterable", ["iterable", "iterable-len"]), ("empty", ["empty"])):
        if mistake in mistakes:
            wrong = draw(st.sampled_from(kinds))
            train, evaluation = (wrong, evaluation) if draw(st.booleans(), label="in train") else (train, wrong)
    tensor_labels = draw(st.sampled_from(["int64", "int64", "int32", "uint8"]), label="tensors of")
    if "float-labels" in mistakes:
        tensor_labels = draw(st.sampled_from(["float", "onehot"]))
        train, evaluation = (("tensors", evaluation) if draw(st.booleans(), label="in train") else
                             (train, "tensors"))  # fmt: skip
    odd = None
    if "odd-label" in mistakes or draw(st.sampled_from([False] * 5 + [True]), label="a whole float label"):
        split = draw(st.sampled_from(["train", "eval"]))
        index = draw(st.just(0) | st.integers(0, (n_train if split == "train" else n_eval) - 1))
        odd = (split, index, draw(st.sampled_from(sorted(ODD))) if "odd-label" in mistakes else "whole-float")
        if (train if split == "train" else evaluation) == "tensors":  # the tensor's dtype must hold it
            if odd[2] == "none":
                train, evaluation = (train, "dataset") if split == "eval" else ("dataset", evaluation)
            elif odd[2] in ("fraction", "whole-float"):
                tensor_labels = "float"
            elif tensor_labels == "uint8" and odd[2] == "negative":
                tensor_labels = "int64"
    models = ["fit", "fit", "bn", "unused"] + ["default"] * (layout == "image")
    if "model" in mistakes:
        models = ["wide", "misfit", "frozen", "raises", "3d-logits"] + ["narrow"] * (classes > 1)
    grad_accum = draw(st.sampled_from([1, 1, 2, 3]), label="grad accum")
    batch = draw(st.integers(1, min(8, n_train // grad_accum)), label="batch size")
    if "batch" in mistakes:
        batch = draw(st.sampled_from([n_train // grad_accum + 1, n_train + 1, 4096]))
    model = draw(st.sampled_from(models), label="model")
    if "batch-1" in mistakes:
        batch, model = 1, "default" if layout == "image" else "bn"
    names = draw(
        st.sampled_from(["short", "long", "twice"] if "names" in mistakes else ["none", "right"]), label="names"
    )
    images = layout == "image" or (layout == "grey" and dtype == "uint8" and train == "tensors")
    return Case(
        layout=layout,
        shape=shape,
        dtype=dtype,
        classes=classes,
        n_train=n_train,
        n_eval=n_eval,
        train=train,
        eval=evaluation,
        tensor_labels=tensor_labels,
        label_type=draw(st.sampled_from(["int", "int", "numpy", "tensor"]), label="label type"),
        odd=odd,
        numpy_inputs=draw(st.booleans(), label="numpy inputs"),
        model=model,
        names=names,
        batch_size=batch,
        grad_accum=grad_accum,
        eval_batch_size=draw(st.integers(1, 10), label="eval batch size"),
        limit_train_batches=draw(st.none() | st.integers(1, 3), label="limit train batches"),
        augment="augment" in mistakes or (images and draw(st.booleans(), label="augment")),
        seed=draw(st.sampled_from([12, 0, 2**32 - 1]) | st.integers(0, 2**32 - 1), label="seed"),
        data_seed=draw(st.integers(0, 3), label="data seed"),
    )


IMAGES = Case(layout="image", shape=(3, 5, 6), dtype="uint8", n_train=32)


@budget(40, suppress_health_check=SLOW_OK)
@given(case=cases())
# The mistakes issue 30 found, and what must still train beside them:
@example(case=Case(train="iterable-len"))  # an IterableDataset with __len__
@example(case=Case(train="dataset", odd=("train", 0, "fraction")))  # 1.7 is no class
@example(case=Case(train="targets", odd=("train", 5, "fraction"), n_train=16, batch_size=16))  # a later 1.7, read
@example(case=Case(train="dataset", odd=("train", 3, "whole-float")))  # 2.0 is class 2: trains
@example(case=Case(tensor_labels="float"))  # a float tensor of labels
@example(case=Case(model="frozen"))  # nothing to train
@example(case=Case(eval="dataset", odd=("eval", 4, "beyond")))  # a label only in eval, in a Dataset without targets
@example(case=Case(eval="targets", odd=("eval", 4, "beyond")))  # ... and with them
@example(case=Case(names="twice"))  # a class name twice
@example(case=Case(augment=True))  # --augment on features
@example(case=replace(IMAGES, model="default", batch_size=1))  # batch 1 and the default network's BatchNorm
@example(case=replace(IMAGES, augment=True, model="unused", batch_size=1, grad_accum=3, train="dataset"))  # trains
@example(case=replace(IMAGES, model="default", eval="targets", odd=("eval", 0, "beyond")))  # classes from the labels
@example(case=Case(layout="hwc", shape=(6, 5, 3), dtype="uint8"))  # uint8 images stored [H, W, C]
@example(case=Case(model="wide", names="right"))  # one output more than the names
@example(case=Case(model="raises"))  # a model whose error has two lines
@example(case=Case(classes=1, names="short"))  # class_names=[] for one output: once trained as if none were given
@example(case=replace(IMAGES, model="default", classes=1, names="short"))  # ... and for the default network
def test_your_data_and_model_train_exactly_or_are_refused_in_one_line(tmp_path, case):
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    event(check(case, out))
    shutil.rmtree(out)


def test_negative_control_float_labels_taken_as_their_whole_part_are_caught(tmp_path, monkeypatch):
    """The property can fail: a trainer that took 1.7 as class 1 (issue 30's silent training, as
    `int(label)` does) trains a case the docs refuse, and `check` says so."""
    from trainer import data

    case = Case(train="targets", odd=("train", 5, "fraction"), n_train=16, batch_size=16)
    assert check(case, tmp_path / "right").startswith("refused")
    monkeypatch.setattr(data, "class_label", int)
    with pytest.raises(AssertionError, match="trained where the docs refuse it"):
        check(case, tmp_path / "wrong")
