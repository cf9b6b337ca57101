"""What a new user trips on at first start, and what the service then says.

A typo in the model's file name, a model that never prints the ready line, one that
prints its answer without `result: `, a command given as one string: each must end
in a message that says what to fix, soon, instead of a restart loop or a bare 504.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from redisserver import redis_server

from conftest import SCRIPTED, hostile, hostile_config, running_server, wait_until
from modelpool import ConfigError, FirstStartFailed, ModelCommandError, PoolConfig, open_pool
from modelpool.cli.parser import parse
from modelpool.settings.parsers import command
from serverproc import assert_all_gone, server_process, wait_listening

CANT_OPEN = "can't open file"
READY = "print('ready: Model-initialized', flush=True)\n"


def records(log: list[str]) -> list[dict[str, Any]]:
    """The JSON log's records (--log-format json: one object a line)."""
    return [json.loads(line) for line in log if line.startswith("{")]


def python_model(script: str) -> list[str]:
    return [sys.executable, "-u", "-c", script]


# -- a model that never starts, at first start ------------------------------------------


async def test_a_typo_in_the_model_file_stops_the_service_with_its_stderr(tmp_path: Path) -> None:
    """`python3 modle3.py` exits 2 with "can't open file": the service stops within
    seconds, code 3, with that line in one ERROR; the model's own line is logged once."""
    typo = f"{sys.executable} {tmp_path / 'modle3.py'}"
    started = trio.current_time()
    args = ("--workers", "1", "--model-cmd", typo, "--log-format", "json")
    async with server_process(*args) as server:
        assert await server.exit_code(within=15) == 3
        pids = server.model_pids()
    assert trio.current_time() - started < 15
    assert len(pids) == 1, server.log  # no restart
    assert_all_gone(pids)
    found = records(server.log)
    model_lines = [r for r in found if r.get("stream") == "stderr" and CANT_OPEN in r["message"]]
    assert len(model_lines) == 1, model_lines  # logged once, by the stderr pump
    verdicts = [r for r in found if r["level"] == "ERROR" and r["logger"] == "modelpool"]
    assert len(verdicts) == 1, found
    verdict = verdicts[0]["message"]
    assert verdict.startswith("cannot start any model, so not serving: "), verdict
    assert "failed to start: model exited with code 2" in verdict
    assert f"command: {typo}" in verdict and "--keep-trying" in verdict
    assert verdict.endswith("its last stderr lines:"), verdict
    quoted = verdicts[0]["quoted"]  # the model's own last stderr line, quoted once
    assert len(quoted) == 1 and CANT_OPEN in quoted[0], quoted
    assert CANT_OPEN not in verdict
    assert not any("Traceback" in line for line in server.log)


async def test_a_worker_node_with_a_typo_in_the_model_file_exits_with_code_3(
    tmp_path: Path,
) -> None:
    typo = f"{sys.executable} {tmp_path / 'modle3.py'}"
    async with redis_server() as url:
        args = ("--queue", url, "--workers", "2", "--model-cmd", typo)
        async with server_process(*args, command=("worker",)) as node:
            assert await node.exit_code(within=15) == 3
    verdict = [line for line in node.log if "cannot start any model, so not serving" in line]
    assert len(verdict) == 1, node.log
    assert "every model failed to start and none was ever ready" in verdict[0]
    assert_all_gone(node.model_pids())


