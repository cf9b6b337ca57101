"""POST /predict answered by fastpath.py is, on the wire, in the metrics and in the access
log, the very answer the quart-trio app gives: both paths run side by side and are sent
the same requests, byte for byte, and must answer them byte for byte alike (but for the
Date header and the request ids each service makes up).

The rest of the HTTP suite runs against whichever path the environment picks (run it
once more with MODELPOOL_FAST_PREDICT=0 for the quart path: conftest.fast_predict).
"""

from __future__ import annotations

import gc
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from conftest import (
    FAST_PREDICT_VARIABLE,
    RunningServer,
    hostile_config,
    running_server,
    scripted_config,
)
from modelpool.cli.parser import parse
from modelpool.http.fastpath import Predictions

KEY = "a-key-for-the-tests-of-the-fast-path"
MAX_BODY = 1000


def raw(method: str, target: str, headers: list[str], body: bytes | None = None) -> bytes:
    """A raw HTTP/1.1 request (its empty header lines left out), closing its connection."""
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *filter(None, headers)]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join([*lines, "Connection: close", "", ""]).encode() + (body or b"")


def post(body: bytes, *headers: str, target: str = "/predict") -> bytes:
    return raw("POST", target, list(headers), body)


def chunked(parts: list[bytes], *headers: str) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    return raw("POST", "/predict", [*headers, "Transfer-Encoding: chunked"]) + body


def requests(auth: str) -> list[tuple[str, bytes]]:
    """What both paths are sent: (what it is, the raw request)."""
    big = b"[" + b"1," * 600 + b"1]"
    return [
        ("an answer", post(b'{"n": 1}', auth)),
        ("the client's request id", post(b'{"n": 2}', auth, "X-Request-ID: mine-1")),
        ("an insane request id", post(b'{"n": 3}', auth, "X-Request-ID: not sane!")),
        ("two request ids", post(b"[3]", auth, "X-Request-ID: first", "X-Request-ID: second")),
        ("a query string", post(b'{"n": 4}', auth, target="/predict?x=1")),
        ("a chunked body", chunked([b'{"n":', b" 5}"], auth)),
        ("not JSON", post(b"{nope", auth)),
        ("an empty body", post(b"", auth)),
        ("NaN", post(b'{"n": NaN}', auth)),
        ("the schema refuses it", post(b'{"m": 1}', auth)),
        ("too large, said at once", post(big, auth)),
        ("too large, as it streams", chunked([big[:600], big[600:]], auth)),
        ("the model crashes", post(b'{"exit": 3, "stderr": "boom"}', auth)),
        ("another path", post(b'{"n": 6}', auth, target="/predict/")),
        ("GET", raw("GET", "/predict", [auth])),
        ("HEAD", raw("HEAD", "/predict", [auth])),
        ("OPTIONS", raw("OPTIONS", "/predict", [auth])),
        ("no key", post(b'{"n": 7}')),
        ("a wrong key", post(b'{"n": 8}', "Authorization: Bearer wrong")),
        ("HTTP/1.0", post(b'{"n": 9}', auth).replace(b"HTTP/1.1", b"HTTP/1.0", 1)),
    ]


async def exchange(url: str, request: bytes, pause_after: int | None = None) -> bytes:
    """Send `request` raw (pausing after `pause_after` bytes if asked), read to the end."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        if pause_after is None:
            await stream.send_all(request)
        else:
            await stream.send_all(request[:pause_after])
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


def normalised(answer: bytes, own_ids: set[str]) -> bytes:
    """The answer without its Date, the service's pid and the ids the service made up."""
    answer = re.sub(rb"(?im)^date: .*\r\n", b"", answer)
    answer = re.sub(rb'"pid": \d+', b'"pid": PID', answer)
    for request_id in re.findall(rb"(?i)x-request-id: ([^\r]*)\r\n", answer):
        if request_id.decode() in own_ids:
            answer = answer.replace(request_id, b"ID")
    return answer


def made_up_ids(answer: bytes) -> set[str]:
    """Request ids of the service's own making (16 hex digits) in an answer."""
    return {m.decode() for m in re.findall(rb"\b[0-9a-f]{16}\b", answer)}


