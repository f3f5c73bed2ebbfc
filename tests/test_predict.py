"""python -m trainer.predict: image files of any size and mode -> the model's class and probability."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TEST, reset_accelerate
from PIL import Image, ImageDraw

from trainer import predict
from trainer.data import load_split, model_input
from trainer.evaluation import load_model

N = 20  # test digits to predict


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def digits(tiny_data):
    split = load_split("mnist", tiny_data, train=False)
    assert len(split.labels) == TINY_TEST
    return split.images[:N], split.labels[:N]


def save_variants(images: torch.Tensor, folder) -> dict[str, list[str]]:
    """The same 28x28 digits as a grey PNG, an inverted (dark on light) PNG and an RGB PNG."""
    folder.mkdir(exist_ok=True)
    paths: dict[str, list[str]] = {"grey": [], "inverted": [], "rgb": []}
    for i, image in enumerate(images.numpy()):
        grey = Image.fromarray(image, mode="L")
        for kind, picture in (("grey", grey), ("inverted", Image.fromarray(255 - image)), ("rgb", grey.convert("RGB"))):
            path = folder / f"{i}_{kind}.png"
            picture.save(path)
            paths[kind].append(str(path))
    return paths


def run_json(capsys, argv):
    code = predict.main([*argv, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_png_digits_get_the_models_class_in_every_variant(tiny_run, digits, tmp_path, capsys):
    images, labels = digits
    model = load_model(tiny_run / "best").model
    with torch.no_grad():
        expected = model(model_input(images)).softmax(dim=1)  # the path evaluation takes
    assert (expected.argmax(1) == labels).float().mean() >= 0.7  # the briefly trained model mostly knows them

    paths = save_variants(images, tmp_path)
    for kind, files in paths.items():
        code, results, err = run_json(capsys, [str(tiny_run / "best"), *files, "--top-k", "3"])
        assert code == 0, err
        assert [r["image"] for r in results] == files
        for r, p in zip(results, expected):
            assert r["class"] == int(p.argmax()), kind  # inverted and RGB files are read back to the same pixels
            assert r["probability"] == pytest.approx(float(p.max()), rel=1e-5)
            assert r["name"] == str(r["class"])
            assert len(r["top_k"]) == 3 and r["top_k"][0]["class"] == r["class"]
            probabilities = [t["probability"] for t in r["top_k"]]
            assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6


def test_unreadable_images_are_named_and_the_others_still_predicted(tiny_run, digits, tmp_path, capsys):
    good = save_variants(digits[0][:2], tmp_path)["grey"]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    missing = tmp_path / "missing.png"
    argv = [str(tiny_run / "best"), good[0], str(missing), str(corrupt), good[1]]
    code, results, err = run_json(capsys, argv)
    assert code == 2
    assert [r["image"] for r in results] == argv[1:]  # every file in its turn, read or not
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("trainer: error:") for line in lines), err
    assert str(missing) in lines[0] and "no such file" in lines[0]
    assert str(corrupt) in lines[1]
    assert "Traceback" not in err
    # An unreadable file's entry is its error, as stderr says it; a predicted one has no "error".
    assert [f"trainer: error: {r['error']}" for r in results[1:3]] == lines
    assert set(results[1]) == set(results[2]) == {"image", "error"}
    assert all(set(r) == {"image", "class", "name", "probability", "top_k"} for r in (results[0], results[3]))
    # The table output names the images it predicted.
    assert predict.main(argv) == 2
    shown = capsys.readouterr().out
    assert "0_grey.png" in shown and "1_grey.png" in shown and "corrupt" not in shown


def test_a_folder_stands_for_its_images(tiny_run, digits, tmp_path, capsys):
    """Its images in name order (hidden files, other files and subfolders left out), beside files
    named one by one; a folder without images is one line and exit code 2."""
    files = save_variants(digits[0][:3], tmp_path / "scans")["grey"]
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    (tmp_path / "scans" / ".hidden.png").write_bytes(b"not even a PNG")
    (tmp_path / "scans" / "sub").mkdir()
    Image.open(files[0]).save(tmp_path / "scans" / "sub" / "deeper.png")
    (tmp_path / "empty").mkdir()
    folder = tmp_path / "scans"
    code, results, err = run_json(capsys, [str(tiny_run / "best"), files[2], str(folder), str(tmp_path / "empty")])
    assert code == 2
    in_folder = sorted(str(folder / f"{i}_{kind}.png") for i in range(3) for kind in ("grey", "inverted", "rgb"))
    assert [r["image"] for r in results] == [files[2], *in_folder, str(tmp_path / "empty")]
    assert err.splitlines() == [f"trainer: error: {tmp_path / 'empty'}: no images in the folder "
                                f"({' '.join(predict.IMAGE_SUFFIXES)})"]  # fmt: skip
    assert err == f"trainer: error: {results[-1]['error']}\n"


def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    code = predict.main([str(tmp_path / "nowhere"), str(image)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("trainer: error:") and "nowhere" in err


def draw_seven(width: int, height: int, box: tuple[int, int, int, int], stroke: int) -> Image.Image:
    """A dark "7" drawn on light paper inside `box` (left, top, right, bottom) of a larger picture."""
    picture = Image.new("RGB", (width, height), (235, 232, 225))
    left, top, right, bottom = box
    draw = ImageDraw.Draw(picture)
    draw.line([(left, top), (right, top), (left + (right - left) // 3, bottom)], fill=(20, 20, 40), width=stroke)
    return picture


def ink_box(image: torch.Tensor) -> tuple[int, int]:
    rows, cols = (image > 64).any(1).nonzero().flatten(), (image > 64).any(0).nonzero().flatten()
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    at = torch.arange(28, dtype=torch.float32)
    return float((image.sum(1) * at).sum() / image.sum()), float((image.sum(0) * at).sum() / image.sum())


def test_any_size_is_brought_to_mnist_format(tmp_path):
    """Dark on light, any size and place, JPEG or PNG: white on black, fit in 20x20 keeping the
    aspect ratio, centred by mass in 28x28; the same drawing at another scale gives nearly the same input."""
    small = tmp_path / "small.jpg"
    draw_seven(300, 200, (30, 20, 90, 140), 12).save(small, quality=90)  # a tall 7 in the top left corner
    large = tmp_path / "large.png"
    draw_seven(900, 1000, (500, 300, 680, 660), 36).convert("L").save(large)  # 3x as big, elsewhere
    a, b = predict.load_image(small), predict.load_image(large)
    for image in (a, b):
        assert image.shape == (28, 28)
        assert image.max() > 200 and image[0].max() < 1 and image[:, 0].max() < 1  # white ink on black
        height, width = ink_box(image)
        assert 19 <= height <= 20 and 10 <= width <= 13  # 132 x 72 pixels of ink: the ratio is kept
        cy, cx = centre_of_mass(image)
        assert abs(cy - 13.5) <= 0.6 and abs(cx - 13.5) <= 0.6
    assert (a - b).abs().mean() < 10  # of 255
    # Negative control: told that the ink is lighter than the paper, it finds none here.
    with pytest.raises(predict.EmptyImage, match="no digit found"):
        predict.load_image(small, invert="no")
