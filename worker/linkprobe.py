"""Link probes between workers, on the gateway's request (gateway/topology.py).

`POST /control/probe {"url": PEER, "bytes": N}` (cluster token): this worker times TCP
connects to PEER's port (SYN to SYN-ACK, the median of `CONNECTS`) and one download of N
bytes from PEER's `GET /control/probe/blob?bytes=N`, and answers `{rtt_ms, mbit_s}`.
Both routes need the cluster token, as all of /control does; the blob is capped so a
probe cannot be turned into a flood.
"""

from __future__ import annotations

import statistics
import time

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from wire.errors import bad_request
from wire.http import json_response, read_model
from wire.links import connect_rtt, host_port
from worker.auth import authorize

CONNECTS = 5
MAX_BYTES = 64 << 20
CHUNK = b"\0" * (256 << 10)

router = APIRouter()


class ProbeRequest(BaseModel):
    url: str
    bytes: int = Field(4 << 20, ge=CHUNK.__len__(), le=MAX_BYTES)


@router.post("/control/probe")
async def probe(request: Request) -> Response:
    authorize(request)
    body = await read_model(request, ProbeRequest)
    if not body.url.startswith(("http://", "https://")):
        raise bad_request("url must be an http:// or https:// URL", param="url")
    host, port = host_port(body.url)
    try:
        rtts = [await connect_rtt(host, port) for _ in range(CONNECTS)]
    except (OSError, TimeoutError) as exc:
        raise bad_request(f"peer {body.url} unreachable: {exc}", param="url") from None
    token = request.app.state.worker.cfg.cluster_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=30.0, headers=headers) as client:
        t0 = time.perf_counter()
        got = 0
        async with client.stream("GET", body.url.rstrip("/") + "/control/probe/blob",
                                 params={"bytes": body.bytes}) as r:
            if r.status_code != 200:
                raise bad_request(f"peer {body.url} refused the probe: HTTP {r.status_code}",
                                  param="url")
            async for chunk in r.aiter_raw():
                got += len(chunk)
        secs = time.perf_counter() - t0
    return json_response({"rtt_ms": statistics.median(rtts),
                          "mbit_s": got * 8 / secs / 1e6, "bytes": got})


@router.get("/control/probe/blob")
async def blob(request: Request, bytes: int = 4 << 20) -> Response:
    authorize(request)
    n = max(0, min(bytes, MAX_BYTES))

    async def gen():
        left = n
        while left > 0:
            part = CHUNK[: min(left, len(CHUNK))]
            left -= len(part)
            yield part

    return StreamingResponse(gen(), media_type="application/octet-stream",
                             headers={"content-length": str(n)})
