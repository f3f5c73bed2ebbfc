"""The blog's loop against our trainer, in-process and launched as the README says: seconds per epoch.

Contenders (--contenders, a subset):
  baseline  the blog's loop as the post writes it (blog_baseline.py): PIL images through ToTensor
            in a DataLoader, fp32, the default memory format, a host sync every batch.
  trainer   `Trainer(TrainConfig(...)).fit()` in this process; its times are its own metrics records.
  launched  the README's first command as a user runs it, in a subprocess:
            `accelerate launch --config_file launch_configs/auto.yaml -m trainer --epochs N ...`;
            its times are the metrics.jsonl of its run folder.

--mixed-precision, --compile and --channels-last/--no-channels-last apply to the two trainer
contenders, so one invocation measures one configuration against the blog's loop; without either
memory-format flag both follow the device's rule (runtime.device_defaults), as a user's run does.
What each contender ran as (precision, compile, memory format and why) is in its results. Each round runs
every contender once, fresh and seeded, in an order that rotates from round to round; a ratio to
the baseline is taken within each round, then the median over rounds.

Run: python benchmarks/compare.py --data-dir ../shared/data --epochs 1 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import blog_baseline
import torch
from rich.console import Console
from rich.table import Table

import trainer
from trainer import TrainConfig, Trainer
from trainer.runlog import METRICS_NAME

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
LAUNCH_CONFIG = "launch_configs/auto.yaml"  # the one the README's first command names (run from REPO)
SCHEMA_VERSION = 2
CONTENDERS = ("baseline", "trainer", "launched")
DESCRIPTIONS = {
    "baseline": "the blog's loop (benchmarks/blog_baseline.py): torchvision MNIST through ToTensor/Normalize in "
    "a DataLoader, fp32, contiguous, a host sync every batch",
    "trainer": "Trainer(TrainConfig(...)).fit() in the benchmark's process; times from its metrics records",
    "launched": "accelerate launch --config_file launch_configs/auto.yaml -m trainer ... in a subprocess; "
    "times from its run folder's metrics.jsonl",
}


@dataclass(frozen=True)
class Settings:
    data_dir: str
    device: str
    epochs: int
    mixed_precision: str
    compile: bool
    channels_last: bool | None  # None: the device's rule (runtime.device_defaults), as for a user
    threads: int | None  # None: each contender picks its own, as it does for a user


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`), or the trainer stopped early: report what is done."""


# ---------------------------------------------------------------------- contenders
def with_epoch_s(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trainer's metrics records, kept whole, with `epoch_s` = training + evaluation seconds. Its
    first step and first evaluation batch (where torch.compile compiles) are `warmup_s`, outside both."""
    return [{**r, "epoch_s": r["epoch_time_s"] + r["eval_time_s"]} for r in records]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_baseline(s: Settings, out_dir: str, result: dict[str, Any]) -> None:
    """The blog's loop, timed around its epochs; its records take the keys of the trainer's."""
    run = blog_baseline.BlogRun(s.data_dir, s.epochs, torch.device(s.device))
    for epoch in range(1, s.epochs + 1):
        t0 = time.perf_counter()
        train = run.train_epoch()
        sync(s.device)
        t1 = time.perf_counter()
        valid = run.evaluate()
        sync(s.device)
        result["epochs"] += with_epoch_s([{
            "epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], "train_samples": train["samples"],
            "valid_acc": valid["acc"], "valid_correct": valid["correct"], "valid_seen": valid["seen"],
            "epoch_time_s": t1 - t0, "eval_time_s": time.perf_counter() - t1, "warmup_s": 0.0,
            "train_samples_per_s": train["samples"] / (t1 - t0), "mixed_precision": "no",
        }])  # fmt: skip
    result.update(precision="no", compile="no", memory_format="contiguous", memory_format_why="the blog's loop")


def run_trainer(s: Settings, out_dir: str, result: dict[str, Any]) -> None:
    # --val-split 0, as the blog's loop: it trains on all 60,000 images and evaluates on the test split.
    t = Trainer(TrainConfig(data_dir=s.data_dir, output_dir=out_dir, epochs=s.epochs, cpu=s.device == "cpu",
                            mixed_precision=s.mixed_precision, compile=s.compile, channels_last=s.channels_last,
                            threads=s.threads, progress="plain", val_split=0))  # fmt: skip
    result["threads"] = torch.get_num_threads()
    # What it runs as, in the terms of its start-up summary (read from the launched run's output).
    result.update(precision=t.accelerator.mixed_precision, compile=t._compile_text(),
                  memory_format="channels_last" if t.channels_last else "contiguous",
                  memory_format_why=t._memory_format_why)  # fmt: skip
    result["epochs"] = with_epoch_s(t.fit())


def launch_command(s: Settings, out_dir: str) -> list[str]:
    """The README's first command (`accelerate launch` of this Python) with the benchmark's flags."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", LAUNCH_CONFIG, "-m", "trainer",
           "--epochs", str(s.epochs), "--data-dir", s.data_dir, "--output-dir", out_dir,
           "--val-split", "0"]  # fmt: skip
    # Only the flags that differ from the defaults (auto.yaml's precision is "no"; the memory format
    # follows the device's rule unless a flag says otherwise).
    cmd += [] if s.mixed_precision == "no" else ["--mixed-precision", s.mixed_precision]
    cmd += ["--compile"] if s.compile else []
    cmd += [] if s.channels_last is None else ["--channels-last" if s.channels_last else "--no-channels-last"]
    cmd += [] if s.threads is None else ["--threads", str(s.threads)]
    return cmd + (["--cpu"] if s.device == "cpu" and torch.cuda.is_available() else [])


