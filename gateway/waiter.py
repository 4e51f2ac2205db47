"""A request waiting in the admission queue: the one type both queue orders hold.

`admission.Admission` creates waiters and resolves them; its queue orders
(`admission.FifoQueue`, `fairqueue.FairQueue`) only store them. The type lives here so
that dependencies point one way: admission → fairqueue → waiter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection

from gateway.cost import Job
from gateway.worker_record import Worker


class Waiter:
    __slots__ = ("model", "exclude", "future", "user", "since", "need", "job")

    def __init__(self, model: str, exclude: Collection[str], future: asyncio.Future[Worker],
                 user: str | None, need: tuple[int, int] | None = None,
                 job: Job | None = None) -> None:
        self.need = need  # routing.Need: logprobs / n > 1 requests want a capable worker
        self.job = job  # cost.Job: its expected work, for cost routing
        self.model = model
        self.exclude = exclude
        self.future = future
        self.user = user
        self.since = time.monotonic()
