"""What a new user hit in their first days (issue 25), each tried the way it was found."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_TEST, cli_env, reset_accelerate, tiny_args
from test_library import N_EVAL, config, make_mlp, vectors

from trainer import Trainer, evaluate, runtime
from trainer import checkpoint as ckpt
from trainer.config import ConfigError


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("trainer: error:"), result.stderr
    return lines[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SHORT = ("--epochs", "1", "--limit-train-batches", "2")


def test_a_misspelled_precision_in_the_environment_is_normalised_or_refused(run_main, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "BF16")
    result = run_main(tiny_args(tiny_data, tmp_path, *SHORT, "--run-name", "upper"))
    assert result.returncode == 0, result.stderr
    assert "precision: bf16" in result.stdout
    assert read_jsonl(tmp_path / "upper" / "metrics.jsonl")[0]["mixed_precision"] == "bf16"
    for value in ("bfloat16", "yes"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", value)
        line = one_line_error(run_main(tiny_args(tiny_data, tmp_path, *SHORT, "--run-name", value)))
        assert f"ACCELERATE_MIXED_PRECISION='{value}'" in line and "no, fp16, bf16" in line
        assert not (tmp_path / value).exists()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "FP16")
    assert "fp16 mixed precision needs a GPU" in one_line_error(run_main(tiny_args(tiny_data, tmp_path, *SHORT)))

    # An fp32 run resumed under =BF16 is refused; the advice it gives is a flag the parser takes.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    args = tiny_args(tiny_data, tmp_path, "--epochs", "2", "--limit-train-batches", "2", "--run-name", "fp32")
    assert run_main(args).returncode == 0
    ckpt.discard(tmp_path / "fp32" / "step_0000004")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "BF16")
    line = one_line_error(run_main([*args, "--resume", "latest"]))
    assert "--mixed-precision bf16" in line
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert run_main([*args, "--resume", "latest", "--mixed-precision", "BF16"]).returncode == 0


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--seed", "-5"], "--seed must be in 0..4294967295, got -5"),
        (["--seed", "4294967296"], "--seed must be in 0..4294967295"),
        (["--image-size", "32"], "--image-size applies to images decoded from files"),
        (["--compile-mode", "max-autotune"], "--compile-mode needs --compile"),
    ],
)
def test_values_that_would_fail_late_or_be_ignored_are_one_line(run_main, tiny_data, tmp_path, flags, fragment):
    assert fragment in one_line_error(run_main(tiny_args(tiny_data, tmp_path, *flags)))
    assert not (tmp_path / "mnist").exists()


def test_more_threads_than_cores_are_warned_about(run_main, tiny_data, tmp_path):
    threads = runtime.cores() + 1  # one too many is enough (64 on 2 cores spin for seconds)
    result = run_main(tiny_args(tiny_data, tmp_path, *SHORT, "--limit-eval-batches", "1", "--threads", str(threads)))
    assert result.returncode == 0
    assert f"{threads} threads (--threads) for the" in result.stderr and "wait on each other" in result.stderr


def test_the_library_says_what_to_do_in_python(tmp_path):
    reset_accelerate()
    Trainer(config(tmp_path, "mine", epochs=1), model=make_mlp(), train_data=vectors(),
            eval_data=vectors(N_EVAL, seed=2)).fit()  # fmt: skip
    reset_accelerate()
    with pytest.raises(ConfigError, match=r'TrainConfig\(resume="latest"\) to continue it, or another run_name'):
        Trainer(config(tmp_path, "mine", epochs=1), model=make_mlp(), train_data=vectors(),
                eval_data=vectors(N_EVAL, seed=2))  # fmt: skip
    reset_accelerate()
    with pytest.raises(ConfigError, match="init_from= starts a new run from its weights"):
        Trainer(config(tmp_path, "mine", epochs=3, resume="latest"), model=make_mlp(), train_data=vectors(),
                eval_data=vectors(N_EVAL, seed=2))  # fmt: skip


def test_a_refused_resume_writes_nothing(run_main, tiny_data, tmp_path):
    """A branch refused on its recipe leaves no run folder, and refuses before reading any data."""
    assert run_main(tiny_args(tiny_data, tmp_path, *SHORT)).returncode == 0
    latest = ckpt.find_latest(tmp_path / "mnist")
    shutil.rmtree(tiny_data.parent / "no-data", ignore_errors=True)
    refused = run_main(["--data-dir", str(tmp_path / "no-data"), "--progress", "plain", "--resume", str(latest),
                        "--run-name", "more", "--epochs", "4"])  # fmt: skip
    line = one_line_error(refused)
    assert "epochs=1, this run has epochs=4" in line and "--init-from" in line  # not "data not found"
    assert not (tmp_path / "more").exists()


def test_one_step_epochs_report_no_made_up_throughput(run_main, tiny_data, tmp_path):
    result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "2", "--limit-train-batches", "1"))
    assert result.returncode == 0, result.stderr
    first, second = read_jsonl(tmp_path / "mnist" / "metrics.jsonl")
    assert first["train_samples_per_s"] is None  # its only step was the warm-up
    assert second["train_samples_per_s"] > 0


def test_a_finished_run_ends_with_a_summary(run_main, tiny_data, tmp_path):
    result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "3"))
    assert result.returncode == 0, result.stderr
    best = tmp_path / "mnist" / "best"
    lines = result.stdout.splitlines()
    assert lines[-3].startswith("done: 1 epoch in ") and f"after epoch 1: {best}" in lines[-3]
    assert lines[-2] == f"evaluate: python -m trainer.evaluate {best}"
    assert lines[-1] == f"predict:  python -m trainer.predict {best} IMAGE..."
    again = run_main([*tiny_args(tiny_data, tmp_path, "--epochs", "1"), "--resume", "latest"])
    assert f"run already complete (1 epoch): {tmp_path / 'mnist'}" in again.stdout
    assert "bitwise" not in again.stderr


def test_evaluate_needs_only_the_test_split_and_never_downloads(tiny_run, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRAINER_OFFLINE", raising=False)  # a download would be allowed: it must not be tried
    only_test = tmp_path / "data" / "MNIST" / "raw"
    only_test.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(tiny_data / "MNIST" / "raw" / name, only_test / name)
    reset_accelerate()
    assert evaluate.main([str(tiny_run), "--data-dir", str(tmp_path / "data"), "--cpu", "--json"]) == 0  # a run folder
    summary = json.loads(capsys.readouterr().out)
    assert summary["seen"] == TINY_TEST and summary["checkpoint"] == str(
        (tiny_run / "best").resolve() / "model.safetensors"
    )

    copied = tmp_path / "elsewhere" / "model.safetensors"  # no run folder beside it, no data
    copied.parent.mkdir()
    shutil.copy(tiny_run / "best" / "model.safetensors", copied)
    monkeypatch.chdir(tmp_path / "elsewhere")
    reset_accelerate()
    monkeypatch.setattr("torchvision.datasets.MNIST", lambda *a, **k: pytest.fail("evaluate tried to download"))
    assert evaluate.main([str(copied), "--cpu"]) == 2
    err = capsys.readouterr().err
    files = "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (or each .gz)"
    assert f"not found and not downloaded: put {files} in data/MNIST/raw" in err


def test_evaluate_help_shows_each_default_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse's width, whatever terminal runs the tests
    with pytest.raises(SystemExit) as done:
        evaluate.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", out)
    assert len(options) > 5 and all(o.count("(default") <= 1 for o in options), out
    assert "(default: None)" not in out and "(default: 1024)" in out


def test_unicode_run_names_are_folder_names(run_main, tiny_data, tmp_path):
    assert run_main(tiny_args(tiny_data, tmp_path, *SHORT, "--run-name", "café")).returncode == 0
    assert (tmp_path / "café" / "metrics.jsonl").is_file()


def test_class_name_lists_say_dots_only_when_cut(tmp_path):
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"2 classes \(a, b\) for a model with 3 outputs"):
        Trainer(config(tmp_path, "two"), model=make_mlp(), train_data=vectors(), eval_data=vectors(N_EVAL, seed=2),
                class_names=["a", "b"])  # fmt: skip
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"5 classes \(a, b, c, d, \.\.\.\) for a model with 3 outputs"):
        Trainer(config(tmp_path, "five"), model=make_mlp(), train_data=vectors(), eval_data=vectors(N_EVAL, seed=2),
                class_names=list("abcde"))  # fmt: skip


def test_an_image_folder_model_is_evaluated_after_its_folder_moved(run_main, tmp_path, capsys):
    from test_imagefolder import quick, train_args, write_folder

    folder = write_folder(tmp_path / "pets", (24, 24), rgb=False)
    out, data = tmp_path / "runs", tmp_path / "cache"
    assert run_main(train_args(folder, data, out, *quick())).returncode == 0
    moved = folder.rename(tmp_path / "moved")
    reset_accelerate()
    assert evaluate.main([str(out / "pets"), "--cpu"]) == 2
    err = capsys.readouterr().err
    assert f"the image folder {folder} it was trained on is gone (moved?): pass --dataset imagefolder:" in err
    reset_accelerate()
    assert evaluate.main([str(out / "pets"), "--cpu", "--dataset", f"imagefolder:{moved}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seen"] > 0


@pytest.mark.slow
def test_a_second_ctrl_c_after_the_save_ends_quietly(tiny_data, tmp_path):
    """The second press lands once the checkpoint is saved, while the process ends (close(), the
    interpreter's exit): exit 130, no KeyboardInterrupt traceback, no claim that nothing was saved.
    (Before: 6 of 16 presses 0 to 300 ms after the first ended in a traceback from the exit.)"""
    import os
    import signal

    cmd = [sys.executable, "-m", "trainer", *tiny_args(tiny_data, tmp_path, "--epochs", "1000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        while not any("epoch 2/1000" in line for line in seen):
            seen.append(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        while not any("checkpoint saved" in line for line in seen):
            seen.append(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGINT)
        rest = proc.stdout.read()
        code = proc.wait(120)
    finally:
        proc.kill()
    assert code == 130
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert "no checkpoint was written" not in rest, rest  # it was: the press came after it
