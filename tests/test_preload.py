"""--preload: every model forked from one warm template, with real processes throughout.

The template is the unmodified model under modelpool's launcher, stopped at its first
read of stdin; each child is a model like any other for its worker. These tests check
what a user was promised: the same answers, failures and containment as plain starts,
one load's memory for all models, replacements in milliseconds, and a plain start
(with a warning) wherever a fork would not be safe.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import trio

from conftest import (
    FAST_MODEL3,
    MODEL3,
    hostile,
    kill_if_alive,
    model3_config,
    predict_into,
    process_alive,
    read_pids,
    wait_until,
)
from modelpool import (
    ConfigError,
    FirstStartFailed,
    ModelFailed,
    ModelTimeout,
    PoolConfig,
    open_pool,
)
from modelpool.cli.parser import parse
from modelpool.core.errors import ModelCommandError
from modelpool.pool.operations import OperationFailed
from modelpool.pool.pool import Pool
from modelpool.process.launch import LAUNCHER_PATH, launcher_command
from modelpool.process.model import open_model
from modelpool.process.reaper import token_of
from modelpool.settings.pycommand import NotPythonCommand, parse_python_command
from serverproc import server_process, wait_listening, wait_ready

BIG_MIB = 200


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no Pss for {pid}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def template_pid(pool: Pool) -> int:
    snapshot = pool.status()["template"]
    assert snapshot is not None and snapshot["state"] == "ready", snapshot
    return snapshot["pid"]


def preload_config(model: str, **overrides: object) -> PoolConfig:
    options: dict = {"model_cmd": hostile(model), "workers": 1, "preload": True}
    options.update(overrides)
    return PoolConfig(**options)


def model_file(path: Path, version: int) -> Path:
    """A model that answers with its version and its pid."""
    path.write_text(
        "import json, os, sys\n"
        "print('ready: Model-initialized')\n"
        "for line in sys.stdin:\n"
        f"    print('result: ' + json.dumps({{'version': {version}, 'pid': os.getpid()}}))\n"
    )
    return path


# -- model3, unmodified ------------------------------------------------------------------


async def test_model3_children_are_forked_from_one_template_and_answer() -> None:
    async with open_pool(model3_config(workers=3, preload=True)) as pool:
        await pool.wait_ready()
        template = template_pid(pool)
        pids = [w.pid for w in pool.workers]
        assert all(pid is not None and parent_of(pid) == template for pid in pids)
        assert [w.snapshot()["start"]["method"] for w in pool.workers] == ["fork"] * 3
        assert await pool.predict({"data": 0.1}) == {"ice_found": True}
        # each child carries a containment token of its own, not the template's
        tokens = {token_of(pid) for pid in [template, *pids]}
        assert len(tokens) == 4 and None not in tokens


async def test_model3_requests_queue_behind_busy_children() -> None:
    async with open_pool(model3_config(workers=2, preload=True)) as pool:
        await pool.wait_ready()
        outcomes: list = []
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(predict_into, pool, {"data": 0.4}, outcomes)  # 0.42 s each
        assert outcomes == [{"ice_found": True}] * 4
        assert trio.current_time() - started >= 0.8  # two rounds on two models


async def test_model3_past_timeout_gets_504_and_its_child_is_replaced_by_a_fork() -> None:
    async with open_pool(model3_config(workers=1, preload=True, timeout=1.0)) as pool:
        await pool.wait_ready()
        template, before = template_pid(pool), pool.workers[0].pid
        with pytest.raises(ModelTimeout):
            await pool.predict({"data": 1.5})  # tan(1.5) = 14 s
        assert await pool.predict({"data": 0.1}) == {"ice_found": True}
        after = pool.workers[0].pid
        assert after != before and after is not None and parent_of(after) == template
        assert not process_alive(before)


async def test_model3_crash_is_replaced_by_a_fork() -> None:
    # No refresh: a crashing child copies pages as it prints its traceback, and one
    # measured past its limit then would have its worker replaced beside the crash.
    config = model3_config(workers=1, preload=True, preload_max_private=0)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        template, before = template_pid(pool), pool.workers[0].pid
        with pytest.raises(ModelFailed) as failed:
            await pool.predict({"no data": 1})
        assert "exited with code 1" in str(failed.value)
        assert failed.value.stderr and "ValueError" in failed.value.stderr[-1]
        assert await pool.predict({"data": 0.1}) == {"ice_found": True}
        after = pool.workers[0].pid
        assert after != before and after is not None and parent_of(after) == template
        assert pool.workers[0].last_failure is not None
        assert pool.workers[0].last_failure["exit_code"] == 1  # reported by the template


# -- what it costs -----------------------------------------------------------------------


async def test_four_children_of_a_big_model_take_little_more_memory_than_one() -> None:
    config = preload_config("big_memory.py", workers=4, env={"BIG_MODEL_MIB": str(BIG_MIB)})
    async with open_pool(config) as pool:
        await pool.wait_ready()
        template = template_pid(pool)
        children = [w.pid for w in pool.workers]
        one_model = rss_mib(template)
        assert one_model >= BIG_MIB
        total = sum(pss_mib(pid) for pid in [template, *children] if pid)
        assert total <= 1.3 * one_model, (total, one_model)
        snapshot = pool.status()["template"]
        assert snapshot["shared_mib"] >= BIG_MIB  # its pages are its children's too
        # what a child holds of its own, for --model-max-rss, is not the shared weights
        assert all(w.memory_mib() < BIG_MIB / 4 for w in pool.workers)


async def test_the_memory_limit_counts_a_childs_own_pages_only() -> None:
    config = preload_config(
        "big_memory.py",
        workers=1,
        env={"BIG_MODEL_MIB": str(BIG_MIB)},
        model_max_rss=BIG_MIB / 2,
        preload_max_private=0,  # the memory limit's doing, not a refresh's
    )
    async with open_pool(config) as pool:
        await pool.wait_ready()
        first = pool.workers[0].pid
        await trio.sleep(2.5)  # two memory checks: the shared weights do not count
        assert [w.pid for w in pool.workers] == [first]
        # copy-on-write: written pages become its own; past the limit (not its margin)
        await pool.predict({"touch_mib": BIG_MIB // 2 + 10})
        await wait_until(lambda: first not in [w.pid for w in pool.workers], 10, "its replacement")
        await pool.wait_ready()
        assert pool.metrics.value("modelpool_model_restarts_total", reason="memory") == 1
        assert pool.workers[0].snapshot()["start"]["method"] == "fork"


async def test_a_sigkilled_child_is_replaced_by_a_fork_not_a_load() -> None:
    async with open_pool(model3_config(workers=1, preload=True)) as pool:
        await pool.wait_ready()
        assert await pool.predict({"data": 0}) == {"ice_found": True}
        victim = pool.workers[0].pid
        assert victim is not None
        delays = []
        for _ in range(3):  # the best of three: a loaded 2-core machine has its moments
            victim = pool.workers[0].pid
            assert victim is not None
            killed_at = trio.current_time()
            os.kill(victim, signal.SIGKILL)
            while process_alive(victim):  # dead, not just being killed: its request is next
                await trio.sleep(0.001)
            assert await pool.predict({"data": 0}) == {"ice_found": True}
            delays.append(trio.current_time() - killed_at)
            assert pool.workers[0].pid != victim
            await trio.sleep(0.2)
        # A fork, not a load: the model's own start takes 0.25 s at least (5 steps of
        # 0.05 s); the speed of a replacement is benchmarks/preload.py's to measure.
        assert min(delays) < 0.2, delays
        assert pool.workers[0].snapshot()["start"]["method"] == "fork"
        assert pool.workers[0].snapshot()["start"]["seconds"] < 0.2
        assert pool.workers[0].last_failure["exit_code"] == -signal.SIGKILL


async def test_output_printed_before_the_fork_appears_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="modelpool.model")
    chatty = {"model_stdout_level": "INFO"}  # stdout lines are logged at DEBUG by default
    async with open_pool(preload_config("buffered_output.py", workers=3, **chatty)) as pool:
        await pool.wait_ready()
        for _ in range(6):
            await pool.predict({})
    async with open_pool(model3_config(workers=3, preload=True, **chatty)) as pool:
        await pool.wait_ready()
        await pool.predict({"data": 0})
    lines = [record.getMessage() for record in caplog.records]
    assert sum("printed once, before any request" in line for line in lines) == 1
    assert sum(line.endswith("stdout: initializing model...") for line in lines) == 1
    assert sum(line.endswith("stdout: ready: Model-initialized") for line in lines) == 2


# -- when it cannot fork -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("unsafe", "reason"),
    [("thread", "2 threads, and a fork copies only one: 'loader'"), ("socket", "a socket")],
)
async def test_a_model_unsafe_to_fork_falls_back_to_plain_starts_with_a_warning(
    unsafe: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = preload_config("unsafe_at_fork.py", workers=2, env={"UNSAFE": unsafe})
    async with open_pool(config) as pool:
        await pool.wait_ready()
        answers = [await pool.predict({}) for _ in range(2)]
        status = pool.status()
        assert status["template"]["state"] == "fallback"
        assert reason in status["template"]["fallback_reason"]
        assert [w["start"]["method"] for w in status["workers"]] == ["spawn", "spawn"]
        assert all(parent_of(a["pid"]) == os.getpid() for a in answers)
        template = pool.preloader.current() if pool.preloader else None
        assert template is not None and template.forks == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "--preload" in r.msg]
    assert len(warnings) == 1
    assert reason in warnings[0].getMessage() and "start plainly" in warnings[0].getMessage()


async def test_a_model_that_reads_fd_0_directly_falls_back_to_plain_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelpool.process.forkpoint.FORK_POINT_WAIT", 1.0)
    script = tmp_path / "raw_reader.py"
    script.write_text(
        "import os\n"
        "print('ready: Model-initialized')\n"
        "while line := os.read(0, 65536):\n"
        "    print('result: {}')\n"
    )
    config = PoolConfig(model_cmd=[sys.executable, str(script)], workers=1, preload=True)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        assert await pool.predict({}) == {}
        snapshot = pool.status()["template"]
        assert snapshot["state"] == "fallback"
        assert "did not read sys.stdin" in snapshot["fallback_reason"]


def test_a_command_that_is_not_python_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as refused:
        PoolConfig(model_cmd=["/bin/sh", "model.sh"], preload=True)
    assert refused.value.field == "model_cmd"
    assert "'/bin/sh' is not a Python interpreter" in str(refused.value)
    with pytest.raises(ConfigError, match="python -c"):
        PoolConfig(model_cmd=["python3", "-u", "-c", "print(1)"], preload=True)
    PoolConfig(model_cmd=["/bin/sh", "model.sh"])  # fine without --preload
    PoolConfig(model_cmd=["python3.11", "-X", "dev", "-um", "package.model", "--x"], preload=True)


@pytest.mark.parametrize(
    ("command", "flags", "kind", "target", "args"),
    [
        (["python3", "-u", "m.py", "-x"], ["-u"], "script", "m.py", ["-x"]),
        (
            ["python3.11", "-W", "ignore", "-X", "dev", "m.py"],
            ["-W", "ignore", "-X", "dev"],
            "script",
            "m.py",
            [],
        ),
        (
            ["python", "-Wignore", "-OO", "m.py", "--", "a"],
            ["-Wignore", "-OO"],
            "script",
            "m.py",
            ["--", "a"],
        ),
        (
            ["python3", "-um", "pkg.model", "--port", "1"],
            ["-u"],
            "module",
            "pkg.model",
            ["--port", "1"],
        ),
        (["python3", "-m", "pkg"], [], "module", "pkg", []),
        ([sys.executable, "-B", "--", "-odd-name.py"], ["-B"], "script", "-odd-name.py", []),
    ],
)
def test_a_python_command_is_read_as_the_interpreter_reads_it(
    command: list[str], flags: list[str], kind: str, target: str, args: list[str]
) -> None:
    parsed = parse_python_command(command)
    assert (parsed.flags, parsed.kind, parsed.target, parsed.args) == (flags, kind, target, args)
    launched = launcher_command(parsed, 7)
    assert launched[: 1 + len(flags)] == [command[0], *flags]
    assert launched[1 + len(flags) :] == [str(LAUNCHER_PATH), "7", kind, target, *args]


@pytest.mark.parametrize(
    ("command", "why"),
    [
        (["node", "model.js"], "is not a Python interpreter"),
        (["python3", "-c", "print(1)"], "python -c"),
        (["python3", "-", "x"], "read from stdin"),
        (["python3", "-u"], "names no script"),
        (["python3", "-m"], "names no module"),
    ],
)
def test_a_command_that_cannot_be_preloaded_says_why(command: list[str], why: str) -> None:
    with pytest.raises(NotPythonCommand, match=why):
        parse_python_command(command)


def test_the_command_line_refuses_a_non_python_command_under_preload(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(["serve", "--preload", "--model-cmd", "./model.sh"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--model-cmd: cannot be preloaded: './model.sh' is not a Python interpreter" in error
    _, settings = parse(["worker", "--queue", "redis://x:1/0"], {"MODELPOOL_PRELOAD": "yes"})
    assert settings.config.pool.preload
    config_file = tmp_path / "modelpool.toml"
    config_file.write_text("preload = true\n")
    _, settings = parse(["serve", "--config", str(config_file)], {})
    assert settings.config.pool.preload
    _, settings = parse(["serve"], {})
    assert not settings.config.pool.preload  # off by default


# -- the template's own life -------------------------------------------------------------


async def test_children_serve_on_when_the_template_is_sigkilled_and_a_new_one_loads() -> None:
    # No refresh: what the children shared with the dead template is now their own, and
    # a refresh may replace them by forks of the new one (test_refresh.py)
    async with open_pool(model3_config(workers=2, preload=True, preload_max_private=0)) as pool:
        await pool.wait_ready()
        old_template = template_pid(pool)
        children = [w.pid for w in pool.workers]
        os.kill(old_template, signal.SIGKILL)
        for _ in range(4):
            assert await pool.predict({"data": 0}) == {"ice_found": True}
        assert [w.pid for w in pool.workers] == children  # the same children served
        await wait_until(
            lambda: (pool.status()["template"] or {}).get("pid") not in (None, old_template),
            10,
            "a new template",
        )
        new_template = template_pid(pool)
        # a child whose template is gone is replaced by a fork of the new one; its exit
        # status is unknown here (no subreaper in this process), and says so
        os.kill(children[0], signal.SIGKILL)
        await wait_until(lambda: pool.workers[0].pid not in (None, children[0]), 5, "a new child")
        assert parent_of(pool.workers[0].pid or 0) == new_template
        assert "exit status is unknown" in pool.workers[0].last_failure["detail"]
        assert pool.status()["template"]["loads"] == 2


async def test_a_start_asked_of_a_template_that_just_died_waits_for_the_next_one() -> None:
    """The template dies, and a start asks it for a child before the pool has read the
    end of its control socket (no turn of the scheduler in between): the start gets a
    child of the next template, instead of failing as "gone"."""
    async with open_pool(model3_config(workers=1, preload=True)) as pool:
        await pool.wait_ready()
        old_template = template_pid(pool)
        starter = pool._starter_for(pool.workers[0])
        os.kill(old_template, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_alive(old_template) and time.monotonic() < deadline:
            time.sleep(0.001)  # noqa: ASYNC251 - blocking on purpose: the pool waits meanwhile
        assert not process_alive(old_template)
        with trio.fail_after(30):
            async with open_model(pool.model_config, "probe", pool.reaper, starter) as model:
                await model.wait_ready()
                assert parent_of(model.pid) not in (old_template, os.getpid())
                assert parent_of(model.pid) == template_pid(pool)


async def test_a_child_that_is_slow_after_its_fork_serves_on_when_the_template_dies_at_once() -> (
    None
):
    """A child is in a session of its own before its worker hears of it: the template's
    end (its process group killed) never takes a child along, however slow the child is
    to run after its fork (here an at-fork hook of the model's sleeps in it)."""
    config = preload_config(
        "slow_after_fork.py",
        workers=2,
        env={"AFTER_FORK_SLEEP": "0.5"},
        preload_max_private=0,  # no refresh once the template is gone: as above
    )
    async with open_pool(config) as pool:
        await pool.wait_ready()
        template = template_pid(pool)
        children = [w.pid for w in pool.workers]
        assert all(pid is not None and os.getsid(pid) == pid for pid in children)
        os.kill(template, signal.SIGKILL)
        answers = [await pool.predict({}) for _ in range(4)]
        assert {a["pid"] for a in answers} <= set(children)
        assert [w.pid for w in pool.workers] == children  # the same children served
        assert all(w.last_failure is None for w in pool.workers)


async def test_reload_to_a_new_model_file_loads_a_new_template_first(tmp_path: Path) -> None:
    script = model_file(tmp_path / "model.py", version=1)
    config = PoolConfig(model_cmd=[sys.executable, str(script)], workers=2, preload=True)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        old_template = template_pid(pool)
        assert (await pool.predict({}))["version"] == 1
        script.write_text("raise SystemExit('broken')\n")
        with pytest.raises(OperationFailed, match="template failed to load") as failed:
            await pool.operations.reload()
        assert str(failed.value).count("failed to start") == 1, failed.value  # said once
        assert template_pid(pool) == old_template  # as it was: same template, same version
        assert {(await pool.predict({}))["version"] for _ in range(3)} == {1}
        model_file(script, version=2)
        report = await pool.operations.reload()
        assert report["template"]["state"] == "ready"
        new_template = template_pid(pool)
        assert new_template != old_template
        await wait_until(lambda: not process_alive(old_template), 10, "the old template to go")
        assert {(await pool.predict({}))["version"] for _ in range(4)} == {2}
        assert all(parent_of(w.pid or 0) == new_template for w in pool.workers)
        assert [w.generation for w in pool.workers] == [pool.generation] * 2
        # a new command (as POST /admin/reload may give): a template of that command
        other = model_file(tmp_path / "other.py", version=3)
        report = await pool.operations.reload([sys.executable, "-u", str(other)])
        assert report["template"]["state"] == "ready"
        assert {(await pool.predict({}))["version"] for _ in range(4)} == {3}
        assert all(parent_of(w.pid or 0) == template_pid(pool) for w in pool.workers)
        await wait_until(lambda: not process_alive(new_template), 10, "the second template to go")


async def test_scale_up_forks_at_once() -> None:
    async with open_pool(model3_config(workers=1, preload=True)) as pool:
        await pool.wait_ready()
        started = trio.current_time()
        report = await pool.operations.scale(3)
        assert trio.current_time() - started < 1.0  # model3 alone needs 0.25 s per load
        assert len(report["added"]) == 2
        template = template_pid(pool)
        assert all(parent_of(w.pid or 0) == template for w in pool.workers)


async def test_max_requests_recycles_by_forking() -> None:
    async with open_pool(model3_config(workers=1, preload=True, max_requests=2)) as pool:
        await pool.wait_ready()
        template, first = template_pid(pool), pool.workers[0].pid
        for _ in range(2):
            await pool.predict({"data": 0})
        await wait_until(lambda: pool.workers[0].pid not in (None, first), 5, "its replacement")
        await pool.wait_ready()
        assert parent_of(pool.workers[0].pid or 0) == template
        assert pool.metrics.value("modelpool_model_restarts_total", reason="recycled") == 1
        assert pool.metrics.value("modelpool_model_start_seconds_count", method="fork") == 2


@pytest.mark.parametrize("how", ["setsid", "double_fork", "daemon"])
async def test_a_helper_escaped_from_a_child_dies_with_it(how: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "helper.pid"
    try:
        async with open_pool(preload_config("escape.py", workers=1)) as pool:
            await pool.wait_ready()
            template = template_pid(pool)
            await pool.predict({"how": how, "pidfile": str(pidfile)})
            (helper,) = read_pids(pidfile)
            assert process_alive(helper)  # its model lives: so does it
            with pytest.raises(ModelFailed):
                await pool.predict({"exit": 3})
            await wait_until(lambda: not process_alive(helper), 5, f"the {how} helper to die")
            assert process_alive(template)  # the template is not the child's to take along
    finally:
        kill_if_alive(read_pids(pidfile))


# -- the service -------------------------------------------------------------------------


async def test_the_service_shows_the_template_and_leaves_nothing_in_any_order_of_deaths() -> None:
    args = ("--model-cmd", " ".join(MODEL3), "--workers", "2", "--preload")
    async with server_process(*args, env=FAST_MODEL3) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 2, within=30)
            status = (await client.get("/status")).json()
            template = status["template"]
            assert template["state"] == "ready" and template["generation"] == 1
            assert template["load_seconds"] > 0.2 and template["shared_mib"] > 0
            assert [w["start"]["method"] for w in status["workers"]] == ["fork", "fork"]
            metrics = (await client.get("/metrics")).text
            assert 'modelpool_template_state{state="ready"} 1.0' in metrics
            assert 'modelpool_model_start_seconds_count{method="fork"} 2.0' in metrics
            children = [w["pid"] for w in status["workers"]]
            # the template dies first: the service adopts its children, so it learns
            # how each one ends, and the children serve on
            os.kill(template["pid"], signal.SIGKILL)
            assert (await client.post("/predict", json={"data": 0})).status_code == 200
            os.kill(children[0], signal.SIGKILL)

            async def replaced() -> bool:
                workers = (await client.get("/status")).json()["workers"]
                return all(w["pid"] not in (None, children[0]) for w in workers[:1])

            with trio.fail_after(10):
                while not await replaced():
                    await trio.sleep(0.05)
            failure = (await client.get("/status")).json()["workers"][0]["last_failure"]
            assert failure["exit_code"] == -signal.SIGKILL, "\n".join(server.log[-40:])
            await wait_ready(client, 2, within=10)
            pids = server.model_pids() | {template["pid"]}
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=20) == 0
    await wait_until(lambda: not any(map(process_alive, pids)), 5, "every model gone")


