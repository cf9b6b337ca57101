"""--preload with a model that writes its results through another descriptor of its stdout.

A model may keep a pipe of its stdio under another descriptor: os.dup(1) before
os.dup2(2, 1) (a common way to keep library prints out of its results), or a file it
opened as /dev/stdout (on Linux, its fd 1's pipe opened again). Forked from a template,
each such descriptor is the template's pipe, which no worker reads: each child must get
its own there, as a plain start has it, or every request it gets times out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from conftest import hostile, predict_into
from modelpool import PoolConfig, open_pool

WORKERS = 4
REQUESTS = 5 * WORKERS


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("model", ["dup_stdout.py", "dev_stdout.py"])
async def test_every_child_answers_through_its_own_duplicate_of_stdout(
    model: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelpool.model")
    config = PoolConfig(
        model_cmd=hostile(model),
        workers=WORKERS,
        preload=True,
        timeout=3.0,
        model_stdout_level="INFO",  # a library's print on stdout would show in the log
        model_log_rate=None,
    )
    async with open_pool(config) as pool:
        await pool.wait_ready()
        template = pool.status()["template"]
        assert template["state"] == "ready", template  # forked, not started plainly
        outcomes: list = []
        async with trio.open_nursery() as nursery:
            for n in range(REQUESTS):
                nursery.start_soon(predict_into, pool, {"n": n}, outcomes)
        failed = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        assert not failed, failed[:3]
        assert sorted(outcome["n"] for outcome in outcomes) == list(range(REQUESTS))
        children = {worker.pid for worker in pool.workers}
        answered_by = {outcome["pid"] for outcome in outcomes}
        assert answered_by <= children  # each child answered its own requests
        assert all(parent_of(pid) == template["pid"] for pid in children)
    if model == "dup_stdout.py":  # its fd 1 is its stderr, as in a plain start
        printed = [r.getMessage() for r in caplog.records if "a library's print" in r.getMessage()]
        assert len(printed) == REQUESTS, printed
        assert all(" stderr: " in line for line in printed), printed
