"""--preload's immortal template objects (CPython 3.12 and 3.13), on real processes.

A child forked from a template writes the reference count of every object it reads,
and so copies its page. Once the template's objects are immortal, it copies none: these
tests check that a child's private memory stays small while it reads a whole table,
that the first children (forked while the template walked its objects) are replaced by
surge with no request failed, that a crashed child is replaced by a fork while the walk
runs, that the objects behave as before (the model checks what immortality could
change) and that a child ends cleanly, and that /status says why not where it is not
done (Python 3.11, turned off).

The model runs under a 3.12 or 3.13 interpreter found on this machine (pyenv's, or on
PATH); without one these tests skip, unless MODELPOOL_REQUIRE_PY312=1 (CI sets it),
which makes them fail.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conftest import MODELS, predict_into, wait_until
from modelpool import ModelFailed, PoolConfig, open_pool
from modelpool.pool.pool import Pool
from modelpool.process.immortal import forks_before_walk
from modelpool.process.launch import launcher_command
from modelpool.process.reaper import TOKEN_VAR
from modelpool.process.threads import usable_cores
from modelpool.settings.pycommand import parse_python_command

MODEL = MODELS / "py_objects.py"
WORKERS = 4
IMMORTAL_WITHIN = 60.0  # seconds for a walk of a few million objects on a busy machine
REQUIRE = os.environ.get("MODELPOOL_REQUIRE_PY312") == "1"
# One model forked before the walk ends, on any machine: each model's thread budget is
# every core, so none is left to the walk (forks_before_walk).
EARLY = 1


def newer_pythons() -> dict[str, str]:
    """An interpreter for each of CPython 3.12 and 3.13 found here, by version."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[23]*/bin/python3")))
    candidates += [found for name in ("python3.12", "python3.13") if (found := shutil.which(name))]
    found: dict[str, str] = {}
    for path in candidates:
        try:
            version = subprocess.run(
                [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2], sys.abiflags)"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if version and version[0] in ("3.12", "3.13") and len(version) == 1:  # no "t", "d"
            found.setdefault(version[0], path)
    return found


PYTHONS = newer_pythons()
NO_PYTHON = "no CPython 3.12 or 3.13 on this machine (pyenv's or on PATH)"


def python_params() -> list:
    """Each interpreter found; without one, a test that skips (with the reason), or
    fails where MODELPOOL_REQUIRE_PY312=1."""
    if PYTHONS:
        return [pytest.param(path, id=version) for version, path in sorted(PYTHONS.items())]
    marks = [] if REQUIRE else [pytest.mark.skip(reason=NO_PYTHON)]
    return [pytest.param(None, id="none", marks=marks)]


def need(python: str | None) -> str:
    """The interpreter; the test fails without one (where it is required)."""
    if python is None:
        pytest.fail(f"{NO_PYTHON}, and MODELPOOL_REQUIRE_PY312=1 requires one")
    return python


def config(python: str, keys: int = 400_000, **overrides: object) -> PoolConfig:
    options: dict = {
        "model_cmd": [python, "-u", str(MODEL)],
        "workers": WORKERS,
        "preload": True,
        "env": {"PY_OBJECTS_KEYS": str(keys)},
        "init_timeout": 120,
        "preload_max_private": 0,  # no refresh: what is measured is immortality's
        "model_threads": usable_cores(),  # EARLY: no core left to the walk
    }
    options.update(overrides)
    return PoolConfig(**options)


def memory_kib(pid: int) -> dict[str, int]:
    """smaps_rollup's figures (kB), by name."""
    found = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        found[name] = int(value.split()[0])
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def immortal_restarts(pool: Pool) -> float:
    return pool.metrics.value("modelpool_model_restarts_total", reason="immortal")


async def wait_immortal(pool: Pool) -> dict:
    def done() -> bool:
        return bool(pool.status()["template"]["immortal"])

    await wait_until(done, IMMORTAL_WITHIN, "the template's objects to be immortal")
    return pool.status()["template"]


async def lookups(pool: Pool, requests: int, outcomes: list) -> None:
    """`requests` requests of 5,000 random lookups, from WORKERS clients at once."""
    async with trio.open_nursery() as nursery:
        for client in range(WORKERS):

            async def run(first: int) -> None:
                for seed in range(first, requests, WORKERS):
                    await predict_into(pool, {"lookups": 5000, "seed": seed}, outcomes)

            nursery.start_soon(run, client)


