"""Start a pool of N tiny models, shrink it to 2, print the longest event-loop stalls.

Run by test_shrink_stall.py and benchmarks/stalls.py as a process of its own, so that
it can adopt orphans as `modelpool serve` does (adoption is process-wide: not for the
test runner itself). Prints one JSON object: "start_stall" and "stall", the longest
turns of the loop while the pool started and while it shrank (seconds by the clock),
"start_stall_cpu" and "stall_cpu", the most CPU time the loop's thread spent in one
turn in each besides the collector's passes (seconds), "collector_cpu" the longest pass
of Python's garbage collector (CPU seconds), "seconds" the shrink took, and "size".

The CPU time of a turn is the work the service's code did in it, whatever else the
machine does: on a quiet machine it is about the turn's length, but on a busy one the
clock adds the time the process waited for a core, which a test cannot bound. The
collector's pass over the heap of 1024 workers (65 ms on a quiet machine, 0.14 s on a
busy one) is Python's, the same for any code that keeps 1024 workers: it is measured
apart. The clock's figures are what benchmarks/stalls.py reports.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import trio

from modelpool import PoolConfig, open_pool
from modelpool.process.reaper import Reaper

# A model that costs almost nothing: the ready line, then an answer per request.
TINY = ["sh", "-c", 'echo "ready: Model-initialized"; while read line; do echo "result: {}"; done']
TICK = 0.001


class Collector:
    """The CPU time of this thread spent in Python's garbage collector, from gc.callbacks."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self._started = 0.0
        gc.callbacks.append(self._phase)

    def _phase(self, phase: str, info: dict[str, int]) -> None:
        now = time.thread_time()
        if phase == "start":
            self._started = now
        else:
            self.total += now - self._started
            self.longest = max(self.longest, now - self._started)


COLLECTOR = Collector()


class Ticker:
    """The longest gap between two wake-ups of a task that sleeps a millisecond, by the
    clock (`longest`), and in CPU time of the loop's thread outside the collector
    (`longest_cpu`)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_cpu = 0.0
        self.scope = trio.CancelScope()  # cancelled to stop measuring

    async def run(self) -> None:
        with self.scope:
            last, last_cpu = trio.current_time(), time.thread_time() - COLLECTOR.total
            while True:
                await trio.sleep(TICK)
                now, now_cpu = trio.current_time(), time.thread_time() - COLLECTOR.total
                self.longest = max(self.longest, now - last)
                self.longest_cpu = max(self.longest_cpu, now_cpu - last_cpu)
                last, last_cpu = now, now_cpu


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
    figures |= {"start_stall_cpu": starting.longest_cpu, "stall_cpu": shrinking.longest_cpu}
    figures["collector_cpu"] = COLLECTOR.longest
    print(json.dumps({**figures, "seconds": seconds, "size": size}))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2] == "adopt")
