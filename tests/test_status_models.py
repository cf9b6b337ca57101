"""The live status page at / with several models, in a real headless browser (Debian's
chromium, via selenium): a row per model, the slots they share, each worker's model.

Skipped, as test_status_page.py is, without chromium and chromedriver, unless
MODELPOOL_REQUIRE_BROWSER=1. A screenshot is saved under artifacts/ (or
$MODELPOOL_ARTIFACTS).
"""

from __future__ import annotations

import httpx
import pytest
import trio
from selenium import webdriver
from selenium.webdriver.common.by import By
from test_status_page import NOTHING, browser, screenshot, shown, worker_table

from browser import skip_without_browser
from conftest import FAST_MODEL3, MODEL3, running_server
from modelpool import PoolConfig

skip_without_browser()

pytestmark = pytest.mark.timeout(120)

OTHER = "b.2-rc"  # the second model: a name with every kind of character a name may have
# An argument model3 ignores, shown (as the command, in a tooltip) as the text it is.
MARKUP = "<b id=injected>x</b>"


def model_table(driver: webdriver.Chrome) -> dict[str, list[str]]:
    """The models table's cells by model name, read in one go (rebuilt every second)."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#models tbody tr')]"
        ".map(row => [row.dataset.model, [...row.cells].map(cell => cell.textContent)]))"
    )


def busy_and_queued(driver: webdriver.Chrome) -> dict[str, tuple[str, str]]:
    return {name: (cells[3], cells[4]) for name, cells in model_table(driver).items()}


async def test_the_status_page_shows_each_model_and_the_workers_model() -> None:
    config = PoolConfig(
        models={"a": {"model_cmd": [*MODEL3, MARKUP]}, OTHER: {"model_cmd": MODEL3}},
        env=FAST_MODEL3,
        workers=2,
    )
    async with running_server(config) as server:
        fleet = server.service.fleet
        assert fleet is not None
        await fleet.wait_ready()
        with browser() as driver:
            await trio.to_thread.run_sync(driver.get, server.url + "/")
            idle = {
                "a": ["adefault", "1", "1", "0", "0", "1\u20132", "1", NOTHING],
                OTHER: [OTHER, "1", "1", "0", "0", "1\u20132", "1", NOTHING],
            }
            rows = await shown(driver, model_table, idle.__eq__, 10, "both models ready")
            assert list(rows) == ["a", OTHER]  # in the order declared
            assert driver.find_element(By.ID, "fleet").is_displayed()
            assert driver.find_element(By.ID, "budget").text == "2"
            assert driver.find_element(By.ID, "moves").text == "0"
            assert driver.find_element(By.ID, "ready").text == "2"  # summed over models
            assert driver.find_element(By.ID, "size").text == "2"

            # Names and commands are text: no element made of them, the markup shown as is.
            cells = driver.execute_script(
                "return [...document.querySelectorAll('#models tbody tr')].map(row => {"
                " const c = row.cells[0];"
                " return [c.firstChild.nodeType === Node.TEXT_NODE ? c.firstChild.data : null,"
                "  [...c.children].map(e => e.className), c.title]; })"
            )
            assert cells == [
                ["a", ["marker"], " ".join([*MODEL3, MARKUP])],
                [OTHER, [], " ".join(MODEL3)],
            ]
            assert driver.execute_script("return document.getElementById('injected')") is None

            # The workers table names each worker's model, in a first column of its own.
            header = driver.find_element(By.ID, "model-column")
            assert header.is_displayed() and header.text == "model"
            table = worker_table(driver)
            assert [row[:3] for row in table] == [["a", "0", "idle"], [OTHER, "0", "idle"]]
            pids = [str(w.pid) for pool in fleet.pools.values() for w in pool.workers]
            assert [row[3] for row in table] == pids

            # One request computes on the second model, another waits for it: only its
            # row says so, and its worker's row.
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                answers: list[int] = []

                async def post() -> None:
                    path = f"/models/{OTHER}/predict"
                    response = await client.post(path, json={"data": 1.2})  # about 2.6 s
                    answers.append(response.status_code)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(post)
                    nursery.start_soon(post)
                    want = {"a": ("0", "0"), OTHER: ("1", "1")}
                    await shown(driver, busy_and_queued, want.__eq__, 10, "b busy, one queued")
                    states = await shown(
                        driver,
                        lambda d: [(row[0], row[2]) for row in worker_table(d)],
                        [("a", "idle"), (OTHER, "busy")].__eq__,
                        5,
                        "b's worker busy",
                    )
                    assert states == [("a", "idle"), (OTHER, "busy")]
                    await trio.to_thread.run_sync(screenshot, driver, "status-page-models.png")
            assert answers == [200, 200]
            want = {"a": ("0", "0"), OTHER: ("0", "0")}
            await shown(driver, busy_and_queued, want.__eq__, 10, "both models idle again")
