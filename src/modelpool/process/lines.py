"""Split a byte stream into lines without trusting the other side to keep them short."""

from __future__ import annotations

import trio

CHUNK = 64 * 1024


class LineTooLong(Exception):
    """A line grew past the limit before its newline arrived."""


class LineReader:
    """Reads newline-terminated lines of at most `max_line` bytes (newline not counted).

    An unterminated last line before end of stream is still returned, so a model that
    prints its result and exits without a newline is understood.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, max_line: int) -> None:
        self._stream = stream
        self._max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already known to hold no newline
        self._eof = False

    def has_line(self) -> bool:
        """True if a whole line is already buffered (readline() would not wait)."""
        return self._buffer.find(b"\n", self._scanned) >= 0

    async def readline(self) -> bytes | None:
        """The next line without its line ending, or None at end of stream."""
        while True:
            end = self._buffer.find(b"\n", self._scanned, self._max_line + 1)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._scanned = 0
                return line.rstrip(b"\r")
            if len(self._buffer) > self._max_line:
                raise LineTooLong(f"line longer than {self._max_line} bytes")
            if self._eof:
                if not self._buffer:
                    return None
                line = bytes(self._buffer)
                self._buffer.clear()
                return line.rstrip(b"\r")
            self._scanned = len(self._buffer)
            chunk = await self._stream.receive_some(CHUNK)
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True

    async def skip_line(self) -> bool:
        """Drop everything up to the next newline; False if the stream ended first."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                del self._buffer[: end + 1]
                self._scanned = 0
                return True
            self._buffer.clear()
            self._scanned = 0
            if self._eof:
                return False
            chunk = await self._stream.receive_some(CHUNK)
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True
