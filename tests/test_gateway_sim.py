"""The gateway against simulated workers: routing, admission, health, failover, errors.

Real processes on 127.0.0.1; the official `openai` SDK is the client. Every wait is a poll
with a deadline; every process is stopped by PID in a `finally`/fixture teardown.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from conftest import client_for
from procs import HOST, Gateway, Worker, free_port, metric, wait_for

MODEL = "smollm2-135m"  # what a sim worker calls its model by default
HEADER = "x-corral-worker"
CHAT = [{"role": "user", "content": "Say something."}]


# --------------------------------------------------------------------------- helpers


def sim(factory: Callable[..., Worker], *extra: str, rate: float = 100, parallel: int = 4,
        **kw) -> Worker:
    return factory("--sim-tokens-per-second", str(rate), "--parallel", str(parallel),
                   "--sim-ttft", "0.01", *extra, backend="sim", **kw)


def cluster(g: Gateway) -> dict:
    # The cluster token: /cluster is closed when API keys are configured.
    auth = {"Authorization": f"Bearer {g.token}"} if g.token else {}
    return httpx.get(f"{g.url}/cluster", timeout=5, headers=auth).json()


def states(g: Gateway) -> dict[str, str]:
    return {w["id"]: w["state"] for w in cluster(g)["workers"]}


def wait_state(g: Gateway, wid: str, *want: str, timeout: float = 20) -> None:
    wait_for(lambda: states(g).get(wid) in want, timeout, 0.05, f"{wid} in {want}")


def chat(client: openai.OpenAI, max_tokens: int = 8, **kw) -> tuple[str, str]:
    """(worker id, text) of one non-streaming chat completion."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=max_tokens, **kw)
    return raw.headers[HEADER], raw.parse().choices[0].message.content


# --------------------------------------------------------------------------- basics


