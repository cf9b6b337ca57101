"""--devices: each worker is given one device, in turn, and its models see it.

There is no accelerator here, and none is needed: a device is a name modelpool passes
to the model in its environment. The model (tests/models/device_env.py) answers with
what its environment says, as Python's os.environ and as the C library's getenv (what
CUDA reads) see it, so every test checks what a real model would get.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import hostile, wait_until
from modelpool import PoolConfig, open_pool
from modelpool.cli.parser import parse
from modelpool.pool.pool import Pool
from modelpool.process.devices import ROOM_VAR, to_retire
from modelpool.process.launch import LAUNCHER_PATH
from modelpool.process.reaper import TOKEN_VAR, token_of
from modelpool.settings.config import ConfigError
from serverproc import server_process, wait_listening, wait_ready

MODEL = hostile("device_env.py")
HOLD = 0.5  # seconds each model holds a request, so that every worker gets one


def device_config(**overrides: object) -> PoolConfig:
    options: dict = {"model_cmd": MODEL, "workers": 4, "devices": "0,1"}
    options.update(overrides)
    return PoolConfig(**options)


def serving(pool: Pool) -> list[Any]:
    return [w for w in pool.workers if w.retiring is None]


def initial_environ(pid: int | None) -> list[str]:
    """The environment a process started with, as the kernel shows it."""
    return Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")


def spread(pool: Pool) -> dict[str | None, int]:
    return dict(collections.Counter(w.device for w in serving(pool)))


async def all_idle(pool: Pool) -> None:
    """Every worker waits for a job: requests sent now go one to each, in the order the
    workers started waiting (the queue hands a job to a waiting worker at once)."""
    await pool.wait_ready()
    await wait_until(lambda: all(w.state == "idle" for w in pool.workers), 20, "all idle")


async def ask_every_worker(pool: Pool) -> dict[int, dict]:
    """Each serving worker's model's answer, by worker id: one request per worker at once,
    each held HOLD seconds, so no worker can take two."""
    await all_idle(pool)
    workers = serving(pool)
    answers: list[dict] = []

    async def ask() -> None:
        answers.append(await pool.predict({"sleep": HOLD}))

    async with trio.open_nursery() as nursery:
        for _ in workers:
            nursery.start_soon(ask)
    by_pid = {w.pid: w for w in serving(pool)}
    assert len({a["pid"] for a in answers}) == len(workers), answers
    return {by_pid[a["pid"]].index: a for a in answers}


def assert_models_see_their_devices(pool: Pool, answers: dict[int, dict]) -> None:
    """Every model sees its worker's device, in os.environ and in the C environment."""
    devices = {w.index: w.device for w in pool.workers}
    for index, answer in answers.items():
        device = devices[index]
        assert device is not None
        seen = {"MODELPOOL_DEVICE": device, "CUDA_VISIBLE_DEVICES": device}
        assert {k: answer["env"][k] for k in seen} == seen, (index, answer)
        assert {k: answer["c_env"][k] for k in seen} == seen, (index, answer)


async def test_workers_get_the_devices_in_turn_and_their_models_see_them() -> None:
    async with open_pool(device_config()) as pool:
        answers = await ask_every_worker(pool)
        assert [w.device for w in pool.workers] == ["0", "1", "0", "1"]
        assert_models_see_their_devices(pool, answers)
        status = pool.status()["workers"]
        assert [w["device"] for w in status] == ["0", "1", "0", "1"]
        assert [w["device"] for w in pool.node_status()["workers"]] == ["0", "1", "0", "1"]
        for worker in pool.workers:  # a spawned model's initial environment says so too
            assert f"MODELPOOL_DEVICE={worker.device}" in initial_environ(worker.pid)
        info = {"generation": "1", "model_cmd": " ".join(MODEL)}
        for worker in pool.workers:
            labels = {**info, "worker": str(worker.index), "device": worker.device}
            assert pool.metrics.value("modelpool_worker_info", **labels) == 1


