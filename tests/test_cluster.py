"""Many nodes, one FIFO: pools and processes sharing a job stream on a real Valkey server.

Fronts (`modelpool serve --queue URL --workers 0`) and worker nodes (`modelpool worker
--queue URL`) run as processes of their own; some tests embed pools in this process
instead, each a node of its own, where that is enough to show the behaviour.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import coredis
import httpx
import pytest
import trio
from redisserver import free_port, redis_server, sentinel_setup

from conftest import (
    SCRIPTED,
    error_body,
    predict_into,
    process_alive,
    scripted_config,
    wait_until,
)
from modelpool import ModelFailed, QueueFull, QueueTimeout, QueueUnavailable, open_pool
from modelpool.queues.redis.wire import STREAM
from serverproc import ServerProcess, server_process, wait_listening, wait_ready

# real clusters on real Valkey servers: `-m "not slow"` skips them locally; CI runs them
pytestmark = pytest.mark.slow

MODEL = ["--model-cmd", " ".join(SCRIPTED)]


async def stream_length(url: str) -> int:
    client = coredis.Redis.from_url(url)
    async with client:
        return await client.xlen(STREAM)


@dataclass
class Cluster:
    fronts: list[ServerProcess] = field(default_factory=list)
    clients: list[httpx.AsyncClient] = field(default_factory=list)  # one per front
    workers: list[ServerProcess] = field(default_factory=list)


@asynccontextmanager
async def cluster(
    url: str, fronts: int, workers: int, *extra: str, front_args: tuple[str, ...] = ()
) -> AsyncIterator[Cluster]:
    """`fronts` HTTP fronts with no models and `workers` worker nodes with one model each.

    On exit every node must stop on SIGTERM with code 0, and every model must be gone;
    a test that kills a node takes it out of `workers` first.
    """
    nodes = Cluster()
    front_procs, clients, worker_procs = nodes.fronts, nodes.clients, nodes.workers
    async with AsyncExitStack() as stack:
        for i in range(fronts):
            args = ("--queue", url, "--workers", "0", "--node-name", f"front{i}")
            proc = await stack.enter_async_context(
                server_process(*args, *front_args, *extra, *MODEL)
            )
            front_procs.append(proc)
        for i in range(workers):
            args = ("--queue", url, "--workers", "1", "--node-name", f"worker{i}")
            proc = await stack.enter_async_context(
                server_process(*args, *extra, *MODEL, command=("worker",))
            )
            worker_procs.append(proc)
        for proc in front_procs:  # generous: a loaded 2-core machine starts them slowly
            clients.append(await stack.enter_async_context(await wait_listening(proc, 60)))
        for client in clients:
            await wait_ready(client, workers, within=60)
        yield nodes
        for proc in front_procs + worker_procs:
            if proc.proc.returncode is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in front_procs + worker_procs:
            assert await proc.exit_code(within=20) == 0
        pids = set().union(*(proc.model_pids() for proc in front_procs + worker_procs))
        await wait_until(lambda: not any(map(process_alive, pids)), 10, "every model gone")


async def test_an_embedded_pool_on_redis_answers_as_a_local_one() -> None:
    async with redis_server() as url:
        async with open_pool(scripted_config(queue=url, workers=2)) as pool:
            await pool.wait_ready()
            assert (await pool.predict({"x": "ü"}))["echo"] == {"x": "ü"}
            outcomes: list = []
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(predict_into, pool, {"sleep": 0.1, "i": i}, outcomes)
            assert sorted(o["echo"]["i"] for o in outcomes) == list(range(6))
            assert pool.metrics.value("modelpool_requests_total", outcome="ok") == 7
            assert pool.metrics.value("modelpool_queue_wait_seconds_count") == 7
            cluster_status = pool.status()["cluster"]
            assert cluster_status["node"] == pool.node
            assert cluster_status["reachable"] is True
        assert await stream_length(url) == 0  # every answered job is acknowledged and deleted


async def test_a_batch_is_spread_over_every_model_of_every_node_in_fifo_order() -> None:
    """2 fronts, 3 worker processes of one model each: 9 requests of 1.5 s, sent in turn
    through both fronts, take 3 rounds, and the n-th round is every model's n-th request."""
    async with redis_server() as url, cluster(url, 2, 3) as nodes:
        clients = nodes.clients
        answers: dict[int, dict] = {}

        async def send(i: int) -> None:
            response = await clients[i % 2].post("/predict", json={"sleep": 1.5, "i": i})
            assert response.status_code == 200, response.text
            answers[i] = response.json()

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(9):
                nursery.start_soon(send, i)
                await trio.sleep(0.05)  # so the order they are queued in is known
        elapsed = trio.current_time() - started
        pids = {answer["pid"] for answer in answers.values()}
        assert len(pids) == 3  # every model of every node served
        for i, answer in answers.items():
            assert answer["echo"]["i"] == i  # its own answer
            assert answer["count"] == i // 3 + 1, (i, answer)  # FIFO: round by round
        assert 4.5 <= elapsed < 9  # 3 rounds of 1.5 s on 3 models, not 9 on fewer
        served: dict[str, int] = {}
        with trio.move_on_after(5):  # what each node served reaches the fronts by heartbeat
            while sum(served.values()) < 9:
                nodes = (await clients[1].get("/status")).json()["cluster"]["nodes"]
                served = {n["node"]: sum(w["served"] for w in n["workers"]) for n in nodes}
                await trio.sleep(0.2)
        assert served == {"front0": 0, "front1": 0, "worker0": 3, "worker1": 3, "worker2": 3}
        idle = 'modelpool_cluster_workers{node="worker1",state="idle"} 1.0'
        with trio.move_on_after(5):  # front0's view, as of its last heartbeat
            while idle not in (metrics := (await clients[0].get("/metrics")).text):
                await trio.sleep(0.2)
        assert idle in metrics
        assert "modelpool_cluster_nodes 5.0" in metrics
        assert 'modelpool_requests_total{outcome="ok"} 5.0' in metrics  # front0 sent 5
        assert await stream_length(url) == 0


