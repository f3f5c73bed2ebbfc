"""Run in each process of a (forked) multi-process test: trainer's exact evaluation against naive
per-process counting, and trainer's LR schedule against one naively sized from the prepared loader.
The main process writes the findings as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer import TrainConfig, Trainer


def probe(data_dir: Path, output_dir: Path, weights: Path, result: Path, epochs: int = 2) -> int:
    config = TrainConfig(data_dir=str(data_dir), output_dir=str(output_dir), batch_size=64, eval_batch_size=128,
                         epochs=epochs, cpu=True, progress="plain", val_split=0)  # fmt: skip
    trainer = Trainer(config)
    acc = trainer.accelerator
    acc.unwrap_model(trainer.model).load_state_dict(load_file(weights))

    exact = trainer.evaluate()

    # Naive: count per process, then gather the counts through gather_for_metrics.
    naive_correct = naive_seen = 0
    trainer.model.eval()
    with torch.no_grad():
        for images, labels, _ in trainer.eval_loader:
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
        findings = {
            "exact": {"correct": exact.correct, "seen": exact.seen, "loss": exact.loss},
            "naive": {"correct": naive_correct, "seen": naive_seen},
            "naive_lrs": naive_lrs,
            "num_processes": acc.num_processes,
        }
        result.write_text(json.dumps(findings))
    acc.wait_for_everyone()
    return 0
