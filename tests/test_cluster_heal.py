"""A cluster heals from what happens to its Redis server, and from what others write there.

A server restarted without persistence, or emptied by FLUSHALL, has lost the job
stream, its group, every node's replies, the heartbeats and the cached scripts: the
nodes make them anew, answer the jobs that were lost with 503, and serve again. A
server that cannot be reached makes /readyz say 503, so a load balancer stops sending
traffic there. Garbage that another party writes into the shared keys is skipped and
logged once; it stops no node.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import coredis
import httpx
import pytest
import trio
from redisserver import RestartableServer, command, restartable_server
from test_cluster import MODEL, cluster

from conftest import error_body
from modelpool.queues.redis.wire import NODES, STREAM
from serverproc import server_process, wait_listening, wait_ready

# real clusters on real Valkey servers: `-m "not slow"` skips them locally; CI runs them
pytestmark = pytest.mark.slow

HEARTBEAT = 1.0  # queues.redis.wire.BEAT_SECONDS


async def flushall(redis: RestartableServer) -> None:
    assert (await command(redis.port, b"FLUSHALL")).startswith(b"+OK")


async def restart(redis: RestartableServer) -> None:
    await redis.restart()


async def served_again(client: httpx.AsyncClient, within: float) -> float:
    """Seconds until a request is answered 200 again; fails the test after `within`."""
    started = trio.current_time()
    with trio.move_on_after(within):
        while (await client.post("/predict", json={"n": "again"})).status_code != 200:
            await trio.sleep(0.2)
        return trio.current_time() - started
    raise AssertionError(f"no request served within {within} s of the loss")


@pytest.mark.parametrize("lose", [restart, flushall], ids=["restart", "flushall"])
async def test_a_lost_job_stream_is_made_anew_and_its_waiting_jobs_answered_503(
    lose: Callable[[RestartableServer], Awaitable[None]],
) -> None:
    """A front and a worker node, one model: one job computes, one waits behind it, and
    the server loses everything. The waiting one gets 503 within a few heartbeats of
    the loss, the computing one its answer, and later requests are served again."""
    async with restartable_server() as redis, cluster(redis.url, 1, 1) as nodes:
        client = nodes.clients[0]
        assert (await client.post("/predict", json={"n": 0})).status_code == 200
        answers: dict[str, tuple[httpx.Response, float]] = {}

        async def send(name: str, body: dict) -> None:
            response = await client.post("/predict", json=body)
            answers[name] = response, trio.current_time()

        with trio.move_on_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, "computing", {"sleep": 4})
                await trio.sleep(1)  # the model computes it
                nursery.start_soon(send, "waiting", {"n": 1})
                await trio.sleep(0.5)  # queued behind it
                await lose(redis)
                lost_at = trio.current_time()
        assert "waiting" in answers, "the waiting job was never answered"
        waiting, answered_at = answers["waiting"]
        body = error_body(waiting, 503, "queue unavailable")
        assert "lost" in body["detail"]
        # two heartbeats after the nodes are back on the server, plus time to reconnect
        assert answered_at - lost_at < 2 * HEARTBEAT + 4, answered_at - lost_at
        assert answers["computing"][0].status_code == 200, answers["computing"][0].text
        await served_again(client, within=10)
        answers_after = [await client.post("/predict", json={"n": n}) for n in range(3)]
        assert [a.status_code for a in answers_after] == [200, 200, 200]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        logs = nodes.fronts[0].log + nodes.workers[0].log
        assert any("made anew" in line for line in logs)


async def readiness(client: httpx.AsyncClient) -> tuple[int, dict]:
    response = await client.get("/readyz")
    return response.status_code, response.json()


async def wait_readiness(client: httpx.AsyncClient, status: int, within: float) -> dict:
    """Poll /readyz until it answers `status`; its body then."""
    with trio.move_on_after(within):
        while (answer := await readiness(client))[0] != status:
            await trio.sleep(0.1)
        return answer[1]
    raise AssertionError(f"/readyz not {status} within {within} s: {answer}")


@asynccontextmanager
async def one_node_with_models(url: str, *extra: str) -> AsyncIterator[httpx.AsyncClient]:
    """`modelpool serve --queue URL --workers 1`: a front whose model serves the stream too."""
    args = ("--queue", url, "--workers", "1", "--node-name", "both", *extra)
    async with server_process(*args, *MODEL) as node:
        async with await wait_listening(node, 60) as client:
            await wait_ready(client, 1, within=60)
            yield client
        node.proc.send_signal(signal.SIGTERM)
        assert await node.exit_code(within=20) == 0


@pytest.mark.parametrize("layout", ["front-and-worker", "one-node"])
async def test_readyz_says_503_while_the_queue_is_unreachable_and_200_once_it_is_back(
    layout: str,
) -> None:
    unhealthy_after = ("--unhealthy-after", "2")
    async with restartable_server() as redis, AsyncExitStack() as stack:
        if layout == "one-node":
            node = one_node_with_models(redis.url, *unhealthy_after)
            client = await stack.enter_async_context(node)
        else:
            nodes = cluster(redis.url, 1, 1, front_args=unhealthy_after)
            client = (await stack.enter_async_context(nodes)).clients[0]
        assert (await readiness(client))[0] == 200
        await redis.stop()
        stopped = trio.current_time()
        body = await wait_readiness(client, 503, within=8)
        # a heartbeat finds out at once that nothing listens; margin for a loaded machine
        assert trio.current_time() - stopped < 8
        assert "queue" in body["detail"] and "unreachable" in body["detail"], body
        error_body(await client.post("/predict", json={"n": 1}), 503, "queue unavailable")
        status, body = await readiness(client)  # still, after a request failed
        assert status == 503 and "queue" in body["detail"]
        with trio.move_on_after(8):  # down for longer than --unhealthy-after: not healthy
            while (health := await client.get("/healthz")).status_code != 503:
                await trio.sleep(0.2)
        assert health.status_code == 503 and "queue" in health.json()["detail"]
        await redis.start()  # empty: the stream and its group are made anew
        body = await wait_readiness(client, 200, within=20)
        assert "detail" not in body and body["ready"] >= 1
        assert (await client.post("/predict", json={"n": 2})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200


async def test_garbage_in_the_shared_keys_is_skipped_logged_once_and_stops_no_node() -> None:
    """Heartbeats that are not JSON or not heartbeats, entries of the job stream that are
    not jobs, and replies that cannot be read: every node keeps serving."""
    async with restartable_server() as redis, cluster(redis.url, 1, 1) as nodes:
        client, front, worker = nodes.clients[0], nodes.fronts[0], nodes.workers[0]
        store = coredis.Redis.from_url(redis.url, decode_responses=False)
        async with store:
            await store.hset(NODES, {"rogue": "not-json", "deep": "[" * 100_000})
            fresh = {"node": "impostor", "at": time.time() + 3600, "ready": "many"}
            await store.hset(NODES, {"impostor": json.dumps(fresh)})
            await store.xadd(STREAM, {"foo": "bar"})  # no job at all
            two_lines = {"line": '{"n": 1}\n{"n": 2}\n', "rid": "r", "key": "k", "n": "0"}
            await store.xadd(STREAM, {**two_lines, "reply": "x", "wid": "", "at": "1", "by": ""})
            answers: dict[str, httpx.Response] = {}

            async def send(name: str, body: dict) -> None:
                answers[name] = await client.post("/predict", json=body)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, "computing", {"sleep": 2})
                await trio.sleep(0.5)  # the model computes it; the next one waits
                nursery.start_soon(send, "waiting", {"n": 3})
                with trio.fail_after(5):  # the front's real job, among the garbage
                    while not (
                        jobs := [
                            e
                            for e in await store.xrange(STREAM)
                            if e.field_values.get(b"rid") not in (None, b"r")
                        ]
                    ):
                        await trio.sleep(0.05)
                job = jobs[0].field_values
                bad_replies = [
                    {"kind": "taken", "timeout": "nan"},
                    {"kind": "ok", "value": "[1]"},
                    {"kind": "ok", "value": "{"},
                    {"kind": "ok", "value": "[" * 100_000},
                    {"kind": "error", "error": "model failed", "stderr": "5"},
                    {"kind": "bogus"},
                ]
                for fields in bad_replies:
                    await store.xadd(job[b"reply"], {"key": job[b"key"], **fields})
            assert answers["computing"].status_code == 200
            waiting = answers["waiting"]  # its own answer, not one of the bad replies
            assert waiting.status_code == 200 and waiting.json()["echo"] == {"n": 3}
            await trio.sleep(3 * HEARTBEAT)  # heartbeats that read the bad entries again
            assert front.proc.returncode is None and worker.proc.returncode is None
            assert (await client.post("/predict", json={"n": 4})).status_code == 200
            status = (await client.get("/status")).json()
            assert sorted(n["node"] for n in status["cluster"]["nodes"]) == ["front0", "worker0"]
            assert (await client.get("/metrics")).status_code == 200
            ready = await readiness(client)
            assert ready[0] == 200 and ready[1]["ready"] == 1  # no impostor's models counted
            assert await store.xlen(STREAM) == 0  # the entries that were no jobs are dropped
        for node in (front, worker):
            for name in ("'rogue'", "'deep'", "'impostor'"):
                said = [line for line in node.log if name in line and "heartbeat" in line]
                assert len(said) == 1, (name, said)  # once, not once a heartbeat
        dropped = [line for line in worker.log if "is not a job" in line]
        assert len(dropped) == 2, dropped
        unread = [line for line in front.log if "a reply it cannot read" in line]
        assert len(unread) == len(bad_replies), unread


async def test_a_front_reads_its_replies_again_once_its_replies_stream_was_made_anew() -> None:
    """Entry ids grow within one stream only: a replies stream made anew (FLUSHALL, a
    restart, its expiry, a replica whose clock is behind) may number its entries below
    the last one the front read. An entry numbered far ahead, then the stream deleted,
    must not leave the front deaf to every later answer."""
    async with restartable_server() as redis, cluster(redis.url, 1, 1) as nodes:
        client = nodes.clients[0]
        assert (await client.post("/predict", json={"n": 0})).status_code == 200
        store = coredis.Redis.from_url(redis.url, decode_responses=False)
        async with store:
            replies = next(k for k in await store.keys("modelpool:replies:*")).decode()
            ahead = f"{int(time.time() * 1000) + 10**9}-0"  # about 11 days ahead
            await store.xadd(replies, {"key": "nobody", "kind": "taken"}, identifier=ahead)
            await trio.sleep(2 * HEARTBEAT)  # the front has read it
            await store.delete([replies])
        answer = None
        with trio.move_on_after(15):
            answer = await client.post("/predict", json={"n": 1})
        assert answer is not None, "the front never read the answer"
        assert answer.status_code == 200 and answer.json()["echo"] == {"n": 1}
