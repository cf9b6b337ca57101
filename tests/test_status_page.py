"""The live status page at /, in a real headless browser (Debian's chromium, via selenium).

The browser is driven from a thread (selenium blocks) while the service runs in this
test's trio loop. Without chromium and chromedriver the tests are skipped, unless
MODELPOOL_REQUIRE_BROWSER=1 (as in CI), where a missing browser is a failure. Each test
saves a screenshot under artifacts/ (or $MODELPOOL_ARTIFACTS).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
import trio
from selenium import webdriver
from selenium.webdriver.common.by import By

from browser import chromium, skip_without_browser
from conftest import ROOT, running_server, scripted_config

ARTIFACTS = Path(os.environ.get("MODELPOOL_ARTIFACTS", ROOT / "artifacts"))
NOTHING = "\u2013"  # what the page shows where there is no value

skip_without_browser()

pytestmark = pytest.mark.timeout(120)


def browser() -> AbstractContextManager[webdriver.Chrome]:
    """Headless chromium with a fresh profile, quit (with its driver) on exit."""
    return chromium("--window-size=1100,800")


def worker_table(driver: webdriver.Chrome) -> list[list[str]]:
    """The worker table's cells, read in one go: the page rebuilds it every second."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#workers tbody tr')]"
        ".map(row => [...row.cells].map(cell => cell.textContent))"
    )


def worker_states(driver: webdriver.Chrome) -> list[str]:
    return column(driver, 1)


def column(driver: webdriver.Chrome, index: int) -> list[str]:
    return [row[index] for row in worker_table(driver)]


async def shown(driver: webdriver.Chrome, read, want, within: float, what: str):
    """Poll what the page shows (from a thread) until `want(value)`; fail after `within`."""
    value = None
    with trio.move_on_after(within):
        while True:
            value = await trio.to_thread.run_sync(read, driver)
            if want(value):
                return value
            await trio.sleep(0.2)
    raise AssertionError(f"page never showed {what} within {within} s; last saw {value!r}")


def screenshot(driver: webdriver.Chrome, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / name))


async def test_the_status_page_shows_workers_change_state_while_requests_run() -> None:
    async with running_server(scripted_config(workers=2)) as server:
        await server.pool.wait_ready()
        with browser() as driver:
            await trio.to_thread.run_sync(driver.get, server.url + "/")
            assert driver.title == "modelpool"
            await shown(driver, worker_states, lambda s: s == ["idle", "idle"], 10, "2 idle")
            pids = [str(w.pid) for w in server.pool.workers]
            assert column(driver, 2) == pids

            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                answers: list[int] = []

                async def post(seconds: float) -> None:
                    response = await client.post("/predict", json={"sleep": seconds})
                    answers.append(response.status_code)

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(post, 4)  # two run, one waits: 4 s to see it
                    await shown(driver, worker_states, lambda s: s == ["busy", "busy"], 10, "busy")
                    queue = await shown(
                        driver, lambda d: d.find_element(By.ID, "queue").text, "1".__eq__, 5, "q"
                    )
                    assert queue == "1"
                    ids = await shown(
                        driver, lambda d: column(d, 7), lambda c: NOTHING not in c, 5, ""
                    )
                    assert all(len(i) == 16 for i in ids), ids  # the requests being computed
                    await trio.to_thread.run_sync(screenshot, driver, "status-page-busy.png")
            assert answers == [200, 200, 200]

            await shown(driver, worker_states, lambda s: s == ["idle", "idle"], 10, "idle again")
            served = await shown(
                driver, lambda d: column(d, 4), lambda c: c in (["2", "1"], ["1", "2"]), 5, "served"
            )
            assert sorted(served) == ["1", "2"]
            outcomes = await shown(
                driver, lambda d: d.find_element(By.ID, "outcomes").text, "ok: 3".__eq__, 5, "ok"
            )
            assert outcomes == "ok: 3"
            assert driver.find_element(By.ID, "health").text == "healthy"
            fetched = driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name)"
            )
            assert fetched and all(url.startswith(server.url) for url in fetched), fetched
            await trio.to_thread.run_sync(screenshot, driver, "status-page.png")


async def test_the_status_page_asks_for_the_api_key_and_keeps_it_for_the_tab() -> None:
    async with running_server(scripted_config(), api_key="page key") as server:
        await server.pool.wait_ready()
        with browser() as driver:
            await trio.to_thread.run_sync(driver.get, server.url + "/")

            def alert_text(d: webdriver.Chrome) -> str | None:
                try:
                    return d.switch_to.alert.text
                except Exception:
                    return None

            text = await shown(driver, alert_text, lambda t: t is not None, 10, "a key prompt")
            assert "API key" in text
            alert = driver.switch_to.alert
            alert.send_keys("page key")
            alert.accept()
            await shown(driver, worker_states, lambda s: s == ["idle"], 10, "the worker")
            stored = driver.execute_script("return sessionStorage.getItem('modelpool-api-key')")
            assert stored == "page key"