async def test_sigkill_of_a_worker_node_mid_job_loses_no_request_and_answers_none_twice() -> None:
    """Its job is reclaimed after --reclaim-after and run once more on another node."""
    async with redis_server() as url, cluster(url, 2, 2, "--reclaim-after", "3") as nodes:
        fronts, clients, workers = nodes.fronts, nodes.clients, nodes.workers
        answers: list[httpx.Response] = []

        async def send(i: int) -> None:
            answers.append(await clients[i % 2].post("/predict", json={"sleep": 2, "i": i}))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(send, i)
                await trio.sleep(0.05)
            await trio.sleep(0.8)  # both models are computing their first request
            victim = workers.pop(0)  # gone: nothing for the cluster's exit check to stop
            victim_models = victim.model_pids()
            victim.proc.kill()
        assert sorted(r.status_code for r in answers) == [200] * 4
        assert sorted(r.json()["echo"]["i"] for r in answers) == [0, 1, 2, 3]
        # the killed node's job ran once more, on the survivor: every answer is from there
        assert {r.json()["pid"] for r in answers} <= workers[0].model_pids()
        assert any("reclaimed" in line for p in fronts + workers for line in p.log)
        # the killed node's model notices its stdin closed and exits on its own
        await wait_until(
            lambda: not any(map(process_alive, victim_models)), 10, "the orphan model gone"
        )


async def test_a_reclaimed_job_past_its_deadline_is_answered_502() -> None:
    async with redis_server() as url:
        args = ("--reclaim-after", "3")
        async with cluster(url, 1, 1, *args, front_args=("--queue-timeout", "1")) as nodes:
            clients, workers = nodes.clients, nodes.workers
            async with trio.open_nursery() as nursery:
                answers: list[httpx.Response] = []

                async def send() -> None:
                    answers.append(await clients[0].post("/predict", json={"sleep": 5}))

                nursery.start_soon(send)
                await wait_until(
                    lambda: any("started" in line for line in workers[0].log), 5, "a model"
                )
                await trio.sleep(1)
                workers[0].proc.kill()
            body = error_body(answers[0], 502, "model failed")
            assert body["detail"] == "the node that took it stopped answering"
            workers.clear()  # it is gone; nothing for the cluster's exit check to stop


