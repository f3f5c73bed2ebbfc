"""Any checkpoint we did not write exactly is refused in one line: hypothesis draws edits of a real
checkpoint's files (any JSON value at any place of state.json and the manifest, missing and extra
keys, tensors dropped, added, retyped, reshaped, truncated or rewritten, model metadata, links,
FIFOs, folders and extra files in the checkpoint folder, with and without a recomputed manifest)
and each is tried with `evaluate`, `--init-from` and `--resume`. Every run ends with exit 0, 2 or 3
and at most one line, never a traceback, a hang or an import of code the checkpoint names, and
writes nothing outside the run folder. Before the schema (commit c49288c's code), such edits ended
in tracebacks (KeyError, TypeError, RecursionError, ValueError, AttributeError, struct.error), and
before issue 28's checks in hangs (FIFOs), MemoryError (/dev/zero) and imports (config.model)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import budget, main_in_process, reset_accelerate, tiny_args
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer import checkpoint as ckpt
from trainer import evaluate

# A small network: the files and the checks are the same for any model, and each try costs less.
MODEL = ["--model", "helpers.models:small_cnn"]
# A module that says so when it is imported: no checkpoint may make a command import it.
PLANTED = "import os, pathlib\npathlib.Path(os.environ['PLANTED_MARK']).touch()\ndef factory(**kw):\n    return None\n"
TENSOR_FILES = [ckpt.MODEL_NAME, ckpt.OPTIMIZER_NAME, ckpt.RNG_NAME, ckpt.PROGRESS_NAME, ckpt.EMA_NAME]
ALL_FILES = [*TENSOR_FILES, ckpt.STATE_NAME, ckpt.MANIFEST_NAME]


@pytest.fixture(scope="module")
def source(tiny_data, tmp_path_factory) -> Path:
    """A mid-epoch checkpoint with every file (AdamW, EMA, clipping) and an epoch of history, two
    steps before its run's end."""
    out = tmp_path_factory.mktemp("fuzz-source")
    args = tiny_args(tiny_data, out, "--epochs", "2", "--limit-train-batches", "4", "--save-every", "2", *MODEL,
                     "--optimizer", "adamw", "--lr", "0.01", "--ema", "0.9", "--clip-grad-norm", "1",
                     "--keep-last", "9")  # fmt: skip
    assert main_in_process(args) == 0
    return out / "mnist" / "step_0000006"


@contextmanager
def no_hang(seconds: int = 60):
    """A hang (a read of a FIFO, say) fails the test instead of stopping the suite."""

    def hung(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def rewrite_manifest(folder: Path) -> None:
    """As a user who edits files would: every listed regular file's size and sha256 recomputed."""
    manifest = json.loads((folder / ckpt.MANIFEST_NAME).read_text())
    for name in list(manifest["files"]) if isinstance(manifest.get("files"), dict) else []:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt.MANIFEST_NAME).write_text(json.dumps(manifest))


def json_paths(tree, prefix=()) -> list[tuple]:
    """Every place in a JSON tree (dict keys and list indices), up to a few levels deep."""
    found = []
    if isinstance(tree, dict | list) and len(prefix) < 4:
        items = tree.items() if isinstance(tree, dict) else list(enumerate(tree))[:3]
        for key, value in items:
            found.append((*prefix, key))
            found += json_paths(value, (*prefix, key))
    return found


