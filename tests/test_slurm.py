"""On a real Slurm (slurmctld, slurmd and munged from Debian's slurm-wlm and munge, started here on
localhost): the repository's CPU batch script, preempted mid-epoch, then warned before its time
limit, requeues itself each time and ends bitwise equal to an unbroken run, every step trained once.

Skipped where Slurm is not installed, unless TRAINER_REQUIRE_SLURM=1 (CI sets it): then a Slurm
that cannot start fails the tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env, fork_trainer, free_port, main_in_process, wait_for
from test_resume import assert_same_run

SCRIPT = REPO / "launch_configs" / "slurm" / "cpu.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A one-node Slurm cluster of this machine, in its own folder, ports and munge socket; the
    environment its commands need."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        if os.environ.get("TRAINER_REQUIRE_SLURM") == "1":
            pytest.fail(
                f"Slurm is required here but {', '.join(missing)} are missing (apt-get install slurm-wlm munge)"
            )
        pytest.skip(f"no Slurm here ({', '.join(missing)} missing)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    (root / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge.key").chmod(0o400)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=trainertest
SlurmctldHost={node}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
NodeName={node} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"/usr/sbin:{os.environ.get('PATH', '')}"}
    munge = ["munged", f"--socket={root}/munge.sock", f"--key-file={root}/munge.key", f"--pid-file={root}/munged.pid",
             f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge.seed", "--force"]  # fmt: skip
    try:
        for cmd in (munge, ["slurmctld"], ["slurmd", "-N", node]):
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=60)
        wait_for(lambda: "idle" in run(["sinfo", "-h", "-o", "%T"], env), timeout=60)
    except (subprocess.SubprocessError, OSError, TimeoutError) as exc:
        logs = "".join(p.read_text()[-1500:] for p in (root / "log").glob("*.log"))
        stop(root, env)
        pytest.fail(f"Slurm did not start ({exc}): {logs}")
    yield env
    stop(root, env)


def run(cmd: list[str], env: dict[str, str]) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout


def stop(root: Path, env: dict[str, str]) -> None:
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=60)
    for name in ("slurmd", "slurmctld", "munged"):
        pid = root / f"{name}.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid.read_text().split()[0]), signal.SIGTERM)


def submit(slurm: dict[str, str], out: Path, tiny_data: Path, *sbatch: str, stall_at: str, more: tuple = (),
           output: str = "slurm-%j.out") -> str:  # fmt: skip
    """The repository's CPU batch script: 2 tasks (its own --ntasks=2, standing in for 2 nodes), 3
    epochs of 12 steps on the tiny data (`more` flags change that), stalling in the step `stall_at`
    lists for each start (counted from the start: see tests/stall.py) until the test says go."""
    env = {**cli_env(), **slurm, "PYTHON": shutil.which("python") or "python3", "PYTHONPATH": str(REPO / "tests"),
           "STALL_AT_STEP": stall_at, "STALL_DIR": str(out)}  # fmt: skip
    args = ["--data-dir", str(tiny_data), "--val-split", "0", "--output-dir", str(out), "--batch-size", "64",
            "--epochs", "3", "--progress", "plain", "--model", "stall:blog_resnet", *more]  # fmt: skip
    cmd = ["sbatch", "--parsable", f"--output={out}/{output}", *sbatch, str(SCRIPT), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def output(out: Path, job: str) -> str:
    """The job's output file (stdout and stderr of every start), or "" before it exists."""
    log = out / f"slurm-{job}.out"
    return log.read_text() if log.exists() else ""


def job_state(slurm: dict[str, str], job: str) -> str:
    return run(["squeue", "-h", "-j", job, "-o", "%T"], slurm).strip()


def release_the_requeued(slurm: dict[str, str], job: str, out: Path, times: int, *update: str) -> list[str]:
    """Waits for the job's `times`-th requeue and starts it again at once, cutting Slurm's hold of
    requeued jobs short (as an admin can), with `update` (scontrol's KEY=VALUE). Returns the states
    (and reasons) squeue showed until the job was pending."""
    wait_for(lambda: output(out, job).count("requeued Slurm job") == times, timeout=300)
    return release(slurm, job, out, times, *update)


