"""`python -m trainer.predict CHECKPOINT IMAGE...`: the class of each image, with its probability.

For MNIST and its siblings, images of any size and mode are brought into the input format the
way MNIST's digits were made: white ink on black, the ink's bounding box scaled to fit a 20x20
box keeping its aspect ratio, then pasted into 28x28 with its centre of mass in the middle. An
image that already has the input size is only made grey (and inverted when it is dark on light),
so a test image saved as PNG gets exactly the prediction `trainer.evaluate` counted for it.

For a model trained on an image folder, each image is decoded as the folder's images were
(`trainer.imagefolder.decode_image`: grey or RGB, resized to the input size); --invert does not apply.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.checkpoint import CheckpointError
from trainer.config import CUSTOM_DATA, ConfigError
from trainer.data import DATASET_INFO
from trainer.errors import first_line
from trainer.imagefolder import grey_palette

# MNIST's recipe: the digit fits in a BOX x BOX square, centred by mass in the SIZE x SIZE image.
SIZE, BOX = 28, 20


class ImageError(Exception):
    """An image that cannot be read: reported in one line; the other images are still predicted."""


def read_image(path: str | os.PathLike) -> Tensor:
    """An image file as float32 on the 0-255 scale: [H, W] when it is grey, [H, W, 3] in colour
    (transparency composited on white paper)."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # photos from phones are stored rotated
            if image.mode.startswith("I"):  # 16-bit grey PNGs open as I;16 or I, on a 0-65535 scale
                pixels = np.asarray(image, dtype=np.float32) * (255.0 / 65535.0)
            else:
                if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                    # Drawing programs save ink on a transparent background: put it on paper.
                    rgba = image.convert("RGBA")
                    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                grey = image.mode in ("1", "L", "LA") or (image.mode == "P" and grey_palette(image))
                pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # OSError covers unidentifiable, truncated and unreadable files (and folders).
        raise ImageError(f"{path}: cannot read the image ({first_line(exc)})") from None
    return torch.from_numpy(np.array(pixels, dtype=np.float32))


def luminance(image: Tensor) -> Tensor:
    """[H, W, 3] -> [H, W] grey exactly as PIL's "L" conversion makes it (ITU-R 601 weights in
    16-bit fixed point, rounded); grey stays as it is."""
    if image.dim() == 2:
        return image
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int64)
    return ((image.round().to(torch.int64) @ weights + 0x8000) >> 16).float()


def _border(grey: Tensor) -> Tensor:
    """The pixels of the outer ring (about 1/28 of the image wide): mostly background."""
    w = max(1, round(min(grey.shape) / SIZE))
    return torch.cat([grey[:w].flatten(), grey[-w:].flatten(), grey[:, :w].flatten(), grey[:, -w:].flatten()])


# Photographs are worked on at most this size: a digit needs no more, and the filters stay cheap.
WORK_SIZE = 256
# Ink must stand out from the paper by at least this much (of 255) after flat-fielding, or the page is empty.
MIN_CONTRAST = 40.0


class EmptyImage(ImageError):
    """No ink stands out from the background: reported, never guessed."""


def _filter(image: Tensor, *filters: Any) -> Tensor:
    """PIL's filters (min, max, median, blur) on a float [H, W] image on the 0-255 scale."""
    import numpy as np
    from PIL import Image

    picture = Image.fromarray(image.clamp(0, 255).round().to(torch.uint8).numpy(), mode="L")
    for f in filters:
        picture = picture.filter(f)
    return torch.from_numpy(np.asarray(picture, dtype=np.float32).copy())


def _otsu(values: Tensor) -> float:
    """Otsu's threshold of values on the 0-255 scale: the split that best separates two classes."""
    hist = torch.histc(values, bins=256, min=0, max=255).double()
    levels = torch.arange(256, dtype=torch.float64)
    weight = hist.cumsum(0)
    mass = (hist * levels).cumsum(0)
    total, total_mass = weight[-1], mass[-1]
    between = (total_mass * weight / total - mass) ** 2 / (weight * (total - weight)).clamp(min=1e-9)
    return float(between[:-1].argmax())


