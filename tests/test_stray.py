"""What a model prints after its answer: a late second result, a stale id, a flood.

Real models from tests/models/. A result the model prints after it answered must never
answer the next request; with --id-field a result with an old id is dropped; and a
model that floods its stdout after answering costs its own worker, not the others.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import pytest
import trio

from conftest import hostile_config, predict_into, wait_busy, wait_until
from modelpool import ModelFailed, PoolError, open_pool
from modelpool.pool.pool import Pool
from modelpool.process.output import OUTPUT_BURST_LINES, OUTPUT_RATE_LINES

ROUNDS = 10


async def _a_then_b(pool: Pool, a: dict, b: dict) -> tuple[object, object]:
    """A, and B queued behind it: B is sent the moment the worker is free again."""
    outcomes: dict[str, object] = {}

    async def ask(name: str, request: dict) -> None:
        box: list = []
        await predict_into(pool, request, box)
        outcomes[name] = box[0]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "A", a)
        await wait_busy(pool)
        nursery.start_soon(ask, "B", b)
    return outcomes["A"], outcomes["B"]


@pytest.mark.parametrize("gap", [0.05, 0.5])
async def test_a_second_result_after_a_pause_never_answers_the_next_request(gap: float) -> None:
    """The model sleeps between its two results: it is blocked, but not back to reading."""
    config = hostile_config("two_results.py", env={"TWO_RESULTS_GAP": str(gap)})
    async with open_pool(config) as pool:
        for round in range(ROUNDS):
            await wait_until(lambda: pool.ready_count == 1, 5, "a fresh model")
            first_pid = pool.workers[0].pid
            a, b = await _a_then_b(pool, {"name": "A", "sleep": 0.1}, {"name": "B"})
            assert isinstance(a, dict) and a["which"] == "first", (round, a)
            assert isinstance(b, dict), (round, b)
            assert b["echo"] == {"name": "B"}, (round, b)
            assert (b["which"], b["count"]) == ("first", 1), (round, b)
            assert b["pid"] != first_pid, round  # the model that answered twice was replaced
        assert pool.workers[0].restarts >= ROUNDS
        assert pool.workers[0].last_failure["reason"] == "protocol"
        assert "printed a result when none was awaited" in pool.workers[0].last_failure["detail"]


async def test_a_model_that_does_not_get_back_to_reading_within_timeout_is_replaced() -> None:
    async with open_pool(hostile_config("slow_to_read.py", timeout=1)) as pool:
        await pool.wait_ready()
        first_pid = pool.workers[0].pid
        started = trio.current_time()
        a, b = await _a_then_b(pool, {"name": "A", "sleep": 0.1, "then_sleep": 30}, {"name": "B"})
        assert isinstance(a, dict) and a["echo"] == {"name": "A", "sleep": 0.1, "then_sleep": 30}
        # B was not sent to the sleeping model (it would have timed out there): a fresh
        # model answered it, once the first had its --timeout to get back to reading
        assert isinstance(b, dict), b
        assert b["echo"] == {"name": "B"} and b["pid"] != first_pid and b["count"] == 1
        assert 0.9 < trio.current_time() - started < 6
        failure = pool.workers[0].last_failure
        assert failure["reason"] == "timeout"
        assert "did not get back to reading its stdin within 1 s" in failure["detail"]
        assert failure["pid"] == first_pid
        assert pool.workers[0].served == 2 and pool.workers[0].failed == 0


async def test_a_model_that_gets_back_to_reading_within_timeout_is_waited_for() -> None:
    async with open_pool(hostile_config("slow_to_read.py", timeout=5)) as pool:
        await pool.wait_ready()
        first_pid = pool.workers[0].pid
        started = trio.current_time()
        a, b = await _a_then_b(pool, {"name": "A", "sleep": 0.1, "then_sleep": 0.3}, {"name": "B"})
        assert isinstance(a, dict) and isinstance(b, dict), (a, b)
        assert b["pid"] == first_pid and b["count"] == 2  # the same model, waited for
        assert trio.current_time() - started >= 0.3
        assert pool.workers[0].restarts == 0


async def test_a_pause_after_the_ready_line_is_not_taken_for_waiting() -> None:
    """select(0, ...) looks like a read of fd 0 by its first argument, not by its number."""
    async with open_pool(hostile_config("pause_after_ready.py", timeout=2)) as pool:
        await pool.wait_ready()
        await trio.sleep(0.8)  # past the pause: the model is seen in its read
        first = await pool.predict({"n": 1})
        assert (await pool.predict({"n": 2}))["pid"] == first["pid"]
        model = pool.workers[0]._model
        assert model is not None and model.waits_visibly
        assert pool.workers[0].restarts == 0


async def test_a_first_request_during_a_pause_after_the_ready_line_is_served() -> None:
    async with open_pool(hostile_config("pause_after_ready.py", timeout=2)) as pool:
        await pool.wait_ready()
        first = await pool.predict({"n": 1})  # sent during the pause: nothing learned
        assert (await pool.predict({"n": 2}))["pid"] == first["pid"]
        model = pool.workers[0]._model
        assert model is not None and not model.waits_visibly
        assert pool.workers[0].restarts == 0


@pytest.mark.parametrize("loop", ["select", "asyncio"])
async def test_an_event_loop_model_is_served_under_the_quiet_period_rule(loop: str) -> None:
    config = hostile_config("event_loop.py", env={"EVENT_LOOP": loop}, workers=2)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        answers: list = []
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(predict_into, pool, {"n": n, "sleep": 0.01}, answers)
        assert sorted(a["echo"]["n"] for a in answers) == list(range(20))
        for n in range(5):  # one after the other too
            assert (await pool.predict({"n": n}))["echo"] == {"n": n}
        assert [w.restarts for w in pool.workers] == [0, 0]
        models = [w._model for w in pool.workers]
        assert all(m is not None and not m.waits_visibly for m in models)


async def test_an_event_loop_model_that_floods_after_its_answer_is_replaced_as_hung() -> None:
    config = hostile_config("event_loop.py", timeout=1)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        first = await pool.predict({"flood": True})
        answer = await pool.predict({"n": 1})  # not sent to the flooder: it would time out
        assert answer["echo"] == {"n": 1} and answer["pid"] != first["pid"]
        failure = pool.workers[0].last_failure
        assert failure["reason"] == "timeout" and failure["pid"] == first["pid"]
        assert "did not stop printing within 1 s" in failure["detail"]


async def test_a_model_that_reads_its_stdin_is_seen_waiting() -> None:
    async with open_pool(hostile_config("echo.py")) as pool:
        await pool.predict({"n": 1})
        model = pool.workers[0]._model
        assert model is not None and model.waits_visibly


async def test_with_an_id_field_a_stale_result_is_dropped_and_the_request_gets_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The model prints each result again 50 ms later (a thread), while computing the next."""
    caplog.set_level(logging.WARNING, "modelpool.model")
    async with open_pool(hostile_config("late_id_copy.py", id_field="rid")) as pool:
        await pool.wait_ready()
        pid = pool.workers[0].pid
        for round in range(ROUNDS):
            a, b = await _a_then_b(pool, {"n": round, "sleep": 0.1}, {"n": round, "sleep": 0.3})
            assert isinstance(a, dict) and a["echo"] == {"n": round, "sleep": 0.1}, (round, a)
            assert isinstance(b, dict), (round, b)
            assert b["echo"] == {"n": round, "sleep": 0.3}, (round, b)
            assert "rid" not in b
        stale = "modelpool_stale_results_total"
        await wait_until(lambda: pool.metrics.value(stale) == 2 * ROUNDS, 5, "every copy dropped")
        assert pool.workers[0].pid == pid and pool.workers[0].restarts == 0
        warnings = [r.getMessage() for r in caplog.records if "stale result" in r.getMessage()]
        assert len(warnings) == 2 * ROUNDS
        assert f"[pid {pid}]" in warnings[0]
        assert a["rid_seen"] in " ".join(warnings)  # the stale id is named
        assert any("while awaiting" in w for w in warnings)  # and the request it did not answer