def release(slurm: dict[str, str], job: str, out: Path, times: int, *update: str) -> list[str]:
    seen: list[str] = []

    def pending() -> bool:
        state = run(["squeue", "-h", "-j", job, "-o", "%T (%r)"], slurm).strip()
        if state and state not in seen:
            seen.append(state)
        return state.startswith("PENDING")

    wait_for(pending, timeout=120)
    run(["scontrol", "update", f"JobId={job}", "StartTime=now", *update], slurm)
    wait_for(lambda: output(out, job).count("resumed from") == times, timeout=300)
    return seen


@pytest.fixture(scope="module")
def unbroken(tiny_data, tmp_path_factory) -> Path:
    """The same run, never stopped: 2 processes, without Slurm."""
    out = tmp_path_factory.mktemp("unbroken-slurm")
    args = ["--data-dir", str(tiny_data), "--val-split", "0", "--output-dir", str(out), "--batch-size", "64",
            "--epochs", "3", "--progress", "plain"]  # fmt: skip
    assert fork_trainer(args, nproc=2).returncode == 0
    return out / "mnist"


@pytest.mark.slow
def test_a_job_preempted_then_warned_of_its_time_limit_ends_as_an_unbroken_run(slurm, tiny_data, tmp_path, unbroken):
    """Its first start is preempted in step 15 (scancel --signal=USR1: what a preemption's grace
    signal does); its second is given a 1-minute time limit, which Slurm warns about (--signal=USR1@50)
    while the job waits in its third step; the third start finishes. Each warning saves at an agreed step and
    requeues the job; the run ends bitwise equal to one never stopped, every step trained once."""
    job = submit(slurm, tmp_path, tiny_data, "--signal=USR1@50", stall_at="15,3")
    wait_for(lambda: (tmp_path / "reached").exists(), timeout=300)  # in step 15 (epoch 2)
    signalled = time.monotonic()
    run(["scancel", "--signal=USR1", job], slurm)
    wait_for(lambda: "SIGUSR1 received" in output(tmp_path, job), timeout=120)
    (tmp_path / "go").touch()
    wait_for(lambda: "stopped by SIGUSR1; checkpoint saved" in output(tmp_path, job), timeout=300)
    saved = time.monotonic()
    states = release_the_requeued(slurm, job, tmp_path, 1, "TimeLimit=1")
    resumed = time.monotonic()
    print(f"squeue after the requeue: {' -> '.join(states)}")
    assert states[-1] == "PENDING (BeginTime)"  # the hold (docs/slurm.md)
    print(f"USR1 to checkpoint on disk: {saved - signalled:.1f} s (the stall in step 15 included); "
          f"to the resumed job: {resumed - saved:.1f} s (Slurm's 120 s hold cut short)")  # fmt: skip
    wait_for(lambda: output(tmp_path, job).count("SIGUSR1 received") == 2, timeout=180)  # Slurm's own warning
    (tmp_path / "go-1").touch()
    release_the_requeued(slurm, job, tmp_path, 2, "TimeLimit=UNLIMITED")
    wait_for(lambda: job_state(slurm, job) == "" and "done: 3 epochs" in output(tmp_path, job), timeout=300)
    text = output(tmp_path, job)
    run_folder = tmp_path / "mnist"
    assert_same_run(unbroken, run_folder)  # bitwise: weights, metrics, every step's loss and LR
    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [12, 24, 36] and all(r["train_samples"] == 1536 for r in rows)
    assert text.count("stopped by SIGUSR1; checkpoint saved") == 2 and text.count("requeued Slurm job") == 2
    # Slurm's own lines, which docs/slurm.md says to expect after a requeue.
    assert len(re.findall(rf"\*\*\* JOB {job} ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE \*\*\*", text)) == 2
    assert text.count("Exited with exit code 138") >= 2
    first, second = re.findall(r"checkpoint saved: (\S+)", text)
    assert 15 <= int(first[-7:]) < 24 and f"resumed from {first}" in text  # mid-epoch 2, agreed
    assert int(first[-7:]) < int(second[-7:]) < 36 and f"resumed from {second}" in text


