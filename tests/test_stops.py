"""Every way a run stops saves what it has: a closed terminal (SIGHUP), and an exception from the
user's data or model; an exception in the optimizer's step saves nothing and says so."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env, fork_processes, reset_accelerate, tiny_args, wait_for
from test_library import (
    BATCH,
    N_EVAL,
    N_TRAIN,
    Vectors,
    assert_same_weights,
    config,
    deterministic,
    final_weights,
    make_mlp,
    make_vectors,
    read_jsonl,
)
from torch import nn

from trainer import Trainer
from trainer import checkpoint as ckpt
from trainer.errors import DataError

STEPS_PER_EPOCH = N_TRAIN // BATCH  # 32


def _take_the_terminal() -> None:
    """In the child, after setsid: the pseudo-terminal on stdin becomes its controlling terminal,
    so closing the terminal's other end sends it SIGHUP, as a dropped SSH connection does."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.slow
def test_a_closed_terminal_saves_the_step_and_the_run_resumes_bitwise(run_main, tiny_data, tmp_path):
    """The terminal closes in the middle of step 30 (epoch 2 of 24-step epochs): the trainer
    finishes the step, saves, writes the resume command to run.log (the terminal is gone) and exits
    129; the resumed run ends with the weights and metrics of a run never stopped."""
    args = [*tiny_args(tiny_data, tmp_path, "--epochs", "2", "--progress", "bar"), "--model", "stall:blog_resnet"]
    env = {**cli_env(), "PYTHONPATH": str(REPO / "tests"), "STALL_AT_STEP": "30", "STALL_DIR": str(tmp_path),
           "TERM": "xterm"}  # fmt: skip
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args, "--run-name", "closed"], cwd=REPO, env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=_take_the_terminal)  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        while not (tmp_path / "reached").exists() and proc.poll() is None:  # drain the terminal meanwhile
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
        assert proc.poll() is None, seen.decode(errors="replace")[-3000:]
    finally:
        os.close(master)  # the terminal closes: the kernel sends SIGHUP to its session's leader
    (tmp_path / "go").touch()
    assert proc.wait(timeout=300) == 129
    run = tmp_path / "closed"
    latest = ckpt.find_latest(run)
    state = json.loads((latest / "state.json").read_text())
    assert (state["step"], state["epoch"], state["samples_in_epoch"]) == (30, 1, 6 * 64)
    notes = (run / "run.log").read_text()
    assert "stopped by SIGHUP; checkpoint saved: " + str(latest) in notes
    assert "resume with: python -m trainer" in notes and "--resume latest" in notes

    resumed = run_main([*args, "--run-name", "closed", "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    unbroken = run_main([*args, "--run-name", "unbroken"])
    assert unbroken.returncode == 0, unbroken.stderr
    assert deterministic(read_jsonl(run / "metrics.jsonl")) == deterministic(
        read_jsonl(tmp_path / "unbroken" / "metrics.jsonl")
    )
    assert_same_weights(final_weights(run), final_weights(tmp_path / "unbroken"))


class Flawed(Vectors):
    """Vectors whose read number `bad` (counted from `reads = 0`) raises `error`, until it is fixed."""

    def __init__(self, bad: int | None = None, error: type[Exception] = ValueError) -> None:
        super().__init__(*make_vectors(N_TRAIN, 1))
        self.bad, self.error = bad, error

    def __getitem__(self, index: int):
        if self.reads + 1 == self.bad:
            raise self.error(f"sample {index} is corrupt")
        return super().__getitem__(index)


class FlawedModel(nn.Module):
    """The test's MLP, whose training forward pass number `bad` raises (an odd batch)."""

    def __init__(self, bad: int | None) -> None:
        super().__init__()
        self.net, self.bad, self.calls = make_mlp(), bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.bad:
                raise RuntimeError("the model cannot take this batch")
        return self.net(x)


@pytest.mark.parametrize("where", ["data-bug", "data-error", "model"])
def test_a_failure_in_the_data_or_the_model_saves_the_last_whole_step(tmp_path, capsys, where):
    """Epoch 2's 6th step fails (a corrupt sample, a DataError, a batch the model refuses): fit()
    raises the same exception after saving the whole steps; the same script with the cause fixed
    and resume="latest" trains every sample once: it ends equal to a run that never failed."""
    reset_accelerate()
    unbroken = Trainer(config(tmp_path, "unbroken", epochs=2), model=FlawedModel(None), train_data=Flawed(None),
                       eval_data=Vectors(*make_vectors(N_EVAL, 2))).fit()  # fmt: skip

    failing_step = STEPS_PER_EPOCH + 6  # in epoch 2; 37 steps are whole before it
    data, model, error = Flawed(), FlawedModel(None), RuntimeError
    reset_accelerate()
    trainer = Trainer(config(tmp_path, "flawed", epochs=2), model=model, train_data=data,
                      eval_data=Vectors(*make_vectors(N_EVAL, 2)))  # fmt: skip
    if where == "model":
        model.bad = failing_step
    else:  # the 4th sample of the failing step
        data.reads, data.bad = 0, (failing_step - 1) * BATCH + 4
        data.error = error = ValueError if where == "data-bug" else DataError
    capsys.readouterr()
    with pytest.raises(error, match="corrupt" if where != "model" else "cannot take"):
        trainer.fit()
    run = tmp_path / "flawed"
    latest = ckpt.find_latest(run)
    # accelerate's loader fetches one batch ahead: step 38's batch fails while step 37 asks for its own.
    whole = failing_step - 1 if where == "model" else failing_step - 2
    assert ckpt.step_of(latest) == whole
    said = capsys.readouterr().err
    assert (
        f"the work up to step {whole} is saved in {latest}; once the cause is fixed, resume with: "
        'the same script with TrainConfig(..., resume="latest")' in said
    )
    assert f"the work up to step {whole} is saved in {latest}" in (run / "run.log").read_text()

    reset_accelerate()
    model.bad, data.bad = None, None  # the cause fixed (the same module: its weights come from the checkpoint)
    resumed = Trainer(config(tmp_path, "flawed", epochs=2, resume="latest"), model=model, train_data=data,
                      eval_data=Vectors(*make_vectors(N_EVAL, 2))).fit()  # fmt: skip
    assert deterministic(resumed) == deterministic(unbroken)
    assert_same_weights(final_weights(run), final_weights(tmp_path / "unbroken"))


def test_a_failure_in_the_optimizer_step_saves_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    reset_accelerate()
    trainer = Trainer(config(tmp_path, "opt", epochs=2), model=make_mlp(), train_data=Flawed(),
                      eval_data=Vectors(*make_vectors(N_EVAL, 2)))  # fmt: skip
    step, calls = trainer.optimizer.optimizer.step, []

    def breaks_on_step_40(*args, **kwargs):
        calls.append(1)
        if len(calls) == 40:
            raise RuntimeError("the optimizer broke half-way")
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer.optimizer, "step", breaks_on_step_40)
    with pytest.raises(RuntimeError, match="half-way"):
        trainer.fit()
    latest = ckpt.find_latest(tmp_path / "opt")
    assert ckpt.step_of(latest) == STEPS_PER_EPOCH  # the end of epoch 1, nothing after it
    said = capsys.readouterr().err
    assert "the failure came outside the data and the model" in said and "nothing more was saved" in said
    assert str(latest) in said


def fail_on_rank_1(args: list[str]) -> int:
    """In each forked process: rank 1's data fails in epoch 2 (its 6th step); rank 0's is whole."""
    data = Flawed()
    trainer = Trainer(config(Path(args[0]), "two", epochs=3), model=make_mlp(), train_data=data,
                      eval_data=Vectors(*make_vectors(N_EVAL, 2)))  # fmt: skip
    data.reads = 0
    if os.environ["RANK"] == "1":
        data.bad = (STEPS_PER_EPOCH // 2 + 5) * BATCH + 4
    trainer.fit()
    return 0


@pytest.mark.slow
def test_a_failure_on_one_of_two_processes_stops_both_within_seconds(tmp_path):
    """Rank 1's sample fails in epoch 2: its error is the one shown, rank 0 stops as soon as the
    next collective finds rank 1 gone, and the checkpoint of epoch 1 (agreed by both) is the last."""
    forked = fork_processes([str(tmp_path)], nproc=2, target=fail_on_rank_1)
    wait_for(lambda: (tmp_path / "two" / ckpt.step_dir_name(STEPS_PER_EPOCH // 2)).exists(), timeout=300)
    began = time.monotonic()  # epoch 2 under way
    result = forked.wait(300)
    seconds = time.monotonic() - began
    print(f"both processes ended {seconds:.1f} s into epoch 2")
    assert seconds < 60
    assert result.codes[1] != 0 and result.codes[0] != 0
    rank0, rank1 = forked.read(0), forked.read(1)
    # A script's uncaught exception: PeerError's one line, not gloo's "Connection closed by peer".
    assert "PeerError: another process stopped (its own message says why)" in rank0
    assert "Connection closed" not in rank0, rank0
    assert "sample" in rank1 and "is corrupt" in rank1
    assert "process 1 failed in its data or model; with several processes nothing more is saved" in rank1
    assert ckpt.step_of(ckpt.find_latest(tmp_path / "two")) == STEPS_PER_EPOCH // 2
