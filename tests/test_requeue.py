"""A request handed to a model that died before it read it is queued again, at the head.

Real models from tests/models/. A big model takes milliseconds to die after SIGKILL
(its memory is freed before its pipes close), so the write of a request into its stdin
succeeds and only the read of its answer sees it gone; and until a killed model runs,
its read of stdin is not over, so a request written then is read into a process that
will never see it. What the model left unread, or the SIGKILL it has pending, decides:
not when it died.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import trio

from conftest import hostile_config, predict_into, wait_until
from modelpool import PoolConfig, open_pool
from modelpool.core.errors import QueueTimeout
from modelpool.pool.pool import Pool

BIG_MIB = 400
ROUNDS = 8


def _big_config(start: str) -> PoolConfig:
    env = {"BIG_MODEL_MIB": str(BIG_MIB)}
    fork = start == "fork"  # children made big on purpose: not refreshed
    return hostile_config("big_memory.py", workers=4, env=env, preload=fork, preload_max_private=0)


@pytest.mark.parametrize("start", ["spawn", "fork"])
async def test_requests_sent_as_a_big_model_is_killed_while_idle_are_all_answered(
    start: str,
) -> None:
    """SIGKILL to an idle model, and at once as many requests as there are models: the
    killed model's worker takes one of them, which must be queued again, not failed."""
    async with open_pool(_big_config(start)) as pool:
        for round in range(ROUNDS):
            await wait_until(lambda: pool.local_ready == 4, 60, "four ready models")
            assert {w.snapshot()["start"]["method"] for w in pool.workers} == {start}
            if start == "fork":  # a child's pages are its template's until it writes them
                await _make_every_child_big(pool)
            victim = pool.workers[round % 4].pid
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            answers: list = []
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(predict_into, pool, {}, answers)
            failed = [a for a in answers if not isinstance(a, dict)]
            assert not failed, (round, failed)
            assert victim not in {a["pid"] for a in answers}, round
        assert sum(w.failed for w in pool.workers) == 0  # no request was lost with a model
        restarts = "modelpool_model_restarts_total"
        died = lambda: pool.metrics.value(restarts, reason="died_idle")  # noqa: E731
        await wait_until(lambda: died() == ROUNDS, 10, "every death recorded")


async def _make_every_child_big(pool: Pool) -> None:
    """Copy-on-write: a child that writes its weights holds them as its own."""
    big: set[int] = set()
    with trio.fail_after(60):
        while {w.pid for w in pool.workers} - big:
            answers: list = []
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(predict_into, pool, {"touch_mib": BIG_MIB}, answers)
            big |= {a["pid"] for a in answers if isinstance(a, dict)}


def _dies_unread(
    tmp_path: Path, workers: int = 1, delay: float = 0, load: float = 0, **overrides: object
) -> PoolConfig:
    """dies_unread.py: the first model dies on its first request, `delay` s after it
    came; the others take `load` s to load."""
    env = {"DIES_UNREAD_MARKER": str(tmp_path / "first"), "DIES_UNREAD_DELAY": str(delay)}
    env["DIES_UNREAD_LOAD"] = str(load)
    return hostile_config("dies_unread.py", env=env, workers=workers, **overrides)


async def test_a_request_queued_again_is_served_by_the_worker_that_took_it_meanwhile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The other worker takes the request queued again at once, while the first still
    replaces its dead model: the first must leave it to it (not answer it 503)."""
    caplog.set_level(logging.WARNING, "modelpool")
    async with open_pool(_dies_unread(tmp_path, workers=2)) as pool:
        await pool.wait_ready()
        dier = int((tmp_path / "first").read_text())
        # The worker that has waited longest takes each request: one of the first two
        # goes to the model that dies on it.
        answers = [await pool.predict({"n": n, "sleep": 1}) for n in range(2)]
        assert [a["echo"]["n"] for a in answers] == [0, 1]
        assert dier not in {a["pid"] for a in answers}
        requeued = [r for r in caplog.records if r.getMessage().endswith("; queued again")]
        assert len(requeued) == 1, [r.getMessage() for r in caplog.records]
        assert "model died before it read the request" in requeued[0].getMessage()
        assert sum(w.failed for w in pool.workers) == 0
        assert pool.metrics.value("modelpool_model_restarts_total", reason="died_idle") == 1


async def test_a_request_queued_again_goes_before_the_requests_that_came_after_it(
    tmp_path: Path,
) -> None:
    """One worker: A goes to the model that dies on it, B and C wait behind it; the next
    model answers A first."""
    async with open_pool(_dies_unread(tmp_path, delay=0.5)) as pool:
        await pool.wait_ready()
        answers: dict[str, object] = {}

        async def ask(name: str) -> None:
            box: list = []
            await predict_into(pool, {"name": name}, box)
            answers[name] = box[0]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "A")
            await wait_until(lambda: pool.workers[0].state == "busy", 5, "A taken")
            nursery.start_soon(ask, "B")
            await wait_until(lambda: pool.queue_length == 1, 5, "B queued")
            nursery.start_soon(ask, "C")
            await wait_until(lambda: pool.queue_length == 2, 5, "C queued")
        counts = {}
        for name, answer in answers.items():
            assert isinstance(answer, dict), (name, answer)
            counts[name] = answer["count"]
        assert counts == {"A": 1, "B": 2, "C": 3}


async def test_a_request_queued_again_waits_no_longer_than_the_queue_timeout(
    tmp_path: Path,
) -> None:
    """Its model died before reading it, and the replacement takes 8 s to load: the
    request waits for a model again, but only a --queue-timeout (1 s) from then, as any
    request does; it does not wait for the replacement (or a back-off of up to
    --backoff-max) unbounded. The replacement serves the next one."""
    config = _dies_unread(tmp_path, load=8, queue_timeout=1.0)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        started = trio.current_time()
        with pytest.raises(QueueTimeout):
            await pool.predict({"name": "A"})
        waited = trio.current_time() - started
        assert 0.9 <= waited < 5, waited  # its queue timeout again, not the 8 s load
        assert pool.queue_length == 0
        await pool.wait_ready()
        answer = await pool.predict({"name": "B"})
        assert answer["echo"] == {"name": "B"} and answer["count"] == 1
        assert sum(w.failed for w in pool.workers) == 0  # no model failed a request
