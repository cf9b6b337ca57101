"""SIGHUP with several models: the config file is read again, and models are added,
removed and changed under load with no failed request; a broken file changes nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import trio

from conftest import SCRIPTED, process_alive, wait_until
from serverproc import server_process, wait_listening

COMMAND = " ".join(SCRIPTED)


def config_text(models: dict[str, str], workers: int = 4) -> str:
    """A config file declaring `models`, each a table's extra lines besides its command."""
    lines = [f"workers = {workers}"]
    for name, extra in models.items():
        minimum = "" if "min-workers" in extra else "min-workers = 1"
        lines += [f"[models.{name}]", f"model-cmd = {COMMAND!r}", minimum, extra]
    return "\n".join(lines) + "\n"


async def models_of(client: httpx.AsyncClient) -> dict[str, dict]:
    return {m["name"]: m for m in (await client.get("/models")).json()["models"]}


async def all_ready(client: httpx.AsyncClient, names: set[str]) -> bool:
    models = await models_of(client)
    return set(models) == names and all(m["ready"] == m["workers"] > 0 for m in models.values())


async def test_sighup_adds_removes_and_changes_models_under_load(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(config_text({"a": "", "b": "", "c": ""}))
    async with server_process("--config", str(path)) as server:
        async with await wait_listening(server) as client:
            await wait_until_ready(client, {"a", "b", "c"})
            old_a = {
                w["pid"]
                for w in (await client.get("/status")).json()["models"]["a"]["status"]["workers"]
            }
            statuses: dict[str, list[int]] = {"a": [], "b": [], "c": []}
            stop = trio.Event()

            async def load(model: str) -> None:
                while not stop.is_set():
                    answer = await client.post(f"/models/{model}/predict", json={"sleep": 0.05})
                    statuses[model].append(answer.status_code)

            async with trio.open_nursery() as nursery:
                for model in ("a", "a", "b", "c"):
                    nursery.start_soon(load, model)
                await wait_until(lambda: len(statuses["b"]) >= 5, 10, "load on every model")
                # a changes (its timeout), b goes, c stays, d comes
                path.write_text(config_text({"a": "timeout = 7", "c": "", "d": ""}))
                server.proc.send_signal(signal.SIGHUP)
                await wait_until(
                    lambda: any("models changed" in line for line in server.log), 30, "the change"
                )
                await trio.sleep(0.5)  # the loads go on after the change
                stop.set()
            assert set(statuses["a"]) == {200} and set(statuses["c"]) == {200}, statuses
            # b's requests were answered until it went; after that, it is unknown
            assert statuses["b"] and set(statuses["b"]) <= {200, 404}, statuses["b"]
            assert statuses["b"][0] == 200 and 404 in statuses["b"]
            assert statuses["b"] == sorted(statuses["b"])  # all 200s, then all 404s
            await wait_until_ready(client, {"a", "c", "d"})
            status = (await client.get("/status")).json()
            new_a = {w["pid"] for w in status["models"]["a"]["status"]["workers"]}
            assert new_a and not new_a & old_a  # a runs its new config's models
            assert status["models"]["a"]["status"]["workers"][0]["pid"] in new_a
            assert sum(status["slots"]["shares"].values()) == 4
            answer = await client.post("/models/d/predict", json={"n": 1})
            assert answer.status_code == 200
            gone = await client.post("/models/b/predict", json={"n": 1})
            assert gone.status_code == 404 and gone.json()["models"] == ["a", "c", "d"]

            # A file with a mistake: logged, and nothing changes
            path.write_text(config_text({"a": "timout = 7", "c": ""}))
            server.proc.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: any("left as they were" in line for line in server.log), 20, "refusal"
            )
            assert any("did you mean timeout?" in line for line in server.log)
            assert set(await models_of(client)) == {"a", "c", "d"}
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=20) == 0


async def wait_until_ready(client: httpx.AsyncClient, names: set[str], within: float = 30) -> None:
    with trio.move_on_after(within):
        while not await all_ready(client, names):
            await trio.sleep(0.1)
        return
    raise AssertionError(f"models {sorted(names)} not all ready: {await models_of(client)}")


async def test_two_sighups_in_a_row_and_a_model_added_with_no_minimum(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(config_text({"a": "", "b": ""}, workers=3))
    async with server_process("--config", str(path)) as server:
        async with await wait_listening(server) as client:
            await wait_until_ready(client, {"a", "b"})
            status = (await client.get("/status")).json()
            b_pids = {w["pid"] for w in status["models"]["b"]["status"]["workers"]}
            answers: list[int] = []

            async def ask_a() -> None:
                answer = await client.post("/models/a/predict", json={"sleep": 0.4})
                answers.append(answer.status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(12):  # a has requests waiting while the changes come
                    nursery.start_soon(ask_a)
                await trio.sleep(0.2)
                path.write_text(config_text({"a": "", "c": "min-workers = 0"}, workers=3))
                server.proc.send_signal(signal.SIGHUP)
                await wait_until(lambda: any("model c added" in x for x in server.log), 10, "c")
                server.proc.send_signal(signal.SIGHUP)  # a second, while the first runs
            assert answers == [200] * 12
            await wait_until(
                lambda: sum("models changed" in line for line in server.log) == 2, 30, "both"
            )
            assert set(await models_of(client)) == {"a", "c"}
            # c may have no slot (min-workers 0, and a had requests waiting): asked, it gets one
            assert (await client.post("/models/c/predict", json={"n": 1})).status_code == 200
            await wait_until_ready(client, {"a", "c"})
            status = (await client.get("/status")).json()
            assert sum(status["slots"]["shares"].values()) == 3
            # one pool of c, not two: the second change found c running, unchanged
            assert status["models"]["c"]["workers"] == status["slots"]["shares"]["c"]
            live = {w["pid"] for w in status["workers"]}
            assert len(live) == 3, status["workers"]
            await wait_until(lambda: not any(process_alive(p) for p in b_pids), 15, "b gone")
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(within=20) == 0
