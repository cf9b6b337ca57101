"""POST /predict and friends, over real HTTP to a real hypercorn server on loopback."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio

from conftest import (
    ROOT,
    error_body,
    fast_predict,
    hostile,
    model3_config,
    running_server,
    scripted_config,
    shut_down_mid_requests,
    wait_busy,
    wait_until,
)
from modelpool import PoolConfig, ServerConfig
from modelpool.service.server import Service


async def post_many(client: httpx.AsyncClient, bodies: list[object]) -> list[httpx.Response]:
    responses: list[httpx.Response | None] = [None] * len(bodies)

    async def post(i: int) -> None:
        responses[i] = await client.post("/predict", json=bodies[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(bodies)):
            nursery.start_soon(post, i)
    return [r for r in responses if r is not None]


async def test_predict_answers_with_the_models_json_object() -> None:
    async with running_server(model3_config()) as server:
        response = await server.client.post("/predict", content=b'{"data": 3}')
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"ice_found": True}


async def test_four_requests_run_in_parallel_and_eight_in_two_rounds() -> None:
    # {"data": 2} computes for 2.19 s: one after the other, 4 take 8.7 s and 8 take 17.5 s.
    async with running_server(model3_config(workers=4)) as server:
        await server.pool.wait_ready()
        started = trio.current_time()
        responses = await post_many(server.client, [{"data": 2}] * 4)
        four = trio.current_time() - started
        assert [r.status_code for r in responses] == [200] * 4
        assert 2.1 < four < 4.3  # in parallel: two rounds take 4.38 s

        started = trio.current_time()
        responses = await post_many(server.client, [{"data": 2}] * 8)
        eight = trio.current_time() - started
        assert [r.json() for r in responses] == [{"ice_found": True}] * 8
        assert 4.3 < eight < 6.5  # in two rounds: three take 6.57 s
        assert [w.served for w in server.pool.workers] == [3, 3, 3, 3]


async def test_requests_sent_before_the_models_are_ready_wait_for_them() -> None:
    config = model3_config(env={"MODEL3_STEP_SECONDS": "0.3"})  # ready after 1.5 s
    async with running_server(config) as server:
        ready = await server.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["ready"] == 0
        responses: list[httpx.Response] = []
        seen_waiting: list[dict] = []

        async def send() -> None:
            responses.extend(await post_many(server.client, [{"data": 0}] * 3))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while not responses:  # the three wait in the queue while no model is ready
                status = (await server.client.get("/status")).json()
                if status["queue"] == 3:
                    seen_waiting.append(status)
                    break
                await trio.sleep(0.02)
        assert seen_waiting, "the requests were never seen waiting"
        assert {worker["state"] for worker in seen_waiting[0]["workers"]} == {"starting"}
        assert [r.json() for r in responses] == [{"ice_found": True}] * 3
        assert (await server.client.get("/readyz")).status_code == 200


async def test_timeout_answers_504_and_the_next_request_gets_a_fresh_model() -> None:
    async with running_server(model3_config(workers=1, timeout=1)) as server:
        await server.pool.wait_ready()
        old_pid = server.pool.workers[0].pid
        started = trio.current_time()
        response = await server.client.post("/predict", json={"data": 33})  # 75 s of work
        assert response.status_code == 504
        error_body(response, 504, "model timeout")
        assert trio.current_time() - started < 4
        response = await server.client.post("/predict", json={"data": 3})
        assert response.status_code == 200
        status = (await server.client.get("/status")).json()
        assert status["workers"][0]["restarts"] == 1
        assert status["workers"][0]["pid"] != old_pid


@pytest.mark.parametrize("body", [{"foo": 1}, {"data": "abc"}, [1, 2], "just a string"])
async def test_a_request_that_crashes_model3_gets_502_and_the_pool_recovers(body: object) -> None:
    async with running_server(model3_config(workers=2)) as server:
        await server.pool.wait_ready()
        response = await server.client.post("/predict", json=body)
        failure = error_body(response, 502, "model failed")
        assert failure["exit_code"] == 1
        assert failure["detail"] == "model exited with code 1"
        await wait_until(lambda: server.pool.ready_count == 2, 10, "two ready models again")
        readyz = (await server.client.get("/readyz")).json()
        assert readyz["ready"] == 2
        assert (await server.client.post("/predict", json={"data": 0})).status_code == 200


async def test_a_502_shows_no_stderr_unless_the_operator_asks() -> None:
    async with running_server(model3_config(workers=1)) as server:
        response = await server.client.post("/predict", json={"foo": 1})
        failure = error_body(response, 502, "model failed")
        # one line, the exit code and the request's id: no traceback, no server paths
        assert set(failure) == {"error", "detail", "exit_code", "request_id"}
        assert "model3.py" not in response.text and "Traceback" not in response.text
        # the operator finds the traceback in /status, tagged with the request id
        last = (await server.client.get("/status")).json()["workers"][0]["last_failure"]
        assert last["request_id"] == failure["request_id"]
        assert last["reason"] == "crashed"
        assert "Traceback (most recent call last):" in last["stderr"]
        assert any("model3.py" in line for line in last["stderr"])

    async with running_server(model3_config(workers=1), expose_model_stderr=True) as server:
        response = await server.client.post("/predict", json={"foo": 1})
        failure = error_body(response, 502, "model failed")
        assert "Traceback (most recent call last):" in failure["stderr"]
        assert failure["stderr"][-1].startswith("ValueError: request has no 'data' field")


async def test_a_body_with_newlines_is_one_request() -> None:
    raw_newline = b'{\n  "text": "two\nlines",\n  "n": 1\n}\n'
    escaped = b'{"text": "two\\nlines", "n": 2}'
    async with running_server(scripted_config()) as server:
        first = (await server.client.post("/predict", content=raw_newline)).json()
        second = (await server.client.post("/predict", content=escaped)).json()
        assert first["echo"] == {"text": "two\nlines", "n": 1}
        assert second["echo"] == {"text": "two\nlines", "n": 2}
        assert (first["count"], second["count"]) == (1, 2)


async def test_large_requests_and_answers_cross_the_pipes_without_deadlock() -> None:
    # Far more than a pipe buffer (64 KiB) each way: the request line going in, and
    # the model's echo of it coming back.
    body = {"text": "é" * 150_000, "pad": "x" * 150_000}  # about 1 MB once escaped
    async with running_server(scripted_config()) as server:
        response = await server.client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["echo"] == body


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_bad_requests_are_refused_without_touching_a_model() -> None:
    async with running_server(scripted_config(workers=2), max_body=1000) as server:
        await server.pool.wait_ready()
        pids = [w.pid for w in server.pool.workers]
        client = server.client
        cases = [
            (await client.post("/predict", content=b""), 400, "bad request"),
            (await client.post("/predict", content=b"  \n"), 400, "bad request"),
            (await client.post("/predict", content=b"{not json"), 400, "bad request"),
            (await client.post("/predict", content=b'{"data": NaN}'), 400, "bad request"),
            (await client.post("/predict", content=b"[" * 900 + b"]" * 90), 400, "bad request"),
            (await client.post("/predict", content=b"\xff\xfe\x00"), 400, "bad request"),
            (await client.post("/predict", content=b"1" * 1001), 413, "request body too large"),
            (
                await client.post("/predict", content=chunks(b"2" * 5000, 700)),
                413,
                "request body too large",
            ),
            (await client.get("/predict"), 405, "method not allowed"),
            (await client.post("/nowhere", json={"data": 1}), 404, "not found"),
            (await client.post("/status"), 405, "method not allowed"),
        ]
        for response, status, error in cases:
            assert response.status_code == status, response.text
            assert response.json()["error"] == error
        assert cases[2][0].json()["detail"].startswith("body is not valid JSON")
        assert cases[6][0].json()["max_body"] == 1000
        assert "POST" in cases[8][0].headers["allow"]
        assert [w.pid for w in server.pool.workers] == pids
        assert all(w.served == 0 and w.restarts == 0 for w in server.pool.workers)
        # the largest body allowed still goes through
        body = json.dumps({"pad": "p" * 980}).encode()
        assert len(body) <= 1000
        assert (await client.post("/predict", content=body)).status_code == 200


async def test_a_full_queue_answers_503_with_retry_after_at_once() -> None:
    async with running_server(scripted_config(max_queue=1)) as server:
        await server.pool.wait_ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(server.client.post, "/predict", json={"sleep": 1.5}))
            await wait_busy(server.pool)
            nursery.start_soon(partial(server.client.post, "/predict", json={"n": 1}))
            await wait_until(lambda: server.pool.queue_length == 1, 5, "a queued request")
            started = trio.current_time()
            response = await server.client.post("/predict", json={"n": 2})
            assert trio.current_time() - started < 1.0  # not after the 1.5 s blocker
            assert response.status_code == 503
            error_body(response, 503, "queue full")
            assert response.headers["retry-after"] == "1"


async def test_a_client_that_disconnects_does_not_corrupt_later_answers() -> None:
    async with running_server(scripted_config()) as server:
        await server.pool.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=0.3) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/predict", json={"id": "A", "sleep": 1})
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/predict", json={"id": "B"})  # queued behind A
        answer = (await server.client.post("/predict", json={"id": "C"})).json()
        assert answer["echo"] == {"id": "C"}
        assert answer["count"] == 2  # A ran to its end unheard; B never reached the model
        assert server.pool.workers[0].restarts == 0
        assert server.pool.queue_length == 0


async def test_health_readiness_and_status() -> None:
    config = scripted_config(workers=2, env={"SCRIPTED_INIT_SECONDS": "0.5"})
    async with running_server(config) as server:
        client = server.client
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        early = await client.get("/readyz")
        assert early.status_code == 503
        assert early.json() == {"ready": 0, "size": 2, "queue": 0, "shutting_down": False}
        await server.pool.wait_ready()
        assert (await client.get("/readyz")).json()["ready"] == 2
        await client.post("/predict", json={"n": 1})
        # The answer goes out before its worker says it is idle again (serving.py): wait.
        pool = server.pool
        await wait_until(lambda: all(w.state == "idle" for w in pool.workers), 5, "idle")
        status = (await client.get("/status")).json()
        assert status["size"] == 2
        assert status["queue"] == 0
        assert {w["state"] for w in status["workers"]} == {"idle"}
        assert all(isinstance(w["pid"], int) for w in status["workers"])
        assert sum(w["served"] for w in status["workers"]) == 1
        assert {"restarts", "failed", "id"} <= set(status["workers"][0])


async def test_during_shutdown_new_requests_get_503_and_running_ones_finish() -> None:
    async with running_server(scripted_config()) as server:
        await server.pool.wait_ready()
        running, late = await shut_down_mid_requests(server, {"sleep": 1})
        assert late.status_code == 503
        error_body(late, 503, "shutting down")
        assert running.status_code == 200
        assert running.json()["echo"] == {"sleep": 1}
        async with httpx.AsyncClient(base_url=server.url) as fresh:
            with pytest.raises(httpx.ConnectError):  # the listener is closed
                await fresh.post("/predict", json={"n": 3})


async def read_response(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"}\n"):
        data += await stream.receive_some(4096)
    return data


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
PREDICT = b'POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 8\r\n\r\n{"n": 1}'


@pytest.mark.parametrize("request_", [HEALTHZ, PREDICT], ids=["quart", "predict"])
async def test_idle_keep_alive_connections_are_closed_after_the_timeout(request_: bytes) -> None:
    async with running_server(scripted_config(), keep_alive_timeout=0.5) as server:
        host, port = server.url.removeprefix("http://").split(":")
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(request_)
            assert b"200" in await read_response(stream)
            with trio.fail_after(5):
                assert await stream.receive_some(4096) == b""  # the server hung up


@pytest.mark.parametrize("request_", [HEALTHZ, PREDICT], ids=["quart", "predict"])
async def test_each_request_gives_a_keep_alive_connection_the_whole_timeout_again(
    request_: bytes,
) -> None:
    """Requests 0.3 s apart, for three times the 1 s timeout, on one connection: it
    stays open throughout, and closes a timeout after the last."""
    async with running_server(scripted_config(), keep_alive_timeout=1.0) as server:
        host, port = server.url.removeprefix("http://").split(":")
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            started = trio.current_time()
            while trio.current_time() - started < 3.0:
                await stream.send_all(request_)
                with trio.fail_after(5):
                    assert b"200" in await read_response(stream)
                await trio.sleep(0.3)
            last = trio.current_time()
            with trio.fail_after(5):
                assert await stream.receive_some(4096) == b""  # the server hung up
            assert trio.current_time() - last >= 0.6  # not before its timeout (less slack)


@pytest.mark.parametrize("path", ["/healthz", "/predict"])
async def test_shutdown_is_not_held_up_by_idle_keep_alive_connections(path: str) -> None:
    # The drain deadline is 61 s, and hypercorn would wait for open connections that long.
    config = ServerConfig(pool=scripted_config(timeout=60), port=0, fast_predict=fast_predict())
    service = Service(config)
    returned = trio.Event()

    async def run(task_status: trio.TaskStatus[str]) -> None:
        await service.run(task_status=task_status)
        returned.set()

    async with trio.open_nursery() as nursery:
        url = await nursery.start(run)
        async with httpx.AsyncClient(base_url=url) as keep_alive:
            if path == "/predict":
                assert (await keep_alive.post(path, json={"n": 1})).status_code == 200
            else:
                assert (await keep_alive.get(path)).status_code == 200
            started = trio.current_time()
            service.shutdown()
            with trio.move_on_after(5):
                await returned.wait()
            stopped_after = trio.current_time() - started
            service.kill()
    assert stopped_after < 2, "the service waited for an idle keep-alive connection"


async def test_every_answer_carries_a_request_id_and_a_sane_one_from_the_client_is_kept() -> None:
    async with running_server(scripted_config()) as server:
        client = server.client
        ok = await client.post("/predict", json={"n": 1}, headers={"X-Request-ID": "job-42.a"})
        assert ok.headers["x-request-id"] == "job-42.a"
        made_up = await client.post("/predict", json={"n": 2})
        assert re.fullmatch(r"[0-9a-f]{16}", made_up.headers["x-request-id"])
        for insane in ("x" * 200, "has space", "new\\nline", ""):
            response = await client.get("/healthz", headers={"X-Request-ID": insane})
            assert response.headers["x-request-id"] != insane
        error_body(await client.post("/predict", content=b"{"), 400, "bad request")
        error_body(await client.get("/nowhere"), 404, "not found")
        bad = await client.post("/predict", content=b"[", headers={"X-Request-ID": "mine"})
        assert error_body(bad, 400, "bad request")["request_id"] == "mine"


async def test_a_request_schema_refuses_bad_requests_before_any_model_sees_them() -> None:
    schema = json.loads((ROOT / "model3.schema.json").read_text())
    async with running_server(model3_config(workers=1, request_schema=schema)) as server:
        await server.pool.wait_ready()
        pid = server.pool.workers[0].pid
        for body, complaint in [
            ({"foo": 1}, "'data' is a required property"),
            ({"data": "abc"}, "at [\"data\"]: 'abc' is not of type 'number'"),
            ({"data": True}, "True is not of type 'number'"),
            ([1, 2], "is not of type 'object'"),
            ({"data": 10**400}, "is greater than the maximum"),
        ]:
            response = await server.client.post("/predict", json=body)
            failure = error_body(response, 400, "bad request")
            assert failure["detail"].startswith("request does not match the schema")
            assert complaint in failure["detail"], failure["detail"]
        # not one model was harmed
        assert server.pool.workers[0].pid == pid
        assert server.pool.workers[0].restarts == 0
        assert (await server.client.post("/predict", json={"data": 0})).status_code == 200


async def test_an_api_key_protects_everything_but_the_probes() -> None:
    async with running_server(scripted_config(), api_key="s3cret key") as server:
        client = server.client
        for method, path in [("POST", "/predict"), ("GET", "/status"), ("GET", "/nowhere")]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret key"}]:
                response = await client.request(method, path, json={"n": 1}, headers=headers)
                error_body(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == 'Bearer realm="modelpool"'
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code in (200, 503)
        page = await client.get("/")  # the status page holds no data; it asks for the key
        assert page.status_code == 200 and "<title>modelpool</title>" in page.text
        error_body(await client.get("/metrics"), 401, "unauthorized")
        key = {"Authorization": "Bearer s3cret key"}
        assert (await client.post("/predict", json={"n": 1}, headers=key)).status_code == 200
        assert (await client.get("/status", headers=key)).status_code == 200
        assert server.pool.workers[0].served == 1  # no unauthorised request reached it


async def test_an_unauthorised_client_cannot_make_the_service_read_a_large_body() -> None:
    async with running_server(scripted_config(), api_key="k", max_body=10_000_000) as server:
        sent = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal sent
            while sent < 5_000_000:
                sent += 65536
                yield b"x" * 65536

        response = await server.client.post("/predict", content=endless())
        assert response.status_code == 401
        assert sent < 5_000_000


async def test_healthz_turns_503_when_every_model_keeps_failing() -> None:
    config = PoolConfig(
        model_cmd=hostile("exit_after_ready.py"),
        workers=2,
        backoff_initial=0.1,
        backoff_max=0.2,
        unhealthy_after=1.0,
    )
    async with running_server(config) as server:
        started = trio.current_time()
        assert (await server.client.get("/healthz")).status_code == 200  # starting is healthy
        while (response := await server.client.get("/healthz")).status_code == 200:
            assert trio.current_time() - started < 10, "never turned unhealthy"
            await trio.sleep(0.05)
        assert trio.current_time() - started >= 1.0
        body = response.json()
        assert body["status"] == "failing"
        assert "every model has failed for" in body["detail"]
        assert "died while idle" in body["detail"]


async def test_healthz_shows_no_model_stderr_even_though_anyone_may_ask() -> None:
    """/healthz is open without the key: what a model printed to stderr (paths, data) is
    kept for /status and the log, never put into the probe's answer."""
    script = "import sys; print('FileNotFoundError: /srv/secret/weights.bin', file=sys.stderr)"
    config = PoolConfig(
        model_cmd=[sys.executable, "-c", script + "; sys.exit(1)"],
        workers=1,
        keep_trying=True,
        backoff_initial=0.1,
        backoff_max=0.2,
        unhealthy_after=0.5,
    )
    async with running_server(config, api_key="k") as server:
        started = trio.current_time()
        while (response := await server.client.get("/healthz")).status_code == 200:
            assert trio.current_time() - started < 10, "never turned unhealthy"
            await trio.sleep(0.05)
        detail = response.json()["detail"]
        assert "failed to start: model exited with code 1" in detail, detail
        assert "secret" not in response.text and "FileNotFoundError" not in response.text
        key = {"Authorization": "Bearer k"}
        status = (await server.client.get("/status", headers=key)).json()
        stderr = status["workers"][0]["last_failure"]["stderr"]
        assert stderr == ["FileNotFoundError: /srv/secret/weights.bin"]


async def test_healthz_stays_200_while_only_some_models_fail() -> None:
    # One model that can never start and one healthy one: degraded, not dead.
    script = "import os,sys\nif os.environ['MODELPOOL_MODEL'].endswith('-1'): sys.exit(1)\n"
    script += "print('ready: Model-initialized')\nfor l in sys.stdin: print('result: {}')\n"
    config = PoolConfig(
        model_cmd=[sys.executable, "-c", script],
        workers=2,
        backoff_initial=0.1,
        backoff_max=0.2,
        unhealthy_after=0.5,
    )
    async with running_server(config) as server:
        await wait_until(lambda: server.pool.ready_count >= 1, 5, "one model")
        await trio.sleep(1.5)
        assert (await server.client.get("/healthz")).status_code == 200
        assert sum(w.failed + w.restarts for w in server.pool.workers) >= 1
