"""Run folders you can trust: one writer, resume in place from anywhere, the precision kept,
divergence caught, complete runs left complete, user-made file modes, a full disk in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import fork_processes, tiny_args, wait_for
from safetensors.torch import load_file

from trainer import checkpoint as ckpt
from trainer import engine


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_line_error(result, code: int = 2) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("trainer: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def hold_in_epoch_two(patch, release: Path) -> None:
    """Forked trainers (which inherit this patch) wait at the start of epoch 2 until `release` exists:
    the first checkpoint is written and the run folder is held, for as long as a test needs."""
    original = engine.Trainer.train_epoch

    def held(self):
        if self.position.epoch == 1:
            while not release.exists():
                time.sleep(0.01)
        return original(self)

    patch.setattr(engine.Trainer, "train_epoch", held)


def test_a_second_run_on_a_held_folder_is_refused_and_kill_9_frees_it(run_main, tiny_data, tmp_path, monkeypatch):
    release = tmp_path / "release"
    args = tiny_args(tiny_data, tmp_path, "--epochs", "3", "--limit-train-batches", "3")
    run = tmp_path / "mnist"
    with monkeypatch.context() as patch:
        hold_in_epoch_two(patch, release)
        first = fork_processes(args, logs=tmp_path / "first")
    wait_for(lambda: first.poll() or ckpt.find_latest(run) is not None)
    assert not first.poll(), first.read(0)
    metrics_before = (run / "metrics.jsonl").read_bytes()

    for second in (args, [*args, "--resume", "latest"]):  # a fresh start and a resume alike
        line = one_line_error(run_main(second))
        assert f"run folder {run} is in use by another run (process {first.pids[0]} on " in line
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000003"]

    first.kill(signal.SIGKILL)  # the lock dies with its holder: no stale lock
    assert first.wait().codes == [-signal.SIGKILL]
    resumed = run_main([*args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_two_runs_started_together_leave_one_writer(tiny_data, tmp_path, monkeypatch):
    release = tmp_path / "release"
    hold_in_epoch_two(monkeypatch, release)
    args = tiny_args(tiny_data, tmp_path, "--epochs", "2", "--limit-train-batches", "3")
    runs = [fork_processes(args, logs=tmp_path / f"run{i}") for i in range(2)]
    wait_for(lambda: any(r.poll() for r in runs))  # one of them is refused while the other holds the folder
    release.touch()
    codes = sorted(r.wait().codes[0] for r in runs)
    assert codes == [0, 2], [r.read(0) for r in runs]
    refused = next(r for r in runs if r.codes[r.pids[0]] == 2)
    assert "is in use by another run" in refused.read(0)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "mnist" / "metrics.jsonl")] == [1, 2]


def test_resume_by_path_from_another_directory_continues_in_the_run_folder(run_main, tiny_data, tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    home.mkdir(), elsewhere.mkdir()
    (home / "data").symlink_to(tiny_data)
    monkeypatch.chdir(home)
    args = ["--data-dir", "data", "--output-dir", "runs", "--batch-size", "64", "--eval-batch-size", "128",
            "--epochs", "3", "--limit-train-batches", "3", "--keep-last", "10", "--progress", "plain",
            "--val-split", "0"]  # fmt: skip
    assert run_main(args).returncode == 0
    run = home / "runs" / "mnist"
    state = json.loads((run / "step_0000003" / ckpt.STATE_NAME).read_text())
    assert state["config"]["data_dir"] == str(home / "data") and Path(state["config"]["output_dir"]).is_absolute()
    for folder in ("step_0000006", "step_0000009"):  # back to the end of epoch 1
        ckpt.discard(run / folder)
    monkeypatch.chdir(elsewhere)
    result = run_main(["--resume", str(run / "step_0000003"), "--progress", "plain"])
    assert result.returncode == 0, result.stderr
    assert f"run: {run}" in result.stdout
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert list(elsewhere.iterdir()) == []  # nothing written where it was started


def test_a_resumed_run_keeps_its_precision(run_main, tiny_data, tmp_path, monkeypatch):
    """A bf16 run started through a launch config (accelerate hands it ACCELERATE_MIXED_PRECISION)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = tiny_args(tiny_data, tmp_path, "--epochs", "2", "--limit-train-batches", "3", "--keep-last", "10")
    assert run_main(args).returncode == 0
    ckpt.discard(tmp_path / "mnist" / "step_0000006")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")

    again = [*args, "--resume", "latest"]
    kept = run_main(again)  # the resume command without the launcher's config: still bf16
    assert kept.returncode == 0, kept.stderr
    assert "precision: bf16" in kept.stdout
    assert [r["mixed_precision"] for r in read_jsonl(tmp_path / "mnist" / "metrics.jsonl")] == ["bf16", "bf16"]

    ckpt.discard(tmp_path / "mnist" / "step_0000006")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # a launch config that says otherwise
    line = one_line_error(run_main(again))
    assert "trained in bf16 precision" in line and "--mixed-precision no" in line
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    chosen = run_main([*again, "--mixed-precision", "no"])  # on purpose: a warning, and it follows
    assert chosen.returncode == 0, chosen.stderr
    assert "resuming a checkpoint trained in bf16 with --mixed-precision no" in chosen.stderr
    assert read_jsonl(tmp_path / "mnist" / "metrics.jsonl")[-1]["mixed_precision"] == "no"


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / ckpt.MODEL_NAME).values() if t.is_floating_point())


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_huge_lr_diverges_with_exit_3_and_no_checkpoint(run_main, tiny_data, tmp_path, precision):
    args = ["--lr", "1e30", "--epochs", "2", "--limit-train-batches", "3", "--mixed-precision", precision]
    result = run_main(tiny_args(tiny_data, tmp_path, *args))
    line = one_line_error(result, code=3)
    assert "training diverged: the training loss was nan at step 2" in line and "lower --lr (this run: 1e+30)" in line
    assert "no checkpoint was written" in line and "clip gradients (--clip-grad-norm 1.0)" in line
    # fp32 is advice only to a run that is not in it
    assert line.endswith("or train in fp32 (this run: bf16)") if precision == "bf16" else "fp32" not in line
    run = tmp_path / "mnist"
    assert ckpt.list_checkpoints(run) == [] and not (run / "best").exists()
    assert line.removeprefix("trainer: error: ") in (run / "run.log").read_text()  # the folder keeps what happened


