"""What other devices and topologies need, checked on the CPU: no float64 on the device (Apple
MPS has none), the fp16 loss scaler in checkpoints, no host copy per step (CUDA), agreements that
every process takes part in, exact limited evaluation, the reported LR, and several machines."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import fork_processes, main_in_process, reset_accelerate, tiny_args
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer import TrainConfig, Trainer
from trainer import checkpoint as ckpt
from trainer.data import TensorImages

FINAL_LR = 0.5 / 25 / 1e4  # OneCycle's last LR for --lr 0.5


class OpRecorder(TorchDispatchMode):
    """Every aten op that runs, with the dtypes of the tensors it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func), [t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor)]))
        return out

    def float64_ops(self) -> list[str]:
        return [name for name, dtypes in self.ops if torch.float64 in dtypes]


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data), output_dir=str(out), batch_size=64, eval_batch_size=128, epochs=2, val_split=0,
                limit_train_batches=4, cpu=True, progress="plain")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_no_float64_tensor_while_training_evaluating_and_saving(tiny_data, tmp_path):
    """MPS has no float64. On the CPU the training device is the CPU, so the check is stricter
    than MPS needs: no op makes a float64 tensor at all (host sums are done in Python floats)."""
    reset_accelerate()
    trainer = Trainer(config(tiny_data, tmp_path, save_every=3))  # saves mid-epoch and at each epoch end
    with OpRecorder() as recorder:
        history = trainer.fit()
    assert len(history) == 2 and history[-1]["valid_seen"] == 1001
    assert len(ckpt.list_checkpoints(tmp_path / "mnist")) >= 3
    assert recorder.float64_ops() == []
    # The recorder sees what the old code did: a float64 accumulator and .double() on the device.
    with OpRecorder() as control:
        torch.zeros((), dtype=torch.float64) + torch.ones(3).double().sum()
    assert control.float64_ops()


def test_rng_states_round_trip_bit_for_bit(tiny_data, tmp_path):
    """The float parts of Python's and numpy's RNG states travel as int64 bits, and come back exact."""
    import random

    import numpy as np

    from trainer.state import floats as _floats
    from trainer.state import rng_state as _rng_state
    from trainer.state import set_rng_state as _set_rng_state

    reset_accelerate()
    trainer = Trainer(config(tiny_data, tmp_path, epochs=1, limit_train_batches=1))  # seeds every generator
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian, a float in Python's state
    np.random.seed(5)
    np.random.standard_normal()  # the same in numpy's
    python_state, numpy_state = random.getstate(), np.random.get_state()
    assert python_state[2] is not None and numpy_state[4] != 0.0
    trainer._save()
    saved = load_file(trainer._last_saved / ckpt.RNG_NAME)
    assert all(t.dtype == torch.int64 for t in saved.values())
    assert _floats(saved["python_gauss_bits"][0]) == [python_state[2]]
    random.seed(0)
    np.random.seed(0)
    _set_rng_state({k: v[0] for k, v in saved.items()})
    assert random.getstate() == python_state
    restored = np.random.get_state()
    assert restored[4] == numpy_state[4] and (restored[1] == numpy_state[1]).all()
    assert torch.equal(saved["torch"][0], _rng_state()["torch"])


def scaled_trainer(cfg: TrainConfig) -> Trainer:
    """A Trainer with a loss scaler, as fp16 on a GPU has: accelerate's optimizer and backward use it."""
    from trainer.runtime import make_accelerator

    reset_accelerate()
    accelerator = make_accelerator(cfg)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    return Trainer(cfg, accelerator=accelerator)


