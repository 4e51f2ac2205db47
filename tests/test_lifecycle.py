"""Boxes people also use: drain (the CLI, a deadline, SIGTERM), sleep when idle, wake on
demand (gateway/lifecycle.py, worker/lifecycle.py).

Sim workers where the gateway's timing is what is tested; a real llama worker for SIGTERM.
The magic packet is caught by a UDP listener on loopback broadcast here; test_lab_wake.py
catches it on the LAN lab's bridge.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODEL, all_ready, client_for
from procs import Worker, free_port, metric, start_worker, wait_for

HEADER = "x-corral-worker"
TOKEN = "test-cluster-token"
ASK = [{"role": "user", "content": "Tell me about horses."}]


@dataclass
class Done:
    worker: str
    finish: str | None
    completion_tokens: int
    text: str


def stream(client: openai.OpenAI, max_tokens: int) -> Done:
    """One streamed chat completion through the official SDK, read to its end."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True})
    worker = raw.headers[HEADER]
    finish, usage, text = None, 0, []
    for chunk in raw.parse():
        for ch in chunk.choices:
            text.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return Done(worker, finish, usage, "".join(text))


def sim(factory, *extra: str, rate: float = 20) -> Worker:
    """A sim worker, started but not waited for: `ready_gateway` waits for them together."""
    return factory("--sim-tokens-per-second", str(rate), "--parallel", "4", "--sim-ttft",
                   "0.01", *extra, backend="sim", wait=False)


def cluster(url: str) -> dict:
    return httpx.get(f"{url}/cluster", timeout=5).json()


def state_of(url: str, wid: str) -> str | None:
    return next((w["state"] for w in cluster(url)["workers"] if w["id"] == wid), None)


def ready_gateway(gateway_factory, *workers: Worker, extra: tuple[str, ...] = ()):
    all_ready(*workers)
    g = gateway_factory(*extra, *(a for w in workers for a in ("--worker", w.url)))
    wait_for(lambda: all(state_of(g.url, w.id) in ("ready", "busy") for w in workers),
             30, 0.05, "every worker ready at the gateway")
    return g


def corral_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], capture_output=True,
                          text=True, timeout=90, env={**os.environ,
                                                      "CORRAL_CLUSTER_TOKEN": TOKEN})


def busy(w: Worker) -> int:
    return httpx.get(f"{w.url}/status", timeout=5).json()["slots_busy"]


@pytest.mark.timeout(180)
def test_drain_under_load_loses_nothing_and_leaves_when_empty(worker_factory,
                                                              gateway_factory) -> None:
    w1, w2 = sim(worker_factory), sim(worker_factory)
    g = ready_gateway(gateway_factory, w1, w2)
    client = client_for(g.url)
    pool = ThreadPoolExecutor(12)
    first = [pool.submit(stream, client, 60) for _ in range(6)]  # ~3 s each at 20 tok/s
    wait_for(lambda: busy(w1) > 0 and busy(w2) > 0, 30, 0.02, "requests on both workers")
    out: dict[str, subprocess.CompletedProcess] = {}
    cli = threading.Thread(target=lambda: out.setdefault("drain", corral_cli(
        "drain", w1.id, "--gateway", g.url, "--wait", "--timeout", "60")))
    cli.start()
    wait_for(lambda: state_of(g.url, w1.id) == "draining", 10, 0.02, "w1 draining")
    shown = corral_cli("status", "--gateway", g.url).stdout
    assert "draining" in shown, shown
    later = [pool.submit(stream, client, 20) for _ in range(4)]  # sent while it drains
    results = [f.result(timeout=60) for f in first + later]
    cli.join(90)
    drained = out["drain"]
    assert drained.returncode == 0, drained.stderr
    assert f"{w1.id}: left" in drained.stdout
    for r in results:  # every request whole: none lost, none cut short
        assert r.finish == "length" and r.completion_tokens in (60, 20), r
    assert any(r.worker == w1.id for r in results[:6]), "w1 held part of the load"
    assert all(r.worker == w2.id for r in results[6:]), [r.worker for r in results[6:]]
    assert metric(g.url, "corral_retries_total", reason="midstream") == 0  # none moved
    wait_for(lambda: not w1.proc.alive(), 30, 0.05, "the drained worker exits")
    log = w1.proc.log()
    assert "drained (empty)" in log, log[-2000:]
    assert w1.id not in {w["id"] for w in cluster(g.url)["workers"]}
    assert metric(g.url, "corral_worker_drains_total", reason="api") == 1


