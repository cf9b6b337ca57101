"""Shrinking a big pool keeps the event loop responsive: no turn of it takes long.

Every request, probe and heartbeat waits while one turn of the loop runs. Stopping
hundreds of models used to make turns of a tenth of a second and more (256 -> 2) and
of seconds (1024 -> 2), growing with the square of the pool's size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

PROBE = Path(__file__).parent / "shrink_probe.py"
STALL_LIMIT = 0.05  # seconds; a quiet machine stays under 10 ms, the old code took 0.1 to 0.3 s


@pytest.mark.parametrize("reaper", ["adopt", "tokens"])
async def test_shrinking_256_models_to_2_never_stalls_the_event_loop(reaper: str) -> None:
    done = await trio.run_process(
        [sys.executable, str(PROBE), "256", reaper], capture_stdout=True, capture_stderr=True
    )
    figures = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert figures["size"] == 2
    assert figures["stall"] < STALL_LIMIT, figures
