"""Any checkpoint we did not write exactly is refused in one line: a seeded fuzz of a real
checkpoint's files (types, missing and extra keys, ranges, shapes, dtypes, truncation, nesting
depth, with and without a recomputed manifest), each tried with `evaluate` and with `--resume`.
Every run ends with exit 0, 2 or 3 and at most one line, never a traceback, and writes nothing
outside the run folder. Before the schema (commit c49288c's code), the same mutations ended in
tracebacks (KeyError, TypeError, RecursionError, ValueError, AttributeError, struct.error)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import main_in_process, reset_accelerate, tiny_args
from safetensors.torch import load_file, save_file

from trainer import checkpoint as ckpt
from trainer import evaluate

MUTATIONS = 60  # each is an evaluate and a resume of two steps on the tiny data
# A small network: the files and the checks are the same for any model, and each try costs less.
MODEL = ["--model", "helpers.models:small_cnn"]
ODD_VALUES = ["fast", -1, 10**12, 1.5, None, True, [], {}, [1, "x"], float("nan"), "", 2**63]


@pytest.fixture(scope="module")
def source(tiny_data, tmp_path_factory) -> Path:
    """A mid-epoch checkpoint with every file (AdamW, EMA, clipping), two steps before its run's end."""
    out = tmp_path_factory.mktemp("fuzz-source")
    args = tiny_args(tiny_data, out, "--epochs", "1", "--limit-train-batches", "4", "--save-every", "2", *MODEL,
                     "--optimizer", "adamw", "--lr", "0.01", "--ema", "0.9", "--clip-grad-norm", "1")  # fmt: skip
    assert main_in_process(args) == 0
    return out / "mnist" / "step_0000002"


def rewrite_manifest(folder: Path) -> None:
    manifest = json.loads((folder / ckpt.MANIFEST_NAME).read_text())
    for name in list(manifest["files"]) if isinstance(manifest.get("files"), dict) else []:
        if (folder / name).is_file():
            data = (folder / name).read_bytes()
            manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt.MANIFEST_NAME).write_text(json.dumps(manifest))


