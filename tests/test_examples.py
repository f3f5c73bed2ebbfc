"""examples/ run as the README says: the image-folder example trains its own network through the
Python API, on one process and on two (gloo, as under torchrun), and resumes."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO, fork_processes, reset_accelerate

from trainer import checkpoint as ckpt


def load_example():
    spec = importlib.util.spec_from_file_location(
        "image_folder_custom_model", REPO / "examples" / "image_folder_custom_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_image_folder_example_trains_resumes_and_runs_on_two_processes(tmp_path, capsys):
    example = load_example()
    folder = example.write_demo_folder(tmp_path / "shapes", per_class=16)
    args = [str(folder), "--epochs", "2", "--batch-size", "8", "--cpu", "--output-dir", str(tmp_path / "one")]
    reset_accelerate()
    assert example.main(args) == 0
    run = tmp_path / "one" / "shapes"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["valid_seen"] for r in rows] == [24, 24]  # 3 classes x 8 test images, every one counted
    meta = ckpt.load(ckpt.find_latest(run)).model_metadata
    assert meta["architecture"].endswith(":SmallNet") and json.loads(meta["class_names"]) == ["bar", "ring", "square"]
    reset_accelerate()
    assert example.main([*args, "--resume", "latest"]) == 0  # a finished run stays finished
    assert "run already complete" in capsys.readouterr().out
    reset_accelerate()
    assert example.main(args) == 0  # the same command again: it continues the run (here: complete)
    assert "run already complete" in capsys.readouterr().out

    two_args = [str(folder), "--epochs", "1", "--batch-size", "8", "--cpu", "--output-dir", str(tmp_path / "two")]
    two = fork_processes(two_args, nproc=2, target=example.main)
    result = two.wait()
    assert result.codes == [0, 0], two.read(0) + two.read(1)
    rows = [json.loads(line) for line in (tmp_path / "two" / "shapes" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["num_processes"] == 2 and rows[0]["valid_seen"] == 24 and rows[0]["step"] == 3  # 48 / (8 x 2)
    assert two.read(0, "out").count("best: epoch 1,") == 1 and "best:" not in two.read(1, "out")
