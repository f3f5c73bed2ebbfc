"""Shared fixtures: tiny generated IDX data sets, the real MNIST location, CLI runners."""

from __future__ import annotations

import fcntl
import gc
import os
import shutil
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# One intra-op thread per process: the tests start several processes on a 2-core machine, and
# OpenMP threads that outnumber the free cores wait on each other at every barrier (seen here:
# a backward pass 100x slower). Set before torch starts its thread pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests: a small derandomized budget by default (CI), a deep random one with
# TRAINER_HYPOTHESIS=deep; no example database is written into the checkout.
_SETTINGS = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", derandomize=True, print_blob=True, **_SETTINGS)
settings.register_profile("deep", max_examples=1000, **_SETTINGS)
DEEP = os.environ.get("TRAINER_HYPOTHESIS") == "deep"
settings.load_profile("deep" if DEEP else "ci")


def budget(examples: int, **more: object) -> settings:
    """A property test's settings: `examples` in CI, fifty times as many in a deep run."""
    return settings(max_examples=examples * 50 if DEEP else examples, **more)


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
# Real MNIST: $TRAINER_MNIST_DIR, else ../shared/data beside the checkout (CI has it there).
REAL_DATA = Path(os.environ.get("TRAINER_MNIST_DIR", REPO.parent / "shared" / "data"))

TINY_TRAIN = 1536
TINY_TEST = 1001  # divides by no batch size or process count used in the tests


