"""`--model stall:blog_resnet`: the blog's network, which at the training step $STALL_AT_STEP (its
forward pass, counted from 1) creates $STALL_DIR/reached and waits for $STALL_DIR/go. Tests stop a
run in the middle of a chosen step this way, whatever the machine's speed.

A requeued Slurm job starts again with $SLURM_RESTART_COUNT = 1, 2, ...: $STALL_AT_STEP may list a
step for each start ("15,27"), and start K > 0 uses reached-K and go-K. A start past the list does
not stall. In a Slurm job array, only task 0 stalls."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from trainer.model import blog_resnet as _blog_resnet


def blog_resnet(num_classes: int, in_channels: int) -> nn.Module:
    model = _blog_resnet(num_classes, in_channels)
    start = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    steps = os.environ.get("STALL_AT_STEP", "0").split(",")
    at = int(steps[start]) if start < len(steps) and os.environ.get("SLURM_ARRAY_TASK_ID", "0") == "0" else 0
    folder, suffix, calls = Path(os.environ.get("STALL_DIR", ".")), f"-{start}" if start else "", [0]

    def wait_at_the_chosen_step(module: nn.Module, inputs: object) -> None:
        if module.training:
            calls[0] += 1
            if calls[0] == at:
                (folder / f"reached{suffix}").touch()
                while not (folder / f"go{suffix}").exists():
                    time.sleep(0.01)

    model.register_forward_pre_hook(wait_at_the_chosen_step)
    return model
