"""What operators watch: /metrics, the numbers the library exposes, JSON and access logs."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    SCRIPTED,
    error_body,
    hostile_config,
    running_server,
    scripted_config,
    shut_down_mid_requests,
    wait_busy,
    wait_until,
)
from modelpool import ModelFailed, open_pool
from modelpool.pool.metrics import OUTCOMES, RESTART_REASONS, WORKER_STATES
from serverproc import server_process, wait_listening, wait_ready

ONE_SCRIPTED_WITH_ACCESS_LOG = ("--model-cmd", " ".join(SCRIPTED), "--workers", "1", "--access-log")


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and labels (parsed by prometheus-client)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_count_a_known_sequence_exactly() -> None:
    config = scripted_config(timeout=2.0, max_queue=1, queue_timeout=1.0)
    async with running_server(config) as server:
        client, pool = server.client, server.pool
        assert (await client.post("/predict", json={"n": 1})).status_code == 200
        error_body(await client.post("/predict", json={"sleep": 5}), 504, "model timeout")
        error_body(await client.post("/predict", json={"exit": 3}), 502, "model failed")
        error_body(await client.post("/predict", content=b"{"), 400, "bad request")
        assert (await client.post("/predict", json={"n": 2})).status_code == 200

        # the one model busy for 1.5 s: one request waits in the queue (--max-queue 1)
        # until --queue-timeout, and one more finds the queue full
        answers: dict[str, httpx.Response] = {}

        async def post(name: str, body: dict | AsyncIterator[bytes]) -> None:
            if isinstance(body, dict):
                answers[name] = await client.post("/predict", json=body)
            else:
                answers[name] = await client.post("/predict", content=body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, "blocker", {"sleep": 1.5})
            await wait_busy(pool)
            nursery.start_soon(post, "queued", {"n": 3})
            await wait_until(lambda: pool.queue_length == 1, 5, "one request queued")
            await post("full", {"n": 4})
        assert answers["blocker"].status_code == 200
        error_body(answers["queued"], 503, "no model available")
        error_body(answers["full"], 503, "queue full")

        # a client that hangs up while its request computes
        async with httpx.AsyncClient(base_url=server.url, timeout=0.2) as impatient:
            with pytest.raises(httpx.TimeoutException):
                await impatient.post("/predict", json={"sleep": 0.5})
        await wait_until(lambda: pool.workers[0].state == "idle", 5, "the model free again")
        gone = "modelpool_requests_total"
        await wait_until(lambda: pool.metrics.value(gone, outcome="client_gone") == 1, 5, "gone")

        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = scrape(response.text)
        openmetrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")

        # once shutting down, a request that was still being sent is refused
        running, late = await shut_down_mid_requests(server, {"sleep": 0.5}, b'{"n": 5}')
        assert running.status_code == 200
        error_body(late, 503, "shutting down")
        final = {o: pool.metrics.value("modelpool_requests_total", outcome=o) for o in OUTCOMES}

    expected = dict.fromkeys(OUTCOMES, 0) | {"ok": 3, "timeout": 1, "model_failed": 1}
    expected |= {"bad_request": 1, "queue_timeout": 1, "queue_full": 1, "client_gone": 1}
    for outcome, count in expected.items():
        assert sample(samples, "modelpool_requests_total", outcome=outcome) == count, outcome
    assert final == expected | {"ok": 4, "shutting_down": 1}, final
    restarts = dict.fromkeys(RESTART_REASONS, 0) | {"timeout": 1, "crashed": 1}
    for reason, count in restarts.items():
        assert sample(samples, "modelpool_model_restarts_total", reason=reason) == count, reason
    # six requests reached a model (the queue-timed-out and the refused one did not);
    # nine were answered, the hung-up one counted too; three models reached their ready line
    assert sample(samples, "modelpool_queue_wait_seconds_count") == 6
    assert sample(samples, "modelpool_compute_seconds_count") == 6
    assert sample(samples, "modelpool_request_seconds_count") == 9
    assert sample(samples, "modelpool_model_start_seconds_count", method="spawn") == 3
    assert sample(samples, "modelpool_model_start_seconds_count", method="fork") == 0
    # the timed-out request computed its whole 2 s, the blocker 1.5 s, the hung-up one 0.5 s
    assert 4.0 <= sample(samples, "modelpool_compute_seconds_sum") < 6.5
    assert sample(samples, "modelpool_compute_seconds_bucket", le="0.5") == 3
    assert sample(samples, "modelpool_compute_seconds_bucket", le="+Inf") == 6
    assert 4.0 <= sample(samples, "modelpool_model_busy_seconds_total") < 6.5
    assert sample(samples, "modelpool_queue_length") == 0
    workers = {state: sample(samples, "modelpool_workers", state=state) for state in WORKER_STATES}
    assert workers == dict.fromkeys(WORKER_STATES, 0) | {"idle": 1}


async def test_metrics_show_the_queue_and_busy_workers_while_they_are_so() -> None:
    async with running_server(scripted_config(workers=2)) as server:
        await server.pool.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as other:
            responses: list[httpx.Response] = []

            async def post(body: dict) -> None:
                responses.append(await other.post("/predict", json=body))

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(post, {"sleep": 1.5})
                await wait_until(lambda: server.pool.queue_length == 3, 5, "3 queued")
                samples = scrape((await server.client.get("/metrics")).text)
                assert sample(samples, "modelpool_queue_length") == 3
                assert sample(samples, "modelpool_workers", state="busy") == 2
                assert sample(samples, "modelpool_workers", state="idle") == 0
        assert [r.status_code for r in responses] == [200] * 5
        samples = scrape((await server.client.get("/metrics")).text)
        # two waited for none, two for one round (1.5 s), the last for two rounds
        assert sample(samples, "modelpool_queue_wait_seconds_bucket", le="1.0") == 2
        assert sample(samples, "modelpool_queue_wait_seconds_bucket", le="2.5") == 4
        assert sample(samples, "modelpool_queue_wait_seconds_count") == 5
        busy = sample(samples, "modelpool_model_busy_seconds_total")
        assert 7.5 <= busy < 10, busy  # five requests of 1.5 s each


async def test_the_library_exposes_the_same_numbers() -> None:
    async with open_pool(scripted_config(timeout=1.0)) as pool:
        await pool.predict({"n": 1})
        for _ in range(2):
            try:
                await pool.predict({"sleep": 3})
            except Exception as exc:
                assert exc.outcome == "timeout"
        assert pool.metrics.value("modelpool_requests_total", outcome="ok") == 1
        assert pool.metrics.value("modelpool_requests_total", outcome="timeout") == 2
        await pool.predict({"n": 2})  # the third model
        assert pool.metrics.value("modelpool_model_restarts_total", reason="timeout") == 2
        # idle once the model has finished printing (see ModelProcess.catch_up)
        await wait_until(
            lambda: pool.metrics.value("modelpool_workers", state="idle") == 1, 2, "idle"
        )
        assert b"modelpool_requests_total" in pool.metrics.exposition()[0]
        recent = pool.status()["recent"]
        assert recent["outcomes"] == {"ok": 2, "timeout": 2}
        assert sum(point["answered"] for point in recent["series"]) == 4


async def test_json_logs_carry_the_request_id_worker_and_pid_and_one_access_line() -> None:
    async with server_process(*ONE_SCRIPTED_WITH_ACCESS_LOG, "--log-format", "json") as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 1, within=20)
            pid = (await client.get("/status")).json()["workers"][0]["pid"]
            response = await client.post(
                "/predict", json={"stderr": "secret user data"}, headers={"X-Request-ID": "r-1"}
            )
            assert response.status_code == 200
            failed = await client.post(
                "/predict", json={"exit": 4}, headers={"X-Request-ID": "r-2"}
            )
            assert error_body(failed, 502, "model failed")["request_id"] == "r-2"
            await wait_until(lambda: sum("r-2" in line for line in server.log) >= 2, 5, "log")
        server.proc.terminate()
        assert await server.exit_code(within=15) == 0

    records = [json.loads(line) for line in server.log if line.strip()]  # every line is JSON
    for record in records:
        assert {"timestamp", "level", "logger", "message"} <= record.keys(), record
    about_r1 = [r for r in records if r.get("request_id") == "r-1"]
    model_line = next(r for r in about_r1 if "secret user data" in r["message"])
    assert model_line["worker"] == 0
    assert model_line["pid"] == pid
    assert model_line["level"] == "INFO"
    assert model_line["stream"] == "stderr"
    access = [r for r in records if r["logger"] == "modelpool.access"]
    assert [(r["request_id"], r["status"]) for r in access if r["path"] == "/predict"] == [
        ("r-1", 200),
        ("r-2", 502),
    ]
    first = next(r for r in access if r["request_id"] == "r-1")
    assert (first["worker"], first["pid"]) == (0, pid)
    assert first["queue_wait"] >= 0 and first["compute"] > 0
    assert first["total"] >= first["compute"]
    crash = [r for r in records if r.get("request_id") == "r-2" and r["level"] == "ERROR"]
    assert crash and crash[0]["worker"] == 0 and crash[0]["pid"] == pid, crash


async def test_model_output_can_be_kept_out_of_the_log() -> None:
    async with server_process(
        *ONE_SCRIPTED_WITH_ACCESS_LOG, "--model-log-level", "DEBUG"
    ) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 1, within=20)
            body = {"stderr": "secret user data", "noise": 2}
            assert (await client.post("/predict", json=body)).status_code == 200
            crash = {"stderr": "secret crash data", "exit": 1}
            error_body(await client.post("/predict", json=crash), 502, "model failed")
            await wait_until(lambda: sum("POST /predict" in x for x in server.log) == 2, 5, "log")
            failure = (await client.get("/status")).json()["workers"][0]["last_failure"]
            assert failure["stderr"][-1] == "secret crash data"  # kept where operators look
        server.proc.terminate()
        assert await server.exit_code(within=15) == 0
    text = "\n".join(server.log)
    assert "secret user data" not in text
    assert "secret crash data" not in text  # not even in the failure's report
    assert "progress 0" not in text
    failed = [line for line in server.log if "failed, model killed" in line]
    assert len(failed) == 1 and "ERROR" in failed[0], failed
    assert "model exited with code 1" in failed[0] and "its stderr is in /status" in failed[0]
    access = [line for line in server.log if "modelpool.access" in line and "/predict" in line]
    assert len(access) == 2, access  # one line per request, with its timings
    for part in (" 200 queue=", " compute=", " total=", " worker=0 pid=", " request_id="):
        assert part in access[0], access[0]
    assert " 502 queue=" in access[1], access[1]


async def test_failure_tails_and_stray_lines_are_logged_at_the_model_log_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a model printed is its business: at --model-log-level, even when it fails.

    The failure itself is an ERROR line, without the model's words.
    """
    caplog.set_level(logging.DEBUG)
    config = scripted_config(model_log_level="DEBUG")
    async with open_pool(config) as pool:
        with pytest.raises(ModelFailed):
            await pool.predict({"stderr": "secret crash data", "exit": 1})
    async with open_pool(hostile_config("unasked_result.py", model_log_level="DEBUG")) as pool:
        await pool.predict({"secret": "stray secret"})
        await wait_until(lambda: pool.workers[0].restarts == 1, 5, "the model replaced")
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    quiet = [r for r in caplog.records if r.levelno < logging.INFO]
    assert not [r.getMessage() for r in loud if "secret" in r.getMessage()]
    assert not [r.getMessage() for r in loud if '"stray": true' in r.getMessage()]
    assert [r for r in quiet if "secret crash data" in r.getMessage()]  # the lines, at DEBUG
    assert [r for r in quiet if '"stray": true' in r.getMessage()]
    errors = [r.getMessage() for r in loud if r.levelno == logging.ERROR]
    assert any("failed, model killed: model exited with code 1" in m for m in errors), errors
    assert any("printed a result when none was awaited" in m for m in errors), errors
