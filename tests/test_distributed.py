"""Exact metrics and an exact LR schedule on 1 and 2 processes (gloo on the CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import fork_processes, fork_trainer, main_in_process, tiny_args
from helpers.dist_probe import probe

MAX_LR = 0.5


def read_lrs(run) -> list[float]:
    curves = [json.loads(line) for line in (run / "curves.jsonl").read_text().splitlines()]
    return [lr for c in curves for lr in c["lr"]]


def reference_one_cycle(steps: int) -> list[float]:
    """torch's OneCycleLR sized to `steps` optimizer steps and stepped once after each."""
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=MAX_LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def assert_one_cycle(lrs: list[float]) -> None:
    """First step at max_lr/25, the peak at 30% of the steps, the last step at OneCycle's final LR."""
    steps = len(lrs)
    assert lrs[0] == pytest.approx(MAX_LR / 25, rel=1e-9)
    peak = max(range(steps), key=lrs.__getitem__)
    assert abs(peak - 0.3 * steps) <= 1.5, (peak, steps)
    # The steps sample a cosine that peaks between two of them: the nearest lies at most half a
    # step from the top, which costs at most this much LR.
    warmup = 0.3 * steps - 1
    shortfall = (MAX_LR - MAX_LR / 25) * (1 - math.cos(math.pi * 0.5 / warmup)) / 2
    assert MAX_LR - shortfall * 1.01 <= lrs[peak] <= MAX_LR, (lrs[peak], shortfall)
    assert lrs[-1] == pytest.approx(MAX_LR / 25 / 1e4, rel=1e-9)
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # annealing never stalls


def check_schedule(run, nproc: int, steps_per_epoch: int) -> None:
    lrs = read_lrs(run)
    assert len(lrs) == 3 * steps_per_epoch
    assert_one_cycle(lrs)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == len(lrs) and rows[-1]["num_processes"] == nproc


@pytest.mark.parametrize("limit", [None, 7])
def test_lr_schedule_ends_exactly_at_the_last_step(run_main, tiny_data, tmp_path, limit):
    extra = ["--epochs", "3"] + (["--limit-train-batches", str(limit)] if limit else [])
    result = run_main(tiny_args(tiny_data, tmp_path, *extra))
    assert result.returncode == 0, result.stderr
    steps = 3 * (limit or 1536 // 64)
    check_schedule(tmp_path / "mnist", 1, steps // 3)
    # On one process the schedule is exactly torch's own OneCycleLR sized to the run.
    assert read_lrs(tmp_path / "mnist") == pytest.approx(reference_one_cycle(steps), rel=1e-12, abs=1e-15)


@pytest.mark.slow
def test_lr_schedule_ends_exactly_at_the_last_step_on_two_processes(unbroken_2proc):
    """3 epochs of 12 steps (64 per process, 2 processes); periodic saves do not touch the schedule."""
    check_schedule(unbroken_2proc, 2, 1536 // 64 // 2)


def run_probe(tiny_data, tmp_path, nproc: int, weights) -> dict:
    out = tmp_path / f"probe{nproc}.json"
    forked = fork_processes([], nproc, target=lambda _: probe(tiny_data, tmp_path / f"probe{nproc}", weights, out))
    result = forked.wait()
    assert result.returncode == 0, forked.read(0) + forked.read(1)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def trained_weights(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    assert main_in_process(tiny_args(tiny_data, out, "--epochs", "1", "--limit-train-batches", "5")) == 0
    return next((out / "mnist").glob("step_*")) / "model.safetensors"


def test_two_processes_count_every_test_image_exactly_once(tiny_data, tmp_path, trained_weights):
    one = run_probe(tiny_data, tmp_path, 1, trained_weights)
    two = run_probe(tiny_data, tmp_path, 2, trained_weights)
    check_naive_schedule_ends_early(two["naive_lrs"])
    assert two["num_processes"] == 2
    assert one["exact"]["seen"] == two["exact"]["seen"] == 1001
    assert one["exact"]["correct"] == two["exact"]["correct"]
    assert 0.1 < one["exact"]["correct"] / 1001 < 1.0  # trained weights: a count that can differ
    assert two["exact"]["loss"] == pytest.approx(one["exact"]["loss"], rel=1e-6)
    # Negative control: counting per process and gathering the counts over-counts the padding.
    assert one["naive"]["seen"] == 1001
    assert two["naive"]["seen"] > 1001


def check_naive_schedule_ends_early(lrs: list[float]) -> None:
    """The trap the trainer avoids: a OneCycle sized from the per-process loader, stepped by
    accelerate, reaches its final LR halfway and then sits there without an error."""
    halfway = len(lrs) // 2
    assert lrs[halfway + 1] == lrs[-1]  # already at its end: the second half trains at min LR
    with pytest.raises(AssertionError):
        assert_one_cycle(lrs)


@pytest.mark.slow
def test_two_process_run_reports_exact_counts_through_the_cli(unbroken_2proc):
    rows = [json.loads(line) for line in (unbroken_2proc / "metrics.jsonl").read_text().splitlines()]
    assert [r["valid_seen"] for r in rows] == [1001, 1001, 1001]  # eval batches of 128 x 2 do not divide 1001
    assert all(r["train_samples"] == 1536 for r in rows)  # 12 steps x 2 processes x 64
    out = (unbroken_2proc / "stdout.txt").read_text()
    assert out.count("processes: 2") == 1  # only the main process prints
    assert "global batch: 128 (64 per process x 2 processes) |" in out
    assert "/1001" in out


def test_a_parameter_the_model_never_uses_needs_the_flag_on_two_processes(tiny_data, tmp_path):
    """DDP refuses it at the second step: one line on each process, exit 2; the flag lets the run finish."""
    args = ["--epochs", "1", "--limit-train-batches", "3", "--model", "helpers.models:with_unused_parameter"]
    refused = fork_trainer(tiny_args(tiny_data, tmp_path / "refused", *args), nproc=2, logs=tmp_path / "logs")
    assert refused.codes == [2, 2]
    for rank in (0, 1):
        lines = (tmp_path / "logs" / f"rank{rank}.err").read_text().splitlines()
        assert len(lines) == 1, lines
        prefix = "trainer: error: " + ("[rank 1] " if rank else "")
        assert lines[0].startswith(prefix + "the model has parameters that a step leaves without a gradient")
        assert "(unused.weight, unused.bias)" in lines[0] and lines[0].endswith("pass --find-unused-parameters")
    done = fork_trainer(tiny_args(tiny_data, tmp_path / "done", *args, "--find-unused-parameters"), nproc=2)
    assert done.codes == [0, 0], done.stderr
    rows = [json.loads(line) for line in (tmp_path / "done" / "mnist" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3] and (tmp_path / "done" / "mnist" / "best").exists()