def _background(pixels: Tensor) -> Tensor:
    """The paper under the ink: a smooth surface (quadratic in x and y, per channel) fitted to the
    pixels that are not ink, found by refitting without the pixels far from the last fit.

    pixels: [H, W, C] -> [H, W, C]. Lighting gradients and vignetting are smooth; ink is not."""
    height, width, channels = pixels.shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    terms = torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], dim=-1).double()  # [H, W, 6]
    stride = max(1, round((height * width / 16384) ** 0.5))  # fit on about 16k pixels
    a = terms[::stride, ::stride].reshape(-1, terms.shape[-1])
    b = pixels[::stride, ::stride].reshape(-1, channels).double()
    keep = torch.ones(len(a), dtype=torch.bool)
    for _ in range(5):
        coefficients = torch.linalg.lstsq(a[keep], b[keep]).solution
        distance = (b - a @ coefficients).norm(dim=1)
        keep = distance <= 3 * distance[keep].median() + 1.0
    return (terms @ coefficients).float()


def ink_of(image: Tensor, invert: str = "auto") -> Tensor:
    """A photograph or scan ([H, W] grey or [H, W, C] colour, 0-255, any size) -> the ink's
    strength, bright on black.

    The paper (with its lighting gradient) is fitted as a smooth surface and taken away; what is
    left differs from the paper along one colour direction (the ink's colour minus the paper's),
    in either sense, so ink that is darker than the paper on one side and lighter on the other, or
    that differs only in hue, still stands out. Sensor noise is smoothed by a median filter;
    Otsu's threshold on what is left separates ink from paper. `invert` "yes" / "no" keeps only
    ink darker / lighter than the paper.
    """
    import torch.nn.functional as F  # noqa: N812
    from PIL import ImageFilter

    if image.dim() == 2:
        image = image[..., None]
    height, width = image.shape[:2]
    scale = min(1.0, WORK_SIZE / max(height, width))
    if scale < 1.0:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image.permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)
    paper = _background(image)
    distance = (image - paper).norm(dim=-1)
    sample = distance.flatten()[:: max(1, distance.numel() // 65536)]
    noise = sample.median().item()  # most of the picture is paper
    far = distance > 5 * noise + 1  # ink, and the rare noise that strays so far
    if far.sum() < 16 or torch.quantile(distance[far], 0.9) < MIN_CONTRAST:
        raise EmptyImage("no digit found: nothing stands out from the background")
    # Each pixel is paper and ink mixed, image = paper * (1 - a) + ink * a: solve for a, the ink's
    # coverage, by projecting onto paper - ink. Where the two are alike the projection says little,
    # so it is damped by the noise there instead of amplifying it.
    ink_colour = image[far].median(dim=0).values
    towards = paper - ink_colour
    coverage = ((paper - image) * towards).sum(-1) / (towards.square().sum(-1) + (3 * noise) ** 2)
    weights = torch.tensor([0.299, 0.587, 0.114]) if image.shape[-1] == 3 else torch.ones(1)
    darker = (towards * weights).sum(-1) > 0  # where the ink is darker than the paper
    if invert != "auto":
        coverage = torch.where(darker == (invert == "yes"), coverage, torch.zeros_like(coverage))
    strength = coverage.clamp(0, 1) * 255
    ink = _filter(strength, ImageFilter.MedianFilter(3))
    peak = torch.quantile(ink.flatten(), 0.999).item()
    threshold = max(_otsu(ink), peak * 0.25)
    ink = torch.where(ink > threshold, ink, torch.zeros_like(ink))
    # Specks of noise that passed the threshold: an opening (min then max filter) removes them from the mask.
    mask = _filter((ink > 0).float() * 255, ImageFilter.MinFilter(3), ImageFilter.MaxFilter(3)) > 0
    if mask.sum() < 4:
        raise EmptyImage("no digit found: nothing stands out from the background")
    return ink * mask


def to_mnist(image: Tensor, invert: str = "auto") -> Tensor:
    """An image ([H, W] grey or [H, W, 3], 0-255) -> 28x28 in MNIST's format: white ink on black, centred.

    `invert`: "auto" decides whether the ink is darker than the paper, "yes" / "no" force it.
    A 28x28 image is taken as a scan in MNIST's own format (only inverted when its border is light).
    """
    if tuple(image.shape[:2]) == (SIZE, SIZE):  # already the input format: exactly what evaluation sees
        grey = luminance(image)
        if invert == "yes" or (invert == "auto" and _border(grey).mean() > 127.5):
            grey = 255.0 - grey
        return grey
    ink = ink_of(image, invert)
    rows = (ink > 0).any(dim=1).nonzero().flatten()
    cols = (ink > 0).any(dim=0).nonzero().flatten()
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    strong = ink[ink > 0]
    ink = (ink * (255.0 / torch.quantile(strong, 0.9).clamp(min=1.0))).clamp(0, 255)  # strokes reach full white
    height, width = ink.shape
    scale = BOX / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    digit = F.interpolate(ink[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    digit = digit.clamp(0, 255)
    # Paste so that the centre of mass lands on the image centre (13.5, 13.5), staying inside the frame.
    total = digit.sum().clamp(min=1e-6)
    cy = (digit.sum(dim=1) * torch.arange(size[0])).sum() / total
    cx = (digit.sum(dim=0) * torch.arange(size[1])).sum() / total
    top = min(max(round((SIZE - 1) / 2 - cy.item()), 0), SIZE - size[0])
    left = min(max(round((SIZE - 1) / 2 - cx.item()), 0), SIZE - size[1])
    out = torch.zeros(SIZE, SIZE)
    out[top : top + size[0], left : left + size[1]] = digit
    return out


def save_input(image: Tensor, folder: str | os.PathLike, source: str | os.PathLike) -> None:
    """Writes the model's input for `source` as a PNG in `folder` (grey, or RGB for [3, H, W])."""
    from pathlib import Path

    from PIL import Image

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        pixels = image.float().clamp(0, 255).round().to(torch.uint8)
        rgb = pixels.dim() == 3
        picture = Image.fromarray((pixels.permute(1, 2, 0) if rgb else pixels).numpy(), mode="RGB" if rgb else "L")
        picture.save(Path(folder) / f"{Path(source).stem}.png")
    except OSError as exc:
        raise ImageError(f"--save-inputs {folder}: {exc.strerror or exc}") from None


def load_image(path: str | os.PathLike, invert: str = "auto") -> Tensor:
    """An image file -> float32 [28, 28] on the 0-255 scale, ready for `trainer.evaluation.model_input`."""
    try:
        return to_mnist(read_image(path), invert)
    except EmptyImage as exc:
        raise EmptyImage(f"{path}: {exc}") from None


@torch.no_grad()
def predict(loaded: Any, pixels: Tensor, device: str | torch.device = "cpu") -> Tensor:
    """Class probabilities [B, classes] for images [B, H, W] or [B, C, H, W] (0-255 scale) from a `LoadedModel`."""
    from trainer.evaluation import model_input

    model = loaded.model.to(device).eval()
    logits = model(model_input(pixels.to(device), loaded.normalization)).float()
    return logits.softmax(dim=1).cpu()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description="Classify images (PNG, JPEG, ... of any size) with a checkpoint's model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (step_*), a run's `best` link or a model.safetensors")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="also show the K most likely classes")

    parser.add_argument(
        "--invert",
        choices=("auto", "yes", "no"),
        default="auto",
        help="yes: the ink is darker than the paper; no: it is lighter (chalk on a board); auto: either, in any "
        "colour, or darker on one side and lighter on the other. A 28x28 image is inverted when yes, or auto and "
        "its border is bright",
    )
    parser.add_argument("--cpu", action="store_true", help="predict on the CPU even when a GPU is present")
    parser.add_argument(
        "--model", default=None, metavar="MODULE:FN",
        help="rebuild a model that is not built in with this factory (as in training); never taken from the checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--save-inputs", metavar="DIR", default=None,
        help="also write the image the model sees for each input, as DIR/<name>.png (to see what went wrong)",
    )  # fmt: skip
    from trainer.errors import add_json_flag

    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Predicts every readable image; returns 2 if any image or the checkpoint could not be read."""
    from trainer.errors import fail
    from trainer.evaluation import load_model

    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        return fail(f"--top-k must be at least 1, got {args.top_k}")
    try:
        loaded = load_model(args.checkpoint, args.model)
    except (CheckpointError, ConfigError) as exc:
        return fail(str(exc))
    device = _device(args.cpu)
    digits = loaded.dataset in DATASET_INFO  # MNIST and its siblings: ink on paper, made as MNIST was
    if loaded.dataset == CUSTOM_DATA:
        return fail(f"{loaded.path} was trained on data given in Python: predict with the model there")
    if digits and tuple(loaded.input_shape) != (1, SIZE, SIZE):
        return fail(f"{loaded.path}: input shape {loaded.input_shape} is not MNIST's (1, 28, 28)")
    paths, images, failed = [], [], 0
    for path in args.images:
        try:
            images.append(load_image(path, args.invert) if digits else _picture(path, loaded.input_shape))
            paths.append(path)
            if args.save_inputs:
                save_input(images[-1], args.save_inputs, path)
        except ImageError as exc:
            fail(str(exc))  # one line now; the exit code says it at the end
            failed += 1
    results = []
    if images:
        probabilities = predict(loaded, torch.stack(images), device)
        k = min(args.top_k, len(loaded.class_names))
        # A stable sort breaks ties (the blog's net ends in a ReLU: all-zero logits happen) towards the
        # lower class, as argmax does in evaluation; topk's order among equals is unspecified.
        top_p, top_i = (t[:, :k] for t in probabilities.sort(dim=1, descending=True, stable=True))
        for path, ps, ks in zip(paths, top_p.tolist(), top_i.tolist()):
            top = [{"class": c, "name": loaded.class_names[c], "probability": p} for p, c in zip(ps, ks)]
            results.append({"image": str(path), **top[0], "top_k": top})
    from trainer.errors import write_json

    if results and args.json != "-":
        _print_table(results, args.top_k > 1, loaded.class_names)
    if args.json is not None and write_json(results, args.json):
        failed += 1
    return 2 if failed else 0


def _picture(path: str, input_shape: tuple[int, ...]) -> Tensor:
    """An image for a model trained on an image folder: decoded as its training images were."""
    from trainer.errors import DataError
    from trainer.imagefolder import decode_image

    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    try:
        return decode_image(path, grey=input_shape[0] == 1, size=(input_shape[1], input_shape[2]))
    except DataError as exc:
        raise ImageError(str(exc)) from None


def _device(cpu: bool) -> torch.device:
    """The convention of every command: a GPU (or Apple's MPS) when there is one, unless --cpu."""
    if not cpu and torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if not cpu and mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _print_table(results: list[dict[str, Any]], show_top: bool, class_names: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    named = list(class_names) != [str(k) for k in range(len(class_names))]

    def label(entry: dict[str, Any]) -> str:
        return f"{entry['class']} {entry['name']}" if named else str(entry["class"])

    console = Console(highlight=False)
    if not console.is_terminal:  # plain columns, whole paths: a log or a pipe is read by people and scripts
        console = Console(highlight=False, width=10_000)
    table = Table(**({} if console.is_terminal else {"box": None, "show_edge": False}))
    table.add_column("image", overflow="fold")
    table.add_column("class")
    table.add_column("probability", justify="right")
    if show_top:
        table.add_column("top k")
    for r in results:
        cells = [r["image"], label(r), f"{r['probability']:.4f}"]
        if show_top:
            cells.append(", ".join(f"{label(t)}: {t['probability']:.4f}" for t in r["top_k"]))
        table.add_row(*cells)
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
