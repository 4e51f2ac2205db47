"""A worker's states as clients see them: loading (503 `model_loading`), idle, ready.

Loading is observed in two natural windows, no test hook: a worker started on the real
model, polled from the moment it listens (its load and calibration take seconds; the
socket is open within the first one), and a worker placed through the control API whose
model download the test itself holds open (deterministic: it lasts until released).
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, chat
from openai_schema import errors as spec_errors
from procs import HOST, Worker, metric, wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")

V1 = (("GET", "/v1/models", None),
      ("POST", "/v1/chat/completions", {"model": MODEL, "messages": chat("hi"), "max_tokens": 2}),
      ("POST", "/v1/completions", {"model": MODEL, "prompt": "The sky", "max_tokens": 2}))


def _state(w: Worker) -> str:
    return httpx.get(f"{w.url}/status", timeout=5).json()["state"]


def _v1(w: Worker) -> list[httpx.Response]:
    return [httpx.request(m, f"{w.url}{p}", json=body, timeout=30) for m, p, body in V1]


def _assert_loading(responses: list[httpx.Response]) -> None:
    for r in responses:
        assert r.status_code == 503, (r.request.url, r.status_code, r.text)
        assert r.json()["error"]["code"] == "model_loading"
        assert int(r.headers["retry-after"]) >= 1
        assert not spec_errors(r.json(), "ErrorResponse")


def test_a_loading_worker_answers_503_model_loading_until_it_serves(worker_factory) -> None:
    w = worker_factory("--parallel", "1", "--threads", "2", wait=False)
    seen: list[int] = []  # /v1/models statuses, from the first answer to the first 200
    full_loading_rounds = 0

    def served() -> bool:
        nonlocal full_loading_rounds
        if not w.proc.alive():
            raise RuntimeError(f"the worker exited:\n{w.proc.log()[-3000:]}")
        before = _state(w)
        v1 = _v1(w)
        health = httpx.get(f"{w.url}/healthz", timeout=5)
        after = _state(w)
        seen.append(v1[0].status_code)
        if before == after == "loading":  # every call in between saw the loading worker
            _assert_loading(v1)
            assert health.status_code == 200
            full_loading_rounds += 1
        assert v1[0].status_code in (200, 503), v1[0].text
        if v1[0].status_code == 200:
            assert v1[0].json()["data"], "200 with an empty model list while loading"
        return v1[0].status_code == 200

    wait_for(served, 240, 0.02, "the worker to serve")
    assert full_loading_rounds >= 1, f"the loading window was never observed: {seen}"
    assert set(seen[:-1]) == {503}  # never a 200 before the model is there
    models = httpx.get(f"{w.url}/v1/models").json()
    assert models["data"][0]["id"] == MODEL and _state(w) == "ready"


class _HeldFile(http.server.ThreadingHTTPServer):
    """Stands in for the gateway a worker joins: accepts its joins and serves it one model
    file, but only once `release` is set, so the download lasts as long as the test wants.
    (A real gateway's placer would undo a placement made by hand.)"""

    daemon_threads = True

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked = threading.Event()
        self.release = threading.Event()
        super().__init__((HOST, 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HeldFile

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.server.asked.set()
        if not self.server.release.wait(120):
            return  # the test gave up: drop the connection
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.data)))
        self.end_headers()
        self.wfile.write(self.server.data)

    def do_POST(self) -> None:  # noqa: N802 - a join: welcome
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._empty(201)

    def do_DELETE(self) -> None:  # noqa: N802 - a leave
        self._empty(200)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def held_model() -> Iterator[_HeldFile]:
    from worker.models import resolve

    srv = _HeldFile(resolve(MODEL)[1].read_bytes())
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def test_an_unplaced_worker_is_idle_then_loading_while_its_model_arrives(
        worker_factory, held_model: _HeldFile, tmp_path: Path) -> None:
    gateway = f"http://{HOST}:{held_model.server_address[1]}"
    w = worker_factory("--join", gateway, "--parallel", "1", "--threads", "2", wait=False,
                       env={"CORRAL_CACHE_DIR": str(tmp_path)})
    w.proc.wait_http(f"{w.url}/status")

    # Idle: no model by design. An honest empty list, not "loading"; a completion is a 503
    # `no_model` (a gateway routing here on a stale view retries elsewhere), not loading.
    st = httpx.get(f"{w.url}/status").json()
    assert st["state"] == "idle" and st["models"] == []
    r = httpx.get(f"{w.url}/v1/models")
    assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
    assert not spec_errors(r.json(), "ListModelsResponse")
    r = httpx.post(f"{w.url}/v1/chat/completions", json=V1[1][2])
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_model"
    assert "retry-after" not in r.headers and not spec_errors(r.json(), "ErrorResponse")
    assert httpx.get(f"{w.url}/healthz").status_code == 200

    # Placed as a replica of a model it must download: loading until the bytes arrive.
    name = "held-model"
    place = {"role": "replica", "model": name, "model_url": f"{gateway}/model.gguf",
             "size": len(held_model.data), "sha256": hashlib.sha256(held_model.data).hexdigest()}
    assert httpx.post(f"{w.url}/control/placement", json=place).status_code == 200
    assert held_model.asked.wait(30), "the worker never asked for the model"
    st = httpx.get(f"{w.url}/status").json()
    assert st["state"] == "loading" and st["placement"]["state"] == "fetching"
    _assert_loading(_v1(w))
    assert httpx.get(f"{w.url}/healthz").status_code == 200
    assert metric(w.url, "corral_worker_slots_busy") == 0  # /metrics answers too

    held_model.release.set()
    wait_for(lambda: _state(w) == "ready", 240, 0.1, "the placed model to serve")
    models = httpx.get(f"{w.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [name]


def test_the_gateway_keeps_an_idle_worker_placeable_unroutable_and_up(
        worker_factory, gateway_factory) -> None:
    g = gateway_factory()
    # Joined without --model, and too small for any model: it stays idle.
    w = worker_factory("--join", g.url, "--memory-limit", str(1 << 20), "--parallel", "1",
                       wait=False, env={"CORRAL_CLUSTER_TOKEN": g.token})

    def entry() -> dict | None:
        ws = httpx.get(f"{g.url}/cluster", timeout=5).json()["workers"]
        return next((x for x in ws if x["id"] == w.id), None)

    wait_for(lambda: (e := entry()) is not None and e["state"] == "idle", 60, 0.1,
             "the gateway to list the worker as idle")
    e = entry()
    assert e["models"] == [] and e["placement"]["managed"] is True  # the placer's to place
    assert httpx.get(f"{g.url}/readyz").status_code == 503  # nothing routable
    assert metric(g.url, "corral_worker_up", worker=w.id) == 0
    # /v1/models lists the catalogue (issue 17), loaded or not: nothing is loaded anywhere.
    listed = httpx.get(f"{g.url}/v1/models").json()["data"]
    assert all(not m.get("loaded_on") and m.get("state") != "loaded" for m in listed), listed
