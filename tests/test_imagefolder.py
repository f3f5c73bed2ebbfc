"""--dataset imagefolder:PATH: a folder of class folders of images, trained, evaluated and predicted
with no further flags; the decoded images are cached by content; --model builds your own network."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import main_in_process, reset_accelerate
from PIL import Image
from safetensors import safe_open

from trainer import checkpoint as ckpt
from trainer import evaluate, evaluation, predict

NAMES = ("zebra", "apple", "mango")  # written in this order; the classes are their sorted order
CLASSES = sorted(NAMES)
N_TRAIN, N_TEST = 24, 7  # per class
TEST_IMAGES = len(NAMES) * N_TEST


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def draw(label: int, size: tuple[int, int], rgb: bool, seed: int) -> Image.Image:
    """Class k: a bright horizontal bar in the k-th third of the image, over dim noise (in colour: a
    bar of a random colour, so that the place, not the colour, tells the class)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    third = h // 3
    top = label * third + third // 2 - 1
    if rgb:
        pixels = torch.randint(0, 60, (h, w, 3), generator=g)
        pixels[top : top + 2] += torch.randint(120, 196, (3,), generator=g)
    else:
        pixels = torch.randint(0, 60, (h, w), generator=g)
        pixels[top : top + 2] += 180
    return Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy())  # mode L, or RGB for H x W x 3


def write_folder(root: Path, size: tuple[int, int], rgb: bool, test: str = "test") -> Path:
    """root/train/<name>/NN.png and root/<test>/<name>/NN.png; size is (height, width)."""
    for split, n, offset in (("train", N_TRAIN, 0), (test, N_TEST, 10_000)):
        for name in NAMES:
            folder = root / split / name
            folder.mkdir(parents=True)
            label = CLASSES.index(name)
            for i in range(n):
                draw(label, size, rgb, offset + 100 * label + i).save(folder / f"{i:02d}.png")
    return root


def train_args(folder: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", f"imagefolder:{folder}", "--data-dir", str(data_dir), "--output-dir", str(out),
        "--batch-size", "8", "--eval-batch-size", "16", "--epochs", "3", "--cpu", "--progress", "plain", *extra,
    ]  # fmt: skip


def quick(*extra: str) -> list[str]:
    """One epoch of one step: enough to decode, train, evaluate and save."""
    return ["--epochs", "1", "--limit-train-batches", "1", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metadata(run: Path) -> dict[str, str]:
    with safe_open(ckpt.find_latest(run) / "model.safetensors", framework="pt") as f:
        return f.metadata()


def split_images(folder: Path, split: str = "test") -> list[tuple[str, str]]:
    """(path, class folder name) of every image of a split."""
    return [(str(p), p.parent.name) for p in sorted((folder / split).glob("*/*.png"))]


def one_line_error(result, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per kind, (image folder, run folder) of 3 epochs trained through the CLI: grey 16x16, and
    RGB 12 high x 20 wide. The run folders take their image folders' names (no --run-name)."""
    runs = {}
    for kind, size, rgb in (("grey", (16, 16), False), ("rgb", (12, 20), True)):
        root = tmp_path_factory.mktemp(kind)
        folder = write_folder(root / f"shapes-{kind}", size, rgb)
        assert main_in_process(train_args(folder, root / "data", root / "out")) == 0
        runs[kind] = (folder, root / "out" / folder.name)
    return runs


@pytest.mark.parametrize("kind, shape", [("grey", [1, 16, 16]), ("rgb", [3, 12, 20])], ids=["grey", "rgb"])
def test_image_folder_trains_in_its_own_run_folder(trained, kind, shape):
    """Grey images train a 1-channel network, colour ones a 3-channel one, at the images' size;
    every test image is counted and the bars are learnt."""
    folder, run = trained[kind]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["valid_seen"] for r in rows] == [TEST_IMAGES] * 3
    # Chance is 1/3. The blog's network ends in a ReLU, so so short a run may leave one class's
    # logit dead (2/3 right); a pipeline that loses the labels stays near 1/3.
    assert rows[-1]["valid_acc"] >= 0.6, rows
    meta = metadata(run)
    assert json.loads(meta["input_shape"]) == shape
    assert json.loads(meta["class_names"]) == CLASSES


@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_evaluate_and_predict_need_no_flags(trained, run_main, tmp_path, monkeypatch, kind):
    """evaluate finds the images and the classes from the checkpoint alone and counts what training
    counted; predict names each image's class by its folder name, and gets as many right."""
    folder, run = trained[kind]
    monkeypatch.chdir(tmp_path)  # whatever a default path would write lands here
    latest = ckpt.find_latest(run)
    last = read_jsonl(run / "metrics.jsonl")[-1]
    result = run_main([str(latest), "--cpu", "--json"], main=evaluate.main)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["class_names"] == CLASSES
    assert (summary["correct"], summary["seen"]) == (last["valid_correct"], TEST_IMAGES)
    assert summary["accuracy"] == pytest.approx(last["valid_acc"])

    images = split_images(folder)
    result = run_main([str(latest), *(p for p, _ in images), "--cpu", "--json"], main=predict.main)
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert [r["image"] for r in predictions] == [p for p, _ in images]
    assert {"image", "class", "name", "probability", "top_k"} <= set(predictions[0])
    assert all(r["name"] == CLASSES[r["class"]] for r in predictions)
    right = sum(r["name"] == name for r, (_, name) in zip(predictions, images))
    assert right == last["valid_correct"]
    # The model sees each file's own pixels / 255, as in training: the same probabilities.
    expected = model_probabilities(latest, [p for p, _ in images])
    for r, p in zip(predictions, expected):
        assert r["class"] == int(p.argmax())
        assert r["probability"] == pytest.approx(float(p.max()), rel=1e-5)


def model_probabilities(checkpoint: Path, files: list[str]) -> torch.Tensor:
    """The checkpoint's model on the files' pixels, decoded here with PIL: [N, classes]."""
    decoded = []
    for file in files:
        with Image.open(file) as image:
            decoded.append(torch.from_numpy(np.array(image)))
    pixels = torch.stack(decoded).float() / 255
    inputs = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)  # grey, or H x W x RGB
    with torch.no_grad():
        return evaluation.load_model(checkpoint).model(inputs).softmax(dim=1)


