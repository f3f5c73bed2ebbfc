"""benchmarks/compare.py on the tiny data: every contender runs, the JSON and the table hold what
benchmarks/README.md says. Properties only: no timing is asserted. (The trainer's step loop has
no per-step host read: tests/test_engine.py checks that.)"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, TINY_TEST, reset_accelerate

sys.path.insert(0, str(REPO / "benchmarks"))
import compare  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def test_compare_runs_every_contender_and_writes_table_and_json(tiny_data, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--data-dir", str(tiny_data), "--device", "cpu", "--epochs", "1", "--rounds", "1", "--threads", "1"]
    # Every contender but the compiled ones (tests/test_threads_and_compile.py covers --compile).
    contenders = "baseline,trainer,bare,launched,trainer_bf16"
    assert compare.main([*args, "--contenders", contenders, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["complete"]
    runs = {name: rounds[0] for name, rounds in report["runs"].items()}
    assert set(runs) == set(contenders.split(",")) and all(r["complete"] for r in runs.values())
    epoch = {name: r["epochs"][0] for name, r in runs.items()}
    # The README's command, launched: it picks its own thread count (the cores), so its sums may
    # differ from the in-process trainer's (1 thread here) in the last digits, not more.
    launched, trainer = epoch["launched"], epoch["trainer"]
    assert launched["valid_seen"] == TINY_TEST and abs(launched["valid_correct"] - trainer["valid_correct"]) <= 2
    assert launched["train_loss"] == pytest.approx(trainer["train_loss"], rel=1e-3)
    assert epoch["trainer_bf16"]["valid_seen"] == TINY_TEST
    assert "launched / baseline, seconds per epoch" in table
    # The trainer counts every test image; the blog's loop drops the last partial batch of 512.
    assert epoch["trainer"]["valid_seen"] == epoch["bare"]["valid_seen"] == TINY_TEST
    assert epoch["baseline"]["valid_seen"] == TINY_TEST // 512 * 512
    # Same seed, weights, batches and precision on the CPU: the bare loop is the trainer's twin.
    for key in ("train_loss", "train_acc", "valid_correct"):
        assert epoch["trainer"][key] == epoch["bare"][key], key
    for name, e in epoch.items():  # 3 steps of 512: two intervals between optimizer steps
        if name != "launched":  # another process: no step clock
            assert 0 < e["fastest_step_ms"] <= e["step_ms_p10"]
    summary = report["summary"]
    assert {"trainer_over_baseline_epoch_s", "trainer_over_bare_step_loop", "trainer_over_baseline_step_p10"} <= set(
        summary["ratios"]
    )
    assert "fastest" in table and "trainer / baseline, 10th-percentile step" in table  # headers may wrap
    # --show prints the saved table again.
    assert compare.main(["--show", str(out)]) == 0
    assert "trainer / baseline, 10th-percentile step" in capsys.readouterr().out
