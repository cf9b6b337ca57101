"""HTTP/1.1 at its edges: clients that never read their answers, ambiguous message
framing, OPTIONS, lingering closes, bytes after a request that closes its connection,
and requests h11 cannot parse; over real sockets to a real server on loopback.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from conftest import (
    FAST_PREDICT_VARIABLE,
    SCRIPTED,
    error_body,
    running_server,
    scripted_config,
    wait_until,
)
from modelpool.http.listener import LINGER
from serverproc import server_process, wait_listening, wait_ready

ANSWER_BYTES = 6 * 2**20  # more than the kernel buffers on loopback hold (4 MiB sent, a
# few KiB received): a server writing it to a client that reads nothing has to wait
MAX_BODY = str(8 * 2**20)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def connect(url: str, receive_buffer: int) -> trio.SocketStream:
    """A connection whose receive buffer is `receive_buffer` bytes, set before connecting
    (so the window it offers the server stays that small)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(address(url))
    return trio.SocketStream(sock)


def large_echo_request() -> bytes:
    """POST /predict whose answer (the echo model's) is ANSWER_BYTES and more."""
    body = json.dumps({"pad": "x" * ANSWER_BYTES}).encode()
    head = b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def clients_that_never_read(url: str, count: int) -> list[trio.SocketStream]:
    """`count` clients, each asking for a large answer and then reading none of it."""
    clients = []
    for _ in range(count):
        stream = await connect(url, 4096)
        await stream.send_all(large_echo_request())
        clients.append(stream)
    return clients


async def served(client: httpx.AsyncClient) -> int:
    return sum(w["served"] for w in (await client.get("/status")).json()["workers"])


async def stall(url: str, client: httpx.AsyncClient, count: int) -> list[trio.SocketStream]:
    """`count` clients that never read, once every one of their answers is computed."""
    stalled = await clients_that_never_read(url, count)
    with trio.fail_after(20):
        while await served(client) < count:
            await trio.sleep(0.1)
    return stalled


async def test_clients_that_never_read_their_answers_keep_no_one_out_nor_hold_up_a_stop() -> None:
    args = ("--model-cmd", " ".join(SCRIPTED), "--workers", "1", "--max-connections", "3")
    async with server_process(*args, "--max-body", MAX_BODY) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 1, within=15)
            # the status client's own connection is one of the three
            stalled = await stall(server.url, client, 2)
        await trio.sleep(0.5)  # both answers are being written, and stuck
        stalled += await clients_that_never_read(server.url, 1)  # takes the last slot
        await trio.sleep(2)  # every connection now waits on a client that does not read
        # a newcomer is served: one that has not read for a second makes room for it
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as newcomer:
                assert (await newcomer.get("/healthz")).json() == {"status": "ok"}
        # SIGTERM stops the service within its bounds, the clients still connected
        started = trio.current_time()
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=15) == 0
        assert trio.current_time() - started < 8
        for stream in stalled:
            await stream.aclose()


async def test_sigterm_stops_the_service_in_time_while_a_client_reads_nothing() -> None:
    args = ("--model-cmd", " ".join(SCRIPTED), "--workers", "1", "--max-body", MAX_BODY)
    async with server_process(*args) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 1, within=15)
            stalled = await stall(server.url, client, 1)
        await trio.sleep(0.5)  # its answer is being written, and stuck
        started = trio.current_time()
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=15) == 0
        assert trio.current_time() - started < 8
        await stalled[0].aclose()


