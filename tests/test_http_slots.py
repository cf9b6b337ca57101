"""Connection slots at --max-connections: clients that trickle their request bodies cannot
keep a newcomer out (--min-body-rate); over real sockets to a real server on loopback,
on both paths of POST /predict.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from conftest import FAST_PREDICT_VARIABLE, running_server, scripted_config, wait_until

SLOTS = 4
BODY = b'{"pad": "' + b"x" * 990 + b'"}'  # 1000 bytes, of which a trickler sends a few


class Trickler:
    """A client that sends its request's headers, then its body 2 bytes every half second
    (4 bytes a second, far below 240), and keeps what the service answers."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.answer = b""
        self.closed = trio.Event()  # the service closed the connection

    async def run(self) -> None:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(self._read, stream)
            head = (
                b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n" % (self.name.encode(), len(BODY))
            )
            try:
                await stream.send_all(head)
                for start in range(0, len(BODY), 2):
                    await trio.sleep(0.5)
                    await stream.send_all(BODY[start : start + 2])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await self.closed.wait()

    async def _read(self, stream: trio.SocketStream) -> None:
        try:
            while chunk := await stream.receive_some(65536):
                self.answer += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.closed.set()


@pytest.mark.parametrize("fast", ["0", "1"], ids=["quart", "fastpath"])
async def test_clients_trickling_bodies_in_every_slot_keep_no_newcomer_waiting(
    monkeypatch: pytest.MonkeyPatch, fast: str
) -> None:
    """Every slot holds a client sending its body at 4 bytes a second, each counted as
    in progress before the next comes (so none is still sending headers: the case that
    used to make the newcomer wait for --body-timeout). At the limit, the slowest body
    past its grace is answered 408 and closed, and the newcomer is served."""
    monkeypatch.setenv(FAST_PREDICT_VARIABLE, fast)  # read as the service starts
    settings = {"max_connections": SLOTS, "body_timeout": 60, "min_body_rate_grace": 1}
    async with running_server(scripted_config(), **settings) as server:
        await server.pool.wait_ready()
        connections = server.service.connections
        assert connections is not None
        tricklers = [Trickler(server.url, f"trickler-{i}") for i in range(SLOTS)]
        async with trio.open_nursery() as nursery:
            for i, trickler in enumerate(tricklers):
                nursery.start_soon(trickler.run)

                def in_progress(count: int = i + 1) -> bool:
                    every = connections._by_peer.values()  # what admit looks at
                    return connections.open == count and all(c.requests for c in every)

                await wait_until(in_progress, 10, f"{i + 1} requests in progress")
            started = trio.current_time()
            with trio.fail_after(20):  # the body timeout is 60 s
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as newcomer:
                    response = await newcomer.get("/healthz")
            waited = trio.current_time() - started
            assert response.json() == {"status": "ok"}
            # the grace (1 s), a look every second, and the evicted one's lingering close
            # (2 s): about 4 s at most, whatever the load
            assert waited < 12
            # one made room, the oldest; the others are still sending
            first = tricklers[0]
            with trio.fail_after(10):
                await first.closed.wait()
            assert [t.closed.is_set() for t in tricklers] == [True] + [False] * (SLOTS - 1)
            assert connections.evicted == 1
            nursery.cancel_scope.cancel()
        head, _, body = first.answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), first.answer[:200]
        assert b"x-request-id: trickler-0\r\n" in head.lower() + b"\r\n"
        assert b"content-type: application/json" in head.lower()
        answer = json.loads(body)
        assert answer["error"] == "request timeout"
        assert answer["request_id"] == "trickler-0"
        assert "connection limit" in answer["detail"]
        assert server.pool.workers[0].served == 0  # no trickled body reached the model


async def test_a_slow_body_below_the_limit_is_let_be() -> None:
    """The rate is enforced only to make room: below the limit, a slow body has until
    --body-timeout, and is served if it comes in time."""
    settings = {"max_connections": SLOTS, "min_body_rate_grace": 0.5}
    async with running_server(scripted_config(), **settings) as server:
        await server.pool.wait_ready()
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        body = b'{"n": 12345678}'
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(
                b"POST /predict HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            for start in range(0, len(body), 2):  # 2 s, at 8 bytes a second
                await trio.sleep(0.25)
                await stream.send_all(body[start : start + 2])
            answer = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["echo"] == {"n": 12345678}
