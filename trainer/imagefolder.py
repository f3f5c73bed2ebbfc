"""Image folders in torchvision's ImageFolder layout, decoded once into uint8 tensors and cached.

PATH/train/<class>/... and PATH/test/<class>/... (or PATH/val/; with both, val/ validates and
test/ is scored once at the end): grey when every image is grey,
RGB otherwise, at the first image's size unless asked for another. The cache, in
<data-dir>/imagefolder/, is keyed by the files' contents and the size, so that a run of any name,
from any folder, reads it instead of decoding, and a changed image is decoded again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainer.errors import ConfigError, DataError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")
# Bump when the decoding changes: caches of another version are not reused.
IMAGE_CACHE_VERSION = "2"


def image_folder_path(dataset: str) -> Path | None:
    """PATH of `imagefolder:PATH`; None for the built-in data sets."""
    return Path(dataset.split(":", 1)[1]) if dataset.startswith("imagefolder:") else None


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """--image-size: "N" (N x N) or "HxW"."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts) * (2 if len(parts) == 1 else 1)
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"--image-size must be N or HxW (e.g. 32 or 24x32), got {text!r}")
    return size  # type: ignore[return-value]


@contextmanager
def opened_image(file: str | os.PathLike) -> Iterator[Any]:
    """PIL's image of `file`, open for the block. Whatever PIL refuses, on opening or while the block
    decodes (unidentifiable, truncated, corrupt, a decompression bomb), is a one-line DataError."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            yield image
    except FileNotFoundError:
        raise DataError(f"{file}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # OSError: folders too
        raise DataError(f"{file}: cannot read the image ({first_line(exc)})") from None


def eight_bit(image: Any) -> Any:
    """A PIL image with 16-bit grey (I;16, I) scaled to 8-bit "L" (PIL's own conversion clips it at
    255); other modes as they are."""
    import numpy as np
    from PIL import Image

    if not image.mode.startswith("I"):
        return image
    wide = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    return Image.fromarray(wide.round().clip(0, 255).astype(np.uint8), mode="L")


def decode_image(file: str | os.PathLike, grey: bool, size: tuple[int, int]) -> Tensor:
    """An image file as uint8 [H, W] (grey) or [3, H, W], resized to `size` (H, W) if it differs.
    Training, evaluate and predict all decode through here, so the model sees the same pixels."""
    with opened_image(file) as opened:
        return image_pixels(opened, grey, size)


def image_pixels(image: Any, grey: bool, size: tuple[int, int]) -> Tensor:
    """A PIL image as uint8 [H, W] (grey) or [3, H, W], resized to `size` (H, W) if it differs:
    an image folder's files and the PIL images of a `datasets.Dataset` alike."""
    import numpy as np
    from PIL import Image

    image = eight_bit(image).convert("L" if grey else "RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels if grey else pixels.permute(2, 0, 1).contiguous()


def _image_files(folder: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageFolder's layout: folder/<class>/<image> (or deeper). The classes are sorted by name
    (those of the training split when `classes` is given); the images of a class by path. Hidden
    files and folders (a name starting with ".") are skipped."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder}: class folder(s) {', '.join(unknown)} are not in the training split")
    files = [
        (f, k)
        for k, name in enumerate(classes)
        if (folder / name).is_dir()
        for f in sorted((folder / name).rglob("*"))  # subfolders of a class too, as ImageFolder walks them
        if f.suffix.lower() in IMAGE_SUFFIXES
        and f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(folder / name).parts)  # ._x.png, .cache/
    ]
    if not classes or not files:
        raise DataError(f"{folder}: no images in class folders (expected {folder}/<class>/<image>.png)")
    if classes is found:  # the training split: a class it has no image of could never be learnt (test: absent is fine)
        empty = sorted(set(classes) - {classes[k] for _, k in files})
        if empty:
            raise DataError(f"{folder / empty[0]}: a class folder with no images; add some or remove the folder")
    return classes, files


def image_folder_splits(root: Path) -> dict[str, Path]:
    """The split folders by role: "train", "test" (PATH/test, or PATH/val when there is no test/),
    and "val" when PATH has both val/ and test/ (val/ validates, test/ is scored once at the end)."""
    both = (root / "test").is_dir() and (root / "val").is_dir()
    test = root / "test" if (root / "test").is_dir() or not (root / "val").is_dir() else root / "val"
    if not (root / "train").is_dir() or not test.is_dir():
        raise DataError(f"{root}: an image folder needs train/<class>/* and test/<class>/* (or val/<class>/*)")
    return {"train": root / "train", **({"val": root / "val"} if both else {}), "test": test}


