"""Headless Debian chromium for the dashboard tests, as pytest fixtures (conftest.py
registers them once, so the whole session shares one browser)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def chromium() -> Iterator:
    """One browser for the session (a start costs seconds on a loaded box); `browser`
    lends it to each test."""
    if not (CHROMIUM and CHROMEDRIVER):
        if IN_CI:
            pytest.fail("chromium and chromium-driver must be installed in CI (.ci/run does it)")
        pytest.skip("chromium/chromedriver not installed "
                    "(apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # the `test` extra installs it
        if IN_CI:
            raise
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    profile = tempfile.mkdtemp(prefix="corral-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1600,1000"):
        opts.add_argument(flag)
    # The Debian driver, by path: selenium must not try to fetch one.
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium) -> Iterator:
    """The session's chromium for one test; afterwards on about:blank (the test's gateway
    is gone: its page must not keep polling it) and without the test's cookies."""
    yield chromium
    chromium.get("about:blank")
    chromium.delete_all_cookies()
