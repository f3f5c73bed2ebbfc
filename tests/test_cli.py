"""The command line as a user runs it: launchers, output, files, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, fork_trainer, tiny_args, wait_for, write_dataset

from trainer import checkpoint as ckpt

METRICS_KEYS = {
    "epoch", "step", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_correct", "valid_seen",
    "lr", "epoch_time_s", "train_samples_per_s", "num_processes", "mixed_precision",
}  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trainer: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_every_option_with_its_default():
    out = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, cwd=REPO,
                         env=cli_env()).stdout  # fmt: skip
    for flag in ("--epochs", "--batch-size", "--lr", "--momentum", "--seed", "--dataset", "--data-dir",
                 "--output-dir", "--run-name", "--mixed-precision", "--cpu", "--limit-train-batches",
                 "--limit-eval-batches", "--resume", "--save-every", "--keep-last"):  # fmt: skip
        assert flag in out, flag
    assert "(default: 512)" in out and "(default: 0.5)" in out and "(default: 12)" in out


def test_console_script_is_installed():
    exe = str(Path(sys.executable).with_name("trainer"))  # the venv's bin folder, beside this interpreter
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, env=cli_env())
    assert result.returncode == 0 and "--epochs" in result.stdout


@pytest.mark.slow
def test_accelerate_launch_trains_and_a_sigterm_to_the_launcher_saves(tiny_data, tmp_path):
    """The README's command end to end, then what a scheduler's `kill PID` does to it: the
    SIGTERM reaches the launcher only; the trainer must notice, save, and leave no orphan."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch_configs/auto.yaml"),
           "-m", "trainer", *tiny_args(tiny_data, tmp_path, "--epochs", "1000")]  # fmt: skip
    # No OMP_NUM_THREADS: the launcher's silent default of 1 is not a choice, so the trainer takes its cores.
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "mnist"
    try:
        wait_for(lambda: len(read_lines(run / "metrics.jsonl")) >= 1 or launcher.poll() is not None, 900)
        assert launcher.poll() is None, launcher.communicate()
        children = [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        assert children, "the launcher runs the trainer in a child process"
        before = {p.name for p in ckpt.list_checkpoints(run)}
        os.kill(launcher.pid, signal.SIGTERM)  # the launcher only
        out, err = launcher.communicate(timeout=600)
    finally:
        launcher.kill()

    def trainer_gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() and b"trainer" in Path(f"/proc/{pid}/cmdline").read_bytes()
                       for pid in children)  # fmt: skip

    wait_for(trainer_gone, 600)
    after = {p.name for p in ckpt.list_checkpoints(run)}
    assert after - before, "the trainer saved a checkpoint before exiting"
    latest = ckpt.find_latest(run)
    ckpt.verify(latest)
    # What it printed before the signal: the run summary and the epoch table.
    assert "processes: 1" in out and "precision: no" in out and "steps/epoch: 24" in out
    cores = len(os.sched_getaffinity(0))
    assert f"threads: {cores} ({cores} cores / 1 process)" in out
    header = next(line for line in out.splitlines() if "valid acc" in line)
    assert "epoch" in header and "train acc" in header and "correct/seen" in header
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] == "1"]
    assert len(rows) == 1 and rows[0][1] == "24" and rows[0][6].endswith("/1001")
    records = read_jsonl(run / "metrics.jsonl")
    assert records[0]["epoch"] == 1 and set(records[0]) >= METRICS_KEYS
    assert records[0]["valid_seen"] == 1001 and records[0]["step"] == 24
    assert records[0]["valid_acc"] > 0.5  # the fake digits are easy; a broken loop stays near 0.1
    assert "SIGTERM received" in err and "--resume latest" in out
    assert "Ctrl-C" not in err  # a second Ctrl-C stops at once; nobody pressed a first one
    assert "were not passed to `accelerate launch`" not in err  # the README's first command is quiet
    # The resume command starts the launcher as it was started, config file and all.
    hint = next(line for line in out.splitlines() if line.startswith("resume with: "))
    config = REPO / "launch_configs" / "auto.yaml"
    assert hint.startswith(f"resume with: accelerate launch --config_file {config} -m trainer ")
    assert json.loads((latest / "state.json").read_text())["step"] >= 24


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_refuses_to_overwrite_a_finished_run(run_main, tiny_data, tmp_path):
    first = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "2"))
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "mnist" / "metrics.jsonl").read_bytes()
    again = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "2"))
    assert_one_line_error(again, "already holds results", "--resume latest")
    assert (tmp_path / "mnist" / "metrics.jsonl").read_bytes() == before


