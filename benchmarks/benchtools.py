"""What the benchmark sessions share: a free loopback port, a process's memory and CPU
time, the stop of a server's process group, and the CPython 3.12+ interpreters installed
beside this one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_group(proc: subprocess.Popen[bytes], within: float) -> bool:
    """SIGTERM to the process group `proc` leads (a graceful stop), then, after `within`
    seconds at most, SIGKILL to whatever is left in it; whether it stopped in time."""
    stopped = True
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            stopped = False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return stopped


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc (VmRSS, VmHWM, ...), in MiB; NaN if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stat_fields(pid: int | str) -> list[str]:
    """A process's /proc/PID/stat from its state on (man 5 proc: field N is [N - 3]);
    OSError if it is gone."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Whether a process is there and not a zombie."""
    try:
        return stat_fields(pid)[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def cpu_of(fields: list[str]) -> float:
    """User and system CPU seconds a process has used so far (its own, not its
    children's), from its `stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """`cpu_of` the processes `pids`, summed; one that is gone counts nothing."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += cpu_of(stat_fields(pid))
    return total


def pss_mib(pid: int) -> float:
    """A process's proportional set size (each page it shares counted as its share), in
    MiB; 0 if it is gone. The sum over processes is what they hold together."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def model_pids(status: dict[str, Any]) -> list[int]:
    """The model processes a modelpool's /status names: its workers' and the template's."""
    pids = [w["pid"] for w in status["workers"] if w["pid"]]
    if status.get("template") and status["template"].get("pid"):
        pids.append(status["template"]["pid"])
    return pids


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its children, theirs, ...), as /proc shows them now."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        children = []
        for parent in frontier:
            try:
                tasks = list(Path(f"/proc/{parent}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    children += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    continue
        found += children
        frontier = children
    return found


def newer_pythons() -> list[str]:
    """CPython 3.12 or newer (GIL builds) that pyenv installed on this machine, oldest first."""
    root = Path.home() / ".pyenv" / "versions"
    found = []
    for version in root.glob("3.*"):
        parts = version.name.split(".")
        if len(parts) < 2 or not parts[1].isdigit() or version.name.endswith("t"):
            continue
        python = version / "bin" / "python3"
        if int(parts[1]) >= 12 and python.exists():
            found.append((int(parts[1]), version.name, str(python)))
    return [python for _, _, python in sorted(found)]


def table(rows: list[list[str]]) -> str:
    """A Markdown table, columns padded so it reads as well in a terminal."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