def test_proxy_basics_and_error_shapes(worker_factory, gateway_factory) -> None:
    w = sim(worker_factory)
    g = gateway_factory("--worker", w.url)
    wait_state(g, w.id, "ready")
    client = client_for(g.url)

    wid, text = chat(client, max_tokens=5)
    assert wid == w.id and len(text.split()) == 5

    # Streaming without include_usage: the usage chunk the gateway asked for is dropped.
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=CHAT, max_tokens=4, stream=True) as resp:
        assert resp.headers[HEADER] == w.id
        chunks = list(resp.parse())
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split()
    # With include_usage: exactly one usage chunk, at the end, with the worker's counts.
    chunks = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=4,
                                            stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert sum(1 for c in chunks if c.usage) == 1

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]

    with pytest.raises(openai.NotFoundError) as e404:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert e404.value.body["code"] == "model_not_found"
    assert e404.value.response.headers[HEADER] == "gateway"

    with pytest.raises(openai.BadRequestError) as e400:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    assert e400.value.body["type"] == "invalid_request_error"
    assert e400.value.body["param"] == "temperature"

    r = httpx.post(f"{g.url}/v1/chat/completions", content=b"{not json", timeout=5,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert r.headers[HEADER] == "gateway"

    # /cluster has the contract's fields.
    c = cluster(g)
    worker = c["workers"][0]
    for key in ("id", "url", "backend", "models", "state", "queue_depth", "slots_total",
                "slots_busy", "hardware", "memory", "tokens_per_second"):
        assert key in worker
    assert worker["backend"] == "sim" and worker["slots_total"] == 4
    assert c["placements"] == [{"model": MODEL, "mode": "replica", "workers": [w.id],
                                "head": None}]
    assert httpx.get(f"{g.url}/readyz").status_code == 200
    assert metric(g.url, "corral_requests_total", model=MODEL, status="200") >= 3
    assert metric(g.url, "corral_tokens_total", model=MODEL, kind="completion") >= 13
    assert metric(g.url, "corral_worker_up", worker=w.id) == 1
    text = httpx.get(f"{g.url}/metrics").text
    for name in ("corral_requests_total", "corral_request_duration_seconds_bucket",
                 "corral_time_to_first_token_seconds_bucket", "corral_tokens_total",
                 "corral_worker_up", "corral_worker_queue_depth", "corral_inflight",
                 "corral_queue_length", "# TYPE corral_retries_total counter",
                 "# TYPE corral_rejected_total counter",
                 "# TYPE corral_queue_wait_seconds histogram",
                 "# TYPE corral_upstream_errors_total counter"):
        assert name in text, name
    assert metric(g.url, "corral_time_to_first_token_seconds_count", model=MODEL) == 2
    # Unknown models do not mint new label values.
    assert metric(g.url, "corral_requests_total", model="no-such-model") == 0
    assert metric(g.url, "corral_requests_total", model="other", status="404") == 1


# --------------------------------------------------------------------------- routing


def test_faster_worker_gets_proportionally_more(worker_factory, gateway_factory) -> None:
    slow = sim(worker_factory, rate=20, parallel=2)
    fast = sim(worker_factory, rate=80, parallel=2)
    g = gateway_factory("--worker", slow.url, "--worker", fast.url)
    wait_state(g, slow.id, "ready")
    wait_state(g, fast.id, "ready")
    client = client_for(g.url)

    def one(_: int) -> str:
        return chat(client, max_tokens=12)[0]

    # Sustained concurrency beyond what the fast one alone finishes sooner: with cost
    # routing a request queues at the fast worker while its expected finish there still
    # beats the slow one's (up to 6 deep here), so 6 clients would all be served by it.
    with ThreadPoolExecutor(12) as pool:
        served = collections.Counter(pool.map(one, range(160)))
    assert set(served) <= {slow.id, fast.id}
    ratio = served[fast.id] / max(1, served[slow.id])
    # An equal split would be 1.0; 4x the speed gives the fast one about 4x the work.
    assert 2.5 <= ratio <= 8.0, served
    assert served[slow.id] > 0, served  # the slow one is still used under load


# --------------------------------------------------------------------------- admission


def test_queue_full_and_queue_timeout_are_429(worker_factory, gateway_factory, tmp_path) -> None:
    w = sim(worker_factory, rate=10, parallel=1)
    conf = tmp_path / "corral.toml"
    conf.write_text("[gateway]\nqueue_size = 2\nqueue_timeout = 2.0\n"
                    "worker_queue_allowance = 1\n")
    g = gateway_factory("--worker", w.url, "--config", str(conf))
    wait_state(g, w.id, "ready")
    client = client_for(g.url)
    # 2 in flight on the worker (1 slot + 1 allowed queued), 2 waiting in the gateway.
    results: list[object] = []

    def hold(max_tokens: int) -> None:
        try:
            results.append(chat(client, max_tokens=max_tokens))
        except openai.APIStatusError as exc:
            results.append(exc)

    threads = [threading.Thread(target=hold, args=(40,)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: metric(g.url, "corral_queue_length") == 2, 10, 0.05, "2 queued")
        with pytest.raises(openai.RateLimitError) as full:
            chat(client)
        assert full.value.body["code"] == "queue_full"
        assert int(full.value.response.headers["retry-after"]) >= 1
    finally:
        for t in threads:
            t.join(30)
    # The in-flight pair take 4 s at 10 tok/s; the queued pair time out after 2 s.
    errors = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(results) == 4 and len(errors) == 2, results
    for e in errors:
        assert e.status_code == 429 and e.body["code"] == "queue_timeout"
        assert e.response.headers.get("retry-after")
    assert metric(g.url, "corral_rejected_total", reason="queue_full") == 1
    assert metric(g.url, "corral_rejected_total", reason="queue_timeout") == 2


def test_queued_requests_are_served_when_capacity_frees(worker_factory, gateway_factory,
                                                       tmp_path) -> None:
    w = sim(worker_factory, rate=200, parallel=1)
    conf = tmp_path / "corral.toml"  # the count alone (no room by expected wait): 1 + 2
    conf.write_text("[gateway]\nworker_queue_seconds = 0\n")
    g = gateway_factory("--worker", w.url, "--config", str(conf))
    wait_state(g, w.id, "ready")
    client = client_for(g.url)
    with ThreadPoolExecutor(12) as pool:  # 12 at once on 1 slot + 2 allowed at the worker
        served = list(pool.map(lambda _: chat(client, max_tokens=10)[0], range(24)))
    assert served == [w.id] * 24
    assert metric(g.url, "corral_queue_wait_seconds_count") > 0  # some really waited
    assert metric(g.url, "corral_inflight", worker=w.id) == 0  # every reservation given back


# --------------------------------------------------------------------------- health


def test_dead_worker_is_ejected_and_readmitted(worker_factory, gateway_factory) -> None:
    a = sim(worker_factory)
    b = sim(worker_factory)
    g = gateway_factory("--worker", a.url, "--worker", b.url)
    wait_state(g, a.id, "ready")
    wait_state(g, b.id, "ready")
    client = client_for(g.url)
    # Both serve: 8 at once (an idle cluster sends one-at-a-time traffic to whichever box
    # measured faster, so sequential requests could all land on one of two equal sims).
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _: chat(client, 40)[0], range(8))) == {a.id, b.id}

    # Requests in flight on `a` when it dies (40 tokens at 100/s: 0.4 s each) are retried
    # on b, since no byte of them reached the client yet.
    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(chat, client, 40) for _ in range(6)]
        wait_for(lambda: any(w["id"] == a.id and w["inflight"] > 0
                             for w in cluster(g)["workers"]), 5, 0.01, "work on a")
        a.proc.kill()  # SIGKILL: no goodbye
        served = [f.result(timeout=30)[0] for f in pending]
    assert b.id in served and a.id not in served
    assert metric(g.url, "corral_retries_total") >= 1
    # Requests right after the crash are served by b too.
    assert {chat(client)[0] for _ in range(10)} == {b.id}
    wait_state(g, a.id, "down", timeout=5)
    assert metric(g.url, "corral_worker_up", worker=a.id) == 0

    a2 = sim(worker_factory, port=a.port)  # restarted on the same port
    wait_state(g, a2.id, "ready", timeout=20)
    assert a2.id == a.id
    # 8 at once, as above: one at a time would all go to b, which measured faster so far.
    with ThreadPoolExecutor(8) as pool:
        wait_for(lambda: a.id in set(pool.map(lambda _: chat(client, 40)[0], range(8))), 20,
                 0.05, "the restarted worker to get traffic again")