def test_missing_data_offline_names_files_and_folder(run_main, tmp_path):
    result = run_main(tiny_args(tmp_path / "nowhere", tmp_path / "out"))
    assert_one_line_error(result, "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", str(tmp_path / "nowhere"))


def test_other_datasets_are_found_in_their_own_folders(run_main, tmp_path):
    write_dataset(tmp_path / "data", folder="FashionMNIST")
    args = tiny_args(tmp_path / "data", tmp_path / "out", "--dataset", "fashion-mnist", "--epochs", "1",
                     "--limit-train-batches", "2", "--limit-eval-batches", "1")  # fmt: skip
    result = run_main(args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "fashion-mnist" / "metrics.jsonl").is_file()
    missing = run_main(tiny_args(tmp_path / "data", tmp_path / "out2", "--dataset", "kmnist"))
    assert_one_line_error(missing, "KMNIST")


def test_fp16_on_cpu_is_refused_in_one_line(run_main, tiny_data, tmp_path):
    result = run_main(tiny_args(tiny_data, tmp_path, "--mixed-precision", "fp16", "--cpu"))
    assert_one_line_error(result, "fp16", "bf16")
    assert not (tmp_path / "mnist").exists()


def test_fp16_from_a_launch_config_is_refused_on_cpu(run_main, tiny_data, tmp_path, monkeypatch):
    # What `accelerate launch --config_file launch_configs/fp16.yaml --cpu` hands the trainer.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert_one_line_error(run_main(tiny_args(tiny_data, tmp_path)), "fp16")


def test_bf16_on_cpu_runs_and_is_reported(run_main, tiny_data, tmp_path):
    args = tiny_args(tiny_data, tmp_path, "--mixed-precision", "bf16", "--epochs", "1", "--limit-train-batches", "3")
    result = run_main(args)
    assert result.returncode == 0, result.stderr
    assert "precision: bf16" in result.stdout
    assert read_jsonl(tmp_path / "mnist" / "metrics.jsonl")[0]["mixed_precision"] == "bf16"


def test_log_with_sends_settings_steps_and_epochs_to_an_accelerate_tracker(run_main, tiny_data, tmp_path):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, register_tracker_class

    calls = []

    class Recorder(GeneralTracker):  # what `--log-with tensorboard` gets, minus TensorBoard
        name = "recorder"
        requires_logging_directory = True

        def __init__(self, run_name, logging_dir, **kwargs):
            super().__init__()
            calls.append(("init", run_name, str(logging_dir)))

        @property
        def tracker(self):
            return None

        def store_init_configuration(self, values):
            calls.append(("config", values))

        def log(self, values, step=None, **kwargs):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    register_tracker_class(Recorder)
    try:
        args = tiny_args(tiny_data, tmp_path, "--limit-train-batches", "3", "--log-with", "recorder")
        result = run_main(args)
    finally:
        del LOGGER_TYPE_TO_CLASS["recorder"]
    assert result.returncode == 0, result.stderr
    assert calls[0] == ("init", "mnist", str(tmp_path / "mnist" / "trackers"))
    assert calls[1][0] == "config" and calls[1][1]["lr"] == 0.5 and calls[1][1]["log_with"] == "recorder"
    logs = [c for c in calls if c[0] == "log"]
    step_logs = [(step, v["train/lr"]) for _, step, v in logs if "train/lr" in v]
    lrs = [lr for c in read_jsonl(tmp_path / "mnist" / "curves.jsonl") for lr in c["lr"]]
    assert step_logs == list(zip(range(1, 7), lrs))  # every optimizer step, numbered from 1
    epochs = [(step, v) for _, step, v in logs if "epoch/valid_acc" in v]
    records = read_jsonl(tmp_path / "mnist" / "metrics.jsonl")
    assert [(s, v["epoch/valid_acc"]) for s, v in epochs] == [(r["step"], r["valid_acc"]) for r in records]
    assert calls[-1] == ("finish",)