def test_second_run_reads_the_cache_and_new_content_or_size_is_decoded_again(run_main, tmp_path, monkeypatch):
    """The images are decoded once per content and size: a second run on the same --data-dir
    opens no image file and leaves the cache file alone; a changed image or --image-size is a
    new decode."""
    folder = write_folder(tmp_path / "shapes", (16, 16), rgb=False)
    changed = folder / "test" / "zebra" / "00.png"
    # Stored without compression: new pixels later give a file of the same name and the same size.
    Image.open(changed).copy().save(changed, compress_level=0)
    data, out = tmp_path / "data", tmp_path / "out"
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)

    def run(name: str, *extra: str) -> str:
        opened.clear()
        result = run_main(train_args(folder, data, out, *quick("--run-name", name, *extra)))
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    text = run("first")
    assert "decoded" in text and "from the cache" not in text
    assert opened  # the negative control of the no-decoding check below
    cached = {p: p.stat().st_mtime_ns for p in (data / "imagefolder").rglob("*.safetensors")}
    assert len(cached) == 1, cached

    text = run("second")
    assert "from the cache" in text
    assert not opened, opened[:3]
    assert {p: p.stat().st_mtime_ns for p in (data / "imagefolder").rglob("*.safetensors")} == cached

    text = run("resized", "--image-size", "8x12")  # 8 high, 12 wide
    assert "decoded" in text and "from the cache" not in text
    assert json.loads(metadata(out / "resized")["input_shape"]) == [1, 8, 12]

    size = changed.stat().st_size
    draw(0, (16, 16), False, seed=99).save(changed, compress_level=0)
    assert changed.stat().st_size == size  # only the content says that it changed
    text = run("changed")
    assert "decoded" in text and "from the cache" not in text
    assert opened


def test_val_folder_stands_in_for_test_and_image_size_resizes(run_main, tmp_path):
    """PATH/val/ is read when there is no PATH/test/; --image-size N is N x N."""
    folder = write_folder(tmp_path / "shapes", (16, 16), rgb=False, test="val")
    result = run_main(train_args(folder, tmp_path / "data", tmp_path / "out", *quick("--image-size", "10")))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "out" / "shapes"
    assert read_jsonl(run / "metrics.jsonl")[-1]["valid_seen"] == TEST_IMAGES
    assert json.loads(metadata(run)["input_shape"]) == [1, 10, 10]
    # predict brings an image of another size to the model's.
    result = run_main([str(ckpt.find_latest(run)), str(folder / "train" / "apple" / "00.png"), "--cpu", "--json"],
                      main=predict.main)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["name"] in CLASSES

    # Neither test/ nor val/: a one-line error.
    shutil.rmtree(folder / "val")
    result = run_main(train_args(folder, tmp_path / "data", tmp_path / "out", *quick("--run-name", "none")))
    one_line_error(result)


def as_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "I;16":  # 16-bit grey, as scanners write it
        return Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    return image.convert(mode)


