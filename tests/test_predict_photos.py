"""predict on what people hand it: scans of any stroke width, tight crops, big and small digits,
light on dark, photos with a lighting gradient, noise and coloured ink. The digits are the first
real MNIST test images, rendered each way here (nothing committed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import reset_accelerate
from PIL import Image, ImageFilter

from trainer import predict
from trainer.data import load_split

N = 10
SCANS = ["clean", "thin", "bold", "report56", "inverted56", "tight", "big"]  # black on white, no noise
KINDS = [*SCANS, "small", "chalk", "photo", "hue", "twosided"]
HARD = ("inverted56", "tight", "big", "small")  # for the old preprocessing


@pytest.fixture(scope="module")
def mnist_model(mnist_1_epoch):
    return mnist_1_epoch / "best"


@pytest.fixture(scope="module")
def digits(real_data):
    split = load_split("mnist", real_data, train=False)
    return split.images[:N], split.labels[:N].tolist()


def strokes(digit: torch.Tensor, size: int, kind: str = "clean") -> torch.Tensor:
    """The digit's ink (0-1) cropped to its bounding box, the long side `size` pixels; "thin" erodes
    the strokes, "bold" thickens them."""
    picture = Image.fromarray(digit.numpy(), mode="L")
    picture = picture.crop(picture.point(lambda v: 255 * (v >= 128)).getbbox())  # its faint rim cut off
    scale = size / max(picture.size)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR)
    if kind in ("thin", "bold"):
        picture = picture.filter(ImageFilter.MinFilter(9) if kind == "thin" else ImageFilter.MaxFilter(9))
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)


def scanned_small(digit: torch.Tensor, kind: str) -> Image.Image:
    """Black on white at 56x56, as in the report that started this: "report56" is the whole 28x28
    test image inverted and scaled up; "inverted56" is cropped to a square around the digit first."""
    picture = Image.fromarray(digit.numpy(), mode="L")
    if kind == "inverted56":
        left, top, right, bottom = picture.getbbox()
        side = max(right - left, bottom - top) + 2
        x, y = (left + right - side) // 2, (top + bottom - side) // 2
        picture = picture.crop((x, y, x + side, y + side))  # beyond the edge: black, the digit's background
    picture = Image.eval(picture, lambda v: 255 - v)  # black on white
    return picture.resize((56, 56), Image.BILINEAR)


def render(digit: torch.Tensor, kind: str, seed: int) -> Image.Image:
    """One picture of the digit (white on black, 28x28) of the given kind."""
    if kind in ("inverted56", "report56"):
        return scanned_small(digit, kind)
    g = torch.Generator().manual_seed(seed)
    height, width = (900, 1200) if kind == "small" else (300, 300)
    ink = strokes(digit, {"small": 70, "big": 280}.get(kind, 140), kind)
    if kind == "tight":  # cropped to the ink: it touches the border
        height, width = ink.shape
    top = int(torch.randint(0, height - ink.shape[0] + 1, (1,), generator=g))
    left = int(torch.randint(0, width - ink.shape[1] + 1, (1,), generator=g))
    alpha = torch.zeros(height, width)
    alpha[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    noise = torch.randn(height, width, 3, generator=g) * 9
    across = torch.linspace(0, 1, width).view(1, width, 1)  # left to right
    if kind in ("clean", "thin", "bold", "tight", "big"):  # black ink on white paper
        paper, ink_colour = torch.full((height, width, 3), 255.0), torch.zeros(3)
    elif kind == "small":  # a photo of a whole page, a little darker on the right, with a small digit on it
        paper, ink_colour = (235 - 30 * across) * torch.tensor([1.0, 0.98, 0.95]) + noise, torch.full((3,), 30.0)
    elif kind == "photo":  # a photo of grey paper: light falls from the left, sensor noise, blue ink
        paper = (215 - 95 * across) * torch.tensor([1.0, 0.98, 0.93]) + noise
        ink_colour = torch.tensor([35.0, 45.0, 150.0])
    elif kind == "chalk":  # light ink on a dark board, lit from the right
        paper, ink_colour = (30 + 60 * across).expand(height, width, 3) + noise, torch.tensor([230.0, 230.0, 220.0])
    elif kind == "hue":  # red ink on green paper of the same brightness (PIL's grey cannot tell them apart)
        shade = 1.1 - 0.3 * across
        green = torch.tensor([60.0, 120.0, 80.0])
        grey = 0.299 * green[0] + 0.587 * green[1] + 0.114 * green[2]
        red = torch.tensor([200.0, 40.0, float((grey - 0.299 * 200 - 0.587 * 40) / 0.114)])
        paper, ink_colour = green * shade + noise, red * shade
    else:  # "twosided": mid-grey ink on a page from white to black: darker, then lighter than the paper
        paper, ink_colour = (250 - 240 * across).expand(height, width, 3) + noise, torch.full((3,), 130.0)
    pixels = paper * (1 - alpha[..., None]) + ink_colour * alpha[..., None]
    return Image.fromarray(pixels.clamp(0, 255).round().to(torch.uint8).numpy(), mode="RGB")


def pixels(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture, dtype=np.float32).copy())


def extent(ink: torch.Tensor) -> int:
    """The long side of the ink's bounding box, in pixels."""
    rows, cols = ink.any(dim=1).nonzero(), ink.any(dim=0).nonzero()
    return int(max(rows[-1] - rows[0], cols[-1] - cols[0])) + 1


