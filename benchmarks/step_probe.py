"""Where a training step's time goes: the blog's network at batch 512, one optimizer step at a time.

For each memory format (channels_last, contiguous) and precision (fp32, bf16 autocast) it times
`--steps` steps (median, after a warm-up) on synthetic MNIST-shaped data, and reports the
step's arithmetic rate against the network's work: 0.9 M multiply-adds per image forward, about
three times that forward + backward. With `--profile` it prints torch.profiler's top ops of one
step per setting. Nothing here is asserted by the tests; benchmarks/compare.py measures whole runs.

    python benchmarks/step_probe.py --json docs/benchmarks/step-probe-<cpu>.json --profile
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.model import blog_resnet
from trainer.runtime import cpu_description, device_defaults


def forward_macs(model: torch.nn.Module, image: torch.Tensor) -> int:
    """Multiply-adds of one image's forward pass through the convolutions (what dominates)."""
    total = 0

    def count(module: torch.nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output.numel() // output.shape[0] * k

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(image)
    for h in hooks:
        h.remove()
    return total


def probe(channels_last: bool, bf16: bool, steps: int, batch: int, profile: bool) -> dict:
    torch.manual_seed(0)
    model = blog_resnet()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.rand(batch, 1, 28, 28)
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    labels = torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):  # oneDNN picks and caches its kernels in the first steps
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    macs = forward_macs(blog_resnet().eval(), torch.rand(1, 1, 28, 28))
    result = {
        "memory_format": "channels_last" if channels_last else "contiguous",
        "precision": "bf16" if bf16 else "fp32",
        "median_ms": median * 1e3,
        "fastest_ms": min(times) * 1e3,
        "forward_macs_per_image": macs,
        # forward + backward (grad of inputs and of weights) is about 3 forward passes; 2 FLOP per MAC
        "gflops": 3 * 2 * macs * batch / median / 1e9,
    }
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        result["top_ops"] = [
            {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in events[:8]
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (the cores)")
    parser.add_argument("--profile", action="store_true", help="also the profiler's top ops of one step")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = device_defaults(torch.device("cpu"))
    report = {
        "machine": {
            "cpu": cpu_description(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
        },  # fmt: skip
        "batch_size": args.batch_size,
        "trainer_default": chosen,
        "results": [
            probe(cl, bf16, args.steps, args.batch_size, args.profile) for bf16 in (False, True) for cl in (True, False)
        ],  # fmt: skip
    }
    print(f"{report['machine']['cpu']}, {report['machine']['threads']} threads, torch {torch.__version__}")
    print(f"the trainer's default here: {chosen}")
    for r in report["results"]:
        print(f"{r['precision']:>5} {r['memory_format']:>14}: {r['median_ms']:7.1f} ms/step (fastest "
              f"{r['fastest_ms']:.1f}), {r['gflops']:.1f} GFLOP/s")  # fmt: skip
        for op in r.get("top_ops", []):
            print(f"        {op['share']:5.1%}  {op['self_ms']:7.2f} ms  {op['op']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
