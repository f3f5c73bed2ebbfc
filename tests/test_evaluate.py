"""python -m trainer.evaluate: exact counts, per-class metrics, JSON, one-line errors, N processes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_TEST, fork_trainer, reset_accelerate, write_dataset

from trainer import evaluate, evaluation
from trainer.data import DATASET_INFO, load_split, model_input


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()  # each main() builds its own Accelerator


def assert_one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("trainer: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_class_metrics_match_a_hand_computation():
    confusion = torch.tensor([[4, 1, 1], [2, 2, 0], [0, 0, 0]])  # rows: true class; class 2 is never true
    m = evaluation.class_metrics(confusion)
    # By hand: predicted per class (column sums) 6, 3, 1; support (row sums) 6, 4, 0.
    assert m["precision"] == pytest.approx([4 / 6, 2 / 3, 0.0])
    assert m["recall"] == pytest.approx([4 / 6, 2 / 4, 0.0])
    assert m["f1"] == pytest.approx([2 / 3, 4 / 7, 0.0])  # 2PR/(P+R): class 1: (2/3)/(7/6)
    assert m["support"] == [6, 4, 0]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 7) / 3)
    # Negative control: reading the matrix the other way round swaps precision and recall.
    assert evaluation.class_metrics(confusion.T)["precision"][1] == pytest.approx(2 / 4)


def test_counts_are_exact_and_json_has_every_field(tiny_data, tiny_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = evaluate.main([str(tiny_run / "best"), "--data-dir", str(tiny_data), "--cpu", "--batch-size", "96",
                          "--json", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    for key in ("accuracy", "correct", "seen", "loss", "per_class", "macro_f1", "confusion_matrix"):
        assert key in result
    assert set(result["per_class"][0]) == {"class", "name", "precision", "recall", "f1", "support"}

    # The same numbers computed directly: the whole test split in one batch, no accelerate.
    split = load_split("mnist", tiny_data, train=False)
    model = evaluation.load_model(tiny_run / "best").model
    with torch.no_grad():
        logits = model(model_input(split.images))
    confusion = torch.bincount(split.labels * 10 + logits.argmax(1), minlength=100).view(10, 10)
    assert result["seen"] == TINY_TEST
    assert result["confusion_matrix"] == confusion.tolist()
    assert result["correct"] == int(confusion.trace()) and 0.5 < result["accuracy"] < 1.0
    assert [c["support"] for c in result["per_class"]] == torch.bincount(split.labels, minlength=10).tolist()
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, split.labels).item(), rel=1e-5)
    # ... and the count the training run logged for this (best) epoch.
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert result["correct"] == max(logged, key=lambda r: r["valid_acc"])["valid_correct"]

    shown = capsys.readouterr().out
    assert f"({result['correct']}/{TINY_TEST})" in shown and "confusion matrix" in shown and "macro" in shown


def test_a_bare_model_file_brings_its_dataset_and_class_names(tiny_run, tmp_path, capsys):
    """Everything comes from the file's metadata: here a FashionMNIST-labelled copy of the weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = tiny_run / "best" / "model.safetensors"
    with safe_open(source, framework="pt") as st:
        meta = st.metadata()
    names = DATASET_INFO["fashion-mnist"][1]
    bare = tmp_path / "weights" / "model.safetensors"
    bare.parent.mkdir()
    save_file(load_file(source), bare, metadata={**meta, "dataset": "fashion-mnist", "class_names": json.dumps(names)})
    data = write_dataset(tmp_path / "data", folder="FashionMNIST")
    assert evaluate.main([str(bare), "--data-dir", str(data), "--cpu"]) == 0
    shown = capsys.readouterr().out
    assert "fashion-mnist test split" in shown and "Ankle boot" in shown and "T-shirt/top" in shown


def corrupt_copy(run, tmp_path):
    folder = tmp_path / "step_corrupt"
    shutil.copytree(run / "best", folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder


def garbage_file(run, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda run, tmp: tmp / "nowhere", "no such checkpoint"),
        (lambda run, tmp: tmp, "holds no model.safetensors"),  # a folder that is neither checkpoint nor run
        (corrupt_copy, "sha256"),
        (garbage_file, "not a readable safetensors file"),
    ],
    ids=["missing", "other-folder", "corrupted", "garbage"],
)
def test_a_bad_checkpoint_is_one_line_and_exit_2(tiny_data, tiny_run, tmp_path, capsys, make, fragment):
    code = evaluate.main([str(make(tiny_run, tmp_path)), "--data-dir", str(tiny_data), "--cpu"])
    assert_one_line_error(capsys, code, fragment)


def test_missing_data_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRAINER_OFFLINE", "1")
    code = evaluate.main([str(tiny_run / "best"), "--data-dir", str(tmp_path / "empty"), "--cpu"])
    assert_one_line_error(capsys, code, "data not found")


def test_two_processes_give_the_same_numbers(tiny_data, tiny_run, tmp_path, capsys):
    args = [str(tiny_run / "best"), "--data-dir", str(tiny_data), "--batch-size", "96"]  # 1001 = 10 x 96 + 41
    assert evaluate.main([*args, "--cpu", "--json", str(tmp_path / "one.json")]) == 0
    two = fork_trainer([*args, "--json", str(tmp_path / "two.json")], nproc=2, target=evaluate.main)
    assert two.returncode == 0, two.stderr
    one, two_json = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two_json["num_processes"] == 2 and one["num_processes"] == 1
    for key in ("correct", "seen", "confusion_matrix", "per_class", "macro_f1"):
        assert two_json[key] == one[key], key
    assert two_json["seen"] == TINY_TEST
    assert two_json["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two.stdout.count("test split: accuracy") == 1  # only the main process reports
