"""Bad clients: arbitrary JSON, and slow, malformed or idle HTTP connections.

What comes back is what was sent, or a clear 4xx; never a 500. No client, however slow
or strange, holds a model or keeps other clients out.
"""

from __future__ import annotations

import json
import math
import re
import resource
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import error_body, hostile, running_server, scripted_config, wait_until
from serverproc import clean_env

# -- property tests, against the real command with the echo model ------------------


@pytest.fixture(scope="module")
def echo_service() -> Iterator[httpx.Client]:
    """`modelpool serve` with two echo models, for the whole module."""
    command = [sys.executable, "-m", "modelpool", "serve", "--port", "0", "--workers", "2"]
    command += ["--model-cmd", " ".join(hostile("echo.py"))]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, env=clean_env(), text=True)
    listening = threading.Event()
    url: list[str] = []

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if match := re.search(r"listening on (http://\S+)", line):
                url.append(match.group(1))
                listening.set()

    threading.Thread(target=read_log, daemon=True).start()
    try:
        assert listening.wait(20), "the service did not start"
        with httpx.Client(base_url=url[0], timeout=30) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(min_value=-(10**400), max_value=10**400)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0, 2**53 + 1])
        | text
    )
    return st.recursive(
        scalars, lambda inner: st.lists(inner) | st.dictionaries(text, inner), max_leaves=40
    )


