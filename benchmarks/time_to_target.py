"""Time to 99.0% and 99.2% validation accuracy: the trainer's default recipe against the blog's loop,
both validated the same way, medians over seeds.

Contenders:
  trainer  `Trainer(TrainConfig(...)).fit()` in this process: the default recipe (5,000 of the 60,000
           training images held out, stratified by class and seeded by the seed; 55,000 trained on),
           with `stop_at` at the highest target, so the run ends once it is met. Its times are its own
           metrics records.
  blog     the blog's loop (blog_baseline.BlogRun, its training as the post writes it) on the same
           55,000 training images, validated after every epoch on the same 5,000 held-out images (the
           indices trainer.data.hold_out gives for that seed), each once, in order, the last partial
           batch included: exact counts, as the trainer's. It stops once the highest target is met too.

What is timed, for both: the training epochs (training seconds; the trainer's first step and first
evaluation batch, its `warmup_s`, are counted with training, as trainer.selection.time_to_target
does) and the validation after each epoch (evaluation seconds), up to the first evaluation that
meets a target; also the optimizer steps and training samples up to it. Neither contender's set-up,
data loading or, for the trainer, its checkpoint writes and the test split's one score at the end
are in it (they are in each run's `wall_s`). The lower targets come from the same run's records: the
prefix up to the first record that meets each, through trainer.selection.time_to_target.

Each seed runs both contenders, fresh, in an order that rotates from seed to seed. A seed that does
not reach a target within --epochs counts as infinitely slow in the median: a median that falls on
one is "not reached".

Run: OMP_NUM_THREADS=1 python benchmarks/time_to_target.py --data-dir ../shared/data --json result.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blog_baseline
import compare
import torch
from rich.console import Console
from rich.table import Table

from trainer import Stopped, TrainConfig, Trainer
from trainer.config import DEFAULT_VAL_SPLIT
from trainer.data import Split, held_out_count, hold_out, load_split
from trainer.selection import target_met, time_to_target

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1
CONTENDERS = ("trainer", "blog")
DEFAULT_SEEDS = (12, 13, 14)
DEFAULT_TARGETS = (0.99, 0.992)
# What a target's row holds when it is reached (the median is taken of each on its own).
QUANTITIES = ("epoch", "train_s", "eval_s", "total_s", "steps", "samples")
DESCRIPTIONS = {
    "trainer": "Trainer(TrainConfig(...)).fit() in this process, the default recipe (5,000 training images held "
    "out, stratified and seeded by the seed), stop_at the highest target; times from its metrics records",
    "blog": "the blog's loop (benchmarks/blog_baseline.py, BlogRun) on the trainer's 55,000 training images, "
    "validated after each epoch on its 5,000 held-out images, all of them in order (exact counts); stops at the "
    "highest target; timed around train_epoch and evaluate",
}
# CPU flags worth naming beside a CPU timing (lscpu's Flags line, filtered).
FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


@dataclass(frozen=True)
class Settings:
    data_dir: str
    device: str
    epochs: int
    seeds: tuple[int, ...]
    targets: tuple[float, ...]  # ascending; the last one stops the runs
    threads: int | None  # None: each contender picks its own, as it does for a user
    val_split: float | None  # None: the trainer's default (5,000 for MNIST)


def target_key(target: float) -> str:
    return repr(float(target))  # "0.99", "0.992": the JSON's keys


# ---------------------------------------------------------------------- the held-out split
def held_out_indices(s: Settings, seed: int) -> tuple[Split, torch.Tensor, torch.Tensor]:
    """The training split and the positions in it that trainer.data.hold_out trains on and holds
    out for `seed` (hold_out itself, applied to the positions: the same classes, the same generator)."""
    split = load_split("mnist", s.data_dir, train=True, download=False)
    count = held_out_count(DEFAULT_VAL_SPLIT if s.val_split is None else s.val_split, len(split))
    train, valid = hold_out(Split(torch.arange(len(split)), split.labels), count, seed)
    return split, train.images, valid.images


def indices_digest(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()


def held_out_entry(valid_idx: torch.Tensor, checked: str) -> dict[str, Any]:
    return {"count": len(valid_idx), "sha256": indices_digest(valid_idx), "first": valid_idx[:5].tolist(),
            "checked": checked}  # fmt: skip


# ---------------------------------------------------------------------- targets from records
def reached_targets(records: list[dict[str, Any]], targets: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    """Per target: what reaching it took, from the records up to the first that meets it
    (trainer.selection.time_to_target of that prefix), or that it was not reached."""
    out: dict[str, dict[str, Any]] = {}
    epochs_run = sum(not r.get("inside_epoch") for r in records)
    for target in targets:
        first = next((i for i, r in enumerate(records) if target_met(r, ("valid_acc", ">=", target))), None)
        if first is None:
            out[target_key(target)] = {"reached": False, "epochs_run": epochs_run}
            continue
        took, record = time_to_target(records[: first + 1]), records[first]
        out[target_key(target)] = {
            "reached": True, "epoch": record["epoch"], "train_s": took["target_train_s"],
            "eval_s": took["target_eval_s"], "total_s": took["target_train_s"] + took["target_eval_s"],
            "steps": took["target_steps"], "samples": took["target_samples"], "valid_acc": record["valid_acc"],
            "valid_correct": record["valid_correct"], "valid_seen": record["valid_seen"],
        }  # fmt: skip
    return out


# ---------------------------------------------------------------------- contenders
def run_trainer(s: Settings, seed: int, out_dir: str, result: dict[str, Any]) -> None:
    config = TrainConfig(data_dir=s.data_dir, output_dir=out_dir, epochs=s.epochs, seed=seed, cpu=s.device == "cpu",
                         threads=s.threads, progress="plain", val_split=s.val_split,
                         stop_at=f"valid_acc>={target_key(s.targets[-1])}")  # fmt: skip
    t = Trainer(config)
    split, train_idx, valid_idx = held_out_indices(s, seed)
    # The trainer's own split is the one the blog's loop is given: the same images, in the same order.
    if not (torch.equal(t.data.valid.images, split.images[valid_idx])
            and torch.equal(t.data.train.images, split.images[train_idx])):  # fmt: skip
        raise RuntimeError(f"seed {seed}: the trainer's held-out images are not those of trainer.data.hold_out")
    result["held_out"] = held_out_entry(valid_idx, "the trainer's train and valid images == the training split's "
                                        "images at these positions")  # fmt: skip
    result["train_images"] = len(t.data.train)
    result["threads"] = torch.get_num_threads()
    result["stop_at"] = config.stop_at
    result["epochs"] = t.fit()


def run_blog(s: Settings, seed: int, out_dir: str, result: dict[str, Any]) -> None:
    """BlogRun on the held-out split, timed like the trainer's records (training and validation
    seconds apart, synchronised on CUDA); its records take the trainer's keys."""
    split, train_idx, valid_idx = held_out_indices(s, seed)
    device, top = torch.device(s.device), ("valid_acc", ">=", s.targets[-1])
    run = blog_baseline.BlogRun(s.data_dir, s.epochs, device, seed=seed, train_indices=train_idx.tolist(),
                                valid_indices=valid_idx.tolist())  # fmt: skip
    mnist = run.dl_train.dataset.dataset  # torchvision's MNIST under the Subset
    if not (torch.equal(mnist.data, split.images) and run.dl_valid.dataset.indices == valid_idx.tolist()):
        raise RuntimeError(f"seed {seed}: the blog's validation images are not the trainer's held-out images")
    result["held_out"] = held_out_entry(valid_idx, "torchvision's training images == trainer.data's; the "
                                        "validation Subset's indices == these positions")  # fmt: skip
    result["train_images"] = len(run.dl_train.dataset)
    result["threads"] = torch.get_num_threads()
    result["stop_at"] = "".join(map(str, top))
    for epoch in range(1, s.epochs + 1):
        t0 = time.perf_counter()
        train = run.train_epoch()
        compare.sync(s.device)
        t1 = time.perf_counter()
        valid = run.evaluate()
        compare.sync(s.device)
        t2 = time.perf_counter()
        record = {
            "epoch": epoch, "step": len(run.losses), "train_loss": train["loss"], "train_acc": train["acc"],
            "train_samples": train["samples"], "valid_acc": valid["acc"], "valid_correct": valid["correct"],
            "valid_seen": valid["seen"], "epoch_time_s": t1 - t0, "eval_time_s": t2 - t1, "warmup_s": 0.0,
        }  # fmt: skip
        result["epochs"].append(record)
        if target_met(record, top):
            record["stopped"] = f"target {result['stop_at']} met"
            break