@asynccontextmanager
async def both_paths(
    monkeypatch: pytest.MonkeyPatch, **server: object
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """The quart path and the fast path, side by side, each with its own scripted model."""
    schema = {"not": {"required": ["m"]}}
    async with AsyncExitStack() as stack:
        started = []
        for fast in ("0", "1"):
            monkeypatch.setenv(FAST_PREDICT_VARIABLE, fast)  # read as the service starts
            pool = scripted_config(request_schema=schema)
            started.append(await stack.enter_async_context(running_server(pool, **server)))
            await started[-1].pool.wait_ready()
            gc.collect()  # those of services stopped before are gone
            fast_apps = sum(isinstance(o, Predictions) for o in gc.get_objects())
            assert fast_apps == int(fast), "the switch did not pick the path asked for"
        yield started[0], started[1]


def access_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[str, dict]]:
    """The access log records of one service (told apart by the client's port range)."""
    found = []
    for record in caplog.records:
        if record.name == "modelpool.access" and getattr(record, "service", None) == name:
            fields = {k: getattr(record, k) for k in ("client", "method", "path", "status")}
            fields["timed"] = [getattr(record, k) is None for k in ("queue_wait", "compute")]
            message = re.sub(r"\d+\.\d{3}s", "T", record.getMessage())
            found.append((re.sub(r"pid=\d+", "pid=P", message), fields))
    return found


@pytest.mark.parametrize("api_key", [None, KEY])
async def test_both_paths_answer_alike_on_the_wire_in_metrics_and_in_the_access_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, api_key: str | None
) -> None:
    auth = "" if api_key is None else f"Authorization: Bearer {KEY}"
    sent = requests(auth)
    caplog.set_level(logging.INFO, "modelpool.access")
    options = {"max_body": MAX_BODY, "access_log": True, "api_key": api_key}
    async with both_paths(monkeypatch, **options) as (quart, fast):
        for what, request in sent:
            answers = []
            for name, server in (("quart", quart), ("fast", fast)):
                with _tagged(name):
                    raw = await exchange(server.url, request)
                answers.append(normalised(raw, made_up_ids(raw)))
                await server.pool.wait_ready()  # a crashed model is back before the next
            assert answers[0] == answers[1], what
            assert answers[0].startswith(b"HTTP/1."), what
        outcomes = ("ok", "bad_request", "model_failed", "client_gone")
        counts = [
            {o: s.pool.metrics.value("modelpool_requests_total", outcome=o) for o in outcomes}
            for s in (quart, fast)
        ]
        assert counts[0] == counts[1]
        assert counts[1]["ok"] and counts[1]["bad_request"] and counts[1]["model_failed"]
        assert access_lines(caplog, "quart") == access_lines(caplog, "fast")
        assert len(access_lines(caplog, "fast")) >= len(sent) - 2


async def test_a_result_in_standard_json_is_sent_as_the_model_wrote_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not written again: its values are the same either way, and writing a vector of
    floats again was the service's dearest work for a request. A result line that is
    not standard JSON as it stands (a raw control character in a string, which the
    parser lets through; a key twice in an object) is written again; so is one whose id
    field is taken out."""
    as_written = '{"v": [1.5, 2.25e-07, 12345678901234567890],  "s": "\u00e9 é"}'
    with_a_tab = '{"t": "a\tb", "n": 1}'
    twice = '{"k": 1, "k": 2}'  # readers differ: the last one, as before
    async with both_paths(monkeypatch) as servers:
        for server in servers:
            for line, body in (
                (as_written, as_written.encode() + b"\n"),
                (with_a_tab, b'{"t": "a\\tb", "n": 1}\n'),
                (twice, b'{"k": 2}\n'),
            ):
                request = json.dumps({"raw": "result: " + line}).encode()
                answer = await exchange(server.url, post(request))
                head, _, got = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), answer
                assert got == body, (got, body)
                assert b"content-length: %d" % len(body) in head.lower(), head
                value = await server.pool.predict({"raw": "result: " + line})
                assert type(value) is not dict and value == json.loads(line, strict=False)
    config = hostile_config("echo.py", id_field="rid", env={"ECHO_ID_FIELD": "rid"})
    async with running_server(config) as server:
        await server.pool.wait_ready()
        answer = await exchange(server.url, post(b'{"x": 1}'))
        got = answer.partition(b"\r\n\r\n")[2]
        assert got == b'{"echo": {"x": 1}}\n', got  # written again, without its id


def kept_open(request: bytes, *headers: bytes) -> bytes:
    """`request` without its `Connection: close` (and with `headers`, if given)."""
    return request.replace(b"Connection: close\r\n", b"".join(h + b"\r\n" for h in headers))


async def read_answer(stream: trio.SocketStream, buffered: bytes) -> tuple[bytes, bytes]:
    """One whole answer (its Content-Length says where it ends), and what came after it."""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in buffered:
            buffered += await stream.receive_some(65536)
        head, _, rest = buffered.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        while len(rest) < length:
            rest += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


async def keep_alive_exchange(url: str, requests: list[bytes], pipelined: bool) -> list[bytes]:
    """Send `requests` on one connection, one after the other's answer or all at once;
    the answers, and then what the connection gives until it closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    answers = []
    async with stream:
        if pipelined:
            await stream.send_all(b"".join(requests))
        buffered = b""
        for request in requests:
            if not pipelined:
                await stream.send_all(request)
            answer, buffered = await read_answer(stream, buffered)
            answers.append(answer)
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                buffered += chunk
    return [*answers, buffered]