def start_summary(stdout: str) -> dict[str, str]:
    """The trainer's start-up summary (`run: ... | precision: no | ...`, one line without a terminal)."""
    line = next((line for line in stdout.splitlines() if line.startswith("run: ")), "")
    return dict(item.split(": ", 1) for item in line.split(" | ") if ": " in item)


def run_launched(s: Settings, out_dir: str, result: dict[str, Any]) -> None:
    result["command"] = cmd = launch_command(s, out_dir)
    # As a user's shell would have it: no OMP_NUM_THREADS or ACCELERATE_* of ours.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), TRAINER_OFFLINE="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"accelerate launch exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    started = start_summary(done.stdout)
    threads = re.match(r"\d+", started.get("threads", ""))
    result["threads"] = int(threads.group()) if threads else None
    memory_format = re.fullmatch(r"(\S+) \((.*)\)", started.get("memory format", ""))
    result.update(precision=started.get("precision"), compile=started.get("compile"),
                  memory_format=memory_format and memory_format.group(1),
                  memory_format_why=memory_format and memory_format.group(2))  # fmt: skip
    metrics = Path(out_dir) / TrainConfig().name / METRICS_NAME
    result["epochs"] = with_epoch_s([json.loads(line) for line in metrics.read_text().splitlines()])


RUNNERS = {"baseline": run_baseline, "trainer": run_trainer, "launched": run_launched}


def run_contender(name: str, s: Settings, result: dict[str, Any], default_threads: int) -> None:
    """One fresh run of `s.epochs` epochs into `result`, in a temporary output folder.

    `other_s` is the run's wall time outside its epochs and warm-up: process start, imports, data,
    set-up, checkpoint and log writes."""
    result.update(complete=False, wall_s=None, other_s=None, peak_cuda_mib=None, threads=s.threads, epochs=[])
    torch.set_num_threads(s.threads or default_threads)  # an in-process Trainer sets it for the next run too
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark  # the blog's set_seed changes them
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as out_dir:
            RUNNERS[name](s, out_dir, result)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    result["wall_s"] = wall = time.perf_counter() - started
    result["other_s"] = wall - sum(e["epoch_s"] + e["warmup_s"] for e in result["epochs"])
    if name == "baseline":
        result["threads"] = torch.get_num_threads()
    if s.device == "cuda" and name != "launched":  # another process's memory is not this one's
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if len(result["epochs"]) < s.epochs:  # the trainer caught the signal, saved and returned
        raise Interrupted(f"{name} stopped after {len(result['epochs'])} of {s.epochs} epochs")
    result["complete"] = True