async def test_a_killed_models_replacement_keeps_its_workers_device() -> None:
    async with open_pool(device_config(backoff_initial=0.05)) as pool:
        await pool.wait_ready()
        before = {w.index: (w.device, w.pid) for w in pool.workers}
        for worker in pool.workers[1:3]:  # one on each device
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)

        def replaced() -> bool:
            return all(w.ready and w.pid != before[w.index][1] for w in pool.workers[1:3])

        await wait_until(replaced, 20, "both killed models replaced")
        answers = await ask_every_worker(pool)
        assert {w.index: w.device for w in pool.workers} == {i: d for i, (d, _) in before.items()}
        assert_models_see_their_devices(pool, answers)


async def test_a_reload_gives_each_new_worker_the_device_of_the_one_it_replaces() -> None:
    async with open_pool(device_config()) as pool:
        await pool.wait_ready()
        before = {w.index: w.device for w in pool.workers}
        report = await pool.operations.reload()
        assert len(report["workers"]) == 4
        after = {w.index: w.device for w in pool.workers}
        for step in report["workers"]:
            assert after[step["by"]] == before[step["replaced"]] == step["device"], report
        assert spread(pool) == {"0": 2, "1": 2}
        assert_models_see_their_devices(pool, await ask_every_worker(pool))


async def test_a_recycled_workers_replacement_takes_over_its_device() -> None:
    """--max-requests 1: each answer retires its worker for a new one, one at a time here,
    so each step shows which worker replaced which."""
    async with open_pool(device_config(max_requests=1)) as pool:
        await pool.wait_ready()
        for _ in range(4):
            before = {w.index: w.device for w in pool.workers}
            pids = {w.pid: w.index for w in pool.workers}
            answer = await pool.predict({})
            answered = pids[answer["pid"]]
            assert answer["env"]["MODELPOOL_DEVICE"] == before[answered]

            def replaced(answered: int = answered, before: dict = before) -> bool:
                indexes = {w.index for w in pool.workers}
                return answered not in indexes and len(indexes - set(before)) == 1

            await wait_until(replaced, 20, f"worker {answered} recycled")
            (new,) = [w for w in pool.workers if w.index not in before]
            assert new.device == before[answered], (before, new.index, new.device)
        assert spread(pool) == {"0": 2, "1": 2}
        assert_models_see_their_devices(pool, await ask_every_worker(pool))


async def test_a_resize_keeps_the_spread_even_both_ways() -> None:
    """Shrinking retires from the device with the most workers, even when the cheap
    (idle) ones are all on one device; growing fills the device with the fewest."""
    async with open_pool(device_config()) as pool:
        await all_idle(pool)
        outcomes: list[dict] = []

        async def hold(request: dict) -> None:
            outcomes.append(await pool.predict(request))

        async with trio.open_nursery() as nursery:
            for _ in range(4):  # device 1's two models are busy for 2 s, device 0's idle
                nursery.start_soon(hold, {"sleep": 2.0, "sleep_on": ["1"]})
            await wait_until(lambda: len(outcomes) == 2, 10, "device 0's answers")
            # an answer goes out before its worker says it is idle again (serving.py)
            await wait_until(
                lambda: {w.device for w in pool.workers if w.state == "busy"} == {"1"},
                5,
                "only device 1's models busy",
            )
            report = await pool.operations.scale(2)
        assert len(outcomes) == 4
        assert sorted(step["device"] for step in report["retired"]) == ["0", "1"]
        assert spread(pool) == {"0": 1, "1": 1}
        report = await pool.operations.scale(5)
        assert [step["device"] for step in report["added"]] == ["0", "1", "0"]
        assert spread(pool) == {"0": 3, "1": 2}
        assert_models_see_their_devices(pool, await ask_every_worker(pool))