@pytest.mark.parametrize("pipelined", [False, True])
async def test_both_paths_answer_alike_on_a_connection_that_goes_on(
    monkeypatch: pytest.MonkeyPatch, pipelined: bool
) -> None:
    """Requests after the first on one connection, answered by either path, in turn or
    sent all at once (the fast path frames these answers itself)."""
    sent = [
        kept_open(post(b'{"n": 1}', "X-Request-ID: one")),
        kept_open(post(b'{"n": 2}', "X-Request-ID: two"), b"Connection: keep-alive"),
        kept_open(post(b"{nope", "X-Request-ID: three")),
        kept_open(raw("GET", "/healthz", ["X-Request-ID: four"])),
        kept_open(post(b'{"n": 3}', "X-Request-ID: five"), b"Connection: Keep-Alive, close"),
    ]
    async with both_paths(monkeypatch) as (quart, fast):
        answers = [await keep_alive_exchange(s.url, sent, pipelined) for s in (quart, fast)]
    assert len(answers[1]) == len(sent) + 1
    for mine, theirs in zip(answers[0], answers[1], strict=True):
        assert normalised(mine, set()) == normalised(theirs, set())
    statuses = [answer.split(b" ", 2)[1] for answer in answers[1][:-1]]
    assert statuses == [b"200", b"200", b"400", b"200", b"200"]
    assert b'{"n": 2}' in answers[1][1] and b"x-request-id: two" in answers[1][1]
    assert answers[1][-1] == b""  # closed after the last, which asked for it


async def test_both_paths_give_408_to_a_body_that_stalls_and_count_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = post(b'{"n": 1}', "X-Request-ID: slow-1")
    async with both_paths(monkeypatch, body_timeout=0.3) as (quart, fast):
        answers = [
            await exchange(s.url, request, pause_after=len(request) - 3) for s in (quart, fast)
        ]
        assert answers[0].startswith(b"HTTP/1.1 408 ")
        assert normalised(answers[0], set()) == normalised(answers[1], set())
        for server in (quart, fast):
            counted = server.pool.metrics.value("modelpool_requests_total", outcome="bad_request")
            assert counted == 1
            assert server.pool.workers[0].served == 0  # never reached the model


async def test_both_paths_cancel_a_request_whose_client_hangs_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = post(b'{"sleep": 1}')
    async with both_paths(monkeypatch) as servers:
        for server in servers:
            host, port = server.url.removeprefix("http://").rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(request)
            while server.pool.workers[0].state != "busy":
                await trio.sleep(0.02)
            await stream.aclose()
            with trio.fail_after(10):
                while (
                    server.pool.metrics.value("modelpool_requests_total", outcome="client_gone")
                    != 1
                ):
                    await trio.sleep(0.02)


def test_the_switch_is_an_option_on_by_default(tmp_path) -> None:
    def fast(argv: list[str], environ: dict[str, str]) -> bool:
        return parse(["serve", *argv], environ)[1].config.fast_predict

    config = tmp_path / "modelpool.toml"
    config.write_text("fast-predict = false\n")
    assert FAST_PREDICT_VARIABLE == "MODELPOOL_FAST_PREDICT"
    assert fast([], {}) and fast([], {FAST_PREDICT_VARIABLE: "1"})
    assert not fast([], {FAST_PREDICT_VARIABLE: "0"})
    assert not fast([], {FAST_PREDICT_VARIABLE: " off "})
    assert not fast(["--no-fast-predict"], {})
    assert not fast(["--config", str(config)], {})
    assert fast(["--config", str(config)], {FAST_PREDICT_VARIABLE: "yes"})  # the variable first


class _tagged:
    """Tag the access records written meanwhile with the service that wrote them."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.filter = _Tag(self.name)
        logging.getLogger("modelpool.access").addFilter(self.filter)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("modelpool.access").removeFilter(self.filter)


class _Tag(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.service = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        return True
