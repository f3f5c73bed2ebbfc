"""CUDA: `pytest -m gpu` on a machine with a GPU (skipped elsewhere). Run with the rest of the
prepared GPU check, `bash benchmarks/gpu_check.sh` (see benchmarks/README.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# cuBLAS needs this before its first handle for deterministic matrix products (resume equality).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import reset_accelerate, tiny_args  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from trainer import checkpoint as ckpt  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def gpu_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = tiny_args(data, out, *extra)
    return [a for a in args if a != "--cpu"]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_hundreds_of_steps_in_each_precision(run_main, tiny_data, tmp_path, precision):
    result = run_main(gpu_args(tiny_data, tmp_path, "--epochs", "13", "--mixed-precision", precision))
    assert result.returncode == 0, result.stderr
    assert "device: cuda" in result.stdout and f"precision: {precision}" in result.stdout
    records = rows(tmp_path / "mnist")
    assert records[-1]["step"] == 13 * 24 and all(r["valid_seen"] == 1001 for r in records)
    assert all(r["train_loss"] == r["train_loss"] for r in records)  # finite: no NaN
    assert records[-1]["valid_acc"] > 0.8 and records[-1]["mixed_precision"] == precision
    state = json.loads((ckpt.find_latest(tmp_path / "mnist") / ckpt.STATE_NAME).read_text())
    assert (state["grad_scaler"] is not None) == (precision == "fp16")


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_mid_epoch_resume_is_exact(run_main, tiny_data, tmp_path, deterministic, precision):
    """fp32 bitwise with deterministic algorithms; fp16 exact with the scaler's state restored."""
    flags = ["--epochs", "3", "--save-every", "10", "--keep-last", "100", "--mixed-precision", precision]
    assert run_main(gpu_args(tiny_data, tmp_path / "a", *flags)).returncode == 0
    unbroken = tmp_path / "a" / "mnist"
    resumed = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--output-dir", str(tmp_path / "b"),
                        "--run-name", "r", "--resume", str(unbroken / "step_0000030")])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    a, b = (
        load_file(unbroken / "step_0000072" / ckpt.MODEL_NAME),
        load_file(tmp_path / "b" / "r" / "step_0000072" / ckpt.MODEL_NAME),
    )
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    keys = ("train_loss", "valid_loss", "valid_correct", "lr")
    assert [[r[k] for k in keys] for r in rows(unbroken)] == [[r[k] for k in keys] for r in rows(tmp_path / "b" / "r")]
    if precision == "fp16":
        sa = json.loads((unbroken / "step_0000072" / ckpt.STATE_NAME).read_text())["grad_scaler"]
        sb = json.loads((tmp_path / "b" / "r" / "step_0000072" / ckpt.STATE_NAME).read_text())["grad_scaler"]
        assert sa == sb


def test_fp16_with_clipping_and_accumulation_resumes_exactly(run_main, tiny_data, tmp_path, deterministic):
    """accelerate#641's case: fp16's scaler, clipping after unscaling once per optimizer step, and
    accumulation; a mid-epoch resume gives the unbroken run's weights, EMA and scaler."""
    flags = [
        "--epochs",
        "2",
        "--save-every",
        "5",
        "--keep-last",
        "100",
        "--mixed-precision",
        "fp16",
        "--grad-accum",
        "2",
        "--clip-grad-norm",
        "1.0",
        "--ema",
        "0.9",
        "--optimizer",
        "adamw",
        "--lr",
        "0.01",
    ]
    assert run_main(gpu_args(tiny_data, tmp_path / "a", *flags)).returncode == 0
    unbroken = tmp_path / "a" / "mnist"
    records = rows(unbroken)
    assert [r["step"] for r in records] == [12, 24] and all(r["grad_norm_max"] > 0 for r in records)
    resumed = run_main(["--data-dir", str(tiny_data), "--progress", "plain", "--output-dir", str(tmp_path / "b"),
                        "--run-name", "r", "--resume", str(unbroken / "step_0000015")])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    for name in (ckpt.MODEL_NAME, ckpt.EMA_NAME):
        a, b = load_file(unbroken / "step_0000024" / name), load_file(tmp_path / "b" / "r" / "step_0000024" / name)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name
    sa = json.loads((unbroken / "step_0000024" / ckpt.STATE_NAME).read_text())["grad_scaler"]
    assert sa == json.loads((tmp_path / "b" / "r" / "step_0000024" / ckpt.STATE_NAME).read_text())["grad_scaler"]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_steps_never_synchronise(run_main, tiny_data, tmp_path, monkeypatch, precision):
    """From the second step of each epoch until the epoch's end, any call that makes the host
    wait for the GPU raises (torch.cuda.set_sync_debug_mode("error")). fp16 is left out: torch's
    GradScaler reads found_inf on the host every step."""
    from trainer import engine
    from trainer.console import Reporter

    real_input, real_end, steps = engine.model_input, Reporter.end_epoch, []

    def strict_from_step_two(*args, **kwargs):
        steps.append(1)
        if len(steps) % 24 == 2:
            torch.cuda.set_sync_debug_mode("error")
        return real_input(*args, **kwargs)

    def relaxed(self):
        torch.cuda.set_sync_debug_mode(0)
        return real_end(self)

    monkeypatch.setattr(engine, "model_input", strict_from_step_two)
    monkeypatch.setattr(Reporter, "end_epoch", relaxed)
    try:
        result = run_main(gpu_args(tiny_data, tmp_path, "--epochs", "2", "--mixed-precision", precision))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.returncode == 0, result.stderr
    assert len(steps) == 48


def test_evaluate_and_predict_on_the_gpu_agree_with_the_cpu(tiny_run, tiny_data, tmp_path, capsys):
    from PIL import Image

    from trainer import evaluate, predict
    from trainer.data import load_split

    results = {}
    for where in ("cuda", "cpu"):
        out = tmp_path / f"{where}.json"
        reset_accelerate()
        flags = ["--cpu"] if where == "cpu" else []
        assert evaluate.main([str(tiny_run / "best"), "--data-dir", str(tiny_data), "--json", str(out), *flags]) == 0
        results[where] = json.loads(out.read_text())
    reset_accelerate()
    assert results["cuda"]["seen"] == results["cpu"]["seen"] == 1001
    assert abs(results["cuda"]["correct"] - results["cpu"]["correct"]) <= 2  # argmax ties may differ
    split = load_split("mnist", tiny_data, train=False)
    paths = []
    for i in range(10):
        path = tmp_path / f"{i}.png"
        Image.fromarray(split.images[i].numpy(), mode="L").save(path)
        paths.append(str(path))
    capsys.readouterr()
    answers = {}
    for device, flags in (("cuda", []), ("cpu", ["--cpu"])):  # the GPU unless --cpu, as every command
        assert predict.main([str(tiny_run / "best"), *paths, "--json", *flags]) == 0
        answers[device] = [r["class"] for r in json.loads(capsys.readouterr().out)]
    assert answers["cuda"] == answers["cpu"]
