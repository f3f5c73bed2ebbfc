"""Train a small network of your own on a folder of images, through trainer's Python API.

    python examples/image_folder_custom_model.py PATH [--epochs 6] [--output-dir runs]
    python examples/image_folder_custom_model.py --demo-folder shapes   # writes a tiny folder to try

PATH is in torchvision's ImageFolder layout: PATH/train/<class>/*.png and PATH/test/<class>/*.png.
The images are read with torchvision's ImageFolder and its transforms, the way you would in any
PyTorch script; trainer takes the model and the two Datasets and adds what it always does: exact
metrics on any number of processes, a OneCycle schedule that ends on the last step, crash-safe
checkpoints and a bitwise resume (after a Ctrl-C, run the same command again: it continues). The same
script runs under `torchrun --nproc_per_node 2 examples/image_folder_custom_model.py PATH --cpu`.

(For the fastest path, `python -m trainer --dataset imagefolder:PATH` decodes the folder once
into tensors, caches them and trains the default network without any code.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from trainer import Stopped, TrainConfig, Trainer


class SmallNet(nn.Module):
    """Two convolutions and a linear layer: logits [B, classes] for images [B, channels, H, W]."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.classify = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x).flatten(1))


def write_demo_folder(root: Path, per_class: int = 96) -> Path:
    """Three classes of 24x24 colour images (a red bar, a green square, a blue ring) with noise."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(0)
    shapes = {"bar": (200, 40, 40), "square": (40, 180, 40), "ring": (40, 60, 220)}
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for name, colour in shapes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x, y = (int(v) for v in torch.randint(2, 10, (2,), generator=g))
                picture = Image.new("RGB", (24, 24), tuple(int(v) for v in torch.randint(150, 230, (3,), generator=g)))
                draw = ImageDraw.Draw(picture)
                if name == "bar":
                    draw.rectangle([x, y, x + 12, y + 3], fill=colour)
                elif name == "square":
                    draw.rectangle([x, y, x + 9, y + 9], fill=colour)
                else:
                    draw.ellipse([x, y, x + 11, y + 11], outline=colour, width=2)
                picture.save(root / split / name / f"{i:03d}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="an image folder (PATH/train/<class>/*, PATH/test/<class>/*)")
    parser.add_argument("--demo-folder", metavar="DIR", help="write a tiny three-class folder to DIR and train on it")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (the default: continue the run folder's run if it has one), latest, or a checkpoint",
    )
    parser.add_argument("--cpu", action="store_true", help="the CPU even with a GPU (gloo for several processes)")
    args = parser.parse_args(argv)
    if args.demo_folder:
        args.path = str(write_demo_folder(Path(args.demo_folder)))
    if not args.path:
        parser.error("give PATH or --demo-folder DIR")

    from torchvision import datasets, transforms

    to_tensor = transforms.Compose([transforms.Resize((24, 24)), transforms.ToTensor()])
    train = datasets.ImageFolder(str(Path(args.path) / "train"), transform=to_tensor)
    test = datasets.ImageFolder(str(Path(args.path) / "test"), transform=to_tensor)
    if test.classes != train.classes:  # each ImageFolder numbers the classes it finds
        parser.error(f"test/ has the classes {test.classes}, train/ has {train.classes}")
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=64, lr=args.lr, output_dir=args.output_dir,
        run_name=Path(args.path).name, resume=args.resume, cpu=args.cpu,
    )  # fmt: skip
    torch.manual_seed(config.seed)  # the model is yours to build: seed it for a repeatable run
    model = SmallNet(len(train.classes))
    trainer = Trainer(config, model=model, train_data=train, eval_data=test, class_names=train.classes)
    try:
        history = trainer.fit()
    except Stopped as stop:  # Ctrl-C or SIGTERM: a checkpoint was saved after the current step
        print(f"stopped; run the same command again to continue (checkpoint {stop.checkpoint})", file=sys.stderr)
        return 128 + stop.signum
    if trainer.accelerator.is_main_process:  # once, not once per process under torchrun
        best = max(history, key=lambda r: r["valid_acc"])
        print(f"best: epoch {best['epoch']}, {best['valid_correct']}/{best['valid_seen']} test images right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
