"""Start a pool of N tiny models, shrink it to 2, print the longest event-loop stall.

Run by test_shrink_stall.py as a process of its own, so that it can adopt orphans as
`modelpool serve` does (adoption is process-wide: not for the test runner itself).
Prints one JSON object: {"stall": seconds, "seconds": the shrink's, "size": after}.
"""

from __future__ import annotations

import json
import sys

import trio

from modelpool import PoolConfig, open_pool
from modelpool.reaper import Reaper

# A model that costs almost nothing: the ready line, then an answer per request.
TINY = ["sh", "-c", 'echo "ready: Model-initialized"; while read line; do echo "result: {}"; done']
TICK = 0.001


async def main(size: int, adopt: bool) -> None:
    config = PoolConfig(model_cmd=TINY, workers=size, init_timeout=60)
    async with open_pool(config, Reaper(adopt_orphans=adopt)) as pool:
        await pool.wait_ready()
        longest = 0.0
        done = trio.Event()

        async def ticker() -> None:
            nonlocal longest
            last = trio.current_time()
            while not done.is_set():
                await trio.sleep(TICK)
                now = trio.current_time()
                longest = max(longest, now - last)
                last = now

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0.1)
            started = trio.current_time()
            await pool.operations.scale(2)
            seconds = trio.current_time() - started
            done.set()
        print(json.dumps({"stall": longest, "seconds": seconds, "size": len(pool.workers)}))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2] == "adopt")
