"""Headless chromium for the browser tests (Debian's chromium and chromedriver, via
selenium), started the same way for each of them.

Without the browser a test module calls `skip_without_browser()` and is skipped, unless
MODELPOOL_REQUIRE_BROWSER=1 (as in CI), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)

# As root, on a machine with no network but loopback: no sandbox, and nothing that
# reaches out on its own (it would be refused, many times over, at every start).
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def skip_without_browser() -> None:
    """Skip the calling test module if there is no browser, unless one is required."""
    if not HAVE_BROWSER and os.environ.get("MODELPOOL_REQUIRE_BROWSER") != "1":
        pytest.skip(
            "needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver)",
            allow_module_level=True,
        )


@contextmanager
def chromium(*flags: str, network_log: bool = False) -> Iterator[webdriver.Chrome]:
    """Headless chromium with a fresh profile and `flags` besides FLAGS (with
    `network_log`, its performance log kept), quit with its driver on exit."""
    assert HAVE_BROWSER, f"MODELPOOL_REQUIRE_BROWSER=1 but {CHROMIUM} or {CHROMEDRIVER} is missing"
    profile = tempfile.mkdtemp(prefix="modelpool-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, *flags, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if network_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
