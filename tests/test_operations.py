"""Live operations under sustained load: rolling reload, resize, recycling, memory limits.

Each test keeps several requests in flight all the time, 2-second ones included, and
asserts that not one of them failed while the operation ran.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from conftest import SCRIPTED, hostile, hostile_config, running_server, scripted_config, wait_until
from modelpool import PoolConfig, open_pool
from modelpool.core.kinds import RestartReason
from serverproc import server_process, wait_listening, wait_ready

SLOW_START = {"SCRIPTED_INIT_SECONDS": "0.5"}  # a new model takes a while, as real ones do
BROKEN = [sys.executable, "-c", "import sys; print('no model here', file=sys.stderr); sys.exit(3)"]
KEY = "admin-key"  # changing the model command over HTTP needs the API key
AUTH = {"Authorization": f"Bearer {KEY}"}  # sent by every client here; harmless without a key
JSON_TYPE = {"Content-Type": "application/json"}  # what /admin/* require, with a body or not


@dataclass
class Load:
    """What the clients of `sustained_load` got: every status, and who answered."""

    statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pids: list[tuple[float, int]] = field(default_factory=list)  # (answered at, model pid)


@asynccontextmanager
async def sustained_load(url: str, clients: int = 4, slow_every: int = 4) -> AsyncIterator[Load]:
    """`clients` clients, each sending its next request as soon as it has an answer;
    every `slow_every`-th request computes 2 s, the others 50 ms."""
    load = Load()
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as client:

        async def user(n: int) -> None:
            i = 0
            while True:
                i += 1
                seconds = 2.0 if (i + n) % slow_every == 0 else 0.05
                response = await client.post("/predict", json={"sleep": seconds, "n": i})
                load.statuses.append(response.status_code)
                if response.status_code == 200:
                    load.pids.append((trio.current_time(), response.json()["pid"]))
                else:
                    load.failures.append(response.text)

        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(user, n)
            await wait_until(lambda: len(load.statuses) >= clients, 10, "the load to start")
            yield load
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()


def assert_no_failure(load: Load, at_least: int) -> None:
    assert not load.failures, load.failures[:5]
    assert len(load.statuses) >= at_least, len(load.statuses)


async def watch_capacity(url: str, floor: list[int]) -> None:
    """Keep the smallest number of ready, not-retiring workers seen, until cancelled."""
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=AUTH) as client:
        while True:
            workers = (await client.get("/status")).json()["workers"]
            serving = [
                w for w in workers if w["state"] in ("idle", "busy") and w["retiring"] is None
            ]
            floor[0] = min(floor[0], len(serving))
            await trio.sleep(0.02)


async def test_a_rolling_reload_under_load_fails_no_request_and_keeps_capacity() -> None:
    config = scripted_config(workers=2, env=SLOW_START)
    async with running_server(config, api_key=KEY) as server:
        server.client.headers.update(AUTH)
        await server.pool.wait_ready()
        old_pids = {w.pid for w in server.pool.workers}
        new_cmd = [*SCRIPTED, "--version-2"]  # scripted.py ignores its arguments
        floor = [99]
        async with sustained_load(server.url) as load, trio.open_nursery() as watch:
            watch.start_soon(watch_capacity, server.url, floor)
            response = await server.client.post("/admin/reload", json={"model_cmd": new_cmd})
            done_at = trio.current_time()
            await trio.sleep(1)
            watch.cancel_scope.cancel()
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["status"] == "done" and report["generation"] == 2
        assert report["model_cmd"] == new_cmd
        assert sorted(step["replaced"] for step in report["workers"]) == [0, 1]
        assert_no_failure(load, at_least=10)
        assert floor[0] >= 2, f"capacity dropped to {floor[0]} during the reload"
        status = (await server.client.get("/status")).json()
        assert [(w["generation"], w["model_cmd"]) for w in status["workers"]] == [(2, new_cmd)] * 2
        new_pids = {w["pid"] for w in status["workers"]}
        assert not new_pids & old_pids
        assert {pid for at, pid in load.pids if at > done_at + 0.1} <= new_pids
        metrics = server.pool.metrics
        assert metrics.value("modelpool_model_restarts_total", reason="reload") == 2
        assert metrics.value("modelpool_generation") == 2
        info = {"worker": str(status["workers"][0]["id"]), "generation": "2"}
        assert metrics.value("modelpool_worker_info", **info, model_cmd=" ".join(new_cmd)) == 1


@pytest.mark.parametrize("command", [BROKEN, ["/nonexistent/model"]], ids=["exits", "missing"])
async def test_a_reload_to_a_broken_model_stops_and_the_old_models_keep_serving(
    command: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelpool")
    async with running_server(scripted_config(workers=2), api_key=KEY) as server:
        server.client.headers.update(AUTH)
        await server.pool.wait_ready()
        old_pids = {w.pid for w in server.pool.workers}
        async with sustained_load(server.url) as load:
            response = await server.client.post("/admin/reload", json={"model_cmd": command})
            await trio.sleep(2.5)  # and the old models serve on
        assert response.status_code == 502, response.text
        body = response.json()
        assert body["error"] == "reload failed"
        assert "failed to start" in body["detail"]
        assert body["workers"][0]["failed"]
        assert_no_failure(load, at_least=8)
        assert {w.pid for w in server.pool.workers} == old_pids
        assert [w.generation for w in server.pool.workers] == [1, 1]
        assert server.pool.generation == 1
        ok = await server.client.post("/predict", json={"n": 1})
        assert ok.status_code == 200 and ok.json()["pid"] in old_pids
    admin = [r.getMessage() for r in caplog.records if r.name == "modelpool.admin"]
    assert "admin: reload asked by 127.0.0.1" in admin, admin
    failed = [m for m in admin if m.startswith("admin: reload asked by 127.0.0.1 failed: ")]
    assert len(failed) == 1 and "failed to start" in failed[0], admin
    stopped = [r for r in caplog.records if r.getMessage().startswith("reload stopped: ")]
    assert len(stopped) == 1 and stopped[0].levelno == logging.ERROR


async def test_a_reload_to_a_missing_command_during_the_first_start_up_fails_alone() -> None:
    """The first models are still loading: a reload that cannot even run its command
    is a failed reload (502), not a service that cannot run its models (exit 3)."""
    config = scripted_config(workers=2, env={"SCRIPTED_INIT_SECONDS": "1.5"})
    async with running_server(config, api_key=KEY) as server:
        server.client.headers.update(AUTH)
        assert server.pool.ready_count == 0 and not server.pool.ever_ready
        missing = {"model_cmd": ["/nonexistent/model"]}
        response = await server.client.post("/admin/reload", json=missing)
        assert response.status_code == 502, response.text
        body = response.json()
        assert body["error"] == "reload failed"
        assert "cannot run '/nonexistent/model'" in body["detail"]
        await server.pool.wait_ready()
        assert [w.generation for w in server.pool.workers] == [1, 1]
        assert server.pool.model_config.model_cmd == SCRIPTED
        ok = await server.client.post("/predict", json={"n": 1})
        assert ok.status_code == 200, ok.text


async def test_a_reload_after_a_partly_failed_one_replaces_every_worker(tmp_path: Path) -> None:
    """The first reload replaces one worker, then fails; the second must replace that one
    too, since it runs the failed attempt's command, not the one now asked for."""
    async with running_server(scripted_config(workers=2), api_key=KEY) as server:
        server.client.headers.update(AUTH)
        await server.pool.wait_ready()
        once = [*hostile("starts_once.py"), str(tmp_path / "started")]
        first = await server.client.post("/admin/reload", json={"model_cmd": once})
        assert first.status_code == 502, first.text
        assert [("failed" in step) for step in first.json()["workers"]] == [False, True]
        status = (await server.client.get("/status")).json()
        assert sorted(w["model_cmd"] == once for w in status["workers"]) == [False, True]
        assert server.pool.generation == 1  # what new workers run did not change

        target = [*SCRIPTED, "--version-3"]
        second = await server.client.post("/admin/reload", json={"model_cmd": target})
        assert second.status_code == 200, second.text
        report = second.json()
        assert len(report["workers"]) == 2, report  # both: the old one and the failed attempt's
        status = (await server.client.get("/status")).json()
        running = [(w["generation"], w["model_cmd"]) for w in status["workers"]]
        assert running == [(report["generation"], target)] * 2, running
        assert server.pool.generation == report["generation"]
        # the failed attempt's number is not reused: one number, one command
        assert report["generation"] == 3


