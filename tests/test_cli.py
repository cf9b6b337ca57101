"""The installed command, run as its own process: start-up, signals, options, errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from conftest import (
    FAST_MODEL3,
    SCRIPTED,
    children_of,
    error_body,
    group_members,
    process_alive,
    wait_until,
)
from modelpool.options import OPTIONS

LISTENING = re.compile(r"listening on (http://\S+)")
STARTED = re.compile(r"\[pid (\d+)\] started")


@dataclass
class ServerProcess:
    proc: trio.Process
    log: list[str] = field(default_factory=list)
    url: str = ""
    listening: trio.Event = field(default_factory=trio.Event)

    def model_pids(self) -> set[int]:
        """Every model the server started, read from its log."""
        return {int(m.group(1)) for line in self.log if (m := STARTED.search(line))}

    async def read_log(self) -> None:
        assert self.proc.stderr is not None
        pending = b""
        async for chunk in self.proc.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self.log.append(text)
                if match := LISTENING.search(text):
                    self.url = match.group(1)
                    self.listening.set()

    async def exit_code(self, within: float) -> int:
        with trio.move_on_after(within):
            return await self.proc.wait()
        log = "\n".join(self.log[-30:])
        raise AssertionError(f"server still running after {within} s; its log ends:\n{log}")


@asynccontextmanager
async def server_process(
    *args: str, env: dict[str, str] | None = None, command: tuple[str, ...] = ("serve",)
) -> AsyncIterator[ServerProcess]:
    """`python -m modelpool serve --port 0 ARGS`, made sure to be gone (with its models) on exit."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "modelpool", *command, "--port", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(env),
    )
    server = ServerProcess(proc)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.read_log)
        try:
            yield server
        finally:
            if proc.returncode is None:  # the test failed half-way: clean up hard
                for child in children_of(proc.pid):
                    os.killpg(child, signal.SIGKILL)
                proc.kill()
            with trio.move_on_after(10):
                await proc.wait()


async def wait_listening(server: ServerProcess, within: float = 20) -> httpx.AsyncClient:
    with trio.fail_after(within):
        await server.listening.wait()
    return httpx.AsyncClient(base_url=server.url, timeout=60)


async def wait_ready(client: httpx.AsyncClient, count: int, within: float) -> None:
    with trio.fail_after(within):
        while (await client.get("/readyz")).json()["ready"] < count:
            await trio.sleep(0.05)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without settings of ours or of the models, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELPOOL_", "MODEL3_"))}
    return {**env, **(extra or {})}


def assert_all_gone(pids: set[int]) -> None:
    assert not [pid for pid in pids if process_alive(pid)], "a model outlived the server"
    assert not [pid for pid in pids if group_members(pid)], "a model's child outlived it"


async def test_default_service_answers_after_the_real_start_up() -> None:
    """README's promise: on the defaults, {"data": 2} is answered about 7 s after start."""
    started = trio.current_time()
    # plain `python -m modelpool`, with the real five-second start-up
    async with server_process(command=()) as server:
        async with await wait_listening(server) as client:
            response = await client.post("/predict", content=b'{"data": 2}')
            elapsed = trio.current_time() - started
            assert response.status_code == 200
            assert response.text == '{"ice_found": true}\n'
            assert 6.5 < elapsed < 13  # 5 s start-up + 2.19 s of work
            status = (await client.get("/status")).json()
            # all four started together: one at a time, the last would be ready at 20 s
            assert status["ready"] == 4
            assert len([line for line in server.log if "] ready after 5." in line]) == 4
            assert any("4/4 models ready after 5." in line for line in server.log)
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=15) == 0
        assert len(server.model_pids()) == 4
        assert_all_gone(server.model_pids())


