"""Every process a model starts dies with its model, wherever it moved itself.

In an embedded pool, a model's group, its tree and whatever carries its token are
killed; the service (`modelpool serve`) also adopts orphans as a child subreaper, so
even a helper that scrubs its environment and double-forks cannot get away.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from conftest import (
    hostile,
    hostile_config,
    kill_if_alive,
    process_alive,
    read_pids,
    wait_until,
)
from modelpool import ModelFailed, ModelTimeout, open_pool
from serverproc import server_process, wait_listening, wait_ready

ESCAPES = ["stay", "setsid", "setpgid", "double_fork", "daemon"]


@pytest.mark.parametrize("how", ESCAPES)
async def test_helpers_die_with_a_model_that_crashes_however_they_escaped(
    how: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "helper.pid"
    try:
        async with open_pool(hostile_config("escape.py")) as pool:
            with pytest.raises(ModelFailed):
                await pool.predict({"how": how, "pidfile": str(pidfile), "exit": 3})
            (helper,) = read_pids(pidfile)
            await wait_until(lambda: not process_alive(helper), 5, f"the {how} helper to die")
    finally:
        kill_if_alive(read_pids(pidfile))


@pytest.mark.parametrize("how", ESCAPES)
async def test_helpers_die_with_a_model_that_times_out_or_is_stopped(
    how: str, tmp_path: Path
) -> None:
    timed_out, stopped = tmp_path / "timed_out.pid", tmp_path / "stopped.pid"
    try:
        async with open_pool(hostile_config("escape.py", timeout=1)) as pool:
            with pytest.raises(ModelTimeout):
                await pool.predict({"how": how, "pidfile": str(timed_out), "sleep": 30})
            await pool.predict({"how": how, "pidfile": str(stopped)})
            helpers = read_pids(timed_out) + read_pids(stopped)
            await wait_until(lambda: not process_alive(helpers[0]), 5, "the first helper to die")
            assert process_alive(helpers[1])  # its model is alive and well: so is the helper
        await wait_until(lambda: not process_alive(helpers[1]), 5, "the second helper to die")
    finally:
        kill_if_alive(read_pids(timed_out) + read_pids(stopped))


async def test_a_model_that_keeps_forking_while_it_is_killed_leaves_nothing(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "spawned"
    try:
        async with open_pool(hostile_config("spawner.py", timeout=1)) as pool:
            with pytest.raises(ModelTimeout):
                await pool.predict({"pidfile": str(pidfile)})
            spawned = read_pids(pidfile)
            assert len(spawned) > 10
            await wait_until(
                lambda: not [p for p in read_pids(pidfile) if process_alive(p)], 5, "all spawned"
            )
    finally:
        kill_if_alive(read_pids(pidfile))


ALL_ESCAPES = [*ESCAPES, "scrub_env"]


async def test_the_service_kills_every_escaped_helper_when_its_model_fails(
    tmp_path: Path,
) -> None:
    files = {how: tmp_path / f"{how}.pid" for how in ALL_ESCAPES}
    args = ("--model-cmd", " ".join(hostile("escape.py")), "--workers", "2", "--timeout", "1")
    try:
        async with server_process(*args) as server:
            async with await wait_listening(server) as client:
                await wait_ready(client, 2, within=15)
                for how, path in files.items():
                    body = {"how": how, "pidfile": str(path)}
                    if how in ("double_fork", "scrub_env"):
                        body["sleep"] = 5  # a timeout
                    else:
                        body["exit"] = 1  # a crash
                    response = await client.post("/predict", json=body)
                    assert response.status_code in (502, 504), response.text
                helpers = [pid for path in files.values() for pid in read_pids(path)]
                assert len(helpers) == len(ALL_ESCAPES)
                await wait_until(
                    lambda: not [p for p in helpers if process_alive(p)], 5, "every helper to die"
                )
                killed = (await client.get("/status")).json()["orphans_killed"]
                assert killed >= 1  # the scrubbed one could only be caught by adoption
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exit_code(within=15) == 0
    finally:
        kill_if_alive([pid for path in files.values() for pid in read_pids(path)])


async def test_helpers_of_a_live_model_live_and_die_with_the_service(tmp_path: Path) -> None:
    files = {how: tmp_path / f"{how}.pid" for how in ALL_ESCAPES}
    args = ("--model-cmd", " ".join(hostile("escape.py")), "--workers", "1")
    try:
        async with server_process(*args) as server:
            async with await wait_listening(server) as client:
                await wait_ready(client, 1, within=15)
                for how, path in files.items():
                    response = await client.post(
                        "/predict", json={"how": how, "pidfile": str(path)}
                    )
                    assert response.status_code == 200, response.text
                helpers = {how: read_pids(path)[0] for how, path in files.items()}
                # one that scrubbed its environment cannot be told from a stranger: killed
                # at once; the others belong to a live model and are left alone
                await wait_until(
                    lambda: not process_alive(helpers["scrub_env"]), 5, "the scrubbed helper"
                )
                await trio.sleep(1.5)  # more than a sweep interval
                assert all(process_alive(helpers[how]) for how in ESCAPES)
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exit_code(within=15) == 0
        assert not [how for how, pid in helpers.items() if process_alive(pid)]
    finally:
        kill_if_alive([pid for path in files.values() for pid in read_pids(path)])