@pytest.fixture(scope="module")
def parent(tiny_data, tmp_path_factory) -> Path:
    """A finished run of the stall model (1 epoch of 2 steps): the checkpoint jobs start from."""
    out = tmp_path_factory.mktemp("parent-slurm")
    args = ["--data-dir", str(tiny_data), "--val-split", "0", "--output-dir", str(out), "--batch-size", "64",
            "--epochs", "1", "--limit-train-batches", "2", "--progress", "plain",
            "--model", "stall:blog_resnet"]  # fmt: skip
    assert main_in_process(args) == 0
    return out / "mnist"


def state_of(run_folder: Path) -> dict:
    from trainer import checkpoint as ckpt

    return json.loads((ckpt.find_latest(run_folder) / ckpt.STATE_NAME).read_text())


@pytest.mark.slow
def test_an_array_from_a_checkpoint_trains_a_run_per_task_and_a_cancelled_task_resumes_as_advised(
    slurm, tiny_data, tmp_path, parent
):
    """An array of 2 one-process tasks, both started from a checkpoint (--init-from), each in its own
    run folder (mnist-0, mnist-1). Task 0 is cancelled (plain scancel: SIGTERM) in its step 5: it
    saves and says how to continue, `scontrol requeue JOB_0`; done so, the task resumes its own
    checkpoint (no second start from the parent) and ends bitwise equal to task 1, never stopped."""
    more = ("--epochs", "1", "--limit-train-batches", "8", "--init-from", str(parent))
    array = submit(slurm, tmp_path, tiny_data, "--array=0-1", "--ntasks=1", stall_at="5", more=more,
                   output="slurm-%A_%a.out")  # fmt: skip
    task0, task1 = f"{array}_0", f"{array}_1"
    wait_for(lambda: (tmp_path / "reached").exists(), timeout=300)  # task 0 in step 5 (task 1 never stalls)
    run(["scancel", task0], slurm)
    wait_for(lambda: "SIGTERM received" in output(tmp_path, task0), timeout=120)
    (tmp_path / "go").touch()
    wait_for(lambda: "resume with: " in output(tmp_path, task0) and job_state(slurm, task0) == "", timeout=120)
    advice = next(li for li in output(tmp_path, task0).splitlines() if li.startswith("resume with: "))
    assert advice.startswith(f"resume with: scontrol requeue {task0} (the job runs its script again"), advice
    assert f"or as a new job: sbatch [the same sbatch options] {SCRIPT} --data-dir {tiny_data} " in advice
    requeue = subprocess.run(advice.split()[2:5], env=slurm, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    release(slurm, task0, tmp_path, 1)
    done = lambda t: job_state(slurm, t) == "" and "done: 1 epoch" in output(tmp_path, t)  # noqa: E731
    wait_for(lambda: done(task0) and done(task1), timeout=300)
    text = output(tmp_path, task0)
    saved = re.findall(r"stopped by SIGTERM; checkpoint saved: (\S+)", text)
    assert len(saved) == 1 and f"resumed from {saved[0]}" in text
    assert text.count("init from ") == 1 and output(tmp_path, task1).count("init from ") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mnist")) == ["mnist-0", "mnist-1"]
    assert_same_run(tmp_path / "mnist-1", tmp_path / "mnist-0")
    lineage = state_of(tmp_path / "mnist-0")["lineage"]
    assert lineage == state_of(tmp_path / "mnist-1")["lineage"] and lineage["parent"].startswith(str(parent))


def test_the_batch_scripts_ask_for_the_warning_signal_and_continue_where_they_were():
    """The GPU scripts cannot run here: they are checked for what they must hold."""
    for script in sorted((REPO / "launch_configs" / "slurm").glob("*.sbatch")):
        text = script.read_text()
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script.name
        assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text, script.name
        assert "--requeue-signal USR1 --resume auto" in text, script.name
        assert 'set -- "$@" --run-name "$name-$SLURM_ARRAY_TASK_ID"' in text, script.name  # a run per array task
        assert ("torch.distributed.run" not in text) or 'trap "" USR1' in text, script.name  # torchrun ignores it


def test_a_requeue_that_fails_is_one_line_and_the_checkpoint_stays(run_main, tiny_data, tmp_path, monkeypatch):
    from conftest import tiny_args

    from trainer import checkpoint as ckpt
    from trainer import engine

    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'scontrol: error: Invalid job id specified' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # inside a Slurm job: USR1 is the requeue signal by default
    real_input, calls = engine.model_input, []

    def usr1_on_the_fifth_step(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_input(*a, **kw)

    monkeypatch.setattr(engine, "model_input", usr1_on_the_fifth_step)
    result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "2"))
    assert result.returncode == 128 + signal.SIGUSR1
    assert (
        "could not requeue Slurm job 4242 (scontrol: error: Invalid job id specified); the checkpoint is "
        "saved: submit the script again" in result.stdout
    )
    assert ckpt.step_of(ckpt.find_latest(tmp_path / "mnist")) == 5


