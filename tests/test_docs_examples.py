"""The getting-started page's shell examples, run as written against a real service.

Every ```sh block of docs/getting-started.md is run, in order, as one bash script in an
empty directory, with this interpreter's environment first on PATH (so `modelpool` and
`python` are the installed ones), a free loopback port in PORT and a quick model3
(MODEL3_STEP_SECONDS). A comment line `# → TEXT` after a command is the output the page
promises: each must appear as a line of the script's output, in the page's order, with
`...` standing for any text. The page's own `kill` and `wait` stop every service it
starts; if the script fails or hangs, its whole process group is stopped here.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"
BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PROMISE = "# → "


def sh_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def promised_lines(script: str) -> list[str]:
    return [
        line.strip().removeprefix(PROMISE)
        for line in script.splitlines()
        if line.strip().startswith(PROMISE)
    ]


def as_pattern(promised: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in promised.split("...")))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int) -> None:
    """SIGTERM the script's process group (a service in it drains and stops its models),
    then SIGKILL whatever is still there after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + 20
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not group_alive(pgid):
            return


def test_sh_blocks_are_found() -> None:
    """The page has the examples this test runs, with promised output to check."""
    script = "\n".join(sh_blocks(PAGE.read_text(encoding="utf-8")))
    assert "modelpool serve" in script
    assert "/predict" in script
    assert len(promised_lines(script)) >= 5


def test_promises_are_checked_in_order() -> None:
    """The checker itself: a missing or misplaced line fails it; `...` matches anything."""
    assert as_pattern('{"detail": "...", "id": 1}').fullmatch('{"detail": "x: y", "id": 1}')
    assert not as_pattern('{"id": 1}').fullmatch('{"id": 2}')
    assert unmet(["a", "b"], ["a", "x", "b"]) == []
    assert unmet(["a", "b"], ["b", "a"]) == ["b"]


def unmet(promised: list[str], output: list[str]) -> list[str]:
    """The promised lines not found in `output` after the previous one's match."""
    missing = []
    position = 0
    for line in promised:
        pattern = as_pattern(line)
        for index in range(position, len(output)):
            if pattern.fullmatch(output[index].strip()):
                position = index + 1
                break
        else:
            missing.append(line)
    return missing


def test_getting_started_runs_as_written(tmp_path: Path) -> None:
    schema = importlib.resources.files("modelpool") / "model3.schema.json"
    if not schema.is_file():
        pytest.skip(
            "modelpool is installed in editable mode, without the model3.schema.json the "
            "wheel carries; `nox -s tests` installs the wheel and runs this test"
        )
    script = "\n".join(sh_blocks(PAGE.read_text(encoding="utf-8")))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PORT": str(free_port()),
        "MODEL3_STEP_SECONDS": "0.05",
    }
    env = {key: value for key, value in env.items() if not key.startswith("MODELPOOL_")}
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop_group(process.pid)
        output, _ = process.communicate()
        pytest.fail(f"the examples did not finish in 120 s:\n{output}\nlog:\n{log_of(tmp_path)}")
    left_running = group_alive(process.pid)
    stop_group(process.pid)
    assert process.returncode == 0, (
        f"exit code {process.returncode}:\n{output}\nlog:\n{log_of(tmp_path)}"
    )
    assert not left_running, "the page's examples left a process running"
    missing = unmet(promised_lines(script), output.splitlines())
    assert not missing, f"promised output not printed: {missing}\noutput:\n{output}"


def log_of(directory: Path) -> str:
    """The end of the service's log, which the page writes to modelpool.log."""
    try:
        return (directory / "modelpool.log").read_text(errors="replace")[-3000:]
    except FileNotFoundError:
        return "(no modelpool.log)"
