#!/usr/bin/env python3
"""An echo model that waits for requests in an event loop, not in a read(2) of stdin.

EVENT_LOOP=select (default): select.select on fd 0, then a non-blocking os.read;
EVENT_LOOP=asyncio: asyncio's loop (epoll) reading stdin through a pipe transport.
Its waiting cannot be seen from outside, so the service keeps its quiet-period rule.
A request {"sleep": s} is answered after s seconds; after answering {"flood": true} it
prints lines that are not results for ever, never reading again.
"""

import asyncio
import json
import os
import select
import sys
import time


def answer(line: bytes, count: int) -> None:
    request = json.loads(line)
    time.sleep(request.get("sleep", 0))
    result = {"echo": request, "pid": os.getpid(), "count": count}
    os.write(1, f"result: {json.dumps(result)}\n".encode())
    while request.get("flood"):
        os.write(1, b"noise that is not a result\n" * 2200)


def with_select() -> None:
    os.set_blocking(0, False)
    buffer, count = b"", 0
    while True:
        select.select([0], [], [])
        chunk = os.read(0, 65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            count += 1
            answer(line, count)


async def with_asyncio() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    count = 0
    while line := await reader.readline():
        count += 1
        answer(line, count)


os.write(1, b"ready: Model-initialized\n")
if os.environ.get("EVENT_LOOP", "select") == "asyncio":
    asyncio.run(with_asyncio())
else:
    with_select()
