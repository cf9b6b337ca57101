"""Starting and shrinking a big pool keep the event loop responsive.

Every request, probe and heartbeat waits while one turn of the loop runs. Stopping
hundreds of models used to make turns of a tenth of a second and more (256 -> 2) and
of seconds (1024 -> 2), growing with the square of the pool's size; starting 1024
made turns of half a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from modelpool import PoolConfig, open_pool
from modelpool.pool.waves import CHANGE_AT_ONCE

PROBE = Path(__file__).parent / "shrink_probe.py"
# The bounds are on the CPU time the loop's thread spent in its longest turn, besides
# the collector's passes (see shrink_probe.py): the clock's length of a turn grows with
# whatever else the machine runs (a start of 1024 took turns of 0.3-1.1 s by the clock
# with both cores taken by other runs, the old code's 0.8-4 s), the CPU time does not.
# The clock's figures are benchmarks/stalls.py's (docs/benchmarks.md).
# Shrinking to 2, by pool size: 2-7 ms of CPU, quiet machine or busy; the old code took
# 0.13-0.4 s at 256 and 4.6-12.8 s at 1024.
SHRINK_STALL = {256: 0.1, 1024: 1.0}
# Starting 1024: 0.13 s with both cores busy (about 50 ms on a quiet machine); the old
# code, which recounted the ready models over every worker at each change, 0.6 s or more.
START_STALL = 0.3


@pytest.mark.parametrize(("size", "reaper"), [(256, "tokens"), (1024, "adopt")])
async def test_starting_and_shrinking_a_big_pool_never_stalls_the_event_loop(
    size: int, reaper: str
) -> None:
    done = await trio.run_process(
        [sys.executable, str(PROBE), str(size), reaper], capture_stdout=True, capture_stderr=True
    )
    figures = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert figures["size"] == 2
    assert figures["stall_cpu"] < SHRINK_STALL[size], figures
    if size == 1024:
        assert figures["start_stall_cpu"] < START_STALL, figures


SLOW_TINY = ["sh", "-c", 'sleep 0.2; echo "ready: Model-initialized"; while read l; do :; done']


async def test_a_resize_starts_and_stops_a_few_models_at_a_time() -> None:
    """Hundreds of workers started or stopped at once would take their steps in the
    same turns of the loop; a resize changes CHANGE_AT_ONCE at a time instead."""
    async with open_pool(PoolConfig(model_cmd=SLOW_TINY, workers=2)) as pool:
        await pool.wait_ready()
        most = {"starting": 0, "stopping": 0}

        async def watch() -> None:
            while True:
                starting = [w for w in pool.workers if w.trial and not w.became_ready.is_set()]
                stopping = [w for w in pool.workers if w.retiring is not None]
                most["starting"] = max(most["starting"], len(starting))
                most["stopping"] = max(most["stopping"], len(stopping))
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            grown = await pool.operations.scale(40)
            shrunk = await pool.operations.scale(2)
            nursery.cancel_scope.cancel()
        assert len(grown["added"]) == 38 and len(shrunk["retired"]) == 38
        assert pool.local_ready == len(pool.workers) == 2
        assert 2 <= most["starting"] <= CHANGE_AT_ONCE, most
        assert 2 <= most["stopping"] <= CHANGE_AT_ONCE, most
