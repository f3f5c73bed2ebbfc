"""The blog's loop, our Trainer, and a bare PyTorch loop on the Trainer's data path: speed, memory, accuracy.

All contenders run in this one process, on the same data, one after another, in an order that
rotates every round; each round is a fresh seeded run of `--epochs` epochs (training, then the
full evaluation). Timings are medians over rounds, ratios are medians of per-round pairs, so a
machine that slows down for a while moves both sides of a ratio.

Contenders:
  baseline  the blog's loop (blog_baseline.py): torchvision MNIST through ToTensor/Normalize in a
            DataLoader, fp32, contiguous, a `.cpu()`/`.item()` host sync every batch.
  trainer   trainer.Trainer through its public API (Accelerate underneath): `train_epoch()` and
            `evaluate()` per epoch, as `fit()` runs them, minus the log and checkpoint writes.
  bare      the Trainer's loop without Accelerate, in plain PyTorch on the library's own parts: the
            same config, data path (make_loader, EpochSampler, to_model_input), model, OneCycle
            schedule, per-step bookkeeping (state.Position), memory format, precision, and
            evaluate_model. trainer/bare is what the Accelerate layer costs.

Run: python benchmarks/compare.py --data-dir ../shared/data --epochs 1 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import functools
import gc
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import blog_baseline
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.overrides import TorchFunctionMode

import trainer
from trainer import state
from trainer.config import TrainConfig
from trainer.data import DATASET_INFO, load_split, make_loader, to_model_input
from trainer.engine import Trainer
from trainer.evaluation import EvalResult, evaluate_model
from trainer.model import build_model
from trainer.runlog import METRICS_NAME

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1
CONTENDERS = ("baseline", "trainer", "bare", "launched", "trainer_bf16", "trainer_compile", "trainer_compile_bf16")
DESCRIPTIONS = {
    "baseline": "the blog's loop: torchvision MNIST + ToTensor/Normalize DataLoader, fp32, per-batch host syncs",
    "trainer": "trainer.Trainer (Accelerate): train_epoch() + evaluate(), no log/checkpoint writes",
    "bare": "plain PyTorch on the Trainer's data path, precision and memory format, no Accelerate",
    "launched": "the README's command as a user runs it: `accelerate launch --config_file launch_configs/auto.yaml "
    "-m trainer` in a subprocess, "
    "default flags, with its checkpoints and logs; times from its metrics.jsonl",
    "trainer_bf16": "trainer with --mixed-precision bf16",
    "trainer_compile": "trainer with --compile (torch.compile, inductor)",
    "trainer_compile_bf16": "trainer with --compile --mixed-precision bf16",
}
# A compiled contender and its eager twin: the break-even is the compile warm-up over the epoch time saved.
COMPILED_TWINS = {"trainer_compile": "trainer", "trainer_compile_bf16": "trainer_bf16"}
# --mixed-precision -> the autocast dtype of the bare loop and the warm-up (accelerate's choice for the trainer).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Tensor methods that read a value back to the host: on a GPU, each one waits for the device.
HOST_READS = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"})
TORCH_DIR = str(Path(torch.__file__).parent) + os.sep
WARNINGS_FILE = warnings.__file__
# Code that trainer and bare both run: the census does not list it as where the trainer's extra calls come from.
SHARED_CODE = ("trainer/data.py", "trainer/model.py", "trainer/state.py", "trainer/evaluation.py", "benchmarks/")


@dataclass(frozen=True)
class Settings:
    data_dir: str
    device: str
    epochs: int
    mixed_precision: str
    channels_last: bool
    threads: int
    seed: int = blog_baseline.SEED
    batch_size: int = blog_baseline.BATCH_SIZE
    limit_train_batches: int | None = None  # trainer and bare only (the overhead and census runs)
    evaluate: bool = True


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`): stop and report what is done."""


# ---------------------------------------------------------------------- contenders
class BaselineRun:
    def __init__(self, s: Settings, out_dir: str) -> None:
        self.run = blog_baseline.BlogRun(s.data_dir, s.epochs, torch.device(s.device), seed=s.seed)

    def train_epoch(self, max_steps: int | None = None) -> dict[str, Any]:
        return self.run.train_epoch(max_steps)

    def evaluate(self) -> dict[str, Any]:
        return self.run.evaluate()

    def end_epoch(self) -> None:
        pass


def train_config(s: Settings, out_dir: str, precision: str | None = None, compile: bool = False) -> TrainConfig:
    """The trainer contenders' config; the bare loop takes its recipe from the same one."""
    return TrainConfig(
        data_dir=s.data_dir,
        output_dir=out_dir,
        epochs=s.epochs,
        batch_size=s.batch_size,
        seed=s.seed,
        limit_train_batches=s.limit_train_batches,
        cpu=s.device == "cpu",
        mixed_precision=precision or s.mixed_precision,
        channels_last=s.channels_last,
        compile=compile,
        threads=s.threads,
        progress="plain",
    )