@pytest.mark.timeout(180)
def test_drain_deadline_continues_the_rest_elsewhere(worker_factory, gateway_factory) -> None:
    w1, w2 = sim(worker_factory, rate=20), sim(worker_factory, rate=20)
    g = ready_gateway(gateway_factory, w1, w2)
    client = client_for(g.url)
    pool = ThreadPoolExecutor(6)
    futs = [pool.submit(stream, client, 100) for _ in range(4)]  # ~5 s each: past the 1 s
    wait_for(lambda: busy(w1) > 0, 30, 0.02, "requests on w1")
    r = httpx.post(f"{g.url}/cluster/workers/{w1.id}/drain", json={"deadline": 1.0},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    results = [f.result(timeout=90) for f in futs]
    for res in results:
        assert res.finish == "length", res
    assert metric(g.url, "corral_retries_total", reason="midstream") >= 1
    wait_for(lambda: not w1.proc.alive(), 30, 0.05, "the drained worker exits")


@pytest.mark.timeout(60)
def test_drain_refusals_are_openai_shaped(worker_factory, gateway_factory) -> None:
    w = sim(worker_factory)
    g = ready_gateway(gateway_factory, w)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{g.url}/cluster/workers/{w.id}/drain", json={}, timeout=5)
    assert r.status_code == 401
    r = httpx.post(f"{g.url}/cluster/workers/nobody:1/drain", json={}, headers=auth, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["param"] == "id"
    r = httpx.post(f"{g.url}/cluster/workers/{w.id}/drain", json={"then": "nap"},
                   headers=auth, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "then", r.text
    r = httpx.post(f"{g.url}/cluster/workers/{w.id}/drain", json={"then": "sleep"},
                   headers=auth, timeout=5)  # no --sleep-command
    assert r.status_code == 400 and "sleep-command" in r.json()["error"]["message"]
    assert state_of(g.url, w.id) == "ready"


def magic(mac: str) -> bytes:
    return b"\xff" * 6 + bytes.fromhex(mac.replace(":", "")) * 16


@pytest.mark.timeout(180)
def test_idle_box_sleeps_then_wakes_on_demand(tmp_path: Path, gateway_factory) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("", 0))
    wol_port = listener.getsockname()[1]
    conf = tmp_path / "corral.toml"
    conf.write_text("[gateway]\nidle_sleep_after = 1.5\nwake_after = 0.3\n"
                    "wake_deadline = 60\n")
    g = gateway_factory("--config", str(conf))
    slept = tmp_path / "slept"
    mac = "02:00:5e:10:00:01"
    port = free_port()
    args = ("--join", g.url, "--cluster-token", TOKEN, "--id", "sleepy",
            "--sim-tokens-per-second", "200", "--sleep-command", f"touch {slept}",
            "--wake-mac", mac, "--wake-broadcast", "127.255.255.255",
            "--wake-port", str(wol_port))
    box = start_worker(*args, port=port, backend="sim")
    woken: Worker | None = None
    try:
        wait_for(lambda: state_of(g.url, "sleepy") == "asleep", 60, 0.05, "the idle box asleep")
        assert slept.exists(), "the sleep command ran"
        log = box.proc.log()
        assert log.index("serving -> draining") < log.index("draining -> asleep"), log[-2000:]
        assert metric(g.url, "corral_worker_sleeps_total") == 1
        assert metric(g.url, "corral_worker_state", worker="sleepy", state="asleep") == 1
        box.proc.kill()  # the box is suspended: silent, gone from the network
        client = client_for(g.url, timeout=90)
        pool = ThreadPoolExecutor(1)
        held = pool.submit(client.chat.completions.with_raw_response.create,
                           model=MODEL, messages=ASK, max_tokens=8)
        listener.settimeout(30)
        while True:  # other tests' stray packets are not ours
            data, _ = listener.recvfrom(1024)
            if data == magic(mac):
                break
        assert not held.done(), "the request is held while the box wakes"
        assert state_of(g.url, "sleepy") == "asleep"  # not down
        woken = start_worker(*args, port=port, backend="sim")  # it boots and rejoins
        raw = held.result(timeout=60)
        assert raw.headers[HEADER] == "sleepy"
        assert raw.parse().choices[0].message.content
        assert metric(g.url, "corral_worker_wakes_total", result="sent") == 1
        assert metric(g.url, "corral_worker_wakes_total", result="rejoined") == 1
    finally:
        listener.close()
        box.proc.stop()
        if woken is not None:
            woken.proc.stop()


@pytest.mark.timeout(300)
def test_sigterm_drains_a_real_worker(gateway_factory) -> None:
    w = start_worker("--parallel", "2", "--threads", "2", "--drain-timeout", "12")
    try:
        g = ready_gateway(gateway_factory, w)
        client = client_for(g.url, timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 300."}],
            max_tokens=16, stream=True, stream_options={"include_usage": True})
        chunks = iter(raw.parse())
        first = next(chunks)  # it is generating
        os.killpg(w.proc.pid, 15)  # SIGTERM
        finish, usage = first.choices[0].finish_reason if first.choices else None, None
        try:
            for chunk in chunks:
                for ch in chunk.choices:
                    finish = ch.finish_reason or finish
                usage = chunk.usage or usage
        except openai.APIError as exc:  # cut: the worker's log says whether by the deadline
            raise AssertionError(f"{exc}\n{w.proc.log()[-2000:]}") from None
        assert finish in ("length", "stop") and usage is not None, (finish, usage)
        wait_for(lambda: not w.proc.alive(), 20, 0.05, "the worker exits after draining")
        log = w.proc.log()
        assert "SIGTERM: draining" in log and "drained (empty)" in log, log[-3000:]
        glog = g.proc.log()
        assert f"worker {w.id}: ready -> draining" in glog or \
            f"worker {w.id}: busy -> draining" in glog, glog[-3000:]
        assert metric(g.url, "corral_retries_total", reason="midstream") == 0
    finally:
        w.proc.stop()



@pytest.mark.timeout(90)
def test_a_failed_sleep_command_leaves_the_box_serving(tmp_path: Path, gateway_factory) -> None:
    conf = tmp_path / "corral.toml"
    conf.write_text("[gateway]\nidle_sleep_after = 1.5\n")
    g = gateway_factory("--config", str(conf))
    box = start_worker("--join", g.url, "--cluster-token", TOKEN, "--id", "insomniac",
                       "--sleep-command", "exit 3", "--wake-mac", "02:00:5e:10:00:02",
                       backend="sim")
    try:
        wait_for(lambda: "sleep command exited with 3" in box.proc.log(), 60, 0.05,
                 "the sleep command to fail")
        wait_for(lambda: state_of(g.url, "insomniac") == "ready", 10, 0.02,
                 "the box serving again at the gateway")
        assert "draining -> ready" in g.proc.log()
        assert metric(g.url, "corral_worker_sleeps_total") == 0
    finally:
        box.proc.stop()