@pytest.mark.parametrize("python", python_params())
async def test_the_first_child_serves_while_the_walk_runs_and_is_replaced_once_it_is_done(
    python: str | None,
) -> None:
    async with open_pool(config(need(python), keys=1_500_000)) as pool:
        await pool.wait_ready(EARLY)
        first = {worker.pid for worker in pool.workers if worker.ready}
        template = pool.status()["template"]
        assert template["immortal"] is False  # the first child did not wait for it
        assert template["why_not_immortal"] == "being made immortal"
        assert template["forks_before_walk"] == EARLY
        # the others wait for it: forked before, they would copy what they read
        assert sum(1 for w in pool.workers if w.ready) == EARLY
        outcomes: list = []
        replaced = trio.Event()

        async def client() -> None:  # traffic all the while, and a moment after
            while not replaced.is_set():
                await predict_into(pool, {"lookups": 5000, "seed": len(outcomes)}, outcomes)

        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(client)
            template = await wait_immortal(pool)
            await wait_until(
                lambda: immortal_restarts(pool) == EARLY, 30, "the first child replaced"
            )
            await trio.sleep(0.5)
            replaced.set()
        failed = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        assert not failed, failed[:3]
        assert len(outcomes) > 20
        assert template["why_not_immortal"] is None
        assert template["forks_before_walk"] == EARLY  # still said once it is done
        assert template["immortal_objects"] >= 1_500_000 * 3  # the keys, the tuples, their ints
        await wait_until(
            lambda: all(w.ready for w in pool.workers) and len(pool.workers) == WORKERS,
            30,
            "the replacement serving, the first child gone",
        )
        now = {worker.pid for worker in pool.workers}
        assert not now & first  # every child is of the immortal template now
        assert all(pid is not None and parent_of(pid) == template["pid"] for pid in now)
        assert immortal_restarts(pool) == EARLY  # replaced once; the others never


@pytest.mark.parametrize("python", python_params())
async def test_children_forked_before_the_walk_are_replaced_not_refreshed(
    python: str | None,
) -> None:
    """With a refresh limit they pass at once (each request copies thousands of pages):
    a child forked while the walk runs is not refreshed, which would fork one more that
    copies as it did and pause the walk, but replaced once, when the objects are
    immortal."""
    async with open_pool(config(need(python), preload_max_private=5)) as pool:
        await pool.wait_ready(EARLY)
        outcomes: list = []
        done = trio.Event()

        async def client() -> None:
            while not done.is_set():
                await predict_into(pool, {"lookups": 5000, "seed": len(outcomes)}, outcomes)

        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(client)
            await wait_immortal(pool)
            await wait_until(
                lambda: immortal_restarts(pool) == EARLY, 30, "the first child replaced"
            )
            done.set()
        failed = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        assert not failed, failed[:3]
        refreshes = pool.metrics.value("modelpool_model_restarts_total", reason="refresh")
        assert refreshes == 0, refreshes


