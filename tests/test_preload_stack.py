"""--preload with what the common ML stack leaves running, on real processes.

transformers' "Loading weights" bar (tqdm) leaves tqdm's monitor thread running, even
with every bar disabled: the launcher stops it at the fork point, so such a model
forks. A model that starts a thread pool in C as it loads can never be forked: the
template says so while it loads, and the models start plainly at once, no later than
plain starts would. And a progress bar's carriage-return updates are logged once, as
their last state.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import trio

from conftest import hostile, wait_until
from modelpool import PoolConfig, open_pool
from modelpool.process.threads import VARIABLES

LOAD_SECONDS = 3.0  # c_thread_pool.py's load, after its thread pool started
EARLY_MARGIN = 1.5  # what an early fallback may cost over plain starts (about 0.55 s)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture(autouse=True)
def no_thread_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*VARIABLES, "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)


async def test_a_model_whose_progress_bars_left_tqdms_monitor_running_forks() -> None:
    config = PoolConfig(model_cmd=hostile("progress_bar.py"), workers=2, preload=True)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        status = pool.status()
        assert status["template"]["state"] == "ready", status["template"]["fallback_reason"]
        assert [w["start"]["method"] for w in status["workers"]] == ["fork", "fork"]
        template = status["template"]["pid"]
        answer = await pool.predict({})
        assert answer["ppid"] == template and parent_of(answer["pid"]) == template
    assert answer["threads"] == ["MainThread"]  # its monitor was stopped in the template


async def test_a_thread_that_cannot_be_stopped_is_named_with_its_fix() -> None:
    """tqdm's monitor kept by a model whose own thread also runs: the warning names the
    model's thread and what ends it."""
    config = PoolConfig(
        model_cmd=hostile("unsafe_at_fork.py"), workers=1, preload=True, env={"UNSAFE": "thread"}
    )
    async with open_pool(config) as pool:
        await pool.wait_ready()
        reason = pool.status()["template"]["fallback_reason"]
    assert "'loader', the model's own: end (join) it before the first read of sys.stdin" in reason


async def plain_or_preloaded(preload: bool, starts: Path) -> tuple[float, dict, set[int]]:
    """Seconds from the pool's start to 3/3 models of c_thread_pool.py ready, /status,
    and the pids of the models that answered."""
    config = PoolConfig(
        model_cmd=hostile("c_thread_pool.py"),
        workers=3,
        preload=preload,
        env={"LOAD_SECONDS": str(LOAD_SECONDS), "STARTS_FILE": str(starts)},
    )
    started = trio.current_time()
    async with open_pool(config) as pool:
        await pool.wait_ready()
        took = trio.current_time() - started
        answered = {(await pool.predict({}))["pid"] for _ in range(12)}
        return took, pool.status(), answered


def started_pids(starts: Path) -> list[int]:
    return [int(line) for line in starts.read_text().split()]