def _grace_config(tmp_path: Path, seconds: float) -> str:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"[gateway]\ndown_grace = {seconds}\nprobe_interval = 0.2\n")
    return str(cfg)


def test_no_healthy_worker_is_503(worker_factory, gateway_factory, tmp_path) -> None:
    w = sim(worker_factory)
    # Past the outage grace (short here), a model without a healthy worker is a 503.
    g = gateway_factory("--worker", w.url, "--config", _grace_config(tmp_path, 0.5))
    wait_state(g, w.id, "ready")
    w.proc.kill()
    wait_state(g, w.id, "down", timeout=5)
    client = client_for(g.url)
    with pytest.raises(openai.InternalServerError) as e:
        chat(client)
    assert e.value.status_code == 503
    assert e.value.body["code"] == "no_healthy_worker"
    assert e.value.response.headers.get("retry-after")
    assert httpx.get(f"{g.url}/readyz").status_code == 503
    assert httpx.get(f"{g.url}/healthz").status_code == 200
    assert client.models.list().data == []


def test_a_request_waits_out_a_short_outage(worker_factory, gateway_factory, tmp_path) -> None:
    w = sim(worker_factory)
    g = gateway_factory("--worker", w.url, "--config", _grace_config(tmp_path, 60))
    wait_state(g, w.id, "ready")
    w.proc.kill()
    wait_state(g, w.id, "down", timeout=5)
    client = client_for(g.url)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, client)
        # It waits in the gateway's queue while the only worker is down...
        wait_for(lambda: metric(g.url, "corral_queue_length") == 1, 10, 0.05, "a waiter")
        assert not pending.done()
        w2 = sim(worker_factory, port=w.port)  # ...and is served once it is back.
        served, text = pending.result(timeout=60)
    assert served == w2.id and text
    assert metric(g.url, "corral_rejected_total", reason="no_healthy_worker") == 0