def test_grad_scaler_state_round_trips_through_a_checkpoint(tiny_data, tmp_path, monkeypatch):
    unbroken = scaled_trainer(config(tiny_data, tmp_path, run_name="unbroken", keep_last=10))
    unbroken.fit()
    final_scale = unbroken.accelerator.scaler.state_dict()
    assert final_scale["scale"] == 2.0**12  # grew every 2 of the 8 steps: the state is not trivial
    halfway = tmp_path / "unbroken" / "step_0000004"
    state = json.loads((halfway / ckpt.STATE_NAME).read_text())
    assert state["grad_scaler"]["scale"] == 2.0**10 and state["grad_scaler"]["_growth_tracker"] == 0

    resumed = scaled_trainer(config(tiny_data, tmp_path, run_name="resumed", resume=str(halfway)))
    assert resumed.accelerator.scaler.state_dict() == state["grad_scaler"]
    resumed.fit()
    assert resumed.accelerator.scaler.state_dict() == final_scale
    a = load_file(tmp_path / "unbroken" / "step_0000008" / ckpt.MODEL_NAME)
    b = load_file(tmp_path / "resumed" / "step_0000008" / ckpt.MODEL_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Negative control: a checkpoint holding a fresh scaler's state resumes with another scale.
    real_load = ckpt.load
    fresh = torch.amp.GradScaler("cpu").state_dict()

    def without_scaler(folder):
        contents = real_load(folder)
        contents.state["grad_scaler"] = {**contents.state["grad_scaler"], **fresh}
        return contents

    monkeypatch.setattr(ckpt, "load", without_scaler)
    forgetful = scaled_trainer(config(tiny_data, tmp_path, run_name="forgetful", resume=str(halfway)))
    forgetful.fit()
    assert forgetful.accelerator.scaler.state_dict()["scale"] != final_scale["scale"]


def test_the_data_path_copies_nothing_from_the_host_per_step(tiny_data, tmp_path, monkeypatch):
    """On a GPU, a tensor built from host data per batch means a blocking host-to-device copy per
    step. The prepared loader, as training uses it: no op builds a tensor from host data
    (lift_fresh) or copies across devices (_to_copy) once the epoch has begun."""
    reset_accelerate()
    trainer = Trainer(config(tiny_data, tmp_path, limit_train_batches=None))
    trainer._start_sampler(0, 0)

    def ops_per_batch() -> list[list[str]]:
        per_batch, it = [], iter(trainer.train_loader)
        next(it)  # the first fetch moves the epoch's order to the device, once
        while True:
            with OpRecorder() as recorder:
                try:
                    next(it)
                except StopIteration:
                    return per_batch
            per_batch.append([name for name, _ in recorder.ops])

    batches = ops_per_batch()
    assert len(batches) == 1536 // 64 - 1
    host_copies = {"aten.lift_fresh.default", "aten._to_copy.default", "aten.copy_.default"}
    assert all(not host_copies & set(ops) for ops in batches), batches[0]

    # Negative control: the old fetch (a tensor from the batch's index list) is seen.
    def old_fetch(self, indices):
        index = torch.as_tensor(indices, device=self.images.device)
        return self.images[index], self.labels[index]

    monkeypatch.setattr(TensorImages, "__getitems__", old_fetch)
    control = ops_per_batch()  # accelerate fetches one batch ahead: the last window fetches nothing
    assert all(host_copies & set(ops) for ops in control[:-1])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_lr_is_the_last_steps(run: Path) -> None:
    rows, curves = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "curves.jsonl")
    assert [r["lr"] for r in rows] == [c["lr"][-1] for c in curves]
    assert rows[-1]["lr"] == pytest.approx(FINAL_LR, rel=1e-9)


@pytest.mark.parametrize("limit, seen", [(4, 512), (20, 1001)])
def test_limited_evaluation_counts_exactly_one_process(run_main, tiny_data, tmp_path, limit, seen):
    args = tiny_args(tiny_data, tmp_path, "--limit-train-batches", "3", "--limit-eval-batches", str(limit))
    result = run_main(args)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "mnist" / "metrics.jsonl")
    assert [r["valid_seen"] for r in rows] == [seen, seen]
    assert_lr_is_the_last_steps(tmp_path / "mnist")


@pytest.mark.slow
def test_three_processes_count_limited_evaluation_exactly_and_report_the_last_lr(tiny_data, tmp_path):
    """2 batches of 128 on each of 3 processes is 768 images; accelerate used to trim the last
    batch against the whole split (1001 % 384) and count fewer."""
    args = tiny_args(tiny_data, tmp_path, "--limit-eval-batches", "2")
    result = fork_processes(["--cpu", *args], nproc=3).wait()
    assert result.codes == [0, 0, 0], result.stderr
    rows = read_jsonl(tmp_path / "mnist" / "metrics.jsonl")
    assert [r["valid_seen"] for r in rows] == [768, 768]
    assert [r["train_samples"] for r in rows] == [1536 // 192 * 192] * 2
    assert_lr_is_the_last_steps(tmp_path / "mnist")


@pytest.mark.slow
def test_the_reported_lr_is_the_last_steps_on_two_processes(unbroken_2proc):
    assert_lr_is_the_last_steps(unbroken_2proc)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["evaluate", "_save"])
