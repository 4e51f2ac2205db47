"""The gateway's own OpenAPI, fuzzed with schemathesis against a live gateway process with
sim workers: no input gets a 5xx. Also: a slowloris client is cut off without holding up
anyone else, and an oversized body gets an OpenAI-shaped 413, not a 500.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import schemathesis
from conftest import MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from procs import HOST, Gateway, Worker, start_gateway, start_worker, stop_all, wait_for

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    cfg = Path(tmp_path_factory.mktemp("fuzz")) / "corral.toml"
    cfg.write_text(f"[gateway]\nmax_body_bytes = {LIMIT}\nhead_timeout = 1.0\n"
                   "body_timeout = 2.0\n")
    workers: list[Worker] = []
    g: Gateway | None = None
    try:
        for _ in range(2):  # started together, then waited for
            workers.append(start_worker("--sim-tokens-per-second", "20000", "--parallel", "8",
                                        "--sim-ttft", "0", backend="sim", wait=False))
        for w in workers:
            w.wait_ready()
        g = start_gateway("--config", str(cfg), *[a for w in workers for a in ("--worker", w.url)])
        wait_for(lambda: httpx.get(f"{g.url}/readyz").status_code == 200, 30, 0.05, "ready")
        yield g
    finally:  # the workers first, while the gateway still probes them (procs.stop_all)
        stop_all(w.proc for w in workers)
        if g is not None:
            g.proc.stop()


def test_openapi_describes_the_request_bodies(live: Gateway) -> None:
    doc = httpx.get(f"{live.url}/openapi.json").json()
    for path, field in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert field in body["schema"]["properties"]
        assert field in body["schema"]["required"]
    assert "ChatMessage" in doc["components"]["schemas"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_gets_a_5xx(live: Gateway, mode: str) -> None:
    """Every operation, with schema-valid (positive) and schema-breaking (negative) input."""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    gen = (schemathesis.GenerationMode.POSITIVE if mode == "positive"
           else schemathesis.GenerationMode.NEGATIVE)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in ops)
    sent: collections.Counter[str] = collections.Counter()
    for op in ops:

        @given(case=op.as_strategy(generation_mode=gen))
        @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=live.url, timeout=30)
            sent[case.path] += 1
            assert response.status_code < 500, (case.method, case.path, case.body,
                                                response.status_code, response.text[:500])
            if response.status_code >= 400 and case.path.startswith("/v1/"):
                err = response.json()["error"]
                assert {"message", "type", "param", "code"} <= set(err)

        try:
            run()
        except Unsatisfiable:  # no parameters or body to break (negative mode)
            assert mode == "negative"
    assert sent["/v1/chat/completions"] >= 10 and sent["/v1/completions"] >= 10, sent


# --------------------------------------------------------------------------- slow and big


def _chat_ok(g: Gateway) -> float:
    t = time.monotonic()
    r = httpx.post(f"{g.url}/v1/chat/completions", timeout=10,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 4})
    assert r.status_code == 200, r.text
    return time.monotonic() - t


def _closed_within(s: socket.socket, seconds: float) -> bytes:
    """Reads until the server closes the socket; fails if that takes too long."""
    s.settimeout(seconds)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return got
        if not data:
            return got
        got += data
    raise AssertionError(f"the server kept the connection open; got {got[:200]!r}")


def test_slow_headers_are_cut_off_and_block_nobody(live: Gateway) -> None:
    slow = [socket.create_connection((HOST, live.port)) for _ in range(20)]
    try:
        for s in slow:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # Others are served while the slow clients dribble.
        for _ in range(3):
            for s in slow:
                s.sendall(b"a")
            assert _chat_ok(live) < 5
        started = time.monotonic()
        for s in slow:
            assert b"200 OK" not in _closed_within(s, 5)
        assert time.monotonic() - started < 5
    finally:
        for s in slow:
            s.close()


def test_slow_body_gets_a_408(live: Gateway) -> None:
    with socket.create_connection((HOST, live.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
        assert _chat_ok(live) < 5
        got = _closed_within(s, 8)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), got[:300]
    assert orjson.loads(body)["error"]["code"] == "request_timeout"


def test_oversized_body_gets_an_openai_shaped_413(live: Gateway) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=big, timeout=10)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert r.json()["error"]["type"] == "invalid_request_error"

    # Without a content-length (chunked), the bound holds too.
    def chunks() -> Iterator[bytes]:
        raw = orjson.dumps(big)
        for i in range(0, len(raw), 8192):
            yield raw[i:i + 8192]

    r = httpx.post(f"{live.url}/v1/chat/completions", content=chunks(), timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    # A body just under the bound is fine.
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
          "metadata": {"pad": "x" * (LIMIT - 300)}}
    assert httpx.post(f"{live.url}/v1/chat/completions", json=ok, timeout=10).status_code == 200