@pytest.mark.parametrize("save_every", [None, 2])
def test_divergence_in_epoch_two_keeps_the_last_finite_checkpoint_best(
    run_main, tiny_data, tmp_path, monkeypatch, save_every
):
    """NaN inputs from step 5 on (the first step of epoch 2): the loss stops being finite."""
    real_input, calls = engine.model_input, []

    def poisoned(images, *args, **kwargs):
        calls.append(1)
        x = real_input(images, *args, **kwargs)
        return x * float("nan") if len(calls) >= 5 else x

    monkeypatch.setattr(engine, "model_input", poisoned)
    extra = ["--save-every", str(save_every)] if save_every else []
    result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "3", "--limit-train-batches", "4", *extra))
    line = one_line_error(result, code=3)
    run = tmp_path / "mnist"
    assert "training diverged" in line and "the last checkpoint, step_0000004, is finite" in line
    assert ckpt.list_checkpoints(run)[0].name == "step_0000004"  # the newest: nothing after it was saved
    assert os.readlink(run / "best") == "step_0000004" and all_finite(run / "best")
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]


@pytest.mark.slow
def test_divergence_on_one_of_two_processes_stops_both(tiny_data, tmp_path, monkeypatch):
    real_input, calls = engine.model_input, []

    def poisoned_on_rank_1(images, *args, **kwargs):
        calls.append(1)
        x = real_input(images, *args, **kwargs)
        return x * float("nan") if os.environ.get("RANK") == "1" and len(calls) >= 3 else x

    monkeypatch.setattr(engine, "model_input", poisoned_on_rank_1)
    args = tiny_args(tiny_data, tmp_path, "--epochs", "1")  # 12 steps: the save at the epoch's end sees it
    forked = fork_processes(["--cpu", *args], nproc=2)
    result = forked.wait(300)
    assert result.codes == [3, 3], forked.read(0) + forked.read(1)
    # DDP averages rank 1's NaN gradients into rank 0's weights: both see a NaN loss from step 4 on.
    assert "training diverged: the training loss was nan at step 4 (epoch 1)" in forked.read(0)
    assert ckpt.list_checkpoints(tmp_path / "mnist") == []


