"""The Trainer in-process: the blog's network, a loop without per-step host syncs, real MNIST."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reset_accelerate

from trainer import TrainConfig, Trainer
from trainer.config import MODEL_NAMES
from trainer.model import MODELS, build_model


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def test_blog_network_shapes():
    model = build_model("blog_resnet")
    convs = [(m.in_channels, m.out_channels, m.stride[0]) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [
        (1, 8, 2), (8, 8, 1), (8, 8, 1),
        (8, 16, 2), (16, 16, 1), (16, 16, 1),
        (16, 32, 2), (32, 32, 1), (32, 32, 1),
        (32, 16, 2), (16, 10, 2),
    ]  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == 36_460
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert set(MODEL_NAMES) == set(MODELS)


def tiny_config(tiny_data, tmp_path, **kw) -> TrainConfig:
    values = dict(data_dir=str(tiny_data), output_dir=str(tmp_path), batch_size=64, eval_batch_size=128, epochs=1,
                  cpu=True, progress="plain", val_split=0)  # fmt: skip
    return TrainConfig(**{**values, **kw})


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_is_used_when_set(tiny_data, tmp_path, channels_last):
    trainer = Trainer(tiny_config(tiny_data, tmp_path, channels_last=channels_last))
    conv = trainer.accelerator.unwrap_model(trainer.model)[1].conv1.weight  # 8 in-channels: layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize(
    "device, flags, channels_last",
    [("cuda", set(), True), ("mps", set(), False), ("cpu", {"avx2", "avx512f", "amx_bf16"}, False),
     ("cpu", {"avx2", "avx512f"}, False), ("cpu", {"avx2", "fma"}, True)],
    ids=["cuda", "mps", "xeon-amx", "avx512", "avx2"],
)  # fmt: skip
def test_the_memory_format_follows_the_device_by_one_rule(tiny_data, tmp_path, monkeypatch, device, flags,
                                                           channels_last):  # fmt: skip
    """The same answer every time for a device (no timing at start-up), shown in the summary with
    its reason, and a flag overrides it."""
    from trainer import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: ("GenuineIntel", flags))
    chosen = runtime.device_defaults(torch.device(device))
    assert chosen["channels_last"] is channels_last and chosen["why"]
    if device == "cpu":
        trainer = Trainer(tiny_config(tiny_data, tmp_path))
        conv = trainer.accelerator.unwrap_model(trainer.model)[1].conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) is channels_last
        trainer.close()


def test_the_summary_says_which_memory_format_and_why(run_main, tiny_data, tmp_path):
    from trainer import runtime

    expected = runtime.device_defaults(torch.device("cpu"))
    args = ["--data-dir", str(tiny_data), "--val-split", "0", "--output-dir", str(tmp_path), "--epochs", "1",
            "--limit-train-batches", "1", "--progress", "plain"]  # fmt: skip
    result = run_main([*args, "--run-name", "auto"])
    assert f"memory format: {'channels_last' if expected['channels_last'] else 'contiguous'} ({expected['why']})" in (
        result.stdout
    )
    assert "memory format: contiguous (--no-channels-last)" in run_main([*args, "--run-name", "off",
                                                                        "--no-channels-last"]).stdout  # fmt: skip


def test_training_step_has_no_per_step_host_sync(tiny_data, tmp_path, monkeypatch):
    """`.item()` / `.tolist()` calls in an epoch do not grow with its number of steps."""
    counts = {}
    for steps in (3, 9):
        reset_accelerate()
        trainer = Trainer(tiny_config(tiny_data, tmp_path / str(steps), limit_train_batches=steps))
        calls = {"n": 0}
        real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

        def item(self, real=real_item, calls=calls):
            calls["n"] += 1
            return real(self)

        def tolist(self, real=real_tolist, calls=calls):
            calls["n"] += 1
            return real(self)

        monkeypatch.setattr(torch.Tensor, "item", item)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        result = trainer.train_epoch()
        monkeypatch.undo()
        assert result["samples"] == steps * 64
        counts[steps] = calls["n"]
    assert counts[3] == counts[9]


def test_evaluate_returns_exact_counts_and_confusion(tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path, eval_batch_size=100))
    result = trainer.evaluate()
    assert result.seen == 1001 and result.confusion.shape == (10, 10)
    assert result.correct == int(result.confusion.trace()) and 0 <= result.accuracy <= 1
    assert (
        result.confusion.sum(dim=1).tolist()
        == torch.bincount(trainer.eval_loader.dataset.labels, minlength=10).tolist()
    )


@pytest.mark.slow
def test_real_mnist_run_counts_every_image_once(mnist_1_epoch):
    """The default recipe for 1 epoch on real MNIST (the run the reference and photo tests share):
    107 whole batches of the 55,000 training images left after the 5,000 held out for validation,
    every one of the held-out images and, once at the end, of the 10,000 test images counted once,
    and an accuracy no broken pipeline reaches, whatever tests/reference records (the 10-epoch
    recipe is in docs/RESULTS.md)."""
    (last,) = [json.loads(line) for line in (mnist_1_epoch / "metrics.jsonl").read_text().splitlines()]
    assert last["train_samples"] == 55_000 // 512 * 512 and last["validation"] == "held-out"
    assert (last["valid_seen"], last["test_seen"], last["test_epoch"]) == (5_000, 10_000, 1)
    assert last["valid_acc"] >= 0.97 and last["test_acc"] >= 0.97, last


def test_the_epoch_table_fits_an_80_column_terminal_and_keeps_its_columns_aligned():
    import io

    from rich.console import Console

    from trainer.console import Reporter

    out = io.StringIO()
    reporter = Reporter(True, "bar")
    reporter.console = Console(file=out, width=80, force_terminal=True, color_system=None)
    rows = [
        {"epoch": 1, "step": 117, "train_loss": 0.1234, "train_acc": 0.9, "valid_loss": 0.5, "valid_acc": 0.97,
         "valid_correct": 9700, "valid_seen": 10000, "lr": 0.5, "epoch_time_s": 5.2, "train_samples_per_s": 11520.0},
        {"epoch": 10, "step": 1170, "train_loss": 12.5, "train_acc": 0.99, "valid_loss": 123.25, "valid_acc": 0.9933,
         "valid_correct": 9933, "valid_seen": 10000, "lr": 6.49e-05, "epoch_time_s": 1234.5,
         "train_samples_per_s": 188000.0},
    ]  # fmt: skip
    for row in rows:
        reporter.epoch_row(row)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines), lines
    assert len({len(line) for line in lines}) == 1, lines  # wide values do not shift the columns
    header = lines[0].split()
    assert {"epoch", "acc", "correct/seen"} <= set(header)
    assert "6.49e-05" in lines[2] or "lr" not in header
