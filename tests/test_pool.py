"""The pool as a library inside a plain trio program: dispatch, failures, restarts."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
from pathlib import Path

import pytest
import trio

from conftest import (
    model3_config,
    predict_into,
    process_alive,
    scripted_config,
    wait_busy,
    wait_until,
)
from modelpool import (
    BadRequest,
    ModelCommandError,
    ModelFailed,
    ModelTimeout,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    open_pool,
)
from modelpool.pool.pool import Pool


def pids(pool: Pool) -> list[int | None]:
    return [w.pid for w in pool.workers]


async def test_embedded_pool_answers_without_http() -> None:
    async with open_pool(model3_config()) as pool:
        assert await pool.predict({"data": 0}) == {"ice_found": True}
        assert await pool.predict({"data": 3}) == {"ice_found": True}
        assert sum(w.served for w in pool.workers) == 2


async def test_models_start_in_parallel() -> None:
    # Each model takes about 1.5 s to start; one after the other, four would take 6 s.
    config = model3_config(workers=4, env={"MODEL3_STEP_SECONDS": "0.3"})
    async with open_pool(config) as pool:
        started = trio.current_time()
        await pool.wait_ready()
        assert trio.current_time() - started < 4.0
        assert len(set(pids(pool))) == 4


async def test_first_free_model_takes_the_oldest_request() -> None:
    async with open_pool(scripted_config()) as pool:
        await pool.wait_ready()
        answers: dict[int, int] = {}

        async def ask(n: int) -> None:
            answers[n] = (await pool.predict({"n": n}))["count"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.predict, {"sleep": 0.5})
            await wait_busy(pool)
            for n in range(6):
                nursery.start_soon(ask, n)
                await wait_until(lambda n=n: pool.queue_length == n + 1, 5, "the queue")
        # count 1 was the blocker; the queued requests were served in arrival order
        assert [answers[n] for n in range(6)] == [2, 3, 4, 5, 6, 7]


async def test_timeout_kills_the_model_and_the_next_request_gets_a_fresh_one() -> None:
    async with open_pool(scripted_config(timeout=0.5)) as pool:
        await pool.wait_ready()
        first_pid = pool.workers[0].pid
        assert first_pid is not None
        started = trio.current_time()
        with pytest.raises(ModelTimeout):
            await pool.predict({"sleep": 30})
        assert trio.current_time() - started < 3
        assert not process_alive(first_pid)
        answer = await pool.predict({"n": 1})
        assert answer["pid"] != first_pid
        assert answer["count"] == 1
        assert pool.workers[0].restarts == 1


async def test_time_waiting_in_the_queue_does_not_count_towards_the_timeout() -> None:
    async with open_pool(scripted_config(timeout=1.5)) as pool:
        await pool.wait_ready()
        outcomes: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(predict_into, pool, {"n": 1, "sleep": 1}, outcomes)
            await wait_busy(pool)
            nursery.start_soon(predict_into, pool, {"n": 2, "sleep": 1}, outcomes)
        # the second waited about 1 s and computed 1 s: 2 s in all, but only 1 s of compute
        assert [o["echo"]["n"] for o in outcomes] == [1, 2]


async def test_the_log_tells_what_happened(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # a request served is logged at DEBUG
    async with open_pool(scripted_config(timeout=0.5)) as pool:
        await pool.predict({"n": 1})
        with pytest.raises(ModelTimeout):
            await pool.predict({"sleep": 5})
        with pytest.raises(ModelFailed):
            await pool.predict({"exit": 9})
        await pool.wait_ready()
    text = caplog.text
    for expected in (
        r"worker 0 \[pid \d+\] started: ",
        r"worker 0 \[pid \d+\] ready after \d+\.\d s",
        r"request \S+ served in \d+\.\d\d s \(queued \d+\.\d\d s\)",
        r"request \S+ failed, model killed: no result after 0.5 s",
        r"request \S+ failed, model killed: model exited with code 9",
        r"1/1 models ready after \d+\.\d s",
        r"worker 0: restart 2 in 0\.0 s",
    ):
        assert re.search(expected, text), expected


async def test_timeout_also_kills_what_the_model_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    async with open_pool(scripted_config(timeout=1)) as pool:
        with pytest.raises(ModelTimeout):
            await pool.predict({"spawn": str(pidfile), "sleep": 30})
        grandchild = int(pidfile.read_text())
        await wait_until(lambda: not process_alive(grandchild), 5, "the grandchild to die")


async def test_crash_reports_exit_code_and_stderr_and_the_model_is_replaced() -> None:
    async with open_pool(scripted_config()) as pool:
        await pool.wait_ready()
        first_pid = pool.workers[0].pid
        with pytest.raises(ModelFailed) as failure:
            await pool.predict({"stderr": "out of ice", "exit": 7})
        assert failure.value.exit_code == 7
        assert failure.value.stderr == ["out of ice"]
        assert "code 7" in failure.value.detail
        await pool.wait_ready()
        assert pool.workers[0].pid != first_pid
        assert (await pool.predict({"n": 1}))["count"] == 1


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("result: [1, 2]", "not an object"),
        ("result: {broken", "not JSON"),
        ("result: ", "not JSON"),
    ],
)
async def test_a_result_that_is_not_a_json_object_is_a_model_failure(
    line: str, reason: str
) -> None:
    async with open_pool(scripted_config()) as pool:
        await pool.wait_ready()
        first_pid = pool.workers[0].pid
        with pytest.raises(ModelFailed) as failure:
            await pool.predict({"raw": line})
        assert reason in failure.value.detail
        assert (await pool.predict({"n": 1}))["pid"] != first_pid


async def test_lines_that_are_not_results_are_logged_not_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with open_pool(scripted_config(model_stdout_level="INFO")) as pool:
        answer = await pool.predict({"noise": 3, "stderr": "a warning"})
        assert answer["count"] == 1
    logged = caplog.text
    assert "stdout: progress 2" in logged
    assert "stderr: a warning" in logged
    assert "worker 0" in logged


@pytest.mark.parametrize("rate", [10, None])
async def test_a_chatty_model_is_logged_at_a_bounded_rate_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture, rate: int | None
) -> None:
    caplog.set_level(logging.INFO)
    async with open_pool(scripted_config(model_log_rate=rate, model_stdout_level="INFO")) as pool:
        assert (await pool.predict({"noise": 1000}))["count"] == 1
    logged = sum("stdout: progress" in r.getMessage() for r in caplog.records)
    counts = [
        int(m.group(1))
        for r in caplog.records
        if (m := re.search(r": (\d+) lines it printed in \d+ s were not logged", r.getMessage()))
    ]
    if rate is None:  # --model-log-rate 0: every line
        assert (logged, counts) == (1000, [])
    else:  # a burst of 100 at once, a few more as the budget refills; the rest counted
        assert 90 <= logged < 150, logged  # its start-up lines came out of the burst
        assert logged + sum(counts) == 1000, (logged, counts)


async def test_an_oversized_line_is_a_model_failure() -> None:
    async with open_pool(scripted_config(max_line=1000)) as pool:
        with pytest.raises(ModelFailed) as failure:
            await pool.predict({"big": 5000})
        assert "longer than 1000 bytes" in failure.value.detail
        assert (await pool.predict({"n": 1}))["count"] == 1  # a fresh model answers


async def test_a_model_that_closes_stdout_is_a_model_failure() -> None:
    async with open_pool(scripted_config()) as pool:
        with pytest.raises(ModelFailed) as failure:
            await pool.predict({"close_stdout": True})
        assert "closed its output" in failure.value.detail
        assert (await pool.predict({"n": 1}))["count"] == 1


async def test_a_model_that_dies_while_idle_is_replaced_before_the_next_request() -> None:
    async with open_pool(scripted_config()) as pool:
        await pool.wait_ready()
        first_pid = pool.workers[0].pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        await wait_until(lambda: pool.workers[0].restarts == 1, 5, "a restart")
        answer = await pool.predict({"n": 1})
        assert answer["pid"] != first_pid


async def test_a_request_its_model_could_not_read_is_queued_again() -> None:
    async with open_pool(scripted_config()) as pool:
        first = await pool.predict({"close_stdin": True})
        stdin = Path(f"/proc/{first['pid']}/fd/0")
        await wait_until(lambda: not stdin.exists(), 5, "the model to close its stdin")
        answer = await pool.predict({"id": "next"})  # the write to the first model fails
        assert answer["echo"] == {"id": "next"}
        assert answer["pid"] != first["pid"]
        assert answer["count"] == 1
        assert pool.workers[0].restarts == 1


async def test_start_up_failures_back_off_instead_of_looping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = scripted_config(
        model_cmd=["sh", "-c", "echo cannot load >&2; exit 3"],
        keep_trying=True,
        backoff_initial=0.1,
        backoff_max=0.4,
        queue_timeout=0.5,
    )
    async with open_pool(config) as pool:
        # delays 0.1, 0.2, 0.4, 0.4, ...: about 6 starts in 2 s (a hot loop makes hundreds)
        await trio.sleep(2)
        worker = pool.status()["workers"][0]
        assert 3 <= worker["restarts"] <= 9
        assert worker["next_backoff"] == 0.4
        assert worker["state"] in ("restarting", "starting")
        assert worker["last_failure"]["reason"] == "start_failed"
        assert worker["last_failure"]["stderr"] == ["cannot load"]
        with pytest.raises(QueueTimeout):  # the pool stays up and says why it cannot serve
            await pool.predict({"n": 1})
    # the stderr is the model's business: in /status (above), not in the ERROR line
    assert "failed to start: model exited with code 3; its stderr is in /status" in caplog.text
    assert "cannot load" not in caplog.text


@pytest.mark.parametrize("command", [["/nonexistent/model"], ["nonexistent-binary", "--x"]])
async def test_a_model_command_that_cannot_run_at_all_stops_the_pool_at_once(
    command: list[str],
) -> None:
    started = trio.current_time()
    with pytest.raises(ModelCommandError, match=f"cannot run '{command[0]}': No such file"):
        async with open_pool(scripted_config(model_cmd=command, workers=3)) as pool:
            await trio.sleep(30)  # not reached: the pool raises first
            pool.shutdown()
    assert trio.current_time() - started < 2


async def test_a_model_command_that_stops_working_later_is_retried(tmp_path: Path) -> None:
    # Once models have served, a missing command is one more start failure (the file may
    # come back, as during a deployment), not a reason to stop serving.
    model = tmp_path / "model.sh"
    model.write_text(
        "#!/bin/sh\necho 'ready: Model-initialized'\n"
        "while read -r line; do echo 'result: {}'; done\n"
    )
    model.chmod(0o755)
    config = scripted_config(
        model_cmd=[str(model)], workers=1, backoff_initial=0.1, backoff_max=0.2
    )
    async with open_pool(config) as pool:
        await pool.wait_ready()
        model.chmod(0o644)  # no longer executable
        pid = pool.workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: pool.workers[0].restarts >= 2, 5, "failed restarts")
        model.chmod(0o755)
        await wait_until(lambda: pool.ready_count == 1, 5, "the model back")
        assert "Permission denied" in pool.workers[0].last_failure["detail"]
        assert await pool.predict({"n": 1}) == {}


async def test_a_model_that_fails_to_start_a_few_times_recovers(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    config = scripted_config(
        env={"SCRIPTED_FAIL_STARTS": f"{counter}:2"},
        keep_trying=True,
        backoff_initial=0.1,
        backoff_max=0.2,
    )
    async with open_pool(config) as pool:
        answer = await pool.predict({"n": 1})
        assert answer["count"] == 1
        assert counter.read_text() == "3"
        assert pool.workers[0].restarts == 2


async def test_a_model_that_never_gets_ready_is_killed_and_restarted() -> None:
    config = scripted_config(
        env={"SCRIPTED_NO_READY": "1"},
        keep_trying=True,
        init_timeout=0.5,
        backoff_initial=0.1,
        backoff_max=0.1,
    )
    async with open_pool(config) as pool:
        await wait_until(lambda: pool.workers[0].restarts >= 2, 5, "two restarts")
        assert pool.ready_count == 0


async def test_other_workers_keep_serving_while_one_model_cannot_start(tmp_path: Path) -> None:
    # The first start of all fails; its worker then waits 2 s before trying again.
    counter = tmp_path / "starts"
    config = scripted_config(
        workers=2, env={"SCRIPTED_FAIL_STARTS": f"{counter}:1"}, backoff_initial=2
    )
    async with open_pool(config) as pool:
        await wait_until(
            lambda: any(w.state == "restarting" for w in pool.workers), 5, "a failed start"
        )
        answers = [await pool.predict({"n": n}) for n in range(4)]
        # the worker that answered is idle again once it has seen its model back to reading
        await wait_until(
            lambda: sorted(w["state"] for w in pool.status()["workers"]) == ["idle", "restarting"],
            5,
            "one idle worker, one restarting",
        )
        assert [a["count"] for a in answers] == [1, 2, 3, 4]  # all by the one working model


async def test_a_full_queue_is_refused_at_once() -> None:
    async with open_pool(scripted_config(max_queue=2)) as pool:
        await pool.wait_ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.predict, {"sleep": 1})
            await wait_busy(pool)
            nursery.start_soon(pool.predict, {"n": 1})
            nursery.start_soon(pool.predict, {"n": 2})
            await wait_until(lambda: pool.queue_length == 2, 5, "a full queue")
            with pytest.raises(QueueFull):
                await pool.predict({"n": 3})


async def test_a_request_that_waits_too_long_for_a_model_gives_up() -> None:
    async with open_pool(scripted_config(queue_timeout=0.3)) as pool:
        await pool.wait_ready()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.predict, {"sleep": 1.5})
            await wait_busy(pool)
            with pytest.raises(QueueTimeout):
                await pool.predict({"n": 1})
            assert pool.queue_length == 0
        # the request that gave up never reached the model
        assert (await pool.predict({"n": 2}))["count"] == 2


async def test_a_caller_that_goes_away_does_not_desynchronise_the_model() -> None:
    async with open_pool(scripted_config()) as pool:
        await pool.wait_ready()
        with trio.move_on_after(0.3):
            await pool.predict({"id": "gone", "sleep": 1})
        with trio.move_on_after(0.1):  # queued behind it, then abandoned
            await pool.predict({"id": "also gone"})
        assert pool.queue_length == 0
        answer = await pool.predict({"id": "next"})
        assert answer["echo"] == {"id": "next"}
        assert answer["count"] == 2  # the abandoned queued one never reached the model
        assert pool.workers[0].restarts == 0


async def test_a_value_that_is_not_json_is_refused_before_any_model() -> None:
    async with open_pool(scripted_config()) as pool:
        for bad in (math.nan, {"data": math.inf}, {1j: 1}, object()):
            with pytest.raises(BadRequest):
                await pool.predict(bad)
        assert (await pool.predict({"n": 1}))["count"] == 1


async def test_shutdown_finishes_queued_and_running_requests_then_refuses() -> None:
    async with open_pool(scripted_config()) as pool:
        await pool.wait_ready()
        answers = []

        async def ask(n: int) -> None:
            answers.append((await pool.predict({"n": n, "sleep": 0.2}))["echo"]["n"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 0)
            await wait_busy(pool)
            for n in (1, 2):
                nursery.start_soon(ask, n)
                await wait_until(lambda n=n: pool.queue_length == n, 5, "a queued request")
            pool.shutdown()
            with pytest.raises(ShuttingDown):
                await pool.predict({"n": 99})
        assert answers == [0, 1, 2]


async def test_waiting_for_readiness_ends_when_the_pool_stops() -> None:
    config = scripted_config(env={"SCRIPTED_INIT_SECONDS": "30"})
    errors: list[Exception] = []

    async def wait_ready(pool: Pool) -> None:
        try:
            await pool.wait_ready()
        except ShuttingDown as exc:
            errors.append(exc)

    async with open_pool(config) as pool:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_ready, pool)
                await wait_until(lambda: pool.workers[0].pid is not None, 5, "a model")
                pool.shutdown()
    assert len(errors) == 1


async def test_shutdown_gives_up_on_requests_at_the_drain_deadline() -> None:
    config = scripted_config(drain_timeout=0.5, exit_grace=0.2, timeout=60)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        model_pid = pool.workers[0].pid
        assert model_pid is not None
        outcomes: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(predict_into, pool, {"sleep": 30}, outcomes)
            await wait_busy(pool)
            started = trio.current_time()
            pool.shutdown()
            with pytest.raises(ShuttingDown):
                await pool.predict({"n": 1})
        assert isinstance(outcomes[0], ShuttingDown)
        await pool.stopped.wait()
        assert trio.current_time() - started < 3
        assert not process_alive(model_pid)


async def test_a_running_request_is_answered_when_the_pool_is_killed() -> None:
    async with open_pool(scripted_config(exit_grace=5)) as pool:
        await pool.wait_ready()
        outcomes: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(predict_into, pool, {"sleep": 30}, outcomes)
            await wait_busy(pool)
            nursery.start_soon(predict_into, pool, {"n": 1}, outcomes)
            await wait_until(lambda: pool.queue_length == 1, 5, "a queued request")
            started = trio.current_time()
            pool.kill()
        await pool.stopped.wait()
        assert trio.current_time() - started < 2  # no exit grace on a hard stop
        assert [type(o) for o in outcomes] == [ShuttingDown, ShuttingDown]


async def test_a_model_that_ignores_stdin_closing_is_killed_after_the_grace() -> None:
    config = scripted_config(env={"SCRIPTED_IGNORE_EOF": "1"}, exit_grace=0.5)
    started = None
    async with open_pool(config) as pool:
        await pool.wait_ready()
        model_pid = pool.workers[0].pid
        assert model_pid is not None
        started = trio.current_time()
    assert 0.4 < trio.current_time() - started < 3
    assert not process_alive(model_pid)
