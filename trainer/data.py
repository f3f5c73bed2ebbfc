"""Data sets as tensors, decoded once, fetched a whole batch at a time; or a user's Dataset.

MNIST and its siblings come from their IDX files (torchvision finds and, online, downloads
them; we keep only the decoded tensors and never build a PIL image). An image folder is decoded
once into uint8 tensors and cached by content. A batch of such tensors is one index op;
scaling to [0, 1] happens on the training device, after the uint8 bytes moved. Any other
map-style Dataset goes through a DataLoader with the same seeded order of positions, so the
exact counts, the (seed, epoch) order and the elastic resume hold for both paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.config import DEFAULT_VAL_SPLIT
from trainer.errors import DataError, first_line
from trainer.imagefolder import GREY_MODES, grey_palette, image_folder_path, image_pixels, load_image_folder_splits
from trainer.runtime import cores, local_processes

# torchvision class name, its folder under --data-dir, and the class names shown to users.
DATASET_INFO: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist": ("MNIST", tuple(str(d) for d in range(10))),
    "fashion-mnist": (
        "FashionMNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "kmnist": ("KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Set to 1 to never try a download (the error then says where to put the files).
OFFLINE_ENV = "TRAINER_OFFLINE"
# What the model sees: pixel / 255, i.e. the blog's ToTensor + Normalize(mean=0, std=1).
NORMALIZATION = {"divide_by": 255.0, "mean": 0.0, "std": 1.0}


@dataclass(frozen=True)
class Split:
    images: Tensor  # [N, H, W] (grey) or [N, C, H, W], uint8; or any float inputs [N, ...]
    labels: Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


# What a run's validation split is (DataSource.validation): images held out of the training split,
# an image folder's val/, the eval_data given in Python, or the test split itself (--val-split 0).
HELD_OUT, VAL_FOLDER, EVAL_DATA, TEST_SPLIT = "held-out", "val", "eval_data", "test"


@dataclass(frozen=True)
class DataSource:
    """What a run trains, validates and tests on, and what a checkpoint records about it."""

    name: str  # "mnist", "imagefolder:/abs/path" or "custom" (data given in Python)
    train: Split | Dataset
    valid: Split | Dataset  # what `best` and early stopping look at; the test split itself when validation=test
    test: Split | Dataset | None  # scored once, at the end, on `best`; None: no test data (given in Python)
    validation: str  # HELD_OUT, VAL_FOLDER, EVAL_DATA or TEST_SPLIT
    class_names: tuple[str, ...] | None  # None: "0".."C-1", C from the model's output
    input_shape: tuple[int, ...]  # one input, e.g. (1, 28, 28)
    normalization: dict[str, float] | None  # for uint8 pixels; None: inputs go to the model as they are
    example: Tensor | None = None  # the first training input (data given in Python)
    digest: str | None = None  # an image folder's contents (its cache key)


# The keys a dict sample's input and label are found under, in this order, unless named
# (--input-key, --label-key): those of transformers' image processors and of `datasets`.
INPUT_KEYS = ("pixel_values", "image", "img", "input")
LABEL_KEYS = ("labels", "label")


class DictSamples(Dataset):
    """A Dataset of dicts (a `datasets.Dataset`, or your own) read as (input, label) pairs. A PIL
    image under the input key becomes uint8 [C, H, W] as an image folder's files do (grey or RGB,
    at one size: `image`); numpy arrays and lists become tensors."""

    def __init__(self, data: Any, input_key: str, label_key: str, image: tuple[bool, tuple[int, int]] | None) -> None:
        self.data, self.input_key, self.label_key, self.image = data, input_key, label_key, image

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        item = self.data[index]
        if not isinstance(item, Mapping) or self.input_key not in item or self.label_key not in item:
            got = f"the keys {', '.join(map(str, item))}" if isinstance(item, Mapping) else f"a {type(item).__name__}"
            raise DataError(f"sample {index} has {got}, not {self.input_key!r} and {self.label_key!r} as the first")
        inputs = item[self.input_key]
        if _is_pil(inputs):
            if self.image is None:
                raise DataError(f"sample {index}'s {self.input_key!r} is a PIL image; the first sample's is not")
            grey, size = self.image
            pixels = image_pixels(inputs, grey, size)
            inputs = pixels.unsqueeze(0) if grey else pixels
        elif not isinstance(inputs, Tensor):
            inputs = torch.as_tensor(np.asarray(inputs)) if not isinstance(inputs, int | float) else inputs
        return inputs, item[self.label_key]

    @property
    def targets(self) -> Any:
        """The labels without the inputs, where the data set has them as a column (`datasets`)."""
        if self.label_key not in (getattr(self.data, "column_names", None) or ()):
            return None
        try:  # the column alone, without the data set's format or transform (which may read every image)
            return list(self.data.with_format(None).select_columns([self.label_key])[self.label_key])
        except Exception:  # noqa: BLE001 (not a `datasets.Dataset` after all: read the samples one by one)
            return None


def _is_pil(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def _dict_keys(sample: Mapping, input_key: str | None, label_key: str | None) -> tuple[str, str]:
    """The input's and the label's keys in a dict sample: the ones named, else the usual names."""
    keys = ", ".join(map(str, sample)) or "none"

    def pick(named: str | None, usual: tuple[str, ...], what: str) -> str:
        if named is not None:
            if named not in sample:
                raise DataError(f"train_data[0] has no key {named!r} (--{what}-key); its keys: {keys}")
            return named
        for key in usual:
            if key in sample:
                return key
        raise DataError(
            f"train_data[0] is a dict without {' or '.join(repr(k) for k in usual)}: name its {what}'s key with "
            f"--{what}-key (input_key= / label_key= in Python); its keys: {keys}"
        )

    return pick(input_key, INPUT_KEYS, "input"), pick(label_key, LABEL_KEYS, "label")


def dict_source(
    train: Any, valid: Any, test: Any, input_key: str | None, label_key: str | None, image_size: tuple[int, int] | None
) -> tuple[Any, Any, Any, tuple[str, ...] | None]:
    """Data sets of dict samples as (input, label) data sets, and the class names their label
    feature has (`datasets.ClassLabel`), if any. Images are grey when the first is, at its size
    unless `image_size`."""
    with _seeded(0, 0):
        first = train[0]
    if not isinstance(first, Mapping):
        return train, valid, test, None
    keys = _dict_keys(first, input_key, label_key)
    image = None
    if _is_pil(first[keys[0]]):
        picture = first[keys[0]]
        grey = picture.mode in GREY_MODES or (picture.mode == "P" and grey_palette(picture))
        image = (grey, image_size or (picture.size[1], picture.size[0]))
    feature = (getattr(train, "features", None) or {}).get(keys[1])
    names = tuple(str(n) for n in feature.names) if getattr(feature, "names", None) else None
    wrapped = [None if d is None else DictSamples(d, *keys, image) for d in (train, valid, test)]
    return (*wrapped, names)


def user_source(
    train: Dataset,
    valid: Dataset,
    test: Dataset | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> DataSource:
    """Data given in Python, checked on its first sample: (input tensor, int label) pairs, or dicts
    holding them (see `dict_source`); uint8 images channels first. The sample is read with the
    generators seeded and given back, so a Dataset that augments does not move the run's random
    state."""
    from torch.utils.data import IterableDataset

    for name, data in (("train_data", train), ("eval_data", valid), ("test_data", test)):
        if data is None:
            continue
        try:
            size = len(data)
            if isinstance(data, IterableDataset):  # it may have a length, but it cannot be read by index
                raise TypeError
        except TypeError:
            raise DataError(
                f"{name} must be a map-style Dataset with a length (read by index, not an IterableDataset)"
            ) from None
        if size == 0:
            raise DataError(f"{name} is empty")
    train, valid, test, names = dict_source(train, valid, test, input_key, label_key, image_size)
    with _seeded(0, 0):
        sample = train[0]
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        raise DataError(f"train_data[0] must be an (input, label) pair or a dict, got {type(sample).__name__}")
    try:
        example, label = torch.as_tensor(sample[0]), class_label(sample[1])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"train_data[0] must be (input tensor, int label): {first_line(exc)}") from None
    del label
    train, valid, test = as_split(train), as_split(valid), None if test is None else as_split(test)
    shape = input_shape_of(train) if isinstance(train, Split) else tuple(example.shape)
    if example.dtype == torch.uint8 and len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
        raise DataError(
            f"uint8 images must be channels first [C, H, W]; these look like [H, W, C] {list(shape)}: permute them"
        )
    normalization = NORMALIZATION if example.dtype == torch.uint8 else None  # pixels are scaled as MNIST's
    return DataSource("custom", train, valid, test, EVAL_DATA, names, shape, normalization, example)


def named_source(
    dataset: str,
    data_dir: str | os.PathLike,
    image_size: tuple[int, int] | None,
    say: Any,
    val_split: float = 0,
    seed: int = 0,
    input_key: str | None = None,
    label_key: str | None = None,
) -> DataSource:
    """A built-in data set (mnist, fashion-mnist, kmnist) or `imagefolder:PATH`, as tensors, or
    `hf:PATH` (see `hf_source`), with its validation split: `val_split` images held out of the
    training split (see `held_out_count`)."""
    if dataset.startswith("hf:"):
        return hf_source(dataset, image_size, say, val_split, seed, input_key, label_key)
    folder = image_folder_path(dataset)
    if folder is not None:
        splits, names, digest = load_image_folder_splits(folder, data_dir, image_size, say)
        train, test = Split(*splits["train"]), Split(*splits["test"])
        if "val" in splits:  # its own validation split: val/ validates, test/ is scored at the end
            if val_split:
                raise DataError(f"{folder} has its own val/ beside test/: leave --val-split out (or pass 0)")
            shape = input_shape_of(train)
            return DataSource(dataset, train, Split(*splits["val"]), test, VAL_FOLDER, names, shape, NORMALIZATION,
                              digest=digest)  # fmt: skip
    else:
        idx_folder(dataset, data_dir, IDX_FILES, download=True)  # training needs both splits: name every missing file
        train, test = load_split(dataset, data_dir, train=True), load_split(dataset, data_dir, train=False)
        names, digest = DATASET_INFO[dataset][1], None
    shape, count = input_shape_of(train), held_out_count(val_split, len(train))
    if count == 0:
        return DataSource(dataset, train, test, test, TEST_SPLIT, names, shape, NORMALIZATION, digest=digest)
    train, valid = hold_out(train, count, seed)
    return DataSource(dataset, train, valid, test, HELD_OUT, names, shape, NORMALIZATION, digest=digest)


# The names a saved data set's validation split goes by (the first one present is used).
VALIDATION_SPLITS = ("validation", "valid", "val")
HF_INSTALL = 'pip install -e ".[hf]" in the checkout (datasets)'


def load_saved(path: Path) -> Any:
    """A Hugging Face data set saved with `save_to_disk` (a DatasetDict): read offline."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset hf:PATH needs the datasets package: {HF_INSTALL}") from None
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (hf:PATH names a data set saved with save_to_disk)")
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 (datasets' own errors: not a saved data set)
        raise DataError(f"{path} is not a data set saved with save_to_disk ({first_line(exc)})") from None
    if not isinstance(saved, datasets.DatasetDict):
        raise DataError(f"{path} holds one split; hf:PATH needs a DatasetDict with train and test (or validation)")
    return saved


def hf_source(
    dataset: str,
    image_size: tuple[int, int] | None,
    say: Any,
    val_split: float,
    seed: int,
    input_key: str | None,
    label_key: str | None,
) -> DataSource:
    """`hf:PATH`: its train split trains; a validation split validates and test is scored once at
    the end; with only one of them, it validates (as an image folder's test/), unless --val-split
    holds images out of train (stratified by the label column, seeded, as for MNIST)."""
    path = Path(dataset.split(":", 1)[1])
    saved = load_saved(path)
    if "train" not in saved:
        raise DataError(f"{path} has the splits {', '.join(saved)}, no train")
    val = next((saved[k] for k in VALIDATION_SPLITS if k in saved), None)
    test = saved.get("test")
    if val is None and test is None:
        raise DataError(f"{path} has the splits {', '.join(saved)}: it needs test or validation beside train")
    train = saved["train"]
    if val is not None and test is not None:  # its own validation split: it validates, test is scored at the end
        if val_split:
            raise DataError(f"{path} has its own validation split beside test: leave --val-split out (or pass 0)")
        role, valid = VAL_FOLDER, val
    else:
        role, test = TEST_SPLIT, val if test is None else test
        valid = test
        count = held_out_count(val_split, len(train))
        if count:
            labels = readable_labels(DictSamples(train, *_dict_keys(train[0], input_key, label_key), None))
            if labels is None:
                raise DataError(f"{path}: --val-split needs the training split's labels as a column")
            chosen = held_out_mask(labels, count, seed)
            valid = train.select(torch.nonzero(chosen).flatten().tolist())
            train = train.select(torch.nonzero(~chosen).flatten().tolist())
            role = HELD_OUT
    source = user_source(train, valid, test, input_key, label_key, image_size)
    import hashlib  # what the splits hold, as `datasets` fingerprints them: a resume checks it did not change

    fingerprints = " ".join(str(getattr(d, "_fingerprint", "")) for d in (train, valid, test))
    digest = hashlib.sha256(fingerprints.encode()).hexdigest()
    say(f"data: {path}: {len(train)} training, {len(valid)} validation, {len(test)} test samples")
    return dataclasses.replace(source, name=f"hf:{path}", validation=role, digest=digest)


def held_out_count(val_split: float, n_train: int) -> int:
    """--val-split as a number of training images: N itself, or a fraction of the split (rounded).
    It must leave some training images; 0 means that validation is the test split."""
    given = " (the built-in data sets' default)" if val_split == DEFAULT_VAL_SPLIT else ""
    count = round(val_split * n_train) if 0 < val_split < 1 else int(val_split)
    if count >= n_train:
        raise DataError(
            f"--val-split {val_split:g}{given} holds out {count} images, and the training split has {n_train}: pass "
            "a smaller N, a fraction (0.1), or 0 to validate on the test split"
        )
    return count


def hold_out(split: Split, count: int, seed: int) -> tuple[Split, Split]:
    """Splits `count` images off `split` for validation, stratified by class: each class gives its
    share (largest remainders settle the rounding, ties to the lower class), chosen by a generator
    seeded with `seed` alone, so every process and every resume holds out the same images. Both
    parts keep the split's order."""
    chosen = held_out_mask(split.labels, count, seed)
    return Split(split.images[~chosen], split.labels[~chosen]), Split(split.images[chosen], split.labels[chosen])


def held_out_mask(labels: Tensor, count: int, seed: int) -> Tensor:
    """Which of `labels` `hold_out` holds out: a bool mask with `count` True, stratified and seeded."""
    classes = int(labels.max()) + 1 if len(labels) else 0
    sizes = torch.bincount(labels, minlength=classes)
    exact = sizes.double() * count / len(labels)
    quota = exact.floor().long()
    left = count - int(quota.sum())
    if left:  # the largest fractional parts get one more (a stable sort: ties go to the lower class)
        order = torch.sort(exact - quota, descending=True, stable=True).indices
        quota[order[:left]] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(len(labels), dtype=torch.bool)
    for k in range(classes):
        members = torch.nonzero(labels == k).flatten()
        chosen[members[torch.randperm(len(members), generator=g)[: int(quota[k])]]] = True
    return chosen


def input_shape_of(data: Split | Dataset) -> tuple[int, ...]:
    """The shape of one input: [1, H, W] for grey uint8 images [N, H, W]."""
    if isinstance(data, Split):
        shape = tuple(data.images.shape[1:])
        return (1, *shape) if data.images.dtype == torch.uint8 and len(shape) == 2 else shape
    return tuple(torch.as_tensor(data[0][0]).shape)


def as_split(data: Dataset) -> Split | Dataset:
    """A TensorDataset of (inputs, labels) takes the fast path of tensors; any other Dataset stays one."""
    from torch.utils.data import TensorDataset

    if isinstance(data, Split):
        return data
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        inputs, labels = data.tensors
        if labels.dim() == 1 and not labels.is_floating_point():
            return Split(inputs, labels.to(torch.int64))
    return data


def raw_folder(dataset: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / DATASET_INFO[dataset][0] / "raw"


def load_split(dataset: str, data_dir: str | os.PathLike, train: bool, download: bool = True) -> Split:
    """Decodes one split's IDX files into tensors, downloading them first when allowed and missing.

    Files already in place are read directly (the same bytes torchvision would read), so that
    torchvision is imported only to download.
    """
    prefix = "train" if train else "t10k"
    folder = idx_folder(dataset, data_dir, [n for n in IDX_FILES if n.startswith(prefix)], download)
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte", ndim=3)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte", ndim=1)
    if len(images) != len(labels) or len(images) == 0:
        raise DataError(f"{folder}: {prefix} images ({len(images)}) and labels ({len(labels)}) do not match")
    return Split(images, labels.to(torch.int64))


def idx_folder(dataset: str, data_dir: str | os.PathLike, files: list[str] | tuple[str, ...], download: bool) -> Path:
    """The folder that holds a built-in data set's IDX `files`, downloading the data set first when
    some are missing and `download` (and TRAINER_OFFLINE) allow it."""
    folder = raw_folder(dataset, data_dir)
    if not all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in files):
        if not download or os.environ.get(OFFLINE_ENV, "0") not in ("", "0"):
            raise DataError(_missing_message(dataset, folder, files))
        _download(dataset, data_dir, folder)
    return folder


