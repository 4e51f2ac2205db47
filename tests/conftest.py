"""Shared fixtures: real workers on the bundled model, sim workers, redis-server."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from chromium import browser, chromium  # noqa: E402, F401 - fixtures, one per session
from procs import (  # noqa: E402
    Gateway,
    Proc,
    Worker,
    start_gateway,
    start_redis,
    start_worker,
    stop_all,
    wait_for,
)

MODEL = "smollm2-135m"

P = TypeVar("P", Worker, Gateway)


def client_for(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=kw.pop("timeout", 60), **kw)


@pytest.fixture(scope="session")
def llama_worker() -> Iterator[Worker]:
    """One real llama.cpp worker on the bundled model, shared by the session (stopped also
    when it never comes up)."""
    yield from serve_worker("--parallel", "2", "--threads", "2", "--max-queue", "8")


def _factory(start: Callable[..., P]) -> Iterator[Callable[..., P]]:
    """Yields `start`, remembering what it started, then stops all of it, side by side."""
    started: list[P] = []

    def make(*args: str, **kw) -> P:
        p = start(*args, **kw)
        started.append(p)
        return p

    yield make
    stop_all(p.proc for p in started)


@pytest.fixture
def worker_factory(gateway_factory) -> Iterator[Callable[..., Worker]]:
    """Starts workers for one test and stops them all afterwards. It needs
    `gateway_factory` only to end before it: workers stop while the test's gateways still
    probe them (a drain waits for a probe to see it), then the gateways."""
    yield from _factory(start_worker)


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., Gateway]]:
    """Starts gateways for one test and stops them all afterwards."""
    yield from _factory(start_gateway)


def all_ready(*workers: Worker) -> list[Worker]:
    """Waits for workers started with `wait=False`: started together, they load side by side
    (each start is seconds of mostly single-threaded import, load and calibration)."""
    for w in workers:
        w.wait_ready()
    return list(workers)


def serve_worker(*args: str, **kw) -> Iterator[Worker]:
    """For a fixture: yields a worker once it is up, and stops it, also when it never came up."""
    w = start_worker(*args, wait=False, **kw)
    try:
        w.wait_ready()
        yield w
    finally:
        w.proc.stop()


#: What a worker offers in `unplaceable_cluster`: far below the bundled model's 317 MiB.
SMALL = 70 << 20


@dataclass
class SmallCluster:
    """A gateway declaring the bundled model, and workers too small for it, even together."""

    gateway: Gateway
    workers: list[Worker]

    def cluster(self) -> dict:
        return httpx.get(f"{self.gateway.url}/cluster", timeout=5).json()

    def unplaceable(self) -> dict | None:
        return next((p for p in self.cluster()["placements"]
                     if p.get("state") == "unplaceable" and p["model"] == MODEL), None)


@pytest.fixture(scope="module")
def unplaceable_cluster() -> Iterator[SmallCluster]:
    """Two llama workers started without --model (the gateway places them) offering 70 MiB
    each, joined to a gateway with `--model smollm2-135m`. Nothing loads: it never fits."""
    g = start_gateway("--model", MODEL)
    ws: list[Worker] = []
    try:
        for _ in range(2):
            ws.append(start_worker("--join", g.url, "--memory-limit", str(SMALL), wait=False,
                                   env={"CORRAL_CLUSTER_TOKEN": g.token}))
        c = SmallCluster(g, ws)

        def settled() -> bool:
            u = c.unplaceable()
            return bool(u) and u["offer"]["workers"] == len(ws)

        wait_for(settled, 60, 0.1, "the model reported unplaceable over both workers")
        yield c
    finally:
        stop_all(w.proc for w in ws)
        g.proc.stop()


@pytest.fixture
def redis_url() -> Iterator[str]:
    proc: Proc
    proc, url = start_redis()
    yield url
    proc.stop()


# --------------------------------------------------------------------------- backend API suite
# tests/test_worker_api.py runs every test against each real backend through `api`; the
# per-backend files (test_worker_llama.py, test_worker_openvino.py) share the same workers.

#: The package each real backend needs, for the skip rule in `require_backend`.
BACKEND_PACKAGES = {"llama": "llama_cpp", "openvino": "openvino_genai"}
#: The worker behind `api`: four slots for batching and queueing; the context is the
#: default (not passed), so the suite checks the default too.
API_SLOTS = 4
API_CTX = 2048
#: Chat prompts and the SmolLM2 chat template (from the GGUF), rendered by hand.
SYSTEM = "You are a concise assistant."
CHATML = "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n" \
         "<|im_start|>assistant\n"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy continues counting: never stops early


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_backend(name: str) -> None:
    """Skips when the backend's package is missing, except in CI, where it must run."""
    pkg = BACKEND_PACKAGES[name]
    if importlib.util.find_spec(pkg) is None and not in_ci():
        pytest.skip(f"{pkg} is not installed (the {name} backend runs whenever CI=true)")


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def status(w: Worker) -> dict:
    return httpx.get(f"{w.url}/status", timeout=5).json()


