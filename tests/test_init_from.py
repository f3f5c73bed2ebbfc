"""--init-from: a new run that starts from a trained model's weights, with a new recipe; a
classifier for another number of classes starts afresh; lineage recorded; the guarantees hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import main_in_process, reset_accelerate, tiny_args
from safetensors.torch import load_file
from test_imagefolder import CLASSES, write_folder
from test_resume import assert_same_run, branch

from trainer import TrainConfig, Trainer, evaluate
from trainer import checkpoint as ckpt


@pytest.fixture(scope="module")
def parent(tiny_data, tmp_path_factory) -> Path:
    """A finished 1-epoch run on the tiny MNIST: the run to start from."""
    out = tmp_path_factory.mktemp("parent")
    assert main_in_process(tiny_args(tiny_data, out, "--epochs", "1")) == 0
    return out / "mnist"


def state_of(run: Path) -> dict:
    return json.loads((ckpt.find_latest(run) / ckpt.STATE_NAME).read_text())


def test_a_new_run_starts_from_the_weights_with_its_own_recipe(parent, tiny_data, tmp_path):
    reset_accelerate()
    config = TrainConfig(data_dir=str(tiny_data), output_dir=str(tmp_path), run_name="longer", epochs=3, lr=0.1,
                         batch_size=64, cpu=True, progress="plain", init_from=str(parent / "best"))  # fmt: skip
    trainer = Trainer(config)
    theirs = load_file(parent / "best" / ckpt.MODEL_NAME)
    mine = trainer.module.state_dict()
    assert all(torch.equal(mine[k].cpu(), theirs[k]) for k in theirs)  # every tensor, buffers too
    assert trainer.position.step == 0 and trainer.optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 25)
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 2, 3]
    lineage = state_of(tmp_path / "longer")["lineage"]
    parent_step = ckpt.step_of((parent / "best").resolve())
    assert lineage["parent"] == str((parent / "best").resolve()) and lineage["step"] == parent_step
    assert lineage["sha256"] == ckpt.verify((parent / "best").resolve())["files"][ckpt.MODEL_NAME]["sha256"]


def test_init_from_and_resume_together_are_refused_in_one_line(run_main, parent, tiny_data, tmp_path):
    result = run_main([*tiny_args(tiny_data, tmp_path), "--init-from", str(parent), "--resume", "latest"])
    assert result.returncode == 2 and "pass one of them" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_another_number_of_classes_gets_a_fresh_classifier(run_main, parent, tmp_path, capsys):
    """MNIST's 10 classes onto a grey 28x28 image folder of 3: the classifier is new, the rest kept."""
    folder = write_folder(tmp_path / "shapes", (28, 28), rgb=False)
    args = ["--dataset", f"imagefolder:{folder}", "--data-dir", str(tmp_path / "cache"), "--output-dir",
            str(tmp_path / "runs"), "--batch-size", "8", "--epochs", "1", "--cpu", "--progress", "plain",
            "--init-from", str(parent)]  # fmt: skip
    result = run_main(args)
    assert result.returncode == 0, result.stderr
    line = next(li for li in result.stdout.splitlines() if li.startswith("init from "))
    theirs = load_file(parent / "best" / ckpt.MODEL_NAME)
    new = [k for k in theirs if theirs[k].dim() >= 1 and theirs[k].shape[0] == 10]
    assert f"{len(theirs) - len(new)} tensors kept; {len(new)} new for {len(CLASSES)} classes" in line
    assert set(new) == {"7.0.weight", "7.1.weight", "7.1.bias", "7.1.running_mean", "7.1.running_var"}
    reset_accelerate()
    assert evaluate.main([str(tmp_path / "runs" / "shapes"), "--cpu"]) == 0
    assert f"started from {(parent / 'best').resolve()}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, fragment",
    [(["--model", "stall:blog_resnet"], "holds a 'blog_resnet' model, this run builds"),
     (["--dataset", "imagefolder:{rgb}"], "its model takes inputs [1, 28, 28], this run's data are [3, 28, 28]")],
    ids=["architecture", "input-shape"],
)  # fmt: skip
def test_another_architecture_or_input_shape_is_one_line(run_main, parent, tmp_path, extra, fragment):
    rgb = write_folder(tmp_path / "colour", (28, 28), rgb=True)
    args = ["--data-dir", str(parent.parent.parent / "unused"), "--output-dir", str(tmp_path / "runs"), "--epochs",
            "1", "--batch-size", "8", "--cpu", "--progress", "plain", "--init-from", str(parent / "best")]  # fmt: skip
    if "--model" in extra:
        args[1] = str(Path(json.loads((ckpt.find_latest(parent) / ckpt.STATE_NAME).read_text())["config"]["data_dir"]))
    result = run_main([*args, *(e.format(rgb=rgb) for e in extra)])
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "mnist").exists() and not (tmp_path / "runs" / "colour").exists()


def test_a_run_started_from_a_checkpoint_resumes_bitwise_and_keeps_its_lineage(parent, tiny_data, tmp_path):
    out = tmp_path / "a"
    flags = ("--epochs", "2", "--save-every", "10", "--keep-last", "100", "--lr", "0.2")
    assert main_in_process([*tiny_args(tiny_data, out, *flags), "--init-from", str(parent)]) == 0
    run = out / "mnist"
    assert main_in_process(["--data-dir", str(tiny_data), "--progress", "plain", *branch(run, 30, tmp_path,
                                                                                       "again")]) == 0  # fmt: skip
    assert_same_run(run, tmp_path / "again")
    assert state_of(tmp_path / "again")["lineage"] == state_of(run)["lineage"] is not None