RUNNERS = {"trainer": run_trainer, "blog": run_blog}


def run_contender(name: str, s: Settings, seed: int, result: dict[str, Any], default_threads: int) -> None:
    """One fresh run of `name` for `seed` into `result`; `wall_s` is all of it (set-up, data, and
    for the trainer its checkpoints and the test score), `other_s` what is outside its epochs."""
    result.update(complete=False, wall_s=None, other_s=None, threads=s.threads, epochs=[])
    torch.set_num_threads(s.threads or default_threads)  # an in-process Trainer sets it for the next run too
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark  # the blog's set_seed changes them
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="time-to-target-") as out_dir:
            RUNNERS[name](s, seed, out_dir, result)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    result["wall_s"] = wall = time.perf_counter() - started
    result["other_s"] = wall - sum(e["epoch_time_s"] + e["eval_time_s"] + e["warmup_s"] for e in result["epochs"])
    result["stopped"] = result["epochs"][-1].get("stopped") if result["epochs"] else None
    result["targets"] = reached_targets(result["epochs"], s.targets)
    result["complete"] = True


# ---------------------------------------------------------------------- summary and output
def _median(values: list[float]) -> float | None:
    """The median, a not-reached seed counting as infinitely slow; None when it lands on one."""
    if not values:
        return None
    median = statistics.median(values)
    return None if math.isinf(median) else median


