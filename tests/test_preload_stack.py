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

import pytest
import trio

from conftest import hostile
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


async def plain_or_preloaded(preload: bool) -> tuple[float, dict]:
    """Seconds from the pool's start to 3/3 models of c_thread_pool.py ready, and /status."""
    config = PoolConfig(
        model_cmd=hostile("c_thread_pool.py"),
        workers=3,
        preload=preload,
        env={"LOAD_SECONDS": str(LOAD_SECONDS)},
    )
    started = trio.current_time()
    async with open_pool(config) as pool:
        await pool.wait_ready()
        took = trio.current_time() - started
        return took, pool.status()


async def test_a_fallback_reaches_every_model_ready_no_later_than_plain_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A thread pool started in C as the model loads is found while it loads: the
    template is given up at once and the models start plainly, not after a whole load
    that is thrown away (which took twice a plain start)."""
    caplog.set_level(logging.INFO)
    plain, _ = await plain_or_preloaded(preload=False)
    preloaded, status = await plain_or_preloaded(preload=True)
    assert status["template"]["state"] == "fallback"
    assert preloaded < plain + EARLY_MARGIN, (plain, preloaded)
    reason = status["template"]["fallback_reason"]
    assert "as it loaded" in reason and "--model-threads" in reason, reason
    assert [w["start"]["method"] for w in status["workers"]] == ["spawn"] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "--preload" in r.msg]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


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
