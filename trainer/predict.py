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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from rich.table import Table
from torch import Tensor

from trainer.checkpoint import CheckpointError
from trainer.config import CUSTOM_DATA, ConfigError
from trainer.console import table_console
from trainer.data import DATASET_INFO
from trainer.errors import DataError, HelpFormatter, Parser, add_json_flag, fail, write_json
from trainer.evaluation import load_model, model_input
from trainer.imagefolder import IMAGE_SUFFIXES, decode_image, eight_bit, grey_palette, opened_image
from trainer.model import logits_of

# MNIST's recipe: the digit fits in a BOX x BOX square, centred by mass in the SIZE x SIZE image.
SIZE, BOX = 28, 20
# Photos are worked on at most this size (a digit needs no more); ink must differ from the paper by
# MIN_CONTRAST (of 255) or the page is empty.
WORK_SIZE, MIN_CONTRAST = 256, 24.0


class ImageError(Exception):
    """An image that cannot be read: reported in one line; the other images are still predicted."""


class EmptyImage(ImageError):
    """No ink stands out from the background: reported, never guessed."""


def read_image(path: str | os.PathLike) -> Tensor:
    """An image file as float32 on the 0-255 scale: [H, W] when it is grey, [H, W, 3] in colour
    (transparency composited on white paper)."""
    try:
        with opened_image(path) as opened:
            image = eight_bit(ImageOps.exif_transpose(opened))  # photos from phones are stored rotated
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # ink on nothing: put it on paper
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            grey = image.mode in ("1", "L", "LA") or (image.mode == "P" and grey_palette(image))
            return torch.from_numpy(np.array(image.convert("L" if grey else "RGB"), dtype=np.float32))
    except DataError as exc:
        raise ImageError(str(exc)) from None


