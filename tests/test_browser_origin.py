"""Web pages in a real browser (Debian's headless chromium, via selenium) cannot drive a
service that has no API key: neither a page of another origin on this machine, nor one
whose host name was re-pointed at it (DNS rebinding). See origins.py and admin.py.

Skipped, as test_status_page.py is, without chromium and chromedriver, unless
MODELPOOL_REQUIRE_BROWSER=1. What the browser received is read from its own network log
(the page of another origin is not allowed to read it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trio
from selenium import webdriver

from browser import chromium, skip_without_browser
from conftest import running_server, scripted_config

pytestmark = pytest.mark.timeout(120)
skip_without_browser()

REBOUND = "rebound.example"  # a name the browser is told is 127.0.0.1, as a rebinding DNS would

# The attacker's page: two POSTs a page may send anywhere without a preflight (a text/plain
# body), one to resize the pool and one to make a model compute.
HOSTILE_PAGE = """<!doctype html><title>hostile</title><script>
window.outcomes = {};
async function attempt(name, path, body) {
  try {
    const response = await fetch("SERVICE" + path, {method: "POST", body: body});
    window.outcomes[name] = "read " + response.status;
  } catch (error) {
    window.outcomes[name] = "unreadable";
  }
}
Promise.all([
  attempt("scale", "/admin/scale", '{"workers": 6}'),
  attempt("predict", "/predict", '{"n": 1}'),
]).then(() => { window.done = true; });
</script>"""


def browser() -> AbstractContextManager[webdriver.Chrome]:
    """Headless chromium with its network log kept; REBOUND resolves to 127.0.0.1 in it."""
    return chromium(f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1", network_log=True)


@contextmanager
def hostile_site(service: str) -> Iterator[str]:
    """A web server on another loopback port (another origin) serving HOSTILE_PAGE aimed at
    `service`; its URL. Stopped on exit."""
    page = HOSTILE_PAGE.replace("SERVICE", service).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}/"
    finally:
        site.shutdown()
        site.server_close()
        thread.join(10)


def received(driver: webdriver.Chrome, urls: list[str]) -> list[int]:
    """The statuses of the answers to `urls` the browser received, in their order, from its
    network log (which keeps an answer the page may not read, and is emptied as read)."""
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    sent = {
        event["params"]["requestId"]: event["params"]["request"]["url"]
        for event in events
        if event["method"] == "Network.requestWillBeSent"
    }
    statuses = {
        sent.get(event["params"]["requestId"]): event["params"]["statusCode"]
        for event in events
        if event["method"] == "Network.responseReceivedExtraInfo"
    }
    return [statuses.get(url, 0) for url in urls]


async def test_a_page_of_another_origin_cannot_resize_the_pool_or_use_a_model() -> None:
    async with running_server(scripted_config(workers=2)) as server:
        await server.pool.wait_ready()
        with hostile_site(server.url) as site, browser() as driver:
            await trio.to_thread.run_sync(driver.get, site)
            with trio.fail_after(30):
                while not await trio.to_thread.run_sync(
                    driver.execute_script, "return window.done === true"
                ):
                    await trio.sleep(0.1)
            outcomes = driver.execute_script("return window.outcomes")
            assert outcomes == {"scale": "unreadable", "predict": "unreadable"}
            urls = [server.url + "/admin/scale", server.url + "/predict"]
            assert received(driver, urls) == [403, 403]  # sent, and refused
        await trio.sleep(0.5)  # a resize that had been let through would have begun by now
        assert len(server.pool.workers) == 2
        assert sum(worker.served for worker in server.pool.workers) == 0


async def test_a_page_whose_name_is_rebound_to_this_machine_gets_nothing() -> None:
    """DNS rebinding: to the browser, the service is the page's own origin (its requests
    need no preflight, its answers are readable); the name it sends in Host gives it away."""
    async with running_server(scripted_config(workers=2)) as server:
        await server.pool.wait_ready()
        port = server.url.rsplit(":", 1)[1]
        with browser() as driver:
            await trio.to_thread.run_sync(driver.get, f"http://{REBOUND}:{port}/")
            assert "modelpool" not in driver.title  # no status page
            statuses = await trio.to_thread.run_sync(
                driver.execute_async_script,
                """const done = arguments[arguments.length - 1];
                const json = {"Content-Type": "application/json"};
                Promise.all([
                  fetch("/status").then(r => r.status),
                  fetch("/admin/scale", {method: "POST", headers: json, body: '{"workers": 3}'})
                    .then(r => r.status),
                ]).then(done, error => done(String(error)));""",
            )
            assert statuses == [403, 403]
        assert len(server.pool.workers) == 2


async def test_the_status_page_still_works_from_its_own_origin_on_every_name() -> None:
    """The status page, at 127.0.0.1 and at localhost, calls the API from its own origin."""
    async with running_server(scripted_config(workers=2)) as server:
        await server.pool.wait_ready()
        port = server.url.rsplit(":", 1)[1]
        with browser() as driver:
            for base in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
                await trio.to_thread.run_sync(driver.get, base + "/")
                assert driver.title == "modelpool"
                statuses = await trio.to_thread.run_sync(
                    driver.execute_async_script,
                    """const done = arguments[arguments.length - 1];
                    const json = {"Content-Type": "application/json"};
                    Promise.all([
                      fetch("status").then(r => r.status),
                      fetch("predict", {method: "POST", headers: json, body: '{"n": 1}'})
                        .then(r => r.status),
                    ]).then(done, error => done(String(error)));""",
                )
                assert statuses == [200, 200], base
