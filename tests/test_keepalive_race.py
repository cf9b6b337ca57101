"""A request that reaches an idle connection as its keep-alive timeout runs out is answered.

The keep-alive timer and the connection's reading task can wake in the same turn of the
service's loop: the request came just in time, or the loop was held up (a busy machine,
a fork) while both the request and the deadline came. The timer ran first and closed the
connection with the request unread: its client, which had sent it within the timeout,
got a reset and no answer (one request in thousands in the chaos session).

Here the service is stopped (SIGSTOP) while its connections are idle, a request is sent
on each, and it is continued (SIGCONT) once their timeout has passed: it then finds
every deadline passed and every request waiting in the same turn. (On Linux the loop's
epoll_wait, stopped and continued, returns no events at first, so the timers always
woke first: every connection was reset.)
"""

from __future__ import annotations

import json
import os
import re
import signal

import trio

from conftest import hostile
from serverproc import server_process, wait_listening, wait_ready

KEEP_ALIVE = 2.0  # the service's --keep-alive-timeout
CONNECTIONS = 16


def request(index: int) -> bytes:
    body = json.dumps({"n": index}).encode()
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


async def answer(stream: trio.SocketStream) -> str:
    """The status line and body of one response, or how the connection ended without one."""
    data = b""
    try:
        with trio.fail_after(20):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                if not chunk:
                    return "closed without an answer"
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            assert match is not None, head
            while len(body) < int(match.group(1)):
                chunk = await stream.receive_some()
                if not chunk:
                    return "closed half-way through its answer"
                body += chunk
    except trio.BrokenResourceError as exc:
        return f"reset: {exc.__cause__ or exc}"
    status = int(head.split(b" ", 2)[1])
    return f"{status} {body.decode().strip()}"


async def test_a_request_that_comes_as_the_keep_alive_timeout_ends_is_answered() -> None:
    args = ["--workers", "2", "--keep-alive-timeout", str(KEEP_ALIVE)]
    async with server_process(*args, "--model-cmd", " ".join(hostile("echo.py"))) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 2, within=30)
        port = int(server.url.rsplit(":", 1)[1])
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(CONNECTIONS)]
        try:
            for index, stream in enumerate(streams):
                await stream.send_all(request(index))
            firsts = [await answer(stream) for stream in streams]
            assert all(first.startswith("200 ") for first in firsts), firsts
            # every connection idle now, its timeout KEEP_ALIVE away: the service is held
            # before any of them runs out, a request sent on each, and it goes on after
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                for index, stream in enumerate(streams):
                    await stream.send_all(request(100 + index))
                await trio.sleep(KEEP_ALIVE + 0.5)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            seconds = [await answer(stream) for stream in streams]
        finally:
            for stream in streams:
                await stream.aclose()
        expected = [f'200 {{"echo": {{"n": {100 + i}}}}}' for i in range(CONNECTIONS)]
        assert seconds == expected
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=30) == 0