def _tokenizer(name: str) -> Callable[[str], list[int]]:
    """The model's own tokenizer, in this process, to check the worker's counts."""
    from worker.models import resolve

    path = str(resolve(MODEL)[1])
    if name == "llama":
        import llama_cpp

        llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        return lambda text: llm.tokenize(text.encode(), add_bos=False, special=True)
    import openvino_genai as ovg  # OpenVINO's own tokenizer, read from the GGUF

    tok = ovg.Tokenizer(path)
    return lambda text: tok.encode(text, add_special_tokens=True).input_ids.data[0].tolist()


@dataclass
class Caps:
    """What a backend is expected to do where backends legitimately differ.

    Declared here, never read from the worker, so that a backend drifting from its
    declaration fails a test instead of silently changing what is tested."""

    name: str
    #: presence/frequency penalties honoured (True) or refused with a 400
    #: `unsupported_parameter` before any response starts (False).
    penalties: bool
    #: prompt-cache reuse visible as hit counters in /status and `cached_tokens` in usage
    #: (True), or only as a faster time to first token (False).
    cache_counters: bool
    #: greedy text is the same alone and in a batch.
    batch_invariant: bool
    _tokenize: Callable[[str], list[int]] | None = field(default=None, repr=False)

    def tokenize(self, text: str) -> list[int]:
        if self._tokenize is None:
            self._tokenize = _tokenizer(self.name)
        return self._tokenize(text)


def caps_for(name: str) -> Caps:
    if name == "llama":
        return Caps("llama", penalties=True, cache_counters=True, batch_invariant=True)
    flag = os.environ.get("CORRAL_OPENVINO_BATCH_INVARIANT", "1").strip().lower()
    return Caps("openvino", penalties=False, cache_counters=False,
                batch_invariant=flag not in ("0", "false", "no", "off"))


@dataclass
class ApiTarget:
    """What `api` yields: one worker, its client, and what its backend is expected to do."""

    worker: Worker
    caps: Caps
    client: openai.OpenAI

    @property
    def url(self) -> str:
        return self.worker.url


def _api_worker(backend: str, *args: str) -> Iterator[Worker]:
    require_backend(backend)
    yield from serve_worker("--parallel", str(API_SLOTS), "--max-queue", "8", *args,
                            backend=backend)


@pytest.fixture(scope="session")
def llama_api_worker() -> Iterator[Worker]:
    """The llama.cpp worker behind `api`, shared with test_worker_llama.py (one load)."""
    yield from _api_worker("llama", "--threads", "2")


@pytest.fixture(scope="session")
def openvino_api_worker() -> Iterator[Worker]:
    """The OpenVINO worker behind `api`, shared with test_worker_openvino.py (one load)."""
    yield from _api_worker("openvino", "--device", "CPU")


@pytest.fixture(scope="module", params=["llama", "openvino"])
def api(request: pytest.FixtureRequest) -> ApiTarget:
    """Each real backend in turn: pytest runs a module's tests for one before the other."""
    worker = request.getfixturevalue(f"{request.param}_api_worker")
    return ApiTarget(worker, caps_for(request.param), client_for(worker.url, timeout=120))