def test_log_with_a_missing_tracker_is_one_line(run_main, tiny_data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = run_main(tiny_args(tiny_data, tmp_path, "--log-with", "wandb"))
    assert_one_line_error(result, "wandb", "pip install wandb")
    assert_one_line_error(run_main(tiny_args(tiny_data, tmp_path, "--log-with", "nope")), "unknown tracker 'nope'")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "inf"], "--lr must be a positive number"),
        (["--run-name", "../x"], "--run-name"),
        (["--batch-size", "5000"], "fewer than one step needs"),
    ],
)
def test_bad_values_are_one_line_errors(run_main, tiny_data, tmp_path, flags, fragment):
    assert_one_line_error(run_main(tiny_args(tiny_data, tmp_path, *flags)), fragment)


def test_unknown_flag_is_exit_code_2(run_main, tiny_data, tmp_path):
    with pytest.raises(SystemExit) as info:
        run_main(tiny_args(tiny_data, tmp_path, "--epochs", "3x"))
    assert info.value.code == 2


def test_batch_size_1_with_batchnorm_is_one_line(run_main, tiny_data, tmp_path):
    """BatchNorm cannot train on one value per channel (the blog's last layer is 1x1): one line, exit 2."""
    short = ["--epochs", "1", "--limit-train-batches", "2", "--limit-eval-batches", "1"]
    result = run_main(tiny_args(tiny_data, tmp_path / "one", *short, "--batch-size", "1"))
    assert_one_line_error(result, "BatchNorm needs at least 2 samples per process", "pass --batch-size 2 or more")
    assert not list((tmp_path / "one" / "mnist").glob("step_*"))
    assert run_main(tiny_args(tiny_data, tmp_path / "two", *short, "--batch-size", "2")).returncode == 0