def load_image_folder(
    root: Path, data_dir: str | os.PathLike, image_size: tuple[int, int] | None, say: Any = print
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[str, ...], str]:
    """The training and test splits of an image folder (see `load_image_folder_splits`): (images,
    labels) of each, the class names and the folder's key."""
    splits, classes, key = load_image_folder_splits(root, data_dir, image_size, say)
    return splits["train"], splits["test"], classes, key


def load_image_folder_splits(
    root: Path, data_dir: str | os.PathLike, image_size: tuple[int, int] | None, say: Any = print
) -> tuple[dict[str, tuple[Tensor, Tensor]], tuple[str, ...], str]:
    """Every split of an image folder as uint8 tensors (by role, as `image_folder_splits` names
    them): grey when every image is, RGB otherwise, at the first image's size unless `image_size`.
    Cached in data_dir/imagefolder/, keyed by the files' contents and the size, so the next run
    (of any name, from any folder) skips the decoding. Returns the splits' (images, labels), the
    class names and that key (what the folder is, wherever it lies)."""
    import hashlib

    folders = image_folder_splits(root)
    classes, train_files = _image_files(folders["train"], None)
    if len(classes) < 2:
        raise DataError(f"{folders['train']}: one class folder ({classes[0]}); a classifier needs at least two")
    files = {"train": train_files, **{role: _image_files(folders[role], classes)[1] for role in folders
                                      if role != "train"}}  # fmt: skip
    key = hashlib.sha256(f"{IMAGE_CACHE_VERSION} {image_size} {classes}".encode())
    for split, listed in files.items():
        for file, label in listed:
            try:
                content = file.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read {file}: {exc.strerror or exc}") from None
            key.update(f"{split}/{label}/{file.relative_to(root).as_posix()}/{len(content)}:".encode())
            key.update(hashlib.sha256(content).digest())
    cache = Path(data_dir) / "imagefolder" / f"{root.name}-{key.hexdigest()[:20]}.safetensors"
    count = sum(len(listed) for listed in files.values())
    if cache.is_file():
        try:
            from safetensors.torch import load_file

            tensors = load_file(cache)
            splits = {role: (tensors[f"{role}_images"], tensors[f"{role}_labels"]) for role in files}
            say(f"images: {count} of {root} from the cache {cache}")
            return splits, tuple(classes), key.hexdigest()
        except Exception:  # noqa: BLE001 (a damaged cache is decoded again and replaced)
            pass
    grey, size = True, image_size or _size_of(train_files[0][0])
    for file, _ in (f for listed in files.values() for f in listed):  # headers only: cheap
        with opened_image(file) as opened:
            grey = grey and (opened.mode in GREY_MODES or (opened.mode == "P" and grey_palette(opened)))
    splits = {}
    for role, listed in files.items():
        images = torch.stack([decode_image(f, grey, size) for f, _ in listed])
        splits[role] = (images, torch.tensor([k for _, k in listed], dtype=torch.int64))
    problem = _write_cache(cache, splits, root)
    kept = f"not cached ({problem}: the next run decodes again)" if problem else f"cached in {cache}"
    say(f"images: decoded {count} from {root} ({'grey' if grey else 'RGB'}, {size[0]}x{size[1]}), {kept}")
    return splits, tuple(classes), key.hexdigest()


def _size_of(file: Path) -> tuple[int, int]:
    with opened_image(file) as opened:
        return opened.size[1], opened.size[0]


def grey_palette(image: Any) -> bool:
    """Whether a palette image ("P") holds only greys."""
    palette = image.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def _write_cache(cache: Path, splits: dict[str, tuple[Tensor, Tensor]], root: Path) -> str | None:
    """Atomically (a temporary file, then a rename). A cache that cannot be written is skipped:
    returns why, in a few words, or None when it was written."""
    from safetensors.torch import save_file

    tensors = {f"{role}_{what}": t for role, pair in splits.items() for what, t in zip(("images", "labels"), pair)}
    partial = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"source": str(root)})
        os.replace(partial, cache)
        return None
    except Exception as exc:  # noqa: BLE001 (safetensors reports a full disk as its own error type)
        with suppress(OSError):  # its folder may be what failed
            partial.unlink()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        return f"cannot write in {cache.parent}: {reason}"
