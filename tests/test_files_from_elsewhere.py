"""Checkpoints we did not write, made the way issue 28 found them: each is refused in one line
(exit 2) by every command that reads it, or, where it is harmless, used as it should be. Never a
traceback, a hang, an import of code the checkpoint names, or a read of a file the manifest does
not list. Each test here failed on the code before issue 28 (the negative controls of
test_fuzz.py's property test)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import main_in_process, reset_accelerate, tiny_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_fuzz import no_hang

from trainer import TrainConfig, Trainer, evaluate, predict
from trainer import checkpoint as ckpt
from trainer.errors import CheckpointError, ConfigError
from trainer.state import float_bits


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    """Two epochs of two steps, a checkpoint every step, all kept: step 3 is mid-epoch with an epoch of history."""
    out = tmp_path_factory.mktemp("elsewhere")
    assert main_in_process(tiny_args(tiny_data, out, "--limit-train-batches", "2", "--save-every", "1",
                                     "--keep-last", "9", "--limit-eval-batches", "2")) == 0  # fmt: skip
    return out / "mnist"


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """A copy of the mid-epoch checkpoint in a run folder of its own."""
    folder = tmp_path / "copied" / "mnist" / "step_0000003"
    shutil.copytree(run / "step_0000003", folder)
    return folder


def relist(folder: Path, only: list[str] | None = None) -> None:
    """The manifest recomputed for the regular files it lists (or for `only`), as an editor would."""
    manifest = json.loads((folder / ckpt.MANIFEST_NAME).read_text())
    names = only if only is not None else list(manifest["files"])
    manifest["files"] = {}
    for name in names:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt.MANIFEST_NAME).write_text(json.dumps(manifest))


def edit_state(folder: Path, change) -> None:
    state = json.loads((folder / ckpt.STATE_NAME).read_text())
    change(state)
    (folder / ckpt.STATE_NAME).write_text(json.dumps(state))
    relist(folder)


def edit_tensors(folder: Path, name: str, change) -> None:
    with safe_open(folder / name, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(folder / name)
    change(tensors, metadata)
    save_file(tensors, folder / name, metadata=metadata)
    relist(folder)


def one_line(result, fragment: str = "") -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("trainer: error:"), result.stderr
    assert fragment in lines[0], lines[0]


def every_command(run_main, folder: Path, tiny_data: Path, tmp_path: Path, digit: Path) -> dict[str, object]:
    """evaluate, predict, --init-from and --resume on `folder`, each guarded against a hang."""
    data = ["--data-dir", str(tiny_data)]
    with no_hang():
        return {
            "evaluate": run_main([str(folder), *data, "--cpu"], main=evaluate.main),
            "predict": run_main([str(folder), str(digit), "--cpu"], main=predict.main),
            "init-from": run_main(tiny_args(tiny_data, tmp_path / "branch", "--init-from", str(folder))),
            "resume": run_main([*data, "--progress", "plain", "--resume", str(folder)]),
        }


@pytest.fixture
def digit(tmp_path) -> Path:
    from PIL import Image

    image = Image.new("L", (28, 28), 0)
    image.paste(255, (10, 4, 17, 24))
    image.save(tmp_path / "one.png")
    return tmp_path / "one.png"


# ------------------------------------------------------------------ 1. code
PLANTED = "import os, pathlib\npathlib.Path(os.environ['PLANTED_MARK']).touch()\ndef factory(**kw):\n    return None\n"


def test_resume_never_imports_a_factory_that_the_checkpoint_names(run_main, copy, tiny_data, tmp_path, monkeypatch):
    (tmp_path / "planted.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the working directory is on the path, as under `python -m`
    monkeypatch.setenv("PLANTED_MARK", str(tmp_path / "imported"))
    edit_state(copy, lambda s: s["config"].update(model="planted:factory"))
    result = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--resume", str(copy)])
    one_line(result, "pass --model planted:factory again to resume it")
    with pytest.raises(ConfigError, match="model='planted:factory'"):  # in Python: the recipe check
        Trainer(TrainConfig(data_dir=str(tiny_data), resume=str(copy), cpu=True, batch_size=64))
    reset_accelerate()
    assert not (tmp_path / "imported").exists()


# ------------------------------------------------------------------ 2. files that are not regular files
def test_a_fifo_named_model_safetensors_is_refused_by_every_command(run_main, copy, tiny_data, tmp_path, digit):
    (copy / ckpt.MODEL_NAME).unlink()
    os.mkfifo(copy / ckpt.MODEL_NAME)
    relist(copy, [n for n in json.loads((copy / ckpt.MANIFEST_NAME).read_text())["files"] if n != ckpt.MODEL_NAME])
    for command, result in every_command(run_main, copy, tiny_data, tmp_path, digit).items():
        assert result.returncode == 2, (command, result.stderr)
        one_line(result)


def test_a_fifo_beside_the_listed_files_is_never_read(run_main, copy, tiny_data):
    os.mkfifo(copy / "notes.fifo")
    with no_hang():
        result = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--resume", str(copy)])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
def test_state_json_linked_to_dev_zero_is_one_line(run_main, copy, tiny_data, tmp_path, digit, listed):
    (copy / ckpt.STATE_NAME).unlink()
    (copy / ckpt.STATE_NAME).symlink_to("/dev/zero")
    if not listed:
        relist(copy, [n for n in json.loads((copy / ckpt.MANIFEST_NAME).read_text())["files"] if n != "state.json"])
    for result in every_command(run_main, copy, tiny_data, tmp_path, digit).values():
        one_line(result)


# ------------------------------------------------------------------ 3. values that pass the types
def _mt_invalid_for_torch() -> torch.Tensor:
    rng = random.Random(3)
    while True:  # bytes that torch's generator refuses (its position field out of range)
        state = torch.tensor([rng.randrange(256) for _ in range(5056)], dtype=torch.uint8)
        try:
            torch.Generator().set_state(state)
        except RuntimeError:
            return state.to(torch.int64)


@pytest.mark.parametrize(
    "file, change",
    [
        ("state", lambda s: s["history"][0].update(valid_acc="0.9")),
        ("state", lambda s: s["history"].__setitem__(0, {})),
        ("state", lambda s: s["scheduler"].update(last_epoch=[3])),
        ("state", lambda s: s["scheduler"]["_schedule_phases"][0].update(end_lr="params")),
        ("state", lambda s: s["optimizer_param_groups"][0].update(maximize=True)),
        ("rng", lambda t, m: t["python_mt"].__setitem__((0, 5), -7)),
        ("rng", lambda t, m: t["python_mt"].__setitem__((0, 624), 10_000)),
        ("rng", lambda t, m: t["numpy_rest_bits"].__setitem__((0, 0), float_bits([1e18])[0])),
        ("rng", lambda t, m: t["torch"].__setitem__(0, _mt_invalid_for_torch())),
    ],
    ids=["history-acc-string", "history-empty-row", "scheduler-list", "schedule-key", "maximize", "python-negative",
         "python-index", "numpy-position", "torch-mt19937"],
)  # fmt: skip
def test_values_that_would_break_the_run_are_refused_before_anything_is_restored(
    run_main, copy, tiny_data, file, change
):
    if file == "state":
        edit_state(copy, change)
    else:
        edit_tensors(copy, ckpt.RNG_NAME, change)
    one_line(run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--resume", str(copy)]))


@pytest.mark.parametrize("shape", ["[-1, 28, 28]", "[100000000, 28, 28]", "[1, 100000, 100000]", "[1, 28]"])
def test_an_input_shape_no_model_of_its_kind_has_is_refused_before_building_it(run_main, copy, digit, shape):
    edit_tensors(copy, ckpt.MODEL_NAME, lambda t, m: m.update(input_shape=shape))
    for main, args in ((evaluate.main, [str(copy), "--cpu"]), (predict.main, [str(copy), str(digit), "--cpu"])):
        one_line(run_main(args, main=main))


# ------------------------------------------------------------------ 4. what the manifest lists
def test_a_manifest_that_lists_only_state_json_is_refused_by_every_command(run_main, copy, tiny_data, tmp_path, digit):
    relist(copy, [ckpt.STATE_NAME])
    for result in every_command(run_main, copy, tiny_data, tmp_path, digit).values():
        one_line(result, "does not list")


def test_a_manifest_whose_files_key_repeats_is_refused(run_main, copy, tiny_data, tmp_path, digit):
    text = (copy / ckpt.MANIFEST_NAME).read_text().rstrip().removesuffix("}") + ', "files": {}}'
    (copy / ckpt.MANIFEST_NAME).write_text(text)
    for result in every_command(run_main, copy, tiny_data, tmp_path, digit).values():
        one_line(result, "repeats")


def test_an_unlisted_ema_file_is_never_used(run_main, run, copy, tiny_data, tmp_path, digit):
    zeroed = {k: torch.zeros_like(v) for k, v in load_file(copy / ckpt.MODEL_NAME).items()}
    save_file({**zeroed, "n_averaged": torch.tensor(5)}, copy / ckpt.EMA_NAME)
    args = [str(copy), "--data-dir", str(tiny_data), "--cpu", "--json", "-"]
    theirs = json.loads(run_main(args, main=evaluate.main).stdout)
    original = json.loads(run_main([str(run / "step_0000003"), *args[1:]], main=evaluate.main).stdout)
    assert theirs["correct"] == original["correct"] and theirs["weights"] == "trained"
    # Listed, it is refused: this run had no EMA.
    relist(copy, [*json.loads((copy / ckpt.MANIFEST_NAME).read_text())["files"], ckpt.EMA_NAME])
    for result in every_command(run_main, copy, tiny_data, tmp_path, digit).values():
        one_line(result)


def test_a_manifest_that_is_a_folder_is_refused(run_main, copy, tiny_data, tmp_path, digit):
    (copy / ckpt.MANIFEST_NAME).unlink()
    (copy / ckpt.MANIFEST_NAME).mkdir()
    for result in every_command(run_main, copy, tiny_data, tmp_path, digit).values():
        one_line(result)


# ------------------------------------------------------------------ 5, 7. names
def test_a_path_with_a_newline_is_reported_on_one_line(run_main, run, tmp_path):
    odd = tmp_path / "two\nlines"
    shutil.copytree(run, odd)
    (odd / "step_0000003" / ckpt.STATE_NAME).write_text("{}")
    result = run_main([str(odd / "step_0000003"), "--cpu"], main=evaluate.main)
    one_line(result, "two\\nlines")


def test_a_run_folder_with_any_name_resumes_in_place(run_main, run, tiny_data, tmp_path):
    folder = tmp_path / "ünïcødé ✓ run"
    shutil.copytree(run, folder, symlinks=True)
    for p in folder.glob("step_*"):
        if p.name != "step_0000003":
            shutil.rmtree(p)
    (folder / "best").unlink()
    result = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--resume", str(folder / "step_0000003")])
    assert result.returncode == 0, result.stderr
    assert ckpt.find_latest(folder).name == "step_0000004"


def test_a_failed_download_leaves_no_empty_folder(run_main, tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True)  # as torchvision does before it downloads
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.delenv("TRAINER_OFFLINE")
    data = tmp_path / "data"
    data.mkdir()
    one_line(run_main(["--dataset", "fashion-mnist", "--data-dir", str(data), "--cpu", "--output-dir",
                       str(tmp_path / "out")]), "download failed")  # fmt: skip
    assert list(data.iterdir()) == []


def test_checkpoint_errors_name_the_file(copy):
    """The library's view: CheckpointError, never another exception."""
    (copy / ckpt.PROGRESS_NAME).unlink()
    (copy / ckpt.PROGRESS_NAME).symlink_to(copy / ckpt.RNG_NAME)
    with pytest.raises(CheckpointError, match="progress.safetensors is a link"):
        ckpt.load(copy)
