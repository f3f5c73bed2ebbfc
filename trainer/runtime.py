"""The processes a run lives in: the Accelerator, devices, threads, signals and the launcher.

Processes that agree: a failure on one process (one machine) stops all of them at once.
Without this, a process that hits a user error (data missing on its machine, a checkpoint its
machine cannot see) exits, while the others wait in the next collective until the process
group's timeout, many minutes later, with nothing on their screen. Here every process takes
part in a small all-gather after each step that can fail on one machine only, and every
process raises when any of them failed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.config import PRECISIONS, ConfigError, TrainConfig

# torch (and the checkpoint module, which needs it) are imported where used: the CLI asks
# launcher_argv() before its slow imports.

SHARED_STORAGE = "checkpoints must be on storage that every machine can read (a shared file system)"


class PeerError(ConfigError):
    """Another process failed; its own message says why (this one names it)."""


def lost_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another process is gone (it crashed or stopped): gloo
    reports a closed connection as a RuntimeError, NCCL and the store as torch's DistError."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")
    )


def world_size() -> int:
    """The number of processes the launcher started (torchrun's and accelerate's WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_processes() -> int:
    """The processes the launcher started on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_distributed(accelerator: Any, each_would: str) -> None:
    """Several processes launched without a distributed setup would each work alone: refused."""
    if world_size() > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"{world_size()} processes were launched but accelerate sees no distributed setup, so each would "
            f"{each_would}; on a CPU-only machine pass --cpu (gloo)"
        )


# What this process's launcher is, read once per process: (pid, launcher argv, the launcher's
# own OMP_NUM_THREADS or None).
_launcher: tuple[int, list[str] | None, str | None] | None = None


def _launcher_info() -> tuple[list[str] | None, str | None]:
    """Read while the launcher is alive (a launcher that dies first leaves the trainer to another
    parent); the CLI and the Trainer ask at their start."""
    global _launcher
    if _launcher is None or _launcher[0] != os.getpid():
        argv = _read_launcher_argv()
        omp = None
        if argv is not None:
            try:
                environ = Path(f"/proc/{os.getppid()}/environ").read_bytes().decode(errors="replace").split("\0")
                omp = next((e.split("=", 1)[1] for e in environ if e.startswith("OMP_NUM_THREADS=")), None)
            except OSError:
                omp = None
        _launcher = (os.getpid(), argv, omp)
    return _launcher[1], _launcher[2]


def launcher_argv() -> list[str] | None:
    """How `accelerate launch` or torchrun started this process: the launcher's command and its own
    options (a config file, process counts), from the parent's command line; None otherwise."""
    return _launcher_info()[0]


def cpu_threads(requested: int | None) -> tuple[int, str]:
    """The torch threads for one process on the CPU, and why.

    `--threads` wins, then an OMP_NUM_THREADS that the user set. A launcher's silent default is
    not a choice: `accelerate launch` gives its workers OMP_NUM_THREADS=1 unless its own
    environment has OMP_NUM_THREADS or it was given --num_cpu_threads_per_process, and torchrun
    does the same for several processes per machine. Then the trainer takes the cores it may run
    on (its CPU affinity) divided by the processes on this machine.
    """
    if requested is not None:
        return requested, "--threads"
    omp = os.environ.get("OMP_NUM_THREADS")
    argv, launcher_omp = _launcher_info()
    chosen_in_launcher = argv is not None and (
        launcher_omp is not None or any(a.startswith("--num_cpu_threads_per_process") for a in argv)
    )
    if omp and (argv is None or chosen_in_launcher):
        try:
            return max(1, int(omp)), "OMP_NUM_THREADS"
        except ValueError:
            pass
    mine, local = cores(), local_processes()
    return max(1, mine // local), f"{mine} cores / {local} process{'es' if local > 1 else ''}"


def _read_launcher_argv() -> list[str] | None:
    try:
        tokens = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux
        return None
    for i, token in enumerate(tokens):
        if token.endswith("accelerate") and tokens[i + 1 : i + 2] == ["launch"]:
            name, start = ["accelerate", "launch"], i + 2
        elif token == "accelerate.commands.launch":
            name, start = ["accelerate", "launch"], i + 1
        elif token.endswith("torchrun") or token == "torch.distributed.run":
            name, start = ["torchrun"], i + 1
        else:
            continue
        end = next((j for j in range(start, len(tokens) - 1) if tokens[j] == "-m" and tokens[j + 1] == "trainer"), None)
        return name + tokens[start:end] if end is not None else None  # a script, not `-m trainer`
    return None


def _state():
    from accelerate import PartialState

    return PartialState()


def _gather_ints(values: list[int]):
    """Every process's `values`, as an int64 tensor [processes, len(values)] on the host."""
    import torch
    from accelerate.utils import gather

    state = _state()
    return gather(torch.tensor([values], dtype=torch.int64, device=state.device)).cpu()


def agree(error: Exception | None, what: str) -> None:
    """Collective: raises on every process when any process passes an error.

    The process that failed raises its own error; the others raise a PeerError naming the
    processes that failed and `what` they were doing.
    """
    if world_size() == 1 or _state().num_processes == 1:
        if error is not None:
            raise error
        return
    failed = [r for r, (flag,) in enumerate(_gather_ints([0 if error is None else 1]).tolist()) if flag]
    if error is not None:
        raise error
    if failed:
        names = ", ".join(str(r) for r in failed)
        raise PeerError(f"process {names} could not {what} (its message says why); stopping all processes")


def resume_auto(run_dir: Path) -> str | None:
    """--resume auto: "latest" when the run folder holds an intact checkpoint, else None (a fresh
    start). The main process looks; with several, the others take its answer."""
    from trainer import checkpoint as ckpt

    found = ckpt.find_latest(run_dir) is not None if _state_main() else False
    if world_size() > 1 and _state().num_processes > 1:
        from accelerate.utils import broadcast_object_list

        found = broadcast_object_list([found])[0]
    return "latest" if found else None


def _state_main() -> bool:
    return world_size() == 1 or _state().is_main_process


def slurm_job() -> str | None:
    """This process's Slurm job as `scontrol requeue` names it (an array task as JOB_TASK), or None."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_signal(configured: str | None) -> int | None:
    """The signal that saves, requeues and stops: the configured one, else USR1 inside a Slurm job
    (submitit and Lightning use USR1 or USR2 for the same reason: SIGTERM keeps its meaning)."""
    name = configured or ("USR1" if slurm_job() else "none")
    return None if name == "none" else int(getattr(signal, f"SIG{name}"))


# A Slurm warning signal that came while the process was starting (imports, data, set-up), kept
# for the training loop; its default action would have ended the process without a word.
_early_signal: int | None = None


def catch_early_warnings() -> None:
    """Inside a Slurm job, from the first line of the CLI: USR1 and USR2 are noted, not fatal,
    until the training loop installs its own handlers (a time-limit warning can come at any time)."""

    def note(signum: int, frame: Any) -> None:
        global _early_signal
        _early_signal = signum

    if slurm_job() is not None:
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, note)


def requeue_slurm_job() -> str:
    """Asks Slurm to requeue this job (once, from one process); one line that says how it went."""
    import subprocess

    job = slurm_job()
    if job is None:
        return "not a Slurm job: nothing to requeue; start the same command again to continue"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not requeue Slurm job {job} ({exc}); the checkpoint is saved: submit the script again"
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[:1] or [f"exit {done.returncode}"]
        return f"could not requeue Slurm job {job} ({reason[0]}); the checkpoint is saved: submit the script again"
    return f"requeued Slurm job {job}: when it starts again, --resume auto continues from this checkpoint"


def resolve_checkpoint(resume: str, run_dir: Path, warn: Callable[[str], None] = lambda _: None) -> Path:
    """The verified checkpoint folder that `--resume` names: 'latest' in `run_dir`, or a path."""
    from trainer import checkpoint as ckpt

    if resume == "latest":
        folder = ckpt.find_latest(run_dir, warn=warn)
        if folder is None:
            raise ckpt.CheckpointError(f"--resume latest: no complete checkpoint in {run_dir}")
        return folder
    folder = ckpt.folder_of(resume)
    if not folder.exists():
        raise ckpt.CheckpointError(f"--resume {resume}: no such checkpoint folder")
    folder = folder.resolve()
    ckpt.verify(folder)
    return folder


def _manifest_digest(folder: Path) -> list[int]:
    from trainer import checkpoint as ckpt

    digest = hashlib.sha256((folder / ckpt.MANIFEST_NAME).read_bytes()).digest()
    return [int.from_bytes(digest[i : i + 8], "little", signed=True) for i in range(0, 32, 8)]


def agree_on_checkpoint(resume: str, run_dir: Path, warn: Callable[[str], None] = lambda _: None) -> Path:
    """The checkpoint every process resumes from: the main process chooses it, and every other
    process checks that it reads that same checkpoint (the same step and manifest) on its own
    machine. Any failure stops every process with exit code 2 (see `agree`)."""
    import torch

    from trainer import checkpoint as ckpt
    from trainer.errors import first_line

    if world_size() == 1 or _state().num_processes == 1:
        return resolve_checkpoint(resume, run_dir, warn)
    from accelerate.utils import broadcast

    state = _state()
    chosen, error, choice = None, None, [-1] * 5
    if state.is_main_process:
        try:
            chosen = resolve_checkpoint(resume, run_dir, warn)
            if ckpt.step_of(chosen) < 0:
                raise ckpt.CheckpointError(f"{chosen} is not named like a checkpoint (step_NNNNNNN)")
            choice = [ckpt.step_of(chosen), *_manifest_digest(chosen)]
        except (ckpt.CheckpointError, OSError) as exc:
            error = exc if isinstance(exc, ckpt.CheckpointError) else ckpt.CheckpointError(f"{chosen}: {exc}")
    choice = broadcast(torch.tensor(choice, dtype=torch.int64, device=state.device)).cpu().tolist()
    if choice[0] < 0:  # the main process found nothing to resume: it says why, the others stop quietly
        raise error if error is not None else PeerError("process 0 could not find the checkpoint to resume")
    if not state.is_main_process:
        mine = run_dir / ckpt.step_dir_name(choice[0]) if resume == "latest" else ckpt.folder_of(resume)
        try:
            ckpt.verify(mine)
            if _manifest_digest(mine) != choice[1:]:
                raise ckpt.CheckpointError(f"{mine} is not the checkpoint that process 0 resumes from")
            chosen = mine.resolve()
        except (ckpt.CheckpointError, OSError) as exc:
            error = ckpt.CheckpointError(
                f"cannot read checkpoint {ckpt.step_dir_name(choice[0])} that process 0 resumes from "
                f"({first_line(exc)}); {SHARED_STORAGE}"
            )
    agree(error, f"read checkpoint {ckpt.step_dir_name(choice[0])}; {SHARED_STORAGE}")
    return chosen


# ---------------------------------------------------------------- the process group
# Whether the default process group was there before the trainer first asked for one (then it is
# the user's, and left alone); None until then.
_group_was_there: bool | None = None


def start_processes(cpu: bool = False) -> Any:
    """accelerate's PartialState (it joins the launcher's process group), with `end_processes` set
    to run at exit when the group is ours. Every path that starts processes comes through here."""
    global _group_was_there
    import atexit

    import torch.distributed as dist
    from accelerate import PartialState

    if _group_was_there is None:
        _group_was_there = dist.is_available() and dist.is_initialized()
        if not _group_was_there:
            atexit.register(end_processes)
    return PartialState(cpu=cpu)


def end_processes() -> None:
    """At exit, while the interpreter can still run Python: collects what may hold gloo's work
    objects (a DistributedDataParallel wrapper in a reference cycle), then destroys the process
    group the trainer started. Left to the interpreter's own teardown, gloo's threads can abort the
    process after its last line (SIGABRT) when they need the GIL after finalisation began."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- what the device is
def cpu_flags() -> tuple[str, set[str]]:
    """The CPU's vendor and instruction-set flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())


def cpu_description() -> str:
    """e.g. "AMD EPYC (AuthenticAMD family 23 model 49), AVX2", for benchmarks and the summary."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    isa = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "-"
    return (f"{fields.get('model name', '?')} ({fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}), {isa}")  # fmt: skip


def device_defaults(device: Any) -> dict[str, Any]:
    """The settings chosen by what the device is, never by a timing taken at start-up (a run must
    be reproducible on one machine), with the reason; the one place this rule lives. The precision
    does not change the answer: each format won in fp32 and bf16 alike where it was measured.

    Memory format, as measured (docs/performance.md): channels_last on CUDA (cuDNN's NHWC kernels);
    on CPUs with AVX-512, contiguous tensors, where oneDNN's blocked kernels ran the blog's narrow
    convolutions 25% (fp32) to 60% (bf16) faster than in channels_last (an Intel Xeon with AMX); on
    CPUs with AVX2 only, channels_last (9% faster in fp32, 50% in bf16 on an AMD EPYC of the Zen 2
    family); on MPS, contiguous (not measured: the layout its kernels are written for)."""
    if device.type == "cuda":
        return {"channels_last": True, "why": "CUDA: cuDNN's channels_last kernels"}
    if device.type == "mps":
        return {"channels_last": False, "why": "MPS"}
    _, flags = cpu_flags()
    if "avx512f" in flags:
        return {"channels_last": False, "why": "a CPU with AVX-512: oneDNN's blocked kernels"}
    return {"channels_last": True, "why": "a CPU with AVX2 and no AVX-512"}


def emulated_bf16(device: Any) -> bool:
    """bf16 on a CPU without AVX-512 BF16 or AMX is converted to and from fp32 around every op: the
    blog's step took 7 times as long as in fp32 on an AVX2 EPYC."""
    _, flags = cpu_flags()
    return device.type == "cpu" and bool(flags) and not flags & {"avx512_bf16", "amx_bf16"}


# ---------------------------------------------------------------- the accelerator
def make_accelerator(config: TrainConfig) -> Any:
    """The one Accelerator: devices, processes and precision come from it (and accelerate's config)."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration

    kwargs: dict[str, Any] = {}
    precision = config.mixed_precision
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION")  # a launch config's, or the user's
    if precision is None and launched_with:
        # accelerate would take a value it does not know (BF16, bfloat16, yes) for fp32 without a word.
        precision = launched_with.lower()
        if precision not in PRECISIONS:
            raise ConfigError(
                f"ACCELERATE_MIXED_PRECISION={launched_with!r} (from the environment or a launch config) is not one "
                f"of {', '.join(PRECISIONS)}"
            )
    if precision is not None:
        kwargs["mixed_precision"] = precision
    device_is_cpu = config.cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if precision == "fp16" and (device_is_cpu or not (torch.cuda.is_available() or mps_available())):
        raise ConfigError("fp16 mixed precision needs a GPU; on the CPU use --mixed-precision bf16 or no")
    cuda = torch.cuda.is_available() and not device_is_cpu
    if config.compile:
        from accelerate.utils import TorchDynamoPlugin

        mode = config.compile_mode or ("reduce-overhead" if cuda else "default")
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=mode)
    if config.find_unused_parameters:  # accelerate applies it where it wraps the model in DDP, nowhere else
        from accelerate.utils import DistributedDataParallelKwargs

        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if config.trackers:
        from accelerate.utils import ProjectConfiguration

        run_dir = Path(config.output_dir) / config.name
        kwargs["log_with"] = check_trackers(config.trackers)
        kwargs["project_config"] = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "trackers"))
    start_processes(config.cpu)
    try:
        return Accelerator(
            cpu=config.cpu,
            # accelerate's accumulate(): no gradient all-reduce on the micro-batches that do not step.
            gradient_accumulation_steps=config.grad_accum,
            # Our sampler derives each epoch's order from (seed, epoch): no RNG needs syncing per epoch.
            rng_types=[],
            # Batches of a Dataset come from pinned memory on CUDA: copy them without blocking the host
            # (never on MPS, where a non-blocking copy of pageable memory can read it after it is freed).
            dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=cuda),
            **kwargs,
        )
    except ValueError as exc:  # accelerate's own refusal of a precision/device pair
        raise ConfigError(str(exc).strip().splitlines()[0]) from None


def mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


# ---------------------------------------------------------------- signals and the launcher
# SIGHUP: the terminal closed (an SSH connection dropped); it stops a run the way SIGTERM does.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP ask the trainer to save and stop after the current step; a second
    Ctrl-C stops at once.

    Python runs a signal's handler only between bytecodes, so two Ctrl-Cs during one long step
    (a backward pass in C++) reach `_handle` once. The C-level handler still writes one byte per
    signal to the wakeup fd, so counting those bytes tells a double press from a single one.
    """

    def __init__(self, owner: Any) -> None:
        # owner has request_stop(signum), stop_signal (None until one came), finished, report.warn(text)
        self.owner = owner
        self.previous: dict[int, Any] = {}
        self._wakeup: tuple[Any, Any] | None = None
        self._previous_fd = -1
        self._installed = False

    def __enter__(self) -> StopSignals:
        global _early_signal
        import threading

        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main one
            self.owner.report.warn(
                "fit() runs outside the main thread, which alone receives signals: a Ctrl-C or SIGTERM will not "
                "save this run (trainer.request_stop(signal.SIGTERM) from any thread does)"
            )
            return self
        self._installed = True
        for sig in (*STOP_SIGNALS, *([self.owner.requeue_signal] if self.owner.requeue_signal else [])):
            self.previous[sig] = signal.signal(sig, self._handle)
        if _early_signal is not None:  # a warning during start-up: the first step is the one to stop after
            early, _early_signal = _early_signal, None
            if early == self.owner.requeue_signal:
                self._handle(early, None)
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        return self

    def _presses(self) -> int:
        """SIGINTs delivered since the last look (each wrote its number to the wakeup socket)."""
        if self._wakeup is None:
            return 0
        count = 0
        try:
            while data := self._wakeup[0].recv(4096):
                count += data.count(bytes([signal.SIGINT]))
        except (BlockingIOError, OSError):
            pass
        return count

    def _handle(self, signum: int, frame: Any) -> None:
        if self.owner.finished:  # saved and on its way out: a late press (a quick double Ctrl-C) stops nothing
            return
        double = signum == signal.SIGINT and self._presses() >= 2  # both pressed during one long step
        if self.owner.stop_signal is not None or double:
            # Only a second Ctrl-C means "now". A SIGTERM after a Ctrl-C is usually the launcher
            # dying from the same Ctrl-C (see cli.die_with_launcher): the save must go on.
            if signum == signal.SIGINT:
                signal.signal(signum, signal.SIG_DFL)
                raise KeyboardInterrupt
            return
        self.owner.request_stop(signum)
        again = " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        self.owner.report.warn(f"{signal.Signals(signum).name} received: saving a checkpoint after this step{again}")

    def __exit__(self, *exc: Any) -> None:
        if not self._installed:
            return
        signal.set_wakeup_fd(self._previous_fd)
        if self._wakeup is not None:
            for end in self._wakeup:
                end.close()
            self._wakeup = None
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def resume_command(args: list[str] | None = None) -> str:
    """The command line that continues this run (the launcher is named when we know it)."""
    import shlex
    import sys

    args = list(sys.argv[1:] if args is None else args)
    cleaned, skip = [], False
    for arg in args:  # without --resume, and without --init-from, which a resumed run has done already
        if skip:
            skip = False
            continue
        if arg in ("--resume", "--init-from"):
            skip = True
            continue
        if arg.startswith(("--resume=", "--init-from=")):
            continue
        cleaned.append(arg)
    cleaned += ["--resume", "latest"]
    launcher = launcher_argv()
    if launcher is not None:  # the launcher as it was started: its config file sets the precision again
        return shlex.join([*launcher, "-m", "trainer", *cleaned])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = ["torchrun", "--nproc_per_node", str(local_processes()), "-m", "trainer"]
    elif any(k.startswith("ACCELERATE_") for k in os.environ):
        launcher = ["accelerate", "launch", "-m", "trainer"]
    else:
        launcher = ["python", "-m", "trainer"]
    return shlex.join(launcher + cleaned)


def slurm_requeue_command(args: list[str] | None) -> str | None:
    """Inside a Slurm batch job whose trainer runs with --resume auto (the repository's scripts): the
    command that runs the job again, its sbatch options and flags included, and so continues the run;
    None elsewhere. (A one-process `python -m trainer` would be the wrong advice inside the job.)"""
    import re
    import subprocess

    args, job = list(args or []), slurm_job()
    auto = "--resume=auto" in args or any(a == "--resume" and b == "auto" for a, b in zip(args, args[1:]))
    if not auto or job is None:
        return None
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    command = re.search(r"\bCommand=(.+?) WorkDir=", shown.stdout)  # the script and its flags, as submitted
    if re.search(r"\bBatchFlag=1\b", shown.stdout) is None or command is None:
        return None  # an interactive allocation (salloc, srun alone) cannot be requeued
    return (f"scontrol requeue {job} (the job runs its script again; --resume auto continues from the newest "
            f"checkpoint), or as a new job: sbatch [the same sbatch options] {command.group(1)}")  # fmt: skip


def check_trackers(names: list[str]) -> list[str]:
    """--log-with names that accelerate knows and whose package is installed; else a ConfigError.
    accelerate itself would skip a missing tracker with a debug-level message only."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    if "all" in names:
        return ["all"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(sorted(LOGGER_TYPE_TO_CLASS))
            raise ConfigError(f"--log-with: unknown tracker {name!r}; accelerate knows {known}, all")
        if name in LoggerType.list() and name not in available:
            raise ConfigError(f"--log-with {name}: the {name} package is not installed (pip install {name})")
    return names