async def test_a_fallback_reaches_every_model_ready_no_later_than_plain_starts(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A thread pool started in C as the model loads is found while it loads: the
    models start plainly at once, not after a whole load that is thrown away (which
    took twice a plain start), and the template, which loads on as a plain model, is
    one of them: three models, three loads."""
    caplog.set_level(logging.INFO)
    plain, _, _ = await plain_or_preloaded(preload=False, starts=tmp_path / "plain")
    preloaded, status, answered = await plain_or_preloaded(True, tmp_path / "preload")
    assert status["template"]["state"] == "fallback"
    assert preloaded < plain + EARLY_MARGIN, (plain, preloaded)
    reason = status["template"]["fallback_reason"]
    assert "as it loaded" in reason and "--model-threads" in reason, reason
    assert [w["start"]["method"] for w in status["workers"]] == ["spawn"] * 3
    assert status["template"]["adopted_by"] in {f"worker {w['id']}" for w in status["workers"]}
    loads = started_pids(tmp_path / "preload")
    assert len(loads) == 3 and set(loads) == answered, (loads, answered)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "--preload" in r.msg]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    for pid in loads:  # every one stopped with the pool, the adopted template too
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def kept_thread(starts: Path, **overrides: object) -> PoolConfig:
    """One worker, preloaded, of a model that keeps a thread running once loaded (never
    safe to fork) and writes its pid to `starts` as it starts."""
    options: dict = {
        "model_cmd": hostile("unsafe_at_fork.py"),
        "workers": 1,
        "preload": True,
        "env": {"UNSAFE": "thread", "STARTS_FILE": str(starts)},
    }
    return PoolConfig(**(options | overrides))


async def test_a_template_unsafe_at_its_fork_point_serves_as_a_plain_model(
    tmp_path: Path,
) -> None:
    """A model that keeps a thread running once loaded cannot be forked: its template,
    loaded already, becomes the worker's model with a plain model's thread budget, not
    the template's one thread; it is loaded once, and stops with its worker, in a
    reload as at the end."""
    starts = tmp_path / "starts"
    config = kept_thread(starts, model_threads=2)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        status = pool.status()
        assert status["template"]["state"] == "fallback", status["template"]
        assert status["template"]["adopted_by"] == f"worker {status['workers'][0]['id']}"
        answer = await pool.predict({})
        assert started_pids(starts) == [answer["pid"]]  # one load, not two
        assert answer["omp"] == "2"  # the template loaded with 1
        first = answer["pid"]
        await pool.operations.reload()
        answer = await pool.predict({})
        assert answer["pid"] != first and answer["omp"] == "2"
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
        assert len(started_pids(starts)) == 2  # the new generation's template, adopted
    with pytest.raises(ProcessLookupError):
        os.kill(answer["pid"], 0)


async def test_a_lent_template_that_is_killed_is_replaced_by_a_plain_start(
    tmp_path: Path,
) -> None:
    """The worker owns the model it took: killed, it is replaced as a plain model is
    (a load of its own: the template is not lent twice), and nothing is left behind."""
    starts = tmp_path / "starts"
    config = kept_thread(starts, backoff_initial=0.05)
    async with open_pool(config) as pool:
        await pool.wait_ready()
        lent = (await pool.predict({}))["pid"]
        assert pool.status()["template"]["adopted_by"] == "worker 0"
        os.kill(lent, signal.SIGKILL)
        worker = pool.workers[0]
        await wait_until(lambda: worker.ready and worker.pid != lent, 20, "a new model")
        answer = await pool.predict({})
        assert answer["pid"] != lent and started_pids(starts) == [lent, answer["pid"]]
        assert pool.status()["workers"][0]["start"]["method"] == "spawn"
    with pytest.raises(ProcessLookupError):
        os.kill(answer["pid"], 0)


async def test_a_pool_stopped_while_its_lent_template_still_loads_leaves_nothing(
    tmp_path: Path,
) -> None:
    """Found unsafe while it loads, lent, and the pool stopped before it is ready: the
    template is stopped with the other models, at once, not after its load."""
    starts = tmp_path / "starts"
    config = PoolConfig(
        model_cmd=hostile("c_thread_pool.py"),
        workers=2,
        preload=True,
        env={"LOAD_SECONDS": "60", "STARTS_FILE": str(starts)},
    )
    started = trio.current_time()
    async with open_pool(config) as pool:

        def lent() -> bool:
            template = pool.status()["template"]
            return template is not None and template["adopted_by"] is not None

        await wait_until(lent, 20, "the template lent while it loads")
        await wait_until(lambda: len(started_pids(starts)) == 2, 20, "both models loading")
    assert trio.current_time() - started < 30  # not its 60 s load
    for pid in started_pids(starts):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_progress_bar_is_logged_once_as_its_last_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = PoolConfig(model_cmd=hostile("progress_bar.py"), workers=1)
    async with open_pool(config) as pool:
        await pool.wait_ready()
    lines = [r.getMessage() for r in caplog.records if "stderr: " in r.getMessage()]
    bars = [line for line in lines if "Loading weights" in line]
    assert len(bars) == 1, lines
    assert "100%" in bars[0] and "\r" not in bars[0] and " 0%" not in bars[0], bars[0]
    assert len(bars[0]) < 200, bars[0]
    assert bars[0].endswith("]") and "Loading weights: 100%" in bars[0], bars[0]
