"""Joining a gateway: announce, keep announcing (so a restarted gateway learns us again), leave.

The gateway is `--join URL`, or, with none, the one mDNS finds (`wire.mdns`): found first,
then joined over HTTP with the cluster token exactly as `--join` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse

import httpx

from wire import mdns
from wire.status import JoinRequest
from worker.config import WorkerConfig

log = logging.getLogger("corral.worker")

HEARTBEAT_SECONDS = 3.0
WILDCARD = ("0.0.0.0", "", "::")


def discovering(cfg: WorkerConfig) -> bool:
    """No --join, and bound off loopback or asked: find the gateway by mDNS."""
    return not cfg.join and mdns.wanted(cfg.host, cfg.discover)


def advertise_url(cfg: WorkerConfig, gateway: str) -> str:
    """How the gateway reaches us: --advertise-url, else our bound address, else (bound to
    every interface) the address of the interface that routes to the gateway."""
    if cfg.advertise_url or cfg.host not in WILDCARD:
        return cfg.url
    host = urllib.parse.urlsplit(gateway).hostname or "127.0.0.1"
    return f"http://{mdns.source_address(host)}:{cfg.port}"


async def discover_and_join(cfg: WorkerConfig) -> None:
    log.warning("no --join: looking for a gateway%s by mDNS (%s)",
                f" of cluster {cfg.cluster!r}" if cfg.cluster else "", mdns.SERVICE)
    url = await mdns.find_gateway(cfg.host, cfg.cluster)
    log.warning("found gateway %s by mDNS", url)
    cfg.join = url  # as if given: rpc_hosts() routes a wildcard-bound shard by it
    await join_loop(cfg, url)


async def join_loop(cfg: WorkerConfig, gateway: str | None = None) -> None:
    base = (gateway or cfg.join or "").rstrip("/")
    assert base
    headers = {"Authorization": f"Bearer {cfg.cluster_token}"} if cfg.cluster_token else {}
    body = JoinRequest(url=advertise_url(cfg, base), id=cfg.worker_id).model_dump()
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
