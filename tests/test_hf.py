"""The Hugging Face ecosystem's data and models: `datasets.Dataset`s of dict samples (PIL images
under the usual keys or named ones, ClassLabel names), models that return tuples, dicts or
`transformers` outputs, and `--dataset hf:PATH` on the command line; exact counts, the (seed,
epoch) order and bitwise resume as for any other data, on 1 and 2 processes."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers
from conftest import fork_processes, reset_accelerate
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from trainer import Stopped, TrainConfig, Trainer
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError

NAMES = ["top", "middle", "bottom"]
TIMING_KEYS = ("epoch_time_s", "eval_time_s", "warmup_s", "train_samples_per_s", "test_time_s")
N_TRAIN, N_EVAL, N_TEST, BATCH = 192, 53, 41, 32  # the evaluation sizes leave partial batches on 1 and 2 processes


def pictures(n: int, seed: int, keys: tuple[str, str] = ("image", "label"), rgb: bool = False) -> datasets.Dataset:
    """n PIL images of 12x12 with a bright band at the top, middle or bottom (the class), in a
    `datasets.Dataset` with an Image and a ClassLabel feature."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(NAMES), n)
    images = []
    for label in labels:
        pixels = rng.integers(0, 60, (12, 12, 3) if rgb else (12, 12)).astype(np.uint8)
        pixels[4 * label : 4 * label + 3] += 150
        images.append(Image.fromarray(pixels))
    features = datasets.Features({keys[0]: datasets.Image(), keys[1]: datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({keys[0]: images, keys[1]: labels.tolist()}, features=features)


def config(out: Path, run_name: str, **kw) -> TrainConfig:
    values = dict(epochs=3, batch_size=BATCH, eval_batch_size=BATCH, lr=0.1, output_dir=str(out), run_name=run_name,
                  cpu=True, progress="plain", num_workers=0)  # fmt: skip
    return TrainConfig(**{**values, **kw})


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.find_latest(run) / "model.safetensors")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def tiny_resnet() -> nn.Module:
    """A real transformers image classifier, built from a small config offline (no download)."""
    config = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=len(NAMES))  # fmt: skip
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(config)


