"""The pages' examples, run as written against a real service.

Every ```sh block of docs/getting-started.md is run, in order, as one bash script in an
empty directory, with this interpreter's environment first on PATH (so `modelpool` and
`python` are the installed ones), a free loopback port in PORT and a quick model3
(MODEL3_STEP_SECONDS). A comment line `# → TEXT` after a command is the output the page
promises: each must appear as a line of the script's output, in the page's order, with
`...` standing for any text. The page's own `kill` and `wait` stop every service it
starts; if the script fails or hangs, its whole process group is stopped here.

The protocol page's models in shell: each ```sh block that starts with `#!` is saved
under the name its second line gives (`# echo.sh: ...`) and served as it is, by its own
interpreter (`/bin/sh` is dash on Debian, whose `echo` expands `\\n`; `awk` there is
mawk, which buffers its input), with a request whose data holds an escaped newline.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serverproc import server_process, wait_listening, wait_ready

PAGE = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"
PROTOCOL = PAGE.parent / "protocol.md"
BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PROMISE = "# → "
SCRIPT_NAME = re.compile(r"^# ([\w.-]+): ")


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


def model_scripts(text: str) -> dict[str, str]:
    """The page's models in shell: each ```sh block that starts with `#!`, by the file
    name its second line gives (`# echo.sh: ...`)."""
    scripts = {}
    for block in sh_blocks(text):
        first, second, *_ = [*block.splitlines(), "", ""]
        if first.startswith("#!") and (named := SCRIPT_NAME.match(second)):
            scripts[named.group(1)] = block
    return scripts


PROTOCOL_MODELS = model_scripts(PROTOCOL.read_text(encoding="utf-8"))


def test_the_protocol_page_shows_a_shell_model_and_an_awk_one() -> None:
    assert {"echo.sh", "echo-awk.sh"} <= set(PROTOCOL_MODELS), sorted(PROTOCOL_MODELS)
    assert PROTOCOL_MODELS["echo.sh"].startswith("#!/bin/sh\n")
    assert "awk" in PROTOCOL_MODELS["echo-awk.sh"]


@pytest.mark.parametrize("name", sorted(PROTOCOL_MODELS))
async def test_the_protocol_pages_models_echo_an_escaped_newline(name: str, tmp_path: Path) -> None:
    """`"héllo\\nworld"` reaches a model as `"h\\u00e9llo\\nworld"`: an `echo` that expands
    `\\n` splits its result in two (502), a model that buffers its input never answers
    (504). The page's model must echo it back intact, twice in a row."""
    script = PROTOCOL_MODELS[name]
    if "mawk" in script and shutil.which("mawk") is None:
        pytest.skip("mawk is not installed (apt-get install mawk)")
    path = tmp_path / name
    path.write_text(script)
    path.chmod(0o755)
    args = ("--model-cmd", str(path), "--workers", "1", "--timeout", "5")
    async with server_process(*args) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 1, within=30)
            for _ in range(2):
                body = '{"data": "héllo\\nworld"}'.encode()
                response = await client.post("/predict", content=body)
                assert response.status_code == 200, response.text
                assert response.json() == {"echo": {"data": "héllo\nworld"}}
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=20) == 0
