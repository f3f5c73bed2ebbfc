"""A briefly trained run on the tiny data, made once per test session and shared by the test files
that need real weights (evaluate, predict, plot): training it costs more than all their tests."""

from __future__ import annotations

from pathlib import Path

from conftest import reset_accelerate


def trained_tiny_run(data_dir: Path, base: Path) -> Path:
    """The run folder (`step_*` checkpoints, `best`, metrics.jsonl, curves.jsonl) of 2 epochs on `data_dir`."""
    run = base / "tiny_run" / "mnist"
    if not (run / "best").exists():  # the first test file that asks trains it, in this process
        from trainer import TrainConfig, Trainer

        config = TrainConfig(
            data_dir=str(data_dir),
            output_dir=str(run.parent),
            batch_size=64,
            eval_batch_size=128,
            epochs=2,
            cpu=True,
            progress="plain",
        )
        reset_accelerate()
        Trainer(config).fit()
        reset_accelerate()  # the tests' own Accelerators may use other settings
    return run
