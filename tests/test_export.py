"""`python -m trainer.export` on real files: each format written, loaded by its consumer's library
(onnxruntime, torch.export.load, trainer.from_pretrained), and compared with the checkpoint's model
on real MNIST test images; predict reading the exported files; drawn architectures; refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import budget
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from safetensors.torch import save_file

import trainer
from trainer import checkpoint as ckpt
from trainer import export as ex
from trainer import predict
from trainer.data import load_split
from trainer.evaluation import load_model
from trainer.model import build_model

# ONNX Runtime's logits against torch's: the issue asks 1e-5, and here they are within 8.6e-6 of
# logits up to 17.5 (docs/exporting.md), a few float32 steps. Its kernels and their order of sums
# differ from CPU to CPU, so the test allows a few steps more: 1e-5 or 2e-6 x the largest logit.
TOLERANCE = 1e-5


def tolerance(reference: torch.Tensor) -> float:
    return max(TOLERANCE, 2e-6 * float(reference.abs().max()))


def export_main(*args: str) -> int:
    return ex.main(list(args))


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def exported(mnist_1_epoch, tmp_path_factory) -> Path:
    """The 1-epoch real-MNIST run's `best`, exported in every format through the command."""
    out = tmp_path_factory.mktemp("exported")
    for fmt, name in (("onnx", "model.onnx"), ("torch-export", "model.pt2"), ("hf", "hf")):
        assert export_main(str(mnist_1_epoch / "best"), str(out / name), "--format", fmt) == 0
    return out


@pytest.fixture(scope="module")
def mnist_test(real_data):
    split = load_split("mnist", real_data, train=False)
    return split.images.unsqueeze(1).float(), split.labels  # what predict builds: float pixels, 0-255


@pytest.fixture(scope="module")
def reference(mnist_1_epoch, mnist_test) -> torch.Tensor:
    """torch's logits of the checkpoint's model on all 10,000 test images, fed as evaluate feeds them."""
    loaded = load_model(mnist_1_epoch / "best")
    with torch.no_grad():
        return ex.PixelsToLogits(loaded.model, loaded.normalization)(mnist_test[0])


def recorded_test_score(run: Path) -> dict:
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_step"] == last["step"]  # one epoch: best is the last, scored once on the test split
    return last


def test_onnx_in_onnxruntime_gives_torchs_logits_and_predictions_on_all_test_images(
    exported, mnist_test, reference, mnist_1_epoch
):
    pixels, labels = mnist_test
    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels"] and session.get_inputs()[0].shape[1:] == [1, 28, 28]
    (logits,) = session.run(["logits"], {"pixels": pixels.numpy()})
    assert logits.shape == (10_000, 10)
    assert np.abs(logits - reference.numpy()).max() <= tolerance(reference)
    predicted = torch.from_numpy(logits).argmax(dim=1)
    assert torch.equal(predicted, reference.argmax(dim=1))
    # The same count the run's one test score has: 10,000 images, nothing dropped or padded.
    assert int((predicted == labels).sum()) == recorded_test_score(mnist_1_epoch)["test_correct"]
    for n in (1, 7):  # a dynamic batch dimension
        (few,) = session.run(["logits"], {"pixels": pixels[:n].numpy()})
        assert np.abs(few - reference[:n].numpy()).max() <= tolerance(reference)
    meta = json.loads(session.get_modelmeta().custom_metadata_map[ex.METADATA_KEY])
    assert meta["class_names"] == [str(k) for k in range(10)] and meta["input_shape"] == [1, 28, 28]
    assert meta["normalization"] == {"divide_by": 255.0, "mean": 0.0, "std": 1.0} and meta["dataset"] == "mnist"


def test_the_torch_export_program_loads_and_gives_the_same_logits(exported, mnist_test, reference):
    extra = {ex.PT2_EXTRA: ""}
    program = torch.export.load(exported / "model.pt2", extra_files=extra)
    with torch.no_grad():
        logits = program.module()(mnist_test[0])
        assert torch.equal(logits, reference)  # the same kernels as torch's eager run: bitwise here
        assert torch.equal(program.module()(mnist_test[0][:3]), reference[:3])
    assert json.loads(extra[ex.PT2_EXTRA])["class_names"] == [str(k) for k in range(10)]


def test_the_hf_folder_loads_offline_bitwise_and_evaluates_as_the_checkpoint(
    exported, mnist_test, reference, mnist_1_epoch, real_data, capsys
):
    folder = exported / "hf"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = ex.from_pretrained(folder)
    with torch.no_grad():
        logits = ex.PixelsToLogits(loaded.model, loaded.normalization)(mnist_test[0])
    assert torch.equal(logits, reference)  # the same weights, the same normalisation: bitwise
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["input_shape"]) == ("blog_resnet", 10, [1, 28, 28])
    score = recorded_test_score(mnist_1_epoch)
    card = (folder / "README.md").read_text()
    assert f"test accuracy {score['test_acc']:.4f}** ({score['test_correct']}/10000)" in card
    assert "held out of the training split" in card and "seed 12" in card
    assert config["source_sha256"] in card
    # evaluate takes the folder as it takes the checkpoint: the same counts.
    from trainer import evaluate

    capsys.readouterr()
    assert evaluate.main([str(folder), "--data-dir", str(real_data), "--cpu", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["correct"], report["seen"]) == (score["test_correct"], 10_000)


def test_a_folder_whose_config_disagrees_with_its_weights_is_refused(exported, tmp_path):
    import shutil

    folder = shutil.copytree(exported / "hf", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "class_names": list("abcdefghij")}))
    with pytest.raises(ckpt.CheckpointError, match="disagrees with model.safetensors's metadata on class_names"):
        ex.from_pretrained(folder)