class _Flaky(BaseHTTPRequestHandler):
    """A 'worker' whose /status looks perfect (and very fast) but whose API fails."""

    status_code = 500

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"id": f"flaky:{self.server.server_port}", "backend": "sim",
                           "models": [MODEL], "state": "ready", "queue_depth": 0,
                           "slots_total": 4, "slots_busy": 0, "tokens_per_second": 10000,
                           "memory": {"total": 1, "available": 1}}).encode()
        self._send(200, body)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        code = type(self).status_code
        self._send(code, json.dumps({"error": {"message": "boom", "type": "server_error",
                                               "param": None, "code": None}}).encode())

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[Callable[[int], str]]:
    servers: list[ThreadingHTTPServer] = []

    def make(code: int) -> str:
        handler = type("Flaky", (_Flaky,), {"status_code": code})
        s = ThreadingHTTPServer((HOST, free_port()), handler)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        return f"http://{HOST}:{s.server_port}"

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.parametrize("code,reason", [(500, "http_5xx"), (429, "worker_busy")])
def test_retry_before_first_byte(worker_factory, gateway_factory, flaky, code, reason) -> None:
    good = sim(worker_factory)
    bad_url = flaky(code)
    g = gateway_factory("--worker", bad_url, "--worker", good.url)
    bad_id = f"flaky:{bad_url.rsplit(':', 1)[1]}"
    wait_state(g, bad_id, "ready")
    wait_state(g, good.id, "ready")
    client = client_for(g.url)
    # The flaky one looks 100x faster, so it is picked first; every request still succeeds.
    assert {chat(client)[0] for _ in range(6)} == {good.id}
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=CHAT, max_tokens=3, stream=True) as resp:
        assert resp.headers[HEADER] == good.id
        assert [c for c in resp.parse() if c.choices]
    assert metric(g.url, "corral_retries_total", reason=reason) >= 1
    if code == 500:
        assert states(g)[bad_id] in ("down", "ready")  # ejected, then re-admitted by probes
        assert metric(g.url, "corral_upstream_errors_total", kind="http_5xx") >= 1


def test_broken_stream_ends_with_error_event(worker_factory, gateway_factory) -> None:
    w = sim(worker_factory, rate=20)
    g = gateway_factory("--worker", w.url)
    wait_state(g, w.id, "ready")
    client = client_for(g.url)
    got: list[str] = []
    with pytest.raises(openai.APIError) as e:  # noqa: PT012
        for c in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=200,
                                                stream=True):
            if c.choices and c.choices[0].delta.content:
                got.append(c.choices[0].delta.content)
                if len(got) == 3:
                    w.proc.kill()
    assert len(got) >= 3
    assert "failed" in str(e.value.message)
    wait_for(lambda: metric(g.url, "corral_requests_total", status="502") == 1, 5, 0.05,
             "the broken stream to be counted")


