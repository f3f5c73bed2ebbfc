"""The blog's MNIST loop, written out as the benchmark's baseline.

What the blog post does, step for step (see ../shared/reference/ for the post):

- data: torchvision's MNIST with `ToTensor()` + `Normalize(mean=0, std=1)`, i.e. one PIL image
  per sample turned into a float tensor on the host, batched by a `DataLoader` (batch 512,
  shuffle, `drop_last=True`, no worker processes) and copied to the device every step;
- validation: the same, and the blog also shuffles and drops the last partial batch there, so it
  scores 19 x 512 = 9,728 of the 10,000 test images (a different random subset each epoch);
- model: the blog's network (`trainer.model.build_model("blog_resnet")` is the same architecture,
  layer for layer), fp32, the default memory format;
- recipe: SGD lr 0.5 momentum 0.9, `OneCycleLR(max_lr=0.5)` stepped every batch, cross-entropy,
  seed 12 with the blog's `set_seed` (which also sets cuDNN deterministic and turns its autotuner off);
- metrics: the blog counts correct predictions per batch with scikit-learn's `accuracy_score` on
  `.cpu()` copies and appends `loss.item()` per step. scikit-learn is not a dependency, so we count
  with `(pred.cpu() == target.cpu()).sum().item()`: the same host transfers and the same per-batch
  host sync, without scikit-learn's Python overhead.

Run alone: `python benchmarks/blog_baseline.py --data-dir ../shared/data --epochs 10`.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
import torchvision
import torchvision.transforms as transforms
from torch import nn
from torch.utils.data import DataLoader, Subset

from trainer.model import build_model

BATCH_SIZE = 512
LR = 0.5
MOMENTUM = 0.9
SEED = 12


def set_seed(seed: int) -> None:
    """The blog's seeding, numpy included when it is there."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def blog_loaders(
    data_dir: str,
    batch_size: int = BATCH_SIZE,
    train_indices: Sequence[int] | None = None,
    valid_indices: Sequence[int] | None = None,
) -> tuple[DataLoader, DataLoader]:
    """The blog's two loaders; the files must already be in `data_dir`/MNIST/raw (no download).

    Without indices, the blog's: all 60,000 training images, and the test split shuffled with its
    last partial batch dropped. `train_indices` trains on those training images only (still
    shuffled, `drop_last`, as the blog does); `valid_indices` validates on those training images
    instead of the test split, each once, in order, the last partial batch included (the way the
    trainer evaluates its held-out images: benchmarks/time_to_target.py)."""
    t = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=(0,), std=(1,))])
    train = torchvision.datasets.MNIST(data_dir, train=True, download=False, transform=t)
    if valid_indices is None:
        valid = torchvision.datasets.MNIST(data_dir, train=False, download=False, transform=t)
    else:
        valid = Subset(train, list(valid_indices))
    if train_indices is not None:
        train = Subset(train, list(train_indices))
    dl_train = DataLoader(train, batch_size=batch_size, drop_last=True, shuffle=True)
    if valid_indices is None:
        dl_valid = DataLoader(valid, batch_size=batch_size, drop_last=True, shuffle=True)  # as in the blog
    else:
        dl_valid = DataLoader(valid, batch_size=batch_size, drop_last=False, shuffle=False)  # every image, once
    return dl_train, dl_valid


class BlogRun:
    """One seeded run of the blog's recipe, an epoch at a time (`train_epoch`, then `evaluate`)."""

    def __init__(
        self,
        data_dir: str,
        epochs: int,
        device: torch.device,
        seed: int = SEED,
        train_indices: Sequence[int] | None = None,
        valid_indices: Sequence[int] | None = None,
    ) -> None:
        """`train_indices` / `valid_indices`: see `blog_loaders` (None: the blog's own data)."""
        set_seed(seed)
        self.device = device
        self.dl_train, self.dl_valid = blog_loaders(data_dir, train_indices=train_indices, valid_indices=valid_indices)
        self.model = build_model("blog_resnet").to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.loss_fn = nn.CrossEntropyLoss()
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=LR, steps_per_epoch=len(self.dl_train), epochs=epochs
        )
        self.losses: list[float] = []

    def train_epoch(self, max_steps: int | None = None) -> dict[str, Any]:
        """One epoch (or its first `max_steps` batches); the blog's per-batch bookkeeping included."""
        model, dev = self.model, self.device
        model.train()
        correct = seen = 0
        loss_sum = 0.0
        for step, (inputs, target) in enumerate(self.dl_train):
            if step == max_steps:
                break
            self.optimizer.zero_grad()
            inputs = inputs.to(dev)
            target = target.to(dev)
            output = model(inputs)
            correct += (output.argmax(dim=-1).cpu() == target.cpu()).sum().item()  # accuracy_score(normalize=False)
            loss = self.loss_fn(output, target)
            self.losses.append(loss.item())
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            seen += len(target)
            loss_sum += self.losses[-1] * len(target)
        return {"loss": loss_sum / seen, "acc": correct / seen, "samples": seen}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        model, dev = self.model, self.device
        model.eval()
        correct = seen = 0
        for inputs, target in self.dl_valid:
            inputs = inputs.to(dev)
            target = target.to(dev)
            output = model(inputs)
            correct += (output.argmax(dim=-1).cpu() == target.cpu()).sum().item()
            seen += len(target)
        return {"acc": correct / seen, "correct": correct, "seen": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description="The blog's MNIST training loop, as written in the post.")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding MNIST/raw/*-ubyte")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    run = BlogRun(args.data_dir, args.epochs, torch.device(args.device))
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        train = run.train_epoch()
        valid = run.evaluate()
        print(
            f"epoch {epoch}: train acc {train['acc']:.4f}  valid acc {valid['acc']:.4f} "
            f"({valid['correct']}/{valid['seen']})  {time.perf_counter() - t0:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
