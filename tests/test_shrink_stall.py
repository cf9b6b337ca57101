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

PROBE = Path(__file__).parent / "shrink_probe.py"
SHRINK_STALL = 0.05  # seconds; a quiet machine stays near 10 ms, the old code took 0.1 s to 5 s
START_STALL = 0.25  # 1024 models: about 50 ms on a quiet machine, the old code over 0.5 s


@pytest.mark.parametrize(("size", "reaper"), [(256, "tokens"), (1024, "adopt")])
async def test_starting_and_shrinking_a_big_pool_never_stalls_the_event_loop(
    size: int, reaper: str
) -> None:
    done = await trio.run_process(
        [sys.executable, str(PROBE), str(size), reaper], capture_stdout=True, capture_stderr=True
    )
    figures = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert figures["size"] == 2
    assert figures["stall"] < SHRINK_STALL, figures
    if size == 1024:
        assert figures["start_stall"] < START_STALL, figures
