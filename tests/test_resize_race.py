"""A resize while recycles surge: the pool ends at the size asked for, and stays there.

With --max-requests 1 every answer asks for a replacement, so a surge (a new model
starting beside the one it replaces) is almost always in flight. A resize that counted
the workers while one was must still leave exactly the size it reported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from conftest import running_server, scripted_config, wait_until
from modelpool.pool.pool import Pool

SLOW_START = {"SCRIPTED_INIT_SECONDS": "0.3"}  # so that a surge lasts a while


def serving(pool: Pool) -> int:
    """Workers that count towards the pool's size: neither a surge's trial nor retiring."""
    return sum(1 for w in pool.workers if w.retiring is None and not w.trial)


@asynccontextmanager
async def requests_flowing(url: str, clients: int = 3) -> AsyncIterator[list[int]]:
    """Clients that send their next request as soon as they have an answer; the statuses."""
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def user() -> None:
            while True:
                response = await client.post("/predict", json={"sleep": 0.02})
                statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(user)
            await wait_until(lambda: len(statuses) >= clients, 10, "the requests to flow")
            yield statuses
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("before", "after"), [(2, 1), (3, 2)])
async def test_a_resize_during_a_recycle_surge_ends_at_the_size_asked_for(
    before: int, after: int
) -> None:
    config = scripted_config(workers=before, max_requests=1, env=SLOW_START)
    async with running_server(config) as server:
        pool = server.pool
        await pool.wait_ready()
        async with requests_flowing(server.url) as statuses:
            await wait_until(lambda: any(w.trial for w in pool.workers), 10, "a surge")
            response = await server.client.post("/admin/scale", json={"workers": after})
            assert response.status_code == 200, response.text
            report = response.json()
            assert report["status"] == "done" and report["workers"] == after
            assert serving(pool) == after, [(w.index, w.retiring, w.trial) for w in pool.workers]
            answered = len(statuses)
            seen = set()
            with trio.move_on_after(3):  # recycles go on: the size must hold
                while True:
                    seen.add(serving(pool))
                    await trio.sleep(0.01)
            assert len(statuses) > answered + 10, "the requests stopped flowing"
        assert seen == {after}, f"asked for {after} worker(s), the pool had {sorted(seen)}"
        assert set(statuses) == {200}, statuses
        status = (await server.client.get("/status")).json()
        settled = [w for w in status["workers"] if w["retiring"] is None]
        assert len(settled) in (after, after + 1)  # + a surge's new model, perhaps


async def test_shrinking_the_worker_a_surge_replaces_does_not_leave_its_replacement_extra() -> None:
    """2 -> 1 while worker Y's replacement starts and X computes: the resize picks the
    idle Y, the one the surge replaces; the surge's new model must not stay beside X."""
    config = scripted_config(workers=2, max_requests=1, env=SLOW_START)
    async with running_server(config) as server:
        pool = server.pool
        await pool.wait_ready()
        answers: list[httpx.Response] = []

        async def slow() -> None:
            answers.append(await server.client.post("/predict", json={"sleep": 2}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await wait_until(lambda: any(w.state == "busy" for w in pool.workers), 5, "busy")
            fast = await server.client.post("/predict", json={"n": 1})  # its model recycles
            assert fast.status_code == 200, fast.text
            await wait_until(lambda: any(w.trial for w in pool.workers), 5, "the surge")
            response = await server.client.post("/admin/scale", json={"workers": 1})
        assert response.status_code == 200, response.text
        assert response.json()["workers"] == 1
        assert [a.status_code for a in answers] == [200]
        await trio.sleep(1)  # the surge is long over
        assert serving(pool) == 1, [(w.index, w.state, w.retiring) for w in pool.workers]
        assert len(pool.workers) == 1
