"""--model-threads: each model's thread budget, on real model processes.

A model that reports its environment (tests/models/thread_env.py) says what it was given:
the cores this service may use divided by --workers, or --model-threads N, in
OMP_NUM_THREADS and its kin, except what the user set; nothing with 0. Under --preload
the template loads with one thread each, and each child takes its budget after the
fork, in its environment and in the libraries the template loaded (numpy's OpenBLAS,
asked through ctypes, here).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conftest import hostile
from modelpool import PoolConfig, open_pool
from modelpool.cli.parser import parse
from modelpool.pool.pool import Pool
from modelpool.process.threads import VARIABLES, cgroup_quota

CORES = len(os.sched_getaffinity(0))  # no CPU quota on the machines the suite runs on


def env_config(**overrides: object) -> PoolConfig:
    options: dict = {"model_cmd": hostile("thread_env.py"), "workers": 2}
    options.update(overrides)
    return PoolConfig(**options)


def initial_environ(pid: int) -> dict[str, str]:
    """A process's initial environment, as /proc/PID/environ shows it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (entry.decode().partition("=") for entry in raw if b"=" in entry)
    return {key: value for key, _, value in pairs}


async def reports(pool: Pool) -> list[dict]:
    """Every model's report: as many requests as models, all at once."""
    answers: list[dict] = []
    async with trio.open_nursery() as nursery:
        for _ in pool.workers:

            async def ask() -> None:
                answers.append(await pool.predict({}))

            nursery.start_soon(ask)
    return answers


@pytest.fixture(autouse=True)
def no_thread_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's own environment sets none, whatever the machine's does."""
    for name in (*VARIABLES, "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)


async def test_each_model_gets_the_cores_divided_by_the_workers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    budget = str(max(1, CORES // 2))
    async with open_pool(env_config()) as pool:
        await pool.wait_ready()
        answer = await pool.predict({})
        status = pool.status()["model_threads"]
    assert answer["env"]["OMP_NUM_THREADS"] == budget
    assert answer["env"]["MKL_NUM_THREADS"] == budget
    assert answer["env"]["OPENBLAS_NUM_THREADS"] == budget
    assert answer["env"]["RAYON_NUM_THREADS"] == budget
    assert answer["env"]["TOKENIZERS_PARALLELISM"] is None  # a template's business only
    assert status == {
        "threads": int(budget),
        "source": "auto",
        "cores": CORES,
        "workers": 2,
        "user_set": [],
    }
    said = [r.getMessage() for r in caplog.records if "thread budget" in r.getMessage()]
    assert len(said) == 1 and f"{budget} thread(s)" in said[0], said


async def test_a_budget_given_is_used_and_what_the_user_set_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MKL_NUM_THREADS", "5")  # the service's environment: the user's word
    config = env_config(workers=1, model_threads=3, env={"OMP_NUM_THREADS": "7"})
    async with open_pool(config) as pool:
        await pool.wait_ready()
        answer = await pool.predict({})
        status = pool.status()["model_threads"]
    assert answer["env"]["OMP_NUM_THREADS"] == "7"
    assert answer["env"]["MKL_NUM_THREADS"] == "5"
    assert answer["env"]["OPENBLAS_NUM_THREADS"] == "3"
    assert status["threads"] == 3 and status["source"] == "set"
    assert status["user_set"] == ["OMP_NUM_THREADS", "MKL_NUM_THREADS"]


async def test_zero_leaves_the_environment_alone() -> None:
    async with open_pool(env_config(workers=1, model_threads=0)) as pool:
        await pool.wait_ready()
        answer = await pool.predict({})
        assert pool.status()["model_threads"]["threads"] is None
    assert set(answer["env"].values()) == {None}


async def test_under_preload_the_template_has_one_thread_and_each_child_its_budget() -> None:
    """The template loads numpy with OPENBLAS_NUM_THREADS=1 (no thread pool to lose in a
    fork); each child gets 2 in its environment, and its OpenBLAS, loaded already, is
    told so after the fork (a plain start would have read the variable)."""
    if CORES < 2:
        pytest.skip("a budget of 2 threads needs 2 cores")
    config = env_config(preload=True, model_threads=2, env={"NUMPY": "1"})
    async with open_pool(config) as pool:
        await pool.wait_ready()
        assert [w.snapshot()["start"]["method"] for w in pool.workers] == ["fork", "fork"]
        template = pool.status()["template"]["pid"]
        answers = await reports(pool)
        template_env = initial_environ(template)
    assert template_env["OMP_NUM_THREADS"] == "1"
    assert template_env["OPENBLAS_NUM_THREADS"] == "1"
    assert template_env["TOKENIZERS_PARALLELISM"] == "false"
    for answer in answers:
        assert answer["ppid"] == template
        assert answer["env"]["OMP_NUM_THREADS"] == "2"
        assert answer["env"]["OPENBLAS_NUM_THREADS"] == "2"
        assert answer["env"]["TOKENIZERS_PARALLELISM"] is None  # the user's: unset
        assert answer["blas"] == 2, answer


async def test_under_preload_with_a_budget_of_one_the_children_keep_the_templates() -> None:
    config = env_config(preload=True, model_threads=1, env={"NUMPY": "1"})
    async with open_pool(config) as pool:
        await pool.wait_ready()
        answers = await reports(pool)
        assert [w.snapshot()["start"]["method"] for w in pool.workers] == ["fork", "fork"]
    assert {a["blas"] for a in answers} == {1}
    assert {a["env"]["OMP_NUM_THREADS"] for a in answers} == {"1"}


def test_the_option_is_read_from_the_flag_the_variable_and_auto() -> None:
    _, settings = parse(["serve", "--model-threads", "3"], {})
    assert settings.config.pool.model_threads == 3
    _, settings = parse(["serve"], {"MODELPOOL_MODEL_THREADS": "auto"})
    assert settings.config.pool.model_threads is None
    _, settings = parse(["serve", "--model-threads", "0"], {})
    assert settings.config.pool.model_threads == 0


def test_cores_are_the_affinity_of_the_service() -> None:
    """taskset (a cpuset) limits the cores: one core, one thread per model."""
    code = "from modelpool.process.threads import usable_cores; print(usable_cores())"
    result = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "1"


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path) is None
