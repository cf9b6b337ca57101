"""--preload-max-private and the figures of what each model holds, with real processes.

A child forked from a --preload template shares the template's pages until it writes
them. big_memory.py's {"touch_mib": n} writes n MiB of the weights it loaded before the
fork, so they become the child's own (copy-on-write), as a Python model's objects do
when it reads them. A child that holds more than --preload-max-private percent of its
template's resident memory is replaced by a fresh fork: its replacement first, and
only after it answered the request it computes.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import pytest
import trio

from conftest import MODELS, model3_config, predict_into, wait_until
from modelpool import PoolConfig, PoolError, open_pool
from modelpool.pool.pool import Pool
from modelpool.process.procfs import tree_smaps_kib

BIG_MIB = 200
REFRESH = "modelpool_model_restarts_total"


def newer_pythons() -> list[str]:
    """CPython 3.12 or newer installed by pyenv beside this one (the model's interpreter is
    the one of its command), newest last."""
    found = glob.glob(str(Path.home() / ".pyenv/versions/3.1[2-9]*/bin/python3"))
    return sorted(path for path in found if "t/" not in path.rsplit("versions/", 1)[1])


PYTHONS = [pytest.param(sys.executable, id="service-python")]
PYTHONS += [
    pytest.param(python, id="python" + Path(python).parents[1].name) for python in newer_pythons()
][-1:] or [
    pytest.param(
        None, id="python3.12+", marks=pytest.mark.skip(reason="no CPython 3.12+ under ~/.pyenv")
    )
]


def big_config(python: str | None = None, **overrides: object) -> PoolConfig:
    options: dict = {
        "model_cmd": [python or sys.executable, "-u", str(MODELS / "big_memory.py")],
        "workers": 2,
        "preload": True,
        "env": {"BIG_MODEL_MIB": str(BIG_MIB)},
    }
    options.update(overrides)
    return PoolConfig(**options)


def refreshes(pool: Pool) -> float | None:
    return pool.metrics.value(REFRESH, reason="refresh")


async def settle(pool: Pool) -> None:
    """Wait until the template is done with its objects (made immortal where it can be,
    and its first children replaced by forks of it, see immortal.py): no other surge."""

    def settled() -> bool:
        template = pool.status()["template"]
        walking = template.get("why_not_immortal") == "being made immortal"
        steady = all(w.ready and w.retiring is None for w in pool.workers)
        return not walking and steady and len(pool.workers) == pool.config.workers

    await wait_until(settled, 30, "the template's objects settled")
    await trio.sleep(0.5)
    await wait_until(settled, 30, "the template's children replaced")


def template_parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("python", PYTHONS)
async def test_a_child_that_made_the_template_its_own_is_replaced_after_it_answers(
    python: str,
) -> None:
    """The child passes the limit while it computes: its replacement is forked and ready
    while it still computes, it answers its request, and only then retires. Requests
    sent all the while are all answered."""
    async with open_pool(big_config(python, preload_max_private=25)) as pool:
        await pool.wait_ready()
        await settle(pool)
        template = pool.status()["template"]["pid"]
        answers: list = []
        stop_traffic = trio.Event()

        async def traffic() -> None:
            while not stop_traffic.is_set():
                await predict_into(pool, {}, answers)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            grown: list = []
            # 60 % of the template's weights become its own, then it computes for 4 s
            nursery.start_soon(predict_into, pool, {"touch_mib": 120, "sleep": 4}, grown)
            await wait_until(lambda: any(w.state == "busy" for w in pool.workers), 5, "busy")
            # its replacement is ready first; only then is it retired
            retiring = lambda: [w for w in pool.workers if w.retiring is not None]  # noqa: E731
            await wait_until(lambda: bool(retiring()), 3, "its replacement, then its retiring")
            grower = retiring()[0]
            grower_pid = grower.pid
            assert len(pool.workers) == 3 and all(w.ready for w in pool.workers)
            assert grower.state == "busy" and not grown, "it still computes"
            await wait_until(lambda: bool(grown), 10, "its answer")
            stop_traffic.set()
        assert isinstance(grown[0], dict) and grown[0]["pid"] == grower_pid, grown
        failed = [a for a in answers if isinstance(a, PoolError)]
        assert not failed and len(answers) > 10, (failed, len(answers))
        await wait_until(lambda: len(pool.workers) == 2, 10, "the grown child retired")
        assert grower_pid not in [w.pid for w in pool.workers]
        assert refreshes(pool) == 1
        for worker in pool.workers:
            assert worker.pid is not None and template_parent(worker.pid) == template
            assert worker.snapshot()["start"]["method"] == "fork"
            assert worker.failed == 0


async def test_a_child_under_the_limit_is_kept_and_0_keeps_every_child() -> None:
    async with open_pool(big_config(preload_max_private=40, workers=1)) as pool:
        await pool.wait_ready()
        first = pool.workers[0].pid
        await pool.predict({"touch_mib": BIG_MIB // 5})  # 20 %: its own, under 40 %
        await trio.sleep(2.5)  # two looks at every model, glances in between
        assert [w.pid for w in pool.workers] == [first]
        assert pool.workers[0].memory_seen.of(pool.workers[0].pid) is not None
        assert pool.workers[0].memory_seen.of(pool.workers[0].pid)[1] >= BIG_MIB // 5 * 1024
        assert refreshes(pool) == 0
    async with open_pool(big_config(preload_max_private=0, workers=1)) as pool:
        await pool.wait_ready()
        first = pool.workers[0].pid
        await pool.predict({"touch_mib": BIG_MIB})  # all of it
        await trio.sleep(2.5)
        assert [w.pid for w in pool.workers] == [first]
        assert refreshes(pool) == 0


async def test_status_and_metrics_show_what_each_child_shares_and_holds_of_its_own() -> None:
    async with open_pool(big_config(preload_max_private=0)) as pool:
        await pool.wait_ready()
        await wait_until(
            lambda: all(w.snapshot()["memory"] for w in pool.workers), 3, "a look at each"
        )
        for worker in pool.workers:
            memory = worker.snapshot()["memory"]
            assert memory["shared_mib"] >= BIG_MIB * 0.9, memory  # the template's weights
            assert memory["private_mib"] < BIG_MIB / 8, memory
            private = pool.metrics.value("modelpool_model_private_bytes", worker=str(worker.index))
            assert private == pytest.approx(memory["private_mib"] * 2**20, abs=2**20)
        grower = (await pool.predict({"touch_mib": BIG_MIB // 2}))["pid"]
        worker = next(w for w in pool.workers if w.pid == grower)

        def grown() -> bool:
            memory = worker.snapshot()["memory"]
            return memory is not None and memory["private_mib"] >= BIG_MIB // 2

        await wait_until(grown, 3, "its own pages counted")
        memory = worker.snapshot()["memory"]
        assert memory["shared_mib"] <= BIG_MIB * 0.6, memory  # no longer shared
        truth = tree_smaps_kib(grower)["private"] / 1024
        assert memory["private_mib"] == pytest.approx(truth, rel=0.1)
        private = pool.metrics.value("modelpool_model_private_bytes", worker=str(worker.index))
        assert private is not None and private >= BIG_MIB // 2 * 2**20
        body = pool.metrics.exposition()[0].decode()
        assert f'modelpool_model_private_bytes{{worker="{worker.index}"}}' in body


async def test_without_preload_no_model_is_measured() -> None:
    async with open_pool(model3_config(workers=1)) as pool:
        await pool.wait_ready()
        await trio.sleep(1.5)
        assert pool.status()["workers"][0]["memory"] is None
        assert pool.metrics.value("modelpool_model_private_bytes", worker="0") is None