def test_a_signal_on_one_rank_near_the_epoch_end_stops_both_at_the_same_checkpoint(
    tiny_data, tmp_path, monkeypatch, where
):
    """SIGTERM reaches rank 1 only, while it evaluates or saves at the end of epoch 1: both ranks
    must still meet in the stop agreement, save the same checkpoint and exit 143."""
    from trainer import engine

    original = getattr(engine.Trainer, where)

    def signalled(self, *args, **kwargs):
        if os.environ.get("RANK") == "1" and self.position.epoch == (0 if where == "evaluate" else 1):
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this process only
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine.Trainer, where, signalled)  # inherited by the forked ranks
    args = tiny_args(tiny_data, tmp_path, "--epochs", "3", "--limit-train-batches", "3")
    forked = fork_processes(["--cpu", *args], nproc=2)
    result = forked.wait(300)  # a rank left alone in a collective would wait far longer
    assert result.codes == [143, 143], forked.read(0) + forked.read(1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "mnist")] == ["step_0000003"]
    assert "resume with:" in result.stdout


def two_machines(tmp_path: Path, args_of_rank) -> tuple[list[int], str, str]:
    """Two simulated machines (torchrun --nnodes 2, one process each); their codes and stderr."""
    forked = fork_processes(lambda rank: ["--cpu", *args_of_rank(rank)], nproc=2, machines=2)
    result = forked.wait(300)  # a machine left waiting would take the process group's timeout
    return result.codes, forked.read(0), forked.read(1)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("trainer: error:")]


@pytest.mark.slow
def test_two_machines_train_and_stop_together_when_one_cannot_see_the_checkpoint(tiny_data, tmp_path):
    shared = tmp_path / "shared"
    codes, err0, err1 = two_machines(tmp_path, lambda rank: tiny_args(tiny_data, shared, "--epochs", "1",
                                                                      "--limit-train-batches", "3"))  # fmt: skip
    assert codes == [0, 0], err0 + err1
    rows = read_jsonl(shared / "mnist" / "metrics.jsonl")
    assert rows[0]["num_processes"] == 2 and rows[0]["valid_seen"] == 1001

    # Machine 1 has its own, empty output folder: no shared storage.
    def resume(rank: int) -> list[str]:
        out = shared if rank == 0 else tmp_path / "local1"
        return tiny_args(tiny_data, out, "--epochs", "1", "--limit-train-batches", "3", "--resume", "latest")

    codes, err0, err1 = two_machines(tmp_path, resume)
    assert codes == [2, 2], err0 + err1
    (line0,), (line1,) = error_lines(err0), error_lines(err1)
    assert "process 1 could not read checkpoint step_0000003" in line0
    assert line1.startswith("trainer: error: [rank 1] cannot read checkpoint step_0000003")
    for line in (line0, line1):
        assert "storage that every machine can read" in line


@pytest.mark.slow
def test_data_missing_on_one_machine_stops_both_with_its_reason(tiny_data, tmp_path):
    def args(rank: int) -> list[str]:
        data = tiny_data if rank == 0 else tmp_path / "empty"
        return tiny_args(data, tmp_path, "--epochs", "1", "--limit-train-batches", "3")

    codes, err0, err1 = two_machines(tmp_path, args)
    assert codes == [2, 2], err0 + err1
    (line0,), (line1,) = error_lines(err0), error_lines(err1)
    assert "process 1 could not load the mnist data" in line0
    assert line1.startswith("trainer: error: [rank 1]") and str(tmp_path / "empty") in line1
    assert not (tmp_path / "mnist" / "metrics.jsonl").exists()


def test_one_process_resume_names_what_is_missing(run_main, tiny_data, tmp_path):
    assert main_in_process(tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "2")) == 0
    result = run_main(tiny_args(tiny_data, tmp_path, "--resume", str(tmp_path / "mnist" / "step_0000009")))
    assert result.returncode == 2 and "no such checkpoint folder" in result.stderr