async def test_a_sigkilled_service_leaves_no_template_and_no_child() -> None:
    args = ("--model-cmd", " ".join(MODEL3), "--workers", "2", "--preload")
    async with server_process(*args, env=FAST_MODEL3) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 2, within=30)
            status = (await client.get("/status")).json()
        pids = {status["template"]["pid"], *(w["pid"] for w in status["workers"])}
        server.proc.kill()
        await server.exit_code(within=10)
    await wait_until(lambda: not any(map(process_alive, pids)), 10, "template and children gone")


async def test_a_cluster_worker_node_preloads(tmp_path: Path) -> None:
    from redisserver import redis_server

    async with redis_server() as url:
        model = ("--model-cmd", " ".join(MODEL3))
        front_args = ("--queue", url, "--workers", "0", *model)
        node_args = ("--queue", url, "--workers", "2", "--preload", *model)
        async with (
            server_process(*front_args, env=FAST_MODEL3) as front,
            server_process(*node_args, env=FAST_MODEL3, command=("worker",)) as node,
        ):
            async with await wait_listening(front) as client:
                await wait_ready(client, 2, within=60)
                answers = [await client.post("/predict", json={"data": 0}) for _ in range(3)]
                assert [a.status_code for a in answers] == [200] * 3
                assert any("forked from its template" in line for line in node.log)
                assert any("template (generation 1)" in line for line in node.log)
            pids = node.model_pids()
            assert len(pids) == 3  # the template and its two children
            for proc in (node, front):
                proc.proc.send_signal(signal.SIGTERM)
                assert await proc.exit_code(within=20) == 0
    await wait_until(lambda: not any(map(process_alive, pids)), 5, "every model gone")


