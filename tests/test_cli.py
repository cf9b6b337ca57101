"""The installed command, run as its own process: start-up, signals, options, errors."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from conftest import FAST_MODEL3, SCRIPTED, error_body, process_alive, wait_until
from modelpool.settings.options import OPTIONS
from serverproc import (
    ServerProcess,
    assert_all_gone,
    clean_env,
    server_process,
    wait_listening,
    wait_ready,
)


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
        ([], {"MODELPOOL_TIMEOUT": "soon"}, "--timeout (from MODELPOOL_TIMEOUT='soon'): "),
        (["--log-level", "LOUD"], {}, "modelpool serve: error: --log-level: must be one of"),
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
    expected = f"cannot serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert any(expected in line for line in server.log), server.log
    assert not server.model_pids(), "the port is bound before any model starts"


async def test_a_model_command_that_cannot_run_exits_at_once_with_code_3(tmp_path: Path) -> None:
    not_executable = tmp_path / "model.py"
    not_executable.write_text("print('ready: Model-initialized')\n")
    cases = [("nonexistent-binary", "No such file or directory")]
    cases.append((str(not_executable), "Permission denied"))
    for command, reason in cases:
        started = trio.current_time()
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "modelpool", "serve", "--port", "0", "--model-cmd", command],
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        server = ServerProcess(proc)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.read_log)
            assert await server.exit_code(within=15) == 3
        # at once: on the first attempt, not after back-offs nor --init-timeout (60 s).
        # Mostly the interpreter's start and imports: 1-2 s, 4-9 s with both cores busy.
        assert trio.current_time() - started < 12
        assert sum("cannot run" in line for line in server.log) == 1, server.log
        message = re.compile(
            r"cannot start any model, so not serving: worker \d failed to start: "
            + re.escape(f"cannot run {command!r}: {reason}")
        )
        assert any(message.search(line) for line in server.log), server.log
        assert not any("Traceback" in line for line in server.log)


async def test_a_request_on_an_open_keep_alive_connection_after_sigterm_gets_503() -> None:
    async with server_process(env=FAST_MODEL3) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 4, within=15)
            answers: list[httpx.Response] = []

            async def slow_request() -> None:  # keeps the service draining for 2.2 s
                answers.append(await client.post("/predict", json={"data": 2}))

            host, port = server.url.removeprefix("http://").split(":")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_request)
                async with await trio.open_tcp_stream(host, int(port)) as idle:
                    await idle.send_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    first = b""
                    while not first.endswith(b'"ok"}\n'):
                        first += await idle.receive_some(4096)
                    assert b" 200 " in first
                    await trio.sleep(0.3)
                    server.proc.send_signal(signal.SIGTERM)
                    await trio.sleep(0.5)
                    # the same, idle, keep-alive connection: not cut off, but told
                    request = b"POST /predict HTTP/1.1\r\nHost: localhost\r\n"
                    request += b"Content-Length: 11\r\n\r\n"
                    await idle.send_all(request + b'{"data": 0}')
                    answer = b""
                    with trio.fail_after(5):
                        while chunk := await idle.receive_some(4096):
                            answer += chunk
                    head, _, body = answer.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 503 "), answer
                    assert b"connection: close" in head.lower()
                    assert json.loads(body)["error"] == "shutting down"
            assert answers[0].status_code == 200  # the request that was running finished
        assert await server.exit_code(within=15) == 0
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
