"""Speed paths, checked for what they promise (never for how fast they are): the CPU thread count
a process picks, and --compile's checkpoints, resume and warm-up."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import main_in_process, reset_accelerate, tiny_args
from safetensors.torch import load_file

from trainer import checkpoint as ckpt
from trainer import runtime

ACCELERATE = ["accelerate", "launch", "--config_file", "launch_configs/cpu.yaml"]


@pytest.mark.parametrize(
    "flag, omp, launcher, launcher_omp, local, expected",
    [
        (None, None, None, None, "1", (8, "8 cores / 1 process")),  # python -m trainer
        (None, "3", None, None, "1", (3, "OMP_NUM_THREADS")),  # the user's OMP_NUM_THREADS=3 python -m trainer
        (None, "1", ACCELERATE, None, "1", (8, "8 cores / 1 process")),  # accelerate's silent default of 1
        (None, "1", ACCELERATE, "1", "1", (1, "OMP_NUM_THREADS")),  # OMP_NUM_THREADS=1 accelerate launch ...
        (None, "2", [*ACCELERATE, "--num_cpu_threads_per_process", "2"], None, "1", (2, "OMP_NUM_THREADS")),
        (None, "1", ["torchrun", "--nproc_per_node", "4"], None, "4", (2, "8 cores / 4 processes")),
        (5, "1", ACCELERATE, "1", "1", (5, "--threads")),
    ],
)
def test_cpu_threads_are_the_users_choice_or_the_cores_per_process(
    monkeypatch, flag, omp, launcher, launcher_omp, local, expected
):
    monkeypatch.setattr(runtime, "_launcher", (os.getpid(), launcher, launcher_omp))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert runtime.cpu_threads(flag) == expected


def test_the_trainer_sets_and_shows_its_threads(run_main, tiny_data, tmp_path):
    before = torch.get_num_threads()
    try:
        result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "1",
                                    "--threads", "2"))  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "threads: 2 (--threads)" in result.stdout and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


MODEL = "helpers.models:small_cnn"


@pytest.fixture(scope="module", autouse=True)
def _vector_isa_from_the_cpu_flags():
    """inductor picks its vector ISA from the CPU's flags, then dry-compiles and loads a program
    for each one the flags name (four g++ builds and loader processes, 6 of the 13 s of the
    compilation here), once per cache folder: the suite's is new each session. That checks the
    machine's compiler, not the trainer: here the flags are trusted (the same ISA is picked)."""
    import torch._inductor.config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch._inductor.config.cpp, "vec_isa_ok", True)
        yield


@pytest.fixture(scope="module")
def compiled_run(tiny_data, tmp_path_factory):
    """2 epochs of 6 steps with --compile (inductor on the CPU), a checkpoint every 4 steps; a small
    network of the blog's kinds of layer (its compilation takes seconds, the blog's half a minute)."""
    out = tmp_path_factory.mktemp("compiled")
    args = tiny_args(tiny_data, out, "--epochs", "2", "--limit-train-batches", "6", "--save-every", "4",
                     "--keep-last", "100", "--compile", "--model", MODEL)  # fmt: skip
    assert main_in_process(args) == 0
    return out / "mnist"


@pytest.mark.slow
def test_compiled_checkpoints_hold_the_plain_module_and_load_without_compile(compiled_run, tiny_data, tmp_path):
    from helpers.models import small_cnn

    from trainer import evaluate

    weights = load_file(compiled_run / "step_0000012" / ckpt.MODEL_NAME)
    assert set(weights) == set(small_cnn(10, 1).state_dict())  # no `_orig_mod.` prefix
    state = json.loads((compiled_run / "step_0000012" / ckpt.STATE_NAME).read_text())
    assert state["config"]["compile"] is True
    out = tmp_path / "eval.json"
    reset_accelerate()
    assert evaluate.main([str(compiled_run / "best"), "--data-dir", str(tiny_data), "--json", str(out),
                          "--model", MODEL]) == 0  # fmt: skip
    reset_accelerate()
    rows = [json.loads(line) for line in (compiled_run / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["valid_acc"])
    assert json.loads(out.read_text())["correct"] == best["valid_correct"]  # eager evaluation, same count


@pytest.mark.slow
def test_compiled_warmup_is_reported_apart(compiled_run):
    rows = [json.loads(line) for line in (compiled_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["warmup_s"] > 0 and rows[1]["warmup_s"] == 0.0
    # Compiling takes seconds, 6 tiny steps or one evaluation a fraction of one: the epoch's and
    # the evaluation's times leave the warm-up out.
    assert 0 < rows[0]["epoch_time_s"] < rows[0]["warmup_s"] and 0 < rows[0]["eval_time_s"] < rows[0]["warmup_s"]


@pytest.mark.slow
def test_compiled_resume_is_bitwise_equal_to_the_compiled_unbroken_run(run_main, compiled_run, tiny_data, tmp_path):
    result = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--output-dir", str(tmp_path), "--model",
                       MODEL, "--run-name", "resumed", "--resume", str(compiled_run / "step_0000004")])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "compile: inductor (default)" in result.stdout
    a = load_file(compiled_run / "step_0000012" / ckpt.MODEL_NAME)
    b = load_file(tmp_path / "resumed" / "step_0000012" / ckpt.MODEL_NAME)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    keys = ("train_loss", "train_acc", "valid_loss", "valid_correct", "lr")
    rows = [[r[k] for k in keys] for r in map(json.loads, (compiled_run / "metrics.jsonl").read_text().splitlines())]
    again = [
        [r[k] for k in keys] for r in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())
    ]
    assert rows == again
