"""Inputs and settings at the edges (issue 30): each is refused in one line before training, or
does exactly what the docs say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate, tiny_args
from test_library import config, make_mlp, make_vectors, vectors
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from trainer import Trainer
from trainer.config import ConfigError


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def refused(fragment: str, **kw) -> str:
    """Trainer(...) with `kw` raises a one-line ConfigError (DataError is one) holding `fragment`."""
    with pytest.raises(ConfigError) as caught:
        Trainer(kw.pop("cfg"), **kw)
    message = str(caught.value)
    assert fragment in message and len(message.splitlines()) == 1, message
    return message


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_line(result, fragment: str) -> None:
    assert result.returncode == 2, result
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---------------------------------------------------------------- schedules shorter than the run needs
def test_a_cosine_warm_up_longer_than_the_run_is_refused(run_main, tiny_data, tmp_path):
    flags = ("--epochs", "1", "--limit-train-batches", "6", "--schedule", "cosine", "--warmup-steps")
    one_line(run_main(tiny_args(tiny_data, tmp_path, *flags, "100")), "the run has 6 optimizer steps")
    one_line(run_main(tiny_args(tiny_data, tmp_path, *flags, "5")), "--warmup-steps 5 leaves no step")
    assert run_main(tiny_args(tiny_data, tmp_path, *flags, "4")).returncode == 0  # the negative control
    lrs = [lr for c in read_jsonl(tmp_path / "mnist" / "curves.jsonl") for lr in c["lr"]]
    assert lrs[3] == lrs[4] == pytest.approx(0.5) and lrs[-1] == 0.0


def one_cycle_of_a_short_run(steps: int, lr: float = 0.5) -> list[float]:
    """docs/recipes.md: a run of T < 4 units has no warm-up; step k runs on the cosine from lr at
    unit 0.3 T - 1 down to lr / 25 / 1e4 at unit T - 1 (one process: unit k)."""
    units, low = max(steps, 2), lr / 25 / 1e4
    pct = [(k + 1 - 0.3 * units) / (0.7 * units) for k in range(steps)]
    return [low + (lr - low) / 2 * (1 + math.cos(math.pi * p)) for p in pct]


@pytest.mark.parametrize("steps", [2, 3])
def test_one_cycle_on_a_run_too_short_for_its_warm_up_is_what_the_docs_say(run_main, tiny_data, tmp_path, steps):
    args = tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", str(steps))
    assert run_main(args).returncode == 0
    lrs = [lr for c in read_jsonl(tmp_path / "mnist" / "curves.jsonl") for lr in c["lr"]]
    assert lrs == pytest.approx(one_cycle_of_a_short_run(steps), rel=1e-9)
    assert lrs[0] > 0.4 and lrs[-1] == pytest.approx(0.5 / 25 / 1e4)  # not max_lr / 25 = 0.02


def test_one_cycle_on_four_steps_starts_at_a_25th_of_the_peak(run_main, tiny_data, tmp_path):
    assert run_main(tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "4")).returncode == 0
    lrs = [lr for c in read_jsonl(tmp_path / "mnist" / "curves.jsonl") for lr in c["lr"]]
    assert lrs[0] == pytest.approx(0.5 / 25) and lrs[-1] == pytest.approx(0.5 / 25 / 1e4)


# ---------------------------------------------------------------- data given in Python
def features(n: int = 128, seed: int = 1) -> TensorDataset:
    return TensorDataset(*make_vectors(n, seed))


def test_augment_on_inputs_that_are_not_images_is_refused(tmp_path):
    refused("--augment needs image inputs [C, H, W]; these inputs are [20]", cfg=config(tmp_path, augment=True),
            model=make_mlp(), train_data=features(), eval_data=features(32, 2))  # fmt: skip


class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(*make_vectors(64, 1), strict=True))


class StreamWithLength(Stream):
    def __len__(self) -> int:
        return 64


@pytest.mark.parametrize("stream", [Stream, StreamWithLength])
def test_an_iterable_dataset_is_one_line_with_or_without_a_length(tmp_path, stream):
    refused("train_data must be a map-style Dataset with a length", cfg=config(tmp_path), model=make_mlp(),
            train_data=stream(), eval_data=features(32, 2))  # fmt: skip


class Listed(Dataset):
    """Samples from a list, and no `targets` or `labels` to read the labels from."""

    def __init__(self, samples: list) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


def listed(labels: list, n: int = 64) -> Listed:
    inputs, _ = make_vectors(n, 3)
    return Listed([(inputs[i], labels[i % len(labels)]) for i in range(n)])


@pytest.mark.parametrize(
    "train, fragment",
    [
        (lambda: listed([1.7, 0.0, 2.0]), "the label 1.7 is not an integer class"),
        (lambda: TensorDataset(make_vectors(64, 1)[0], make_vectors(64, 1)[1].float()), "a torch.float32 tensor"),
    ],
)  # fmt: skip
def test_float_labels_are_refused(tmp_path, train, fragment):
    refused(fragment, cfg=config(tmp_path), model=make_mlp(), train_data=train(), eval_data=features(32, 2))


def test_whole_float_labels_train_and_a_later_fraction_is_one_line(tmp_path):
    """2.0 is class 2 (the negative control); 0.5 further on stops training in one line."""
    cfg = config(tmp_path, epochs=1, batch_size=16)
    Trainer(cfg, model=make_mlp(), train_data=listed([2.0, 0, 1]), eval_data=features(32, 2)).fit()
    reset_accelerate()
    trainer = Trainer(config(tmp_path, "later", epochs=1, batch_size=16), model=make_mlp(),
                      train_data=listed([1, 0, 2, 0.5]), eval_data=features(32, 2))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^sample \d+: the label 0.5 is not an integer class$"):
        trainer.fit()


def test_a_model_with_nothing_to_train_is_refused(tmp_path):
    refused("has no parameters that require grad", cfg=config(tmp_path), model=make_mlp().requires_grad_(False),
            train_data=vectors(), eval_data=features(32, 2))  # fmt: skip


def test_evaluation_labels_outside_the_classes_are_refused_before_training(tmp_path):
    refused("the evaluation data has the label 7, outside the model's 3 classes", cfg=config(tmp_path),
            model=make_mlp(), train_data=vectors(), eval_data=listed([7, 0, 1]))  # fmt: skip
    assert not (tmp_path / "mlp" / "metrics.jsonl").exists()
    # One further on is found by the evaluation, in one line (reading all up front reads every input).
    reset_accelerate()
    trainer = Trainer(config(tmp_path, "later", epochs=1), model=make_mlp(), train_data=vectors(),
                      eval_data=listed([0, 1, 2, 0, 5]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^sample 4 has the label 5, outside the model's 3 classes$"):
        trainer.fit()


def test_duplicate_class_names_are_refused(tmp_path):
    refused("class_names name a class more than once: a", cfg=config(tmp_path), model=make_mlp(),
            train_data=vectors(), eval_data=features(32, 2), class_names=["a", "b", "a"])  # fmt: skip


# ---------------------------------------------------------------- image folders
def test_an_empty_class_folder_is_refused_naming_it(run_main, tmp_path):
    from test_imagefolder import quick, train_args, write_folder

    folder = write_folder(tmp_path / "shapes", (12, 12), rgb=False)
    (folder / "train" / "empty").mkdir()
    (folder / "train" / "empty" / "notes.txt").write_text("not an image")
    result = run_main(train_args(folder, tmp_path / "data", tmp_path / "out", *quick()))
    one_line(result, f"{folder / 'train' / 'empty'}: a class folder with no images")
    (folder / "train" / "empty" / "notes.txt").unlink()
    (folder / "train" / "empty").rmdir()  # the negative control: the same folder without it trains
    assert run_main(train_args(folder, tmp_path / "data", tmp_path / "out", *quick())).returncode == 0


# ---------------------------------------------------------------- a checkpoint trained in Python, back in Python
@pytest.mark.parametrize("ema", [None, 0.9])
def test_load_weights_puts_a_python_run_back_into_your_module(run_main, tmp_path, ema):
    """evaluate's CLI sends a Python run to load_weights; loaded into a fresh module, its weights
    (the EMA's when there is one) count what the run's last record counted."""
    import trainer
    from trainer import checkpoint as ckpt
    from trainer import evaluate as evaluate_cli
    from trainer.checkpoint import CheckpointError
    from trainer.evaluation import evaluate_model

    eval_data = features(101, 2)
    cfg = config(tmp_path, epochs=2, ema=ema)
    Trainer(cfg, model=make_mlp(), train_data=vectors(), eval_data=eval_data).fit()
    run = tmp_path / "mlp"
    best = int((run / "best").resolve().name.split("_")[-1])  # a run folder means its best checkpoint
    record = next(r for r in read_jsonl(run / "metrics.jsonl") if r["step"] == best)
    result = run_main([str(run), "--cpu"], main=evaluate_cli.main)
    one_line(result, "trainer.load_weights(checkpoint, model)")

    fresh = make_mlp()
    with torch.random.fork_rng():
        torch.manual_seed(5)
        [p.data.normal_() for p in fresh.parameters()]  # nothing of the initial weights is left to count
    assert trainer.load_weights(run, fresh) is fresh
    loader = torch.utils.data.DataLoader(eval_data, batch_size=16)
    counted = evaluate_model(None, fresh, loader, 3, normalization=None)
    key = "valid_correct_ema" if ema else "valid_correct"
    assert counted.seen == 101 and counted.correct == record[key]
    assert trainer.load_weights(ckpt.find_latest(run), fresh) is fresh  # a checkpoint folder: the last record
    last = read_jsonl(run / "metrics.jsonl")[-1]
    assert evaluate_model(None, fresh, loader, 3, normalization=None).correct == last[key]

    with pytest.raises(CheckpointError, match=r"does not fit this Sequential: 2.bias is \[5\] here, \[3\] there") as no:
        trainer.load_weights(run, torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)))
    assert len(str(no.value).splitlines()) == 1
