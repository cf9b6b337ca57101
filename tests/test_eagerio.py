"""Eager reads and writes (core/eagerio.py) on real pipes: what they return, when they
wait, that they still let other tasks run, and how a closed or broken pipe shows."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from modelpool.core.eagerio import EagerReader, write_now


def pipe() -> tuple[trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
    """A pipe as trio makes a process's: non-blocking FdStreams, read end first."""
    read_fd, write_fd = os.pipe()
    return trio.lowlevel.FdStream(read_fd), trio.lowlevel.FdStream(write_fd)


async def test_a_read_returns_what_came_and_waits_for_more_only_when_there_is_none() -> None:
    reader_end, writer_end = pipe()
    async with reader_end, writer_end:
        reader = EagerReader(reader_end.fileno, 1024)
        assert write_now(writer_end.fileno(), b"first\n") == 6
        assert await reader.receive_some() == b"first\n"
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _collect(reader, got))
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # nothing came: it waits
            write_now(writer_end.fileno(), b"second\n")
        assert got == [b"second\n"]
        await writer_end.aclose()
        assert await reader.receive_some() == b""  # the writer is gone: the end


async def _collect(reader: EagerReader, into: list[bytes]) -> None:
    into.append(await reader.receive_some())


async def test_a_stream_that_always_has_data_still_lets_other_tasks_run() -> None:
    """At most two reads between two turns of the scheduler, however much is there."""
    reader_end, writer_end = pipe()
    async with reader_end, writer_end:
        write_now(writer_end.fileno(), b"x" * 60_000)
        reader = EagerReader(reader_end.fileno, 100)
        turns = 0

        async def other() -> None:
            nonlocal turns
            while True:
                turns += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()
            before = turns
            for _ in range(100):
                assert len(await reader.receive_some()) == 100
            nursery.cancel_scope.cancel()
        assert turns - before >= 50


async def test_a_closed_stream_raises_closed_and_a_wait_on_it_ends() -> None:
    reader_end, writer_end = pipe()
    async with writer_end:
        reader = EagerReader(reader_end.fileno, 1024)
        raised: list[BaseException] = []

        async def read() -> None:
            try:
                await reader.receive_some()
            except trio.ClosedResourceError as exc:
                raised.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await reader_end.aclose()  # while the read waits
        assert len(raised) == 1
        with pytest.raises(trio.ClosedResourceError):
            await reader.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            write_now(-1, b"x")


async def test_a_write_takes_what_fits_and_a_pipe_without_reader_is_broken() -> None:
    reader_end, writer_end = pipe()
    async with writer_end:
        data = b"y" * (4 * 2**20)  # more than a pipe holds
        taken = write_now(writer_end.fileno(), data)
        assert 0 < taken < len(data)
        assert write_now(writer_end.fileno(), data) == 0  # full: nothing, and no wait
        await reader_end.aclose()
        with pytest.raises(trio.BrokenResourceError):
            write_now(writer_end.fileno(), b"z")