# The most an IDX file may hold once decompressed (MNIST's training images are 47 MB).
MAX_IDX_BYTES = 2**31


def read_idx(path: Path, ndim: int) -> Tensor:
    """Reads a uint8 IDX file (magic 0x0000080N, N big-endian uint32 sizes, then bytes), or its
    gzipped form `path.gz` (as the data sets are published) where `path` itself is not there."""
    try:
        if not path.is_file() and path.with_name(f"{path.name}.gz").is_file():
            path = path.with_name(f"{path.name}.gz")
            with gzip.open(path) as f:
                data = f.read(MAX_IDX_BYTES + 1)
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip's own errors (a bad header, a truncated stream) are OSErrors
        raise DataError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DataError(f"{path} is not a uint8 IDX file with {ndim} dimension(s)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise DataError(f"{path} holds {len(data) - header} bytes of data, its header promises {math.prod(shape)}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _download(dataset: str, data_dir: str | os.PathLike, folder: Path) -> None:
    import torchvision.datasets as tvd

    made = [p for p in (Path(data_dir), folder.parent, folder) if not p.exists()]
    try:
        getattr(tvd, DATASET_INFO[dataset][0])(root=str(data_dir), train=True, download=True)
    except (RuntimeError, OSError) as exc:  # torchvision reports failed downloads as RuntimeError
        for made_here in reversed(made):  # the folders torchvision made for nothing
            with contextlib.suppress(OSError):
                made_here.rmdir()  # only when empty
        missing = _missing_message(dataset, folder, IDX_FILES)
        raise DataError(f"{missing} (download failed: {first_line(exc)})") from None


def _missing_message(dataset: str, folder: Path, files: list[str] | tuple[str, ...]) -> str:
    return f"{dataset} data not found and not downloaded: put {', '.join(files)} (or each .gz) in {folder}"


class TensorImages(Dataset):
    """Images and labels as tensors, read in the order of an `EpochSampler`.

    The sampler hands out positions in the epoch's order, not sample numbers: a batch is a run of
    consecutive positions, so `__getitems__` slices the epoch's order, which lives on the images'
    device, and fetches the whole batch with one index op. On a GPU no step copies anything from
    the host (one copy of the order per epoch), so the device never waits for the host to fetch.
    """

    def __init__(self, split: Split, sampler: EpochSampler) -> None:
        self.images = split.images
        self.labels = split.labels
        self.sampler = sampler
        self._order: tuple[tuple[int, bool], Tensor] | None = None  # (epoch, shuffled) -> order on the device

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def total_dataset_length(self) -> int:
        """What accelerate trims its padding against at the end of an evaluation: the part the
        sampler covers (a --limit-eval-batches prefix), not the whole split."""
        return len(self.sampler)

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor, Tensor]:
        """One sample at a position of the epoch's order, as `__getitems__` reads batches."""
        index = self.sampler.order()[position]
        return self.images[index], self.labels[index], index

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """A batch: its images, labels and sample numbers (what augmentation is seeded by)."""
        order = self._device_order()
        first, n = positions[0], len(positions)
        if positions == list(range(first, first + n)):
            index = order[first : first + n]
        else:  # accelerate pads the last evaluation batches with positions from the start
            index = order[torch.as_tensor(positions).to(order.device)]
        return self.images[index], self.labels[index], index

    def _device_order(self) -> Tensor:
        key = (self.sampler.epoch, self.sampler.shuffle)
        if self._order is None or self._order[0] != key:
            order, cuda = self.sampler.order(), self.images.device.type == "cuda"
            # Without blocking only from pinned memory (CUDA): a non-blocking copy of pageable memory
            # to MPS can read it after it was freed.
            order = order.pin_memory() if cuda else order
            self._order = (key, order.to(self.images.device, non_blocking=cuda))
        return self._order[1]