def ink_of(image: Tensor, invert: str = "auto") -> Tensor:
    """A photo or scan ([H, W] or [H, W, C], 0-255, any size) -> the ink, 0-255, bright on black.

    The paper is a smooth surface (quadratic in x and y per channel: a lighting gradient) fitted
    to the pixels near the frame's colour, then near the fit: ink covering much of the picture
    cannot pull it, as it pulls a fit to every pixel. Each pixel is read as a mix of paper and ink,
    so ink darker, lighter, of another hue, or darker on one side and lighter on the other, counts
    (`invert` "yes" / "no": only darker / lighter). Pixels more ink than paper are kept.
    """
    image = image[..., None] if image.dim() == 2 else image
    if max(image.shape[:2]) > WORK_SIZE:
        scale = WORK_SIZE / max(image.shape[:2])
        size = [max(1, int(n * scale)) for n in image.shape[:2]]  # a strip one pixel high stays one, not zero
        image = F.interpolate(image.permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)
    y, x = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in image.shape[:2]), indexing="ij")
    terms = torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], dim=-1)
    step = max(1, round((x.numel() / 16384) ** 0.5))  # the fit needs no more than about 16k pixels
    sample, at = image[::step, ::step], terms[::step, ::step]
    near = torch.ones(sample.shape[:2], dtype=torch.bool)
    near[1:-1, 1:-1] = False  # the frame: mostly paper
    paper = sample[near].median(dim=0).values
    for _ in range(3):
        distance = (sample - paper).square().mean(-1).sqrt()  # 0-255 in grey and colour alike
        noise = distance[near].median()
        near = distance <= 3 * noise + 8  # paper, and its noise
        fit = torch.linalg.lstsq(at[near], sample[near]).solution
        paper = at @ fit
    paper = terms @ fit
    distance = (image - paper).square().mean(-1).sqrt()
    towards = image[distance >= (3 * noise + 8).clamp(max=distance.max())].median(dim=0).values - paper
    # The ink's share of each pixel, damped where ink and paper differ by no more than the noise.
    coverage = ((image - paper) * towards).mean(-1) / (towards.square().mean(-1) + (3 * noise) ** 2 + 1)
    if invert != "auto":
        coverage = torch.where((towards.mean(-1) < 0) == (invert == "yes"), coverage, 0)
    strength = Image.fromarray((coverage.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    ink = torch.from_numpy(np.array(strength.filter(ImageFilter.MedianFilter(3)), dtype=np.float32))  # no specks
    if (ink > 127).sum() < 16 or torch.quantile(distance[ink > 127], 0.9) < MIN_CONTRAST:
        raise EmptyImage("no digit found: nothing stands out from the background")
    return torch.where(ink > 127, ink, 0)


def to_mnist(image: Tensor, invert: str = "auto") -> Tensor:
    """An image ([H, W] grey or [H, W, 3], 0-255) -> 28x28 in MNIST's format: white ink on black, centred.

    `invert`: "auto" takes ink of either sense, "yes" / "no" only ink darker / lighter than the paper.
    A 28x28 image is taken as a scan in MNIST's own format (only inverted when its border is light).
    """
    if tuple(image.shape[:2]) == (SIZE, SIZE):  # already the input format: exactly what evaluation sees
        grey = (image @ torch.tensor([0.299, 0.587, 0.114])).round() if image.dim() == 3 else image
        light = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).mean() > 127.5
        return 255.0 - grey if invert == "yes" or (invert == "auto" and light) else grey
    ink = ink_of(image, invert)
    rows, cols = ink.any(dim=1).nonzero().flatten(), ink.any(dim=0).nonzero().flatten()
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    size = [max(1, round(n * BOX / max(ink.shape))) for n in ink.shape]
    digit = F.interpolate(ink[None, None], size=size, mode="bilinear", antialias=True)[0, 0].clamp(0, 255)
    # Pad to 28x28 so that the centre of mass lands on the centre (13.5, 13.5), inside the frame.
    mass = digit / digit.sum()
    cy, cx = ((mass.sum(dim) * torch.arange(n)).sum().item() for dim, n in ((1, size[0]), (0, size[1])))
    top = min(max(round((SIZE - 1) / 2 - cy), 0), SIZE - size[0])
    left = min(max(round((SIZE - 1) / 2 - cx), 0), SIZE - size[1])
    return F.pad(digit, (left, SIZE - size[1] - left, top, SIZE - size[0] - top))


def save_input(image: Tensor, folder: str | os.PathLike, source: str | os.PathLike) -> None:
    """Writes the model's input for `source` as a PNG in `folder` (grey, or RGB for [3, H, W])."""
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
    model = loaded.model.to(device).eval()
    logits = logits_of(model(model_input(pixels.to(device), loaded.normalization))).float()
    return logits.softmax(dim=1).cpu()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m trainer.predict",
        description="Classify images (PNG, JPEG, ... of any size) with a checkpoint's model.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder (step_*), a `best` link, a model.safetensors, a run folder (its best), a folder "
        "or an .onnx file written by `python -m trainer.export`",
    )
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files, or folders of them (not their subfolders)"
    )
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
    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Predicts every readable image; returns 2 if any image or the checkpoint could not be read."""
    from accelerate import PartialState  # the device every command picks: a GPU or MPS unless --cpu

    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        return fail(f"--top-k must be at least 1, got {args.top_k}")
    try:
        loaded = _load(args.checkpoint, args.model)
    except (CheckpointError, ConfigError) as exc:
        return fail(str(exc))
    digits = loaded.dataset in DATASET_INFO  # MNIST and its siblings: ink on paper, made as MNIST was
    if loaded.dataset == CUSTOM_DATA:
        return fail(f"{loaded.path} was trained on data given in Python: predict with the model there "
                    "(trainer.load_weights(checkpoint, model) puts its weights into your module)")  # fmt: skip
    if digits and tuple(loaded.input_shape) != (1, SIZE, SIZE):
        return fail(f"{loaded.path}: input shape {loaded.input_shape} is not MNIST's (1, 28, 28)")
    entries: list[dict[str, Any]] = []  # every file in its turn: its prediction, or why it has none
    images, failed = [], 0
    for path in image_files(args.images):
        try:
            images.append(_read(path, digits, loaded.input_shape, args.invert))
        except ImageError as exc:
            fail(str(exc))  # one line now; the exit code says it at the end
            entries.append({"image": str(path), "error": str(exc)})
            failed += 1
            continue
        entries.append({"image": str(path)})
        if args.save_inputs:
            try:
                save_input(images[-1], args.save_inputs, path)
            except ImageError as exc:  # the folder's fault, not the image's: it is still predicted
                fail(str(exc))
                failed += 1
    results = [entry for entry in entries if "error" not in entry]
    if images:
        probabilities = predict(loaded, torch.stack(images), PartialState(cpu=args.cpu).device)
        k = min(args.top_k, len(loaded.class_names))
        # A stable sort breaks ties (the blog's net ends in a ReLU: all-zero logits happen) towards the
        # lower class, as argmax does in evaluation; topk's order among equals is unspecified.
        top_p, top_i = (t[:, :k] for t in probabilities.sort(dim=1, descending=True, stable=True))
        for entry, ps, ks in zip(results, top_p.tolist(), top_i.tolist()):
            top = [{"class": c, "name": loaded.class_names[c], "probability": p} for p, c in zip(ps, ks)]
            entry.update(top[0], top_k=top)
    if results and args.json != "-":
        _print_table(results, args.top_k > 1, loaded)
    if args.json is not None and write_json(entries, args.json):
        failed += 1
    return 2 if failed else 0


def _load(checkpoint: str, model: str | None) -> Any:
    """A checkpoint's model, an exported folder's, or an ONNX file's (by its kind, run by onnxruntime)."""
    if checkpoint.endswith(".onnx") and not os.path.isdir(checkpoint):
        from trainer.export import load_onnx

        return load_onnx(checkpoint)
    if checkpoint.endswith(".pt2") and not os.path.isdir(checkpoint):
        raise ConfigError(f"{checkpoint}: torch.export.load unpickles a .pt2 file, which can run any code; predict "
                          "reads the checkpoint, the exported folder or the .onnx file instead")  # fmt: skip
    return load_model(checkpoint, model)


