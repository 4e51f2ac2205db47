"""The gateway's record of one worker: what routing, admission and the placer read.

A plain slotted object rather than a dataclass with properties: routing reads its attributes
on every request. `gateway.probe_status` fills it from the worker's `/status`;
`gateway.registry` keeps the records and their states.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

HEALTHY = ("ready", "busy")
# What a worker may report. `draining` and `asleep` (gateway/lifecycle.py) are not routable;
# an asleep worker that stops answering stays `asleep`, not `down`, and is kept.
STATES = ("ready", "busy", "loading", "idle", "down", "draining", "asleep")


def id_from_url(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return u.netloc or url


class Worker:
    """One worker as the gateway sees it. Routing reads these attributes directly."""

    __slots__ = ("id", "url", "source", "state", "models", "slots_total", "slots_busy",
                 "queue_depth", "tokens_per_second", "status", "inflight", "others",
                 "external", "capacity", "last_seen", "ejected_at", "fails", "last_error",
                 "task", "base", "answered", "stalled", "watched",
                 "decode_tps", "prefill_tps", "decode_rate", "prefill_rate", "reader_free",
                 "drain", "offered")

    def __init__(self, id: str, url: str, source: str) -> None:
        self.id = id
        self.url = url.rstrip("/")
        self.base = self.url  # requests go to base + path
        self.source = source  # "static" (flag/config) or "joined"
        self.state = "loading"
        self.models: frozenset[str] = frozenset()
        self.slots_total = 1
        self.slots_busy = 0
        self.queue_depth = 0
        self.tokens_per_second = 0.0
        self.status: dict[str, Any] = {}
        self.inflight = 0  # this gateway's requests on the worker (reserved at pick time)
        self.others = 0  # other gateway replicas' requests (from shared state)
        self.external = 0  # reported load not explained by any gateway's in-flight count
        self.capacity = 1.0  # slots_total weighted by decode speed
        self.last_seen = time.monotonic()
        self.ejected_at = 0.0
        self.fails = 0
        self.last_error = ""
        self.task: asyncio.Task[None] | None = None
        self.answered = time.monotonic()  # the last probe it answered (or when it was added)
        self.stalled = False  # declared frozen; cleared by the next probe it answers
        self.watched: set[Any] = set()  # the in-flight calls on it (upstream.py), to move
        # Its two speeds as reported (0: not yet), the effective ones routing uses (cost.py:
        # a missing one is the others' mean), and when it should be done reading the
        # prompts this gateway sent it (monotonic seconds).
        self.decode_tps = self.prefill_tps = 0.0
        self.decode_rate, self.prefill_rate = 1.0, 0.0
        self.reader_free = 0.0
        self.drain: Any = None  # a drain this gateway ordered (gateway/lifecycle.py)
        self.offered: int | None = None  # slots it offers (polite mode); None: all

    @property
    def healthy(self) -> bool:
        return self.state in HEALTHY

    @property
    def load(self) -> int:
        return self.inflight + self.others + self.external

    def to_json(self) -> dict[str, Any]:
        st = self.status
        state = self.state
        if state in HEALTHY:  # live, from what we know now rather than at the last probe
            state = "busy" if self.load >= self.slots_total else "ready"
        return {
            "id": self.id,
            "url": self.url,
            "backend": st.get("backend", ""),
            "models": sorted(self.models),
            "state": state,
            "queue_depth": self.queue_depth,
            "slots_total": self.slots_total,
            "slots_busy": self.slots_busy,
            "hardware": st.get("hardware", {}),
            "memory": st.get("memory", {}),
            "tokens_per_second": self.tokens_per_second,
            "decode_tokens_per_second": self.decode_tps,
            "prefill_tokens_per_second": self.prefill_tps,
            "inflight": self.inflight + self.others,
            "source": self.source,
            "last_error": self.last_error or None,
            "placement": st.get("placement"),
            "capacity": self.offered,
            "polite": st.get("polite"),
            "wake": st.get("wake"),
            # A worker holding several models: each one's state, slots and queue.
            "per_model": st.get("per_model") or [],
        }
