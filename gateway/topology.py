"""The measured topology: link latency and throughput between the gateway and its workers.

Two kinds of measurement, both cheap:
- gateway -> worker RTT, continuously: a TCP connect to the worker's port every
  `INTERVAL` seconds, timed from SYN to SYN-ACK (the kernel answers; no Python on the far
  side is timed), the median of the last `WINDOW` samples;
- worker -> worker RTT and throughput, on request, for split candidates only: the gateway
  asks the would-be head (`POST /control/probe`, cluster token) to time connects to a
  peer and one `PROBE_BYTES` download from it. Not constant traffic: a pair is probed
  again only after `PAIR_TTL`.

`cost(head, members)` is what placement minimises for a split: the RTT from the head to
each shard, summed (llama.cpp's RPC makes at least one round trip per shard per token), a
measured pair's own RTT where there is one, else the gateway's RTTs to both ends (on a
switch, monotone in both links). `/cluster` lists `links: [{from, to, rtt_ms, mbit_s,
measured_at}]`; `from` is "gateway" or a worker id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from wire.links import connect_rtt, host_port

log = logging.getLogger("corral.gateway")

INTERVAL = 1.0  # seconds between gateway -> worker RTT samples
WINDOW = 8  # samples in the median
PAIR_TTL = 300.0  # a worker pair's probe is good this long
PROBE_BYTES = 4 << 20
GATEWAY = "gateway"


@dataclass
class Link:
    src: str
    dst: str
    rtt_ms: float | None = None
    mbit_s: float | None = None
    measured_at: float = 0.0  # unix time
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def to_json(self) -> dict[str, Any]:
        return {"from": self.src, "to": self.dst,
                "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
                "mbit_s": None if self.mbit_s is None else round(self.mbit_s, 1),
                "measured_at": round(self.measured_at, 3)}


class Topology:
    """Links measured by this gateway; `workers()` says whom to measure (id -> url)."""

    def __init__(self, workers: Callable[[], dict[str, str]], token: str) -> None:
        self.workers = workers
        self.links: dict[tuple[str, str], Link] = {}
        self._headers = {"Authorization": f"Bearer {token}"}
        self._task: asyncio.Task[None] | None = None
        self._probing: set[tuple[str, str]] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _loop(self) -> None:
        while True:
            current = self.workers()
            for key in [k for k in self.links if not ({k[0], k[1]} - {GATEWAY}) <= set(current)]:
                del self.links[key]  # a worker that left takes its links along
            await asyncio.gather(*(self._sample(wid, url) for wid, url in current.items()))
            await asyncio.sleep(INTERVAL)

    async def _sample(self, wid: str, url: str) -> None:
        link = self.links.setdefault((GATEWAY, wid), Link(GATEWAY, wid))
        try:
            ms = await connect_rtt(*host_port(url))
        except (OSError, TimeoutError):
            return  # the registry's probes say down; an RTT is kept from when it answered
        link.samples.append(ms)
        link.rtt_ms = statistics.median(link.samples)
        link.measured_at = time.time()

    def rtt(self, a: str, b: str) -> float | None:
        """Measured RTT between two workers, else estimated from the gateway's to each."""
        for key in ((a, b), (b, a)):
            link = self.links.get(key)
            if link and link.rtt_ms is not None:
                return link.rtt_ms
        ga, gb = self.links.get((GATEWAY, a)), self.links.get((GATEWAY, b))
        if ga and gb and ga.rtt_ms is not None and gb.rtt_ms is not None:
            return (ga.rtt_ms + gb.rtt_ms) / 2
        return None

    def cost(self, head: str, members: Sequence[str]) -> float:
        """Network ms per decoded token for a split: the head's RTT to each shard, summed
        (an unmeasured link counts as 1000 ms, so measured ones are preferred)."""
        return sum(r if (r := self.rtt(head, s)) is not None else 1000.0
                   for s in members if s != head)

    def ready(self, ids: Sequence[str]) -> bool:
        """Every one of `ids` has a gateway RTT: placement can compare them."""
        return all((k := self.links.get((GATEWAY, i))) is not None and k.rtt_ms is not None
                   for i in ids)

    async def probe_pairs(self, ids: Sequence[str], client: httpx.AsyncClient) -> None:
        """Worker -> worker RTT and throughput for every pair of `ids` not probed within
        PAIR_TTL; both directions of a pair share one probe (links are symmetric here)."""
        urls = self.workers()
        now = time.time()
        jobs = []
        for a, b in itertools.combinations(sorted(ids), 2):
            link = self.links.get((a, b))
            if a in urls and b in urls and (link is None or now - link.measured_at > PAIR_TTL) \
                    and (a, b) not in self._probing:
                jobs.append(self._probe(a, b, urls, client))
        for job in jobs:  # one at a time: parallel probes would share the links they measure
            await job

    async def _probe(self, a: str, b: str, urls: dict[str, str],
                     client: httpx.AsyncClient) -> None:
        self._probing.add((a, b))
        try:
            r = await client.post(urls[a].rstrip("/") + "/control/probe",
                                  json={"url": urls[b], "bytes": PROBE_BYTES},
                                  headers=self._headers, timeout=30.0)
            if r.status_code != 200:
                log.warning("link probe %s -> %s refused: HTTP %s %s", a, b, r.status_code,
                            r.text[:200])
                return
            got = r.json()
            self.links[(a, b)] = Link(a, b, float(got["rtt_ms"]), float(got["mbit_s"]),
                                      time.time())
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            log.warning("link probe %s -> %s failed: %s", a, b, exc)
        finally:
            self._probing.discard((a, b))

    def to_json(self) -> list[dict[str, Any]]:
        return [link.to_json() for link in sorted(self.links.values(),
                                                  key=lambda k: (k.src, k.dst))]