def image_files(names: list[str]) -> list[str]:
    """The files named, a folder standing for the images in it (by name; hidden files and
    subfolders left out). An empty folder is an ImageError when its turn comes."""
    files: list[str] = []
    for name in names:
        if not os.path.isdir(name):
            files.append(name)
            continue
        found = sorted(
            str(f) for f in Path(name).iterdir()
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()
        )  # fmt: skip
        files.extend(found or [name])  # a folder without images: reported in its turn
    return files


def _read(path: str, digits: bool, input_shape: tuple[int, ...], invert: str) -> Tensor:
    """One file's input for the model; an ImageError (one line) for a file that cannot be read or shows
    no digit, or a folder without images. PIL's warnings about a damaged file (corrupt EXIF, a short
    read) are not printed: the file is read, or it is that one line."""
    if os.path.isdir(path):  # a folder image_files found no image in
        raise ImageError(f"{path}: no images in the folder ({' '.join(IMAGE_SUFFIXES)})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        return load_image(path, invert) if digits else _picture(path, input_shape)


def _picture(path: str, input_shape: tuple[int, ...]) -> Tensor:
    """An image for a model trained on an image folder: decoded as its training images were."""
    try:
        return decode_image(path, grey=input_shape[0] == 1, size=(input_shape[1], input_shape[2]))
    except DataError as exc:
        raise ImageError(str(exc)) from None


def _print_table(results: list[dict[str, Any]], show_top: bool, loaded: Any) -> None:
    names = list(loaded.class_names)
    named = names != [str(k) for k in range(len(names))]

    def label(entry: dict[str, Any]) -> str:
        return f"{entry['class']} {entry['name']}" if named else str(entry["class"])

    console, box = table_console()
    title = f"{loaded.path}: its EMA weights (trained with --ema)" if loaded.weights == "EMA" else None
    table = Table(title=title, title_justify="left", **box)
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
