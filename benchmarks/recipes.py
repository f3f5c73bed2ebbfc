"""Recipes and starting points on real data: the default recipe against AdamW + EMA + augmentation,
and --init-from against training from scratch. Each row is one run of the trainer's command line;
the table gives its final accuracy (the EMA's where there is one) and its seconds per epoch.

    python benchmarks/recipes.py --data-dir ../shared/data [--epochs 10] [--out /tmp/recipes]

It writes two folders to train on: a small folder of real digits cut from MNIST's test split
(500 training and 1,000 test images, never seen by a model trained on MNIST's training split), and
the shapes of examples/image_folder_custom_model.py's --demo-folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from trainer.data import load_split

REPO = Path(__file__).resolve().parents[1]
AND_EMA = ["--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.05", "--schedule", "cosine",
           "--warmup-steps", "50", "--ema", "0.999", "--augment"]  # fmt: skip


def digits_folder(data_dir: Path, root: Path, per_class: int = 50) -> Path:
    """MNIST test digits 0..4999 (the first `per_class` of each class) to train on, 5000..5999 to test."""
    split = load_split("mnist", data_dir, train=False)
    counts: dict[int, int] = {}
    for i in range(6000):
        label = int(split.labels[i])
        if i < 5000 and counts.get(label, 0) >= per_class:
            continue
        part = "train" if i < 5000 else "test"
        folder = root / part / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[i].numpy(), mode="L").save(folder / f"{i}.png")
        counts[label] = counts.get(label, 0) + (i < 5000)
    return root


def train(out: Path, name: str, *flags: str) -> dict:
    """One run of the command line; its last record and its mean seconds per epoch."""
    cmd = [sys.executable, "-m", "trainer", "--output-dir", str(out), "--run-name", name, "--progress", "plain",
           *flags]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    key = "valid_acc_ema" if "valid_acc_ema" in rows[-1] else "valid_acc"
    per_epoch = sum(r["epoch_time_s"] + r["eval_time_s"] for r in rows) / len(rows)
    return {"name": name, "acc": rows[-1][key], "by": key, "s_per_epoch": per_epoch, "epochs": len(rows),
            "acc_by_epoch": [r[key] for r in rows]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/recipes"))
    args = parser.parse_args()
    out, data = args.out, ["--data-dir", str(args.data_dir)]
    rows = []
    epochs = ["--epochs", str(args.epochs)]
    rows.append(train(out, "mnist-default", *data, *epochs))
    rows.append(train(out, "mnist-adamw-ema-augment", *data, *epochs, *AND_EMA))
    rows.append(train(out, "mnist-adamw-ema", *data, *epochs, *AND_EMA[:-1]))
    shapes = out / "shapes"
    if not shapes.exists():
        spec = importlib.util.spec_from_file_location("example", REPO / "examples" / "image_folder_custom_model.py")
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        example.write_demo_folder(shapes)
    folder = ["--dataset", f"imagefolder:{shapes}", "--data-dir", str(out / "cache"), "--batch-size", "32"]
    rows.append(train(out, "shapes-default", *folder, *epochs))
    rows.append(train(out, "shapes-adamw-ema-augment", *folder, *epochs, *AND_EMA[:-5], "--warmup-steps", "5",
                      "--ema", "0.99", "--augment"))  # fmt: skip
    # Starting points: MNIST's weights (3 epochs on its training split) onto 500 real test digits.
    digits = digits_folder(args.data_dir, out / "digits") if not (out / "digits").exists() else out / "digits"
    rows.append(train(out, "mnist-3-epochs", *data, "--epochs", "3"))
    small = ["--dataset", f"imagefolder:{digits}", "--data-dir", str(out / "cache"), "--batch-size", "50"]
    for n in (1, 3):
        rows.append(train(out, f"digits-scratch-{n}", *small, "--epochs", str(n)))
        rows.append(train(out, f"digits-init-{n}", *small, "--epochs", str(n), "--lr", "0.05", "--init-from",
                          str(out / "mnist-3-epochs")))  # fmt: skip
    print("| run | epochs | final valid acc | s/epoch |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['epochs']} | {r['acc']:.4f}{' (EMA)' if r['by'].endswith('ema') else ''} | "
              f"{r['s_per_epoch']:.2f} |")  # fmt: skip
    (out / "recipes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
