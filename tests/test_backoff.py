"""The back-off between starts of a model that keeps failing: capped, for any count.

A broken model fails every `backoff_max` seconds; on the defaults (30 s) it passes
1,025 failures in a row after about 8.5 hours, where 2 ** 1024 no longer fits a float.
"""

from __future__ import annotations

import sys

import pytest

from conftest import running_server, wait_until
from modelpool import PoolConfig

BROKEN = [sys.executable, "-c", "import sys; sys.exit(3)"]  # fails every start


@pytest.mark.parametrize("failures", [1025, 1026, 5000, 10**6, 10**30])
def test_the_back_off_stays_at_its_cap_however_many_failures(failures: int) -> None:
    assert PoolConfig().backoff(failures) == 30.0


def test_a_cap_far_above_the_start_is_reached_without_overflow() -> None:
    wide = PoolConfig(backoff_initial=1e-300, backoff_max=1e300)  # 2 ** 1993 apart
    assert wide.backoff(1025) == 1e-300 * 2.0**1000 * 2.0**24  # still doubling
    assert [wide.backoff(n) for n in (1995, 5000, 10**30)] == [1e300] * 3


def test_the_back_off_doubles_from_its_start_up_to_its_cap() -> None:
    config = PoolConfig(backoff_initial=0.5, backoff_max=30.0)
    assert [config.backoff(n) for n in range(9)] == [0.0, 0.5, 1, 2, 4, 8, 16, 30, 30]
    tiny = PoolConfig(backoff_initial=5e-324, backoff_max=1.0)
    assert tiny.backoff(2) == 1e-323 and tiny.backoff(1080) == 1.0


async def test_a_worker_past_1025_failures_keeps_restarting_and_status_answers() -> None:
    config = PoolConfig(
        model_cmd=BROKEN, workers=1, backoff_initial=0.05, backoff_max=0.1, keep_trying=True
    )
    async with running_server(config) as server:
        worker = server.pool.workers[0]
        await wait_until(lambda: worker.restarts >= 1, 10, "a first restart")
        worker._failures_in_a_row = 10**6  # as after years of failing: no need to wait
        restarts = worker.restarts
        response = await server.client.get("/status")
        assert response.status_code == 200, response.text
        assert response.json()["workers"][0]["next_backoff"] == 0.1
        await wait_until(lambda: worker.restarts >= restarts + 2, 10, "two more restarts")
        assert not server.pool.stopped.is_set()
        assert worker._failures_in_a_row > 10**6  # it kept counting, and kept going
        assert (await server.client.get("/healthz")).status_code in (200, 503)
