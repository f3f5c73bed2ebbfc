"""Recipes beyond the blog's (AdamW, weight decay, cosine with warm-up, gradient accumulation and
clipping, label smoothing, EMA, augmentation) with every guarantee kept: bitwise resume on 1 and 2
processes, exact schedules, exact counts, and accumulation that equals the larger batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fork_processes, fork_trainer, main_in_process, reset_accelerate, tiny_args
from PIL import Image
from safetensors.torch import load_file
from test_library import BATCH, N_EVAL, config, make_mlp, vectors
from test_resume import assert_same_run, branch

from trainer import Trainer, evaluate, predict
from trainer import checkpoint as ckpt
from trainer.data import load_split
from trainer.recipe import augment

EVERY_KNOB = ["--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.05", "--betas", "0.9,0.99",
              "--schedule", "cosine", "--warmup-steps", "3", "--grad-accum", "2", "--clip-grad-norm", "1.0",
              "--label-smoothing", "0.1", "--ema", "0.9", "--augment"]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def every_knob_1proc(tiny_data, tmp_path_factory) -> Path:
    """3 epochs of 12 optimizer steps (2 micro-batches of 64 each), a checkpoint every 5 steps, all kept."""
    out = tmp_path_factory.mktemp("knobs1")
    args = tiny_args(tiny_data, out, "--epochs", "3", "--save-every", "5", "--keep-last", "100", *EVERY_KNOB)
    assert main_in_process(args) == 0
    return out / "mnist"


@pytest.mark.parametrize("step", [15, 24], ids=["mid-epoch", "epoch-boundary"])
def test_every_knob_at_once_resumes_bitwise_on_one_process(run_main, tiny_data, tmp_path, every_knob_1proc, step):
    result = run_main(["--data-dir", str(tiny_data), "--progress", "plain",
                       *branch(every_knob_1proc, step, tmp_path, "resumed")])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_run(every_knob_1proc, tmp_path / "resumed")
    last = sorted((tmp_path / "resumed").glob("step_*"))[-1]
    a, b = load_file(last / ckpt.EMA_NAME), load_file(sorted(every_knob_1proc.glob("step_*"))[-1] / ckpt.EMA_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()  # the EMA too, buffers included
    assert read_jsonl(tmp_path / "resumed" / "metrics.jsonl") == read_jsonl(every_knob_1proc / "metrics.jsonl") or (
        [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k and k != "warmup_s"}
         for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
        == [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k and k != "warmup_s"}
            for r in read_jsonl(every_knob_1proc / "metrics.jsonl")]
    )  # fmt: skip


@pytest.mark.slow
def test_every_knob_at_once_resumes_bitwise_on_two_processes(tiny_data, tmp_path):
    """2 gloo processes: 6 optimizer steps per epoch (2 x 2 micro-batches of 64); resumed mid-epoch."""
    args = tiny_args(tiny_data, tmp_path, "--epochs", "2", "--save-every", "4", "--keep-last", "100", *EVERY_KNOB)
    unbroken = fork_trainer(args, nproc=2)
    assert unbroken.returncode == 0, unbroken.stderr
    run = tmp_path / "mnist"
    resumed = fork_trainer(["--data-dir", str(tiny_data), "--progress", "plain", *branch(run, 8, tmp_path, "again")],
                           nproc=2)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, tmp_path / "again")
    assert "global batch: 256 (64 per process x 2 processes x 2 micro-batches)" in unbroken.stdout
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [6, 12] and all(r["valid_seen"] == 1001 for r in rows)


def test_the_knobs_are_recorded_and_checked_on_resume(run_main, every_knob_1proc, tiny_data, tmp_path):
    rows = read_jsonl(every_knob_1proc / "metrics.jsonl")
    assert [r["step"] for r in rows] == [12, 24, 36]  # 1536 // (64 x 2) optimizer steps per epoch
    assert all(r["train_samples"] == 1536 and r["valid_seen"] == 1001 for r in rows)
    assert all(0 < r["grad_norm_mean"] <= r["grad_norm_max"] for r in rows)
    assert all({"valid_acc_ema", "valid_loss_ema", "valid_correct_ema"} <= set(r) for r in rows)
    best = max(rows, key=lambda r: r["valid_acc_ema"])  # best follows the weights evaluate uses: the EMA's
    assert (every_knob_1proc / "best").resolve().name == f"step_{best['step']:07d}"
    state = json.loads((ckpt.find_latest(every_knob_1proc) / "state.json").read_text())
    assert state["config"]["optimizer"] == "adamw" and state["config"]["grad_accum"] == 2
    changed = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--grad-accum", "1",
                        *branch(every_knob_1proc, 15, tmp_path, "other")])  # fmt: skip
    assert changed.returncode == 2 and "grad_accum=2, this run has grad_accum=1" in changed.stderr


def test_evaluate_and_predict_use_the_ema_weights_and_say_so(every_knob_1proc, tiny_data, tmp_path, capsys):
    reset_accelerate()
    assert evaluate.main([str(every_knob_1proc), "--data-dir", str(tiny_data), "--cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    best = [r for r in read_jsonl(every_knob_1proc / "metrics.jsonl") if r["step"] == summary["step"]][0]
    assert summary["weights"] == "EMA" and summary["correct"] == best["valid_correct_ema"]
    reset_accelerate()
    assert evaluate.main([str(every_knob_1proc), "--data-dir", str(tiny_data), "--cpu"]) == 0
    assert "its EMA weights" in capsys.readouterr().out
    reset_accelerate()
    digit = tmp_path / "digit.png"
    Image.fromarray(load_split("mnist", tiny_data, train=False).images[0].numpy()).save(digit)
    assert predict.main([str(every_knob_1proc), str(digit), "--cpu"]) == 0
    assert "its EMA weights" in capsys.readouterr().out.splitlines()[0]


def test_the_cosine_schedule_warms_up_and_ends_on_the_last_step(every_knob_1proc):
    lrs = [lr for c in read_jsonl(every_knob_1proc / "curves.jsonl") for lr in c["lr"]]
    assert len(lrs) == 36
    assert lrs[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01], rel=1e-12)  # linear warm-up over 3 steps
    assert lrs[-1] == 0.0 and all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[20] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 17 / 32)), rel=1e-12)


@pytest.mark.slow
def test_the_cosine_schedule_ends_on_the_last_step_on_two_processes(tiny_data, tmp_path):
    args = tiny_args(tiny_data, tmp_path, "--epochs", "2", "--schedule", "cosine", "--warmup-steps", "2")
    assert fork_trainer(args, nproc=2).returncode == 0
    lrs = [lr for c in read_jsonl(tmp_path / "mnist" / "curves.jsonl") for lr in c["lr"]]
    assert len(lrs) == 24 and lrs[0] == pytest.approx(0.25) and lrs[1] == 0.5 and lrs[-1] == 0.0


def one_step(out: Path, name: str, batch: int, accum: int, weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """One optimizer step of SGD on the test's MLP (no batch-dependent layers); its weights."""
    reset_accelerate()
    cfg = config(out, name, epochs=1, batch_size=batch, grad_accum=accum, limit_train_batches=2, lr=0.5,
                 weight_decay=weight_decay)  # fmt: skip
    Trainer(cfg, model=make_mlp(), train_data=vectors(), eval_data=vectors(N_EVAL, seed=2)).fit()
    return load_file(ckpt.find_latest(out / name) / "model.safetensors")