# ---------------------------------------------------------------------- summary and output
def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per contender, medians over all its epochs (other_s and warm-up: over rounds), and its
    seconds per epoch over the baseline's in the same round: each round's ratio and their median."""
    done = {name: [r for r in rounds if r.get("epochs")] for name, rounds in runs.items()}
    base = {r["round"]: statistics.fmean(e["epoch_s"] for e in r["epochs"]) for r in done.get("baseline", [])}
    summary: dict[str, Any] = {}
    for name, rounds in done.items():
        if not rounds:
            continue
        epochs = [e for r in rounds for e in r["epochs"]]
        last = rounds[-1]["epochs"][-1]
        per_round = [statistics.fmean(e["epoch_s"] for e in r["epochs"]) / base[r["round"]]
                     for r in rounds if base.get(r["round"])]  # fmt: skip
        summary[name] = {
            "rounds": len(rounds),
            "epoch_s": _median([e["epoch_s"] for e in epochs]),
            "train_s": _median([e["epoch_time_s"] for e in epochs]),
            "eval_s": _median([e["eval_time_s"] for e in epochs]),
            "train_samples_per_s": _median([e["train_samples_per_s"] for e in epochs]),
            "warmup_s": _median([sum(e["warmup_s"] for e in r["epochs"]) for r in rounds]),
            "other_s": _median([r.get("other_s") for r in rounds]),
            "peak_cuda_mib": _median([r.get("peak_cuda_mib") for r in rounds]),
            "x_baseline": {"median": statistics.median(per_round), "per_round": per_round} if per_round else None,
            "final_train_acc": last["train_acc"],
            "final_valid_acc": last["valid_acc"],
            "final_valid_correct": last["valid_correct"],
            "final_valid_seen": last["valid_seen"],
            # What it ran as, in its last round (reports of schema 2 before these keys: None).
            **{key: rounds[-1].get(key) for key in ("precision", "compile", "memory_format", "memory_format_why")},
        }
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(console: Console, report: dict[str, Any]) -> None:
    """The table and the ratios of a report (fresh, or read back from its JSON)."""
    s, summary = report["settings"], summarise(report["runs"])
    done = max((row["rounds"] for row in summary.values()), default=0)
    memory_flag = {None: "by the device's rule", True: "--channels-last", False: "--no-channels-last"}
    flags = (f"precision {s['mixed_precision']}, compile {'yes' if s['compile'] else 'no'}, "
             f"memory format {memory_flag[s['channels_last']]}")  # fmt: skip
    title = f"MNIST on {s['device']}, {s['epochs']} epoch(s) per round, medians of {done} round(s); trainer: {flags}"
    if not report.get("complete", True):
        title += " (interrupted: partial)"
    cuda = s["device"] == "cuda"
    table = Table(title=title, title_justify="left")
    headers = ["contender", "s/epoch", "train s", "eval s", "train samples/s", "warm-up s", "other s", "x baseline"]
    headers += (["peak CUDA MiB"] if cuda else []) + ["threads", "train acc", "valid acc", "valid correct/seen"]
    for h in headers:
        table.add_column(h, justify="left" if h == "contender" else "right")
    for name in CONTENDERS:
        if (row := summary.get(name)) is None:
            continue
        threads = {r.get("threads") for r in report["runs"][name]} - {None}
        cells = [name, _fmt(row["epoch_s"], ".2f"), _fmt(row["train_s"], ".2f"), _fmt(row["eval_s"], ".2f"),
                 _fmt(row["train_samples_per_s"], ",.0f"), _fmt(row["warmup_s"], ".1f"), _fmt(row["other_s"], ".1f"),
                 _fmt((row["x_baseline"] or {}).get("median"), ".3f")]  # fmt: skip
        cells += [_fmt(row["peak_cuda_mib"], ".0f")] if cuda else []
        seen = f"{row['final_valid_correct']}/{row['final_valid_seen']}"
        cells += [",".join(map(str, sorted(threads))) or "-", _fmt(row["final_train_acc"], ".4f"),
                  _fmt(row["final_valid_acc"], ".4f"), seen]  # fmt: skip
        table.add_row(*cells)
    console.print(table)
    console.print(
        "s/epoch = train s + eval s; warm-up (first step and first evaluation batch: compilation) and other s "
        "(start, imports, data, set-up, checkpoints) apart.",
        highlight=False,
    )
    for name in CONTENDERS:
        if (row := summary.get(name)) is not None and row["memory_format"] is not None:
            ran = f"precision {row['precision']}, compile {row['compile']}"
            console.print(f"{name} ran: {ran}, memory format {row['memory_format']} ({row['memory_format_why']})",
                          highlight=False)  # fmt: skip
    for name in CONTENDERS[1:]:
        if (ratio := (summary.get(name) or {}).get("x_baseline")) is not None:
            rounds = ", ".join(f"{v:.3f}" for v in ratio["per_round"])
            console.print(
                f"{name} / baseline, seconds per epoch: [bold]{ratio['median']:.3f}[/] "
                f"({1 / ratio['median']:.2f}x as fast; per round: {rounds})",
                highlight=False,
            )


def machine_info(device: str) -> dict[str, Any]:
    import accelerate
    import torchvision

    cpu: dict[str, str] = {}
    try:  # the first processor's block of /proc/cpuinfo (Linux)
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            cpu[key.strip()] = value.strip()
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu.get("model name") or platform.processor() or None,
        "cpu_vendor": cpu.get("vendor_id"),
        "cpu_family": cpu.get("cpu family"),
        "cpu_model_number": cpu.get("model"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "trainer": trainer.__version__,
        "device": device,
    }
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Seconds per epoch of the blog's loop, the trainer in-process and the README's launched command.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with MNIST/raw/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="trainer contenders")
    parser.add_argument("--compile", action="store_true", help="trainer contenders: torch.compile")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trainer contenders (None: the device's rule, runtime.device_defaults, as for a user)",
    )
    parser.add_argument("--epochs", type=int, default=1, help="epochs per round (each round is a fresh run)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the contenders' order rotates each round")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every contender (None: each picks its own, as for a user)",
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset to run")
    parser.add_argument("--json", type=Path, default=None, help="result file (None: benchmarks/results/<time>.json)")
    parser.add_argument("--show", type=Path, default=None, metavar="JSON", help="print a saved result's table and exit")
    args = parser.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if args.show is not None:
        return args
    if unknown := set(args.contenders) - set(CONTENDERS):
        parser.error(f"unknown contender(s) {', '.join(sorted(unknown))}; choose from {', '.join(CONTENDERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.device == "cpu" and args.mixed_precision == "fp16":
        parser.error("fp16 mixed precision needs a GPU; on the CPU use --mixed-precision bf16 or no")
    if args.epochs < 1 or args.rounds < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--epochs, --rounds and --threads must be at least 1")
    if not (Path(args.data_dir) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        parser.error(f"no MNIST in {args.data_dir}: expected {args.data_dir}/MNIST/raw/*-ubyte (the four IDX files)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Not a terminal (a log file, CI): wide enough for the table instead of rich's 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if args.show is not None:
        if (saved := json.loads(args.show.read_text())).get("schema_version") != SCHEMA_VERSION:
            console.print(f"{args.show}: written by another version of compare.py (schema {SCHEMA_VERSION} here)")
            return 2
        print_report(console, saved)
        return 0

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_term)
    os.environ.setdefault("TRAINER_OFFLINE", "1")  # never try a download in the middle of a timing
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    json_path = args.json or RESULTS_DIR / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "complete": False,
        "machine": machine_info(args.device),
        "settings": {**asdict(s), "rounds": args.rounds, "contenders": args.contenders},
        "contenders": {name: DESCRIPTIONS[name] for name in args.contenders},
        "runs": {name: [] for name in args.contenders},
    }

    def save() -> None:
        report["summary"] = summarise(report["runs"])
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")

    m = report["machine"]
    console.print(
        f"{m['cpu_model']} ({m['cpus_usable']} CPUs, {m['cpu_capability']}){', ' + m['gpu'] if 'gpu' in m else ''}; "
        f"torch {m['torch']}, accelerate {m['accelerate']}; {args.epochs} epoch(s) x {args.rounds} round(s)"
    )
    default_threads, status = torch.get_num_threads(), 0
    try:
        # Lazy initialisation and kernel selection, paid once before anything is timed (the
        # trainer also reports its own first step apart, as warm-up).
        blog_baseline.BlogRun(s.data_dir, 1, torch.device(s.device)).train_epoch(max_steps=3)
        for r in range(args.rounds):
            k = r % len(args.contenders)
            order = args.contenders[k:] + args.contenders[:k]
            console.print(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
            for name in order:
                report["runs"][name].append(result := {"round": r + 1, "position": order.index(name)})
                try:
                    run_contender(name, s, result, default_threads)
                finally:
                    save()
                e = result["epochs"][-1]
                console.print(f"  {name}: {e['epoch_s']:.2f} s/epoch, warm-up {e['warmup_s']:.1f} s, "
                              f"other {result['other_s']:.1f} s, valid acc {e['valid_acc']:.4f}")  # fmt: skip
        report["complete"] = True
    except (KeyboardInterrupt, Interrupted) as exc:
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
