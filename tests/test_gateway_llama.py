"""The gateway with the real model: `corral up` end to end, and a gateway in front of the
session's llama.cpp worker. Also `corral up` with sim workers, for clean startup/shutdown.
"""

from __future__ import annotations

import importlib.util
import re
import signal
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest
from conftest import MODEL, client_for
from procs import Gateway, Proc, corral, free_port, start_gateway, wait_for

HEADER = "x-corral-worker"
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed")


def _up(*args: str, timeout: float = 300) -> tuple[Proc, str]:
    port = free_port()
    proc = corral("up", "--port", str(port), *args, name="up")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: f"{url}/v1" in proc.log() or not proc.alive(), timeout, 0.1,
                 "corral up to print its base URL")
        assert proc.alive(), proc.log()[-4000:]
    except BaseException:
        _stop_and_check_no_orphans(proc, check=False)
        raise
    return proc, url


def _stop_and_check_no_orphans(proc: Proc, check: bool = True) -> None:
    """SIGTERM to `corral up` alone: it must stop its children (each in its own group)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    assert children or not check, "corral up started no children?"
    if proc.alive():
        proc.popen.send_signal(signal.SIGTERM)
        proc.popen.wait(30)
    gone, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:  # never leave them behind, even when the check fails
        p.kill()
    assert not alive or not check, f"orphans left behind: {alive}"


def test_up_with_sim_workers_starts_and_stops_cleanly() -> None:
    proc, url = _up("--workers", "2", "--backend", "sim", "--sim-tokens-per-second", "200",
                    timeout=60)
    try:
        log = proc.log()
        assert re.search(r"OpenAI base URL\s+http://127\.0\.0\.1:\d+/v1", log)
        assert f"{url}/metrics" in log
        workers = httpx.get(f"{url}/cluster").json()["workers"]
        assert len(workers) == 2 and {w["state"] for w in workers} <= {"ready", "busy"}
        assert all(w["hardware"]["threads"] >= 1 for w in workers)
        client = client_for(url)
        seen = set()
        for _ in range(12):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            seen.add(raw.headers[HEADER])
        assert seen <= {w["id"] for w in workers} and len(seen) == 2
        _stop_and_check_no_orphans(proc)
    finally:
        proc.stop()


@needs_llama
@pytest.mark.timeout(400)
def test_up_end_to_end_with_the_real_model() -> None:
    proc, url = _up("--workers", "2", "--parallel", "1", "--ctx-size", "1024", timeout=240)
    try:
        workers = httpx.get(f"{url}/cluster").json()["workers"]
        ids = {w["id"] for w in workers}
        assert len(ids) == 2 and all(w["backend"] == "llama" for w in workers)
        client = client_for(url, timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        assert raw.headers[HEADER] in ids
        resp = raw.parse()
        assert resp.choices[0].message.content.strip()
        assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0

        parts = []
        usage = None
        for c in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True}):
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
            if c.usage:
                usage = c.usage
        assert "".join(parts).strip()
        assert usage is not None and 0 < usage.completion_tokens <= 16
        _stop_and_check_no_orphans(proc)
    finally:
        proc.stop()


@pytest.fixture
def llama_gateway(llama_worker) -> Iterator[Gateway]:
    g = start_gateway("--worker", llama_worker.url)
    try:
        wait_for(lambda: httpx.get(f"{g.url}/readyz").status_code == 200, 60, 0.1, "ready")
        yield g
    finally:
        g.proc.stop()


@needs_llama
def test_gateway_relays_the_real_worker_faithfully(llama_gateway, llama_worker) -> None:
    direct = client_for(llama_worker.url, timeout=120)
    via = client_for(llama_gateway.url, timeout=120)
    msgs = [{"role": "user", "content": "Name three colours."}]
    a = direct.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24,
                                       temperature=0, seed=1)
    raw = via.chat.completions.with_raw_response.create(model=MODEL, messages=msgs,
                                                        max_tokens=24, temperature=0, seed=1)
    b = raw.parse()
    assert raw.headers[HEADER] == llama_worker.id
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.completion_tokens == a.usage.completion_tokens

    # Streaming via the gateway gives the same text, and usage only when asked for.
    chunks = list(via.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24,
                                              temperature=0, seed=1, stream=True))
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == a.choices[0].message.content

    comp = via.completions.create(model=MODEL, prompt="The sky is", max_tokens=8,
                                  temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens <= 8

    # The worker's own 400 (context too long) comes through as is, without retries.
    with pytest.raises(openai.BadRequestError) as e:
        via.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
