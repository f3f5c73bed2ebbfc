"""Resumed runs are the same run: bitwise on the CPU, for 1 and 2 processes; elastic across world sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fork_trainer, main_in_process, tiny_args
from safetensors.torch import load_file

DETERMINISTIC_KEYS = ("epoch", "step", "train_loss", "train_acc", "train_samples", "valid_loss", "valid_acc",
                      "valid_correct", "valid_seen", "lr")  # fmt: skip


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = sorted(run.glob("step_*"))[-1]
    return load_file(last / "model.safetensors")


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # An evaluation inside an epoch (--eval-every) has no training numbers: the keys it has.
    return [{k: r[k] for k in DETERMINISTIC_KEYS if k in r or not r.get("inside_epoch")} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ: {different[:5]}"
    assert metrics(a) == metrics(b)
    curves = [json.loads(line) for line in (a / "curves.jsonl").read_text().splitlines()]
    assert curves == [json.loads(line) for line in (b / "curves.jsonl").read_text().splitlines()]


def branch(src_run: Path, step: int, out: Path, name: str) -> list[str]:
    """Flags that resume `src_run`'s checkpoint at `step` into a new run folder `name`."""
    return ["--resume", str(src_run / f"step_{step:07d}"), "--output-dir", str(out), "--run-name", name]


@pytest.fixture(scope="module")
def unbroken_1proc(tiny_data, tmp_path_factory):
    """3 epochs of 24 steps, with a checkpoint every 10 steps (mid-epoch) and every epoch, all kept."""
    out = tmp_path_factory.mktemp("unbroken1")
    assert main_in_process(tiny_args(tiny_data, out, "--epochs", "3", "--save-every", "10", "--keep-last", "100")) == 0
    return out / "mnist"


def test_periodic_saves_do_not_change_the_run(run_main, tiny_data, tmp_path, unbroken_1proc):
    result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "3"))
    assert result.returncode == 0, result.stderr
    assert_same_run(unbroken_1proc, tmp_path / "mnist")


@pytest.mark.parametrize("step", [24, 30], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_bitwise_equal_1proc(run_main, tiny_data, tmp_path, unbroken_1proc, step):
    # Only --resume and where to write: every other setting comes from the checkpoint.
    result = run_main(["--data-dir", str(tiny_data), "--progress", "plain",
                          *branch(unbroken_1proc, step, tmp_path, "resumed")])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"resumed from {unbroken_1proc / f'step_{step:07d}'}" in result.stdout
    assert_same_run(unbroken_1proc, tmp_path / "resumed")


def test_negative_control_without_data_position_restore(run_main, tiny_data, tmp_path, unbroken_1proc, monkeypatch):
    """A trainer that forgets where it was in the epoch produces a different run: the test can fail."""
    from trainer import engine

    original = engine.Trainer._resume

    def forgetful(self, folder):
        original(self, folder)
        self.position.samples_in_epoch = 0
        self.stats = engine.state.EpochStats()

    monkeypatch.setattr(engine.Trainer, "_resume", forgetful)
    args = ["--data-dir", str(tiny_data), "--progress", "plain", *branch(unbroken_1proc, 30, tmp_path, "forgetful")]
    assert run_main(args).returncode == 0
    a, b = final_weights(unbroken_1proc), final_weights(tmp_path / "forgetful")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("step", [12, 15], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_bitwise_equal_2proc(tiny_data, tmp_path, unbroken_2proc, step):
    """The unbroken 2-process run against one resumed from its checkpoint, both 2 processes (gloo)."""
    result = fork_trainer(["--data-dir", str(tiny_data), "--progress", "plain",
                           *branch(unbroken_2proc, step, tmp_path, "resumed")], nproc=2)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_run(unbroken_2proc, tmp_path / "resumed")


def test_negative_control_without_data_position_restore_2proc(tiny_data, tmp_path, unbroken_2proc, monkeypatch):
    """The 2-process comparison can fail too: forgetting the data position changes the run."""
    from trainer import engine

    original = engine.Trainer._resume

    def forgetful(self, folder):
        original(self, folder)
        self.position.samples_in_epoch = 0
        self.stats = engine.state.EpochStats()

    monkeypatch.setattr(engine.Trainer, "_resume", forgetful)  # inherited by the forked processes
    result = fork_trainer(["--data-dir", str(tiny_data), "--progress", "plain",
                           *branch(unbroken_2proc, 15, tmp_path, "forgetful")], nproc=2)  # fmt: skip
    assert result.returncode == 0, result.stderr
    a, b = final_weights(unbroken_2proc), final_weights(tmp_path / "forgetful")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("src_nproc, dst_nproc, step", [(2, 1, 15), (1, 2, 30)], ids=["2-to-1", "1-to-2"])
def test_elastic_resume_continues_data_and_schedule(
    tiny_data, tmp_path, unbroken_1proc, unbroken_2proc, src_nproc, dst_nproc, step
):
    src = unbroken_2proc if src_nproc == 2 else unbroken_1proc
    result = fork_trainer(["--data-dir", str(tiny_data), "--progress", "plain",
                           *branch(src, step, tmp_path, "elastic")], nproc=dst_nproc)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"resuming a {src_nproc}-process checkpoint on {dst_nproc} processes" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "elastic" / "metrics.jsonl").read_text().splitlines()]
    curves = [json.loads(line) for line in (tmp_path / "elastic" / "curves.jsonl").read_text().splitlines()]
    interrupted = rows[1]  # both resume points lie in the second epoch
    # Every sample of the interrupted epoch counted once: the part before (src world size) plus the
    # rest (dst world size), each in whole steps of 64 per process.
    before = (step - (rows[0]["step"])) * 64 * src_nproc
    after = (1536 - before) // (64 * dst_nproc) * 64 * dst_nproc
    assert interrupted["train_samples"] == before + after
    lrs = [lr for c in curves for lr in c["lr"]]
    assert len(lrs) == rows[-1]["step"]
    # The LR resumes where it was (no jump back to the start, no jump to the end) and still
    # ends exactly at OneCycle's final value on the last step.
    resumed_at = step
    src_lrs = [lr for c in (json.loads(x) for x in (src / "curves.jsonl").read_text().splitlines()) for lr in c["lr"]]
    assert lrs[:resumed_at] == src_lrs[:resumed_at]
    assert abs(lrs[resumed_at] - src_lrs[resumed_at]) / src_lrs[resumed_at] < 0.05
    assert lrs[-1] == pytest.approx(0.5 / 25 / 1e4, rel=1e-9)
    assert rows[-1]["valid_seen"] == 1001


