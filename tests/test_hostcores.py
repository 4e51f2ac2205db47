"""Workers on one host share its cores (worker/hostcores.py); the gateway warns when a host
is oversubscribed anyway (gateway/hostload.py).

Real llama workers on the bundled model, each test on a host id of its own so that other
workers on this box (other tests, other suites) are not counted.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from procs import wait_for

from gateway.hostload import HostWatch, oversubscribed
from worker.hostcores import HostCores, Peer, default_root, fair_share, usable_cpus

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed")
LIGHT = ("--parallel", "1", "--ctx-size", "512")


@pytest.fixture
def host() -> Iterator[str]:
    """A host id of the test's own; afterwards the files a SIGKILLed last worker left.
    Name it first: fixtures end in reverse order, so this ends after the workers."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    shutil.rmtree(default_root() / name, ignore_errors=True)


def _hw(w) -> dict:
    return httpx.get(f"{w.url}/status", timeout=5).json()["hardware"]


def _threads(ws) -> list[int]:
    return [_hw(w)["threads"] for w in ws]


# --------------------------------------------------------------------------- the arithmetic


def test_fair_share_splits_what_explicit_workers_leave() -> None:
    peers = [Peer("a"), Peer("b"), Peer("c")]
    assert [fair_share(p.name, peers, 8) for p in peers] == [3, 3, 2]  # sums to 8
    assert [fair_share(p.name, peers, 2) for p in peers] == [1, 1, 1]  # never below 1
    fixed = [Peer("a"), Peer("x", threads=5), Peer("b", active=False)]
    assert fair_share("a", fixed, 8) == 3  # x keeps 5; idle b takes none
    assert fair_share("b", fixed, 8) == 1  # b, asking as it starts: 3 split with a, a first


def test_a_dead_workers_file_is_not_counted_and_is_removed(tmp_path: Path) -> None:
    a = HostCores("h", "a", None, cpus=4, root=tmp_path)
    b = HostCores("h", "b", None, cpus=4, root=tmp_path)
    fixed = HostCores("h", "c", 3, cpus=4, root=tmp_path)
    for h in (a, b, fixed):
        h.open()
    try:
        assert (a.refresh(), b.refresh(), fixed.refresh()) == (1, 1, 3)
        # A crash: the process is gone, so is its lock, but its file stays behind.
        assert fixed._fd is not None
        os.close(fixed._fd)
        fixed._fd = None
        assert (a.refresh(), b.refresh()) == (2, 2)
        assert not (tmp_path / "h" / fixed.name).exists()
        # A backend that cannot re-size (OpenVINO) publishes what it loaded with.
        b.pin(3)
        b.refresh()
        assert a.refresh() == 1
        b.pin(None)
        b.refresh()
        assert a.refresh() == 2
        # Another crash, this time of the next to last: the last one out still cleans up.
        os.close(a._fd)
        a._fd = None
    finally:
        for h in (a, b, fixed):
            h.close()
    assert not (tmp_path / "h").exists()  # the last one out removes the directory


def test_oversubscribed_hosts_are_named_once_settled() -> None:
    def worker(wid: str, host: str, threads: int, explicit: bool = False,
               state: str = "ready") -> SimpleNamespace:
        hw = {"host_id": host, "hostname": "box", "cpus": 2, "cores": 2, "threads": threads,
              "threads_explicit": explicit}
        return SimpleNamespace(id=wid, state=state, status={"backend": "llama", "hardware": hw})

    ok = [worker("a", "h1", 1), worker("b", "h1", 1), worker("c", "h2", 2)]
    assert oversubscribed(ok) == []
    bad = [*ok, worker("d", "h2", 4, explicit=True), worker("e", "h1", 2, state="down")]
    (w,) = oversubscribed(bad)
    assert (w["host"], w["cpus"], w["threads"], w["workers"]) == ("h2", 2, 6, ["c", "d"])
    assert "d 4 (--threads)" in w["message"] and "h2" in w["message"]
    watch = HostWatch(SimpleNamespace(workers={x.id: x for x in bad}), 0.5, settle=3)
    assert watch.check(now=100.0) == []  # a re-share in progress looks like this too
    assert [x["host"] for x in watch.check(now=103.0)] == ["h2"]


# --------------------------------------------------------------------------- real workers