@pytest.mark.parametrize("command", ["trainer", "plot"])
def test_an_abbreviated_flag_is_refused_in_one_line(run_main, capsys, tiny_data, tmp_path, command):
    """`--epoch 1` is no `--epochs 1` (a later flag would change what it means)."""
    from trainer import cli, plot

    main, args = (cli.main, tiny_args(tiny_data, tmp_path, "--epoch", "1")) if command == "trainer" else (
        plot.main, ["RUN", "--ou", "x.png"])  # fmt: skip
    with pytest.raises(SystemExit) as info:
        run_main(args, main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and "unrecognized arguments: " + args[-2] in lines[0], lines
    assert not (tmp_path / "mnist").exists()


def help_entries(run_main, capsys) -> dict[str, str]:
    """`trainer --help` as {flag: its entry's text on one line}."""
    with pytest.raises(SystemExit) as info:
        run_main(["--help"])
    assert info.value.code == 0
    entries: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line.startswith("    ") and entries:
            entries[flag] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_help_shows_defaults_of_0_and_hides_those_of_none_and_false(run_main, capsys):
    entries = help_entries(run_main, capsys)
    assert entries["--weight-decay"].endswith("(default: 0.0)")
    assert entries["--label-smoothing"].endswith("(default: 0.0)")
    assert entries["--warmup-steps"].endswith("(default: 0)")
    assert entries["--epochs"].endswith("(default: 10)")
    for flag in ("--ema", "--clip-grad-norm", "--cpu", "--augment", "--find-unused-parameters"):  # None, False
        assert "(default:" not in entries[flag], entries[flag]
    assert "SGD" not in entries["--lr"] and "either optimizer" in entries["--lr"]


def test_several_processes_without_distributed_setup_are_refused(tiny_data, tmp_path):
    """torchrun's environment without --cpu on a machine without GPUs: each process would train alone."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("with GPUs, processes without --cpu do get a distributed setup")
    result = fork_trainer(tiny_args(tiny_data, tmp_path), nproc=2, cpu=False)
    assert result.codes == [2, 2]
    assert "pass --cpu" in result.stderr
    assert not (tmp_path / "mnist" / "metrics.jsonl").exists()


def test_launch_configs_load_with_accelerates_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.stem for p in (REPO / "launch_configs").glob("*.yaml")}
    assert names == {"auto", "cpu", "single_gpu", "multi_gpu", "fp16", "bf16", "multi_node"}
    for name in names:
        config = load_config_from_file(str(REPO / "launch_configs" / f"{name}.yaml"))
        assert config.compute_environment.name == "LOCAL_MACHINE", name
        raw = yaml.safe_load((REPO / "launch_configs" / f"{name}.yaml").read_text())
        assert raw["mixed_precision"] == {"fp16": "fp16", "bf16": "bf16"}.get(name, "no")
    assert load_config_from_file(str(REPO / "launch_configs/multi_node.yaml")).num_machines == 2
    assert load_config_from_file(str(REPO / "launch_configs/cpu.yaml")).use_cpu is True


@pytest.mark.parametrize("name", ["auto", "cpu", "single_gpu", "multi_gpu", "fp16", "bf16", "multi_node"])
def test_no_launch_config_makes_accelerate_warn(name, monkeypatch, caplog, tmp_path):
    """accelerate's 'values were not passed' warning comes from its argument check, which is run
    here as `accelerate launch --config_file FILE -m trainer` runs it, with no OMP_NUM_THREADS and
    8 cores (on a CPU it guesses a thread count, and says so, when there is more than one core)."""
    import psutil
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)

    def warnings_for(config: Path) -> list[str]:
        caplog.clear()
        args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "trainer", "--epochs", "1"])
        with caplog.at_level("WARNING"):
            _validate_launch_command(args)
        return [r.getMessage() for r in caplog.records if "were not passed" in r.getMessage()]

    config = REPO / "launch_configs" / f"{name}.yaml"
    assert warnings_for(config) == []
    if name == "cpu":  # negative control: the same file without its mpirun_config section warns
        text = config.read_text()
        bare = tmp_path / "cpu.yaml"
        bare.write_text(text[: text.index("# accelerate has no top-level key")])
        assert "num_cpu_threads_per_process" in warnings_for(bare)[0]


def test_help_shows_each_default_once_and_names_arguments(run_main):
    out = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, cwd=REPO,
                         env=cli_env()).stdout  # fmt: skip
    assert "(default: None)" not in out
    assert "the dataset name) (default" not in out  # a help text that names its default keeps it alone
    for generated in ("RESUME", "EVERY", "LAST", "WITH", "BATCHES"):
        assert generated not in out, generated
    assert "--resume latest|auto|PATH" in out and "--save-every N" in out and "--log-with NAMES" in out
    version = subprocess.run([sys.executable, "-m", "trainer", "--version"], capture_output=True, text=True,
                             cwd=REPO, env=cli_env())  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("trainer 0.")


def test_a_malformed_value_is_one_line_not_the_usage(tiny_data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer", "--epochs", "3x"], capture_output=True, text=True,
                            cwd=REPO, env=cli_env())  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trainer: error: argument --epochs: invalid int value: '3x' (see --help)"
    ]


@pytest.mark.parametrize("name", ["..", ".hidden", "-x", "a/b", "tab\there", ""])
def test_run_name_refusal_says_what_is_allowed(run_main, tiny_data, tmp_path, name):
    result = run_main(tiny_args(tiny_data, tmp_path, f"--run-name={name}"))
    assert_one_line_error(result, "must be a folder name", repr(name)[1:-1])
    assert not (tmp_path / "mnist").exists()


def test_plain_output_shows_progress_within_an_epoch_and_the_evaluation(run_main, tiny_data, tmp_path):
    result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "1"))  # 24 steps, --progress plain
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("epoch 1/1:")]
    assert any("10/24 steps" in line or "11/24 steps" in line for line in progress)  # about every 10%
    assert 8 <= len(progress) <= 11 and all("samples/s" in line for line in progress[:-1])
    assert progress[-1] == "epoch 1/1: evaluating 1,001 images"


@pytest.mark.slow
def test_a_closed_stdout_costs_neither_the_save_nor_a_traceback(tiny_data, tmp_path):
    """`python -m trainer ... | head -1`, then SIGTERM: the save, the stop lines (on stderr), exit 143."""
    cmd = [sys.executable, "-m", "trainer", *tiny_args(tiny_data, tmp_path, "--epochs", "1000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "mnist"
    try:
        assert proc.stdout.readline().startswith("run: ")  # the summary line: the reader then goes away
        proc.stdout.close()
        wait_for(lambda: ckpt.find_latest(run) is not None or proc.poll() is not None)  # writes after the close
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        assert proc.wait(timeout=600) == 143, err
    finally:
        proc.kill()
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert "stopped by SIGTERM; checkpoint saved" in err and "resume with: python -m trainer" in err
    ckpt.verify(ckpt.find_latest(run))


@pytest.mark.slow
def test_a_double_ctrl_c_in_a_terminal_leaves_the_terminal_usable(tiny_data, tmp_path):
    """Under a pseudo-terminal (bars on): the second Ctrl-C stops at once, and the bar's hidden
    cursor is shown again before the process ends."""
    import pty

    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "trainer", *tiny_args(tiny_data, tmp_path, "--epochs", "1000", "--progress", "bar")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**cli_env(), "TERM": "xterm", "COLUMNS": "100"},
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)  # fmt: skip
    os.close(slave)
    seen = b""

    def read_some() -> bytes:
        try:
            return os.read(master, 65536)
        except OSError:  # the child closed the terminal
            return b""

    try:
        while b"epoch 2/1000" not in seen and proc.poll() is None:  # an epoch done, the next bar drawn
            seen += read_some()
        assert proc.poll() is None, seen.decode(errors="replace")
        os.kill(proc.pid, signal.SIGINT)
        while b"Ctrl-C again" not in seen and proc.poll() is None:
            seen += read_some()
        os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=600)
        while chunk := read_some():
            seen += chunk
    finally:
        proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert code == 130, text[-2000:]
    hidden, shown = text.rfind("\x1b[?25l"), text.rfind("\x1b[?25h")
    assert hidden != -1 and shown > hidden, "the cursor stays hidden"
    assert "Traceback" not in text and "interrupted; no checkpoint was written for the current step" in text


def test_ctrl_c_before_training_is_one_line_and_130():
    """A Ctrl-C while torch still imports (the first seconds) reaches main_entry as KeyboardInterrupt."""
    code = ("import trainer.cli as cli\n"
            "def interrupted(argv=None):\n    raise KeyboardInterrupt\n"
            "cli.main = interrupted\ncli.main_entry()\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert result.returncode == 130
    assert result.stderr.strip().splitlines() == [
        "trainer: error: interrupted before training began; nothing was written"
    ]


def test_every_command_takes_json_the_same_way_and_prints_plain_text_when_piped(tiny_run, tiny_data, tmp_path, capsys):
    """`--json` alone or `--json -`: JSON on stdout instead of the table; `--json PATH`: the table
    and a file. The tables are plain text (no box drawing) when stdout is not a terminal."""
    from conftest import reset_accelerate
    from PIL import Image

    from trainer import evaluate, predict
    from trainer.data import load_split

    image = tmp_path / "digit.png"
    Image.fromarray(load_split("mnist", tiny_data, train=False).images[0].numpy(), mode="L").save(image)
    commands = {
        "evaluate": (evaluate.main, [str(tiny_run / "best"), "--data-dir", str(tiny_data), "--cpu"], "correct"),
        "predict": (predict.main, [str(tiny_run / "best"), str(image), "--cpu"], "class"),
    }
    for name, (main, args, key) in commands.items():
        for flag in (["--json"], ["--json", "-"]):
            reset_accelerate()
            capsys.readouterr()
            assert main([*args, *flag]) == 0, name
            parsed = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
            assert key in (parsed[0] if isinstance(parsed, list) else parsed), name
        reset_accelerate()
        path = tmp_path / f"{name}.json"
        assert main([*args, "--json", str(path)]) == 0, name
        table = capsys.readouterr().out
        assert json.loads(path.read_text()) and table.strip(), name
        assert not set(table) & set("┏┃━│─┡╇└┘"), f"{name} drew boxes into a pipe:\n{table}"
    reset_accelerate()
    with pytest.raises(SystemExit):  # one convention: --cpu, not --device
        predict.main([str(tiny_run / "best"), str(image), "--device", "cpu"])