async def test_timeouts_and_crashes_across_nodes_behave_as_on_one_machine() -> None:
    async with redis_server() as url, cluster(url, 1, 2, "--timeout", "1") as nodes:
        client = nodes.clients[0]
        error_body(await client.post("/predict", json={"sleep": 5}), 504, "model timeout")
        crash = error_body(await client.post("/predict", json={"exit": 7}), 502, "model failed")
        assert crash["exit_code"] == 7
        assert crash["detail"] == "model exited with code 7"
        ok = await client.post("/predict", json={"n": 1})
        assert ok.status_code == 200

        async def restarts() -> int:
            nodes = (await client.get("/status")).json()["cluster"]["nodes"]
            return sum(worker["restarts"] for node in nodes for worker in node["workers"])

        with trio.move_on_after(8):  # the fronts learn of restarts by heartbeat
            while await restarts() < 2:
                await trio.sleep(0.2)
        await trio.sleep(2.5)  # time for a failed job to come back, if it did
        assert await restarts() == 2  # one each: neither failed job ran again


async def test_the_queue_limit_counts_waiting_jobs_of_every_front() -> None:
    async with redis_server() as url:
        front = scripted_config(queue=url, workers=0, max_queue=2, node_name="front")
        models = scripted_config(queue=url, workers=1, node_name="models")
        async with open_pool(front) as pool, open_pool(models) as model_pool:
            await model_pool.wait_ready()
            outcomes: list = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(predict_into, pool, {"sleep": 1.5}, outcomes)
                await wait_until(lambda: model_pool.workers[0].state == "busy", 5, "busy")
                nursery.start_soon(predict_into, pool, {"n": 1}, outcomes)
                nursery.start_soon(predict_into, model_pool, {"n": 2}, outcomes)  # another front
                await wait_until(lambda: len(outcomes) == 0 and pool.queue_length == 2, 5, "2")
                with pytest.raises(QueueFull):
                    await pool.predict({"n": 3})
            assert len([o for o in outcomes if isinstance(o, dict)]) == 3


async def test_queue_timeout_and_a_caller_that_leaves_take_the_job_out_of_the_stream() -> None:
    async with redis_server() as url:
        config = scripted_config(queue=url, workers=0, queue_timeout=0.5)
        async with open_pool(config) as pool:
            with pytest.raises(QueueTimeout):
                await pool.predict({"n": 1})
            with trio.move_on_after(0.2):
                await pool.predict({"n": 2})  # its caller gives up while it waits
            assert await stream_length(url) == 0
            assert pool.metrics.value("modelpool_requests_total", outcome="client_gone") == 1


async def test_a_job_taken_after_its_deadline_is_not_run() -> None:
    async with redis_server() as url:
        front = scripted_config(queue=url, workers=0, queue_timeout=1, node_name="front")
        async with open_pool(front) as pool:
            outcomes: list = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(predict_into, pool, {"n": 1}, outcomes)
                await trio.sleep(0.1)
                # Kept from leaving the stream by the front's own timer, as a job would be
                # if its front died: a worker that comes late must answer, not run it.
                pool.queue.abandon = lambda job: None  # type: ignore[method-assign]
            assert isinstance(outcomes[0], QueueTimeout)
            assert await stream_length(url) == 1
            models = scripted_config(queue=url, workers=1, node_name="late")
            async with open_pool(models) as model_pool:
                await model_pool.wait_ready()
                await wait_until(lambda: model_pool.workers[0].served == 0, 1, "")
                with trio.fail_after(5):
                    while await stream_length(url):
                        await trio.sleep(0.05)
                assert model_pool.workers[0].served == 0


async def test_an_unreachable_queue_answers_503_and_the_front_still_stops_on_sigterm() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with server_process("--queue", url, "--workers", "0", *MODEL) as front:
        async with await wait_listening(front) as client:
            response = await client.post("/predict", json={"n": 1})
            body = error_body(response, 503, "queue unavailable")
            assert "queue" in body["detail"]
            assert response.headers["retry-after"] == "1"
            assert (await client.get("/readyz")).status_code == 503
        front.proc.send_signal(signal.SIGTERM)
        assert await front.exit_code(within=15) == 0