async def test_the_bundled_model3_preloads_from_the_command_line_defaults() -> None:
    """`modelpool serve --preload` with no --model-cmd: the bundled model3.py."""
    async with server_process("--workers", "2", "--preload", env=FAST_MODEL3) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 2, within=30)
            response = await client.post("/predict", json={"data": 0})
            assert response.json() == {"ice_found": True}
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=20) == 0


async def test_a_template_that_becomes_unsafe_after_its_fork_point_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A signal handler of the model runs in the template while it waits, and starts a
    thread: the next fork is refused, and that start (and the next) is a plain one."""
    script = tmp_path / "late_thread.py"
    script.write_text(
        "import json, os, signal, sys, threading, time\n"
        "def start_thread(*_):\n"
        "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "signal.signal(signal.SIGALRM, start_thread)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.5)\n"
        "print('ready: Model-initialized')\n"
        "for line in sys.stdin:\n"
        "    print('result: ' + json.dumps({'pid': os.getpid(), 'ppid': os.getppid()}))\n"
    )
    config = PoolConfig(model_cmd=[sys.executable, str(script)], workers=1, preload=True)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        assert pool.workers[0].snapshot()["start"]["method"] == "fork"
        await trio.sleep(1.0)  # its timer went off in the template: a second thread runs
        await pool.operations.scale(3)
        status = pool.status()
        assert status["template"]["state"] == "fallback"
        assert "threads" in status["template"]["fallback_reason"]
        methods = sorted(w["start"]["method"] for w in status["workers"])
        assert methods == ["fork", "spawn", "spawn"]
        for _ in range(3):
            assert (await pool.predict({}))["pid"]
    assert any("--preload" in r.msg and r.levelno == logging.WARNING for r in caplog.records)


async def test_a_stuck_template_is_replaced_and_replacements_fork_from_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("modelpool.process.template.FORK_TIMEOUT", 0.5)
    # No refresh: once its template is gone, what a child shared with it is its own,
    # and a refresh may then replace it by a fork of the new one (test_refresh.py).
    config = model3_config(workers=2, preload=True, backoff_initial=0.1, preload_max_private=0)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        stuck, child, other = template_pid(pool), pool.workers[0].pid, pool.workers[1].pid
        assert child is not None
        os.kill(stuck, signal.SIGSTOP)
        try:
            os.kill(child, signal.SIGKILL)
            await wait_until(
                lambda: (pool.status()["template"] or {}).get("pid") not in (None, stuck),
                10,
                "a new template",
            )
            await pool.wait_ready()
            assert parent_of(pool.workers[0].pid or 0) == template_pid(pool)
            assert await pool.predict({"data": 0}) == {"ice_found": True}
            assert not process_alive(stuck)
            assert pool.workers[1].pid == other and process_alive(other)  # not taken along
        finally:
            kill_if_alive([stuck])


async def test_reload_to_a_command_that_cannot_be_preloaded_changes_nothing() -> None:
    async with open_pool(model3_config(workers=1, preload=True)) as pool:
        await pool.wait_ready()
        template, child = template_pid(pool), pool.workers[0].pid
        with pytest.raises(OperationFailed, match="cannot be preloaded"):
            await pool.operations.reload(["/bin/sh", "-c", "echo"])
        assert template_pid(pool) == template and pool.workers[0].pid == child
        assert pool.generation == 1
        assert await pool.predict({"data": 0}) == {"ice_found": True}


async def test_an_interpreter_that_cannot_be_run_stops_the_pool_at_once() -> None:
    config = PoolConfig(model_cmd=["/nonexistent/python3", "model.py"], preload=True)
    with trio.fail_after(10), pytest.raises(ModelCommandError, match="cannot run"):
        async with open_pool(config):
            await trio.sleep(30)


async def test_a_model_that_writes_garbage_to_the_control_socket_costs_only_its_template(
    tmp_path: Path,
) -> None:
    """The model runs in the template's process and can find the launcher's socket: what
    it writes there fails that template's load; the children serve on, and /status says
    why. (Its first load behaves; the one after the template is killed meddles.)"""
    script, marker = tmp_path / "meddler.py", tmp_path / "loaded-once"
    script.write_text(
        "import os, pathlib, socket, stat, sys\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if marker.exists():\n"
        "    for name in os.listdir('/proc/self/fd'):\n"
        "        try:\n"
        "            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):\n"
        "                socket.socket(fileno=os.dup(int(name))).send(b'{not json')\n"
        "        except OSError:\n"
        "            pass\n"
        "marker.touch()\n"
        "print('ready: Model-initialized')\n"
        "for line in sys.stdin:\n"
        "    print('result: {}')\n"
    )
    config = PoolConfig(model_cmd=[sys.executable, str(script)], workers=2, preload=True)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        children = [w.pid for w in pool.workers]
        os.kill(template_pid(pool), signal.SIGKILL)
        await wait_until(
            lambda: "makes no sense" in str((pool.status()["template"] or {}).get("last_failure")),
            10,
            "the meddling template to fail",
        )
        assert pool.status()["template"]["state"] in ("failed", "loading")
        for _ in range(3):
            assert await pool.predict({}) == {}
        assert [w.pid for w in pool.workers] == children


# -- what a user sees when the template cannot load -----------------------------------


async def test_a_template_that_fails_at_first_start_stops_the_pool_with_its_stderr(
    tmp_path: Path,
) -> None:
    """A typo under --preload: the models never start, as without it, and the verdict
    quotes the template's traceback (it is the only model that ran), as /status does."""
    script = tmp_path / "typo.py"
    script.write_text("import sys\nprint('ModuleNotFoundError: torhc', file=sys.stderr)\n")
    script.write_text(script.read_text() + "sys.exit(1)\n")
    config = PoolConfig(model_cmd=[sys.executable, str(script)], workers=2, preload=True)
    with trio.fail_after(15), pytest.raises(FirstStartFailed) as raised:
        async with open_pool(config) as pool:
            await pool.wait_ready()
    message = str(raised.value)
    assert "model exited with code 1" in message
    assert "its last stderr lines:\n    ModuleNotFoundError: torhc" in message, message