async def test_a_grow_after_a_shrink_fills_the_device_left_empty() -> None:
    """Not the next device in a round-robin's turn: the one with the fewest workers."""
    async with open_pool(device_config(workers=3, devices="0,1,2")) as pool:
        await all_idle(pool)
        outcomes: list[dict] = []

        async def hold(request: dict) -> None:
            outcomes.append(await pool.predict(request))

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # devices 0 and 2 busy: the idle one, on 1, is retired
                nursery.start_soon(hold, {"sleep": 1.5, "sleep_on": ["0", "2"]})
            await wait_until(lambda: len(outcomes) == 1, 10, "device 1's answer")
            await pool.operations.scale(2)
            assert spread(pool) == {"0": 1, "2": 1}
            await pool.operations.scale(3)
        assert spread(pool) == {"0": 1, "1": 1, "2": 1}
        assert_models_see_their_devices(pool, await ask_every_worker(pool))


async def test_fewer_workers_than_devices_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    async with open_pool(device_config(workers=1, devices="0,1,2")) as pool:
        await pool.wait_ready()
        assert [w.device for w in pool.workers] == ["0"]
    assert "--devices names 3 devices but --workers is 1: no model runs on 1, 2" in caplog.text


async def test_device_env_names_the_variable_and_other_variables_pass_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # the service's own, for the model
    config = device_config(workers=2, devices="GPU-a,MIG-b/1/0", device_env="HIP_VISIBLE_DEVICES")
    async with open_pool(config) as pool:
        for index, answer in (await ask_every_worker(pool)).items():
            device = {w.index: w.device for w in pool.workers}[index]
            expected = {
                "MODELPOOL_DEVICE": device,
                "HIP_VISIBLE_DEVICES": device,
                "CUDA_VISIBLE_DEVICES": "7",
                "MODELPOOL_ENV_ROOM": None,
            }
            assert answer["env"] == expected
    async with open_pool(device_config(workers=2, device_env="")) as pool:
        answers = await ask_every_worker(pool)
        assert sorted(a["env"]["MODELPOOL_DEVICE"] for a in answers.values()) == ["0", "1"]
        assert {a["env"]["CUDA_VISIBLE_DEVICES"] for a in answers.values()} == {"7"}


async def test_without_devices_no_device_is_given_and_the_services_variable_stays_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELPOOL_DEVICE", "stale")  # the service's: never a model's
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    async with open_pool(device_config(workers=1, devices=None)) as pool:
        (answer,) = (await ask_every_worker(pool)).values()
        assert answer["env"]["MODELPOOL_DEVICE"] is None
        assert answer["env"]["CUDA_VISIBLE_DEVICES"] == "3"
        assert pool.status()["workers"][0]["device"] is None
        labels = {"worker": "0", "generation": "1", "model_cmd": " ".join(MODEL)}
        assert pool.metrics.value("modelpool_worker_info", **labels) == 1


async def test_preload_each_forked_child_gets_its_own_device() -> None:
    """The template loads with no device (the variable empty); each child has its own in
    os.environ and in the C environment from its first instant, and keeps it when killed."""
    config = device_config(workers=2, preload=True, backoff_initial=0.05)
    async with open_pool(config) as pool:
        answers = await ask_every_worker(pool)
        assert [w.snapshot()["start"]["method"] for w in pool.workers] == ["fork", "fork"]
        assert_models_see_their_devices(pool, answers)
        for answer in answers.values():
            assert answer["loaded_with"]["MODELPOOL_DEVICE"] is None  # the template's
            assert answer["loaded_with"]["CUDA_VISIBLE_DEVICES"] == ""
            assert answer["loaded_with"]["MODELPOOL_ENV_ROOM"] is None  # the launcher's
            assert answer["env"]["MODELPOOL_ENV_ROOM"] is None
        template = pool.status()["template"]
        assert template is not None and template["state"] == "ready"
        seen = [e for e in initial_environ(template["pid"]) if "DEVICE" in e]
        assert seen == ["CUDA_VISIBLE_DEVICES="]
        for worker in pool.workers:  # the kernel's view of a child is its own too
            environ = initial_environ(worker.pid)
            mine = [e for e in environ if "DEVICE" in e or e.startswith("MODELPOOL_")]
            token = [e for e in mine if e.startswith("MODELPOOL_MODEL=")]
            assert len(token) == 1 and token_of(worker.pid) == token[0].partition("=")[2]
            assert sorted(e for e in mine if e not in token) == [
                f"CUDA_VISIBLE_DEVICES={worker.device}",
                f"MODELPOOL_DEVICE={worker.device}",
            ], mine
        victim = pool.workers[1]
        old_pid = victim.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: victim.ready and victim.pid != old_pid, 20, "a new fork")
        answers = await ask_every_worker(pool)
        assert answers[victim.index]["env"]["MODELPOOL_DEVICE"] == "1"
        assert_models_see_their_devices(pool, answers)


