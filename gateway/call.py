"""One client request on its way to a worker, and what the upstream and its relays share.

`upstream.Upstream` owns the attempts (pick a worker, retry before the first byte) and
creates a `relay.Relay` for every stream; the relay, to continue a broken stream, needs a
few of the upstream's parts back. Those parts are named here as `StreamOpener`, with the
types both sides use, so that dependencies point one way: upstream → relay → call.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Protocol

import httpx
from fastapi.responses import Response

from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.cost import Job
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.worker_record import Worker

Opened = tuple[httpx.Response, AsyncIterator[bytes], bytes]
"""An open stream: the worker's response, its byte iterator and its first chunk."""


class Call:
    """One client request on its way through the gateway."""

    __slots__ = ("model", "path", "body", "stream", "client_usage", "user", "started",
                 "tried", "session", "affine", "need", "job")

    def __init__(self, model: str, path: str, body: bytes, stream: bool, client_usage: bool,
                 user: str | None = None, session: str | None = None) -> None:
        self.model = model
        self.path = path
        self.body = body
        self.stream = stream
        self.client_usage = client_usage
        self.user = user
        self.started = time.perf_counter()
        self.tried: list[str] = []
        self.session = session  # affinity key (affinity.py), None when there is none
        self.affine = False  # prefer the worker the session went to last
        # logprobs or n > 1: (top_logprobs or -1, n), what the worker must honour
        # (routing.Need); None for every other request.
        self.need: tuple[int, int] | None = None
        self.job: Job | None = None  # its expected work, for cost routing (cost.py)


class Retry(Exception):
    """This attempt failed before the client saw a byte; try another worker."""

    def __init__(self, reason: str, response: Response) -> None:
        self.reason = reason
        self.response = response


class StreamOpener(Protocol):
    """What a relay uses of the upstream that created it (`upstream.Upstream`)."""

    cfg: GatewayConfig
    registry: Registry
    admission: Admission
    metrics: Metrics

    async def send_stream(self, w: Worker, path: str, body: bytes) -> Opened | Response:
        """Opens a stream on `w`, or returns a final non-200 response; raises Retry."""
        ...