async def test_a_second_signal_stops_at_once_while_clients_read_nothing() -> None:
    args = ("--model-cmd", " ".join(SCRIPTED), "--workers", "1", "--timeout", "60")
    async with server_process(*args, "--max-body", MAX_BODY) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 1, within=15)
            stalled = await stall(server.url, client, 2)
            answers: list[httpx.Response] = []

            async def long_request() -> None:  # keeps the graceful stop draining for 30 s
                answers.append(await client.post("/predict", json={"sleep": 30}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_request)
                await trio.sleep(1)
                server.proc.send_signal(signal.SIGTERM)
                await trio.sleep(0.5)
                started = trio.current_time()
                server.proc.send_signal(signal.SIGTERM)
                assert await server.exit_code(within=15) == 0
                # at once: well before the 30 s the graceful stop would take (a margin
                # for a loaded 2-core machine, where the exit itself took 3.6 s)
                assert trio.current_time() - started < 10
            error_body(answers[0], 503, "shutting down")
        for stream in stalled:
            await stream.aclose()


async def test_a_client_that_reads_nothing_for_the_keep_alive_timeout_is_let_go() -> None:
    config = scripted_config(workers=1)
    async with running_server(config, keep_alive_timeout=1, max_body=8 * 2**20) as server:
        await server.pool.wait_ready()
        connections = server.service.connections
        assert connections is not None
        async with (await clients_that_never_read(server.url, 1))[0]:
            await wait_until(lambda: server.pool.workers[0].served == 1, 20, "answered")
            await trio.sleep(0.5)
            assert connections.open == 1  # its answer is being written, and stuck
            await wait_until(lambda: connections.open == 0, 5, "the connection closed")


async def test_a_slow_reader_gets_all_of_a_large_answer() -> None:
    # The bound is on a write making no progress, not on how long the whole answer takes.
    config = scripted_config(workers=1)
    async with running_server(config, keep_alive_timeout=1, max_body=8 * 2**20) as server:
        await server.pool.wait_ready()
        started = trio.current_time()
        async with await connect(server.url, 2**16) as slow:
            await slow.send_all(large_echo_request())
            answer = b""
            with trio.fail_after(60):
                while not answer.endswith(b"}\n"):
                    answer += await slow.receive_some(2**16)
                    await trio.sleep(0.05)  # at most 1.3 MB/s: 96 reads, 5 s
        assert trio.current_time() - started > 3  # well past the keep-alive timeout
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert json.loads(body)["echo"]["pad"] == "x" * ANSWER_BYTES


async def read_until_closed(stream: trio.SocketStream, within: float = 5) -> bytes:
    data = b""
    with trio.fail_after(within):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    """A body httpx sends with `Transfer-Encoding: chunked`."""
    for part in parts:
        yield part


async def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # RFC 9112 section 6.1: such a message may be an attempt at request smuggling.
    caplog.set_level(logging.INFO)
    async with running_server(scripted_config(workers=1)) as server:
        await server.pool.wait_ready()
        async with await trio.open_tcp_stream(*address(server.url)) as client:
            request = b"POST /predict HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: smuggler-1\r\n"
            request += b"Content-Length: 5\r\n"
            request += b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"n":\r\n0\r\n\r\n'
            smuggled = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            await client.send_all(request + smuggled)
            answer = await read_until_closed(client)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert b"connection: close" in head.lower()
        assert b"x-request-id: smuggler-1" in head.lower()
        assert b"content-type: application/json" in head.lower()
        detail = json.loads(body)
        assert detail["error"] == "bad request"
        assert detail["request_id"] == "smuggler-1"
        assert "Content-Length" in detail["detail"] and "Transfer-Encoding" in detail["detail"]
        assert answer.count(b"HTTP/1.1 ") == 1  # the request after it was not served
        assert server.pool.workers[0].served == 0
        assert any("smuggler-1" in r.getMessage() for r in caplog.records)  # for the operator
        # either header alone is served as ever
        chunked = await server.client.post("/predict", content=chunks([b'{"n":', b" 1}"]))
        assert chunked.json()["echo"] == {"n": 1}
        assert (await server.client.post("/predict", json={"n": 2})).json()["echo"] == {"n": 2}


async def test_options_answers_in_json_with_allow() -> None:
    async with running_server(scripted_config(workers=1)) as server:
        for path, allowed in (("/predict", ["OPTIONS", "POST"]), ("/healthz", ["GET", "HEAD"])):
            response = await server.client.options(path)
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            methods = [m.strip() for m in response.headers["allow"].split(",")]
            assert set(allowed) <= set(methods)
            assert sorted(response.json()["allow"]) == sorted(methods)
            assert response.headers["x-request-id"]


REFUSED_MID_REQUEST = {
    "413": b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n\r\n",
    "400": (
        b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    ),
    "431": b"POST /predict HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000,
}


@pytest.mark.parametrize("status", sorted(REFUSED_MID_REQUEST))
async def test_a_client_still_sending_when_refused_reads_its_answer_not_a_reset(
    status: str,
) -> None:
    """Refused before its request was read to its end (a body over the limit, an
    ambiguous framing, headers over h11's limit), a client that goes on sending for a
    while, as a client does not know it was refused until it reads, can still send,
    and then reads its answer: the connection lingers instead of being reset."""
    async with running_server(scripted_config(), max_body=1000) as server:
        stream = await trio.open_tcp_stream(*address(server.url))
        async with stream:
            await stream.send_all(REFUSED_MID_REQUEST[status])
            await trio.sleep(0.3)  # the answer has come, and the server closed its end
            for _ in range(5):
                await stream.send_all(b"x" * 20_000)  # a reset would refuse these
                await trio.sleep(0.05)
            answer = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 %s " % status.encode()), answer[:200]
        assert (await server.client.post("/predict", json={"n": 1})).status_code == 200


REFUSED_ON_HEADERS = {  # settings under which the request below is refused on its headers
    "413": {"max_body": 100},
    "401": {"api_key": "k"},
}
BODY = json.dumps({"x": "y" * 200}).encode()


@pytest.mark.parametrize("fast", ["0", "1"], ids=["quart", "fastpath"])
@pytest.mark.parametrize("status", sorted(REFUSED_ON_HEADERS))
async def test_a_refusal_answered_before_its_body_came_says_the_connection_closes(
    monkeypatch: pytest.MonkeyPatch, status: str, fast: str
) -> None:
    """A request refused on its headers, whose body comes after the answer (a client
    writes its headers and its body apart, as httpx does), is answered with `Connection:
    close`, since the connection is closed after it. Without it, a client that took the
    connection to go on sent its next request into it, and got "Server disconnected
    without sending a response" (seen once in a few hundred such pairs, under load)."""
    monkeypatch.setenv(FAST_PREDICT_VARIABLE, fast)  # read as the service starts
    settings = REFUSED_ON_HEADERS[status]
    async with running_server(scripted_config(), **settings) as server:
        await server.pool.wait_ready()
        head = b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        stream = await trio.open_tcp_stream(*address(server.url))
        async with stream:
            await stream.send_all(head + b"Content-Length: %d\r\n\r\n" % len(BODY))
            answer = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in answer:  # the answer's head, before the body is sent
                    answer += await stream.receive_some(65536)
                await stream.send_all(BODY)
                while chunk := await stream.receive_some(65536):  # then the end: closed
                    answer += chunk
        headers = answer.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
        assert headers[0].startswith(b"http/1.1 %s " % status.encode()), answer[:300]
        assert b"connection: close" in headers, answer[:300]
        # httpx writes a request's headers and body apart: refused, then answered
        key = {"Authorization": "Bearer k"} if "api_key" in settings else {}
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for _ in range(20):
                refused = await client.post("/predict", content=BODY)
                assert refused.status_code == int(status)
                answered = await client.post("/predict", json={"n": 1}, headers=key)
                assert answered.status_code == 200, answered.text


SILENT_AFTER = {  # requests refused before their end, whose clients then neither send nor close
    "413": b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n\r\n",
    "408": b'POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"n"',
}
BOTH_PATHS = pytest.mark.parametrize("fast", ["0", "1"], ids=["quart", "fastpath"])


async def answer_then_silence(url: str, request: bytes) -> tuple[trio.SocketStream, bytes]:
    """Send `request`, read its answer (to the service's end of sending), and send nothing
    more: the stream, left open, and the answer."""
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(request)
    answer = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return stream, answer


@BOTH_PATHS
@pytest.mark.parametrize("status", sorted(SILENT_AFTER))
async def test_a_silent_client_after_a_refusal_is_let_go_within_the_linger_bound(
    monkeypatch: pytest.MonkeyPatch, status: str, fast: str
) -> None:
    monkeypatch.setenv(FAST_PREDICT_VARIABLE, fast)  # read as the service starts
    async with running_server(scripted_config(), max_body=1000, body_timeout=0.5) as server:
        await server.pool.wait_ready()
        connections = server.service.connections
        assert connections is not None
        stream, answer = await answer_then_silence(server.url, SILENT_AFTER[status])
        async with stream:
            assert answer.startswith(b"HTTP/1.1 %s " % status.encode()), answer[:200]
            # the lingering close ends after LINGER (2 s), its socket closed: a margin for
            # a busy machine, far below the keep-alive timeout (75 s) it used to wait on
            await wait_until(lambda: connections.open == 0, LINGER + 3, "the connection closed")


async def test_sigterm_does_not_wait_on_a_silent_client_after_a_refusal() -> None:
    args = ("--model-cmd", " ".join(SCRIPTED), "--workers", "1", "--max-body", "1000")
    async with server_process(*args) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 1, within=15)
        stream, answer = await answer_then_silence(server.url, SILENT_AFTER["413"])
        async with stream:
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
            started = trio.current_time()
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exit_code(within=15) == 0
            # it waited for the response slack (2 s) and more; the stop itself takes a
            # third of that (see the next test for the connection's own close)
            assert trio.current_time() - started < LINGER


