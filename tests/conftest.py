"""Shared fixtures: real workers on the bundled model, sim workers, redis-server."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import Proc, Worker, start_redis, start_worker  # noqa: E402

MODEL = "smollm2-135m"


def client_for(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=kw.pop("timeout", 60), **kw)


@pytest.fixture(scope="session")
def llama_worker() -> Iterator[Worker]:
    """One real llama.cpp worker on the bundled model, shared by the session."""
    w = start_worker("--parallel", "2", "--threads", "2", "--max-queue", "8")
    yield w
    w.proc.stop()


@pytest.fixture
def worker_factory() -> Iterator[Callable[..., Worker]]:
    """Starts workers for one test and stops them all afterwards."""
    started: list[Worker] = []

    def make(*args: str, **kw) -> Worker:
        w = start_worker(*args, **kw)
        started.append(w)
        return w

    yield make
    for w in started:
        w.proc.stop()


@pytest.fixture
def redis_url() -> Iterator[str]:
    proc: Proc
    proc, url = start_redis()
    yield url
    proc.stop()