def test_k_micro_batches_of_b_make_the_update_of_one_batch_of_k_times_b(tmp_path):
    whole = one_step(tmp_path, "whole", batch=4 * BATCH, accum=1, weight_decay=0.01)
    accumulated = one_step(tmp_path, "accumulated", batch=BATCH, accum=4, weight_decay=0.01)
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=1e-5, atol=1e-6)
    # Negative control: without the division by K the update is K times as large.
    other = one_step(tmp_path, "one-micro-batch", batch=BATCH, accum=1, weight_decay=0.01)
    assert any(not torch.allclose(other[k], whole[k], rtol=1e-4, atol=1e-5) for k in whole)


def count_all_reduces(args: list[str]) -> int:
    """In each forked process: a 2-epoch run of the MLP; DDP's all-reduces counted by a comm hook."""
    import torch.distributed as dist

    accum = int(args[1])
    trainer = Trainer(config(Path(args[0]), f"accum{accum}", epochs=2, batch_size=BATCH // accum, grad_accum=accum),
                      model=make_mlp(), train_data=vectors(), eval_data=vectors(N_EVAL, seed=2))  # fmt: skip
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    trainer.model.register_comm_hook(None, counting_hook)
    trainer.fit()
    steps = json.loads((Path(args[0]) / f"accum{accum}" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    Path(args[0], f"calls{accum}.{dist.get_rank()}").write_text(f"{len(calls)} {steps}")
    return 0


@pytest.mark.slow
def test_the_micro_batches_that_do_not_step_do_not_all_reduce(tmp_path):
    for accum in (1, 4):
        forked = fork_processes([str(tmp_path), str(accum)], nproc=2, target=count_all_reduces)
        assert forked.wait(300).codes == [0, 0], forked.read(0) + forked.read(1)
    for rank in (0, 1):
        calls1, steps1 = map(int, (tmp_path / f"calls1.{rank}").read_text().split())
        calls4, steps4 = map(int, (tmp_path / f"calls4.{rank}").read_text().split())
        assert steps1 == steps4 == 2 * 16  # the same optimizer steps, 4 micro-batches each with --grad-accum 4
        assert calls1 == calls4 == steps1  # one bucket, one all-reduce per optimizer step: none per micro-batch


def test_augmentation_shifts_and_flips_each_sample_as_drawn():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    draws = torch.tensor([[1, -1, 0], [0, 0, 1]])  # sample 0: down 1 and left 1; sample 1: flipped only
    out = augment(images, draws, pad=1)
    expected0 = torch.zeros(4, 4)
    expected0[1:, :3] = images[0, 0, :3, 1:]
    assert torch.equal(out[0, 0], expected0)
    assert torch.equal(out[1, 0], images[1, 0].flip(1))
    cl = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(augment(cl, draws, pad=1), out)  # any memory format


def test_the_start_up_summary_counts_the_accumulated_micro_batches_in_the_global_batch(run_main, tiny_data, tmp_path):
    short = ["--epochs", "1", "--limit-train-batches", "1", "--limit-eval-batches", "1"]
    result = run_main(tiny_args(tiny_data, tmp_path / "k2", *short, "--grad-accum", "2"))
    assert result.returncode == 0, result.stderr
    assert "global batch: 128 (64 per process x 1 process x 2 micro-batches) | steps/epoch: 1" in result.stdout
    plain = run_main(tiny_args(tiny_data, tmp_path / "k1", *short))
    assert "global batch: 64 (64 per process x 1 process) |" in plain.stdout


@pytest.mark.parametrize(
    "flags, fragment",
    [(["--betas", "0.9,0.99"], "--betas belong to --optimizer adamw"),
     (["--optimizer", "adamw", "--betas", "0.9"], "--betas must be two numbers"),
     (["--warmup-steps", "5"], "--warmup-steps is for --schedule cosine"),
     (["--grad-accum", "0"], "--grad-accum must be at least 1"),
     (["--clip-grad-norm", "0"], "--clip-grad-norm must be a positive number"),
     (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
     (["--ema", "1.5"], "--ema must be a decay in (0, 1)"),
     (["--grad-accum", "30"], "fewer than one step needs (64 per process x 1 process x 30 micro-batches)")],
)  # fmt: skip
def test_a_bad_knob_is_one_line(run_main, tiny_data, tmp_path, flags, fragment):
    result = run_main(tiny_args(tiny_data, tmp_path, *flags))
    assert result.returncode == 2 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_ema_decay_warms_up_so_the_average_forgets_the_initial_weights():
    from trainer.recipe import new_ema

    model = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(model.weight)
    ema = new_ema(model, decay=0.999)
    torch.nn.init.ones_(model.weight)
    for _ in range(20):
        ema.update_parameters(model)
    # With a constant 0.999 the average would still be 98% the zeros it started from.
    assert ema.module.weight.min() > 0.6