def eval_record(v: EvalResult, warmup_s: float | None = None) -> dict[str, Any]:
    record = {"acc": v.accuracy, "correct": v.correct, "seen": v.seen, "loss": v.loss}
    return record if warmup_s is None else {**record, "warmup_s": warmup_s}


class TrainerRun:
    def __init__(self, s: Settings, out_dir: str, precision: str | None = None, compile: bool = False) -> None:
        from accelerate.state import AcceleratorState, GradientState

        # Each contender gets a fresh Accelerator; accelerate keeps its state in class-level singletons.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        self.trainer = Trainer(train_config(s, out_dir, precision, compile))
        self.warm = {"train": True, "eval": True}

    def train_epoch(self, max_steps: int | None = None) -> dict[str, Any]:
        r = self.trainer.train_epoch()
        warmup = self.trainer._warmup["train"] if self.warm.pop("train", False) else 0.0
        return {"loss": r["loss"], "acc": r["acc"], "samples": r["samples"], "warmup_s": warmup}

    def evaluate(self) -> dict[str, Any]:
        v = self.trainer.evaluate()
        return eval_record(v, v.first_batch_s if self.warm.pop("eval", False) else 0.0)

    def end_epoch(self) -> None:
        self.trainer.position.next_epoch()


def autocast_forward(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """What accelerate's prepare does to the model under mixed precision, in plain torch: the
    forward runs under autocast and returns fp32 logits."""
    forward = model.forward

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device.type, dtype=dtype):
            logits = forward(*args, **kwargs)
        return logits.float()

    model.forward = run


class BareRun:
    """The Trainer's loop line for line, with plain PyTorch where it calls Accelerate."""

    def __init__(self, s: Settings, out_dir: str) -> None:
        self.config = cfg = train_config(s, out_dir)
        self.device = dev = torch.device(s.device)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # as accelerate's set_seed: the same initial weights as the Trainer's
        torch.cuda.manual_seed_all(cfg.seed)
        train = load_split(cfg.dataset, cfg.data_dir, train=True)
        test = load_split(cfg.dataset, cfg.data_dir, train=False)
        loader = functools.partial(make_loader, seed=cfg.seed, device=dev, num_workers=cfg.num_workers)
        self.train_loader = loader(train, cfg.batch_size, train=True)
        self.eval_loader = loader(test, cfg.eval_batch_size, train=False)
        self.num_classes = len(DATASET_INFO[cfg.dataset][1])
        model = build_model(cfg.model, num_classes=self.num_classes)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(dev)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        # The Trainer's sizing for one process: --limit-train-batches stops the epoch, and the
        # schedule's units are its optimizer steps.
        n = len(train)
        self.stop = None if cfg.limit_train_batches is None else min(n, cfg.limit_train_batches * cfg.batch_size)
        self.train_loader.sampler.set_position(0, 0, self.stop)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = state.new_onecycle(self.optimizer, cfg, self.steps_per_epoch * cfg.epochs)
        amp_dtype = AMP_DTYPES.get(cfg.mixed_precision)
        if amp_dtype is not None:
            autocast_forward(self.model, dev, amp_dtype)
        self.scaler = torch.amp.GradScaler(dev.type) if amp_dtype is torch.float16 else None
        self.position = state.Position()

    def train_epoch(self, max_steps: int | None = None) -> dict[str, Any]:
        cfg, pos, opt = self.config, self.position, self.optimizer
        if pos.samples_in_epoch == 0:
            self.stats = state.EpochStats.empty(self.steps_per_epoch, self.device)
        stats = self.stats
        self.train_loader.sampler.set_position(pos.epoch, pos.samples_in_epoch, self.stop)
        self.model.train()
        for images, labels in self.train_loader:
            logits = self.model(to_model_input(images, cfg.channels_last))
            loss = F.cross_entropy(logits, labels)
            lr = opt.param_groups[0]["lr"]
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(opt)
                self.scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            self.scheduler.step()
            stats.add(loss, (logits.detach().argmax(dim=1) == labels).sum(), lr)
            pos.advance(cfg.batch_size)
        host = stats.mine()[0].to("cpu", torch.float64)  # the epoch's one sync, as in the Trainer
        samples = host.shape[0] * cfg.batch_size
        return {"loss": host[:, 0].mean().item(), "acc": host[:, 1].sum().item() / samples, "samples": samples}

    def evaluate(self) -> dict[str, Any]:
        v = evaluate_model(None, self.model, self.eval_loader, self.num_classes, self.config.channels_last)
        return eval_record(v)

    def end_epoch(self) -> None:
        self.position.next_epoch()