def whole_batch(batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """collate_fn for `TensorImages`: the batch is already stacked."""
    return batch


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The global sample order of one epoch: a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=generator)


class EpochSampler(Sampler[int]):
    """Yields the positions `start`..`stop - 1` of epoch `epoch`'s order; `order()` maps them to samples.

    The order never depends on the number of processes: accelerate's batch sharding deals
    consecutive batches of positions to the processes in turn, so global batch k is the same
    samples whether 1 or 4 processes train, and a resumed epoch continues at `start`.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.start, self.stop = 0, 0, n

    def set_position(self, epoch: int, start: int = 0, stop: int | None = None) -> None:
        """Epoch `epoch`'s order from sample `start` up to `stop` (default: its end)."""
        stop = self.n if stop is None else stop
        if not 0 <= start <= stop <= self.n:
            raise ValueError(f"position {start}..{stop} outside 0..{self.n}")
        self.epoch, self.start, self.stop = epoch, start, stop

    def order(self) -> Tensor:
        """The sample at each position of this epoch (int64, on the host)."""
        return epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))


def readable_labels(data: Split | Dataset) -> Tensor | None:
    """The labels, where they can be read without the inputs: tensors, or a Dataset's `targets` or
    `labels` (as torchvision's data sets have); else None."""
    labels = data.labels if isinstance(data, Split) else getattr(data, "targets", getattr(data, "labels", None))
    try:
        labels = torch.as_tensor(labels) if labels is not None and len(labels) == len(data) else None
    except (TypeError, ValueError, RuntimeError):
        return None
    return None if labels is None or labels.is_floating_point() or labels.dim() != 1 else labels