async def test_a_failed_template_load_shows_its_stderr_in_each_workers_last_failure(
    tmp_path: Path,
) -> None:
    script = tmp_path / "broken.py"
    script.write_text(
        "import sys\nprint('no weights at /models/x', file=sys.stderr)\nsys.exit(2)\n"
    )
    config = PoolConfig(
        model_cmd=[sys.executable, str(script)], workers=1, preload=True, keep_trying=True
    )
    async with open_pool(config) as pool:
        await wait_until(lambda: pool.workers[0].last_failure is not None, 10, "a failure")
        failure = pool.workers[0].last_failure
        assert "exited with code 2" in failure["detail"]
        assert failure["stderr"] == ["no weights at /models/x"], failure


async def test_numpys_openblas_threads_fall_back_with_the_variable_that_keeps_them_to_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Threads started in C (OpenBLAS at `import numpy`) are threads like any other: no
    fork. The warning says where they come from and how to have none. (With a thread
    budget, the default, the template has none: here the environment is left alone.)"""
    caplog.set_level(logging.INFO)
    # at least two, so OpenBLAS starts one thread of its own beside the main one
    config = preload_config(
        "numpy_model.py", workers=1, model_threads=0, env={"OPENBLAS_NUM_THREADS": "2"}
    )
    async with open_pool(config) as pool:
        await pool.wait_ready()
        assert (await pool.predict({}))["sum"] == 200.0**3
        reason = pool.status()["template"]["fallback_reason"]
        assert pool.status()["template"]["state"] == "fallback"
        assert "started in C" in reason, reason
        assert "OPENBLAS_NUM_THREADS=1" in reason and "OMP_NUM_THREADS=1" in reason, reason
    one_thread = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    async with open_pool(preload_config("numpy_model.py", workers=2, env=one_thread)) as pool:
        await pool.wait_ready()
        assert [w.snapshot()["start"]["method"] for w in pool.workers] == ["fork", "fork"]
        assert (await pool.predict({}))["sum"] == 200.0**3


# -- how a forked child is seen waiting (model.py's catch-up) ---------------------------


async def test_a_forked_model3_child_is_seen_waiting_in_its_read_of_stdin() -> None:
    """A child carries on with the template's read of its stdin: the very read a plain
    model3 waits in, so it is seen waiting, and caught up with the same way."""
    async with open_pool(model3_config(workers=2, preload=True)) as pool:
        await pool.wait_ready()
        await pool.predict({"data": 0})  # its model learned before the request went
        models = [w._model for w in pool.workers]
        assert all(m is not None and m.method == "fork" for m in models)
        await wait_until(lambda: all(m and m.waits_visibly for m in models), 5, "both seen")


async def test_a_forked_child_that_prints_a_second_result_after_a_pause_is_replaced() -> None:
    """As tests/test_stray.py checks for plain models: the second result, half a second
    after the first, never answers the next request; its child is replaced by a fork."""
    config = preload_config("two_results.py", env={"TWO_RESULTS_GAP": "0.5"})
    async with open_pool(config) as pool:
        for round in range(3):
            await wait_until(lambda: pool.ready_count == 1, 5, "a fresh model")
            first_pid = pool.workers[0].pid
            outcomes: list = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(predict_into, pool, {"name": "A", "sleep": 0.1}, outcomes)
                await wait_until(lambda: pool.workers[0].state == "busy", 5, "A computing")
                nursery.start_soon(predict_into, pool, {"name": "B"}, outcomes)
            by_name = {o["echo"]["name"]: o for o in outcomes}
            assert by_name["A"]["which"] == "first", (round, outcomes)
            assert (by_name["B"]["which"], by_name["B"]["count"]) == ("first", 1), outcomes
            assert by_name["B"]["pid"] != first_pid, round
            assert pool.workers[0].snapshot()["start"]["method"] == "fork"
        assert "printed a result when none was awaited" in pool.workers[0].last_failure["detail"]


async def test_the_template_is_not_reported_as_a_model_whose_waiting_cannot_be_seen(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The template waits for forks, not requests: what a request-serving model looks
    like while it waits is none of its business, and the log must not warn about it."""
    monkeypatch.setattr("modelpool.process.pacing.LEARN_MAX", 0.2)
    caplog.set_level(logging.INFO, logger="modelpool.model")
    async with open_pool(model3_config(workers=1, preload=True)) as pool:
        await pool.wait_ready()
        await trio.sleep(0.6)  # past LEARN_MAX, for the template too
        await pool.predict({"data": 0})
    unseen = [r.getMessage() for r in caplog.records if "cannot be seen" in r.getMessage()]
    assert unseen == [], unseen


