"""Run under torchrun by the tests: exact evaluation against naive per-process counting, and
trainer's LR schedule against one naively sized from the prepared loader. Prints JSON (rank 0)."""

import argparse
import json

import torch
from safetensors.torch import load_file

from trainer import TrainConfig, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", required=True)
parser.add_argument("--output-dir", required=True)
parser.add_argument("--weights")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--cpu", action="store_true")
args = parser.parse_args()

config = TrainConfig(
    data_dir=args.data_dir,
    output_dir=args.output_dir,
    batch_size=64,
    eval_batch_size=128,
    epochs=args.epochs,
    cpu=True,
    progress="plain",
)
trainer = Trainer(config)
acc = trainer.accelerator
if args.weights:
    acc.unwrap_model(trainer.model).load_state_dict(load_file(args.weights))

exact = trainer.evaluate()

# Naive: count per process, then gather the counts through gather_for_metrics.
naive_correct = naive_seen = 0
trainer.model.eval()
with torch.no_grad():
    for images, labels in trainer.eval_loader:
        logits = trainer.model(images.unsqueeze(1).float() / 255)
        counts = torch.stack([(logits.argmax(1) == labels).sum(), torch.tensor(len(labels))]).unsqueeze(0)
        counts = acc.gather_for_metrics(counts)
        naive_correct += int(counts[:, 0].sum())
        naive_seen += int(counts[:, 1].sum())

# Naive schedule: sized from the prepared (per-process) loader, stepped by accelerate's wrapper.
opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.5)
steps = len(trainer.train_loader) * config.epochs
naive = acc.prepare(torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=steps))
naive_lrs = []
for _ in range(steps):
    naive_lrs.append(naive.get_last_lr()[0])
    opt.step()
    naive.step()

if acc.is_main_process:
    print(
        json.dumps(
            {
                "exact": {"correct": exact.correct, "seen": exact.seen, "loss": exact.loss},
                "naive": {"correct": naive_correct, "seen": naive_seen},
                "naive_lrs": naive_lrs,
                "num_processes": acc.num_processes,
            }
        )
    )