def summarise(runs: dict[str, list[dict[str, Any]]], targets: list[float]) -> dict[str, Any]:
    """Per contender and target, medians over the seeds it completed; and per target the ratio
    trainer / blog of the median total seconds (None where either median is not reached)."""
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        done = [r for r in results if r.get("complete")]
        summary[name] = {}
        for target in targets:
            rows = [r["targets"][target_key(target)] for r in done]
            medians = {q: _median([row[q] if row["reached"] else math.inf for row in rows]) for q in QUANTITIES}
            summary[name][target_key(target)] = {
                "seeds": [r["seed"] for r in done],
                "reached": [r["seed"] for r, row in zip(done, rows) if row["reached"]],
                "median_reached": medians["total_s"] is not None,
                "median": medians,
            }
    ratios = {}
    for target in targets:
        key = target_key(target)
        totals = [summary.get(name, {}).get(key, {}).get("median", {}).get("total_s") for name in CONTENDERS]
        ratios[key] = totals[0] / totals[1] if None not in totals and totals[1] > 0 else None
    summary["ratio_trainer_over_blog"] = ratios
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(target: float) -> str:
    return f"{100 * target:g}%"


def print_report(console: Console, report: dict[str, Any]) -> None:
    """The per-seed table, the medians and the ratios of a report (fresh, or read back from its JSON)."""
    s = report["settings"]
    targets = s["targets"]
    summary = summarise(report["runs"], targets)
    title = (f"Time to valid acc on {s['device']}: the trainer's default recipe against the blog's loop, both "
             f"validated on the same {s['held_out']} held-out images, up to {s['epochs']} epochs")  # fmt: skip
    if not report.get("complete", True):
        title += " (interrupted: partial)"
    table = Table(title=title, title_justify="left")
    headers = ["seed", "contender", "target", "epoch", "train s", "eval s", "total s", "steps", "samples",
               "valid acc (correct/seen)", "run wall s"]  # fmt: skip
    for h in headers:
        table.add_column(h, justify="left" if h in ("contender", "target") else "right")
    for seed in s["seeds"]:
        for name in CONTENDERS:
            for r in [r for r in report["runs"].get(name, []) if r["seed"] == seed and r.get("complete")]:
                for target in targets:
                    row = r["targets"][target_key(target)]
                    cells = [str(seed), name, _pct(target)]
                    if row["reached"]:
                        acc = f"{row['valid_acc']:.4f} ({row['valid_correct']}/{row['valid_seen']})"
                        cells += [str(row["epoch"]), f"{row['train_s']:.1f}", f"{row['eval_s']:.1f}",
                                  f"{row['total_s']:.1f}", str(row["steps"]), f"{row['samples']:,}", acc]  # fmt: skip
                    else:
                        cells += [f"not reached in {row['epochs_run']}", *["-"] * 6]
                    table.add_row(*cells, f"{r['wall_s']:.0f}" if target == targets[0] else "")
        table.add_section()
    console.print(table)
    medians = Table(title="Medians over seeds (a seed that did not reach a target counts as infinitely slow)",
                    title_justify="left")  # fmt: skip
    for h in ["contender", "target", "reached by", "epoch", "train s", "eval s", "total s", "steps", "samples"]:
        medians.add_column(h, justify="left" if h in ("contender", "target") else "right")
    for name in CONTENDERS:
        for target in targets:
            if (row := summary.get(name, {}).get(target_key(target))) is None:
                continue
            m = row["median"]
            reached = f"{len(row['reached'])} of {len(row['seeds'])} seeds"
            if not row["median_reached"]:
                medians.add_row(name, _pct(target), reached, "not reached", *["-"] * 5)
                continue
            medians.add_row(name, _pct(target), reached, f"{m['epoch']:g}", f"{m['train_s']:.1f}", f"{m['eval_s']:.1f}",
                            f"{m['total_s']:.1f}", f"{m['steps']:g}", f"{m['samples']:,.0f}")  # fmt: skip
        medians.add_section()
    console.print(medians)
    for target in targets:
        key = target_key(target)
        ratio = summary["ratio_trainer_over_blog"][key]
        if ratio is not None:
            console.print(f"time to {_pct(target)}, trainer / blog of the median total seconds: [bold]{ratio:.3f}[/] "
                          f"({1 / ratio:.2f}x as fast)", highlight=False)  # fmt: skip
        else:
            missing = [n for n in CONTENDERS if not summary.get(n, {}).get(key, {}).get("median_reached")]
            console.print(f"time to {_pct(target)}, trainer / blog: no ratio, the median of {' and '.join(missing)} "
                          "is not reached", highlight=False)  # fmt: skip
    console.print(
        "total s = train s + eval s up to the first evaluation that meets the target: the training epochs (the "
        "trainer's first step and first evaluation batch, its warm-up, counted with training) and the validation "
        "after each; set-up, data loading, checkpoints and the test score are outside it (in run wall s).",
        highlight=False,
    )