# every code point, lone surrogates included (JSON can escape them: "\ud800")
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def same(a: object, b: object) -> bool:
    """Equal as JSON values: 1 and 1.0 differ in type, and -0.0 == 0.0 is fine."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return type(a) is type(b) and (a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@PROPERTY
@given(value=json_values(ANY_TEXT))
def test_any_json_value_comes_back_as_it_was_sent(echo_service: httpx.Client, value: object):
    body = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    response = echo_service.post("/predict", content=body)
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        assert same(response.json(), {"echo": value})
    else:
        assert response.status_code == 400
        assert response.json()["error"] == "bad request"


@PROPERTY
@given(body=st.binary(max_size=300))
def test_any_bytes_get_an_answer_or_a_clear_4xx(echo_service: httpx.Client, body: bytes):
    response = echo_service.post("/predict", content=body)
    assert response.status_code in (200, 400), response.text
    assert "error" in response.json() or "echo" in response.json()


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"[" * 199 + b"]" * 199, 200, None),
        (b"[" * 201 + b"]" * 201, 400, "nested deeper than 200"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested deeper than 200"),
        (b'{"x": 1e999}', 400, "a number is out of range"),
        (b"[" + b"9" * 5000 + b"]", 400, "Exceeds the limit (4300 digits)"),
        (b'"\\ud800\\udfff\\udc00"', 200, None),
        (b'{"a": 1, "a": 2}', 200, None),
        (b"\xef\xbb\xbf{}", 200, None),  # a byte order mark may be ignored (RFC 8259)
        (b'"\xff"', 400, "not UTF-8 (invalid start byte at byte 1)"),
        (b'"\x00\x00"', 200, None),  # not taken for UTF-16 because of the NULs
        (b'"\x00\x1f"', 200, None),
    ],
)
def test_edges_of_json(echo_service: httpx.Client, body: bytes, status: int, detail: str):
    response = echo_service.post("/predict", content=body)
    assert response.status_code == status, response.text
    if detail:
        assert detail in response.json()["detail"]


# -- slow, malformed and idle HTTP clients, against the service in this process ----


async def raw_connection(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


async def read_all(stream: trio.SocketStream, within: float = 5) -> bytes:
    data = b""
    with trio.fail_after(within):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_headers_trickled_a_byte_at_a_time_are_cut_off_and_hold_nothing() -> None:
    async with running_server(scripted_config(workers=1), keep_alive_timeout=1) as server:
        await server.pool.wait_ready()
        async with await raw_connection(server.url) as slow:
            started = trio.current_time()
            request = b"POST /predict HTTP/1.1\r\nHost: localhost\r\n"
            request += b'Content-Length: 8\r\n\r\n{"n": 1}'
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
                for byte in request:
                    await slow.send_all(bytes([byte]))
                    await trio.sleep(0.2)  # 16 s for the lot
                    # meanwhile another client is served at once, by the only model
                    quick = await server.client.post("/predict", json={"q": 1})
                    assert quick.status_code == 200
            assert trio.current_time() - started < 3  # the keep-alive timeout, plus slack
        assert server.pool.workers[0].served >= 1
        assert all(w.restarts == 0 for w in server.pool.workers)


async def test_a_body_that_never_finishes_gets_408_and_never_reaches_a_model() -> None:
    async with running_server(scripted_config(workers=1), body_timeout=1) as server:
        await server.pool.wait_ready()
        async with await raw_connection(server.url) as slow:
            await slow.send_all(
                b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n"
            )
            await slow.send_all(b'{"n": ')
            answer = await read_all(slow)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body)["error"] == "request timeout"
        # a client that hangs up half-way through its body
        async with await raw_connection(server.url) as rude:
            await rude.send_all(
                b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"
            )
        await trio.sleep(0.3)
        assert server.pool.workers[0].served == 0
        assert (await server.client.post("/predict", json={"n": 2})).json()["echo"] == {"n": 2}


async def test_huge_headers_are_refused_without_harm() -> None:
    async with running_server(scripted_config(workers=1)) as server:
        async with await raw_connection(server.url) as client:
            huge = b"X-Big: " + b"a" * 100_000 + b"\r\n"
            await client.send_all(b"POST /predict HTTP/1.1\r\nHost: localhost\r\n" + huge + b"\r\n")
            answer = await read_all(client)
        assert answer.startswith(b"HTTP/1.1 431 ") or answer.startswith(b"HTTP/1.1 400 ")
        assert (await server.client.post("/predict", json={"n": 1})).status_code == 200


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running_server(scripted_config(workers=2)) as server:
        async with await raw_connection(server.url) as client:
            requests = b""
            for n in range(3):
                body = json.dumps({"n": n, "sleep": 0.2 - n * 0.05}).encode()
                requests += b"POST /predict HTTP/1.1\r\nHost: localhost\r\n"
                requests += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            requests += b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            await client.send_all(requests)
            answer = await read_all(client)
        bodies = re.findall(rb"\r\n\r\n(\{[^\r]*?\})\n", answer)
        assert [json.loads(b)["echo"]["n"] for b in bodies[:3]] == [0, 1, 2]
        assert json.loads(bodies[3]) == {"status": "ok"}


async def test_thousands_of_idle_connections_keep_no_one_out() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    idle_count = min(1500, wanted // 2 - 100)  # both ends of each connection are in this process
    async with running_server(scripted_config(workers=1), max_connections=200) as server:
        await server.pool.wait_ready()
        idle = []
        try:
            for _ in range(idle_count):
                idle.append(await raw_connection(server.url))
            await trio.sleep(0.5)
            status = (await server.client.get("/status")).json()["connections"]
            assert status["open"] <= 200
            # a new client gets in at once: the longest-idle connections make room
            started = trio.current_time()
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as newcomer:
                response = await newcomer.post("/predict", json={"n": 1})
            assert response.json()["echo"] == {"n": 1}
            assert trio.current_time() - started < 2
            status = (await server.client.get("/status")).json()["connections"]
            assert status["evicted_idle"] >= idle_count - 200
            assert status["open"] <= 200
        finally:
            for stream in idle:
                await stream.aclose()
        await wait_until(lambda: server.service.connections.open <= 2, 10, "the idle ones gone")


async def test_a_connection_with_a_request_in_progress_is_never_evicted() -> None:
    async with running_server(scripted_config(workers=1), max_connections=3) as server:
        await server.pool.wait_ready()
        answers: list[httpx.Response] = []

        async def slow_request() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as own:
                answers.append(await own.post("/predict", json={"sleep": 1.5}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_request)
            await wait_until(lambda: server.pool.workers[0].state == "busy", 5, "busy")
            newcomers = [await raw_connection(server.url) for _ in range(6)]
            for stream in newcomers:
                await stream.aclose()
        assert answers[0].status_code == 200
        error_body(await server.client.post("/predict", content=b"{"), 400, "bad request")


async def test_a_connection_the_client_closed_stops_counting_at_once() -> None:
    # hypercorn alone would keep each one as open until its keep-alive timer ran out
    async with running_server(scripted_config(workers=1), keep_alive_timeout=60) as server:
        for _ in range(50):
            async with await raw_connection(server.url) as client:
                await client.send_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                answer = b""
                while not answer.endswith(b'"ok"}\n'):
                    answer += await client.receive_some(4096)
        await wait_until(lambda: server.service.connections.open <= 1, 2, "closed connections")