async def test_with_keep_trying_it_restarts_logs_each_line_once_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    typo = f"{sys.executable} {tmp_path / 'modle3.py'}"
    args = ["--workers", "1", "--model-cmd", typo, "--log-format", "json", "--keep-trying"]
    args += ["--backoff-initial", "0.1", "--backoff-max", "0.2", "--api-key", "k"]
    async with server_process(*args) as server:
        client = await wait_listening(server)
        async with client:
            await wait_until(lambda: len(server.model_pids()) >= 4, 15, "four restarts")
            health = await client.get("/healthz")
            assert health.status_code == 503, health.text  # no model ever ready: not healthy
            detail = health.json()["detail"]
            assert "no model was ever ready" in detail and "exited with code 2" in detail
            assert CANT_OPEN not in health.text  # open to anyone: no model output
            key = {"Authorization": "Bearer k"}
            status = (await client.get("/status", headers=key)).json()
            assert CANT_OPEN in status["workers"][0]["last_failure"]["stderr"][0]
        assert server.proc.returncode is None
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=15) == 0
        pids = server.model_pids()
    assert_all_gone(pids)
    lines_by_pid: dict[int, int] = {}
    for record in records(server.log):
        if record.get("stream") == "stderr" and CANT_OPEN in record["message"]:
            lines_by_pid[record["pid"]] = lines_by_pid.get(record["pid"], 0) + 1
    assert set(lines_by_pid) <= pids
    assert len(lines_by_pid) >= 3, lines_by_pid  # the last model may have been stopped early
    assert set(lines_by_pid.values()) == {1}, lines_by_pid  # each line once, not twice
    assert not any(
        r["level"] == "ERROR" and CANT_OPEN in r["message"] for r in records(server.log)
    ), "with --keep-trying, stderr stays at --model-log-level"


async def test_open_pool_raises_when_every_model_exits_before_its_ready_line() -> None:
    script = "import sys; print('ModuleNotFoundError: torhc', file=sys.stderr); sys.exit(1)"
    config = PoolConfig(model_cmd=python_model(script), workers=2)
    with trio.fail_after(15), pytest.raises(FirstStartFailed) as raised:
        async with open_pool(config) as pool:
            await pool.wait_ready()
    message = str(raised.value)
    assert isinstance(raised.value, ModelCommandError)
    assert "failed to start: model exited with code 1" in message
    assert "its last stderr lines:\n    ModuleNotFoundError: torhc" in message
    assert f"command: {shlex.join(config.model_cmd)}" in message


async def test_a_model_without_a_ready_line_stops_the_first_start_after_init_timeout() -> None:
    """Alive but never ready within --init-timeout counts as failed too; the message names
    the line it waits for, the flag, and what the model printed instead."""
    config = hostile_config("never_ready.py", init_timeout=0.5)
    started = trio.current_time()
    with trio.fail_after(15), pytest.raises(FirstStartFailed) as raised:
        async with open_pool(config) as pool:
            await pool.wait_ready()
    assert trio.current_time() - started < 10
    message = str(raised.value)
    assert "no ready line within 0.5 s" in message
    assert "'ready: Model-initialized' (--ready-line)" in message
    assert "on stdout, the last: 'loading...', 'still loading'" in message


