"""predict on photographs, not only scans: grey paper, a lighting gradient, sensor noise and
coloured ink. Test digits are real MNIST test images rendered six ways (nothing committed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reset_accelerate
from PIL import Image, ImageFilter

from trainer import predict
from trainer.data import load_split

N = 10


@pytest.fixture(scope="module")
def mnist_model(mnist_3_epochs):
    return mnist_3_epochs / "best"


@pytest.fixture(scope="module")
def digits(real_data):
    split = load_split("mnist", real_data, train=False)
    return split.images[:N], split.labels[:N].tolist()


def enlarged(digit: torch.Tensor, size: int = 180, thin: bool = False) -> Image.Image:
    """The 28x28 digit (white on black) as a large grey picture of its strokes; `thin` erodes them."""
    picture = Image.fromarray(digit.numpy(), mode="L").resize((size, size), Image.BILINEAR)
    return picture.filter(ImageFilter.MinFilter(9)) if thin else picture


def render(digit: torch.Tensor, kind: str, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    strokes = torch.from_numpy(np.asarray(enlarged(digit, thin=kind == "thin"), dtype=np.float32).copy())
    alpha = torch.zeros(300, 300)
    top, left = 40 + int(torch.randint(0, 60, (1,), generator=g)), 30 + int(torch.randint(0, 80, (1,), generator=g))
    alpha[top : top + 180, left : left + 180] = strokes / 255
    noise = torch.randn(300, 300, 3, generator=g) * 9
    across = torch.linspace(0, 1, 300).view(1, 300, 1)  # left to right
    if kind in ("clean", "thin"):
        paper, ink = torch.full((300, 300, 3), 255.0), torch.tensor([0.0, 0.0, 0.0])
    elif kind == "photo":  # a photo of grey paper: light falls from the left, sensor noise, blue ink
        paper = (215 - 95 * across) * torch.tensor([1.0, 0.98, 0.93]) + noise
        ink = torch.tensor([35.0, 45.0, 150.0])
    elif kind == "chalk":  # light ink on a dark board, lit from the right
        paper, ink = (30 + 60 * across).expand(300, 300, 3) + noise, torch.tensor([230.0, 230.0, 220.0])
    elif kind == "hue":  # red ink on green paper of the same brightness (PIL's grey cannot tell them apart)
        shade = 1.1 - 0.3 * across
        green = torch.tensor([60.0, 120.0, 80.0])
        grey = 0.299 * green[0] + 0.587 * green[1] + 0.114 * green[2]
        ink = torch.tensor([200.0, 40.0, float((grey - 0.299 * 200 - 0.587 * 40) / 0.114)])
        paper, ink = green * shade + noise, ink * shade
    else:  # "twosided": mid-grey ink on a page from white to black: darker, then lighter than the paper
        paper, ink = (250 - 240 * across).expand(300, 300, 3) + noise, torch.tensor([130.0, 130.0, 130.0])
    pixels = paper * (1 - alpha[..., None]) + ink * alpha[..., None]
    return Image.fromarray(pixels.clamp(0, 255).round().to(torch.uint8).numpy(), mode="RGB")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clean", "thin", "photo", "chalk", "hue", "twosided"])
def test_a_3_epoch_model_reads_8_of_10_of_each_kind(mnist_model, digits, tmp_path, capsys, kind):
    import json

    images, labels = digits
    paths = []
    for i, digit in enumerate(images):
        path = tmp_path / f"{kind}_{i}.jpg"
        picture = render(digit, kind, seed=i)
        if kind == "hue" and i == 0:  # in grey, as PIL (and the old preprocessing) sees it, the ink is invisible
            blank = render(torch.zeros_like(digit), kind, seed=i)  # the same page and noise, no digit

            def pixels(p: Image.Image) -> torch.Tensor:
                return torch.from_numpy(np.asarray(p, dtype=np.float32).copy())

            ink = (pixels(picture) - pixels(blank)).abs().amax(dim=-1) > 60
            assert ink.sum() > 1000
            assert (pixels(picture.convert("L")) - pixels(blank.convert("L")))[ink].abs().mean() < 6  # of 255
        picture.save(path, quality=88)
        paths.append(str(path))
    reset_accelerate()
    capsys.readouterr()
    code = predict.main([str(mnist_model), *paths, "--cpu", "--json", "--save-inputs", str(tmp_path / "seen")])
    found = {r["image"]: r["class"] for r in json.loads(capsys.readouterr().out)}
    answers = [found.get(path) for path in paths]  # None: reported as "no digit found" (exit code 2)
    assert code == (0 if len(found) == N else 2)
    right = sum(a == b for a, b in zip(answers, labels))
    print(f"{kind}: {right}/10 right")
    # twosided: where the page is as grey as the ink, a band across the digit is invisible to anyone.
    assert right >= (7 if kind == "twosided" else 8), f"{kind}: {right}/10 right, answers {answers}, labels {labels}"
    seen = sorted((tmp_path / "seen").glob("*.png"))
    assert len(seen) == len(found) and Image.open(seen[0]).size == (28, 28)


def test_an_empty_page_is_reported_not_guessed(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    paper = torch.linspace(215, 120, 300).view(1, 300).expand(300, 300) + torch.randn(300, 300, generator=g) * 9
    path = tmp_path / "empty.jpg"
    Image.fromarray(paper.clamp(0, 255).round().to(torch.uint8).numpy(), mode="L").save(path)
    with pytest.raises(predict.EmptyImage, match="no digit found"):
        predict.load_image(path)