def set_path(tree, path, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    if value is DELETE and isinstance(tree, dict):
        del tree[path[-1]]
    elif value is not DELETE:
        tree[path[-1]] = value


DELETE = object()
NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 624, 625, 2**32, 2**63, 0.5, 1e308]))  # fmt: skip
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8), st.sampled_from(["planted:factory", "params"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def edits(draw, folder: Path) -> str:
    """Draws one edit of the checkpoint in `folder`, makes it, and says what it was."""
    kind = draw(st.sampled_from(["state", "state", "manifest", "listing", "tensor", "metadata", "rng", "entry"]))
    state_path, manifest_path = folder / ckpt.STATE_NAME, folder / ckpt.MANIFEST_NAME
    if kind == "listing" and manifest_path.is_file() and not manifest_path.is_symlink():
        manifest = json.loads(manifest_path.read_text())
        listed = sorted(manifest["files"]) if isinstance(manifest.get("files"), dict) else []
        kept = draw(st.lists(st.sampled_from(listed), unique=True)) if listed else []
        manifest["files"] = {k: v for k, v in manifest["files"].items() if k in kept} if listed else {}
        manifest_path.write_text(json.dumps(manifest))
        what = f"the manifest lists only {kept}"
    elif kind in ("state", "manifest", "listing"):
        kind = "state" if kind == "listing" else kind
        path = state_path if kind == "state" else manifest_path
        tree = json.loads(path.read_text())
        where = draw(st.sampled_from(json_paths(tree)))
        value = draw(st.one_of(JSON, st.just(DELETE)))
        set_path(tree, where, value)
        text = json.dumps(tree)
        if draw(st.booleans()) and kind == "manifest":  # a key twice, the last one empty
            text = text[:-1] + ', "files": {}}'
        path.write_text(text)
        what = f"{kind} {'.'.join(map(str, where))} = {'deleted' if value is DELETE else repr(value)[:60]}"
    elif kind in ("tensor", "rng", "metadata"):
        name = ckpt.RNG_NAME if kind == "rng" else ckpt.MODEL_NAME if kind == "metadata" else draw(
            st.sampled_from(TENSOR_FILES))  # fmt: skip
        path = folder / name
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
        key = draw(st.sampled_from(sorted(tensors)))
        if kind == "metadata":
            field = draw(st.sampled_from(["input_shape", "num_classes", "class_names", "normalization", "step",
                                          "architecture", "dataset", "epoch"]))  # fmt: skip
            value = draw(st.one_of(JSON.map(json.dumps), st.sampled_from(["[1, 28, 28]", "[-1, 28, 28]",
                                   "[100000000, 28, 28]", "[1, 100000, 100000]", "10000000", "0"])))  # fmt: skip
            metadata[field] = value
            what = f"metadata {field} = {value[:60]}"
        elif kind == "rng":
            flat = tensors[key].view(-1)
            at = draw(st.integers(0, flat.numel() - 1))
            flat[at] = draw(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-1, 256, 2**32, 625, 10**15]))
            what = f"rng {key}[{at}] = {int(flat[at])}"
        else:
            change = draw(st.sampled_from(["drop", "add", "dtype", "shape", "truncate", "value"]))
            if change == "drop":
                del tensors[key]
            elif change == "add":
                tensors["extra.weight"] = torch.zeros(3)
            elif change == "dtype":
                tensors[key] = tensors[key].to(draw(st.sampled_from([torch.float16, torch.int32, torch.float64])))
            elif change == "shape":
                tensors[key] = torch.zeros(tensors[key].numel() + draw(st.integers(-1, 2)) or 1)
            elif change == "value":
                tensors[key] = torch.full_like(tensors[key], draw(NUMBERS.filter(lambda v: abs(v) < 1e30)))
            what = f"{name}: {change} {key}"
            if change == "truncate":
                data = path.read_bytes()
                path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
        if not what.endswith("truncate " + key):
            save_file(tensors, path, metadata=metadata)
    else:  # what the folder holds: links, FIFOs, folders in place of a file, or beside the files
        name = draw(st.sampled_from([*ALL_FILES, "extra.bin"]))
        if name == ckpt.MANIFEST_NAME and draw(st.booleans()):
            name = ckpt.STATE_NAME  # what is read after the manifest, more often
        entry = draw(st.sampled_from(["fifo", "link-zero", "link-outside", "link-inside", "folder", "empty"]))
        path = folder / name
        if path.exists() or path.is_symlink():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if entry == "fifo":
            os.mkfifo(path)
        elif entry == "link-zero":
            path.symlink_to("/dev/zero")
        elif entry == "link-outside":
            outside = folder.parent.parent / "outside.json"
            outside.write_text("{}")
            path.symlink_to(outside)
        elif entry == "link-inside":
            path.symlink_to(ckpt.STATE_NAME if name != ckpt.STATE_NAME else ckpt.MODEL_NAME)
        elif entry == "folder":
            path.mkdir()
        else:
            path.touch()
        what = f"{name} is {entry}"
        if draw(st.booleans()) and manifest_path.is_file() and not manifest_path.is_symlink():
            manifest = json.loads(manifest_path.read_text())  # and the manifest no longer lists it
            if isinstance(manifest.get("files"), dict):
                manifest["files"].pop(name, None)
                manifest_path.write_text(json.dumps(manifest))
                what += ", unlisted"
    if draw(st.booleans()) and manifest_path.is_file() and not manifest_path.is_symlink():
        try:
            rewrite_manifest(folder)
            what += ", manifest recomputed"
        except (ValueError, AttributeError, TypeError):
            pass  # a manifest made unreadable stays so
    return what


def tree(root: Path, skip: Path) -> dict[str, int]:
    return {str(p): p.lstat().st_mtime_ns for p in root.rglob("*") if skip not in p.parents and p != skip}


def one_line_or_success(code: int, err: str, what: str, command: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code in (0, 2, 3) and "Traceback" not in err, f"{command}, {what}: {err}"
    assert code == 0 or (len(lines) == 1 and lines[0].startswith("trainer: error:")), f"{command}, {what}: {err}"


@budget(40, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_edited_checkpoint_is_refused_in_one_line_or_used(source, tiny_data, tmp_path, run_main, capsys,
                                                                monkeypatch, data):  # fmt: skip
    planted, mark = tmp_path / "planted.py", tmp_path / "imported"
    planted.write_text(PLANTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PLANTED_MARK", str(mark))
    n = next(COUNTER)
    run = tmp_path / f"m{n}" / "mnist"
    folder = run / source.name
    shutil.copytree(source, folder)
    what = "; ".join(data.draw(edits(folder)) for _ in range(data.draw(st.integers(1, 3))))
    outside = tree(tmp_path, run)
    with no_hang():
        reset_accelerate()
        capsys.readouterr()
        code = evaluate.main([str(folder), "--data-dir", str(tiny_data), "--cpu", "--json", str(run / "e.json"),
                              *MODEL])  # fmt: skip
        one_line_or_success(code, capsys.readouterr().err, what, "evaluate")
        args = ["--data-dir", str(tiny_data), "--progress", "plain", "--batch-size", "64", "--epochs", "1", *MODEL]
        result = run_main([*args, "--output-dir", str(run / "branch"), "--init-from", str(folder)])
        one_line_or_success(result.returncode, result.stderr, what, "--init-from")
        result = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--resume", str(folder), *MODEL])
        one_line_or_success(result.returncode, result.stderr, what, "--resume")
    assert not mark.exists(), f"{what}: a command imported code that the checkpoint named"
    assert tree(tmp_path, run) == outside, f"{what}: something was written outside the run folder"
    shutil.rmtree(run.parent)


COUNTER = itertools.count()


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