def test_predict_reads_the_onnx_file_and_the_folder_as_it_reads_the_checkpoint(
    exported, mnist_test, mnist_1_epoch, tmp_path, capsys
):
    from PIL import Image

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for k in range(5):
        Image.fromarray(mnist_test[0][k, 0].to(torch.uint8).numpy()).save(pictures / f"{k}.png")
    (pictures / "9-broken.png").write_bytes(b"not a picture")
    results = {}
    for name, model in (("checkpoint", mnist_1_epoch / "best"), ("onnx", exported / "model.onnx"),
                        ("hf", exported / "hf")):  # fmt: skip
        capsys.readouterr()
        assert predict.main([str(model), str(pictures), "--top-k", "3", "--json", "-"]) == 2  # the broken file
        captured = capsys.readouterr()
        assert "9-broken.png" in captured.err and len(captured.err.strip().splitlines()) == 1
        results[name] = json.loads(captured.out)
    base = results["checkpoint"]
    assert len(base) == 6 and "error" in base[-1]
    for name in ("onnx", "hf"):
        assert [r.get("class") for r in results[name]] == [r.get("class") for r in base], name
        for mine, theirs in zip(results[name][:5], base[:5]):
            assert [t["class"] for t in mine["top_k"]] == [t["class"] for t in theirs["top_k"]]
            assert abs(mine["probability"] - theirs["probability"]) <= TOLERANCE
    # A table too, as for a checkpoint.
    assert predict.main([str(exported / "model.onnx"), str(pictures / "0.png")]) == 0
    assert "0.png" in capsys.readouterr().out


def test_predict_refuses_a_pt2_file_in_one_line(exported, tmp_path, capsys):
    """torch.export.load unpickles: a .pt2 from elsewhere could run code, so predict does not read one."""
    capsys.readouterr()
    assert predict.main([str(exported / "model.pt2"), str(tmp_path)]) == 2
    assert "can run any code" in one_line(capsys)


# --- drawn architectures: built-in for drawn image shapes and classes, and a factory, with drawn
# normalisations and weights; each exported as ONNX and as a torch.export program and compared.