async def test_a_lingering_close_ends_as_soon_as_the_service_stops() -> None:
    """As an idle connection: closed once the pool has stopped, not LINGER later."""
    async with running_server(scripted_config(), max_body=1000) as server:
        await server.pool.wait_ready()
        connections = server.service.connections
        assert connections is not None
        stream, answer = await answer_then_silence(server.url, SILENT_AFTER["413"])
        async with stream:
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
            assert connections.open == 1  # lingering, for up to LINGER
            server.service.shutdown()
            with trio.fail_after(10):
                await server.pool.stopped.wait()
            # at once, but for a turn of the scheduler on a busy machine; LINGER (2 s) is
            # what it waited before
            await wait_until(lambda: connections.open == 0, LINGER / 2, "the connection closed")


def request_then(method: str, path: str, version: str, close: bool, body: bytes | None) -> bytes:
    head = [f"{method} {path} HTTP/{version}", "Host: localhost", "X-Request-ID: first-1"]
    if close:
        head.append("Connection: close")
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    return "\r\n".join([*head, "", ""]).encode() + (body or b"")


PREDICT = b'{"n": 7}'
CLOSING_REQUESTS = {  # a request that closes its connection, and what its client sends after it
    "predict, Connection: close, CRLF": (
        request_then("POST", "/predict", "1.1", True, PREDICT),
        b"\r\n",
    ),
    "predict, Connection: close, a request": (
        request_then("POST", "/predict", "1.1", True, PREDICT),
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ),
    "predict, HTTP/1.0, bytes": (request_then("POST", "/predict", "1.0", False, PREDICT), b"junk!"),
    "healthz, Connection: close, CRLF": (
        request_then("GET", "/healthz", "1.1", True, None),
        b"\r\n",
    ),
    "healthz, HTTP/1.0, bytes": (request_then("GET", "/healthz", "1.0", False, None), b"\r\nxx"),
}


