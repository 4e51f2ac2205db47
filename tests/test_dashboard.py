"""The dashboard in a real browser: headless Debian chromium against a real gateway and sim
workers. It must list the workers as ready, and show one as down after it is SIGKILLed.
Plus its routes over plain HTTP: the page, its assets, and the metrics summary."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import httpx
import pytest
from procs import HOST, Proc, corral, free_port, start_worker, stop_all, wait_for


@pytest.fixture
def cluster() -> Iterator[tuple[str, list]]:
    procs: list[Proc] = []
    workers = []
    try:
        for _ in range(2):  # started together, then waited for
            w = start_worker("--sim-tokens-per-second", "200", backend="sim", wait=False)
            procs.append(w.proc)
            workers.append(w)
        for w in workers:
            w.wait_ready()
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
    finally:  # the workers first, while the gateway still probes them (procs.stop_all)
        stop_all(w.proc for w in workers)
        stop_all(procs)  # the gateway (the workers' are stopped already)


def _card_states(driver) -> dict[str, str]:
    return driver.execute_script(
        "const out = {};"
        "for (const c of document.querySelectorAll('.worker[data-worker-id]')) {"
        "  out[c.dataset.workerId] = c.querySelector('.state').textContent.trim().toLowerCase();"
        "}"
        "return out;"
    )


def send(url: str, n: int) -> None:
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            r = c.post(f"{url}/v1/chat/completions", json={
                "model": "smollm2-135m", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text


def test_routes_and_summary(cluster) -> None:
    url, _ = cluster
    page = httpx.get(f"{url}/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>Corral</title>" in page.text and "dashboard.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing external
    for name, ctype in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        r = httpx.get(f"{url}/dashboard/static/{name}", timeout=5)
        assert r.status_code == 200 and ctype in r.headers["content-type"], name
        assert "http://" not in r.text and "https://" not in r.text, name
    for bad in ("app.py", "..%2Fapi%2Fdashboard.py", "dashboard.html.bak"):
        assert httpx.get(f"{url}/dashboard/static/{bad}", timeout=5).status_code == 404, bad

    send(url, 4)
    s = httpx.get(f"{url}/dashboard/summary", timeout=5).json()
    assert s["available"] is True and s["time"] > 0
    assert s["requests"] == {"200": 4.0}
    assert s["tokens"]["completion"] >= 4 and s["tokens"]["prompt"] > 0
    assert s["latency"]["count"] == 4
    buckets = s["latency"]["buckets"]
    assert buckets[-1] == [None, 4.0]  # +Inf, as JSON null
    assert [c for _, c in buckets] == sorted(c for _, c in buckets)  # cumulative


def test_dashboard_shows_workers_and_a_crash(browser, cluster) -> None:
    url, workers = cluster
    ids = [w["id"] for w in httpx.get(f"{url}/cluster", timeout=5).json()["workers"]]
    assert len(ids) == 2

    send(url, 3)  # traffic, so the rate tiles have something to show

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


def test_dashboard_shows_an_unplaceable_model_and_idle_workers(browser,
                                                               unplaceable_cluster) -> None:
    c = unplaceable_cluster
    ids = [w["id"] for w in c.cluster()["workers"]]
    browser.get(f"{c.gateway.url}/")
    wait_for(lambda: all(_card_states(browser).get(i) == "idle" for i in ids), 20, 0.2,
             f"cards for {ids} in state idle")
    card = browser.find_element("css selector", '.placement[data-model="smollm2-135m"]')
    assert card.get_attribute("data-state") == "unplaceable"
    text = card.text
    need = next(p for p in c.cluster()["placements"] if p["model"] == "smollm2-135m")["need"]
    needed = f"{need['total'] / (1 << 20):.1f} MiB"  # 452.2 MiB with the default 4 slots
    assert "UNPLACEABLE" in text.upper() and "70.0 MiB" in text and needed in text, text
    for i in ids:
        worker = browser.find_element("css selector", f'.worker[data-worker-id="{i}"]')
        assert "waiting to be placed" in worker.text and worker.get_attribute(
            "data-state") == "idle"
    assert browser.find_element("id", "k-workers").text.strip() == "2 / 2"  # idle is up
    browser.save_screenshot(os.path.join(tempfile.gettempdir(), "corral-dashboard-unplaced.png"))
