"""Queue backends, by their URL's scheme: one registration in queues/ makes a new kind
of queue known to the configuration's checks and to the pool that opens it.

settings sits below the queues, so it checks a --queue URL through the schemes the
backends registered (queues/backends.py); a configuration made before they were
registered is checked again when the pool opens its queue, before any model starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conftest import scripted_config
from modelpool import ConfigError, PoolConfig, open_pool
from modelpool.queues import backends
from modelpool.queues.backends import QueueBackend, register_backend
from modelpool.queues.base import JobQueue, NodeStatus, QueueMetrics
from modelpool.queues.local import LocalQueue
from modelpool.settings import queueurl
from modelpool.settings.queueurl import QueueScheme


def fifo_problem(url: str) -> str | None:
    return None if url.startswith("fifo://here") else "must be fifo://here"


@pytest.fixture
def fifo_backend(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A backend of the test's own, `fifo://here`, registered for this test only; the
    list it returns gets the URL of each queue it opens."""
    monkeypatch.setattr(queueurl, "_SCHEMES", dict(queueurl._SCHEMES))
    monkeypatch.setattr(backends, "_BY_SCHEME", dict(backends._BY_SCHEME))
    opened: list[str] = []

    def open_fifo(
        config: PoolConfig, metrics: QueueMetrics, node: str, node_status: NodeStatus
    ) -> JobQueue:
        assert config.queue is not None
        opened.append(config.queue)
        return LocalQueue(config.max_queue, metrics)

    register_backend(QueueBackend(("fifo",), QueueScheme(fifo_problem, lambda: None), open_fifo))
    return opened


async def test_a_backend_registered_in_queues_is_checked_and_opened(
    fifo_backend: list[str],
) -> None:
    with pytest.raises(ConfigError, match="queue must be fifo://here; got 'fifo://there'"):
        PoolConfig(queue="fifo://there", workers=0)
    with pytest.raises(ConfigError, match=r"must be a redis://, .* or fifo:// URL"):
        PoolConfig(queue="lifo://here", workers=0)
    async with open_pool(scripted_config(queue="fifo://here")) as pool:
        with trio.fail_after(30):
            assert (await pool.predict({"n": 1}))["echo"] == {"n": 1}
    assert fifo_backend == ["fifo://here"]


def test_the_librarys_pool_config_knows_the_schemes_in_a_fresh_interpreter() -> None:
    """`from modelpool import PoolConfig` is all an embedder imports before making one: the
    backends' checks come with it, so a bad URL is refused at once, as documented."""
    probe = (
        "import sys\n"
        "from modelpool import ConfigError, PoolConfig\n"
        "try:\n"
        "    PoolConfig(queue='redis://h:6379/0?stream_timeout=1', workers=0)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
        "assert 'coredis' not in sys.modules, 'the check imported the client'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "queue has an unknown option 'stream_timeout'" in done.stdout


def test_a_url_checked_before_the_backends_were_registered_is_checked_when_the_pool_opens(
    tmp_path: Path,
) -> None:
    """Made from settings alone, a configuration cannot know the schemes yet; the pool
    refuses the URL as the configuration would have, and starts no model."""
    probe = (
        "import trio\n"
        "from modelpool.settings.config import PoolConfig, ConfigError\n"
        "config = PoolConfig(queue='redis://:PW@h:6379/zero', workers=1,"
        " model_cmd=['touch', 'started'])\n"
        "from modelpool import open_pool\n"
        "async def main():\n"
        "    async with open_pool(config):\n"
        "        pass\n"
        "try:\n"
        "    trio.run(main)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "queue must end in /DB, a database number, not '/zero'; got 'redis://:***@h:6379/zero'"
    )
    assert not (tmp_path / "started").exists(), "a model was started"
