"""Checkpoints never lose work: atomic saves, verified loads, no pickle, fallbacks, signals, kill -9."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import fork_processes, main_in_process, tiny_args, wait_for
from safetensors.torch import load_file

from trainer import checkpoint as ckpt


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert (
        main_in_process(tiny_args(tiny_data, out, "--epochs", "3", "--limit-train-batches", "4", "--keep-last", "2"))
        == 0
    )
    return out / "mnist"


def copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_layout_manifest_and_metadata(finished_run):
    folders = sorted(p.name for p in finished_run.glob("step_*"))
    # keep-last 2 keeps the newest two; `best` may keep one more.
    assert folders[-2:] == ["step_0000008", "step_0000012"]
    best = finished_run / "best"
    assert best.is_symlink() and (finished_run / os.readlink(best)).is_dir()
    folder = finished_run / "step_0000012"
    names = {p.name for p in folder.iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "progress.safetensors",
                     "state.json", "manifest.json"}  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == ckpt.FORMAT_VERSION and manifest["step"] == 12
    assert manifest["world_size"] == 1 and set(manifest["files"]) == names - {"manifest.json"}
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == "blog_resnet" and meta["dataset"] == "mnist" and meta["step"] == "12"
    assert json.loads(meta["normalization"])["divide_by"] == 255.0 and float(meta["valid_acc"]) > 0
    assert "trainer_version" in meta
    rng = load_file(folder / "rng.safetensors")
    assert rng["torch"].shape[0] == 1  # one row per process


def test_corrupted_files_are_named_and_latest_falls_back(run_main, finished_run, tmp_path, tiny_data):
    for how in ("truncate", "flip", "delete"):
        run = copy_run(finished_run, tmp_path / how / "mnist")
        target = run / "step_0000012" / "optimizer.safetensors"
        data = target.read_bytes()
        if how == "truncate":
            target.write_bytes(data[: len(data) // 2])
        elif how == "flip":
            target.write_bytes(data[:-10] + bytes([data[-10] ^ 0x01]) + data[-9:])
        else:
            target.unlink()
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.verify(run / "step_0000012")
        assert "optimizer.safetensors" in str(info.value)
        # --resume PATH refuses, naming the file and the failed check
        direct = run_main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path / how),
                              "--resume", str(run / "step_0000012")])  # fmt: skip
        assert direct.returncode == 2 and "optimizer.safetensors" in direct.stderr
        assert {"truncate": "truncated", "flip": "sha256", "delete": "missing"}[how] in direct.stderr
        assert "Traceback" not in direct.stderr
        # --resume latest warns and uses step 8, which is complete
        assert ckpt.find_latest(run) == run / "step_0000008"
        latest = run_main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path / how),
                              "--resume", "latest", "--progress", "plain"])  # fmt: skip
        assert latest.returncode == 0, latest.stderr
        assert "skipping broken checkpoint" in latest.stderr and "step_0000008" in latest.stdout


def test_a_prune_killed_half_way_leaves_only_complete_checkpoints(finished_run, tmp_path, monkeypatch):
    """Deleting an old checkpoint is one rename, then the removal: a kill in between never
    leaves a half-deleted folder under a checkpoint's name."""
    run = copy_run(finished_run, tmp_path / "mnist")
    (run / "best").unlink()
    before = ckpt.list_checkpoints(run)
    assert len(before) >= 2

    def killed_half_way(path, *args, **kwargs):
        sorted(Path(path).iterdir())[0].unlink()  # one file is gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(run, keep_last=1)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(run) == before[:-1]
    for folder in ckpt.list_checkpoints(run):
        ckpt.verify(folder)
    ckpt.remove_stale_temporaries(run)
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp")] == []


def test_incompatible_format_version_is_named(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "mnist")
    manifest_path = run / "step_0000012" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        ckpt.verify(run / "step_0000012")


def test_checkpoint_of_another_dataset_is_refused(run_main, finished_run, tmp_path, tiny_data):
    from conftest import write_dataset

    write_dataset(tmp_path / "data", folder="KMNIST")
    result = run_main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path), "--run-name", "k",
                          "--dataset", "kmnist", "--resume", str(finished_run / "step_0000012")])  # fmt: skip
    assert result.returncode == 2 and "dataset='mnist'" in result.stderr and "kmnist" in result.stderr


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles(run_main, finished_run, tmp_path, tiny_data):
    run = copy_run(finished_run, tmp_path / "mnist")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(str(marker)))
    for folder in run.glob("step_*"):
        for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_model.bin", "model.pt"):
            (folder / name).write_bytes(payload)
    pickle.loads(payload).close()  # the payload is live: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()
    result = run_main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--resume", "latest",
                       "--epochs", "3"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