def test_resume_auto_starts_fresh_then_continues_and_a_finished_run_stays_finished(run_main, tiny_data, tmp_path):
    from conftest import tiny_args

    args = [*tiny_args(tiny_data, tmp_path, "--epochs", "1", "--limit-train-batches", "2"), "--resume", "auto"]
    first = run_main(args)
    assert first.returncode == 0 and "resumed from" not in first.stdout, first.stderr
    again = run_main(args)
    assert again.returncode == 0 and "run already complete (1 epoch)" in again.stdout
    # Another recipe in the same run folder is refused, saying what to do; done so, a new run begins.
    longer = run_main([*args, "--epochs", "2"])
    advice = ("keeps its recipe (leave the flag out to continue it; a new run from its weights with a new recipe "
              "takes another --run-name and --init-from)")  # fmt: skip
    assert longer.returncode == 2 and advice in longer.stderr
    new = run_main([*args, "--epochs", "2", "--run-name", "longer", "--init-from", str(tmp_path / "mnist")])
    assert new.returncode == 0 and "init from " in new.stdout and "done: 2 epochs" in new.stdout, new.stderr


def test_a_wandb_run_keeps_its_id_across_requeues(tmp_path):
    """accelerate is given the run folder's W&B id each time (wandb itself is not installed here)."""
    from trainer.config import TrainConfig
    from trainer.runlog import RunLog

    class Accelerator:
        log_with, is_main_process, calls = ["wandb"], True, []

        def init_trackers(self, name, config, init_kwargs):
            self.calls.append(init_kwargs)

    acc = Accelerator()
    for _ in range(2):  # the first start, then the requeued job
        RunLog(acc, tmp_path / "run").start_trackers(TrainConfig())
    first, second = (call["wandb"] for call in acc.calls)
    assert first == second and first["resume"] == "allow" and len(first["id"]) == 16


def test_a_warning_during_start_up_stops_after_the_first_step(run_main, tiny_data, tmp_path, monkeypatch):
    """The time-limit warning can come while Python imports torch or reads the data: noted from the
    CLI's first line (its default action would end the process), it stops the run after a step."""
    from conftest import tiny_args

    from trainer import checkpoint as ckpt
    from trainer import runtime

    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        runtime.catch_early_warnings()
        os.kill(os.getpid(), signal.SIGUSR1)  # before the trainer exists
        result = run_main(tiny_args(tiny_data, tmp_path, "--epochs", "2"))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert result.returncode == 128 + signal.SIGUSR1, result.stderr
    assert "requeued Slurm job 77" in result.stdout
    assert ckpt.step_of(ckpt.find_latest(tmp_path / "mnist")) == 1