def _computing(pool: Pool, request_id: str) -> bool:
    return pool.workers[0].snapshot()["request_id"] == request_id


async def _ask(pool: Pool, request: dict, request_id: str, answers: dict[str, object]) -> None:
    try:
        answers[request_id] = await pool.predict(request, request_id=request_id)
    except PoolError as exc:
        answers[request_id] = exc


async def test_with_an_id_field_a_stale_result_quoting_the_awaited_id_is_dropped() -> None:
    """A client pads its request with the ids the next requests will be sent with (the
    model echoes ids, so they are easy to guess): the late copy of its result holds the
    awaited id's text, but its id field says whose result it is."""
    async with open_pool(hostile_config("late_id_copy.py", id_field="rid")) as pool:
        await pool.wait_ready()
        pid = pool.workers[0].pid
        prefix, number = (await pool.predict({"n": -1}))["rid_seen"].rsplit(".", 1)
        sent = int(number)
        for round in range(ROUNDS):
            upcoming = [f"{prefix}.{sent + k}" for k in range(1, 5)]
            answers: dict[str, object] = {}
            async with trio.open_nursery() as nursery:
                a_id, b_id = f"A{round}", f"B{round}"
                nursery.start_soon(_ask, pool, {"pad": upcoming, "sleep": 0.1}, a_id, answers)
                await wait_until(partial(_computing, pool, a_id), 5, "A taken")
                nursery.start_soon(_ask, pool, {"n": round, "sleep": 0.3}, b_id, answers)
            a, b = answers[a_id], answers[b_id]
            assert isinstance(a, dict) and a["echo"]["pad"] == upcoming, (round, a)
            assert isinstance(b, dict), (round, b)  # not 502: A's late copy answered nothing
            assert b["echo"] == {"n": round, "sleep": 0.3}, (round, b)
            assert b["rid_seen"] in upcoming  # A's copy quoted B's id
            sent = max(int(x["rid_seen"].rsplit(".", 1)[1]) for x in (a, b))
        stale = "modelpool_stale_results_total"
        await wait_until(lambda: pool.metrics.value(stale) >= 2 * ROUNDS, 5, "every copy dropped")
        assert pool.workers[0].pid == pid and pool.workers[0].restarts == 0


