"""The default recipe gives the numbers recorded for it: every metric of a 1-epoch run on real MNIST
(the whole OneCycle schedule, 107 steps of the 55,000 training images left after the 5,000 held
out for validation, every validation image, and every test image once at the end).

oneDNN picks its convolution kernels (and so the order of its float sums) by the CPU, so the
numbers are recorded per CPU and torch version and compared at 1e-12 on a recorded one. On any
other CPU, what does not depend on that order (steps, samples, counts seen, the LR schedule) is
still compared exactly, and the rest within what two CPUs were seen to differ by (a few tenths
of a percent); the message gives the key to record the new CPU under."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from conftest import REPO

TIMING = {"epoch_time_s", "eval_time_s", "warmup_s", "train_samples_per_s", "test_time_s"}
ORDER_DEPENDENT = {"train_loss", "train_acc", "valid_loss", "valid_acc", "valid_correct", "test_loss", "test_acc",
                   "test_correct"}  # fmt: skip


def machine() -> str:
    """vendor, family and model from /proc/cpuinfo, torch's CPU capability, and torch's version."""
    info = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    cpu = f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    return f"{cpu} {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def test_the_mnist_recipe_gives_the_recorded_numbers(mnist_1_epoch):
    reference = json.loads((REPO / "tests" / "reference" / "mnist_1_epoch.json").read_text())
    records = [json.loads(line) for line in (mnist_1_epoch / "metrics.jsonl").read_text().splitlines()]
    here = machine()
    exact = here in reference["machines"]
    wanted = reference["machines"].get(here) or next(iter(reference["machines"].values()))
    assert len(records) == len(wanted) == 1
    for got, want in zip(records, wanted):
        assert {k for k in got if k not in TIMING} == set(want)
        for key, value in want.items():
            if exact or key not in ORDER_DEPENDENT:
                close = (
                    math.isclose(got[key], value, rel_tol=0, abs_tol=1e-12)
                    if isinstance(value, float)
                    else (got[key] == value)
                )
            elif key.endswith("_correct"):
                close = abs(got[key] - value) <= 40
            elif key.endswith("_acc"):
                close = abs(got[key] - value) <= 0.004
            else:  # losses
                close = math.isclose(got[key], value, rel_tol=0.1)
            assert close, (
                f"epoch {want['epoch']} {key}: {got[key]!r}, recorded {value!r} "
                f"({'this CPU' if exact else 'another CPU; record this one as ' + repr(here)})"
            )