FACTORIES: dict[str, Callable[[Settings, str], Any]] = {
    "baseline": BaselineRun,
    "trainer": TrainerRun,
    "bare": BareRun,
    "trainer_bf16": functools.partial(TrainerRun, precision="bf16"),
    "trainer_compile": functools.partial(TrainerRun, compile=True),
    "trainer_compile_bf16": functools.partial(TrainerRun, precision="bf16", compile=True),
}


def run_launched(s: Settings, out_dir: str, result: dict[str, Any]) -> None:
    """`accelerate launch -m trainer` with default flags, in a subprocess; epochs from its metrics.jsonl.
    No OMP_NUM_THREADS: the trainer picks its threads as it does for a user."""
    config = str(REPO / "launch_configs" / "auto.yaml")  # the README's first command
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", "trainer",
           "--epochs", str(s.epochs), "--data-dir", s.data_dir, "--output-dir", out_dir,
           "--progress", "plain"]  # fmt: skip
    if s.limit_train_batches is not None:
        cmd += ["--limit-train-batches", str(s.limit_train_batches)]
    if s.device == "cpu" and torch.cuda.is_available():
        cmd.append("--cpu")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), TRAINER_OFFLINE="1")
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"accelerate launch exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    threads = re.search(r"threads: (\d+)", done.stdout)
    result["threads"] = int(threads.group(1)) if threads else None
    metrics = Path(out_dir) / TrainConfig().name / METRICS_NAME
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row in rows:
        eval_s = row["eval_time_s"]
        result["epochs"].append({
            "epoch": row["epoch"], "train_s": row["epoch_time_s"], "eval_s": eval_s,
            "epoch_s": row["epoch_time_s"] + eval_s, "train_cpu_s": None, "eval_cpu_s": None,
            "train_samples": row["train_samples"], "train_samples_per_s": row["train_samples_per_s"],
            "step_ms": 1000 * row["epoch_time_s"] / (row["train_samples"] // s.batch_size),
            "fastest_step_ms": None, "step_ms_p10": None, "warmup_s": row.get("warmup_s", 0.0),
            "train_loss": row["train_loss"], "train_acc": row["train_acc"], "valid_acc": row["valid_acc"],
            "valid_correct": row["valid_correct"], "valid_seen": row["valid_seen"],
        })  # fmt: skip
    # Process start, imports, data loading and set-up: everything that is not an epoch.
    result["setup_s"] = wall - sum(e["epoch_s"] + e["warmup_s"] for e in result["epochs"])


# ---------------------------------------------------------------------- measuring
class Stopwatch:
    """Wall seconds of a block (on CUDA timed with events, and waited for at the end), and the
    process's CPU seconds in it: on a busy machine the CPU time still says how much work was done."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.seconds = self.start.elapsed_time(end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.cpu0


class StepClock:
    """The wall time between consecutive optimizer steps: one whole training step (fetching the
    batch, forward, backward, update, bookkeeping) however a contender's loop is written. Stamped
    by a global optimizer step hook, so no contender's code changes. CPU only: on CUDA the host
    runs ahead of the device. On a machine whose CPU is shared, the fastest steps show what a step
    costs when the contender has the core to itself; the median shows what the neighbours left."""

    def __init__(self, device: str) -> None:
        self.enabled = device == "cpu"
        self.stamps: list[float] = []

    def __enter__(self) -> StepClock:
        if self.enabled:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self.handle = register_optimizer_step_post_hook(lambda *_: self.stamps.append(time.perf_counter()))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.handle.remove()

    def step_ms(self) -> list[float]:
        return [1000 * (b - a) for a, b in zip(self.stamps, self.stamps[1:])]


def _rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _trim_heap() -> None:
    """Returns freed heap to the OS (glibc), so one contender's garbage does not hide the next one's growth."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryWatch:
    """Peak growth of resident host memory (polled) and of allocated CUDA memory while a block runs."""

    def __init__(self, device: str, interval_s: float = 0.02) -> None:
        self.cuda, self.interval_s = device == "cuda", interval_s
        self.rss_mib = 0.0
        self.cuda_mib: float | None = None

    def __enter__(self) -> MemoryWatch:
        gc.collect()
        _trim_heap()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()
        self.start = self.peak = _rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._done.wait(self.interval_s):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.rss_mib = (self.peak - self.start) / 2**20
        if self.cuda:
            self.cuda_mib = (torch.cuda.max_memory_allocated() - self.cuda_start) / 2**20


def run_contender(name: str, s: Settings, log: Callable[[str], None], result: dict[str, Any]) -> None:
    """One fresh, seeded run of `s.epochs` epochs, recorded into `result` as it goes (so a stop keeps it)."""
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.set_num_threads(s.threads)
    result.update(complete=False, setup_s=None, peak_rss_mib=None, peak_cuda_mib=None, threads=None, epochs=[])
    memory = MemoryWatch(s.device)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as out_dir, memory:
            if name == "launched":
                run_launched(s, out_dir, result)
                for record in result["epochs"]:
                    log(f"  {name:8s} epoch {record['epoch']}: train {record['train_s']:.2f} s, eval "
                        f"{record['eval_s']:.2f} s, warm-up {record['warmup_s']:.2f} s")  # fmt: skip
                result["complete"] = True
                return
            t0 = time.perf_counter()
            run = FACTORIES[name](s, out_dir)
            result["setup_s"] = time.perf_counter() - t0
            result["threads"] = torch.get_num_threads()
            if result["threads"] != s.threads:
                log(f"  warning: {name} changed torch's thread count to {result['threads']}")
            for epoch in range(1, s.epochs + 1):
                with Stopwatch(s.device) as train_watch, StepClock(s.device) as clock:
                    train = run.train_epoch()
                steps_ms = sorted(clock.step_ms())
                valid: dict[str, Any] = {}
                eval_watch = Stopwatch(s.device)
                if s.evaluate:
                    with eval_watch:
                        valid = run.evaluate()
                run.end_epoch()
                # The first step and evaluation batch (where torch.compile compiles) are reported apart.
                train_warm, eval_warm = train.get("warmup_s", 0.0), valid.get("warmup_s", 0.0)
                train_s, eval_s = train_watch.seconds - train_warm, eval_watch.seconds - eval_warm
                record = {
                    "epoch": epoch,
                    "train_s": train_s,
                    "eval_s": eval_s,
                    "epoch_s": train_s + eval_s,
                    "warmup_s": train_warm + eval_warm,
                    "train_cpu_s": train_watch.cpu_seconds,
                    "eval_cpu_s": eval_watch.cpu_seconds,
                    "train_samples": train["samples"],
                    "train_samples_per_s": train["samples"] / train_s,
                    "step_ms": 1000 * train_s / (train["samples"] // s.batch_size),
                    "fastest_step_ms": steps_ms[0] if steps_ms else None,
                    "step_ms_p10": steps_ms[len(steps_ms) // 10] if steps_ms else None,
                    "train_loss": train["loss"],
                    "train_acc": train["acc"],
                    "valid_acc": valid.get("acc"),
                    "valid_correct": valid.get("correct"),
                    "valid_seen": valid.get("seen"),
                }
                result["epochs"].append(record)
                valid_text = f", eval {eval_s:.2f} s, valid acc {valid['acc']:.4f}" if valid else ""
                warm_text = f", warm-up {record['warmup_s']:.2f} s" if record["warmup_s"] >= 0.5 else ""
                log(
                    f"  {name:8s} epoch {epoch}: train {train_s:.2f} s "
                    f"({record['train_samples_per_s']:,.0f} samples/s, {record['step_ms']:.2f} ms/step){valid_text}"
                    f"{warm_text}"
                )
            del run
        result["complete"] = True
    finally:
        result["peak_rss_mib"], result["peak_cuda_mib"] = memory.rss_mib, memory.cuda_mib
        if name == "launched":  # another process: this one's memory says nothing about it
            result["peak_rss_mib"] = result["peak_cuda_mib"] = None
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags
        gc.collect()
        if s.device == "cuda":
            torch.cuda.empty_cache()


def warm_up(s: Settings, steps: int = 3) -> None:
    """First calls pay for kernel selection and lazy initialisation: pay it here, for every contender's setup."""
    dev = torch.device(s.device)
    combos = {(False, None), (s.channels_last, AMP_DTYPES.get(s.mixed_precision))}
    for channels_last, dtype in combos:
        model = build_model("blog_resnet").to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(steps):
            x = to_model_input(torch.rand(s.batch_size, 1, 28, 28, device=dev), channels_last)
            ctx = contextlib.nullcontext() if dtype is None else torch.autocast(dev.type, dtype=dtype)
            with ctx:
                loss = F.cross_entropy(model(x).float(), torch.randint(0, 10, (s.batch_size,), device=dev))
            loss.backward()
            opt.step()
            opt.zero_grad()
    if s.device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- host-sync census
class CallCensus(TorchFunctionMode):
    """Counts torch calls made from outside torch, by (name, caller file:line); host reads also by the
    device of the tensor read (a read of a CUDA tensor waits for the GPU, one of a CPU tensor does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.reads: Counter[tuple[str, str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", None) or repr(func)
        where = _caller()
        self.counts[(name, where)] += 1
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.reads[(name, where, args[0].device.type)] += 1
        return func(*args, **(kwargs or {}))


def _caller(depth: int = 2) -> str:
    """file:line of the first frame `depth` up from here that is not inside torch or the warnings module."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_code.co_filename.startswith((TORCH_DIR, WARNINGS_FILE)):
        frame = frame.f_back
    if frame is None:
        return "?"
    parts = Path(frame.f_code.co_filename).parts
    short = "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else "/".join(parts[-2:])
    return f"{short}:{frame.f_lineno}"


def _cuda_syncs(fn: Callable[[], Any]) -> Counter[str]:
    """Runs `fn` under torch.cuda.set_sync_debug_mode("warn"); counts the synchronising calls by caller line."""
    found: Counter[str] = Counter()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message).lower():
            found[_caller(2)] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return found


def sync_census(s: Settings, steps: int, contenders: list[str]) -> dict[str, Any]:
    """Per training step: host reads (and, on CUDA, operations that synchronise) of each contender.

    Torch calls are counted with a TorchFunctionMode over `steps` training steps; a call made at
    least once per step is part of the hot loop. Host reads count when they read a tensor on the
    training device (on a CPU run: any tensor, except in torchvision's per-image decoding, which
    reads host tensors whatever the device). On CUDA the same steps also run under
    `torch.cuda.set_sync_debug_mode("warn")`, which names every synchronising operation.
    """
    result: dict[str, Any] = {"steps": steps}
    for name in [c for c in contenders if c in ("baseline", "trainer", "bare")]:
        # Three epochs' worth of schedule: a warm epoch, the counted one, and the CUDA sync-debug one.
        cs = replace(s, epochs=3, limit_train_batches=steps, evaluate=False)
        torch.set_num_threads(s.threads)
        with tempfile.TemporaryDirectory(prefix="bench-") as out_dir:
            run = FACTORIES[name](cs, out_dir)
            run.train_epoch(max_steps=steps)  # warm: the first epoch's iterator setup is not per step
            run.end_epoch()
            census = CallCensus()
            with census:
                done = run.train_epoch(max_steps=steps)["samples"] // cs.batch_size  # fewer on a tiny data set
            by_name: Counter[str] = Counter()
            for (n, _), c in census.counts.items():
                by_name[n] += c
            reads = {
                f"{n} @ {w}": c / done
                for (n, w, device), c in census.reads.items()
                if device == s.device and not w.startswith("torchvision/")
            }
            entry: dict[str, Any] = {
                "steps": done,
                "calls_per_step": sum(census.counts.values()) / done,
                "host_reads_per_step": sum(reads.values()),
                "host_reads": reads,
                "calls_by_name_per_step": {n: c / done for n, c in sorted(by_name.items())},
                "calls_by_line_per_step": {f"{n} @ {w}": c / done for (n, w), c in sorted(census.counts.items())},
            }
            if s.device == "cuda":
                run.end_epoch()
                syncs = _cuda_syncs(lambda run=run: run.train_epoch(max_steps=steps))
                entry["cuda_syncs_per_step"] = sum(syncs.values()) / done
                entry["cuda_syncs_by_line"] = {w: c / done for w, c in syncs.most_common()}
            result[name] = entry
            del run
        gc.collect()
    return result


# ---------------------------------------------------------------------- summary and output
def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per contender over all its epochs (rounds for setup and memory); ratios as medians of round pairs."""
    summary: dict[str, Any] = {}
    results = {name: [r for r in rounds if r.get("epochs")] for name, rounds in results.items()}
    for name, rounds in results.items():
        if not rounds:
            continue
        epochs = [e for r in rounds for e in r["epochs"]]
        last = rounds[-1]["epochs"][-1]
        finals = sorted({r["epochs"][-1]["valid_acc"] for r in rounds if r["epochs"][-1]["valid_acc"] is not None})
        summary[name] = {
            "rounds": len(rounds),
            "setup_s": _median([r["setup_s"] for r in rounds]),
            "train_s": _median([e["train_s"] for e in epochs]),
            "eval_s": _median([e["eval_s"] for e in epochs]),
            "epoch_s": _median([e["epoch_s"] for e in epochs]),
            "warmup_s": _median([sum(e.get("warmup_s") or 0.0 for e in r["epochs"]) for r in rounds]),
            "warmup_s_per_round": [sum(e.get("warmup_s") or 0.0 for e in r["epochs"]) for r in rounds],
            "train_cpu_s": _median([e.get("train_cpu_s") for e in epochs]),
            "step_ms": _median([e["step_ms"] for e in epochs]),
            "fastest_step_ms": min((e["fastest_step_ms"] for e in epochs if e.get("fastest_step_ms")), default=None),
            "step_ms_p10": _median([e.get("step_ms_p10") for e in epochs]),
            "train_samples_per_s": _median([e["train_samples_per_s"] for e in epochs]),
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in rounds]),
            "peak_cuda_mib": _median([r["peak_cuda_mib"] for r in rounds]),
            "final_train_acc": last["train_acc"],
            "final_valid_acc": last["valid_acc"],
            "final_valid_correct": last["valid_correct"],
            "final_valid_seen": last["valid_seen"],
            "final_valid_acc_range": [finals[0], finals[-1]] if finals else None,
        }
    ratios: dict[str, Any] = {}
    others = [(name, "baseline", "epoch_s", f"{name}_over_baseline_epoch_s") for name in CONTENDERS[1:]]
    for a, b, key, label in (
        *others,
        ("trainer", "baseline", "train_s", "trainer_over_baseline_train_s"),
        ("trainer", "bare", "train_s", "trainer_over_bare_step_loop"),
        ("trainer", "bare", "train_cpu_s", "trainer_over_bare_step_loop_cpu"),
        ("trainer", "bare", "eval_s", "trainer_over_bare_eval"),
        ("trainer", "baseline", "fastest_step_ms", "trainer_over_baseline_fastest_step"),
        ("trainer", "baseline", "step_ms_p10", "trainer_over_baseline_step_p10"),
        ("trainer", "bare", "step_ms_p10", "trainer_over_bare_step_p10"),
    ):
        runs_a = {r["round"]: r for r in results.get(a, [])}
        runs_b = {r["round"]: r for r in results.get(b, [])}
        pairs = [
            statistics.fmean(e[key] for e in runs_a[k]["epochs"])
            / statistics.fmean(e[key] for e in runs_b[k]["epochs"])
            for k in sorted(runs_a.keys() & runs_b.keys())
            if all((e.get(key) or 0) > 0 for e in runs_a[k]["epochs"] + runs_b[k]["epochs"])
        ]
        if pairs:
            ratios[label] = {"median": statistics.median(pairs), "per_round": pairs}
    summary["ratios"] = ratios
    # Epochs before a compiled contender's warm-up pays for itself against its eager twin.
    break_even: dict[str, Any] = {}
    for compiled, eager in COMPILED_TWINS.items():
        if compiled in summary and eager in summary:
            saved = summary[eager]["epoch_s"] - summary[compiled]["epoch_s"]
            per_round = summary[compiled]["warmup_s_per_round"]
            break_even[compiled] = {
                "eager": eager,
                "saved_s_per_epoch": saved,
                "warmup_s_per_round": per_round,
                "epochs_per_round": [w / saved if saved > 0 else None for w in per_round],
            }
    summary["break_even"] = break_even
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(console: Console, report: dict[str, Any]) -> None:
    """The table, the ratios and the optional checks' results of a report (fresh, or read back from its JSON)."""
    settings, summary = report["settings"], summarise(report["runs"])
    done = max((row["rounds"] for name, row in summary.items() if name in CONTENDERS), default=0)
    title = f"MNIST, {settings['epochs']} epoch(s) per round, medians of {done} round(s)"
    if not report.get("complete", True):
        title += " (interrupted: partial)"
    print_table(console, summary, settings["device"], title)
    overhead = report.get("overhead", {})
    if "summary" in overhead:
        o = overhead["summary"]
        ratio = o["ratios"].get("trainer_over_bare_step_loop", {}).get("median")
        trainer_ms, bare_ms = (_fmt(o.get(n, {}).get("step_ms"), ".3f") for n in ("trainer", "bare"))
        console.print(
            f"per-step overhead at batch {overhead['batch_size']}: trainer {trainer_ms} ms/step, "
            f"bare {bare_ms} ms/step, trainer / bare {_fmt(ratio, '.3f')}"
        )
    if "sync_check" in report:
        print_census(console, report["sync_check"])


def print_table(console: Console, summary: dict[str, Any], device: str, title: str) -> None:
    cuda = device == "cuda"
    table = Table(title=title, title_justify="left")
    headers = ["contender", "setup s", "train s/epoch", "train CPU s", "eval s/epoch", "epoch s", "train samples/s"]
    headers += ["ms/step", "warm-up s"] + ([] if cuda else ["fastest step ms", "p10 step ms"])
    headers += ["x baseline (epoch s)", "peak RSS +MiB"] + (["peak CUDA MiB"] if cuda else [])
    headers += ["final train acc", "final valid acc", "valid correct/seen"]
    for h in headers:
        table.add_column(h, justify="left" if h == "contender" else "right")
    ratios = summary.get("ratios", {})
    for name in CONTENDERS:
        row = summary.get(name)
        if row is None:
            continue
        vs = 1.0 if name == "baseline" else ratios.get(f"{name}_over_baseline_epoch_s", {}).get("median")
        seen = "-" if row["final_valid_seen"] is None else f"{row['final_valid_correct']}/{row['final_valid_seen']}"
        cells = [
            name,
            _fmt(row["setup_s"], ".2f"),
            _fmt(row["train_s"], ".2f"),
            _fmt(row["train_cpu_s"], ".2f"),
            _fmt(row["eval_s"], ".2f"),
            _fmt(row["epoch_s"], ".2f"),
            _fmt(row["train_samples_per_s"], ",.0f"),
            _fmt(row["step_ms"], ".2f"),
            _fmt(row.get("warmup_s"), ".1f"),
            *([] if cuda else [_fmt(row.get("fastest_step_ms"), ".1f"), _fmt(row.get("step_ms_p10"), ".1f")]),
            _fmt(vs, ".3f"),
            _fmt(row["peak_rss_mib"], ".0f"),
        ]
        cells += [_fmt(row["peak_cuda_mib"], ".1f")] if cuda else []
        cells += [_fmt(row["final_train_acc"], ".4f"), _fmt(row["final_valid_acc"], ".4f"), seen]
        table.add_row(*cells)
    console.print(table)
    for label, text in (
        ("trainer_over_baseline_epoch_s", "trainer / baseline, seconds per epoch (train + eval)"),
        ("trainer_over_baseline_train_s", "trainer / baseline, training seconds per epoch"),
        ("trainer_over_bare_step_loop", "trainer / bare, training step loop (Accelerate's cost; target <= 1.05)"),
        ("trainer_over_bare_step_loop_cpu", "trainer / bare, process CPU seconds of the training step loop"),
        ("trainer_over_bare_eval", "trainer / bare, evaluation"),
        ("trainer_over_baseline_fastest_step", "trainer / baseline, fastest step (when the core was its own)"),
        ("trainer_over_baseline_step_p10", "trainer / baseline, 10th-percentile step (the steps neighbours spared)"),
        ("trainer_over_bare_step_p10", "trainer / bare, 10th-percentile step"),
    ):
        if label in ratios:
            r = ratios[label]
            rounds = ", ".join(f"{v:.3f}" for v in r["per_round"])
            console.print(f"{text}: [bold]{r['median']:.3f}[/] (per round: {rounds})")
    for name in CONTENDERS[3:]:
        if (r := ratios.get(f"{name}_over_baseline_epoch_s")) is not None:
            console.print(f"{name} / baseline, seconds per epoch: [bold]{r['median']:.3f}[/] (x{1 / r['median']:.2f})")
    for compiled, b in summary.get("break_even", {}).items():
        rounds = ", ".join(f"{w:.1f} s -> {_fmt(e, '.1f')} epochs" for w, e in zip(b["warmup_s_per_round"],
                                                                                  b["epochs_per_round"]))  # fmt: skip
        console.print(
            f"{compiled}: saves {b['saved_s_per_epoch']:.2f} s per epoch against {b['eager']}; its warm-up pays "
            f"for itself after (per round; round 1 compiles with inductor's on-disk cache as it found it): {rounds}"
        )


def print_census(console: Console, census: dict[str, Any]) -> None:
    console.print(
        f"[bold]host reads (and CUDA syncs) per training step[/], counted over up to {census['steps']} steps:"
    )
    for name in CONTENDERS:
        entry = census.get(name)
        if entry is None:
            continue
        reads = ", ".join(f"{where} {n:.2f}" for where, n in sorted(entry["host_reads"].items()))
        console.print(f"  {name}: {entry['host_reads_per_step']:.2f} ({reads or 'none'})", highlight=False)
        if "cuda_syncs_per_step" in entry:
            syncs = ", ".join(f"{where} {n:.2f}" for where, n in entry["cuda_syncs_by_line"].items())
            console.print(f"    CUDA syncs: {entry['cuda_syncs_per_step']:.2f} ({syncs or 'none'})", highlight=False)
    if "trainer" in census and "bare" in census:
        t, b = census["trainer"], census["bare"]
        console.print(
            f"[bold]torch calls per step[/]: trainer {t['calls_per_step']:.1f}, bare {b['calls_per_step']:.1f}; "
            "the trainer's extra ones:"
        )
        names = t["calls_by_name_per_step"].keys() | b["calls_by_name_per_step"].keys()
        for n in sorted(names):
            extra = t["calls_by_name_per_step"].get(n, 0.0) - b["calls_by_name_per_step"].get(n, 0.0)
            if abs(extra) >= 0.5:
                lines = (key.split(" @ ", 1) for key in t["calls_by_line_per_step"])
                where = sorted(w for call, w in lines if call == n and not w.startswith(SHARED_CODE))
                console.print(f"    {extra:+6.2f} x {n:<16s} {', '.join(where)}", highlight=False)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def machine_info(device: str) -> dict[str, Any]:
    import accelerate
    import torchvision

    status = _git("status", "--porcelain", "--untracked-files=no")
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "trainer": trainer.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def default_json_path() -> Path:
    return RESULTS_DIR / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the blog's loop, the Trainer and a bare loop on the Trainer's data path, in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with MNIST/raw/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="trainer and bare")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="trainer and bare")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per round (each round is a fresh run)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the contenders' order rotates each round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, for all")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset to run")
    parser.add_argument("--json", type=Path, default=None, help="result file (default: benchmarks/results/<time>.json)")
    parser.add_argument("--show", type=Path, default=None, metavar="JSON", help="print a saved result's table and exit")
    parser.add_argument(
        "--overhead",
        type=int,
        default=0,
        metavar="STEPS",
        help="also time trainer vs bare for STEPS steps at --overhead-batch, where per-step overhead shows",
    )
    parser.add_argument("--overhead-batch", type=int, default=32)
    parser.add_argument(
        "--sync-check",
        type=int,
        default=0,
        metavar="STEPS",
        help="also count each contender's per-step host reads (and CUDA syncs) over STEPS steps",
    )
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
    if args.epochs < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--epochs, --rounds and --threads must be at least 1")
    if not (Path(args.data_dir) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        parser.error(f"no MNIST in {args.data_dir}: expected {args.data_dir}/MNIST/raw/*-ubyte (the four IDX files)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Not a terminal (a log file, CI): wide enough for the table instead of rich's 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)

    def log(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    if args.show is not None:
        print_report(console, json.loads(args.show.read_text()))
        return 0

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_term)
    os.environ.setdefault("TRAINER_OFFLINE", "1")  # never try a download in the middle of a timing
    torch.set_num_threads(args.threads)
    s = Settings(
        data_dir=args.data_dir,
        device=args.device,
        epochs=args.epochs,
        mixed_precision=args.mixed_precision,
        channels_last=args.channels_last,
        threads=args.threads,
    )
    json_path = args.json or default_json_path()
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
    log(
        f"device {args.device}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, {m['cpus_usable']} CPUs, "
        f"{args.threads} torch threads, torch {m['torch']}, accelerate {m['accelerate']}, "
        f"precision {args.mixed_precision}, channels_last {args.channels_last}, "
        f"{args.epochs} epoch(s) x {args.rounds} round(s)"
    )
    status = 0
    try:
        with Stopwatch(args.device) as watch:
            warm_up(s)
        log(f"warm-up {watch.seconds:.1f} s")
        for r in range(args.rounds):
            order = args.contenders[r % len(args.contenders) :] + args.contenders[: r % len(args.contenders)]
            log(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
            for name in order:
                report["runs"][name].append(result := {"round": r + 1, "position": order.index(name)})
                run_contender(name, s, log, result)
                save()
        if args.overhead:
            small = replace(s, batch_size=args.overhead_batch, limit_train_batches=args.overhead, evaluate=False)
            overhead_runs: dict[str, list[dict[str, Any]]] = {"trainer": [], "bare": []}
            report["overhead"] = {"batch_size": args.overhead_batch, "steps": args.overhead, "runs": overhead_runs}
            log(f"overhead: {args.overhead} steps at batch {args.overhead_batch}, trainer vs bare")
            for r in range(args.rounds):
                for name in ("trainer", "bare") if r % 2 == 0 else ("bare", "trainer"):
                    overhead_runs[name].append(result := {"round": r + 1})
                    run_contender(name, small, log, result)
            report["overhead"]["summary"] = summarise(overhead_runs)
            save()
        if args.sync_check:
            log(f"sync check: {args.sync_check} steps per contender")
            report["sync_check"] = sync_census(s, args.sync_check, args.contenders)
            save()
        report["complete"] = True
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"[bold red]interrupted ({exc or 'Ctrl-C'}): the results below are partial[/]")
        status = 130
    finally:
        if hasattr(os, "getloadavg"):
            report["machine"]["load_average_at_end"] = list(os.getloadavg())
        save()
    print_report(console, report)
    log(f"results: {json_path}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