async def test_preload_with_no_device_variable_children_get_modelpool_device_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # --device-env "": the service's, as is
    config = device_config(workers=2, preload=True, device_env="", devices="GPU-a,GPU-b")
    async with open_pool(config) as pool:
        answers = await ask_every_worker(pool)
        devices = {w.index: w.device for w in pool.workers}
        for index, answer in answers.items():
            assert answer["env"]["MODELPOOL_DEVICE"] == devices[index]
            assert answer["c_env"]["MODELPOOL_DEVICE"] == devices[index]
            assert answer["env"]["CUDA_VISIBLE_DEVICES"] == "5"
            assert answer["loaded_with"]["CUDA_VISIBLE_DEVICES"] == "5"
        for worker in pool.workers:
            mine = [e for e in initial_environ(worker.pid) if "DEVICE" in e]
            assert sorted(mine) == ["CUDA_VISIBLE_DEVICES=5", f"MODELPOOL_DEVICE={worker.device}"]


async def test_preload_a_model_that_opens_a_device_while_loading_starts_plainly() -> None:
    """Such a model is not safe to fork: the launcher sees the device open, and the
    models start plainly, each with its device from its first instant."""
    config = device_config(workers=2, preload=True, env={"DEVICE_UNSAFE": "1"})
    async with open_pool(config) as pool:
        answers = await ask_every_worker(pool)
        template = pool.status()["template"]
        assert template is not None and template["state"] == "fallback"
        assert "a device (/dev/ptmx)" in template["fallback_reason"]
        assert [w.snapshot()["start"]["method"] for w in pool.workers] == ["spawn", "spawn"]
        assert_models_see_their_devices(pool, answers)
        for index, answer in answers.items():  # spawned: it loaded on its device
            device = {w.index: w.device for w in pool.workers}[index]
            assert answer["loaded_with"]["CUDA_VISIBLE_DEVICES"] == device


async def test_the_command_shows_devices_in_status_and_metrics() -> None:
    env = {"MODELPOOL_DEVICES": "GPU-a,GPU-b"}
    args = ("--model-cmd", " ".join(MODEL), "--workers", "3")
    async with server_process(*args, env=env) as server:
        async with await wait_listening(server) as client:
            await wait_ready(client, 3, within=30)
            status = (await client.get("/status")).json()
            assert [w["device"] for w in status["workers"]] == ["GPU-a", "GPU-b", "GPU-a"]
            metrics = (await client.get("/metrics")).text
            lines = [line for line in metrics.splitlines() if line.startswith("modelpool_worker_")]
            assert len(lines) == 3
            assert sum('device="GPU-a"' in line for line in lines) == 2
            assert sum('device="GPU-b"' in line for line in lines) == 1
            answer = (await client.post("/predict", json={})).json()
            assert answer["env"]["MODELPOOL_DEVICE"] in ("GPU-a", "GPU-b")
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=20) == 0


