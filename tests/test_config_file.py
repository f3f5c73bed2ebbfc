"""Settings in a file: a run folder's config.yaml holds every setting as the run used them, and
`--config FILE` (TrainConfig.from_yaml in Python) trains with a file's settings, under the flags typed."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest
import yaml
from conftest import budget, tiny_args
from hypothesis import assume, example, given
from hypothesis import strategies as st

from trainer import checkpoint as ckpt
from trainer import cli, config
from trainer.config import DATASETS, ConfigError, TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Strings that a YAML reader may take for something else: bools (1.1's and 1.2's), nulls, numbers, dates,
# comments, quotes, keys, escapes, line breaks, lone surrogates.
TRICKY = ["no", "No", "yes", "off", "on", "true", "null", "~", "", " ", "1e3", "2E-5", "-3e1", "1.0e3", "1.5e-3",
          "0x10", "010", "1_000", "1:30", ".inf", ".nan", "2024-06-01", "#x", "a: b", "- a", "'", '"', "a\nb", "tab\t",
          "\x85", "\u2028", "\ud800", "é", "\ufeffx", "{a}", "[a]", "&a", "*a", "!x", "%x", "@x", "`x", "| x", "> x",
          "? x"]  # fmt: skip


def value_of(name: str) -> st.SearchStrategy:
    """Values a field may hold (many of them refused by TrainConfig, which the tests then skip)."""
    f, text = FIELDS[name], st.sampled_from(TRICKY) | st.text(max_size=12)
    if f.metadata.get("choices"):
        return st.sampled_from(f.metadata["choices"])
    kind = {int: st.integers(0, 100) | st.integers(0, 2**70), bool: st.booleans(),
            float: st.floats(0, 1e300) | st.sampled_from([0.0, 1e-3, 0.5, 1e18, 5000.0])}  # fmt: skip
    drawn = {
        "dataset": st.sampled_from(DATASETS) | text.map(lambda t: "imagefolder:x" + t),
        "model": st.sampled_from(["blog_resnet", "helpers.models:small_cnn"]),
        "betas": st.just("0.9,0.99"), "stop_at": st.just("valid_acc>=0.9"), "image_size": st.just("24x32"),
        "requeue_signal": st.sampled_from(["USR1", "none"]),
    }.get(name)  # fmt: skip
    annotation = str(f.type)
    if drawn is None:
        drawn = next((s for k, s in kind.items() if annotation.startswith(k.__name__)), text)
    return (st.none() | drawn) if "None" in annotation else drawn


@st.composite
def configs(draw) -> TrainConfig:
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True))
    values = {name: draw(value_of(name)) for name in names}
    if values.get("betas"):
        values["optimizer"] = "adamw"
    try:
        return TrainConfig(**values)
    except ConfigError:
        assume(False)


def read_back(text: str, tmp_path: Path) -> TrainConfig:
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return TrainConfig.from_yaml(path)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("yaml")


@budget(100)
@given(configs())
@example(TrainConfig(log_with="1e3", data_dir="no", output_dir="2024-06-01", run_name="1:30", init_from="~"))
def test_to_yaml_reads_back_as_the_same_config_here_and_in_any_yaml_reader(scratch, drawn):
    """Every field, in field order, once; from_yaml gives the config back, and PyYAML's plain
    safe_load (YAML 1.1: `no` is False there) reads the same values."""
    text = drawn.to_yaml()
    assert read_back(text, scratch) == drawn
    assert yaml.safe_load(text) == drawn.to_dict()
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert keys == list(FIELDS)


def test_the_round_trip_can_fail(tmp_path):
    """Negative control: plain yaml.safe_dump writes `1e3` unquoted, which a setting reads as a number,
    and plain yaml.safe_load reads `mixed_precision: no` as False."""
    drawn = TrainConfig(log_with="1e3")
    plain = yaml.safe_dump(drawn.to_dict(), sort_keys=False)
    with pytest.raises(ConfigError, match=r"log_with \(--log-with\) must be a str, got 1000\.0"):
        read_back(plain, tmp_path)
    assert read_back(drawn.to_yaml(), tmp_path) == drawn
    assert yaml.safe_load("mixed_precision: no") == {"mixed_precision": False}
    assert read_back("mixed_precision: no\ncpu: yes\nlr: 1e-3\nrun_name: 2024-06-01", tmp_path) == TrainConfig(
        mixed_precision="no", cpu=True, lr=0.001, run_name="2024-06-01"
    )


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_args(data, out, "--epochs", "1", "--limit-train-batches", "2", "--limit-eval-batches", "1", "--cpu",
                     *extra)  # fmt: skip


def state_of(run: Path) -> dict:
    return json.loads((ckpt.find_latest(run) / ckpt.STATE_NAME).read_text())


def numbers(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def one_line(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trainer: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_run_writes_its_settings_and_config_runs_them_again(run_main, tiny_data, tmp_path):
    """config.yaml is the config the checkpoint records (paths absolute, --val-split as a number, the
    precision the run trained in), with no resume; `--config` of it trains the same numbers, under a
    new --run-name (in the same folder it is refused, as any new run on a folder with results is)."""
    assert run_main(run_args(tiny_data, tmp_path / "out", "--lr", "0.3")).returncode == 0
    run = tmp_path / "out" / "mnist"
    saved = state_of(run)
    used = dataclasses.replace(TrainConfig(**saved["config"]), mixed_precision=saved["mixed_precision"])
    assert TrainConfig.from_yaml(run / "config.yaml") == used and used.mixed_precision == "no"
    assert used.output_dir == str(tmp_path / "out") and used.lr == 0.3 and used.val_split == 0.0

    one_line(run_main(["--config", str(run / "config.yaml")]), f"run folder {run} already holds results",
             "--resume latest")  # fmt: skip
    assert run_main(["--config", str(run / "config.yaml"), "--run-name", "again"]).returncode == 0
    again = tmp_path / "out" / "again"
    assert numbers(again) == numbers(run)
    assert TrainConfig.from_yaml(again / "config.yaml") == dataclasses.replace(used, run_name="again")


def test_typed_flags_override_the_file_and_the_file_the_defaults(tmp_path):
    settings = tmp_path / "exp.yaml"
    settings.write_text("epochs: 4\nlr: 0.1\noptimizer: AdamW\naugment: on\n")
    parsed = cli.parse_config(["--config", str(settings), "--epochs", "2", "--no-cycle-momentum"])
    assert (parsed.epochs, parsed.lr, parsed.optimizer, parsed.augment, parsed.cycle_momentum) == (
        2, 0.1, "adamw", True, False)  # fmt: skip
    assert parsed.batch_size == TrainConfig().batch_size
    assert not cli.on_the_cpu(["--config", str(settings)])  # what processes start with, before a resume
    settings.write_text("cpu: true\n")
    assert cli.on_the_cpu(["--config", str(settings)]) and cli.on_the_cpu(["--cpu"]) and not cli.on_the_cpu([])
    # A file's value that only the typed flags make right is taken: the combination is checked.
    settings.write_text("min_delta: 0.01\n")
    assert cli.parse_config(["--config", str(settings), "--early-stop", "2"]).min_delta == 0.01


# A file of settings that is refused, how it is made, and what the one line says.
BAD_FILES = [
    ("unknown", lambda p: p.write_text("epochs: 1\nlrr: 0.1\n"), ["sets 'lrr', which is no setting; did you mean lr?"]),
    ("flag-spelling", lambda p: p.write_text("batch-size: 8\n"), ["sets 'batch-size'", "did you mean batch_size?"]),
    ("float-for-int", lambda p: p.write_text("epochs: 2.5\n"), ["epochs (--epochs) must be an int, got 2.5",
                                                                "sets epochs)"]),
    ("not-a-bool", lambda p: p.write_text("cpu: maybe\n"), ["cpu (--cpu) must be a bool, got 'maybe'", "sets cpu)"]),
    ("out-of-range", lambda p: p.write_text("epochs: 0\n"), ["--epochs must be at least 1, got 0", "sets epochs)"]),
    ("not-a-choice", lambda p: p.write_text("progress: fancy\n"), ["--progress must be one of auto, bar, plain"]),
    ("combination", lambda p: p.write_text("min_delta: 0.1\n"), ["--min-delta belongs to --early-stop",
                                                                 "sets min_delta)"]),
    ("list", lambda p: p.write_text("- epochs\n- 2\n"), ["holds a list, not settings"]),
    ("scalar", lambda p: p.write_text("epochs 2\n"), ["holds a str, not settings"]),
    ("empty", lambda p: p.write_text("# nothing\n"), ["holds nothing, not settings"]),
    ("broken", lambda p: p.write_text("lr: [0.1\n"), ["is not valid YAML", "line 2"]),
    ("repeated", lambda p: p.write_text("lr: 1\nepochs: 1\nlr: 2\n"), ["'lr' is given twice (line 3, column 1)"]),
    ("not-utf8", lambda p: p.write_bytes(b"lr: \xff\n"), ["is not valid YAML"]),
    ("python-tag", lambda p: p.write_text("lr: !!python/object/apply:os.system [echo]\n"), ["is not valid YAML"]),
    ("resume", lambda p: p.write_text("resume: latest\n"), ["sets resume: latest", "pass --resume latest with"]),
    ("huge", lambda p: p.write_text("#" * (config.SETTINGS_LIMIT + 1)), ["is larger than 1048576 bytes"]),
    ("directory", lambda p: p.mkdir(), ["is a directory, not a regular file"]),
    ("fifo", lambda p: os.mkfifo(p), ["is a FIFO, not a regular file"]),
    ("missing", lambda p: None, ["cannot read the config file", "No such file or directory"]),
]  # fmt: skip


@pytest.mark.parametrize("make, fragments", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_a_bad_file_is_one_line_and_nothing_is_written(run_main, tiny_data, tmp_path, make, fragments):
    path = tmp_path / "settings.yaml"
    make(path)
    ended: list = []
    args = ["--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--config", str(path)]
    worker = threading.Thread(target=lambda: ended.append(run_main(args)))
    worker.start()
    worker.join(60)
    if worker.is_alive():  # the FIFO was waited on: give it a writer so that the test ends
        open(path, "w").close()  # noqa: SIM115
        worker.join()
        pytest.fail("--config waited on a FIFO")
    one_line(ended[0], f"{path}", *fragments)
    assert not (tmp_path / "mnist").exists()
    if path.is_file() and path.read_bytes().startswith(b"resume:"):  # Python's config may resume
        assert TrainConfig.from_yaml(path).resume == "latest"
        return
    with pytest.raises(ConfigError) as error:  # the same in Python
        TrainConfig.from_yaml(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_resume_takes_a_file_that_agrees_with_its_recipe_and_refuses_one_that_does_not(run_main, tiny_data,
                                                                                         tmp_path):  # fmt: skip
    """The file's settings are typed flags: another lr is refused as `--lr` is (naming the file), the
    run's own config.yaml continues it, and a resume that changes a setting of where and how it runs
    (--keep-last) rewrites config.yaml, while one that changes nothing leaves the file as it was."""
    out = tmp_path / "out"
    assert run_main(run_args(tiny_data, out, "--epochs", "2", "--keep-last", "5")).returncode == 0
    run = out / "mnist"
    first = ckpt.list_checkpoints(run)[-1]
    other = tmp_path / "other.yaml"
    other.write_text(f"lr: 0.1\ndata_dir: {tiny_data}\noutput_dir: {out}\n")
    for args, named in ((["--config", str(other)], f"({other} sets lr)"), (["--lr", "0.1"], "")):
        line = one_line(run_main([*args, "--resume", str(first), "--run-name", "branch"]),
                        "was trained with lr=0.5, this run has lr=0.1; a resumed run keeps its recipe")  # fmt: skip
        assert line.endswith(named) and (named or "sets" not in line), line
    assert not (out / "branch").exists()

    # The run's own file continues it, bit for bit: a branch from its first epoch trains the second again.
    assert run_main(["--config", str(run / "config.yaml"), "--resume", str(first), "--run-name", "branch"]) \
        .returncode == 0  # fmt: skip
    assert numbers(out / "branch") == numbers(run)

    before = (run / "config.yaml").stat()
    assert run_main(["--config", str(run / "config.yaml"), "--resume", "latest"]).returncode == 0
    assert (run / "config.yaml").stat().st_ino == before.st_ino  # nothing changed: not rewritten
    assert run_main(["--config", str(run / "config.yaml"), "--resume", "latest", "--keep-last", "2"]).returncode == 0
    assert TrainConfig.from_yaml(run / "config.yaml").keep_last == 2
    assert (run / "config.yaml").stat().st_ino != before.st_ino


def test_the_file_of_a_run_from_weights_names_them_and_resumes_without_starting_again(run_main, tiny_data, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """--init-from is written as the checkpoint the weights came from (absolute); --config of the file
    starts a new run from them, and with --resume continues the run (its start is behind it)."""
    assert run_main(run_args(tiny_data, tmp_path, "--run-name", "parent")).returncode == 0
    parent = tmp_path / "parent"
    monkeypatch.chdir(tmp_path)
    assert run_main(run_args(tiny_data, tmp_path, "--run-name", "child", "--init-from", "parent/best")).returncode == 0
    child = tmp_path / "child"
    written = TrainConfig.from_yaml(child / "config.yaml")
    assert written.init_from == str((parent / "best").resolve()) and written.resume is None
    assert run_main(["--config", str(child / "config.yaml"), "--resume", "latest"]).returncode == 0
    assert run_main(["--config", str(child / "config.yaml"), "--run-name", "sibling"]).returncode == 0
    assert numbers(tmp_path / "sibling") == numbers(child)
