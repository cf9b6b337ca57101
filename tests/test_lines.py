"""LineReader over a real OS pipe: limits, chunking, line endings."""

from __future__ import annotations

import os

import pytest
import trio

from modelpool.process.lines import LineReader, LineTooLong


async def read_all(data: bytes, max_line: int) -> list[bytes]:
    """Write `data` into a pipe in a background task and read it back line by line."""
    read_fd, write_fd = os.pipe()
    lines: list[bytes] = []
    error: LineTooLong | None = None
    async with trio.lowlevel.FdStream(read_fd) as source, trio.open_nursery() as nursery:

        async def write() -> None:
            async with trio.lowlevel.FdStream(write_fd) as sink:
                await sink.send_all(data)

        nursery.start_soon(write)
        reader = LineReader(source, max_line)
        try:
            while (line := await reader.readline()) is not None:
                lines.append(line)
        except LineTooLong as exc:
            error = exc
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return lines


async def test_lines_split_across_and_within_chunks() -> None:
    data = b"a\n" + b"b" * 200_000 + b"\nc\r\n\nlast"
    assert await read_all(data, 300_000) == [b"a", b"b" * 200_000, b"c", b"", b"last"]


async def test_a_line_of_exactly_the_limit_is_accepted() -> None:
    assert await read_all(b"x" * 100 + b"\nok\n", 100) == [b"x" * 100, b"ok"]


@pytest.mark.parametrize("data", [b"x" * 101 + b"\n", b"x" * 101, b"ok\n" + b"y" * 500_000])
async def test_a_line_over_the_limit_raises(data: bytes) -> None:
    with pytest.raises(LineTooLong):
        await read_all(data, 100)


async def test_skip_line_drops_the_rest_of_an_overlong_line() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"z" * 5000 + b"\nnext\n")
    os.close(write_fd)
    async with trio.lowlevel.FdStream(read_fd) as source:
        reader = LineReader(source, 100)
        with pytest.raises(LineTooLong):
            await reader.readline()
        assert await reader.skip_line()
        assert await reader.readline() == b"next"
        assert await reader.readline() is None