def test_resume_without_checkpoint_says_where_it_looked(run_main, tiny_data, tmp_path):
    result = run_main(tiny_args(tiny_data, tmp_path, "--resume", "latest"))
    assert result.returncode == 2
    assert str(tmp_path / "mnist") in result.stderr and "no complete checkpoint" in result.stderr


def test_resume_refuses_a_different_recipe(run_main, tiny_data, tmp_path, unbroken_1proc):
    args = ["--data-dir", str(tiny_data), *branch(unbroken_1proc, 30, tmp_path, "x"), "--lr", "0.1"]
    result = run_main(args)
    assert result.returncode == 2
    assert "lr=0.5" in result.stderr and "lr=0.1" in result.stderr


def test_resume_older_checkpoint_in_place_is_refused(run_main, tiny_data, tmp_path, unbroken_1proc):
    run = tmp_path / "mnist"
    shutil.copytree(unbroken_1proc, run, symlinks=True)
    result = run_main(
        ["--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--resume", str(run / "step_0000030")]
    )
    assert result.returncode == 2 and "--run-name" in result.stderr
    assert sorted(p.name for p in run.glob("step_*")) == sorted(p.name for p in unbroken_1proc.glob("step_*"))


@pytest.mark.parametrize("src_nproc, dst_nproc", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_elastic_resume_with_a_batch_limit_trains_the_same_epochs(tiny_data, tmp_path, src_nproc, dst_nproc):
    """--limit-train-batches 4 gives each epoch the samples of 4 steps of the run's first world size;
    a resume on another number of processes trains those samples (in its own steps), and the LR
    schedule goes on from where it was and ends on the last step. (Before, the limit was taken in
    the new world's steps: 2->1 halved the epochs, 1->2 doubled them and the LR jumped.)"""
    limit, per_step = 4, 64 * src_nproc
    src = tmp_path / "src"
    recipe = ["--epochs", "2", "--limit-train-batches", str(limit), "--save-every", "2", "--keep-last", "100"]
    result = fork_trainer(tiny_args(tiny_data, src, *recipe), nproc=src_nproc)
    assert result.returncode == 0, result.stderr
    src = src / "mnist"
    result = fork_trainer(["--data-dir", str(tiny_data), "--progress", "plain",
                           *branch(src, 2, tmp_path, "elastic")], nproc=dst_nproc)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"resuming a {src_nproc}-process checkpoint on {dst_nproc} processes" in result.stderr
    run = tmp_path / "elastic"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_samples = limit * per_step
    assert [r["train_samples"] for r in rows] == [epoch_samples, epoch_samples]
    steps = 2 + (epoch_samples - 2 * per_step) // (64 * dst_nproc) + epoch_samples // (64 * dst_nproc)
    assert rows[-1]["step"] == steps and [r["num_processes"] for r in rows] == [dst_nproc, dst_nproc]
    lrs = [lr for line in (run / "curves.jsonl").read_text().splitlines() for lr in json.loads(line)["lr"]]
    src_lrs = [lr for line in (src / "curves.jsonl").read_text().splitlines() for lr in json.loads(line)["lr"]]
    assert len(lrs) == steps and lrs[:2] == src_lrs[:2]
    # OneCycle rises to its peak (0.5) over the first 30% of the data; the resume comes at 25%.
    assert src_lrs[1] < lrs[2] <= 0.5 and lrs[-1] == pytest.approx(0.5 / 25 / 1e4, rel=1e-9)
    saved = json.loads((run / f"step_{steps:07d}" / "state.json").read_text())
    assert saved["limit_samples"] == epoch_samples  # kept for the next resume, whatever its world size