def class_label(label: Any) -> int:
    """A sample's label as a class number; ValueError for anything but a whole number:
    a float tensor (soft or regression targets) and a float such as 1.7 are not classes."""
    if isinstance(label, Tensor) and (label.numel() != 1 or label.is_floating_point() or label.is_complex()):
        raise ValueError(f"the label, a {label.dtype} tensor of shape {list(label.shape)}, is not an integer class")
    try:
        value = int(label)
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is None or value != label:
        raise ValueError(f"the label {label!r} is not an integer class")
    return value


def check_labels(data: Split | Dataset, classes: int, split: str) -> bool:
    """Every label is a class of the model. Checked here, up front, where the labels can be read
    without the inputs (tensors; a Dataset's `targets` or `labels`): True. Else False, and the
    loader's `PositionedDataset` checks each sample as it reads it; the first sample is checked
    now, so that labels numbered wrongly show before a whole epoch of training, not at its
    evaluation (reading them all up front would read every input once more)."""
    labels = readable_labels(data)
    known = labels is not None
    if not known:
        with _seeded(0, 0):
            sample = data[0]
        try:
            labels = torch.tensor([class_label(sample[1])])
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as exc:
            raise DataError(f"the {split} data's first sample must be (input, int label): {first_line(exc)}") from None
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DataError(f"the {split} data has the label {bad}, outside the model's {classes} classes 0..{classes - 1}")
    return known


