"""A placed worker holding several models: each its own engine, so one model's failed load
leaves the others serving, and an unload drains and frees only that model (real worker,
real SmolLM2; the control API driven by hand, as the gateway's placer drives it)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, client_for
from procs import Worker, start_worker, wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def placed() -> Iterator[Worker]:
    # --join makes it a placed worker (nothing loaded until told); no gateway answers there.
    w = start_worker("--join", "http://127.0.0.1:9", "--parallel", "2", wait=False)
    try:
        w.proc.wait_http(f"{w.url}/status", ok=lambda r: r.json()["state"] == "idle")
        yield w
    finally:
        w.proc.stop()


def _per_model(w: Worker) -> dict[str, dict]:
    st = httpx.get(f"{w.url}/status", timeout=5).json()
    return {m["name"]: m for m in st["per_model"]}


def test_a_failed_load_leaves_the_other_model_serving(placed: Worker, tmp_path: Path) -> None:
    w = placed
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing behind it
    assert httpx.post(f"{w.url}/control/models", json={"model": MODEL}).status_code == 200
    wait_for(lambda: _per_model(w)[MODEL]["state"] == "ready", 240, 0.2, "SmolLM2 ready")
    r = httpx.post(f"{w.url}/control/models", json={"model": "junk", "path": str(junk)})
    assert r.status_code == 200
    wait_for(lambda: _per_model(w)["junk"]["state"] == "failed", 60, 0.1, "junk failed")
    st = httpx.get(f"{w.url}/status", timeout=5).json()
    assert st["state"] == "ready" and st["models"] == [MODEL]
    assert _per_model(w)["junk"]["error"]  # says why
    reply = client_for(w.url).chat.completions.create(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Say hi."}])
    assert reply.choices[0].message.content
    r = httpx.post(f"{w.url}/v1/chat/completions", timeout=10, json={
        "model": "junk", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"


def test_unloading_one_model_frees_only_it(placed: Worker) -> None:
    w = placed
    assert httpx.delete(f"{w.url}/control/models/junk").status_code == 200
    wait_for(lambda: "junk" not in _per_model(w), 60, 0.1, "junk gone")
    assert _per_model(w)[MODEL]["state"] == "ready"
    assert httpx.delete(f"{w.url}/control/models/{MODEL}").status_code == 200
    wait_for(lambda: _per_model(w) == {}, 60, 0.1, "SmolLM2 unloaded")
    st = httpx.get(f"{w.url}/status", timeout=5).json()
    assert st["state"] == "idle" and st["memory"]["model_bytes"] == 0
    r = httpx.delete(f"{w.url}/control/models/{MODEL}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