async def test_a_forked_childs_traceback_is_the_one_its_model_prints_when_run_plainly() -> None:
    """The launcher and runpy are modelpool's business: a crash's stderr (in /status and
    the 502) is the model's own traceback, as without --preload, line for line."""
    tracebacks = []
    for preload in (False, True):
        async with open_pool(model3_config(workers=1, preload=preload)) as pool:
            await pool.wait_ready()
            with pytest.raises(ModelFailed) as failed:
                await pool.predict({"no data": 1})
            assert "exited with code 1" in str(failed.value)
            tracebacks.append(failed.value.stderr)
    plain, preloaded = tracebacks
    assert plain[0] == "Traceback (most recent call last):" and "model3.py" in plain[1]
    assert preloaded == plain


async def test_what_a_child_holds_is_measured_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child's private pages come from /proc/PID/smaps_rollup, which walks its page
    tables: about 1.4 ms for 300 MiB, so tens of ms a second for a few children of a big
    model. The once-a-second check reads them in a thread, not in the event loop that
    serves every request. (The real measurement runs; the test only notes its thread.)"""
    import threading

    from modelpool.process import forked as preload

    threads: list[str] = []
    measure = preload.tree_private_mib

    def noted(pid: int) -> float:
        threads.append(threading.current_thread().name)
        return measure(pid)

    monkeypatch.setattr(preload, "tree_private_mib", noted)
    async with open_pool(model3_config(workers=2, preload=True, model_max_rss=10_000)) as pool:
        await pool.wait_ready()
        await wait_until(lambda: len(threads) >= 4, 5, "two memory checks")
        assert await pool.predict({"data": 0}) == {"ice_found": True}
    assert threading.main_thread().name not in threads, threads


async def test_a_model_that_reads_a_helpers_pipe_falls_back_as_siblings_would_share_it(
    tmp_path: Path,
) -> None:
    """A helper started while the model loads, whose answers come through a pipe: every
    child would read that one pipe, and take its siblings' answers. Not safe to fork."""
    script = tmp_path / "with_helper.py"
    script.write_text(
        "import json, os, subprocess, sys\n"
        "helper = subprocess.Popen(['cat'], stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n"
        "print('ready: Model-initialized')\n"
        "for line in sys.stdin:\n"
        "    helper.stdin.write(line.encode())\n"
        "    helper.stdin.flush()\n"
        "    echoed = json.loads(helper.stdout.readline())\n"
        "    print('result: ' + json.dumps({'pid': os.getpid(), 'echo': echoed}))\n"
    )
    config = PoolConfig(model_cmd=[sys.executable, str(script)], workers=2, preload=True)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        outcomes: list = []
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(predict_into, pool, {"n": n}, outcomes)
        assert sorted(o["echo"]["n"] for o in outcomes) == list(range(20))
        snapshot = pool.status()["template"]
        assert snapshot["state"] == "fallback", snapshot
        assert "the reading end of a pipe" in snapshot["fallback_reason"]
