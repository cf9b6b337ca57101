"""What the benchmark sessions share: a free loopback port, a process's resident memory."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc (VmRSS, VmHWM, ...), in MiB; NaN if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")