def test_client_disconnect_aborts_the_worker(worker_factory, gateway_factory) -> None:
    w = sim(worker_factory, rate=20)
    g = gateway_factory("--worker", w.url)
    wait_state(g, w.id, "ready")
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=10) as http, \
            http.stream("POST", f"{g.url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        busy = httpx.get(f"{w.url}/status").json()["slots_busy"]
        assert busy == 1
    # 2000 tokens at 20/s would take 100 s; the worker must let go at once instead.
    wait_for(lambda: httpx.get(f"{w.url}/status").json()["slots_busy"] == 0, 5, 0.05,
             "the worker to abort the abandoned stream")
    wait_for(lambda: metric(g.url, "corral_inflight", worker=w.id) == 0, 5, 0.05, "release")


# --------------------------------------------------------------------------- membership


def test_join_leave_and_cluster_token(worker_factory, gateway_factory) -> None:
    g = gateway_factory()
    assert cluster(g)["workers"] == []
    assert httpx.get(f"{g.url}/readyz").status_code == 503
    client = client_for(g.url)
    with pytest.raises(openai.NotFoundError):
        chat(client)

    # Cluster writes need the token.
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{g.url}/cluster/workers", json={"url": "http://127.0.0.1:1"},
                       headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_cluster_token"
        r = httpx.delete(f"{g.url}/cluster/workers/x", headers=headers)
        assert r.status_code == 401
    assert cluster(g)["workers"] == []

    w = sim(worker_factory, "--join", g.url, env={"CORRAL_CLUSTER_TOKEN": g.token})
    wait_state(g, w.id, "ready", timeout=20)
    assert chat(client)[0] == w.id
    w.proc.stop()  # SIGTERM: the worker says goodbye
    wait_for(lambda: w.id not in states(g), 10, 0.05, "the worker to leave")
    assert httpx.get(f"{g.url}/readyz").status_code == 503

    # A join with the right token, by hand; then a leave.
    auth = {"Authorization": f"Bearer {g.token}"}
    r = httpx.post(f"{g.url}/cluster/workers", json={"url": "http://127.0.0.1:9", "id": "x"},
                   headers=auth)
    assert r.status_code == 201
    assert states(g)["x"] in ("loading", "down")
    assert httpx.delete(f"{g.url}/cluster/workers/x", headers=auth).status_code == 200
    assert "x" not in states(g)
    assert httpx.delete(f"{g.url}/cluster/workers/x", headers=auth).status_code == 404


def test_api_keys_from_config(worker_factory, gateway_factory, tmp_path: Path) -> None:
    conf = tmp_path / "corral.toml"
    conf.write_text('cluster_token = "from-the-file"\n'
                    '[[api_keys]]\nkey = "sk-alice"\nuser = "alice"\nrpm = 60\ntpm = 1000\n'
                    '[[api_keys]]\nkey = "sk-bob"\nuser = "bob"\n')
    g = gateway_factory("--config", str(conf), token="")
    g.token = "from-the-file"  # what cluster() sends: /cluster is closed with keys
    w = sim(worker_factory, "--join", g.url, env={"CORRAL_CLUSTER_TOKEN": "from-the-file"})
    wait_state(g, w.id, "ready", timeout=20)
    for key in ("none", "sk-alicex", "sk-alic"):
        with pytest.raises(openai.AuthenticationError) as e:
            chat(client_for(g.url, api_key=key))
        assert e.value.body["code"] == "invalid_api_key"
    r = httpx.get(f"{g.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert chat(client_for(g.url, api_key="sk-bob"))[0] == w.id
    assert chat(client_for(g.url, api_key="sk-alice"))[0] == w.id
    assert "sk-alice" not in g.proc.log() and "sk-bob" not in g.proc.log()


def test_joined_worker_that_stops_heartbeating_is_dropped(gateway_factory, tmp_path) -> None:
    conf = tmp_path / "corral.toml"
    conf.write_text("[gateway]\njoin_ttl = 1.0\n")
    g = gateway_factory("--config", str(conf))
    auth = {"Authorization": f"Bearer {g.token}"}
    r = httpx.post(f"{g.url}/cluster/workers", json={"url": "http://127.0.0.1:9", "id": "gone"},
                   headers=auth)
    assert r.status_code == 201
    t0 = time.monotonic()
    wait_for(lambda: "gone" not in states(g), 10, 0.05, "the silent worker to be dropped")
    assert time.monotonic() - t0 >= 0.5


def test_gateway_replicas_share_inflight_counts_through_redis(worker_factory, gateway_factory,
                                                              redis_url) -> None:
    w = sim(worker_factory, rate=10, parallel=4)
    a = gateway_factory("--worker", w.url, "--redis-url", redis_url)
    b = gateway_factory("--worker", w.url, "--redis-url", redis_url)
    wait_state(a, w.id, "ready")
    wait_state(b, w.id, "ready")
    client = client_for(a.url)

    def inflight_seen_by(g: Gateway) -> int:
        return next(x["inflight"] for x in cluster(g)["workers"] if x["id"] == w.id)

    with ThreadPoolExecutor(3) as pool:  # 3 requests of 3 s, all through gateway a
        pending = [pool.submit(chat, client, 30) for _ in range(3)]
        wait_for(lambda: inflight_seen_by(b) == 3, 5, 0.05, "b to count a's requests")
        assert metric(b.url, "corral_inflight", worker=w.id) == 0  # none of them are b's own
        assert [f.result(timeout=30)[0] for f in pending] == [w.id] * 3
    wait_for(lambda: inflight_seen_by(b) == 0, 5, 0.05, "b to see them finish")


def test_unreachable_redis_degrades_to_local_counts(worker_factory, gateway_factory) -> None:
    w = sim(worker_factory)
    g = gateway_factory("--worker", w.url, "--redis-url", f"redis://{HOST}:{free_port()}/0")
    wait_state(g, w.id, "ready")
    assert chat(client_for(g.url))[0] == w.id
    wait_for(lambda: "shared state unreachable" in g.proc.log(), 5, 0.05, "a warning")
