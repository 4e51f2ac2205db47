"""Joining a gateway: announce, keep announcing (so a restarted gateway learns us again), leave."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse

import httpx

from wire.status import JoinRequest
from worker.config import WorkerConfig

log = logging.getLogger("corral.worker")

HEARTBEAT_SECONDS = 3.0


async def join_loop(cfg: WorkerConfig) -> None:
    assert cfg.join
    base = cfg.join.rstrip("/")
    headers = {"Authorization": f"Bearer {cfg.cluster_token}"} if cfg.cluster_token else {}
    body = JoinRequest(url=cfg.url, id=cfg.worker_id).model_dump()
    joined = False
    async with httpx.AsyncClient(timeout=5.0, headers=headers) as client:
        try:
            while True:
                try:
                    r = await client.post(f"{base}/cluster/workers", json=body)
                    if r.status_code in (200, 201):
                        if not joined:
                            log.warning("joined gateway %s as %s", base, cfg.worker_id)
                        joined = True
                    else:
                        joined = False
                        log.warning("gateway %s refused the join: %s", base, r.status_code)
                except httpx.HTTPError as exc:
                    joined = False
                    log.info("gateway %s unreachable: %s", base, exc)
                await asyncio.sleep(HEARTBEAT_SECONDS)
        finally:
            if joined:
                wid = urllib.parse.quote(cfg.worker_id, safe="")
                with contextlib.suppress(httpx.HTTPError, asyncio.CancelledError):
                    await asyncio.shield(client.delete(f"{base}/cluster/workers/{wid}"))