@pytest.mark.parametrize(
    "mode, channels", [("LA", 1), ("1", 1), ("I;16", 1), ("RGB", 3)], ids=["LA", "1-bit", "I16", "RGB"]
)
def test_one_colour_image_makes_the_folder_rgb(run_main, tmp_path, mode, channels):
    """Grey (1 channel) while every image is grey, whatever its grey mode; one RGB file among the
    grey ones makes 3 channels."""
    folder = write_folder(tmp_path / "shapes", (16, 16), rgb=False)
    odd = folder / "train" / "apple" / "03.png"
    as_mode(Image.open(odd), mode).save(odd)
    assert Image.open(odd).mode == mode
    result = run_main(train_args(folder, tmp_path / "data", tmp_path / "out", *quick()))
    assert result.returncode == 0, result.stderr
    assert json.loads(metadata(tmp_path / "out" / "shapes")["input_shape"]) == [channels, 16, 16]


MODULE = '''
"""A user's own network, for --model {name}:factory; notes each import in a marker file."""
from torch import nn

with open({marker!r}, "a") as marker:
    marker.write("imported\\n")


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.head = nn.Linear(8 * 16, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.conv(x).relu()).flatten(1))


def factory(num_classes, in_channels):
    return TinyNet(num_classes, in_channels)
'''


def test_own_model_trains_evaluates_and_predicts_and_is_never_imported_unasked(run_main, tmp_path, monkeypatch):
    """--model pkg:factory builds the network for training, evaluate and predict; without --model,
    evaluate and predict refuse in one line instead of importing what a checkpoint names."""
    name = "imagefolder_user_models"
    marker = tmp_path / "imported.txt"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{name}.py").write_text(MODULE.format(name=name, marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.chdir(tmp_path)
    folder = write_folder(tmp_path / "shapes", (16, 16), rgb=True)
    spec = ["--model", f"{name}:factory"]

    result = run_main(train_args(folder, tmp_path / "data", tmp_path / "out", "--epochs", "2", *spec))
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "imported\n"
    run = tmp_path / "out" / "shapes"
    latest = ckpt.find_latest(run)
    model = sys.modules[name].factory(num_classes=3, in_channels=3)
    with safe_open(latest / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())
        meta = f.metadata()
    assert meta["architecture"] == f"{name}:TinyNet"
    assert json.loads(meta["input_shape"]) == [3, 16, 16]
    last = read_jsonl(run / "metrics.jsonl")[-1]

    result = run_main([str(latest), "--cpu", "--json", *spec], main=evaluate.main)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["correct"] == last["valid_correct"]
    images = split_images(folder)
    result = run_main([str(latest), *(p for p, _ in images), "--cpu", "--json", *spec], main=predict.main)
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert sum(r["name"] == n for r, (_, n) in zip(predictions, images)) == last["valid_correct"]

    # Without --model: refused, and the module the checkpoint names is not imported (though it could be).
    del sys.modules[name]
    marker.unlink()
    refusals = [
        run_main([str(latest), "--cpu"], main=evaluate.main),
        run_main([str(latest), images[0][0], "--cpu"], main=predict.main),
    ]
    for result in refusals:
        one_line_error(result, "--model")
    assert name not in sys.modules and not marker.exists()


def test_model_that_cannot_be_imported_is_a_one_line_error(run_main, tmp_path):
    """A --model whose module does not exist is named in one line, exit code 2."""
    folder = write_folder(tmp_path / "shapes", (16, 16), rgb=False)
    args = train_args(folder, tmp_path / "data", tmp_path / "out", *quick("--model", "no_such_module_here:factory"))
    one_line_error(run_main(args), "no_such_module_here")


def test_folder_edges_hidden_files_subfolders_and_16_bit(tmp_path):
    """What real folders hold: macOS's `._x.png` companions and `.cache/` are skipped, images in a
    class's subfolders count (as torchvision's ImageFolder walks them), and 16-bit grey PNGs are
    scaled to 8 bits, not clipped at 255."""
    from trainer.imagefolder import decode_image, load_image_folder

    root = write_folder(tmp_path / "edges", (16, 16), rgb=False)
    (root / "train" / "apple" / "._00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    (root / "train" / "apple" / ".cache").mkdir()
    (root / "train" / "apple" / ".cache" / "x.png").write_bytes(b"not an image either")
    (root / "train" / "apple" / "more").mkdir()
    draw(0, (16, 16), False, 99).save(root / "train" / "apple" / "more" / "deep.png")
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256).astype(np.uint16)  # 0..65280
    Image.fromarray(ramp).save(root / "test" / "mango" / "wide.png")  # mode I;16
    train, test, names, _ = load_image_folder(root, tmp_path / "data", None, say=lambda _: None)
    assert names == tuple(CLASSES)
    assert len(train[1]) == 3 * N_TRAIN + 1 and len(test[1]) == TEST_IMAGES + 1
    wide = decode_image(root / "test" / "mango" / "wide.png", grey=True, size=(16, 16))
    assert wide.flatten().tolist() == sorted(wide.flatten().tolist()) and len(set(wide.flatten().tolist())) > 200
    assert int(wide.max()) == 254 and int(wide.min()) == 0  # PIL's own "L" conversion gives 255 for 99.6%