async def test_changing_the_model_command_over_http_needs_the_api_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a key, any local user may reach /admin/*: a plain reload is harmless, but
    a new model command would run whatever they like as the service's user."""
    caplog.set_level(logging.INFO, logger="modelpool")
    other = {"model_cmd": [*SCRIPTED, "--other"]}
    async with running_server(scripted_config()) as server:
        await server.pool.wait_ready()
        for body in (other, {"model_cmd": "sh -c 'touch /tmp/owned'"}):
            refused = await server.client.post("/admin/reload", json=body)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"] == "forbidden"
            assert "set --api-key to change the model command over HTTP" in refused.text
        assert server.pool.generation == 1
        assert [w.generation for w in server.pool.workers] == [1]
        plain = await server.client.post("/admin/reload", headers=JSON_TYPE)  # no body
        assert plain.status_code == 200, plain.text
        assert server.pool.model_config.model_cmd == SCRIPTED
    warned = [r for r in caplog.records if r.name == "modelpool.admin" and "refused" in r.msg]
    assert len(warned) == 2 and all(r.levelno == logging.WARNING for r in warned)
    assert "from 127.0.0.1" in warned[0].getMessage()
    async with running_server(scripted_config(), api_key=KEY) as server:
        await server.pool.wait_ready()
        no_key = await server.client.post("/admin/reload", json=other)
        assert no_key.status_code == 401
        with_key = await server.client.post("/admin/reload", json=other, headers=AUTH)
        assert with_key.status_code == 200, with_key.text
        assert server.pool.model_config.model_cmd == other["model_cmd"]


async def test_a_second_operation_while_one_runs_is_refused_with_409() -> None:
    config = scripted_config(workers=1, env={"SCRIPTED_INIT_SECONDS": "1.5"})
    async with running_server(config) as server:
        await server.pool.wait_ready()
        answers: list[httpx.Response] = []

        async def reload() -> None:
            answers.append(await server.client.post("/admin/reload", headers=JSON_TYPE))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reload)
            await wait_until(lambda: server.pool.operations.running, 5, "the reload to start")
            busy = await server.client.post("/admin/scale", json={"workers": 3})
        assert busy.status_code == 409 and busy.json()["error"] == "busy"
        assert answers[0].status_code == 200
        for bad in ({"workers": 0}, {"workers": "2"}, {"workers": 2, "x": 1}, [1]):
            response = await server.client.post("/admin/scale", json=bad)
            assert response.status_code == 400, (bad, response.text)
        response = await server.client.post("/admin/reload", json={"model_cmd": ""})
        assert response.status_code == 400


async def test_scaling_up_and_down_under_load_fails_no_request() -> None:
    async with running_server(scripted_config(workers=2, env=SLOW_START)) as server:
        await server.pool.wait_ready()
        async with sustained_load(server.url, clients=5) as load:
            up = await server.client.post("/admin/scale", json={"workers": 4})
            assert up.status_code == 200, up.text
            assert len(up.json()["added"]) == 2
            assert server.pool.ready_count == 4
            await trio.sleep(1)
            down = await server.client.post("/admin/scale", json={"workers": 1})
            assert down.status_code == 200, down.text
            assert len(down.json()["retired"]) == 3
            assert len(server.pool.workers) == 1
        assert_no_failure(load, at_least=10)
        status = (await server.client.get("/status")).json()
        assert status["size"] == 1
        assert server.pool.metrics.value("modelpool_workers", state="stopped") == 0


async def test_shrinking_retires_idle_workers_first_and_busy_ones_finish_their_request() -> None:
    async with running_server(scripted_config(workers=3)) as server:
        await server.pool.wait_ready()
        answers: list[httpx.Response] = []

        async def slow() -> None:
            answers.append(await server.client.post("/predict", json={"sleep": 1.5}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            nursery.start_soon(slow)
            await wait_until(
                lambda: server.pool.metrics.value("modelpool_workers", state="busy") == 2,
                5,
                "2 busy",
            )
            states = {w.index: w.state for w in server.pool.workers}
            idle = [index for index, state in states.items() if state == "idle"]
            busy = [index for index, state in states.items() if state == "busy"]
            assert len(idle) == 1 and len(busy) == 2, states
            down = await server.client.post("/admin/scale", json={"workers": 1})
        assert down.status_code == 200, down.text
        retired = [step["worker"] for step in down.json()["retired"]]
        assert retired[0] == idle[0], (retired, states)  # the idle one first
        assert retired[1] in busy
        assert [w.index for w in server.pool.workers] == [i for i in busy if i != retired[1]]
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        assert {r.json()["echo"]["sleep"] for r in answers} == {1.5}


async def test_max_requests_jitter_gives_each_model_a_limit_from_n_to_n_plus_j() -> None:
    async with open_pool(scripted_config(max_requests=5, max_requests_jitter=3)) as pool:
        limits = {pool._request_limit() for _ in range(400)}
        assert limits == {5, 6, 7, 8}, limits
    async with open_pool(scripted_config(max_requests=5)) as pool:
        assert {pool._request_limit() for _ in range(50)} == {5}
    async with open_pool(scripted_config()) as pool:
        assert pool._request_limit() is None


async def test_max_requests_recycles_models_by_surge_without_failing_a_request() -> None:
    config = scripted_config(workers=2, max_requests=6, max_requests_jitter=2, env=SLOW_START)
    async with running_server(config) as server:
        await server.pool.wait_ready()
        floor = [99]
        async with sustained_load(server.url, slow_every=6) as load, trio.open_nursery() as watch:
            watch.start_soon(watch_capacity, server.url, floor)
            await wait_until(lambda: len(load.statuses) >= 60, 60, "60 answers")
            watch.cancel_scope.cancel()
        assert_no_failure(load, at_least=60)
        answered_by = [pid for _, pid in load.pids]
        per_model = {pid: answered_by.count(pid) for pid in set(answered_by)}
        # a model past its limit keeps serving until its replacement is ready (0.5 s here),
        # so it may answer a few more; without recycling, 2 models would answer all 60
        assert len(per_model) >= 4, per_model
        assert floor[0] >= 2, f"capacity dropped to {floor[0]} while recycling"
        recycled = server.pool.metrics.value("modelpool_model_restarts_total", reason="recycled")
        assert recycled is not None and recycled >= len(per_model) - 2 - 1, (recycled, per_model)


async def test_a_model_over_the_memory_limit_is_replaced_when_idle_and_killed_when_busy() -> None:
    config = hostile_config("memory.py", model_max_rss=150.0, workers=1)
    async with running_server(config) as server:
        await server.pool.wait_ready()
        first = await server.client.post("/predict", json={"grow_mib": 170})
        assert first.status_code == 200 and first.json()["held_mib"] == 170
        old_pid = first.json()["pid"]
        # idle and over the limit: replaced by surge within a few seconds, no request failed
        await wait_until(lambda: server.pool.workers[0].pid not in (old_pid, None), 10, "swap")
        after = await server.client.post("/predict", json={})
        assert after.status_code == 200 and after.json()["pid"] != old_pid
        assert server.pool.metrics.value("modelpool_model_restarts_total", reason="memory") == 1
        # past the limit by more than the margin while computing: killed, and told why
        killed = await server.client.post("/predict", json={"grow_mib": 250, "then_sleep": 8})
        assert killed.status_code == 502, killed.text
        assert "over --model-max-rss 150 MiB" in killed.json()["detail"]
        assert (await server.client.post("/predict", json={})).status_code == 200


def non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_admin_paths_need_the_key_or_a_loopback_client() -> None:
    async with running_server(scripted_config(), api_key="k") as server:
        assert (await server.client.post("/admin/scale", json={"workers": 1})).status_code == 401
        ok = await server.client.post(
            "/admin/scale", json={"workers": 1}, headers={"Authorization": "Bearer k"}
        )
        assert ok.status_code == 200
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to try from")
    config = scripted_config()
    async with running_server(config, host="0.0.0.0", allow_unauthenticated=True) as server:
        port = server.url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=f"http://{address}:{port}", timeout=10) as remote:
            refused = await remote.post("/admin/reload")
            assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
            assert (await remote.post("/predict", json={"n": 1})).status_code == 200
        assert server.pool.generation == 1


async def test_sighup_reloads_every_model_and_the_service_keeps_running() -> None:
    model = " ".join(hostile("echo.py"))
    async with server_process("--model-cmd", model, "--workers", "2") as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 2, within=20)
            old = server.model_pids()
            server.proc.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: any("reload to generation 2 done" in line for line in server.log),
                20,
                "the reload",
            )
            status = (await client.get("/status")).json()
            assert [w["generation"] for w in status["workers"]] == [2, 2]
            assert not {w["pid"] for w in status["workers"]} & old
            assert (await client.post("/predict", json={"a": 1})).status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=15) == 0


def test_pool_config_checks_the_new_limits() -> None:
    from modelpool import ConfigError

    for bad in ({"max_requests": 0}, {"max_requests_jitter": -1}, {"model_max_rss": -5.0}):
        with pytest.raises(ConfigError):
            PoolConfig(**bad)


async def test_a_recycle_asked_for_a_model_that_died_since_is_dropped() -> None:
    async with open_pool(scripted_config()) as pool:
        await pool.wait_ready()
        worker = pool.workers[0]
        asked_for = worker.pid
        assert asked_for is not None
        os.kill(asked_for, signal.SIGKILL)  # dies idle: the worker starts a fresh model
        await wait_until(lambda: worker.ready and worker.pid not in (asked_for, None), 10, "fresh")
        await pool.operations.recycle(worker, "test", RestartReason.RECYCLED, asked_for)
        assert pool.workers == [worker] and worker.retiring is None
        assert pool.metrics.value("modelpool_model_restarts_total", reason="recycled") == 0
        # the model it runs now is recycled as asked
        await pool.operations.recycle(worker, "test", RestartReason.RECYCLED, worker.pid)
        await wait_until(lambda: pool.workers != [worker], 10, "its replacement")
        assert worker.retiring is not None
