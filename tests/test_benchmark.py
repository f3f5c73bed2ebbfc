"""benchmarks/compare.py on the tiny data: every contender runs, the flags reach both trainer
contenders, and the JSON and the table hold what benchmarks/README.md says. Properties only: no
timing is asserted. (The trainer's step loop has no per-step host read: tests/test_engine.py checks that.)"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from conftest import REPO, TINY_TEST, TINY_TRAIN, reset_accelerate

sys.path.insert(0, str(REPO / "benchmarks"))
import compare  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def test_compare_runs_every_contender_and_writes_table_and_json(tiny_data, tmp_path, capsys):
    """One invocation runs all three (the launched one is two interpreters): a precision flag, which
    reaches both trainer contenders, and no memory-format flag, so that both follow the device's
    rule (runtime.device_defaults) and say so. (Before, the in-process one got --channels-last and
    the launched one the device's rule.)"""
    from trainer import runtime

    out = tmp_path / "bench.json"
    args = ["--data-dir", str(tiny_data), "--device", "cpu", "--epochs", "1", "--rounds", "1", "--threads", "1"]
    assert compare.main([*args, "--mixed-precision", "bf16", "--json", str(out)]) == 0  # to the trainers only
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["complete"] and report["schema_version"] == compare.SCHEMA_VERSION
    machine = report["machine"]
    for key in ("date", "cpu_model", "cpu_vendor", "cpu_count", "cpu_capability", "torch", "accelerate"):
        assert machine[key], key
    settings = report["settings"]
    assert (settings["mixed_precision"], settings["channels_last"], settings["compile"]) == ("bf16", None, False)
    runs = {name: rounds[0] for name, rounds in report["runs"].items()}
    assert set(runs) == set(compare.CONTENDERS) and all(r["complete"] and r["threads"] == 1 for r in runs.values())
    epoch = {name: r["epochs"][0] for name, r in runs.items()}
    # The README's command, launched with the same flags and threads: the in-process trainer's twin.
    command = runs["launched"]["command"]
    assert "--mixed-precision" in command and not {"--channels-last", "--no-channels-last"} & set(command)
    rule = runtime.device_defaults(torch.device("cpu"))
    expected = ("bf16", "no", "channels_last" if rule["channels_last"] else "contiguous", rule["why"])
    keys = ("precision", "compile", "memory_format", "memory_format_why")
    assert tuple(runs["trainer"][k] for k in keys) == tuple(runs["launched"][k] for k in keys) == expected
    launched, trainer, baseline = epoch["launched"], epoch["trainer"], epoch["baseline"]
    assert launched["mixed_precision"] == trainer["mixed_precision"] == "bf16"
    for key in ("train_loss", "train_acc", "valid_correct"):
        assert launched[key] == pytest.approx(trainer[key], rel=1e-6), key
    # The blog's loop stays as the post wrote it (fp32); it drops the last partial batch of 512,
    # the trainer counts every test image.
    assert baseline["mixed_precision"] == "no" and baseline["valid_seen"] == TINY_TEST // 512 * 512
    assert trainer["valid_seen"] == launched["valid_seen"] == TINY_TEST
    for e in epoch.values():
        assert e["train_samples"] == TINY_TRAIN // 512 * 512
        assert e["epoch_s"] == pytest.approx(e["epoch_time_s"] + e["eval_time_s"])
    summary = report["summary"]
    assert summary["baseline"]["x_baseline"]["per_round"] == [1.0]
    for name in ("trainer", "launched"):
        assert len(summary[name]["x_baseline"]["per_round"]) == 1
        assert f"{name} / baseline, seconds per epoch" in table
        assert f"{name} ran: precision bf16, compile no, memory format {expected[2]} ({rule['why']})" in table
    assert "x baseline" in table and "precision bf16" in table and "memory format by the device's rule" in table
    # --show prints the saved table again.
    assert compare.main(["--show", str(out)]) == 0
    assert "launched / baseline, seconds per epoch" in capsys.readouterr().out


def test_compare_refuses_fp16_on_the_cpu_and_unknown_contenders(tiny_data, capsys):
    args = ["--data-dir", str(tiny_data), "--device", "cpu"]
    for extra in (["--mixed-precision", "fp16"], ["--contenders", "baseline,bare"]):
        with pytest.raises(SystemExit) as exc:
            compare.main([*args, *extra])
        assert exc.value.code == 2
    assert "unknown contender(s) bare" in capsys.readouterr().err


def test_a_memory_format_flag_or_none_reaches_both_trainer_contenders_alike(tiny_data, tmp_path, capsys):
    """--no-channels-last reaches the in-process trainer (run here: it is cheap) and the launched
    command, which the trainer's own parser reads as the same settings; with no flag, the launched
    command names none, and gets the precision of the README's launch config ("no", the in-process
    default) and the device's memory format. The launched command itself runs in the test above."""
    from accelerate.commands.config.config_args import load_config_from_file

    from trainer.cli import parse_config

    out = tmp_path / "bench.json"
    args = ["--data-dir", str(tiny_data), "--device", "cpu", "--epochs", "1", "--rounds", "1", "--threads", "1"]
    assert compare.main([*args, "--contenders", "trainer", "--no-channels-last", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["settings"]["mixed_precision"], report["settings"]["channels_last"]) == ("no", False)
    keys = ("precision", "compile", "memory_format", "memory_format_why")
    ran = report["runs"]["trainer"][0]
    assert tuple(ran[k] for k in keys) == ("no", "no", "contiguous", "--no-channels-last")
    assert ran["epochs"][0]["mixed_precision"] == "no"
    assert "trainer ran: precision no, compile no, memory format contiguous (--no-channels-last)" in table
    assert "memory format --no-channels-last" in table
    launch_config = load_config_from_file(str(REPO / compare.LAUNCH_CONFIG))  # what accelerate launch hands on
    settings = compare.Settings(str(tiny_data), "cpu", 1, "no", False, None, 1)
    for precision, channels_last, flag in (("no", None, set()), ("no", False, {"--no-channels-last"}),
                                           ("bf16", True, {"--channels-last"})):  # fmt: skip
        s = dataclasses.replace(settings, mixed_precision=precision, channels_last=channels_last)
        command = compare.launch_command(s, str(tmp_path))
        assert {"--channels-last", "--no-channels-last"} & set(command) == flag
        config = parse_config(command[command.index("trainer") + 1 :])
        assert (config.mixed_precision or launch_config.mixed_precision, config.channels_last) == (
            precision,
            channels_last,
        )
        assert (config.threads, config.epochs, config.compile) == (1, 1, False)
