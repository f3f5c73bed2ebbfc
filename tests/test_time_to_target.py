"""benchmarks/time_to_target.py on the tiny data: both contenders run for every seed, the blog's loop
validates on the trainer's held-out images (all of them), the trainer's numbers are those of its
records, a target not reached is reported as such and counts as infinitely slow in the median.
Properties only: no timing is asserted."""

from __future__ import annotations

import hashlib
import json
import math
import sys

import pytest
import torch
from conftest import REPO, reset_accelerate

sys.path.insert(0, str(REPO / "benchmarks"))
import time_to_target as ttt  # noqa: E402

from trainer.data import hold_out, load_split  # noqa: E402
from trainer.selection import time_to_target  # noqa: E402

HELD_OUT = 256  # of the tiny data's 1,536 training images: 1,280 left, 2 steps of 512


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def run(tiny_data, tmp_path, *extra: str) -> dict:
    out = tmp_path / "ttt.json"
    args = ["--data-dir", str(tiny_data), "--device", "cpu", "--epochs", "2", "--threads", "1",
            "--val-split", str(HELD_OUT), "--json", str(out), *extra]  # fmt: skip
    assert ttt.main(args) == 0
    return json.loads(out.read_text())


def held_out_digest(tiny_data, seed: int) -> str:
    """The positions of the trainer's held-out images in the training split, found by their pixels
    (trainer.data.hold_out of the images themselves, not of positions as the benchmark does)."""
    split = load_split("mnist", tiny_data, train=True, download=False)
    position = {bytes(image.numpy()): i for i, image in enumerate(split.images)}
    assert len(position) == len(split)  # the generated images are all different
    _, valid = hold_out(split, HELD_OUT, seed)
    positions = torch.tensor([position[bytes(image.numpy())] for image in valid.images])
    return hashlib.sha256(positions.to(torch.int64).numpy().tobytes()).hexdigest()


def test_both_contenders_on_the_held_out_split_and_a_target_not_reached(tiny_data, tmp_path, capsys):
    report = run(tiny_data, tmp_path, "--seeds", "12,13", "--targets", "1.0,0.01")
    table = capsys.readouterr().out
    assert report["complete"] and report["schema_version"] == ttt.SCHEMA_VERSION
    for key in ("date", "cpu_model", "cpu_capability", "torch", "accelerate", "git_commit", "lscpu", "omp_num_threads"):
        assert key in report["machine"], key
    settings = report["settings"]
    assert settings["targets"] == [0.01, 1.0] and settings["seeds"] == [12, 13]  # sorted: the last one stops
    assert (settings["held_out"], settings["train_images"]) == (HELD_OUT, 1536 - HELD_OUT)
    runs = report["runs"]
    assert set(runs) == set(ttt.CONTENDERS)
    for name, results in runs.items():
        assert [r["seed"] for r in results] == [12, 13] and all(r["complete"] for r in results), name
    # The order rotates from seed to seed.
    assert [r["position"] for r in runs["trainer"]] == [0, 1] and [r["position"] for r in runs["blog"]] == [1, 0]
    for seed_index, seed in enumerate((12, 13)):
        trainer, blog = runs["trainer"][seed_index], runs["blog"][seed_index]
        # The same held-out images for both, those trainer.data.hold_out holds out for that seed.
        assert trainer["held_out"]["sha256"] == blog["held_out"]["sha256"] == held_out_digest(tiny_data, seed)
        assert trainer["train_images"] == blog["train_images"] == 1536 - HELD_OUT
        for r in (trainer, blog):
            assert r["threads"] == 1 and r["stop_at"] == "valid_acc>=1.0"
            # 1.0 is not reached in 2 epochs: both ran them all, and say so.
            assert len(r["epochs"]) == 2 and r["stopped"] is None
            assert r["targets"]["1.0"] == {"reached": False, "epochs_run": 2}
            for e in r["epochs"]:  # every held-out image, once; the training batches as the recipe's
                assert (e["valid_seen"], e["train_samples"]) == (HELD_OUT, 1024)
            # The lower target, from the prefix of the records up to the first that meets it.
            low = r["targets"]["0.01"]
            assert low["reached"] and low["epoch"] == 1
            took = time_to_target(r["epochs"][:1])
            derived = (low["train_s"], low["eval_s"], low["steps"], low["samples"])
            assert derived == tuple(took[f"target_{k}"] for k in ("train_s", "eval_s", "steps", "samples"))
            assert low["total_s"] == low["train_s"] + low["eval_s"] and (low["steps"], low["samples"]) == (2, 1024)
            assert low["valid_seen"] == HELD_OUT and low["valid_acc"] == pytest.approx(low["valid_correct"] / HELD_OUT)
        # The trainer's own records: warm-up in the first epoch, the test split scored once at the end.
        assert trainer["epochs"][0]["warmup_s"] > 0 and trainer["targets"]["0.01"]["train_s"] > 0
        assert trainer["epochs"][-1]["test_seen"] == 1001 and "target_steps" not in trainer["epochs"][-1]
        assert all(e["validation"] == "held-out" for e in trainer["epochs"])
        assert blog["epochs"][-1]["step"] == 4 and all(e["warmup_s"] == 0 for e in blog["epochs"])
    summary = report["summary"]
    for name in ttt.CONTENDERS:
        low, high = summary[name]["0.01"], summary[name]["1.0"]
        assert low["median_reached"] and low["reached"] == [12, 13] and low["median"]["epoch"] == 1
        assert not high["median_reached"] and high["reached"] == [] and high["median"]["total_s"] is None
    ratio = summary["ratio_trainer_over_blog"]
    assert ratio["1.0"] is None
    medians = [summary[name]["0.01"]["median"]["total_s"] for name in ("trainer", "blog")]
    assert ratio["0.01"] == medians[0] / medians[1]
    assert "not reached in 2" in table and "time to 1%, trainer / blog of the median total seconds" in table
    assert "time to 100%, trainer / blog: no ratio, the median of trainer and blog is not reached" in table