class _seeded:
    """torch's (CPU) and Python's global generators seeded from (`base`, `index`) inside, and given
    back as they were afterwards: about 20 us a sample. (numpy's would cost 80 us more; a Dataset
    that draws from numpy's global generator is not covered.)"""

    def __init__(self, base: int, index: int) -> None:
        self.seed = (base * 2_654_435_761 + index) % (2**63)

    def __enter__(self) -> None:
        import random

        self.saved = (torch.default_generator.get_state(), random.getstate())
        torch.default_generator.manual_seed(self.seed)
        random.seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        import random

        torch.default_generator.set_state(self.saved[0])
        random.setstate(self.saved[1])


class PositionedDataset(Dataset):
    """A user's Dataset read in the order of an `EpochSampler`: position -> sample -> (input, label)."""

    def __init__(self, dataset: Dataset, sampler: EpochSampler) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.num_classes: int | None = None  # set when the labels must be checked sample by sample
        self._order: tuple[tuple[int, bool], list[int]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def total_dataset_length(self) -> int:
        return len(self.sampler)

    def __getitem__(self, position: int) -> tuple[Tensor, int, int]:
        key = (self.sampler.epoch, self.sampler.shuffle)
        if self._order is None or self._order[0] != key:  # once per epoch and worker
            self._order = (key, self.sampler.order().tolist())
        index = self._order[1][position]
        # The sample's own randomness (augmentations) comes from (seed, epoch, index), not from
        # whichever worker or process reads it: the same run with any workers, processes or resume.
        with _seeded(self.sampler.seed * 1_000_003 + self.sampler.epoch, index):
            inputs, label = self.dataset[index]
        try:
            label = class_label(label)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"sample {index}: {first_line(exc)}") from None
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise DataError(f"sample {index} has the label {label}, outside the model's {self.num_classes} classes")
        return inputs, label, index


