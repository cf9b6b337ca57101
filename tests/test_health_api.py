"""`pool.health()` is what `GET /healthz` answers: the same body and the same status.

docs/embedding.md says so; the library once returned a `(healthy, problem)` pair that
the route turned into its body on its own. Now the route is made from the library's
`Health`, and this holds them to each other on a real service, healthy and failing, and
keeps the pair's unpacking working for the callers written against it.
"""

from __future__ import annotations

import sys

import modelpool
from conftest import model3_config, running_server, wait_until
from modelpool import PoolConfig


async def test_a_healthy_pools_health_is_what_healthz_answers() -> None:
    async with running_server(model3_config(workers=1)) as server:
        await server.pool.wait_ready()
        response = await server.client.get("/healthz")
        health = server.pool.health()
        assert isinstance(health, modelpool.Health)
        assert (response.status_code, response.json()) == (health.http_status, health.body())
        assert (health.http_status, health.body()) == (200, {"status": "ok"})
        healthy, detail = health
        assert (healthy, detail, health.status) == (True, None, "ok")


async def test_a_failing_pools_health_is_what_healthz_answers() -> None:
    """A model that never starts, kept trying: unhealthy at once, with the reason."""
    config = PoolConfig(
        model_cmd=[sys.executable, "-c", "import sys; sys.exit(4)"],
        workers=1,
        keep_trying=True,
        backoff_initial=0.1,
        backoff_max=0.2,
    )
    async with running_server(config) as server:
        pool = server.pool
        await wait_until(lambda: not pool.health().healthy, 10, "the pool to be failing")
        response = await server.client.get("/healthz")
        health = pool.health()
        assert (response.status_code, response.json()) == (health.http_status, health.body())
        assert health.http_status == 503 and health.status == "failing"
        assert health.body() == {"status": "failing", "detail": health.detail}
        assert health.detail is not None and "exited with code 4" in health.detail
        healthy, detail = health  # as `pool.health()` was used before it had a type
        assert (healthy, detail) == (False, health.detail) and health[0] is False
