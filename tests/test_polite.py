"""Polite mode (worker/polite.py): exactly one `--polite` sim worker beside a plain one; a
hog we start outside Corral (and stop by PID) makes the gateway route around it, and it
comes back once the hog is gone. Bounded waits only; no timing assertions.

The CPU hog needs a box others leave mostly idle (the polite worker counts every other
process, as it should): on a saturated box it skips, saying so. The memory hog runs on
any box with a few GiB free.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from conftest import MODEL, client_for
from procs import Gateway, Worker, wait_for

from worker.config import WorkerConfig
from worker.polite import Polite

HEADER = "x-corral-worker"
HOG_CPU = "while True: pass"
HOG_MEMORY = ("import signal,sys; n=int(sys.argv[1]); b=bytearray(n); b[::4096]=b'\\1'*"
              "len(range(0,n,4096)); print('held', flush=True); signal.pause()")


def test_hysteresis_yields_at_once_and_returns_after_calm() -> None:
    p = Polite(WorkerConfig(polite=True, polite_cpu=0.5, polite_calm=2.0))
    p.memory_available, p.input_idle = 1.0, None
    p.owner_cpu = 0.6
    p._decide(100.0)
    assert p.yielding and p.capacity(4) == 0
    p.owner_cpu = 0.3  # between the marks (0.25 .. 0.5): holds on
    p._decide(101.0)
    p._decide(110.0)
    assert p.yielding
    p.owner_cpu = 0.1  # calm ...
    p._decide(111.0)
    assert p.yielding  # ... but not for polite_calm yet
    p._decide(113.5)
    assert not p.yielding and p.capacity(4) == 4
    p.input_idle = 3.0  # someone typing at a terminal
    p._decide(114.0)
    assert p.yielding and "terminal" in p.reason


def hog(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", *argv], stdout=subprocess.PIPE, text=True)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()  # by PID: only what this test started
            p.wait(10)


def offered(g: Gateway, w: Worker) -> int | None:
    ws = httpx.get(f"{g.url}/cluster", timeout=5).json()["workers"]
    return next(x["capacity"] for x in ws if x["id"] == w.id)


def served_by(g: Gateway) -> str:
    raw = client_for(g.url).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    return raw.headers[HEADER]


def reaches(g: Gateway, w: Worker, tries: int = 40) -> bool:
    """Some request lands on `w` (routing ties break at random between idle workers)."""
    return any(served_by(g) == w.id for _ in range(tries))


@pytest.fixture
def pair(worker_factory, gateway_factory, request) -> Iterator[tuple[Gateway, Worker, Worker]]:
    polite = worker_factory("--polite", "--polite-calm", "1", *request.param(), "--parallel",
                            "2", "--sim-tokens-per-second", "400", backend="sim")
    plain = worker_factory("--parallel", "2", "--sim-tokens-per-second", "400", backend="sim")
    g = gateway_factory("--worker", polite.url, "--worker", plain.url)
    back(g, polite, "the polite worker offering its slots")
    yield g, polite, plain


def back(g: Gateway, polite: Worker, what: str) -> None:
    """Waits for the polite worker to offer its slots; where other work on the box (not a
    hog of ours: none runs then) keeps it yielding, the box is too busy to test on."""
    try:
        wait_for(lambda: offered(g, polite) == 2, 30, 0.2, what)
    except TimeoutError:
        seen = httpx.get(f"{polite.url}/status", timeout=5).json()["polite"]
        if "of the CPUs" in (seen.get("reason") or ""):
            pytest.skip(f"other work on the box keeps the polite worker yielding: {seen}")
        raise


def _route_around_and_back(pair: tuple[Gateway, Worker, Worker], start) -> None:
    g, polite, plain = pair
    assert reaches(g, polite), "the polite worker serves while the box is idle"
    hogs = start()
    try:
        wait_for(lambda: offered(g, polite) == 0, 15, 0.2, "the polite worker yielding")
        assert all(served_by(g) == plain.id for _ in range(10))
        status = httpx.get(f"{polite.url}/status", timeout=5).json()
        assert status["capacity"] == 0 and status["polite"]["yielding"], status["polite"]
    finally:
        stop(hogs)
    back(g, polite, "the polite worker back")
    assert reaches(g, polite), "routed to the polite worker again"


MEM_HOG = 2 << 30


def memory_flags() -> tuple[str, ...]:
    """Yield when the hog's 2 GiB are taken: the threshold sits halfway into them."""
    vm = psutil.virtual_memory()
    if vm.available < 2 * MEM_HOG:
        pytest.skip("needs 4 GiB of memory available")
    mark = vm.available / vm.total - MEM_HOG / vm.total / 2
    return ("--polite-cpu", "1.01", "--polite-cpu-low", "1.01",  # the CPU rule off
            "--polite-memory", f"{mark:.4f}")


def cpu_flags() -> tuple[str, ...]:
    """Yield above what the box's other work takes now, plus a margin a hog (every core
    busy) exceeds; come back below a mark the test's own gateway, plain worker and polling
    (~20% of 2 cores, counted as others: they are) stay under."""
    psutil.cpu_percent()
    time.sleep(1.0)  # a measurement window, not synchronisation
    base = psutil.cpu_percent() / 100
    if base > 0.4:
        pytest.skip(f"the box is already {base:.0%} busy with other work: a CPU hog "
                    "cannot be told from it")
    high = min(0.9, base + 0.5)
    return ("--polite-cpu", f"{high:.2f}", "--polite-cpu-low", f"{high - 0.1:.2f}",
            "--polite-memory", "0")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pair", [memory_flags], indirect=True)
def test_memory_hog_routes_around_the_polite_worker(pair) -> None:
    def start() -> list[subprocess.Popen]:
        h = hog(HOG_MEMORY, str(MEM_HOG))
        assert h.stdout is not None and h.stdout.readline().strip() == "held"
        return [h]

    _route_around_and_back(pair, start)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pair", [cpu_flags], indirect=True)
def test_cpu_hog_routes_around_the_polite_worker(pair) -> None:
    n = psutil.cpu_count() or 1
    _route_around_and_back(pair, lambda: [hog(HOG_CPU) for _ in range(n)])
