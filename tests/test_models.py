"""Several models behind one service: declaring them, their routes, and the slots they
share by demand, with real processes and a real HTTP server on loopback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
import trio

from conftest import SCRIPTED, error_body, hostile, running_server, wait_until
from modelpool import ConfigError, PoolConfig, UnknownModel, open_fleet, open_pool
from modelpool.cli.parser import parse
from modelpool.settings.models import first_shares

SLEEPY = {"SCRIPTED_INIT_SECONDS": "0"}


def two_models(**overrides: object) -> PoolConfig:
    """Two scripted models, a and b, on 4 slots, each free to go down to none."""
    options: dict = {
        "workers": 4,
        "models": {
            "a": {"model_cmd": SCRIPTED, "min_workers": 0},
            "b": {"model_cmd": SCRIPTED, "min_workers": 0},
        },
    }
    options.update(overrides)
    return PoolConfig(**options)


# -- declaring models -------------------------------------------------------------------


def test_tables_of_the_config_file_declare_models_over_the_top_level(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        'workers = 4\ntimeout = 7\n[models.v3]\nmodel-cmd = "python3 model3.py"\n'
        '[models.v2]\nmodel-cmd = ["python3", "model_v2.py"]\ntimeout = 5\nmin-workers = 1\n'
        "max-workers = 2\n"
    )
    _, settings = parse(["serve", "--config", str(path)], environ={})
    configs = settings.config.pool.model_configs
    assert list(configs) == ["v3", "v2"]
    assert configs["v3"].timeout == 7 and configs["v2"].timeout == 5
    assert configs["v2"].model_cmd == ["python3", "model_v2.py"]
    assert configs["v2"].max_workers == 2
    assert {name: c.workers for name, c in configs.items()} == {"v3": 2, "v2": 2}
    assert settings.config.pool.default_model_name == "v3"


def test_model_flags_declare_models_with_the_top_level_options() -> None:
    argv = ["--model", "a=python3 a.py", "--model", "b=python3 b.py", "--default-model", "b"]
    _, settings = parse([*argv, "--timeout", "3"], environ={})
    configs = settings.config.pool.model_configs
    assert [c.model_cmd for c in configs.values()] == [["python3", "a.py"], ["python3", "b.py"]]
    assert all(c.timeout == 3 for c in configs.values())
    assert settings.config.pool.default_model_name == "b"


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ("[models.v3]\ntimout = 3\n", "did you mean timeout?"),
        ("[models.v3]\nworkers = 2\n", "min-workers and max-workers"),
        ("[models.v3]\ntimeout = -1\n", "greater than 0"),
        ('[models."a b"]\n', "must be 1 to 64 letters"),
    ],
)
def test_a_mistake_in_a_models_table_says_what_to_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, says: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(table)
    with pytest.raises(SystemExit) as exited:
        parse(["serve", "--config", str(path)], environ={})
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"default_model": "x"}, "none is declared"),
        ({"models": {"a": {}}, "default_model": "b"}, "'b' is not one of: a"),
        ({"models": {"a": {}, "b": {}}, "workers": 1}, "need 2 slots at least"),
        ({"models": {"a": {"min_workers": 3, "max_workers": 2}}}, "over its max-workers"),
        ({"models": {"a": {}}, "queue": "redis://localhost"}, "one per service in a cluster"),
        ({"models": {"a": {"bogus": 1}}}, "no option a model's table takes"),
        ({"workers": 0, "min_workers": 0}, "must be at least 1"),
    ],
)
def test_models_that_cannot_run_together_are_refused(options: dict, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        PoolConfig(**options)
    assert says in str(refused.value)


def test_first_shares_give_each_its_minimum_then_deal_the_rest_in_order() -> None:
    assert first_shares(4, {"a": (1, 4), "b": (1, 4)}) == {"a": 2, "b": 2}
    assert first_shares(4, {"a": (0, 1), "b": (0, 4), "c": (2, 4)}) == {"a": 1, "b": 1, "c": 2}
    assert first_shares(5, {"a": (0, 4), "b": (0, 4)}) == {"a": 3, "b": 2}
    assert first_shares(4, {"a": (0, 1), "b": (0, 1)}) == {"a": 1, "b": 1}


async def test_open_pool_of_several_models_asks_any_by_name_and_open_fleet_runs_one() -> None:
    async with open_pool(two_models()) as pool:
        await pool.wait_ready()
        assert pool.model_name == "a"  # the default model's pool
        answer = await pool.predict({"to": "b"}, model="b")
        assert answer["echo"] == {"to": "b"} and answer["pid"] not in {w.pid for w in pool.workers}
        assert (await pool.predict({"to": "a"}, model="a"))["pid"] in {w.pid for w in pool.workers}
        with pytest.raises(UnknownModel):
            await pool.predict({}, model="c")
    async with open_fleet(PoolConfig(model_cmd=SCRIPTED, workers=1)) as fleet:
        await fleet.wait_ready()
        assert list(fleet.pools) == ["default"] and fleet.slots is None
        answer = await fleet.predict({"x": 1})
        assert answer["echo"] == {"x": 1}
        assert "models" not in fleet.status()


# -- the library ------------------------------------------------------------------------


async def test_predict_names_its_model_and_each_model_answers_its_own() -> None:
    async with open_fleet(two_models()) as fleet:
        await fleet.wait_ready()
        pids = {name: {w.pid for w in pool.workers} for name, pool in fleet.pools.items()}
        a = await fleet.predict({"to": "a"}, model="a")
        b = await fleet.predict({"to": "b"}, model="b")
        default = await fleet.predict({"to": "default"})
        assert a["pid"] in pids["a"] and b["pid"] in pids["b"] and default["pid"] in pids["a"]
        with pytest.raises(UnknownModel) as unknown:
            await fleet.predict({}, model="c")
        assert unknown.value.models == ["a", "b"] and unknown.value.status == 404


# -- the routes -------------------------------------------------------------------------


async def test_every_model_route_and_its_errors() -> None:
    async with running_server(two_models(default_model="b")) as server:
        await server.fleet.wait_ready()
        client = server.client
        listing = (await client.get("/models")).json()
        assert listing["default"] == "b"
        assert [m["name"] for m in listing["models"]] == ["a", "b"]
        one = (await client.get("/models/a")).json()
        assert one["workers"] == 2 and one["ready"] == 2 and one["command"] == SCRIPTED
        assert one["min_workers"] == 0 and one["max_workers"] == 4 and not one["default"]
        pids = {name: {w.pid for w in pool.workers} for name, pool in server.fleet.pools.items()}
        answer = await client.post("/models/a/predict", json={"n": 1})
        assert answer.status_code == 200 and answer.json()["pid"] in pids["a"]
        answer = await client.post("/predict", json={"n": 2})
        assert answer.status_code == 200 and answer.json()["pid"] in pids["b"]
        for missing in (
            await client.post("/models/nope/predict", json={}),
            await client.get("/models/nope"),
        ):
            body = error_body(missing, 404, "unknown model")
            assert body["models"] == ["a", "b"] and "'nope'" in body["detail"]
        bad = await client.post("/models/a/predict", content=b"{not json")
        error_body(bad, 400, "bad request")
        status = (await client.get("/status")).json()
        assert set(status["models"]) == {"a", "b"} and status["default_model"] == "b"
        assert status["size"] == 4 and status["slots"]["budget"] == 4
        assert {w["model"] for w in status["workers"]} == {"a", "b"}
        metrics = (await client.get("/metrics")).text
        assert 'modelpool_requests_total{model="a",outcome="ok"} 1.0' in metrics
        assert 'modelpool_requests_total{model="b",outcome="ok"} 1.0' in metrics
        assert 'modelpool_model_slots{model="a"} 2.0' in metrics


async def test_admin_operations_name_their_model() -> None:
    async with running_server(two_models()) as server:
        await server.fleet.wait_ready()
        post = server.client.post
        json_type = {"Content-Type": "application/json"}
        shares: list[dict[str, int]] = []

        async def watch_shares() -> None:
            while True:
                shares.append(server.fleet.slots.shares())
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_shares)
            reload = await post("/admin/reload", json={"model": "b"})
            nursery.cancel_scope.cancel()
        assert reload.status_code == 200, reload.text
        assert server.fleet.pools["b"].generation == 2 and server.fleet.pools["a"].generation == 1
        # its surge worker is no slot: nothing was given back or moved for it
        assert all(seen == {"a": 2, "b": 2} for seen in shares), shares
        assert server.fleet.slots.moves == 0
        assert {w.generation for w in server.fleet.pools["b"].workers} == {2}
        assert (
            len(server.fleet.pools["a"].workers) == 2 and len(server.fleet.pools["b"].workers) == 2
        )
        unknown = await post("/admin/reload", json={"model": "c"})
        assert unknown.status_code == 404 and unknown.json()["models"] == ["a", "b"]
        pinned = await post("/admin/scale", json={"model": "b", "workers": 3})
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["shares"] == {"a": 1, "b": 3} and pinned.json()["settled"]
        too_many = await post("/admin/scale", json={"model": "a", "workers": 5})
        assert too_many.status_code == 409  # b keeps 3 of the 4 now
        assert "can have 1 slot(s) at most" in too_many.json()["detail"]
        unknown_model = b'{"model": "c", "workers": 1}'
        unknown = await post("/admin/scale", content=unknown_model, headers=json_type)
        assert unknown.status_code == 404 and unknown.json()["models"] == ["a", "b"]
        budget = await post("/admin/scale", json={"workers": 3})
        assert budget.status_code == 200, budget.text
        assert sum(budget.json()["shares"].values()) == 3
        assert budget.json()["shares"] == {"a": 0, "b": 3}  # b keeps its 3
        refused = await post("/admin/scale", json={"workers": 2})
        assert refused.status_code == 409 and "min-workers" in refused.json()["detail"]


# -- slots follow demand ----------------------------------------------------------------


async def test_slots_move_to_the_model_asked_and_nothing_is_lost() -> None:
    async with running_server(two_models()) as server:
        fleet = server.fleet
        await fleet.wait_ready()
        answers: list[httpx.Response] = []

        async def ask(model: str, i: int) -> None:
            body = {"sleep": 0.3, "i": i}
            answers.append(await server.client.post(f"/models/{model}/predict", json=body))

        async with trio.open_nursery() as nursery:
            for i in range(24):
                nursery.start_soon(ask, "a", i)
            await wait_until(lambda: fleet.slots.shares()["a"] == 4, 10, "a on every slot")
        assert [r.status_code for r in answers] == [200] * 24
        assert sorted(r.json()["echo"]["i"] for r in answers) == list(range(24))
        assert fleet.slots.moves >= 2
        moves = fleet.metrics.value("modelpool_slot_moves_total", **{"from": "b", "to": "a"})
        assert moves == fleet.slots.moves
        # the other way, once a's slots have been held long enough
        answers.clear()
        async with trio.open_nursery() as nursery:
            for i in range(24):
                nursery.start_soon(ask, "b", i)
            await wait_until(lambda: fleet.slots.shares()["b"] >= 3, 10, "b takes slots back")
        assert [r.status_code for r in answers] == [200] * 24
        assert sum(fleet.slots.shares().values()) == 4


async def test_the_minimums_are_held_whatever_the_demand() -> None:
    config = two_models()
    models = {name: dict(table) for name, table in config.models.items()}
    models["b"]["min_workers"] = 1
    async with open_fleet(dataclasses.replace(config, models=models)) as fleet:
        await fleet.wait_ready()
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(fleet.predict, {"sleep": 0.2, "i": i}, None, None, "a")
            await wait_until(lambda: fleet.slots.moves >= 1, 10, "a slot moved")
            for _ in range(40):
                assert fleet.slots.shares()["b"] >= 1
                await trio.sleep(0.05)
        assert fleet.slots.shares() == {"a": 3, "b": 1}
        assert await fleet.predict({"x": 1}, model="b")  # its kept slot serves at once


async def test_a_slot_that_moves_keeps_its_device() -> None:
    model = {"model_cmd": hostile("device_env.py"), "min_workers": 0}
    config = PoolConfig(workers=2, devices=("0", "1"), models={"a": model, "b": dict(model)})
    async with open_fleet(config) as fleet:
        await fleet.wait_ready()
        assert {w.device for w in fleet.workers} == {"0", "1"}
        device_of_b = fleet.pools["b"].workers[0].device
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(fleet.predict, {"sleep": 0.3, "i": i}, None, None, "a")
            await wait_until(lambda: fleet.slots.shares()["a"] == 2, 10, "b's slot moves to a")
        moved = [w for w in fleet.pools["a"].workers if w.retiring is None][-1]
        assert moved.device == device_of_b
        assert {w.device for w in fleet.pools["a"].workers if w.retiring is None} == {"0", "1"}
        answer = await fleet.predict({"sleep_on": [device_of_b], "sleep": 0.5}, model="a")
        by_pid = {w.pid: w.device for w in fleet.pools["a"].workers}
        assert answer["env"]["MODELPOOL_DEVICE"] == by_pid[answer["pid"]]


async def test_a_page_of_another_origin_cannot_ask_a_model() -> None:
    async with running_server(two_models()) as server:
        await server.fleet.wait_ready()
        port = server.url.rsplit(":", 1)[1]
        host = {"Host": f"127.0.0.1:{port}"}
        foreign = await server.client.post(
            "/models/a/predict", json={"n": 1}, headers={**host, "Origin": "http://evil.example"}
        )
        error_body(foreign, 403, "forbidden")
        rebound = await server.client.post(
            "/models/a/predict", json={"n": 1}, headers={"Host": "evil.example"}
        )
        error_body(rebound, 403, "forbidden")
        assert server.fleet.pools["a"].metrics.value("modelpool_requests_total", outcome="ok") == 0
