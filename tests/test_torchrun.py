"""Two machines for real: two torchrun agents (--nnodes 2, one process each) on 127.0.0.1: they
train and exit soon after their last line, and refuse together a checkpoint one cannot see."""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, free_port, tiny_args
from test_exit import run_timed


def two_agents(args_of_node, timeout: float = 600) -> tuple[list[int], list[str], list[float]]:
    """Runs `torchrun --nnodes 2 --node_rank R -m trainer --cpu ARGS` for R = 0, 1 at once; returns
    their exit codes, their output (stdout and stderr) and the seconds from each one's last line to
    its exit."""
    port = str(free_port())
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
         "-m", "trainer", "--cpu", *args_of_node(node)]
        for node in (0, 1)
    ]  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        ended = list(pool.map(lambda cmd: run_timed(cmd, REPO, timeout), commands))
    return [e[0] for e in ended], [e[1] for e in ended], [e[2] for e in ended]


# torch's own race (pytorch/pytorch#69520, open): when the agent that hosts the store is the last to
# reach its exit barrier, it can exit before the other agent hears the barrier end; that agent then
# logs this error and still exits 0. It happens after every worker has exited; the trainer cannot
# touch it. 1 run in 10 here with both cores busy.
TCPSTORE_WARNING = r"^\[W\S* \S* TCPStore\.cpp:\d+\] \[c10d\] recvValueWithTimeout failed.*\n"
CPP_FRAMES = r"(?:(?:Exception raised|frame #|<omitting).*\n)*"
AGENT_LOG = r"E\S* \S* \d+ \S*/elastic/agent/server/api\.py:(\d+)\] "
EXIT_BARRIER_RACE = re.compile(
    rf"{TCPSTORE_WARNING}{CPP_FRAMES}"
    rf"|^{AGENT_LOG}Error waiting on exit barrier.*\n(?:E\S* \S* \d+ \S*api\.py:\1\] .*\n)*",
    re.MULTILINE,
)


def without_exit_barrier_race(output: str) -> str:
    return EXIT_BARRIER_RACE.sub("", output)


def test_the_exit_barrier_race_filter_removes_only_that_log():
    agent = "E1207 13:01:30.836000 24490 .venv/torch/distributed/elastic/agent/server/api.py:1008] "
    race = (
        "[W1207 13:01:30.792899623 TCPStore.cpp:138] [c10d] recvValueWithTimeout failed on SocketImpl(fd=3)\n"
        "Exception raised from recvBytes at /__w/pytorch/c10d/Utils.hpp:790 (most recent call first):\n"
        "frame #0: c10::Error::Error() + 0x9d (0x7ff9bc4b460d in libc10.so)\n"
        "<omitting python frames>\n"
        "frame #34: _start + 0x21 (0x564bad7a6081 in python)\n"
        f"{agent}Error waiting on exit barrier. Elapsed: 0.02 seconds\n"
        f"{agent}Traceback (most recent call last):\n"
        f"{agent}torch.distributed.DistNetworkError: Failed to recv, got 0 bytes.\n"
    )
    ours = 'epoch 1/1 | loss 2.3\nTraceback (most recent call last):\n  File "x.py"\n'
    assert without_exit_barrier_race(ours + race) == ours
    assert without_exit_barrier_race(race + ours) == ours
    assert without_exit_barrier_race(ours) == ours


@pytest.mark.slow
def test_two_torchrun_agents_train_then_refuse_a_checkpoint_one_machine_cannot_see(tiny_data, tmp_path):
    shared = tmp_path / "shared"
    recipe = ["--epochs", "1", "--limit-train-batches", "3"]
    codes, outputs, after_last_line = two_agents(lambda node: tiny_args(tiny_data, shared, *recipe))
    assert codes == [0, 0], outputs
    ours = [without_exit_barrier_race(o) for o in outputs]
    assert not any("terminate called" in o or "Traceback" in o for o in ours), outputs
    assert max(after_last_line) < 30, f"{after_last_line} s from the last line to the exit"  # no hang in teardown
    rows = [json.loads(line) for line in (shared / "mnist" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["num_processes"] == 2 and rows[0]["valid_seen"] == 1001

    def resume(node: int) -> list[str]:  # machine 1 has no shared storage: its own, empty folder
        out = shared if node == 0 else tmp_path / "local1"
        return tiny_args(tiny_data, out, *recipe, "--resume", "latest")

    started = time.monotonic()
    codes, errors, _ = two_agents(resume)  # the process group's timeout is 30 min: they must not wait for it
    print(f"both agents ended {time.monotonic() - started:.1f} s after they started")
    # torchrun itself exits 1 when a worker fails (the worker's own code, 2, is in its report).
    assert codes == [1, 1], errors
    assert "trainer: error: process 1 could not read checkpoint step_0000003" in errors[0]
    assert "trainer: error: [rank 1] cannot read checkpoint step_0000003" in errors[1]
    assert all("storage that every machine can read" in e for e in errors)
    assert all("exitcode  : 2" in e for e in errors), errors  # torchrun's report of the worker's code
