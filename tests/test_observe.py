"""What operators watch: /metrics, the numbers the library exposes, JSON and access logs."""

from __future__ import annotations

import json

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from conftest import SCRIPTED, error_body, running_server, scripted_config, wait_until
from modelpool import open_pool
from modelpool.metrics import OUTCOMES, RESTART_REASONS, WORKER_STATES
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
    async with running_server(scripted_config(timeout=1.0)) as server:
        client = server.client
        assert (await client.post("/predict", json={"n": 1})).status_code == 200
        error_body(await client.post("/predict", json={"sleep": 5}), 504, "model timeout")
        error_body(await client.post("/predict", json={"exit": 3}), 502, "model failed")
        error_body(await client.post("/predict", content=b"{"), 400, "bad request")
        assert (await client.post("/predict", json={"n": 2})).status_code == 200

        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = scrape(response.text)
        openmetrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")

    expected = dict.fromkeys(OUTCOMES, 0) | {"ok": 2, "timeout": 1, "model_failed": 1}
    expected["bad_request"] = 1
    for outcome, count in expected.items():
        assert sample(samples, "modelpool_requests_total", outcome=outcome) == count, outcome
    restarts = dict.fromkeys(RESTART_REASONS, 0) | {"timeout": 1, "crashed": 1}
    for reason, count in restarts.items():
        assert sample(samples, "modelpool_model_restarts_total", reason=reason) == count, reason
    # four requests reached a model; five were answered; three models reached their ready line
    assert sample(samples, "modelpool_queue_wait_seconds_count") == 4
    assert sample(samples, "modelpool_compute_seconds_count") == 4
    assert sample(samples, "modelpool_request_seconds_count") == 5
    assert sample(samples, "modelpool_model_start_seconds_count") == 3
    # the timed-out request computed for its whole second; nothing else took long
    assert 1.0 <= sample(samples, "modelpool_compute_seconds_sum") < 4
    assert sample(samples, "modelpool_compute_seconds_bucket", le="0.5") == 3
    assert sample(samples, "modelpool_compute_seconds_bucket", le="+Inf") == 4
    assert 1.0 <= sample(samples, "modelpool_model_busy_seconds_total") < 4
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
        assert pool.metrics.value("modelpool_workers", state="idle") == 1
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
            await wait_until(lambda: any("POST /predict" in line for line in server.log), 5, "log")
        server.proc.terminate()
        assert await server.exit_code(within=15) == 0
    text = "\n".join(server.log)
    assert "secret user data" not in text
    assert "progress 0" not in text
    access = [line for line in server.log if "modelpool.access" in line and "/predict" in line]
    assert len(access) == 1, access  # one line per request, with its timings
    for part in (" 200 queue=", " compute=", " total=", " worker=0 pid=", " request_id="):
        assert part in access[0], access[0]
