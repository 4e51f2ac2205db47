"""A split over workers joined to a plain gateway (test_split.py has the `corral up` one):
a restarted gateway adopts it as it runs, and a big worker joining turns it into a replica
without a gap.

Both tests share one gateway and its two split workers (a split costs two worker starts and
a load over RPC); each adds the worker it needs and takes it away again, and each begins by
waiting for the split, which the other may have left re-forming.
"""

from __future__ import annotations

import importlib.util
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from conftest import MODEL
from procs import (
    Gateway,
    Worker,
    free_port,
    start_gateway,
    start_worker,
    stop_all,
    wait_for,
)
from test_split import (
    LIMIT,
    ONE_SLOT,
    QUESTION,
    _cluster,
    _greedy,
    _ready_placement,
    _wait_placement,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")

#: The split's workers; a worker that sorts first ("w-a") joins in the restart test.
SPLIT_IDS = ("w-b", "w-c")


@dataclass
class Joined:
    """A gateway on a port kept across its restarts, and the workers joined to it."""

    port: int
    gateway: Gateway
    workers: list[Worker] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateway.url

    def join(self, *args: str, limit: str = LIMIT) -> Worker:
        w = start_worker("--join", self.url, "--memory-limit", limit, "--threads", "1",
                         *ONE_SLOT, *args, wait=False,
                         env={"CORRAL_CLUSTER_TOKEN": self.gateway.token})
        self.workers.append(w)
        return w

    def leave(self, w: Worker) -> None:
        """Stops `w` (it says goodbye) and waits until the gateway no longer lists it."""
        w.proc.stop()
        self.workers.remove(w)
        wait_for(lambda: w.id not in {x["id"] for x in _cluster(self.url)["workers"]}, 30,
                 0.1, f"{w.id} to leave")

    def restart_gateway(self) -> None:
        self.gateway.proc.stop()
        self.gateway = start_gateway("--model", MODEL, port=self.port)


@pytest.fixture(scope="module")
def joined() -> Iterator[Joined]:
    port = free_port()
    j = Joined(port, start_gateway("--model", MODEL, port=port))
    try:
        for wid in SPLIT_IDS:
            j.join("--id", wid)
        yield j
    finally:
        stop_all(w.proc for w in j.workers)
        j.gateway.proc.stop()


def test_a_restarted_gateway_keeps_the_running_split(joined: Joined) -> None:
    j = joined
    before = _wait_placement(j.url, "split")
    assert sorted(before["workers"]) == list(SPLIT_IDS)
    # A third worker that sorts first joins: the running split stays where it is, and a
    # restarted gateway adopts it rather than re-planning from scratch.
    extra = j.join("--id", "w-a")
    try:
        wait_for(lambda: len(_cluster(j.url)["workers"]) == 3, 60, 0.25, "the third worker")
        head = next(w for w in j.workers
                    if httpx.get(f"{w.url}/status").json()["id"] == before["head"])
        since = httpx.get(f"{head.url}/status").json()["placement"]["since"]
        j.restart_gateway()
        wait_for(lambda: len(_cluster(j.url)["workers"]) == 3, 60, 0.25,
                 "the workers to rejoin")
        _wait_placement(j.url, "split")
        # Over a few placement rounds nothing moves and the head is not restarted.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            after = _ready_placement(j.url, "split")
            assert after and (after["workers"], after["head"]) == (before["workers"],
                                                                  before["head"])
            assert httpx.get(f"{head.url}/status").json()["placement"]["since"] == since
            time.sleep(0.25)
        assert _greedy(j.url, QUESTION, 4)[0]
    finally:
        j.leave(extra)


def test_a_big_worker_joining_turns_the_split_into_a_replica_without_a_gap(
        joined: Joined) -> None:
    j = joined
    split = _wait_placement(j.url, "split")
    (endpoint,) = [w["placement"]["rpc_endpoint"] for w in _cluster(j.url)["workers"]
                   if w["placement"]["role"] == "shard"]
    big_worker = j.join(limit=str(2 << 30))
    try:
        # The split serves every request until the replica is ready: no gap, no error.
        deadline = time.monotonic() + 240
        served_by = set()
        while _ready_placement(j.url, "replica") is None:
            assert time.monotonic() < deadline, "no replica within 240 s"
            text, by = _greedy(j.url, QUESTION, 2)
            assert text
            served_by.add(by)
        assert split["head"] in served_by
        replica = _ready_placement(j.url, "replica")
        (big,) = replica["workers"]
        assert big not in split["workers"] and big == big_worker.id
        want = {big: "replica", **{w: "none" for w in split["workers"]}}
        wait_for(lambda: {w["id"]: w["placement"]["role"]
                          for w in _cluster(j.url)["workers"]} == want,
                 30, 0.25, "the split's workers to be released")
        assert [p["mode"] for p in _cluster(j.url)["placements"]] == ["replica"]
        # The released shard's RPC port is closed.
        host, port = endpoint.rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
        assert _greedy(j.url, QUESTION, 2)[1] == big
    finally:
        j.leave(big_worker)  # the split re-forms on the two small workers