def test_a_cache_that_cannot_be_written_is_said_and_a_single_class_is_refused(tmp_path):
    """The data folder's imagefolder/ is taken by a file: each run decodes, says the cache was not
    written and why, and leaves nothing behind. One class folder is no classifier: one line."""
    import shutil

    from trainer.errors import DataError
    from trainer.imagefolder import load_image_folder

    root = write_folder(tmp_path / "fruit", (16, 16), rgb=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "imagefolder").write_text("a file where the cache folder goes")
    for _ in range(2):
        said: list[str] = []
        load_image_folder(root, tmp_path / "data", None, say=said.append)
        assert len(said) == 1 and "decoded" in said[0] and "cached in" not in said[0], said
        assert f"not cached (cannot write in {tmp_path / 'data' / 'imagefolder'}: " in said[0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["imagefolder"]
    for name in CLASSES[1:]:
        shutil.rmtree(root / "train" / name)
        shutil.rmtree(root / "test" / name)
    with pytest.raises(DataError, match=f"one class folder \\({CLASSES[0]}\\); a classifier needs at least two"):
        load_image_folder(root, tmp_path / "data", None, say=print)


def test_the_run_folder_is_the_image_folders_own_name_even_for_dot(tmp_path, monkeypatch):
    from trainer.config import TrainConfig

    (tmp_path / "pets").mkdir()
    monkeypatch.chdir(tmp_path / "pets")
    assert TrainConfig(dataset="imagefolder:.").name == "pets"
    assert TrainConfig(dataset="imagefolder:../pets/").name == "pets"
    assert TrainConfig(dataset="imagefolder:/x/_data").name == "data"


def test_a_model_whose_outputs_do_not_match_the_folders_classes_is_refused(run_main, tmp_path, monkeypatch):
    """--model on an image folder: 3 class folders and a network with 5 outputs is one line, exit 2."""
    (tmp_path / "five_out.py").write_text(
        "from torch import nn\n"
        "def factory(num_classes, in_channels):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 16 * 16, 5))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = write_folder(tmp_path / "shapes", (16, 16), rgb=False)
    result = run_main(train_args(folder, tmp_path / "data", tmp_path / "out", "--model", "five_out:factory"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "3 classes" in lines[0] and "5 outputs" in lines[0]


def test_save_inputs_writes_what_an_rgb_model_sees(tmp_path):
    picture = torch.randint(0, 256, (3, 12, 20), dtype=torch.uint8)
    predict.save_input(picture, tmp_path / "seen", "cat.jpg")
    saved = np.asarray(Image.open(tmp_path / "seen" / "cat.png"))
    assert saved.shape == (12, 20, 3) and (saved == picture.permute(1, 2, 0).numpy()).all()


def test_a_factory_module_in_the_working_directory_imports_without_python_m(tmp_path, monkeypatch):
    """The `trainer` console script does not put the working directory on sys.path; --model does."""
    from trainer.model import import_factory

    (tmp_path / "here_models.py").write_text("def factory(num_classes, in_channels):\n    return None\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert callable(import_factory("here_models:factory"))


def test_a_moved_folder_resumes_and_a_changed_one_is_refused(run_main, tmp_path):
    """An image folder is its contents: moved elsewhere, its run resumes; changed in place, the
    resume is refused in one line (the run would otherwise go on with other data)."""
    folder = write_folder(tmp_path / "shapes", (16, 16), rgb=False)
    data, out = tmp_path / "data", tmp_path / "out"
    assert run_main(train_args(folder, data, out, "--epochs", "2", "--limit-train-batches", "2")).returncode == 0
    moved = tmp_path / "elsewhere" / "shapes"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    resumed = run_main(
        train_args(moved, data, out, "--epochs", "2", "--limit-train-batches", "2", "--resume", "latest")
    )
    assert resumed.returncode == 0 and "run already complete" in resumed.stdout, resumed.stderr

    draw(1, (16, 16), False, 12345).save(moved / "train" / "apple" / "00.png")  # another image, same name
    changed = run_main(
        train_args(moved, data, out, "--epochs", "2", "--limit-train-batches", "2", "--resume", "latest")
    )
    assert changed.returncode == 2
    lines = [line for line in changed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "other images" in lines[0], changed.stderr