def make_loader(
    data: Split | Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    device: torch.device,
    num_workers: int | None = None,
) -> DataLoader:
    """A DataLoader in the (seed, epoch) order; training batches are shuffled and drop_last.

    Tensors: whole-tensor batches, resident on a GPU. A Dataset: samples collated by torch's
    default, with worker processes on a GPU machine (`num_workers` None) and pinned memory."""
    sampler = EpochSampler(len(data), seed, shuffle=train)
    if isinstance(data, Split):
        if device.type in ("cuda", "mps") and _fits_on(device, data):  # no copies per step (MNIST: 55 MB)
            data = Split(data.images.to(device), data.labels.to(device))
        # The fetch is one index op: worker processes would only add IPC.
        dataset, kwargs = TensorImages(data, sampler), {"collate_fn": whole_batch, "num_workers": 0}
    else:
        if num_workers is None:
            num_workers = 0 if device.type == "cpu" else min(4, max(1, cores() // local_processes() - 1))
        # Each epoch's workers start anew, from the sampler's new position.
        kwargs = {"num_workers": num_workers, "pin_memory": device.type == "cuda", "persistent_workers": False}
        dataset = PositionedDataset(data, sampler)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, **kwargs)


def _fits_on(device: torch.device, split: Split) -> bool:
    """Whether a data set may live on the device: at most a quarter of the memory free there (on
    MPS, which shares the host's memory and does not say, at most 2 GiB). Larger ones stay on the
    host and accelerate copies each batch."""
    size = split.images.nbytes + split.labels.nbytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return size <= free // 4
    return size <= 2 << 30


def model_input(
    pixels: Tensor, normalization: dict[str, float] | None = NORMALIZATION, channels_last: bool = False
) -> Tensor:
    """What the model sees, in training, evaluate and predict alike: pixels [B, H, W] or [B, C, H, W]
    (uint8, or floats on the 0-255 scale) -> float [B, C, H, W] normalised, on the pixels' device.
    `normalization` None: inputs that are not pixels, as they are."""
    if normalization is None:
        return pixels.contiguous(memory_format=torch.channels_last) if channels_last and pixels.dim() == 4 else pixels
    x = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels
    x = x.to(torch.float32).div(normalization["divide_by"])  # never in place: float pixels may be the caller's
    mean, std = normalization.get("mean", 0.0), normalization.get("std", 1.0)
    if mean != 0.0 or std != 1.0:
        x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