@needs_llama
def test_workers_on_one_host_share_its_cores_and_grow_back(host, worker_factory) -> None:
    cpus = usable_cpus()
    if cpus < 2:
        pytest.skip("sharing needs at least 2 CPUs")
    n = min(3, cpus)
    ws = [worker_factory("--host-id", host, *LIGHT, wait=False) for _ in range(n)]
    for w in ws:
        w.wait_ready()

    def settled(group: list, live: int) -> bool:
        hws = [_hw(w) for w in group]
        return all(h["host_workers"] == live for h in hws) and sum(
            h["threads"] for h in hws) <= cpus

    wait_for(lambda: settled(ws, n), 30, 0.2, "the workers to share the host")
    hws = [_hw(w) for w in ws]
    assert {h["host_id"] for h in hws} == {host}
    assert not any(h["threads_explicit"] for h in hws)
    threads = [h["threads"] for h in hws]
    assert min(threads) >= 1 and sum(threads) <= cpus, threads
    assert max(threads) - min(threads) <= 1, threads  # fair: equal up to the remainder

    ws[-1].proc.kill()  # SIGKILL: no goodbye, only its lock vanishing
    survivors = ws[:-1]
    wait_for(lambda: settled(survivors, n - 1) and sum(_threads(survivors)) == cpus, 30,
             0.2, "the survivors to grow back")
    after = _threads(survivors)
    assert max(after) - min(after) <= 1 and min(after) >= min(threads), after
    # They still answer, on their new thread counts.
    r = httpx.post(f"{survivors[0].url}/v1/completions", timeout=60,
                   json={"model": "smollm2-135m", "prompt": "1, 2, 3,", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@needs_llama
def test_explicit_threads_are_kept_and_the_gateway_warns(host, worker_factory,
                                                         gateway_factory) -> None:
    cpus = usable_cpus()
    fixed = worker_factory("--host-id", host, "--threads", str(cpus + 1), *LIGHT, wait=False)
    shared = worker_factory("--host-id", host, *LIGHT, wait=False)
    fixed.wait_ready()
    shared.wait_ready()
    wait_for(lambda: _hw(shared)["host_workers"] == 2 and _hw(shared)["threads"] == 1, 30,
             0.2, "the shared worker to leave the fixed one its threads")
    hw = _hw(fixed)
    assert (hw["threads"], hw["threads_explicit"], hw["host_id"]) == (cpus + 1, True, host)

    g = gateway_factory("--worker", fixed.url, "--worker", shared.url)
    cluster: list[dict] = []

    def warned() -> bool:
        cluster[:] = [httpx.get(f"{g.url}/cluster", timeout=5).json()]
        return bool(cluster[0]["warnings"])

    wait_for(warned, 30, 0.2, "the oversubscription warning")
    (w,) = cluster[0]["warnings"]
    assert (w["kind"], w["host"], w["cpus"], w["threads"]) == ("oversubscribed", host,
                                                               cpus, cpus + 2)
    assert sorted(w["workers"]) == sorted([fixed.id, shared.id])
    assert host in w["message"] and f"{fixed.id} {cpus + 1} (--threads)" in w["message"]
    # Over several probes: the warning stays, the explicit figure stays, one log line.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert httpx.get(f"{g.url}/cluster", timeout=5).json()["warnings"]
        assert _hw(fixed)["threads"] == cpus + 1
        time.sleep(0.25)
    assert g.proc.log().count("is oversubscribed") == 1, g.proc.log()[-3000:]

    fixed.proc.kill()
    wait_for(lambda: not httpx.get(f"{g.url}/cluster", timeout=5).json()["warnings"], 30,
             0.2, "the warning to clear")
    wait_for(lambda: _hw(shared)["threads"] == cpus, 30, 0.2, "the shared worker to grow")
    wait_for(lambda: "no longer oversubscribed" in g.proc.log(), 10, 0.2, "the all-clear")


@needs_llama
def test_the_dashboard_shows_a_host_warning(host, browser,
                                            worker_factory, gateway_factory) -> None:
    cpus = usable_cpus()
    w = worker_factory("--host-id", host, "--threads", str(cpus + 1), *LIGHT, wait=False)
    g = gateway_factory("--worker", w.url)  # while the worker loads
    w.wait_ready()
    browser.get(f"{g.url}/")

    def banner() -> str:
        box = browser.find_element("id", "warnings")
        return box.text if box.is_displayed() else ""

    wait_for(lambda: host in banner(), 30, 0.2, "the warning banner")
    assert "oversubscribed" in banner() and f"{cpus + 1} threads over {cpus} CPUs" in banner()
    w.proc.kill()
    wait_for(lambda: banner() == "", 30, 0.2, "the banner to go")