def weights_file(folder: Path, model: torch.nn.Module, architecture: str, shape: tuple, classes: int,
                 normalization: dict, weights: str = "trained") -> Path:  # fmt: skip
    """A bare model.safetensors with the metadata a checkpoint's has (what export reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt", "architecture": architecture, "dataset": "imagefolder:/gone", "num_classes": str(classes),
        "class_names": json.dumps([f"c{k}" for k in range(classes)]), "normalization": json.dumps(normalization),
        "input_shape": json.dumps(list(shape)), "epoch": "1", "step": "3", "weights": weights,
    }  # fmt: skip
    factory = {} if architecture == "blog_resnet" else {"factory": architecture}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata=meta | factory)  # fmt: skip
    return folder / "model.safetensors"


@st.composite
def architectures(draw):
    architecture = draw(st.sampled_from(["blog_resnet", "helpers.models:small_cnn"]))
    # small_cnn's adaptive max pool to 4 x 4 is expressible in ONNX for sides that 4 divides
    # (test_an_architecture_..._cannot_express shows the others refused).
    side = st.integers(8, 40) if architecture == "blog_resnet" else st.integers(2, 10).map(lambda n: 4 * n)
    shape = (draw(st.sampled_from([1, 3])), draw(side), draw(side))
    classes = draw(st.integers(2, 12))
    normalization = draw(st.sampled_from([
        {"divide_by": 255.0, "mean": 0.0, "std": 1.0}, {"divide_by": 255.0, "mean": 0.1307, "std": 0.3081},
        {"divide_by": 1.0, "mean": 127.5, "std": 64.0}]))  # fmt: skip
    weights = draw(st.sampled_from(["trained", "EMA"]))
    return architecture, shape, classes, normalization, weights, draw(st.integers(0, 2**31 - 1))


@given(drawn=architectures())
@budget(3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_drawn_architectures_export_to_graphs_that_agree_with_torch(drawn, tmp_path_factory):
    architecture, shape, classes, normalization, which, seed = drawn
    torch.manual_seed(seed)
    model = build_model(architecture, classes, shape).eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("drawn")
    weights = weights_file(folder / "w", model, architecture, shape, classes, normalization, which)
    spec = None if architecture == "blog_resnet" else architecture
    pixels = torch.randint(0, 256, (5, *shape)).float()
    loaded = load_model(weights, spec)
    with torch.no_grad():
        expected = ex.PixelsToLogits(loaded.model, loaded.normalization)(pixels)
    onnx_file = ex.export(weights, "onnx", folder / "m.onnx", spec)
    (got,) = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"pixels": pixels.numpy()})  # fmt: skip
    assert got.shape == (5, classes) and np.abs(got - expected.numpy()).max() <= tolerance(expected)
    program = torch.export.load(ex.export(weights, "torch-export", folder / "m.pt2", spec))
    with torch.no_grad():
        assert torch.equal(program.module()(pixels[:2]), expected[:2])  # torch's own kernels: bitwise
    # predict's ONNX reader agrees with the classes and shape the weights' metadata give.
    read = ex.load_onnx(onnx_file)
    assert read.class_names == loaded.class_names and read.input_shape == shape and read.weights == which
    # The Hugging Face-style folder: the same module, bitwise, and which weights these are.
    again = trainer.from_pretrained(ex.export(weights, "hf", folder / "hf", spec), spec)
    assert again.weights == which and again.normalization == loaded.normalization
    with torch.no_grad():
        assert torch.equal(ex.PixelsToLogits(again.model, again.normalization)(pixels), expected)


# --- refusals: one line, exit 2, nothing already there changed


def test_a_factory_model_is_exported_only_with_its_factory_typed_again(tmp_path, capsys):
    model = build_model("helpers.models:small_cnn", 3, (1, 12, 12))
    weights = weights_file(tmp_path / "w", model, "helpers.models:small_cnn", (1, 12, 12), 3, {"divide_by": 255.0})
    assert export_main(str(weights), str(tmp_path / "m.onnx"), "--format", "onnx") == 2
    assert "pass --model helpers.models:small_cnn" in one_line(capsys) and not (tmp_path / "m.onnx").exists()
    assert export_main(str(weights), str(tmp_path / "m.pt2"), "--format", "torch-export",
                       "--model", "helpers.models:small_cnn") == 0  # fmt: skip


@pytest.mark.parametrize(
    "spec, shape, fmt, fragment",
    [("helpers.models:data_dependent", (1, 12, 12), "onnx", "ONNX cannot express this"),
     ("helpers.models:data_dependent", (1, 12, 12), "torch-export", "torch.export cannot trace this"),
     ("helpers.models:small_cnn", (1, 8, 9), "onnx", "adaptive_max_pool2d")],  # 4 x 4 from 8 x 9: not in ONNX
)  # fmt: skip
def test_an_architecture_the_exporters_cannot_express_is_one_line_and_the_old_file_stays(
    tmp_path, capsys, spec, shape, fmt, fragment
):
    weights = weights_file(tmp_path / "w", build_model(spec, 3, shape), spec, shape, 3, {})
    name = "m" + ex.SUFFIXES[fmt]
    (tmp_path / name).write_bytes(b"an earlier export")
    assert export_main(str(weights), str(tmp_path / name), "--format", fmt, "--model", spec) == 2
    line = one_line(capsys)
    assert fragment in line and "\x1b" not in line, line
    assert (tmp_path / name).read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, "w"]  # no temporary left


@pytest.mark.parametrize(
    "out, fmt, fragment",
    [("m.pt2", "onnx", "writes a .onnx file"), ("m.onnx", "torch-export", "writes a .pt2 file"),
     ("taken", "hf", "is not an exported model folder")],
)  # fmt: skip
def test_a_wrong_output_name_is_one_line(tmp_path, capsys, out, fmt, fragment):
    model = build_model("blog_resnet", 10, (1, 28, 28))
    weights = weights_file(tmp_path / "w", model, "blog_resnet", (1, 28, 28), 10, {"divide_by": 255.0})
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert export_main(str(weights), str(tmp_path / out), "--format", fmt) == 2
    assert fragment in one_line(capsys)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_full_disk_is_one_line_and_the_earlier_export_is_intact(exported, tmp_path, capsys):
    """A 240 KB file system holds one exported folder (about 155 KB) but not a second beside it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240k", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}); run as root")
    try:
        hf = exported / "hf"
        assert export_main(str(hf), str(disk / "hf"), "--format", "hf") == 0
        before = {p.name: p.read_bytes() for p in (disk / "hf").iterdir()}
        assert export_main(str(hf), str(disk / "hf"), "--format", "hf") == 2
        line = one_line(capsys)
        assert "No space left on device" in line and "nothing there was changed" in line
        assert {p.name: p.read_bytes() for p in (disk / "hf").iterdir()} == before
        assert sorted(p.name for p in disk.iterdir()) == ["hf"]
        assert ex.from_pretrained(disk / "hf").class_names == tuple(str(k) for k in range(10))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("missing", ["onnxscript", "onnxruntime"])
def test_without_the_export_extra_onnx_says_what_to_install(exported, tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if it were not installed: importing it fails
    if missing == "onnxscript":
        assert export_main(str(exported / "hf"), str(tmp_path / "m.onnx"), "--format", "onnx") == 2
    else:
        assert predict.main([str(exported / "model.onnx"), str(tmp_path)]) == 2
    assert 'pip install -e ".[export]"' in one_line(capsys)
    assert not (tmp_path / "m.onnx").exists()