def lscpu() -> dict[str, Any]:
    """lscpu's lines (not its vulnerabilities), its Flags line kept to the vector extensions."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "Flags":
            info["Flags (vector)"] = [f for f in value.split() if f.startswith(FLAG_PREFIXES)]
        elif key and not key.startswith("Vulnerability"):
            info[key] = value
    return info


def git_state() -> dict[str, Any]:
    """The checkout's commit and its modified tracked files (read only: no index refresh is written)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=30, check=True)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout

    status = git("status", "--porcelain", "--untracked-files=no")
    commit = git("rev-parse", "HEAD")
    return {"git_commit": None if commit is None else commit.strip(),
            "git_modified": None if status is None else [line[3:] for line in status.splitlines()]}  # fmt: skip


def machine_info(device: str) -> dict[str, Any]:
    return {**compare.machine_info(device), **git_state(), "lscpu": lscpu(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads_at_start": torch.get_num_threads()}  # fmt: skip


# ---------------------------------------------------------------------- main
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time to validation accuracy targets: the trainer's default recipe against the blog's loop, "
        "validated the same way (the trainer's held-out images), medians over seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with MNIST/raw/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=10, help="at most this many epochs (the schedule's length)")
    parser.add_argument("--seeds", type=_ints, default=DEFAULT_SEEDS, help="comma-separated seeds")
    parser.add_argument("--targets", type=_floats, default=DEFAULT_TARGETS, help="valid acc targets, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (None: each its own)")
    parser.add_argument(
        "--val-split", type=float, default=None, help="held-out images (None: the trainer's default, 5000)"
    )
    parser.add_argument("--json", type=Path, default=None, help="result file (None: benchmarks/results/<time>.json)")
    parser.add_argument("--show", type=Path, default=None, metavar="JSON", help="print a saved result's tables, exit")
    args = parser.parse_args(argv)
    if args.show is not None:
        return args
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.epochs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--epochs and --threads must be at least 1")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: one or more different seeds, e.g. 12,13,14")
    if not args.targets or not all(0 < t <= 1 for t in args.targets):
        parser.error("--targets: accuracies in (0, 1], e.g. 0.99,0.992")
    args.targets = tuple(sorted(set(args.targets)))
    if args.val_split is not None and args.val_split <= 0:
        parser.error("--val-split must hold images out (the comparison is on held-out images)")
    if not (Path(args.data_dir) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        parser.error(f"no MNIST in {args.data_dir}: expected {args.data_dir}/MNIST/raw/*-ubyte (the four IDX files)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if args.show is not None:
        if (saved := json.loads(args.show.read_text())).get("schema_version") != SCHEMA_VERSION:
            console.print(f"{args.show}: written by another version of time_to_target.py (schema {SCHEMA_VERSION})")
            return 2
        print_report(console, saved)
        return 0

    def on_term(signum: int, frame: Any) -> None:
        raise compare.Interrupted(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_term)
    os.environ.setdefault("TRAINER_OFFLINE", "1")  # never try a download in the middle of a timing
    s = Settings(args.data_dir, args.device, args.epochs, args.seeds, args.targets, args.threads, args.val_split)
    json_path = args.json or RESULTS_DIR / f"time-to-target-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    split = load_split("mnist", s.data_dir, train=True, download=False)
    held_out = held_out_count(DEFAULT_VAL_SPLIT if s.val_split is None else s.val_split, len(split))
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "complete": False,
        "machine": machine_info(args.device),
        "settings": {**asdict(s), "held_out": held_out, "train_images": len(split) - held_out},
        "contenders": DESCRIPTIONS,
        "runs": {name: [] for name in CONTENDERS},
    }

    def save() -> None:
        report["summary"] = summarise(report["runs"], list(s.targets))
        report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")

    m = report["machine"]
    console.print(
        f"{m['cpu_model']} ({m['cpus_usable']} CPUs, {m['cpu_capability']}){', ' + m['gpu'] if 'gpu' in m else ''}; "
        f"torch {m['torch']}, accelerate {m['accelerate']}; seeds {', '.join(map(str, s.seeds))}; targets "
        f"{', '.join(map(_pct, s.targets))}; up to {s.epochs} epochs; {held_out} held-out images"
    )
    default_threads, status = torch.get_num_threads(), 0
    try:
        # Lazy initialisation and kernel selection, paid once before anything is timed (as compare.py).
        blog_baseline.BlogRun(s.data_dir, 1, torch.device(s.device)).train_epoch(max_steps=3)
        for i, seed in enumerate(s.seeds):
            k = i % len(CONTENDERS)
            order = CONTENDERS[k:] + CONTENDERS[:k]
            console.print(f"seed {seed} ({i + 1}/{len(s.seeds)}): {', '.join(order)}")
            for name in order:
                report["runs"][name].append(result := {"seed": seed, "position": order.index(name)})
                try:
                    run_contender(name, s, seed, result, default_threads)
                finally:
                    save()
                reached = "; ".join(
                    f"{_pct(t)}: epoch {row['epoch']}, {row['total_s']:.1f} s" if row["reached"] else
                    f"{_pct(t)}: not reached in {row['epochs_run']} epochs"
                    for t, row in zip(s.targets, result["targets"].values())
                )  # fmt: skip
                console.print(f"  {name}: {reached} (run {result['wall_s']:.0f} s)")
        report["complete"] = True
    except (KeyboardInterrupt, compare.Interrupted, Stopped) as exc:
        console.print(f"[bold red]interrupted ({exc or 'Ctrl-C'}): the results below are partial[/]")
        status = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        save()
    print_report(console, report)
    console.print(f"results: {json_path}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