@pytest.mark.parametrize(
    ("argv", "environ", "reason"),
    [
        (["--devices", "0,0"], {}, "--devices: names '0' twice"),
        (["--devices", "0,,1"], {}, "--devices: must be device ids separated by commas"),
        (["--devices", "0;1"], {}, "'0;1' is not one"),
        (["--devices", "GPU 0"], {}, "'GPU 0' is not one"),
        ([], {"MODELPOOL_DEVICES": "1,1"}, "--devices (from MODELPOOL_DEVICES='1,1'): names"),
        (["--devices", "0", "--device-env", "1CUDA"], {}, "--device-env: must be an environment"),
        (["--devices", "0", "--device-env", "A-B"], {}, "--device-env: must be an environment"),
        (["--device-env", "MODELPOOL_MODEL"], {}, "--device-env: must not be a MODELPOOL_"),
        ([], {"MODELPOOL_DEVICE_ENV": "modelpool_x"}, "(from MODELPOOL_DEVICE_ENV='modelpool_x')"),
    ],
)
def test_bad_device_settings_are_refused_at_parse_time(
    argv: list[str], environ: dict[str, str], reason: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse(["serve", *argv], environ)
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert reason in message, message
    assert "Traceback" not in message


def test_devices_from_every_source(tmp_path: Path) -> None:
    assert parse(["serve", "--devices", "0, 1"])[1].config.pool.devices == ("0", "1")
    assert parse(["serve", "--devices", ""])[1].config.pool.devices is None
    assert parse(["serve"], {"MODELPOOL_DEVICES": "GPU-x"})[1].config.pool.devices == ("GPU-x",)
    settings = parse(["serve"], {"MODELPOOL_DEVICE_ENV": ""})[1]
    assert settings.config.pool.device_env is None
    assert parse(["serve"])[1].config.pool.device_env == "CUDA_VISIBLE_DEVICES"
    config = tmp_path / "modelpool.toml"
    config.write_text('devices = [0, "GPU-y"]\ndevice-env = "HIP_VISIBLE_DEVICES"\n')
    pool = parse(["serve", "--config", str(config)])[1].config.pool
    assert (pool.devices, pool.device_env) == (("0", "GPU-y"), "HIP_VISIBLE_DEVICES")
    config.write_text("devices = [true]\n")
    with pytest.raises(SystemExit):
        parse(["serve", "--config", str(config)])
    assert PoolConfig(devices=["0", "1"]).devices == ("0", "1")
    assert PoolConfig(devices="").devices is None
    with pytest.raises(ConfigError, match="devices"):
        PoolConfig(devices=[0, 1])  # type: ignore[list-item]


def test_the_launcher_refuses_environment_changes_it_cannot_make() -> None:
    """The launcher runs by path, without modelpool: it keeps its own copies of the names."""
    spec = importlib.util.spec_from_file_location("launcher", LAUNCHER_PATH)
    assert spec is not None and spec.loader is not None
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.ROOM_VAR == ROOM_VAR and launcher.TOKEN_VAR == TOKEN_VAR
    assert launcher._env_problem({"MODELPOOL_DEVICE": "0", "GONE": None}) is None
    assert "cannot be set" in launcher._env_problem({TOKEN_VAR: "x"})
    assert "cannot be set" in launcher._env_problem({"A=B": "x"})
    assert "not text" in launcher._env_problem({"A": 1})
    assert "not an object" in launcher._env_problem(["A"])


def test_a_shrink_takes_from_the_fullest_device_the_cheapest_first() -> None:
    """(name, device, cost): device 0 has three, so it loses one first, its cheapest."""
    workers = [("a", "0", 3), ("b", "0", 2), ("c", "0", 3), ("d", "1", 0), ("e", "1", 1)]
    chosen = to_retire(workers, 3, lambda w: w[1], lambda w: w[2])
    assert [w[0] for w in chosen] == ["b", "d", "a"]
    plain = [(name, None, cost) for name, _, cost in workers]  # no devices: the cheapest
    assert [w[0] for w in to_retire(plain, 3, lambda w: w[1], lambda w: w[2])] == ["d", "e", "b"]
    assert len(to_retire(workers, 9, lambda w: w[1], lambda w: w[2])) == 5