@pytest.mark.parametrize(("start", "stream"), [("spawn", "stderr"), ("preload", "stdout")])
async def test_a_slow_start_is_said_at_info_with_the_last_line_the_model_printed(
    start: str, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What a loading model prints is logged at DEBUG (stdout) or not at all: the log
    says at INFO, 5 s into its start (a --preload template's too), that it still loads."""
    caplog.set_level(logging.INFO, "modelpool")
    config = hostile_config(
        "slow_loader.py",
        env={"LOADER_STREAM": stream},
        init_timeout=6.5,
        preload=start == "preload",
        model_stdout_level="DEBUG",
        model_log_level="DEBUG",
    )
    with trio.fail_after(30), pytest.raises(FirstStartFailed) as raised:
        async with open_pool(config) as pool:
            await pool.wait_ready()
    notices = [r for r in caplog.records if "still loading after" in r.getMessage()]
    assert len(notices) == 1, [r.getMessage() for r in notices]
    notice = notices[0]
    assert notice.levelno == logging.INFO
    said = notice.getMessage()
    assert ("template (generation 1)" in said) == (start == "preload"), said
    assert "still loading after 5 s of its --init-timeout 6.5 s: no line starting with " in said
    assert (
        "'ready: Model-initialized' yet; its last line, on " + stream + ": loading shard " in said
    )
    shard = int(said.rsplit(" ", 1)[1])
    assert 15 <= shard <= 26, said  # the last, not the first: about 25 lines in 5 s
    assert "no ready line within 6.5 s" in str(raised.value)  # the failure, as before


async def test_the_notices_of_a_slow_start_come_at_gaps_that_double(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """5 s into a start, then 10 s later (gaps double, up to a minute): not every
    second, and not only once."""
    caplog.set_level(logging.INFO, "modelpool")
    config = hostile_config("slow_loader.py", init_timeout=17)
    with trio.fail_after(40), pytest.raises(FirstStartFailed):
        async with open_pool(config) as pool:
            await pool.wait_ready()
    notices = [r.getMessage() for r in caplog.records if "still loading after" in r.getMessage()]
    assert len(notices) == 2, notices
    assert "still loading after 5 s" in notices[0], notices
    assert "still loading after 15 s" in notices[1], notices


async def test_keep_trying_restarts_models_that_never_started() -> None:
    config = PoolConfig(
        model_cmd=python_model("import sys; sys.exit(4)"),
        workers=2,
        keep_trying=True,
        backoff_initial=0.1,
        backoff_max=0.2,
    )
    async with open_pool(config) as pool:
        await wait_until(lambda: all(w.restarts >= 2 for w in pool.workers), 10, "restarts")
        healthy, problem = pool.health()
        assert not healthy and problem is not None
        assert "no model was ever ready" in problem and "exited with code 4" in problem


async def test_a_model_that_was_ready_once_and_then_fails_does_not_stop_the_pool(
    tmp_path: Path,
) -> None:
    """After a model was ready, a failing model is restarted with back-off, as before."""
    config = PoolConfig(
        model_cmd=[*hostile("starts_once.py"), str(tmp_path / "started")],
        workers=1,
        backoff_initial=0.1,
        backoff_max=0.2,
    )
    async with open_pool(config) as pool:
        assert "pid" in await pool.predict({"n": 1})
        pid = pool.workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # every later start fails
        await wait_until(lambda: pool.workers[0].restarts >= 3, 10, "restarts")
        assert pool.workers[0].last_failure is not None
        assert "exited with code 3" in pool.workers[0].last_failure["detail"]
        assert not pool.closing


async def test_a_failing_worker_does_not_stop_a_pool_whose_other_model_gets_ready(
    tmp_path: Path,
) -> None:
    """One model serves, the other can never start (even before the first is ready)."""
    script = (
        "import os, sys\n"
        "try: os.close(os.open(sys.argv[1], os.O_CREAT | os.O_EXCL))\n"
        "except FileExistsError: sys.exit(1)\n"
        "import time; time.sleep(1)\n" + READY + "for l in sys.stdin: print('result: {}')\n"
    )
    model_cmd = [*python_model(script), str(tmp_path / "taken")]
    config = PoolConfig(model_cmd=model_cmd, workers=2, backoff_initial=0.1, backoff_max=0.2)
    async with open_pool(config) as pool:
        await wait_until(lambda: pool.ready_count == 1, 10, "one model ready")
        await wait_until(lambda: max(w.restarts for w in pool.workers) >= 3, 10, "restarts")
        assert await pool.predict({}) == {}


def test_keep_trying_comes_from_its_flag_its_variable_or_the_config_file(tmp_path: Path) -> None:
    assert not parse(["serve"], environ={})[1].config.pool.keep_trying
    assert parse(["serve", "--keep-trying"], environ={})[1].config.pool.keep_trying
    environ = {"MODELPOOL_KEEP_TRYING": "yes"}
    assert parse(["worker", "--queue", "redis://x"], environ=environ)[1].config.pool.keep_trying
    config_file = tmp_path / "modelpool.toml"
    config_file.write_text("keep_trying = true\n")
    assert parse(["serve", "--config", str(config_file)], environ={})[1].config.pool.keep_trying
    with pytest.raises(ConfigError):
        PoolConfig(keep_trying="no")  # type: ignore[arg-type]


# -- protocol mistakes ------------------------------------------------------------------


async def test_no_ready_line_is_explained_in_status_and_briefly_in_healthz() -> None:
    config = hostile_config("never_ready.py", init_timeout=0.5, keep_trying=True)
    async with running_server(config, api_key="k") as server:
        await wait_until(
            lambda: server.pool.workers[0].last_failure is not None, 10, "a failed start"
        )
        key = {"Authorization": "Bearer k"}
        status = (await server.client.get("/status", headers=key)).json()
        detail = status["workers"][0]["last_failure"]["detail"]
        assert "no ready line within 0.5 s" in detail
        assert "starts with 'ready: Model-initialized' (--ready-line)" in detail
        assert "'still loading'" in detail
        health = await server.client.get("/healthz")
        assert health.status_code == 503
        assert "no ready line within 0.5 s" in health.json()["detail"]
        assert "loading" not in health.text  # model output stays out of the open probe


async def test_an_answer_without_the_result_prefix_gets_a_504_that_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = READY + (
        "import sys\n"
        "for line in sys.stdin:\n"
        "    print('thinking')\n"
        "    print('still thinking')\n"
        "    print('{\"ice_found\": true}')\n"
    )
    config = PoolConfig(model_cmd=python_model(script), workers=1, timeout=1)
    async with running_server(config) as server:
        await server.pool.wait_ready()
        response = await server.client.post("/predict", json={"n": 1})
    assert response.status_code == 504, response.text
    body = response.json()
    assert body["error"] == "model timeout"
    assert body["detail"] == (
        "no result after 1 s; the model printed 3 lines but none started with 'result: ' "
        """(the last: '{"ice_found": true}')"""
    )
    failed = [r.getMessage() for r in caplog.records if "failed, model killed" in r.getMessage()]
    assert len(failed) == 1, failed
    assert "printed 3 lines but none started with 'result: '" in failed[0]
    assert "ice_found" not in failed[0]  # the model's output stays at --model-stdout-level


async def test_a_long_line_without_the_result_prefix_is_quoted_short() -> None:
    script = READY + "import sys\nfor line in sys.stdin: print('x' * 100_000)\n"
    config = PoolConfig(model_cmd=python_model(script), workers=1, timeout=1)
    async with running_server(config) as server:
        await server.pool.wait_ready()
        response = await server.client.post("/predict", json={"n": 1})
    assert response.status_code == 504
    detail = response.json()["detail"]
    assert detail.endswith(f"(the last: '{'x' * 200}...')"), detail
    assert len(detail) < 400


async def test_a_model_that_prints_nothing_is_told_to_flush_its_output() -> None:
    config = PoolConfig(model_cmd=python_model("import time; time.sleep(60)"), init_timeout=0.5)
    with trio.fail_after(15), pytest.raises(FirstStartFailed) as raised:
        async with open_pool(config) as pool:
            await pool.wait_ready()
    assert "and printed nothing on stdout (a model that buffers its output must flush" in str(
        raised.value
    )


async def test_a_silent_model_times_out_with_the_plain_detail() -> None:
    script = READY + "import sys, time\nfor line in sys.stdin: time.sleep(30)\n"
    config = PoolConfig(model_cmd=python_model(script), workers=1, timeout=0.5)
    async with running_server(config) as server:
        await server.pool.wait_ready()
        response = await server.client.post("/predict", json={"n": 1})
    assert response.status_code == 504
    assert response.json()["detail"] == "no result after 0.5 s"


# -- the model command as one string ----------------------------------------------------


async def test_a_command_string_in_pool_config_is_split_as_the_cli_does() -> None:
    text = f"{shlex.quote(SCRIPTED[0])} -u '{SCRIPTED[2]}'"
    config = PoolConfig(model_cmd=text)
    assert config.model_cmd == command(text) == SCRIPTED
    assert PoolConfig(model_cmd="python3 -u 'my model.py'").model_cmd == [
        "python3",
        "-u",
        "my model.py",
    ]
    async with open_pool(PoolConfig(model_cmd=text, workers=1)) as pool:
        assert (await pool.predict({"n": 1}))["echo"] == {"n": 1}


@pytest.mark.parametrize(
    "value",
    ["", "   ", "python3 'unclosed", [], [""], ["python3", 3], 5, None, {"python3": "x"}],
)
def test_a_model_command_that_is_no_list_of_strings_is_refused_at_once(value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        PoolConfig(model_cmd=value)  # type: ignore[arg-type]
    assert raised.value.field == "model_cmd"