def set_path(tree, path: list, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def json_paths(tree, prefix=()) -> list[tuple]:
    """Every place in a JSON tree (dict keys and list indices), up to a few levels deep."""
    found = []
    if isinstance(tree, dict | list) and len(prefix) < 4:
        items = tree.items() if isinstance(tree, dict) else list(enumerate(tree))[:3]
        for key, value in items:
            found.append((*prefix, key))
            found += json_paths(value, (*prefix, key))
    return found


def mutate(folder: Path, rng: random.Random) -> str:
    """One mutation of one file of the checkpoint in `folder`; returns what it did."""
    kind = rng.choice(["state-value", "state-value", "state-delete", "state-add", "state-deep", "state-truncate",
                       "manifest", "tensor-drop", "tensor-add", "tensor-dtype", "tensor-shape", "tensor-truncate",
                       "state-range"])  # fmt: skip
    state_path = folder / ckpt.STATE_NAME
    if kind.startswith("state"):
        state = json.loads(state_path.read_text())
        paths = json_paths(state)
        if kind == "state-value":
            path, value = rng.choice(paths), rng.choice(ODD_VALUES)
            set_path(state, list(path), value)
            what = f"state {'.'.join(map(str, path))} = {value!r}"
        elif kind == "state-delete":
            path = rng.choice([p for p in paths if isinstance(p[-1], str)])
            parent = state
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
            what = f"state without {'.'.join(map(str, path))}"
        elif kind == "state-add":
            state[rng.choice(["extra", "step_", "config_"])] = 1
            what = "state with an extra key"
        elif kind == "state-range":
            key, value = rng.choice([("samples_in_epoch", 10**6), ("epoch", 7), ("step", -3),
                                     ("optimizer_param_groups", []), ("world_size", 5)])  # fmt: skip
            state[key] = value
            what = f"state {key} = {value!r}"
        elif kind == "state-deep":
            state_path.write_text('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
            what = "state nested 100,000 deep"
        else:
            data = state_path.read_bytes()
            state_path.write_bytes(data[: rng.randrange(len(data))])
            what = "state truncated"
        if kind not in ("state-deep", "state-truncate"):
            state_path.write_text(json.dumps(state))
    elif kind == "manifest":
        manifest = json.loads((folder / ckpt.MANIFEST_NAME).read_text())
        change = rng.choice(["files-list", "version", "name", "size"])
        if change == "files-list":
            manifest["files"] = list(manifest["files"])
        elif change == "version":
            manifest["format_version"] = 99
        elif change == "name":
            manifest["files"]["../../outside"] = {"size": 1, "sha256": "0" * 64}
        else:
            manifest["files"][ckpt.MODEL_NAME]["size"] = "big"
        (folder / ckpt.MANIFEST_NAME).write_text(json.dumps(manifest))
        return f"manifest {change}"  # a recomputed manifest would undo it
    else:
        name = rng.choice([ckpt.MODEL_NAME, ckpt.OPTIMIZER_NAME, ckpt.RNG_NAME, ckpt.PROGRESS_NAME, ckpt.EMA_NAME])
        path = folder / name
        if kind == "tensor-truncate":
            data = path.read_bytes()
            path.write_bytes(data[: rng.randrange(len(data))])
            what = f"{name} truncated"
        else:
            tensors = load_file(path)
            key = rng.choice(sorted(tensors)) if tensors else None
            if kind == "tensor-drop" and key:
                del tensors[key]
            elif kind == "tensor-add":
                tensors["extra.weight"] = torch.zeros(3)
            elif kind == "tensor-dtype" and key:
                tensors[key] = tensors[key].to(rng.choice([torch.float16, torch.int32, torch.float64]))
            elif kind == "tensor-shape" and key:
                tensors[key] = torch.zeros(tensors[key].numel() + 1)
            save_file(tensors, path, metadata={"format": "pt"} if name != ckpt.MODEL_NAME else
                      load_metadata(path))  # fmt: skip
            what = f"{name}: {kind} {key}"
    if rng.random() < 0.8:  # as a user who edits files would: the sha256 check then passes
        rewrite_manifest(folder)
        what += ", manifest recomputed"
    return what


def load_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001
        return {}


def tree(root: Path, skip: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and skip not in p.parents}


def test_every_mutated_checkpoint_is_refused_in_one_line_or_used(source, tiny_data, tmp_path, run_main, capsys):
    rng = random.Random(20)
    outcomes: dict[str, int] = {}
    before = tree(tiny_data, tmp_path)
    for i in range(MUTATIONS):
        run = tmp_path / f"m{i}" / "mnist"
        folder = run / source.name
        shutil.copytree(source, folder)
        what = mutate(folder, rng)
        outside = tree(tmp_path, run)
        reset_accelerate()
        capsys.readouterr()
        code = evaluate.main([str(folder), "--data-dir", str(tiny_data), "--cpu", "--json", str(run / "e.json"),
                              *MODEL])  # fmt: skip
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code in (0, 2) and len(lines) <= 1 and "Traceback" not in err, f"evaluate, {what}: {err}"
        result = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--resume", str(folder), *MODEL])
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
        assert result.returncode in (0, 2, 3), f"resume, {what}: {result.stderr}"
        assert result.returncode == 0 or (len(lines) == 1 and lines[0].startswith("trainer: error:")), (
            f"resume, {what}: {result.stderr}"
        )
        assert tree(tmp_path, run) == outside, f"{what}: something was written outside the run folder"
        outcomes[f"{code}/{result.returncode}"] = outcomes.get(f"{code}/{result.returncode}", 0) + 1
    assert tree(tiny_data, tmp_path) == before
    print("evaluate/resume exit codes:", outcomes)
    assert outcomes.get("2/2", 0) >= MUTATIONS // 2  # most mutations are refused; the test is not vacuous


FACTORIES = """
import torch
def raises(num_classes, in_channels):
    raise RuntimeError("no GPU found for my model")
def returns_a_string(num_classes, in_channels):
    return "a model"
def wrong_outputs(num_classes, in_channels):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, num_classes + 2))
def no_arguments():
    return torch.nn.Linear(1, 1)
"""


@pytest.mark.parametrize(
    "spec, fragment",
    [("userfactories:raises", "raised RuntimeError: no GPU found for my model"),
     ("userfactories:returns_a_string", "returned a str, not a torch.nn.Module"),
     ("userfactories:wrong_outputs", "10 classes (0, 1, 2, 3, ...) for a model with 12 outputs"),
     ("userfactories:no_arguments", "must accept num_classes= and in_channels="),
     ("userbroken:anything", "cannot import it (ZeroDivisionError: division by zero)")],
    ids=["raises", "not-a-module", "wrong-outputs", "no-arguments", "import-fails"],
)  # fmt: skip
def test_a_model_factory_that_fails_is_one_line(run_main, tiny_data, tmp_path, monkeypatch, spec, fragment):
    (tmp_path / "userfactories.py").write_text(FACTORIES)
    (tmp_path / "userbroken.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_main(tiny_args(tiny_data, tmp_path / "out", "--model", spec))
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