def test_failed_save_leaves_no_partial_folder_and_keeps_the_previous(run_main, tiny_data, tmp_path, monkeypatch):
    """A save that dies half-way (a full disk) keeps every earlier checkpoint loadable."""
    from trainer import TrainConfig, Trainer, engine

    config = TrainConfig(data_dir=str(tiny_data), output_dir=str(tmp_path), batch_size=64, eval_batch_size=128,
                         epochs=3, limit_train_batches=3, cpu=True, progress="plain", val_split=0)  # fmt: skip
    trainer = Trainer(config)
    calls = {"n": 0}
    real_save = ckpt.save

    def failing_save(run_dir, step, contents, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's save runs out of disk after writing some files

            def full_disk():
                raise OSError(28, "No space left on device")

            return real_save(run_dir, step, contents, before_commit=full_disk)
        return real_save(run_dir, step, contents)

    monkeypatch.setattr(engine.ckpt, "save", failing_save)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        trainer.fit()
    run = tmp_path / "mnist"
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp")] == []
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000003"]
    ckpt.load(run / "step_0000003")
    monkeypatch.undo()
    cli = run_main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--resume", "latest"])
    assert cli.returncode == 0, cli.stderr


def test_save_error_is_one_line_exit_2(run_main, tiny_data, tmp_path):
    """An output folder that cannot be written (a file stands where the run folder should be)."""
    (tmp_path / "mnist").write_text("not a folder")
    result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (tmp_path / "mnist").read_text() == "not a folder"


def test_sigkill_at_random_moments_never_breaks_resume(tiny_data, tmp_path):
    """12 kill -9s of a training process that saves every step. Each kill waits for one to three
    new checkpoints (an event, not a time window), then a random few milliseconds, so many land
    inside a save. Each time `--resume latest` carries on, and the run that finally completes
    equals one that was never interrupted, bitwise."""
    rng = random.Random(0)
    # 240 tiny steps of a small network: each kill costs at most a handful, so 12 kills fit on any machine.
    recipe = ["--epochs", "3", "--batch-size", "16", "--limit-train-batches", "80"]
    recipe += ["--model", "helpers.models:small_cnn"]
    # The uninterrupted reference first: it also warms this process's kernel caches, which the
    # forked trainers inherit (a cold start costs each of them many seconds here).
    assert main_in_process(tiny_args(tiny_data, tmp_path / "ref", *recipe)) == 0
    base = tiny_args(tiny_data, tmp_path, *recipe, "--save-every", "1", "--keep-last", "2")
    run = tmp_path / "mnist"
    kills, resumed_from = 0, []
    proc = fork_processes(base, logs=tmp_path / "logs0")
    while kills < 12:
        seen = {p.name for p in ckpt.list_checkpoints(run)}
        wanted = rng.randint(1, 3)

        def progressed(proc=proc, seen=seen, wanted=wanted) -> bool:
            return proc.poll() or len({p.name for p in ckpt.list_checkpoints(run)} - seen) >= wanted

        wait_for(progressed, 600)
        assert not proc.poll(), f"the trainer exited before kill {kills + 1}: {proc.codes} {proc.read(0)}"
        time.sleep(rng.uniform(0, 0.02))  # where in the step (or the save) the kill lands
        proc.kill(signal.SIGKILL)
        codes = proc.wait().codes
        assert codes == [-signal.SIGKILL], f"kill {kills + 1} did not land on a running trainer: {codes}"
        kills += 1
        for folder in ckpt.list_checkpoints(run):  # whatever is named like a checkpoint is complete
            ckpt.verify(folder)
        latest = ckpt.find_latest(run)
        assert latest is not None  # at least one checkpoint had appeared before this kill
        resumed_from.append(latest.name)
        proc = fork_processes([*base, "--resume", "latest"], logs=tmp_path / f"logs{kills}")
    result = proc.wait(900)
    assert result.returncode == 0, result.stderr
    assert len(set(resumed_from)) >= 10, resumed_from  # the kills spread over the run
    final = load_file(ckpt.find_latest(run) / "model.safetensors")
    expected = load_file(ckpt.find_latest(tmp_path / "ref" / "mnist") / "model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    ours = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "ref" / "mnist" / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "step", "train_loss", "train_acc", "valid_acc", "valid_loss")
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in ref]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_saves_prints_resume_command_and_exits_128_plus_signum(run_main, tiny_data, tmp_path, sig, monkeypatch):
    from trainer import engine

    args = tiny_args(tiny_data, tmp_path, "--epochs", "4", "--limit-train-batches", "6")
    run = tmp_path / "mnist"
    real_input, calls = engine.model_input, []

    def signal_on_the_ninth_step(*a, **kw):
        calls.append(1)
        if len(calls) == 9:  # a real signal to this process in the middle of epoch 2's third step
            os.kill(os.getpid(), sig)
        return real_input(*a, **kw)

    previous = signal.getsignal(sig)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "model_input", signal_on_the_ninth_step)
        result = run_main(args)
    assert result.returncode == 128 + sig, result.stderr
    assert signal.getsignal(sig) is previous  # handlers restored
    assert f"{signal.Signals(sig).name} received" in result.stderr
    assert "resume with: python -m trainer" in result.stdout and "--resume latest" in result.stdout
    latest = ckpt.find_latest(run)
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 9 and state["samples_in_epoch"] == 3 * 64  # the step in flight finished, then saved
    resumed = run_main([*args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {latest}" in resumed.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_two_ctrl_c_during_one_long_step_mean_now(tiny_data, tmp_path):
    """Python runs the handler once for two SIGINTs that arrive inside one C++ call; the C-level
    handler has written one byte per signal to the wakeup socket. Simulated: two bytes, one call."""
    from conftest import reset_accelerate

    from trainer import TrainConfig, Trainer
    from trainer.runtime import StopSignals as _StopSignals

    reset_accelerate()
    trainer = Trainer(TrainConfig(data_dir=str(tiny_data), output_dir=str(tmp_path), epochs=1, limit_train_batches=1,
                                  batch_size=64, cpu=True, progress="plain", val_split=0))  # fmt: skip
    try:
        with _StopSignals(trainer) as signals:
            signals._wakeup[1].send(bytes([signal.SIGINT, signal.SIGINT]))
            with pytest.raises(KeyboardInterrupt):
                signals._handle(signal.SIGINT, None)
        with _StopSignals(trainer) as signals:  # one press: save and stop after the step
            trainer.stop_signal = None
            signals._wakeup[1].send(bytes([signal.SIGINT]))
            signals._handle(signal.SIGINT, None)
            assert trainer.stop_signal == signal.SIGINT
        assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was given back
    finally:
        trainer.close()
