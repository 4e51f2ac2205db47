"""The dashboard in a real browser: headless Debian chromium against a real gateway and sim
workers. It must list the workers as ready, and show one as down after it is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import httpx
import pytest
from procs import HOST, Proc, corral, free_port, start_worker, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if not (CHROMIUM and CHROMEDRIVER):
    if IN_CI:
        pytest.fail("chromium and chromium-driver must be installed in CI (.ci/run does it)",
                    pytrace=False)
    pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
except ImportError:  # the `test` extra installs it
    if IN_CI:
        raise
    pytest.skip("selenium is not installed (pip install -e '.[test]')", allow_module_level=True)

@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
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
def cluster() -> Iterator[tuple[str, list]]:
    procs: list[Proc] = []
    workers = []
    try:
        for _ in range(2):
            w = start_worker("--sim-tokens-per-second", "200", backend="sim")
            procs.append(w.proc)
            workers.append(w)
        port = free_port()
        args = ["gateway", "--host", HOST, "--port", str(port)]
        for w in workers:
            args += ["--worker", w.url]
        gw = corral(*args, name=f"gateway-{port}")
        procs.append(gw)
        url = f"http://{HOST}:{port}"

        def all_ready(r: httpx.Response) -> bool:
            states = [w["state"] for w in r.json()["workers"]]
            return len(states) == 2 and all(s in ("ready", "busy") for s in states)

        gw.wait_http(f"{url}/cluster", ok=all_ready)
        yield url, workers
    finally:
        for p in procs:
            p.stop()


def _card_states(driver: webdriver.Chrome) -> dict[str, str]:
    return driver.execute_script(
        "const out = {};"
        "for (const c of document.querySelectorAll('.worker[data-worker-id]')) {"
        "  out[c.dataset.workerId] = c.querySelector('.state').textContent.trim().toLowerCase();"
        "}"
        "return out;"
    )


def test_dashboard_shows_workers_and_a_crash(cluster, browser) -> None:
    url, workers = cluster
    ids = [w["id"] for w in httpx.get(f"{url}/cluster", timeout=5).json()["workers"]]
    assert len(ids) == 2

    # Traffic, so the rate tiles have something to show.
    with httpx.Client(timeout=30) as c:
        for _ in range(3):
            r = c.post(f"{url}/v1/chat/completions", json={
                "model": "smollm2-135m", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text

    browser.get(f"{url}/")
    assert browser.title == "Corral"
    wait_for(lambda: all(_card_states(browser).get(i) in ("ready", "busy") for i in ids), 20, 0.2,
          f"cards for {ids} in state ready")
    body = browser.find_element("tag name", "body").text
    for i in ids:
        assert i in body
    assert "smollm2-135m" in body
    assert browser.find_element("id", "conn").get_attribute("data-conn") == "live"
    # The request-rate tile read the gateway's metrics (3 requests answered so far).
    wait_for(lambda: browser.find_element("id", "k-rps-sub").text == "3 total", 10, 0.2,
          "the request total from /dashboard/summary")
    browser.save_screenshot(os.path.join(tempfile.gettempdir(), "corral-dashboard-ready.png"))

    victim = workers[0]
    victim_id = next(i for i in ids if i.endswith(f":{victim.port}"))
    survivor_id = next(i for i in ids if i != victim_id)
    victim.proc.kill()
    wait_for(lambda: _card_states(browser).get(victim_id) == "down", 30, 0.2,
          f"{victim_id} shown down")
    states = _card_states(browser)
    assert states[survivor_id] in ("ready", "busy"), states
    card = browser.find_element("css selector", f'.worker[data-worker-id="{victim_id}"]')
    assert card.get_attribute("data-state") == "down"
    assert browser.find_element("id", "k-workers").text.strip() == "1 / 2"
    browser.save_screenshot(os.path.join(tempfile.gettempdir(), "corral-dashboard-down.png"))
