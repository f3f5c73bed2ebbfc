"""MNIST-style data as uint8 tensors: decoded from IDX once, fetched a whole batch at a time.

torchvision's dataset classes find (and, online, download) the IDX files; we keep only their
decoded `data`/`targets` tensors and never build a PIL image. A batch is one fancy-index into
those tensors. Scaling to [0, 1] happens on the training device, after the uint8 bytes moved.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.config import ConfigError

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


class DataError(ConfigError):
    """Missing or unreadable data: a user error, reported in one line."""


@dataclass(frozen=True)
class Split:
    images: Tensor  # uint8 [N, 28, 28]
    labels: Tensor  # int64 [N]


def raw_folder(dataset: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / DATASET_INFO[dataset][0] / "raw"


def load_split(dataset: str, data_dir: str | os.PathLike, train: bool, download: bool = True) -> Split:
    """Decodes one split's IDX files into tensors, downloading them first when allowed and missing.

    Files already in place are read directly (the same bytes torchvision would read), so that
    torchvision is imported only to download.
    """
    folder = raw_folder(dataset, data_dir)
    missing = [n for n in IDX_FILES if not (folder / n).is_file()]
    if missing:
        download = download and os.environ.get(OFFLINE_ENV, "0") in ("", "0")
        if not download:
            raise DataError(_missing_message(dataset, folder))
        _download(dataset, data_dir, folder)
    prefix = "train" if train else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte", ndim=3)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte", ndim=1)
    if len(images) != len(labels) or len(images) == 0:
        raise DataError(f"{folder}: {prefix} images ({len(images)}) and labels ({len(labels)}) do not match")
    return Split(images, labels.to(torch.int64))


def read_idx(path: Path, ndim: int) -> Tensor:
    """Reads an uncompressed uint8 IDX file (magic 0x0000080N, N big-endian uint32 sizes, then bytes)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DataError(f"{path} is not a uint8 IDX file with {ndim} dimension(s)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise DataError(f"{path} holds {len(data) - header} bytes of data, its header promises {math.prod(shape)}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _download(dataset: str, data_dir: str | os.PathLike, folder: Path) -> None:
    import torchvision.datasets as tvd

    try:
        getattr(tvd, DATASET_INFO[dataset][0])(root=str(data_dir), train=True, download=True)
    except (RuntimeError, OSError) as exc:  # torchvision reports failed downloads as RuntimeError
        raise DataError(_missing_message(dataset, folder) + f" (download failed: {first_line(exc)})") from None


def _missing_message(dataset: str, folder: Path) -> str:
    return f"{dataset} data not found and not downloadable: put the four IDX files ({', '.join(IDX_FILES)}) in {folder}"


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line user errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        """One sample at a position of the epoch's order, as `__getitems__` reads batches."""
        index = self.sampler.order()[position]
        return self.images[index], self.labels[index]

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        order = self._device_order()
        first, n = positions[0], len(positions)
        if positions == list(range(first, first + n)):
            index = order[first : first + n]
        else:  # accelerate pads the last evaluation batches with positions from the start
            index = order[torch.as_tensor(positions).to(order.device)]
        return self.images[index], self.labels[index]

    def _device_order(self) -> Tensor:
        key = (self.sampler.epoch, self.sampler.shuffle)
        if self._order is None or self._order[0] != key:
            order, cuda = self.sampler.order(), self.images.device.type == "cuda"
            # Without blocking only from pinned memory (CUDA): a non-blocking copy of pageable memory
            # to MPS can read it after it was freed.
            order = order.pin_memory() if cuda else order
            self._order = (key, order.to(self.images.device, non_blocking=cuda))
        return self._order[1]


def whole_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
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


def make_loader(split: Split, batch_size: int, *, train: bool, seed: int, device: torch.device) -> DataLoader:
    """A DataLoader of whole-tensor batches; training batches are shuffled and drop_last."""
    if device.type in ("cuda", "mps"):  # 55 MB for all of MNIST: keep it resident, no copies per step
        split = Split(split.images.to(device), split.labels.to(device))
    sampler = EpochSampler(len(split.labels), seed, shuffle=train)
    return DataLoader(
        TensorImages(split, sampler),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        collate_fn=whole_batch,
        num_workers=0,  # the fetch is one index op; worker processes only add IPC
    )


def to_model_input(images: Tensor, channels_last: bool = False) -> Tensor:
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28] scaled to [0, 1], on the images' device."""
    x = images.unsqueeze(1).to(torch.float32).div_(NORMALIZATION["divide_by"])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