async def test_with_an_id_field_a_late_second_result_is_dropped_while_catching_up() -> None:
    model = hostile_config(
        "two_results.py", env={"TWO_RESULTS_GAP": "0.05", "ECHO_ID_FIELD": "rid"}, id_field="rid"
    )
    async with open_pool(model) as pool:
        await pool.wait_ready()
        pid = pool.workers[0].pid
        for round in range(ROUNDS):
            a, b = await _a_then_b(
                pool, {"name": "A", "n": round, "sleep": 0.1}, {"name": "B", "n": round}
            )
            assert isinstance(a, dict) and a["echo"]["name"] == "A"
            assert isinstance(b, dict), (round, b)
            assert b["echo"] == {"name": "B", "n": round}
            assert b["which"] == "first" and b["pid"] == pid
        assert pool.metrics.value("modelpool_stale_results_total") >= 2 * ROUNDS - 1
        assert pool.workers[0].restarts == 0


async def test_with_an_id_field_a_model_that_answers_only_with_the_previous_id_fails_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stale result is dropped; once the model is back to reading, it is its answer."""
    async with open_pool(hostile_config("wrong_id.py", id_field="rid", timeout=5)) as pool:
        assert await pool.predict({"answer_with": "right"}) == {"echo": {"answer_with": "right"}}
        started = trio.current_time()
        with pytest.raises(ModelFailed) as failure:
            await pool.predict({"answer_with": "previous"})
        assert trio.current_time() - started < 2  # not the 5 s timeout
        assert "it carries the id" in failure.value.detail
        assert "not this request's" in failure.value.detail
        assert failure.value.kind == "protocol"
        assert pool.metrics.value("modelpool_stale_results_total") == 1
        assert any("stale result" in r.getMessage() for r in caplog.records)
        assert (await pool.predict({"x": 1}))["echo"] == {"x": 1}


async def _served_in(pool: Pool, seconds: float) -> tuple[float, int]:
    """Requests answered, one after the other, in `seconds`, for each second of CPU this
    process (the pool, and so the reading of every model's output) spent meanwhile; and
    how many failed. A busy machine gives the process fewer seconds, not more work for
    each request: a flood that the pool reads beyond its budget does."""
    served = failed = 0
    cpu = time.process_time()
    with trio.move_on_after(seconds):
        while True:
            try:
                await pool.predict({"n": served})
                served += 1
            except PoolError:
                failed += 1
    return served / max(time.process_time() - cpu, 1e-3), failed


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_a_model_flooding_its_output_after_its_answer_does_not_starve_the_others(
    stream: str,
) -> None:
    config = hostile_config("flood_after.py", workers=2, timeout=3)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        alone, _ = await _served_in(pool, 1.5)
        flooder = await pool.predict({"flood": stream})
        answered = trio.current_time()
        (model,) = [w._model for w in pool.workers if w.pid == flooder["pid"]]
        assert model is not None
        flooding, failed = await _served_in(pool, 1.5)  # while the flooder floods
        assert failed == 0
        # what was read of the flood: the budget, and a chunk or two past it
        lines, _ = model.idle_output
        allowed = OUTPUT_BURST_LINES + OUTPUT_RATE_LINES * (trio.current_time() - answered)
        assert 1000 < lines < allowed + 5000, (lines, allowed)
        # The flooder never gets back to reading: after --timeout it is hung, and replaced.
        await wait_until(
            lambda: any(
                w.last_failure and w.last_failure["pid"] == flooder["pid"] for w in pool.workers
            ),
            8,
            "the flooder replaced",
        )
        (worker,) = [w for w in pool.workers if w.last_failure]
        assert worker.last_failure["reason"] == "timeout"
        answer = await pool.predict({"n": "after"})
        assert answer["echo"] == {"n": "after"}
        # Served for each CPU second while it flooded, against before and after it (the
        # machine's load, which other test processes change, takes wall time, not CPU)
        await pool.wait_ready()
        after, _ = await _served_in(pool, 1.5)
        assert flooding >= min(alone, after) / 3, (alone, flooding, after)


async def test_a_request_to_a_model_held_back_for_its_output_is_not_delayed() -> None:
    """The model printed past its budget after its ready line, and is blocked writing."""
    lines = 200000  # ten times the burst: read at the budget's rate, 9 s
    async with open_pool(hostile_config("flood.py", env={"FLOOD_AT_START": str(lines)})) as pool:
        await pool.wait_ready()
        await wait_until(lambda: pool.workers[0]._model.throttled, 5, "its output held back")
        started = trio.current_time()
        answer = await pool.predict({"lines": 1})
        assert answer["flooded"] == 1
        assert trio.current_time() - started < 3  # the rest of its noise read at once
        assert pool.workers[0].restarts == 0


async def test_an_awaited_result_behind_a_flood_is_not_held_back() -> None:
    """During its request a model may print as much as it likes: the budget does not apply."""
    async with open_pool(hostile_config("flood.py", timeout=5)) as pool:
        await pool.wait_ready()
        started = trio.current_time()
        answer = await pool.predict({"lines": 200000})  # about 8 MB on each stream
        assert answer["flooded"] == 200000
        assert trio.current_time() - started < 4
        assert pool.workers[0].restarts == 0
