"""grafana/: the dashboard JSON is well formed, every query parses, every metric it reads is
one that a live gateway and sim worker really export, and (with Debian's prometheus) each
panel's queries return data from a real Prometheus scraping them on loopback."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from procs import HOST, Proc, corral, free_port, start_worker, wait_for
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "corral.json"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
API_KEY = "sk-grafana-test"

# Grafana's own variables, replaced by values Prometheus accepts.
GRAFANA_VARS = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m"}

# Panels whose series appear only after an event a healthy run does not have (a retry on
# another worker, a failed connection to one): their queries must be valid, may be empty.
EVENT_ONLY = {
    "corral_retries_total": "a retry needs a worker failing before the first byte",
    "corral_upstream_errors_total": "needs a worker failing",
}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with Grafana's variables substituted)."""
    out = []
    for panel in load_dashboard()["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], t["refId"], expr))
    return out


def metric_names(expr: str) -> set[str]:
    import promql_parser

    names: set[str] = set()

    def visit(node: object) -> None:
        if type(node).__name__ == "VectorSelector" and node.name:  # type: ignore[attr-defined]
            names.add(node.name)  # type: ignore[attr-defined]

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


# --------------------------------------------------------------------------- offline


def test_dashboard_json_is_well_formed() -> None:
    d = load_dashboard()
    assert d["uid"] == "corral" and d["title"]
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    var_names = [v["name"] for v in d["templating"]["list"]]
    assert "datasource" in var_names
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 15
    for p in graphs:
        assert p["title"], p
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    titles = " ".join(p["title"].lower() for p in graphs)
    for must in ("throughput", "requests/s", "first token", "latency", "queue depth",
                 "up/down", "per box", "rejections", "queue wait", "cache", "per user"):
        assert must in titles, f"no panel about {must!r}"


def test_every_query_parses() -> None:
    import promql_parser

    qs = queries()
    assert qs
    for title, ref, expr in qs:
        assert "$" not in expr, f"{title}/{ref}: unsubstituted variable in {expr}"
        try:
            promql_parser.parse(expr)
        except Exception as exc:
            pytest.fail(f"{title}/{ref}: {expr!r} does not parse: {exc}")
        assert metric_names(expr), f"{title}/{ref}: reads no metric"


def test_quantile_panels_use_histogram_buckets() -> None:
    for title, ref, expr in queries():
        if "histogram_quantile" in expr:
            assert re.search(r"_bucket\[", expr) and "le" in expr, f"{title}/{ref}: {expr}"


def test_provisioning_files() -> None:
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    prov = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/corral.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# --------------------------------------------------------------------------- live


@pytest.fixture(scope="module")
def live() -> Iterator[dict[str, str]]:
    """A one-slot sim worker and a gateway (with one API key, so per-user metrics have a user),
    after a few ordinary, streaming and refused requests."""
    procs: list[Proc] = []
    try:
        w = start_worker("--sim-tokens-per-second", "400", "--parallel", "1", backend="sim")
        procs.append(w.proc)
        port = free_port()
        gw = corral("gateway", "--host", HOST, "--port", str(port), "--worker", w.url,
                    env={"CORRAL_API_KEYS": API_KEY}, name=f"gateway-{port}")
        procs.append(gw)
        url = f"http://{HOST}:{port}"
        gw.wait_http(f"{url}/readyz")
        traffic(url)
        yield {"gateway": url, "worker": w.url, "gateway_port": str(port),
               "worker_port": str(w.port)}
    finally:
        for p in procs:
            p.stop()


def traffic(url: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=30, headers=headers) as c:
        for stream in (False, True, False, True):
            body = {"model": "smollm2-135m", "max_tokens": 8, "stream": stream,
                    "messages": [{"role": "user", "content": "hello"}]}
            if stream:
                body["stream_options"] = {"include_usage": True}
            r = c.post(f"{url}/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
        r = c.post(f"{url}/v1/chat/completions", json={
            "model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404, r.text

        # More at once than the worker's one slot and its allowance: some wait in the
        # gateway's queue, so its wait histogram has observations.
        def one(_: int) -> int:
            return c.post(f"{url}/v1/chat/completions", json={
                "model": "smollm2-135m", "max_tokens": 40,
                "messages": [{"role": "user", "content": "hello"}]}).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(8)))
        assert statuses == [200] * 8, statuses


def exported(text: str) -> set[str]:
    """Sample names a scrape offers, including families declared but not yet observed."""
    names: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["_sum", "_count", ""], "gauge": [""], "untyped": [""]}
    for fam in text_string_to_metric_families(text):
        names.update(fam.name + s for s in suffixes.get(fam.type, [""]))
        names.update(s.name for s in fam.samples)
    return names


def test_every_metric_used_is_exported(live: dict[str, str]) -> None:
    gw = httpx.get(f"{live['gateway']}/metrics", timeout=5)
    wk = httpx.get(f"{live['worker']}/metrics", timeout=5)
    assert gw.status_code == 200 and wk.status_code == 200
    names = exported(gw.text) | exported(wk.text)
    assert "corral_requests_total" in names and "corral_worker_slots_busy" in names
    used: dict[str, str] = {}
    for title, ref, expr in queries():
        for n in metric_names(expr):
            used.setdefault(n, f"{title}/{ref}")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus-alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            for n in metric_names(rule["expr"]):
                used.setdefault(n, f"alert {rule['alert']}")
    missing = {n: where for n, where in used.items() if n not in names}
    assert not missing, f"the dashboard or alerts read metrics nothing exports: {missing}"


PROMETHEUS = shutil.which("prometheus")


def test_panels_return_data_from_prometheus(live: dict[str, str]) -> None:
    if PROMETHEUS is None:
        if IN_CI:
            pytest.fail("prometheus must be installed in CI (.ci/run does it)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    tmp = Path(tempfile.mkdtemp(prefix="corral-prom-"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "corral-gateway",
             "static_configs": [{"targets": [f"{HOST}:{live['gateway_port']}"]}]},
            {"job_name": "corral-workers",
             "static_configs": [{"targets": [f"{HOST}:{live['worker_port']}"]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = Proc([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={HOST}:{port}",
                 "--log.level=warn"], name=f"prometheus-{port}").start()
    api = f"http://{HOST}:{port}/api/v1/query"
    try:
        prom.wait_http(f"http://{HOST}:{port}/-/ready", timeout=60)

        def query(expr: str) -> list[dict]:
            body = httpx.get(api, params={"query": expr}, timeout=10).json()
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        # Both targets scraped, then traffic, then enough scrapes that rates see it.
        wait_for(lambda: sum(float(r["value"][1]) for r in query("up")) == 2, 60, 0.25,
                 "prometheus scraping gateway and worker")
        traffic(live["gateway"])
        wait_for(lambda: bool(query("increase(corral_requests_total[15s]) > 0")), 30, 0.25,
                 "prometheus seeing the new requests")
        wait_for(lambda: bool(query(
            "increase(corral_worker_generated_tokens_total[15s]) > 0")), 30, 0.25,
                 "prometheus seeing the worker's tokens")

        empty = []
        for title, ref, expr in queries():
            result = query(expr)
            values = [float(v) for r in result for v in [r["value"][1]]]
            has_data = any(not math.isnan(v) for v in values)
            if not has_data and not (metric_names(expr) & EVENT_ONLY.keys()):
                empty.append(f"{title}/{ref}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        prom.stop()
        shutil.rmtree(tmp, ignore_errors=True)
