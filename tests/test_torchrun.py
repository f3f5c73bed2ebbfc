"""Two machines for real: two torchrun agents (--nnodes 2, one process each) on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_env, free_port, tiny_args


def two_agents(args_of_node, timeout: float = 600) -> tuple[list[int], list[str], float]:
    """Starts `torchrun --nnodes 2 --node_rank R -m trainer --cpu ARGS` for R = 0, 1; returns their
    exit codes, their stderr and the seconds until both ended."""
    port = str(free_port())
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               "-m", "trainer", "--cpu", *args_of_node(node)]  # fmt: skip
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True))  # fmt: skip
    started = time.monotonic()
    errors = []
    try:
        for agent in agents:
            errors.append(agent.communicate(timeout=timeout)[1])
    finally:
        for agent in agents:
            agent.kill()
    return [a.returncode for a in agents], errors, time.monotonic() - started


@pytest.mark.slow
def test_two_torchrun_agents_train_then_refuse_a_checkpoint_one_machine_cannot_see(tiny_data, tmp_path):
    shared = tmp_path / "shared"
    recipe = ["--epochs", "1", "--limit-train-batches", "3"]
    codes, errors, _ = two_agents(lambda node: tiny_args(tiny_data, shared, *recipe))
    assert codes == [0, 0], errors
    rows = [json.loads(line) for line in (shared / "mnist" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["num_processes"] == 2 and rows[0]["valid_seen"] == 1001

    def resume(node: int) -> list[str]:  # machine 1 has no shared storage: its own, empty folder
        out = shared if node == 0 else tmp_path / "local1"
        return tiny_args(tiny_data, out, *recipe, "--resume", "latest")

    codes, errors, seconds = two_agents(resume)
    print(f"both agents ended {seconds:.1f} s after they started")  # the process group's timeout is 30 min
    # torchrun itself exits 1 when a worker fails (the worker's own code, 2, is in its report).
    assert codes == [1, 1], errors
    assert "trainer: error: process 1 could not read checkpoint step_0000003" in errors[0]
    assert "trainer: error: [rank 1] cannot read checkpoint step_0000003" in errors[1]
    assert all("storage that every machine can read" in e for e in errors)
    assert all("exitcode  : 2" in e for e in errors), errors  # torchrun's report of the worker's code
