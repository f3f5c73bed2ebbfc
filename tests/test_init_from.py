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
                         batch_size=64, cpu=True, progress="plain", init_from=str(parent / "best"),
                         val_split=0)  # fmt: skip
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
            "1", "--batch-size", "8", "--cpu", "--progress", "plain", "--init-from", str(parent / "best"),
            "--val-split", "0"]  # fmt: skip
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


def test_resume_auto_with_init_from_starts_from_it_then_continues_its_own_checkpoint(
    run_main, parent, tiny_data, tmp_path, monkeypatch
):
    """What a requeued Slurm job started from a checkpoint runs (--init-from P --resume auto): an
    empty run folder starts from P's weights; stopped and started again with the same flags, the run
    continues its own checkpoint, P is not applied again, and it ends bitwise equal to an unbroken
    run from P, with P's lineage."""
    import os
    import shlex
    import signal

    from trainer import cli, engine

    flags = ("--epochs", "2", "--limit-train-batches", "6", "--lr", "0.2")
    unbroken = run_main([*tiny_args(tiny_data, tmp_path / "unbroken", *flags), "--init-from", str(parent)])
    assert unbroken.returncode == 0, unbroken.stderr
    args = [*tiny_args(tiny_data, tmp_path / "auto", *flags), "--init-from", str(parent), "--resume", "auto"]
    real_input, calls = engine.model_input, []

    def sigterm_in_the_eighth_step(*a, **kw):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_input(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "model_input", sigterm_in_the_eighth_step)
        first = run_main(args)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr
    assert first.stdout.count("init from ") == 1 and "resumed from" not in first.stdout
    run = tmp_path / "auto" / "mnist"
    lineage = state_of(run)["lineage"]
    assert lineage == state_of(tmp_path / "unbroken" / "mnist")["lineage"] is not None
    # The printed command continues the run: --init-from, done already, is not in it.
    advice = shlex.split(next(li for li in first.stdout.splitlines() if li.startswith("resume with: ")))
    assert advice[2:5] == ["python", "-m", "trainer"] and "--init-from" not in advice
    assert cli.parse_config(advice[5:]).resume == "latest"
    # In Python too: TrainConfig(resume="auto", init_from=P) continues the run folder's checkpoint.
    reset_accelerate()
    config = TrainConfig(data_dir=str(tiny_data), output_dir=str(tmp_path / "auto"), epochs=2, lr=0.2, batch_size=64,
                         eval_batch_size=128, limit_train_batches=6, cpu=True, progress="plain", resume="auto",
                         init_from=str(parent), val_split=0)  # fmt: skip
    with Trainer(config) as trainer:
        assert trainer.config.init_from is None and trainer.position.step == 8 and trainer.lineage == lineage
    again = run_main(args)
    assert again.returncode == 0, again.stderr
    assert "init from " not in again.stdout and f"resumed from {run / 'step_0000008'} (step 8)" in again.stdout
    assert_same_run(tmp_path / "unbroken" / "mnist", run)
    assert state_of(run)["lineage"] == lineage


def test_the_lineage_of_a_copied_weights_file_is_where_it_was_read_from_any_folder(
    run_main, parent, tiny_data, tmp_path, monkeypatch, capsys
):
    """--init-from a model.safetensors copied out of its checkpoint, named relative to the working
    folder: the lineage holds the absolute path of what was read, and evaluate, run from another
    folder, names a path that exists."""
    copied = tmp_path / "work" / "copied"
    copied.mkdir(parents=True)
    (copied / ckpt.MODEL_NAME).write_bytes((parent / "best" / ckpt.MODEL_NAME).read_bytes())
    monkeypatch.chdir(tmp_path / "work")
    result = run_main(tiny_args(tiny_data, tmp_path / "runs", "--epochs", "1", "--limit-train-batches", "2",
                                "--init-from", f"copied/{ckpt.MODEL_NAME}"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    lineage = state_of(tmp_path / "runs" / "mnist")["lineage"]
    assert lineage["parent"] == str(copied / ckpt.MODEL_NAME) and Path(lineage["parent"]).is_file()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "runs" / "mnist"), "--data-dir", str(tiny_data), "--cpu"]) == 0
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("started from "))
    assert printed.startswith(f"started from {copied / ckpt.MODEL_NAME} (step ")