@pytest.mark.parametrize("python", python_params())
async def test_children_of_an_immortal_template_keep_its_objects_shared_as_they_read(
    python: str | None,
) -> None:
    async with open_pool(config(need(python))) as pool:
        await pool.wait_ready()
        template = await wait_immortal(pool)
        await wait_until(
            lambda: immortal_restarts(pool) == EARLY and len(pool.workers) == WORKERS,
            30,
            "the first children replaced",
        )
        outcomes: list = []
        await lookups(pool, 200, outcomes)  # 250,000 lookups a child: most of the table
        assert not [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        loaded = memory_kib(template["pid"])["Rss"]
        for worker in pool.workers:
            assert worker.pid is not None
            child = memory_kib(worker.pid)
            private = child["Private_Clean"] + child["Private_Dirty"]
            # Read with mortal objects, a child holds most of the table of its own
            # (about 60 % of the template here); immortal, only what it made itself.
            assert private < 0.15 * loaded, (worker.pid, private, loaded)


@pytest.mark.parametrize("python", python_params())
async def test_immortal_objects_behave_as_before_and_a_child_ends_cleanly(
    python: str | None,
) -> None:
    async with open_pool(config(need(python), keys=1000, workers=1)) as pool:
        await pool.wait_ready()
        await wait_immortal(pool)
        await wait_until(lambda: immortal_restarts(pool) == 1, 30, "the first child replaced")
        await wait_until(lambda: pool.workers[0].ready, 30, "its replacement ready")
        answer = await pool.predict({"check": True})
        assert answer["name"] == "immortal"  # not lengthened in place
        assert answer["concatenated"] == "immortal!"
        assert answer["pairs"] == [["a", 1], ["b", 2]]
        assert answer["listed"] == [1, 2, 3, 4]
        assert answer["thing"] == 2
        assert answer["made"] == sum(range(100))
        assert answer["interned"] is True
        assert answer["counted"] == [1, 2]
        assert answer["keys"] == 1000
        assert answer["refcount"] >= 2**32 - 1  # immortal: what the docs warn of
        with pytest.raises(ModelFailed) as ended:
            await pool.predict({"exit": 0})
        assert "exited with code 0" in str(ended.value)  # the finalization did not crash


@pytest.mark.parametrize("python", python_params())
async def test_a_child_crashed_while_the_walk_runs_is_replaced_by_an_immortal_fork(
    python: str | None,
) -> None:
    async with open_pool(config(need(python), keys=1_500_000, workers=2)) as pool:
        await pool.wait_ready(EARLY)
        first = {worker.pid for worker in pool.workers if worker.ready}
        assert pool.status()["template"]["why_not_immortal"] == "being made immortal"
        with pytest.raises(ModelFailed):
            await pool.predict({"exit": 3})  # the child forked before the walk ends
        await pool.wait_ready()  # its replacement waited for the walk, as the other did
        template = pool.status()["template"]
        assert template["immortal"] is True
        now = {worker.pid for worker in pool.workers}
        assert not now & first and all(parent_of(pid or 0) == template["pid"] for pid in now)
        assert immortal_restarts(pool) == 0  # nothing forked before the walk is left


@pytest.mark.parametrize("python", python_params())
def test_the_walk_leaves_nothing_reachable_mortal(python: str | None) -> None:
    """Objects of many shapes (short tuples of atoms, which the walk marks where it
    meets them; long lists, nesting, shared objects, sets, instances), walked in slices
    of a millisecond that stop and resume mid-container: then a walk of another kind
    finds no object reachable from them that is still mortal."""
    walk = Path(__file__).parents[1] / "src" / "modelpool" / "process" / "_immortal.py"
    done = subprocess.run(
        [need(python), str(MODELS / "walk_check.py"), str(walk)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["mortal"] == [], report
    assert report["marked"] > 20_000 and report["looked_at"] > report["marked"], report


@pytest.mark.parametrize(
    ("cores", "threads", "early"),
    [
        (2, 1, 1),  # 4 models of 1 thread on 2 cores: the walk's core would be taken
        (1, 1, 1),  # never none: the service answers while the template walks
        (8, 1, 7),  # a core spare: forked at once (the pool forks no more than its workers)
        (8, 2, 3),
        (16, 4, 3),  # the default budget, 16 cores for 4 models: the last one waits
        (8, None, 1),  # --model-threads 0: a library may take every core
    ],
)
def test_the_models_forked_before_the_walk_leave_it_a_core(
    cores: int, threads: int | None, early: int
) -> None:
    assert forks_before_walk(cores, threads) == early


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="runs the model on the service's 3.11")
async def test_on_python_3_11_the_objects_are_not_made_immortal_and_status_says_why() -> None:
    async with open_pool(config(sys.executable, keys=1000, workers=2)) as pool:
        await pool.wait_ready()

        def said() -> bool:
            return pool.status()["template"]["why_not_immortal"] != "being made immortal"

        await wait_until(said, 10, "the template to say why not")
        template = pool.status()["template"]
        assert template["immortal"] is False
        assert "Python 3.11 has no immortal objects" in template["why_not_immortal"]
        assert template["forks_before_walk"] is None  # no walk: every fork goes at once
        assert (await pool.predict({"lookups": 10}))["pid"] in {w.pid for w in pool.workers}
        await trio.sleep(0.5)
        assert immortal_restarts(pool) == 0  # nothing to replace


@pytest.mark.parametrize("python", python_params())
async def test_no_preload_immortal_leaves_the_objects_mortal(python: str | None) -> None:
    async with open_pool(config(need(python), keys=1000, preload_immortal=False)) as pool:
        await pool.wait_ready()
        assert (await pool.predict({"lookups": 10}))["pid"] in {w.pid for w in pool.workers}
        template = pool.status()["template"]
        assert template["immortal"] is False
        assert template["why_not_immortal"] == "turned off (--no-preload-immortal)"
        assert template["forks_before_walk"] is None  # no walk: every fork goes at once
        answer = await pool.predict({"check": True})
        assert answer["refcount"] < 1000  # a mortal table's count
        assert immortal_restarts(pool) == 0


@pytest.mark.parametrize("python", python_params())
def test_an_immortal_template_ends_cleanly_when_its_stdin_closes(python: str | None) -> None:
    """The template's own interpreter finalizes with all its objects immortal: the
    launcher run as the pool runs it, its stdin closed once the walk is done."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    command = [need(python), "-u", str(MODEL)]
    env = {**os.environ, TOKEN_VAR: "t" * 64, "PY_OBJECTS_KEYS": "100000"}
    with ours, theirs:
        process = subprocess.Popen(
            launcher_command(parse_python_command(command), theirs.fileno()),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            pass_fds=[theirs.fileno()],
        )
        try:
            ours.settimeout(IMMORTAL_WITHIN)
            assert json.loads(ours.recv(65536))["event"] == "fork_point"
            ours.send(json.dumps({"op": "immortalize"}).encode())
            said = json.loads(ours.recv(65536))
            assert said["event"] == "immortal" and said["objects"] > 300_000, said
            assert process.stdin is not None
            process.stdin.close()  # template mode ends: the model reads end-of-file
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()
            process.wait()