def test_the_runs_end_at_the_highest_target_and_the_trainer_records_what_it_took(tiny_data, tmp_path, capsys):
    report = run(tiny_data, tmp_path, "--seeds", "12", "--targets", "0.01,0.02")
    for name in ttt.CONTENDERS:
        (r,) = report["runs"][name]
        assert len(r["epochs"]) == 1 and r["stopped"] == "target valid_acc>=0.02 met", name
        assert r["targets"]["0.01"] == r["targets"]["0.02"]  # met by the same (first) evaluation
    (trainer,) = report["runs"]["trainer"]
    last, high = trainer["epochs"][-1], trainer["targets"]["0.02"]
    # The trainer's --stop-at wrote what reaching the target took into the record: the same numbers.
    assert (last["target_train_s"], last["target_eval_s"], last["target_steps"], last["target_samples"]) == (
        high["train_s"], high["eval_s"], high["steps"], high["samples"])  # fmt: skip
    assert last["test_seen"] == 1001  # scored once, on best, when the run ended (not part of the time)
    capsys.readouterr()
    assert ttt.main(["--show", str(tmp_path / "ttt.json")]) == 0
    assert "time to 2%, trainer / blog of the median total seconds" in capsys.readouterr().out


def test_a_seed_that_does_not_reach_a_target_is_infinitely_slow_in_the_median():
    def result(seed: int, total: float | None) -> dict:
        row = ({"reached": False, "epochs_run": 10} if total is None else
               {"reached": True, **dict.fromkeys(ttt.QUANTITIES, total)})  # fmt: skip
        return {"seed": seed, "complete": True, "targets": {"0.99": row}}

    runs = {"trainer": [result(12, 5.0), result(13, None), result(14, 7.0)],
            "blog": [result(12, None), result(13, 20.0), result(14, None)]}  # fmt: skip
    summary = ttt.summarise(runs, [0.99])
    assert summary["trainer"]["0.99"]["median"]["total_s"] == 7.0  # 5, 7, inf
    assert summary["trainer"]["0.99"]["reached"] == [12, 14]
    assert not summary["blog"]["0.99"]["median_reached"]  # 20, inf, inf
    assert summary["ratio_trainer_over_blog"]["0.99"] is None
    runs["blog"][0] = result(12, 14.0)
    summary = ttt.summarise(runs, [0.99])
    assert summary["ratio_trainer_over_blog"]["0.99"] == 7.0 / 20.0  # 14, 20, inf
    # An even number of seeds with one not reached: the median is the mean of a number and infinity.
    assert ttt.summarise({"trainer": runs["trainer"][:2]}, [0.99])["trainer"]["0.99"]["median"]["epoch"] is None
    assert not math.isnan(ttt.summarise(runs, [0.99])["trainer"]["0.99"]["median"]["steps"])


def test_refuses_targets_out_of_range_and_no_held_out_images(tiny_data, capsys):
    args = ["--data-dir", str(tiny_data), "--device", "cpu"]
    for extra in (["--targets", "0.99,1.5"], ["--val-split", "0"], ["--seeds", "12,12"]):
        with pytest.raises(SystemExit) as exc:
            ttt.main([*args, *extra])
        assert exc.value.code == 2
    assert "--val-split must hold images out" in capsys.readouterr().err
