"""Start a pool of N tiny models, shrink it to 2, print the longest event-loop stalls.

Run by test_shrink_stall.py as a process of its own, so that it can adopt orphans as
`modelpool serve` does (adoption is process-wide: not for the test runner itself).
Prints one JSON object: "start_stall" and "stall", the longest turns of the loop while
the pool started and while it shrank (seconds), "seconds" the shrink took, and "size".
"""

from __future__ import annotations

import json
import sys

import trio

from modelpool import PoolConfig, open_pool
from modelpool.process.reaper import Reaper

# A model that costs almost nothing: the ready line, then an answer per request.
TINY = ["sh", "-c", 'echo "ready: Model-initialized"; while read line; do echo "result: {}"; done']
TICK = 0.001


class Ticker:
    """The longest gap between two wake-ups of a task that sleeps a millisecond."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.scope = trio.CancelScope()  # cancelled to stop measuring

    async def run(self) -> None:
        with self.scope:
            last = trio.current_time()
            while True:
                await trio.sleep(TICK)
                now = trio.current_time()
                self.longest = max(self.longest, now - last)
                last = now


async def main(size: int, adopt: bool) -> None:
    config = PoolConfig(model_cmd=TINY, workers=size, init_timeout=60)
    starting, shrinking = Ticker(), Ticker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(starting.run)
        await trio.sleep(0.1)
        async with open_pool(config, Reaper(adopt_orphans=adopt)) as pool:
            await pool.wait_ready()
            starting.scope.cancel()
            nursery.start_soon(shrinking.run)
            await trio.sleep(0.1)
            started = trio.current_time()
            await pool.operations.scale(2)
            seconds = trio.current_time() - started
            shrinking.scope.cancel()
            size = len(pool.workers)
    figures = {"start_stall": starting.longest, "stall": shrinking.longest}
    print(json.dumps({**figures, "seconds": seconds, "size": size}))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2] == "adopt")