async def test_sigterm_lets_running_requests_finish_and_leaves_no_process() -> None:
    async with server_process(env=FAST_MODEL3) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 4, within=15)
            answers: list[httpx.Response] = []

            async def slow_request() -> None:
                answers.append(await client.post("/predict", json={"data": 2}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_request)
                await trio.sleep(0.5)
                server.proc.send_signal(signal.SIGTERM)
            assert answers[0].status_code == 200
            assert answers[0].json() == {"ice_found": True}
        assert await server.exit_code(within=15) == 0
        assert_all_gone(server.model_pids())
        assert any("SIGTERM: shutting down gracefully" in line for line in server.log)


async def test_sigint_while_models_are_starting_stops_at_once() -> None:
    async with server_process() as server:  # the real five-second start-up
        async with await wait_listening(server):
            await wait_until(lambda: len(server.model_pids()) == 4, 10, "four models")
            started = trio.current_time()
            server.proc.send_signal(signal.SIGINT)
            assert await server.exit_code(within=10) == 0
            assert trio.current_time() - started < 3
        assert_all_gone(server.model_pids())


async def test_a_second_signal_kills_every_model_at_once() -> None:
    async with server_process("--timeout", "100", env=FAST_MODEL3) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 4, within=15)
            answers: list[httpx.Response] = []

            async def endless_request() -> None:
                answers.append(await client.post("/predict", json={"data": 33}))  # 75 s

            async with trio.open_nursery() as nursery:
                nursery.start_soon(endless_request)
                await trio.sleep(0.5)
                server.proc.send_signal(signal.SIGTERM)
                await trio.sleep(0.5)
                started = trio.current_time()
                server.proc.send_signal(signal.SIGTERM)
            assert answers[0].status_code == 503
            error_body(answers[0], 503, "shutting down")
            assert await server.exit_code(within=10) == 0
            assert trio.current_time() - started < 3
        assert_all_gone(server.model_pids())


async def test_environment_variables_configure_the_service() -> None:
    env = {
        "MODELPOOL_WORKERS": "3",
        "MODELPOOL_TIMEOUT": "0.5",
        "MODELPOOL_MODEL_CMD": " ".join(SCRIPTED),
        "MODELPOOL_MAX_BODY": "100",
    }
    async with server_process("--workers", "2", env=env) as server:  # the option wins
        async with await wait_listening(server) as client:
            await wait_ready(client, 2, within=15)
            assert (await client.get("/status")).json()["size"] == 2
            assert (await client.post("/predict", json={"sleep": 5})).status_code == 504
            assert (await client.post("/predict", json={"x": "y" * 100})).status_code == 413
            assert (await client.post("/predict", json={"n": 1})).json()["echo"] == {"n": 1}
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=15) == 0
        assert_all_gone(server.model_pids())


async def test_help_documents_every_option_and_its_variable() -> None:
    done = await trio.run_process(
        [sys.executable, "-m", "modelpool", "serve", "--help"], capture_stdout=True
    )
    text = " ".join(done.stdout.decode().split())  # undo argparse's line wrapping
    for option in OPTIONS:
        assert option.flag in text
        assert option.env in text
    top = await trio.run_process([sys.executable, "-m", "modelpool", "--help"], capture_stdout=True)
    assert "serve" in top.stdout.decode()


async def test_bad_settings_are_refused_with_a_reason_before_anything_starts() -> None:
    # Each used to start the service: "nan" crashed it at the first request.
    for args, env, reason in [
        (["--timeout", "nan"], {}, "--timeout: must be a finite number, got nan"),
        (
            [],
            {"MODELPOOL_MAX_BODY": "-5"},
            "--max-body (from MODELPOOL_MAX_BODY='-5'): must be at least 1, got -5",
        ),
        ([], {"MODELPOOL_TIMEOUT": "soon"}, "MODELPOOL_TIMEOUT='soon' (for --timeout)"),
        (["--log-level", "LOUD"], {}, "argument --log-level: must be one of"),
    ]:
        done = await trio.run_process(
            [sys.executable, "-m", "modelpool", "serve", *args],
            capture_stderr=True,
            check=False,
            env=clean_env(env),
        )
        assert done.returncode == 2
        assert reason in done.stderr.decode()
        assert "Traceback" not in done.stderr.decode()


async def test_a_port_in_use_is_a_clear_error_and_leaves_no_model() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "modelpool", "serve", "--port", port],
            stderr=subprocess.PIPE,
            env=clean_env(FAST_MODEL3),
        )
        server = ServerProcess(proc)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.read_log)
            assert await server.exit_code(within=15) == 1
    assert any("cannot serve" in line and "in use" in line for line in server.log)
    assert_all_gone(server.model_pids())


async def test_models_exit_by_themselves_when_the_service_is_killed_outright() -> None:
    async with server_process(env=FAST_MODEL3) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 4, within=15)
        server.proc.kill()  # SIGKILL: no clean-up code of ours runs
        await server.exit_code(within=5)
        pids = server.model_pids()
        assert len(pids) == 4
        # their stdin closed with the service, and the protocol says: exit when it closes
        await wait_until(lambda: not any(process_alive(pid) for pid in pids), 5, "the models")
