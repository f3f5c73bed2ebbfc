"""Issue 31: a validation split held out of the training split, `best` chosen on it, the test split
scored once on `best` when the run ends, early stopping and a target, and their state across a
stop and a resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import budget, fork_trainer, tiny_args
from helpers.models import small_cnn
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_resume import assert_same_run
from torch.utils.data import TensorDataset

from trainer import TrainConfig, Trainer, evaluate
from trainer.data import Split, hold_out
from trainer.errors import ConfigError

HELD = 300  # of the tiny data's 1,536 training images


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def evaluate_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert evaluate.main([*args, "--cpu", "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- the split itself
@budget(60)
@given(
    labels=st.lists(st.integers(0, 5), min_size=2, max_size=300),
    share=st.floats(0.001, 0.999),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_held_out_split_is_exact_stratified_and_a_function_of_the_seed(labels, share, seed):
    labels = torch.tensor(labels)
    n = len(labels)
    count = max(1, min(n - 1, round(share * n)))
    ids = torch.arange(n)  # each image is its own number: what went where is visible
    train, valid = hold_out(Split(ids, labels), count, seed)
    assert len(valid) == count and len(train) == n - count
    # Every image once, in one of the two, each keeping the split's order and its own label.
    assert sorted(torch.cat([train.images, valid.images]).tolist()) == list(range(n))
    for part in (train, valid):
        assert part.images.tolist() == sorted(part.images.tolist())
        assert torch.equal(part.labels, labels[part.images])
    # Each class gives its share, rounded down or up (the largest remainders get the ones left).
    for k in range(int(labels.max()) + 1):
        exact = int((labels == k).sum()) * count / n
        assert int(exact) <= int((valid.labels == k).sum()) <= int(exact) + 1
    again = hold_out(Split(ids, labels), count, seed)[1]
    assert torch.equal(again.images, valid.images)


# ---------------------------------------------------------------- best, the test split, evaluate
@pytest.fixture(scope="module")
def held_out_run(tiny_data, tmp_path_factory) -> tuple[Path, str]:
    from conftest import main_in_process

    out = tmp_path_factory.mktemp("held_out")
    args = tiny_args(tiny_data, out, "--epochs", "3", "--val-split", str(HELD), "--lr", "0.05", "--keep-last", "5")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main_in_process(args) == 0
    return out / "mnist", printed.getvalue()


def test_best_follows_the_validation_split_and_the_test_split_is_scored_once_on_it(held_out_run, tiny_data, capsys):
    run, stdout = held_out_run
    rows = records(run)
    assert [(r["validation"], r["valid_seen"]) for r in rows] == [("held-out", HELD)] * 3
    assert "train images: 1236 | validation: 300 images held out of the training split" in stdout
    assert all("test_acc" not in r for r in rows[:-1])
    best = max(range(3), key=lambda i: rows[i]["valid_acc"])
    last = rows[-1]
    assert (last["test_seen"], last["test_epoch"]) == (1001, best + 1)
    assert (run / "best").resolve().name == f"step_{rows[best]['step']:07d}"
    assert f"test: acc {last['test_acc']:.4f} ({last['test_correct']}/1001)" in stdout
    # evaluate scores the same weights on the same images: the test split by default, and with
    # --split valid the very images held out in training.
    test = evaluate_json(capsys, str(run / "best"), "--data-dir", str(tiny_data))
    assert (test["correct"], test["seen"], test["split"]) == (last["test_correct"], 1001, "test")
    valid = evaluate_json(capsys, str(run / "best"), "--data-dir", str(tiny_data), "--split", "valid")
    assert (valid["correct"], valid["seen"]) == (rows[best]["valid_correct"], HELD)
    assert valid["loss"] == pytest.approx(rows[best]["valid_loss"], rel=1e-6)


def test_two_processes_hold_out_the_same_images_and_count_each_once(held_out_run, tiny_data, tmp_path, capsys):
    run, _ = held_out_run
    args = tiny_args(tiny_data, tmp_path, "--epochs", "1", "--val-split", str(HELD), "--eval-batch-size", "7")
    result = fork_trainer(args, nproc=2)
    assert result.returncode == 0, result.stderr
    (row,) = records(tmp_path / "mnist")
    assert (row["valid_seen"], row["test_seen"], row["train_samples"]) == (HELD, 1001, 1236 // 128 * 128)
    # The held-out images are the same ones: the 1-process run's best scores the same on them
    # as evaluate says, and the 2-process checkpoint's validation split is those images too.
    mine = evaluate_json(capsys, str(tmp_path / "mnist" / "best"), "--data-dir", str(tiny_data), "--split", "valid")
    assert (mine["correct"], mine["seen"]) == (row["valid_correct"], HELD)


def test_scoring_the_test_split_leaves_the_last_weights_in_the_last_checkpoint(tiny_data, tmp_path):
    """The test split is scored on `best`'s weights lent to the model: the run's last checkpoint and
    the model after fit() hold the last weights, bit for bit as a run without test data."""
    from conftest import reset_accelerate

    from trainer.data import load_split

    train, test = load_split("mnist", tiny_data, True), load_split("mnist", tiny_data, False)
    data = {"train_data": TensorDataset(train.images[:640].unsqueeze(1), train.labels[:640]),
            "eval_data": TensorDataset(train.images[640:740].unsqueeze(1), train.labels[640:740])}  # fmt: skip
    finals = []
    for name, test_data in (("without", None), ("with", TensorDataset(test.images.unsqueeze(1), test.labels))):
        reset_accelerate()
        config = TrainConfig(output_dir=str(tmp_path), run_name=name, epochs=4, batch_size=64, lr=2.0, cpu=True,
                             progress="plain")  # fmt: skip
        torch.manual_seed(0)  # the same initial weights
        trainer = Trainer(config, model=small_cnn(10, 1), test_data=test_data, **data)
        history = trainer.fit()
        finals.append((history, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (plain, weights), (tested, tested_weights) = finals
    assert "test_acc" not in plain[-1] and tested[-1]["test_seen"] == len(test.labels)
    best = max(range(4), key=lambda i: tested[i]["valid_acc"])
    assert tested[-1]["test_epoch"] == best + 1
    timing = {"epoch_time_s", "eval_time_s", "warmup_s", "train_samples_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing and not k.startswith("test_")} for r in tested] == [
        {k: v for k, v in r.items() if k not in timing} for r in plain
    ]
    for k in weights:
        assert torch.equal(weights[k], tested_weights[k]), k
    saved = load_file(tmp_path / "with" / "step_0000040" / "model.safetensors")  # 4 epochs of 10 steps
    assert all(torch.equal(saved[k], tested_weights[k]) for k in saved)


# ---------------------------------------------------------------- ending early
def test_early_stop_ends_the_run_and_a_stop_in_between_resumes_to_the_same_end(run_main, tiny_data, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    flags = ["--val-split", str(HELD), "--epochs", "8", "--early-stop", "1", "--limit-train-batches", "6",
             "--model", "test_combinations:stopping_small_cnn", "--cpu"]  # fmt: skip
    monkeypatch.delenv("COMBO_STOP_AT", raising=False)
    unbroken = run_main(tiny_args(tiny_data, tmp_path, *flags, "--run-name", "unbroken"))
    assert unbroken.returncode == 0, unbroken.stderr
    rows = records(tmp_path / "unbroken")
    assert 1 < len(rows) < 8 and "stopped" in rows[-1], rows
    assert rows[-1]["valid_acc"] <= max(r["valid_acc"] for r in rows[:-1])
    assert f"ended after epoch {len(rows)} of 8: early stop: valid_acc did not improve in 1 evaluations" in (
        unbroken.stdout
    )
    assert f"after epoch {len(rows) - 1}: {tmp_path / 'unbroken' / 'best'}\n" in unbroken.stdout
    assert f"python -m trainer.evaluate {tmp_path / 'unbroken' / 'best'}" in unbroken.stdout
    # A SIGTERM in the middle of the epoch that ends the run, then a resume: the same end.
    monkeypatch.setenv("COMBO_STOP_AT", str(rows[-2]["step"] + 3))
    stopped = run_main(tiny_args(tiny_data, tmp_path, *flags, "--run-name", "stopped"))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    monkeypatch.delenv("COMBO_STOP_AT")
    again = ["--output-dir", str(tmp_path), "--model", "test_combinations:stopping_small_cnn", "--run-name",
             "stopped", "--resume", "latest", "--progress", "plain"]  # fmt: skip
    resumed = run_main(again)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "unbroken", tmp_path / "stopped")
    # The run is complete: a further resume has nothing to train.
    complete = run_main(again)
    assert complete.returncode == 0 and f"run already complete ({len(rows)} epochs)" in complete.stdout


def test_a_target_ends_the_run_with_the_time_it_took(run_main, tiny_data, tmp_path):
    flags = ["--val-split", "0.2", "--epochs", "4", "--stop-at", "valid_loss < 1e9", "--monitor", "valid_loss"]
    result = run_main(tiny_args(tiny_data, tmp_path, *flags, "--limit-train-batches", "2"))
    assert result.returncode == 0, result.stderr
    (row,) = records(tmp_path / "mnist")
    assert row["stopped"] == "target valid_loss<1000000000.0 met" and row["target_steps"] == 2
    assert row["target_samples"] == 128 and row["test_epoch"] == 1
    assert "time to valid_loss < 1e9:" in result.stdout and "best valid loss" in result.stdout


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--val-split", "1.5"], "--val-split must be a number of images"),
        (["--val-split", "1536"], "holds out 1536 images, and the training split has 1536"),
        (["--val-split", "-3"], "--val-split must be a number of images"),
        (["--stop-at", "acc>0.9"], "--stop-at must be METRIC>=VALUE"),
        (["--stop-at", "valid_acc>=nan"], "--stop-at must be METRIC>=VALUE"),
        (["--stop-at", "valid_acc_ema>=0.9"], "--stop-at valid_acc_ema needs --ema"),
        (["--min-delta", "0.01"], "--min-delta belongs to --early-stop"),
        (["--early-stop", "0"], "--early-stop must be at least 1"),
    ],
)
def test_bad_selection_settings_are_one_line(run_main, tiny_data, tmp_path, flags, fragment):
    result = run_main(tiny_args(tiny_data, tmp_path, *flags))
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "mnist").exists()


def test_a_monitor_that_is_not_a_validation_metric_is_refused_by_the_parser(run_main, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        run_main(tiny_args(tiny_data, tmp_path, "--monitor", "train_loss"))
    assert exited.value.code == 2 and "invalid choice: 'train_loss'" in capsys.readouterr().err


def test_the_default_holds_out_5000_and_says_so_where_the_data_is_smaller(run_main, tiny_data, tmp_path):
    args = [a for a in tiny_args(tiny_data, tmp_path) if a not in ("--val-split", "0")]
    result = run_main(args)
    assert result.returncode == 2
    assert "--val-split 5000 (the built-in data sets' default) holds out 5000 images" in result.stderr


def test_a_resume_keeps_its_validation_split(run_main, held_out_run, tmp_path):
    run, _ = held_out_run
    result = run_main(["--resume", str(run / "step_0000019"), "--run-name", "other", "--output-dir", str(tmp_path),
                       "--val-split", "0"])  # fmt: skip
    assert result.returncode == 2
    assert "was trained with val_split=300.0, this run has val_split=0.0" in result.stderr


def test_python_test_data_and_val_split_go_their_own_ways(tmp_path):
    data = TensorDataset(torch.rand(40, 1, 8, 8), torch.arange(40) % 2)
    with pytest.raises(ConfigError, match="with train_data, eval_data is the validation split"):
        Trainer(TrainConfig(output_dir=str(tmp_path), val_split=10, cpu=True), train_data=data, eval_data=data)
    with pytest.raises(ConfigError, match="test_data goes with train_data"):
        Trainer(TrainConfig(output_dir=str(tmp_path), cpu=True), test_data=data)
    trainer = Trainer(TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=8, cpu=True, progress="plain"),
                      model=small_cnn(2, 1), train_data=data, eval_data=data)  # fmt: skip
    with pytest.raises(ConfigError, match="no test split apart from its validation split"):
        trainer.evaluate(split="test")
    trainer.close()


def test_an_image_folder_with_val_and_test_validates_on_val_and_scores_test_once(run_main, tmp_path, capsys):
    import shutil

    from test_imagefolder import N_TEST, TEST_IMAGES, quick, train_args, write_folder

    root = write_folder(tmp_path / "fruit", (16, 16), rgb=False)
    shutil.copytree(root / "test", root / "val")
    (next((root / "val").iterdir()) / "00.png").unlink()  # val/ is not test/: one image fewer
    result = run_main(train_args(root, tmp_path / "data", tmp_path / "out", "--epochs", "2"))
    assert result.returncode == 0, result.stderr
    rows = records(tmp_path / "out" / "fruit")
    assert [(r["validation"], r["valid_seen"]) for r in rows] == [("val", TEST_IMAGES - 1)] * 2
    assert rows[-1]["test_seen"] == TEST_IMAGES and N_TEST > 1
    best = str(tmp_path / "out" / "fruit" / "best")
    valid = evaluate_json(capsys, best, "--data-dir", str(tmp_path / "data"), "--split", "valid")
    test = evaluate_json(capsys, best, "--data-dir", str(tmp_path / "data"))
    assert (valid["seen"], test["seen"], test["correct"]) == (TEST_IMAGES - 1, TEST_IMAGES, rows[-1]["test_correct"])
    # Its own val/ is the validation split: holding images out of train/ as well is refused.
    refused = run_main(train_args(root, tmp_path / "data", tmp_path / "out2", *quick("--val-split", "5")))
    assert refused.returncode == 2 and "has its own val/ beside test/" in refused.stderr


# ---------------------------------------------------------------- evaluations inside an epoch
def test_eval_every_adds_evaluations_and_checkpoints_and_trains_the_same_weights(run_main, tiny_data, tmp_path):
    flags = ["--val-split", str(HELD), "--epochs", "2", "--limit-train-batches", "12", "--keep-last", "20"]
    plain = run_main(tiny_args(tiny_data, tmp_path, *flags, "--run-name", "plain"))
    every = run_main(tiny_args(tiny_data, tmp_path, *flags, "--eval-every", "5", "--run-name", "every"))
    assert plain.returncode == 0 and every.returncode == 0, every.stderr
    rows = records(tmp_path / "every")
    inside = [r for r in rows if r.get("inside_epoch")]
    # Steps 5 and 10 in epoch 1, 15 and 20 in epoch 2 (12 and 24 end the epochs and evaluate anyway).
    assert [(r["epoch"], r["step"]) for r in inside] == [(1, 5), (1, 10), (2, 15), (2, 20)]
    assert all(r["valid_seen"] == HELD and "train_loss" not in r for r in inside)
    steps = sorted(int(p.name.removeprefix("step_")) for p in (tmp_path / "every").glob("step_*"))
    assert steps == [5, 10, 12, 15, 20, 24]
    # The training is the same bit for bit; the epochs' records too, but for their timings and the
    # test score, which follows `best` (chosen among all six evaluations).
    timing = {"epoch_time_s", "eval_time_s", "warmup_s", "train_samples_per_s", "test_time_s"}

    def same(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in timing and not k.startswith("test_")}

    assert [same(r) for r in rows if not r.get("inside_epoch")] == [same(r) for r in records(tmp_path / "plain")]
    a = load_file(tmp_path / "plain" / "step_0000024" / "model.safetensors")
    b = load_file(tmp_path / "every" / "step_0000024" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    best = max(range(len(rows)), key=lambda i: rows[i]["valid_acc"])
    assert (tmp_path / "every" / "best").resolve().name == f"step_{rows[best]['step']:07d}"
    assert rows[-1]["test_step"] == rows[best]["step"]


def test_a_target_met_inside_an_epoch_ends_the_run_there(run_main, tiny_data, tmp_path):
    flags = ["--val-split", str(HELD), "--epochs", "3", "--eval-every", "3", "--stop-at", "valid_loss<1e9"]
    result = run_main(tiny_args(tiny_data, tmp_path, *flags))
    assert result.returncode == 0, result.stderr
    (row,) = records(tmp_path / "mnist")
    assert (row["inside_epoch"], row["step"], row["target_steps"], row["target_samples"]) == (True, 3, 3, 3 * 64)
    assert row["test_seen"] == 1001 and row["test_step"] == 3 and row["stopped"].startswith("target")
    assert "ended at step 3, in epoch 1 of 3: target valid_loss<1000000000.0 met" in result.stdout
    again = run_main(["--output-dir", str(tmp_path), "--resume", "latest", "--progress", "plain"])
    assert again.returncode == 0 and "run already complete (0 epochs)" in again.stdout


# ---------------------------------------------------------------- one source of truth for the recipe
# A changed value of each field that decides the numbers (TrainConfig's "recipe" and "selection"
# groups, state.RECIPE_CHECKED); some need a companion flag to be a valid setting at all.
CHANGED = {
    "epochs": ["--epochs", "5"], "batch_size": ["--batch-size", "32"], "lr": ["--lr", "0.1"],
    "momentum": ["--momentum", "0.5"], "cycle_momentum": ["--no-cycle-momentum"], "seed": ["--seed", "3"],
    "optimizer": ["--optimizer", "adamw"], "weight_decay": ["--weight-decay", "0.1"],
    "betas": ["--optimizer", "adamw", "--betas", "0.8,0.9"], "schedule": ["--schedule", "cosine"],
    "warmup_steps": ["--schedule", "cosine", "--warmup-steps", "2"], "grad_accum": ["--grad-accum", "2"],
    "clip_grad_norm": ["--clip-grad-norm", "1.0"], "label_smoothing": ["--label-smoothing", "0.1"],
    "ema": ["--ema", "0.9"], "augment": ["--augment"], "model": ["--model", "helpers.models:small_cnn"],
    "dataset": ["--dataset", "fashion-mnist"],
    "image_size": ["--dataset", "imagefolder:elsewhere", "--image-size", "8"],
    "input_key": ["--input-key", "img"], "label_key": ["--label-key", "digit"],
    "limit_train_batches": ["--limit-train-batches", "3"], "val_split": ["--val-split", "100"],
    "monitor": ["--monitor", "valid_loss"], "early_stop": ["--early-stop", "2"],
    "min_delta": ["--early-stop", "2", "--min-delta", "0.1"], "eval_every": ["--eval-every", "5"],
    "stop_at": ["--stop-at", "valid_acc>=0.9"],
}  # fmt: skip


def test_every_field_that_decides_the_numbers_is_kept_on_resume(run_main, tiny_run, tmp_path):
    from trainer.state import RECIPE_CHECKED

    assert set(CHANGED) == set(RECIPE_CHECKED)  # a new recipe field needs its line here
    checkpoint = str(sorted(tiny_run.glob("step_*"))[0])
    for name, flags in CHANGED.items():
        result = run_main(["--resume", checkpoint, "--output-dir", str(tmp_path), "--run-name", name, *flags])
        changed = [n for n in CHANGED if CHANGED[n][0] == flags[0] or n == name]
        assert result.returncode == 2, (name, result.stdout[-500:])
        assert any(f"was trained with {n}=" in result.stderr for n in changed), (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / name).exists(), name