@BOTH_PATHS
@pytest.mark.parametrize("case", list(CLOSING_REQUESTS))
async def test_a_request_that_closes_its_connection_gets_its_answer_whatever_follows(
    monkeypatch: pytest.MonkeyPatch, case: str, fast: str
) -> None:
    monkeypatch.setenv(FAST_PREDICT_VARIABLE, fast)  # read as the service starts
    request, after = CLOSING_REQUESTS[case]
    async with running_server(scripted_config()) as server:
        await server.pool.wait_ready()
        async with await trio.open_tcp_stream(*address(server.url)) as stream:
            await stream.send_all(request + after)  # at once: in the same read, as a rule
            answer = await read_until_closed(stream, within=10)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1."), answer[:300]
        assert head.split(b" ")[1] == b"200", answer[:300]
        assert b"x-request-id: first-1\r\n" in head.lower() + b"\r\n"
        assert len(re.findall(rb"HTTP/1\.[01] \d{3} ", answer)) == 1  # nothing after it answered
        if b"/predict" in request:
            assert json.loads(body)["echo"] == {"n": 7}
            assert server.pool.workers[0].served == 1
        else:
            assert json.loads(body) == {"status": "ok"}


MALFORMED = {  # what h11 cannot parse: (the request, its status, its error)
    "a signed Content-Length": (
        b'POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: +7\r\n\r\n{"n": 1}',
        400,
        "bad request",
    ),
    "a NUL in a header": (
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Note: a\x00b\r\n\r\n",
        400,
        "bad request",
    ),
    "headers over the limit": (  # not yet at their end, and over h11's 16 KiB already
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000,
        431,
        "request header fields too large",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_request_h11_cannot_parse_gets_a_json_error_with_a_request_id(case: str) -> None:
    request, status, error = MALFORMED[case]
    async with running_server(scripted_config()) as server:
        await server.pool.wait_ready()
        async with await trio.open_tcp_stream(*address(server.url)) as stream:
            await stream.send_all(request)
            answer = await read_until_closed(stream, within=10)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), answer[:300]
        headers = dict(
            line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
        )
        assert headers[b"content-type"] == b"application/json"
        assert headers[b"connection"] == b"close"
        detail = json.loads(body)
        assert detail["error"] == error
        assert detail["detail"]  # h11's reason, for the client
        assert re.fullmatch(r"[0-9a-f]{16}", detail["request_id"])
        assert headers[REQUEST_ID] == detail["request_id"].encode()
        assert server.pool.workers[0].served == 0


REQUEST_ID = b"x-request-id"