async def test_a_worker_node_stopped_by_sigterm_finishes_its_job_and_leaves_the_rest() -> None:
    async with redis_server() as url, cluster(url, 1, 2) as nodes:
        clients, workers = nodes.clients, nodes.workers
        answers: list[httpx.Response] = []

        async def send(i: int) -> None:
            answers.append(await clients[0].post("/predict", json={"sleep": 1.5, "i": i}))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(send, i)
                await trio.sleep(0.05)
            await trio.sleep(0.5)
            workers[0].proc.send_signal(signal.SIGTERM)
        assert sorted(r.status_code for r in answers) == [200] * 4
        assert await workers[0].exit_code(within=15) == 0
        by_pid = [r.json()["pid"] for r in answers]
        assert by_pid.count(next(iter(workers[0].model_pids()))) == 1  # its one job, no more


@pytest.mark.parametrize("bad", ["http://127.0.0.1:1", "redis:/x"])
async def test_a_queue_that_is_not_a_redis_url_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="redis://"):
        scripted_config(queue=bad)


async def test_a_front_without_models_needs_a_queue() -> None:
    with pytest.raises(ValueError, match="workers"):
        scripted_config(workers=0)


async def test_through_sentinel_the_queue_follows_a_failover(tmp_path: Path) -> None:
    """With redis+sentinel://, nodes find the primary; after it dies, the promoted replica."""
    async with sentinel_setup(tmp_path) as (url, primary):
        front = scripted_config(queue=url, workers=0, node_name="front")
        models = scripted_config(queue=url, workers=1, node_name="models")
        async with open_pool(front) as pool, open_pool(models) as model_pool:
            await model_pool.wait_ready()
            assert (await pool.predict({"n": 1}))["echo"] == {"n": 1}
            await trio.sleep(0.5)  # the replica has caught up with the stream and its group
            primary.kill()
            answer = None
            with trio.move_on_after(30):
                while answer is None:
                    try:
                        answer = await pool.predict({"n": 2})
                    except (QueueUnavailable, QueueTimeout, ModelFailed):
                        await trio.sleep(0.5)  # no primary yet: 503, as the README says
            assert answer is not None and answer["echo"] == {"n": 2}


async def test_a_front_that_dies_loses_only_its_own_clients_answers() -> None:
    async with redis_server() as url, cluster(url, 2, 1) as nodes:
        doomed, survivor = nodes.clients
        async with trio.open_nursery() as nursery:

            async def orphaned() -> None:
                with contextlib.suppress(httpx.HTTPError):  # its front dies under it
                    await doomed.post("/predict", json={"sleep": 1})

            nursery.start_soon(orphaned)
            await trio.sleep(0.3)  # the worker computes it
            victim = nodes.fronts.pop(0)  # gone: nothing for the cluster's exit check to stop
            victim.proc.kill()
        answers = [await survivor.post("/predict", json={"n": n}) for n in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.json()["echo"]["n"] for a in answers] == [0, 1, 2]
        # the orphan job was answered into the dead front's replies, then the next ones
        assert [a.json()["count"] for a in answers] == [2, 3, 4]


async def test_a_front_stops_at_once_after_load_whose_clients_left() -> None:
    """Clients that hang up leave nothing behind that a graceful stop would wait for."""
    async with redis_server() as url, cluster(url, 1, 2) as nodes:
        client = nodes.clients[0]

        async def hammer(body: dict) -> None:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    await client.post("/predict", json=body)

        with trio.move_on_after(3):  # then every client hangs up, most while queued
            async with trio.open_nursery() as nursery:
                for i in range(24):
                    nursery.start_soon(hammer, {"n": i} if i % 2 else {"sleep": 0.1})
        front = nodes.fronts.pop(0)
        front.proc.send_signal(signal.SIGTERM)
        started = trio.current_time()
        assert await front.exit_code(within=20) == 0
        assert trio.current_time() - started < 5  # not the drain deadline, nor later
