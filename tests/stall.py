"""`--model stall:blog_resnet`: the blog's network, which at the training step $STALL_AT_STEP (its
forward pass, counted from 1) creates $STALL_DIR/reached and waits for $STALL_DIR/go. Tests stop a
run in the middle of a chosen step this way, whatever the machine's speed. A requeued Slurm job
($SLURM_RESTART_COUNT > 0) does not stall again."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from trainer.model import blog_resnet as _blog_resnet


def blog_resnet(num_classes: int, in_channels: int) -> nn.Module:
    model = _blog_resnet(num_classes, in_channels)
    at, folder, calls = int(os.environ.get("STALL_AT_STEP", "0")), Path(os.environ.get("STALL_DIR", ".")), [0]
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        at = 0

    def wait_at_the_chosen_step(module: nn.Module, inputs: object) -> None:
        if module.training:
            calls[0] += 1
            if calls[0] == at:
                (folder / "reached").touch()
                while not (folder / "go").exists():
                    time.sleep(0.01)

    model.register_forward_pre_hook(wait_at_the_chosen_step)
    return model