def test_a_datasets_dataset_trains_with_exact_counts_and_its_class_names(tmp_path):
    history = Trainer(config(tmp_path, "ds"), train_data=pictures(N_TRAIN, 1), eval_data=pictures(N_EVAL, 2),
                      test_data=pictures(N_TEST, 3)).fit()  # fmt: skip
    assert [r["valid_seen"] for r in history] == [N_EVAL] * 3
    assert history[-1]["test_seen"] == N_TEST and history[-1]["valid_acc"] >= 0.9  # chance is 1/3
    assert [r["train_samples"] for r in history] == [N_TRAIN // BATCH * BATCH] * 3
    from safetensors import safe_open

    with safe_open(ckpt.find_latest(tmp_path / "ds") / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == NAMES and json.loads(meta["input_shape"]) == [1, 12, 12]
    # class_names that contradict the data set's ClassLabel are refused, in one line.
    reset_accelerate()
    with pytest.raises(ConfigError, match="disagree with the data set's own"):
        Trainer(config(tmp_path, "names"), train_data=pictures(N_TRAIN, 1), eval_data=pictures(N_EVAL, 2),
                class_names=["a", "b", "c"])  # fmt: skip


class Output(nn.Module):
    """A small CNN whose forward returns its logits as a tensor, a tuple, a dict or an object."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, len(NAMES)))
        self.form = form

    def forward(self, pixel_values):
        logits = self.net(pixel_values)
        if self.form == "tuple":
            return logits, logits.detach().sum()
        if self.form == "dict":
            return {"logits": logits, "hidden": logits.detach()}
        if self.form == "output":
            return transformers.modeling_outputs.ImageClassifierOutput(logits=logits)
        return logits


@pytest.mark.parametrize("form", ["tuple", "dict", "output"])
def test_every_form_of_model_output_trains_the_numbers_of_plain_logits(tmp_path, form):
    """The same model, returning its logits in another form, trains and evaluates the same run."""
    runs = {}
    for name in ("tensor", form):
        reset_accelerate()
        Trainer(config(tmp_path, name, epochs=1), model=Output(name), train_data=pictures(N_TRAIN, 1),
                eval_data=pictures(N_EVAL, 2)).fit()  # fmt: skip
        runs[name] = tmp_path / name
    assert records(runs[form]) == records(runs["tensor"])
    assert final_weights(runs[form]).keys() == final_weights(runs["tensor"]).keys()
    assert all(torch.equal(final_weights(runs[form])[k], v) for k, v in final_weights(runs["tensor"]).items())


def stopping(data: datasets.Dataset, after: int) -> datasets.Dataset:
    """`data` with a transform that sends this process SIGTERM at its `after`-th read: a stop at a
    chosen point of the run, driven by the data."""
    reads = [0]

    def transform(batch: dict) -> dict:
        reads[0] += 1
        if reads[0] == after:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    return data.with_transform(transform)


def test_a_transformers_model_on_a_datasets_dataset_stops_resumes_bitwise_and_evaluates(tmp_path):
    reset_accelerate()
    Trainer(config(tmp_path, "unbroken"), model=tiny_resnet(), train_data=pictures(N_TRAIN, 1),
            eval_data=pictures(N_EVAL, 2)).fit()  # fmt: skip
    reset_accelerate()
    per_epoch = N_TRAIN // BATCH
    broken = Trainer(config(tmp_path, "broken"), model=tiny_resnet(),
                     train_data=stopping(pictures(N_TRAIN, 1), 2 + N_TRAIN + 2 * BATCH + 5),  # epoch 2, 3rd step
                     eval_data=pictures(N_EVAL, 2))  # fmt: skip
    with pytest.raises(Stopped) as stopped:
        broken.fit()
    assert per_epoch < ckpt.step_of(Path(stopped.value.checkpoint)) < 2 * per_epoch
    reset_accelerate()
    resumed = Trainer(config(tmp_path, "broken", resume="latest"), model=tiny_resnet(),
                      train_data=pictures(N_TRAIN, 1), eval_data=pictures(N_EVAL, 2))  # fmt: skip
    resumed.fit()
    assert records(tmp_path / "broken") == records(tmp_path / "unbroken")
    a, b = final_weights(tmp_path / "broken"), final_weights(tmp_path / "unbroken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = resumed.evaluate()
    assert (result.correct, result.seen) == (records(tmp_path / "unbroken")[-1]["valid_correct"], N_EVAL)
    assert records(tmp_path / "unbroken")[-1]["valid_acc"] >= 0.9
    # The checkpoint names the transformers class; its weights go back into a fresh instance.
    import trainer

    model = trainer.load_weights(tmp_path / "broken", tiny_resnet())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in a.items())


def train_on_two(args: list[str]) -> int:
    """In each forked process: a datasets.Dataset on 2 processes (gloo)."""
    Trainer(config(Path(args[0]), "two", epochs=2), train_data=pictures(N_TRAIN, 1), eval_data=pictures(N_EVAL, 2),
            test_data=pictures(N_TEST, 3)).fit()  # fmt: skip
    return 0


@pytest.mark.slow
def test_two_processes_count_every_sample_once(tmp_path):
    result = fork_processes([str(tmp_path)], nproc=2, target=train_on_two).wait(600)
    assert result.codes == [0, 0], result.stderr
    rows = records(tmp_path / "two")
    assert [(r["num_processes"], r["valid_seen"]) for r in rows] == [(2, N_EVAL)] * 2
    assert rows[-1]["test_seen"] == N_TEST
    assert [r["train_samples"] for r in rows] == [N_TRAIN // (2 * BATCH) * 2 * BATCH] * 2
    assert [r["step"] for r in rows] == [N_TRAIN // (2 * BATCH), 2 * (N_TRAIN // (2 * BATCH))]


# --- the command line: --dataset hf:PATH


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A DatasetDict saved with save_to_disk: train, validation and test, keys not the usual ones."""
    root = tmp_path_factory.mktemp("hf")
    keys = ("img", "digit")
    dd = datasets.DatasetDict(train=pictures(N_TRAIN, 1, keys), validation=pictures(N_EVAL, 2, keys),
                              test=pictures(N_TEST, 3, keys))  # fmt: skip
    dd.save_to_disk(str(root / "bands"))
    datasets.DatasetDict(train=dd["train"], test=dd["test"]).save_to_disk(str(root / "no-validation"))
    return root


def cli_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", f"hf:{dataset}", "--output-dir", str(out), "--batch-size", str(BATCH), "--eval-batch-size",
            str(BATCH), "--epochs", "2", "--lr", "0.1", "--cpu", "--progress", "plain", *extra]  # fmt: skip


def test_the_command_line_trains_a_saved_data_set_and_evaluate_and_predict_read_it(run_main, saved, tmp_path, capsys):
    keys = ["--input-key", "img", "--label-key", "digit"]
    assert run_main(cli_args(saved / "bands", tmp_path, *keys)).returncode == 0
    run = tmp_path / "bands"  # the run folder takes the data set's name
    rows = records(run)
    assert [r["valid_seen"] for r in rows] == [N_EVAL] * 2 and rows[0]["validation"] == "val"
    assert rows[-1]["test_seen"] == N_TEST  # validation validates, test is scored once
    from trainer import evaluate, predict

    for split, size in (("test", N_TEST), ("valid", N_EVAL)):
        capsys.readouterr()
        assert evaluate.main([str(run), "--split", split, "--json", "-"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["seen"] == size and report["class_names"] == NAMES
    assert report["correct"] == rows[-1]["valid_correct"] or rows[0]["valid_correct"] == report["correct"]
    picture = tmp_path / "band.png"
    datasets.load_from_disk(str(saved / "bands"))["test"][0]["img"].save(picture)
    capsys.readouterr()
    assert predict.main([str(run), str(picture), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] in NAMES


def test_val_split_holds_out_of_a_saved_train_split_stratified(run_main, saved, tmp_path, capsys):
    keys = ["--input-key", "img", "--label-key", "digit"]
    assert run_main(cli_args(saved / "no-validation", tmp_path, *keys, "--val-split", "48")).returncode == 0
    run = tmp_path / "no-validation"
    rows = records(run)
    assert rows[0]["validation"] == "held-out" and [r["valid_seen"] for r in rows] == [48, 48]
    assert rows[-1]["test_seen"] == N_TEST
    assert rows[0]["train_samples"] == (N_TRAIN - 48) // BATCH * BATCH
    from trainer import evaluate

    capsys.readouterr()
    assert evaluate.main([str(run), "--split", "valid", "--json", "-"]) == 0  # the same 48, held out again
    report = json.loads(capsys.readouterr().out)
    assert (report["seen"], report["correct"]) == (48, rows[-1]["valid_correct"])
    shares = np.bincount(datasets.load_from_disk(str(saved / "no-validation"))["train"]["digit"]) / N_TRAIN
    assert all(abs(row["support"] - 48 * share) < 1 for row, share in zip(report["per_class"], shares))


@pytest.mark.parametrize(
    "extra, fragment",
    [([], "a dict without 'labels' or 'label': name its label's key with --label-key"),
     (["--input-key", "pixels", "--label-key", "digit"], "has no key 'pixels' (--input-key); its keys: img, digit"),
     (["--input-key", "img", "--label-key", "nope"], "has no key 'nope' (--label-key)")],
)  # fmt: skip
def test_keys_that_are_not_there_are_one_line(run_main, saved, tmp_path, extra, fragment):
    result = run_main(cli_args(saved / "bands", tmp_path, *extra))
    assert result.returncode == 2 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bands" / "metrics.jsonl").exists()


def test_a_folder_that_is_not_a_saved_data_set_and_a_missing_datasets_are_one_line(run_main, tmp_path, monkeypatch):
    (tmp_path / "plain").mkdir()
    result = run_main(cli_args(tmp_path / "plain", tmp_path / "out"))
    assert result.returncode == 2 and "is not a data set saved with save_to_disk" in result.stderr
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    result = run_main(cli_args(tmp_path / "plain", tmp_path / "out"))
    assert result.returncode == 2 and 'pip install -e ".[hf]"' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_docs_examples_run(run_main, saved, tmp_path, monkeypatch):
    """docs/your-data-and-model.md's two examples, as written, in a folder holding `bands`."""
    import re
    import shlex
    import shutil

    text = (Path(__file__).resolve().parents[1] / "docs" / "your-data-and-model.md").read_text()
    section = text.split("## Hugging Face data sets and models", 1)[1]
    bash, python = (re.search(rf"```{kind}\n(.*?)```", section, re.S).group(1) for kind in ("bash", "python"))
    shutil.copytree(saved / "bands", tmp_path / "bands")
    monkeypatch.chdir(tmp_path)
    train, evaluate_line = bash.strip().splitlines()
    assert run_main(shlex.split(train)[3:] + ["--cpu"]).returncode == 0
    from trainer import evaluate

    assert evaluate.main(shlex.split(evaluate_line.split("#")[0])[3:]) == 0
    assert [r["valid_seen"] for r in records(tmp_path / "checkpoints" / "bands")] == [N_EVAL] * 2
    reset_accelerate()
    scope: dict = {}
    exec(compile(python, "your-data-and-model.md", "exec"), scope)
    assert [r["valid_seen"] for r in scope["history"]] == [N_EVAL] * 2 and scope["history"][-1]["test_seen"] == N_TEST