def test_a_complete_run_stays_complete(run_main, tiny_data, tmp_path, monkeypatch):
    args = tiny_args(tiny_data, tmp_path, "--epochs", "2", "--limit-train-batches", "3")
    real_input, calls = engine.model_input, []

    def interrupt_the_last_step(*a, **kw):
        calls.append(1)
        if len(calls) == 6:  # the last step of the last epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real_input(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "model_input", interrupt_the_last_step)
        done = run_main(args)
    assert done.returncode == 0, done.stderr
    assert "SIGINT came after the last step: the run is complete" in done.stdout
    assert "resume with" not in done.stdout
    run = tmp_path / "mnist"
    metrics = (run / "metrics.jsonl").read_bytes()
    again = run_main([*args, "--resume", "latest"])
    assert again.returncode == 0, again.stderr
    assert f"run already complete (2 epochs): {run}" in again.stdout and "resumed" not in again.stdout
    assert (run / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_get_the_modes_the_users_umask_gives(run_main, tiny_data, tmp_path, mask):
    old = os.umask(mask)
    try:
        result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "2"))
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "mnist"
    paths = [run, *run.rglob("*")]
    files = [p for p in paths if p.is_file() and not p.is_symlink()]
    assert any(p.name == ckpt.MODEL_NAME for p in files) and any(p.name == "metrics.jsonl" for p in files)
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o666 & ~mask}
    wrong |= {str(p): oct(p.stat().st_mode & 0o777) for p in paths
              if p.is_dir() and p.stat().st_mode & 0o777 != 0o777 & ~mask}  # fmt: skip
    assert wrong == {}


@pytest.fixture
def small_disk(tmp_path):
    """A 900 KB file system (tmpfs; root only). Without the right to mount, the test fails loudly
    rather than skip: CI runs as root, and a full disk is a promise of the README."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}); run as root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_loses_nothing(run_main, tiny_data, small_disk):
    args = tiny_args(tiny_data, small_disk, "--epochs", "5", "--limit-train-batches", "2", "--keep-last", "10")
    line = one_line_error(run_main(args))
    run = small_disk / "mnist"
    assert f"in {run} (" in line and "No space left on device" in line
    assert "free there" in line and "one checkpoint needs about" in line and "intact" in line
    assert not [p for p in run.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    saved = ckpt.list_checkpoints(run)
    assert saved and all(ckpt.verify(folder) for folder in saved)
    assert len(read_jsonl(run / "metrics.jsonl")) >= len(saved)
    # Resuming on the same full disk fails the same way: one line, nothing lost.
    again = one_line_error(run_main([*args, "--resume", "latest"]))
    assert "No space left on device" in again
    assert ckpt.list_checkpoints(run) == saved


@pytest.mark.parametrize("where", ["safetensors", "json", "logs"])
def test_every_kind_of_write_failure_is_one_line(run_main, tiny_data, tmp_path, monkeypatch, where):
    """The same without a small disk: each writer fails as a full disk makes it fail, from the
    second epoch's files on (a checkpoint writes 4 safetensors files and 2 JSON files; the logs
    are 2 files per epoch)."""
    import json as real_json

    from safetensors import SafetensorError

    calls = []
    enospc = OSError(28, "No space left on device")

    def failing_after(n, real, error):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise error
            return real(*args, **kwargs)

        return wrapper

    if where == "safetensors":
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(ckpt, "save_file", failing_after(4, ckpt.save_file, error))
    elif where == "json":

        class FailingJson:
            dump = staticmethod(failing_after(2, real_json.dump, enospc))

            def __getattr__(self, name):
                return getattr(real_json, name)

        monkeypatch.setattr(ckpt, "json", FailingJson())
    else:
        monkeypatch.setattr(ckpt, "write_lines_atomic", failing_after(2, ckpt.write_lines_atomic, enospc))
    result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "3", "--limit-train-batches", "2"))
    line = one_line_error(result)
    assert "No space left on device" in line and "free there" in line and "intact" in line
    run = tmp_path / "mnist"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000002"]
    ckpt.verify(run / "step_0000002")
    assert not [p for p in run.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")]
    assert epochs == ([1] if where == "logs" else [1, 2])