# The files whose tests take longest (on the clock: the Slurm one mostly waits for Slurm) run
# first, so that no worker is left alone with one of them at the end of the suite.
SLOW_FILES = ("test_slurm.py", "test_benchmark.py", "test_threads_and_compile.py", "test_torchrun.py",
              "test_checkpoint.py", "test_predict_photos.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: each file's tests keep their order


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Writes a uint8 tensor in the IDX format MNIST uses (big-endian header, then bytes)."""
    array = array.to(torch.uint8).contiguous()
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def make_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: class k lights a 7x7 block at one of 10 places, over noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 28, 28), generator=g)
    for k in range(10):
        row, col = 2 + 8 * (k // 4), 2 + 8 * (k % 4)
        images[labels == k, row : row + 7, col : col + 7] += 180
    return images.clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def write_dataset(root: Path, folder: str = "MNIST", n_train: int = TINY_TRAIN, n_test: int = TINY_TEST) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = make_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def session_root(factory: pytest.TempPathFactory) -> Path:
    """pytest's base temp folder of this session, shared by its xdist workers (pytest-N/); pytest
    removes it after a passing run (tmp_path_retention_policy = "failed" in pyproject.toml)."""
    root = factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


# Where forked processes write their output: the session's base temp folder (set by _scratch).
SCRATCH: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def _scratch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing the suite writes stays in the system temp folder: forked processes' logs,
    torch.compile's cache and every temporary file (torchrun's `torchelastic_*`, one per agent;
    multiprocessing's `pymp-*`) go under the session's base temp folder."""
    import tempfile

    global SCRATCH
    SCRATCH = session_root(tmp_path_factory)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(SCRATCH / "inductor")
    # TMPDIR for every child (subprocesses copy os.environ, cli_env included); tempfile.tempdir for
    # this process and what it forks (tempfile read TMPDIR once, when pytest made its base folder).
    (temp := SCRATCH / "tmp").mkdir(exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(temp)
    # What collection imported (torch, the trainer, the tests: about 300,000 objects) lives as long
    # as the worker: out of the garbage collector's sight, each collection (Trainer.close makes one
    # per run) costs milliseconds instead of a tenth of a second.
    gc.freeze()


def build_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that `build` fills once per test session, however many pytest-xdist workers ask
    for it: the first one builds it under a file lock, the others wait and reuse it. (Session
    fixtures are per worker, and xdist's `loadgroup`, which could keep their users on one worker,
    silently stopped grouping with pytest 9.2: pytest-dev/pytest-xdist#1386.)"""
    root = session_root(factory)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --data-dir with a tiny MNIST (1,536 train / 1,001 test images)."""
    return build_once(tmp_path_factory, "tiny_data", write_dataset)


@pytest.fixture(scope="session")
def real_data() -> Path:
    raw = REAL_DATA / "MNIST" / "raw"
    if not (raw / "t10k-images-idx3-ubyte").is_file():
        pytest.fail(f"real MNIST not found in {raw}: set TRAINER_MNIST_DIR or provide ../shared/data")
    return REAL_DATA


@pytest.fixture(scope="session")
def mnist_1_epoch(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default recipe for 1 epoch on real MNIST (98.2% on the test split): its run folder.
    Shared by the photo tests and the recorded reference (tests/reference/mnist_1_epoch.json)."""

    def build(out: Path) -> None:
        args = ["--data-dir", str(real_data), "--output-dir", str(out), "--epochs", "1", "--progress", "plain"]
        assert main_in_process(args) == 0

    return build_once(tmp_path_factory, "mnist_1_epoch", build) / "mnist"


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (`step_*` checkpoints, `best`, metrics.jsonl, curves.jsonl) of 2 epochs on the
    tiny data, trained once per session and shared by the evaluate, predict and plot tests."""

    def build(out: Path) -> None:
        assert main_in_process(tiny_args(tiny_data, out, "--cpu")) == 0

    return build_once(tmp_path_factory, "tiny_run", build) / "mnist"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    codes: list[int] = field(default_factory=list)  # every process's exit code (forked runs)


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Runs `trainer.cli.main(args)` in this process (one torch import for the whole suite)."""
    from trainer import cli

    monkeypatch.setenv("TRAINER_OFFLINE", "1")
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)

    def run(args: list[str], main=cli.main) -> Result:
        reset_accelerate()
        capsys.readouterr()
        code = main(args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    yield run
    reset_accelerate()


def main_in_process(args: list[str]) -> int:
    """`trainer.cli.main(args)` here, for fixtures that cannot use `run_main`."""
    from trainer import cli

    old = os.environ.get("TRAINER_OFFLINE")
    os.environ["TRAINER_OFFLINE"] = "1"
    try:
        reset_accelerate()
        return cli.main(args)
    finally:
        reset_accelerate()
        if old is None:
            del os.environ["TRAINER_OFFLINE"]
        else:
            os.environ["TRAINER_OFFLINE"] = old


def reset_accelerate() -> None:
    """accelerate keeps process-wide state; tests that build Accelerators with other settings reset it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """Fast flags for the tiny data: small batches, short runs, plain output, validation on the test
    split (--val-split 0: the tiny training split is smaller than the default hold-out)."""
    return [
        "--data-dir", str(data_dir), "--output-dir", str(out), "--batch-size", "64",
        "--eval-batch-size", "128", "--epochs", "2", "--progress", "plain", "--val-split", "0", *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(TRAINER_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def wait_for(predicate: Callable[[], bool], timeout: float = 600.0) -> None:
    """Polls `predicate` until it is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)


@pytest.fixture(scope="session")
def unbroken_2proc(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-process (gloo) run, forked with torchrun's environment: 3 epochs of 12 steps, a
    checkpoint every 5 steps, all kept; its stdout is kept beside it. Shared by the schedule,
    exact-count and resume tests."""

    def build(out: Path) -> None:
        args = tiny_args(tiny_data, out, "--epochs", "3", "--save-every", "5", "--keep-last", "100")
        result = fork_trainer(args, nproc=2)
        assert result.returncode == 0, result.stderr
        (out / "mnist" / "stdout.txt").write_text(result.stdout)

    return build_once(tmp_path_factory, "unbroken2", build) / "mnist"


# ---------------------------------------------------------------- forked processes
# Starting a Python process that imports torch costs 40 to 60 s on the 2-core CI machine, so
# most multi-process tests fork this process (torch already imported) instead of spawning
# torchrun. The children are real processes: their own address space, a real gloo process
# group through torchrun's environment variables (all the trainer sees of torchrun), real
# SIGKILLs. One test still goes through a real launcher, `accelerate launch`, end to end.


def _run_child(target: Callable[[list[str]], int], args: list[str], env: dict[str, str], out: Path) -> None:
    """In a forked child: torchrun's environment, stdout/stderr to files, target(args), _exit."""
    code = 1
    try:
        for stream, name in ((1, "out"), (2, "err")):
            fd = os.open(out.with_suffix(f".{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, stream)
            os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
            del os.environ[key]
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        reset_accelerate()
        try:
            code = target(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def _cli_main(args: list[str]) -> int:
    from trainer import cli

    return cli.main(args)


@dataclass
class Forked:
    """Processes forked by `fork_processes`: their pids and where their output goes."""

    pids: list[int]
    logs: Path
    codes: dict[int, int] = field(default_factory=dict)

    def poll(self) -> bool:
        """True when every process has exited."""
        for pid in self.pids:
            if pid not in self.codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.codes[pid] = os.waitstatus_to_exitcode(status)
        return len(self.codes) == len(self.pids)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.pids:
            if pid not in self.codes:
                os.kill(pid, sig)

    def wait(self, timeout: float = 900) -> Result:
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                self.kill()
                while not self.poll():
                    time.sleep(0.01)
                raise TimeoutError(f"forked processes still running after {timeout} s: {self.read(0)}")
            time.sleep(0.01)
        codes = [self.codes[pid] for pid in self.pids]
        # The run's exit code: rank 0's, unless another rank failed where rank 0 did not.
        code = codes[0] if codes[0] != 0 else next((c for c in codes if c != 0), 0)
        return Result(code, self.read(0, "out"), self.read(0, "err"), codes)

    def read(self, rank: int, name: str = "err") -> str:
        path = self.logs / f"rank{rank}.{name}"
        return path.read_text() if path.exists() else ""


def fork_processes(
    args: list[str] | Callable[[int], list[str]],
    nproc: int = 1,
    target: Callable[[list[str]], int] = _cli_main,
    logs: Path | None = None,
    env: dict[str, str] | None = None,
    machines: int = 1,
) -> Forked:
    """Starts `target(args)` (default: the trainer's CLI) in `nproc` forked processes with the
    environment torchrun gives its workers (none for nproc=1: a plain `python -m trainer`).

    `args` may be a function of the rank (machines that differ, say in their folders), and
    `machines` spreads the processes over that many simulated machines (torchrun --nnodes), each
    with its own local ranks."""
    import tempfile

    # Imported here, once, so that no child pays for importing accelerate and the rest again.
    import trainer.engine  # noqa: F401
    import trainer.evaluate  # noqa: F401

    logs = Path(tempfile.mkdtemp(prefix="forked-", dir=SCRATCH)) if logs is None else logs
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    pids = []
    per_machine = nproc // machines
    for rank in range(nproc):
        child_env = {"TRAINER_OFFLINE": "1", **(env or {})}
        if nproc > 1:
            child_env.update(RANK=str(rank), LOCAL_RANK=str(rank % per_machine), WORLD_SIZE=str(nproc),
                             LOCAL_WORLD_SIZE=str(per_machine), GROUP_RANK=str(rank // per_machine),
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(target, args(rank) if callable(args) else args, child_env, logs / f"rank{rank}")
        pids.append(pid)
    return Forked(pids, logs)


def fork_trainer(args: list[str], nproc: int = 1, timeout: float = 900, cpu: bool = True, **kw) -> Result:
    """`python -m trainer ARGS` (nproc=1) or `torchrun --nproc_per_node N -m trainer --cpu ARGS`
    (gloo), in forked processes; returns rank 0's output and the run's exit code."""
    return fork_processes(["--cpu", *args] if nproc > 1 and cpu else args, nproc, **kw).wait(timeout)