def test_the_pictures_are_what_they_say(digits):
    """The hard kinds are hard: tight crops have ink on every edge, a big digit nearly fills the
    picture, a small one barely shows on the page, and the hue's ink is invisible in grey."""
    images, _ = digits
    for i, digit in enumerate(images):
        ink = {kind: pixels(render(digit, kind, seed=i).convert("L")) < 128 for kind in KINDS if kind in HARD}
        assert all(edge.any() for edge in (ink["tight"][0], ink["tight"][-1], ink["tight"][:, 0], ink["tight"][:, -1]))
        assert extent(ink["big"]) >= 0.9 * 300
        assert ink["small"].float().mean() < 0.005
        assert ink["inverted56"].shape == (56, 56) and extent(ink["inverted56"]) >= 50
        assert ink["inverted56"].float().mean() < 0.5  # dark ink on light paper
    # In grey, as PIL (and the first preprocessing) sees it, the hue's ink is all but invisible.
    picture, blank = render(images[0], "hue", seed=0), render(torch.zeros_like(images[0]), "hue", seed=0)
    ink = (pixels(picture) - pixels(blank)).abs().amax(dim=-1) > 60
    assert ink.sum() > 1000
    assert (pixels(picture.convert("L")) - pixels(blank.convert("L")))[ink].abs().mean() < 6  # of 255


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_1_epoch_model_reads_9_of_10_of_each_kind(mnist_model, digits, tmp_path, capsys, kind):
    """Saved as JPEG and predicted through the command line. "twosided" asks 7 of 10: where the
    page is as grey as the ink, a band across the digit is invisible to anyone, and a digit lying
    mostly in it is reported as no digit (about 2 in 3 of the first 100 test digits are read)."""
    images, labels = digits
    paths = []
    for i, digit in enumerate(images):
        paths.append(str(tmp_path / f"{kind}_{i}.jpg"))
        render(digit, kind, seed=i).save(paths[-1], quality=88)
    reset_accelerate()
    capsys.readouterr()
    code = predict.main([str(mnist_model), *paths, "--cpu", "--json", "--save-inputs", str(tmp_path / "seen")])
    found = {r["image"]: r["class"] for r in json.loads(capsys.readouterr().out)}
    answers = [found.get(path) for path in paths]  # None: reported as "no digit found" (exit code 2)
    assert code == (0 if len(found) == N else 2)
    right = sum(a == b for a, b in zip(answers, labels))
    print(f"{kind}: {right}/10 right")
    assert right >= (7 if kind == "twosided" else 9), f"{kind}: {right}/10 right, answers {answers}, labels {labels}"
    seen = sorted((tmp_path / "seen").glob("*.png"))
    assert len(seen) == len(found) and Image.open(seen[0]).size == (28, 28)


@pytest.mark.slow
def test_an_empty_page_is_reported_not_guessed(mnist_model, digits, tmp_path, capsys):
    """Paper alone, with a lighting gradient and noise, in grey or colour: "no digit found", exit
    code 2; a digit beside them is still predicted."""
    g = torch.Generator().manual_seed(0)
    paper = torch.linspace(215, 120, 300).view(1, 300).expand(300, 300) + torch.randn(300, 300, generator=g) * 9
    grey, photo, digit = tmp_path / "grey.jpg", tmp_path / "photo.jpg", tmp_path / "digit.jpg"
    Image.fromarray(paper.clamp(0, 255).round().to(torch.uint8).numpy(), mode="L").save(grey)
    render(torch.zeros_like(digits[0][0]), "photo", seed=0).save(photo)
    render(digits[0][0], "photo", seed=0).save(digit)
    reset_accelerate()
    capsys.readouterr()
    code = predict.main([str(mnist_model), str(grey), str(photo), str(digit), "--cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 2
    entries = json.loads(captured.out)
    assert [r["image"] for r in entries] == [str(grey), str(photo), str(digit)]
    assert ["error" in r for r in entries] == [True, True, False]
    lines = captured.err.splitlines()
    assert len(lines) == 2 and all("no digit found" in line for line in lines), captured.err
    assert str(grey) in lines[0] and str(photo) in lines[1]
