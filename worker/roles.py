"""What a gateway places a worker as (the wire request), and where a split's parts bind.

The request is read by `worker.control_api` and carried out by `worker.control`; the RPC
settings are read when a shard or head child starts, so a changed environment or route
takes effect at the next placement.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, Literal

from pydantic import BaseModel, Field

from worker.wol import route_to

Role = Literal["replica", "head", "shard", "none"]


class PlacementRequest(BaseModel):
    generation: int = 0
    role: Role
    model: str | None = None
    model_url: str | None = None
    path: str | None = None  # where the gateway has the file: used if this box has it too
    sha256: str | None = None
    size: int | None = None
    shards: list[str] = Field(default_factory=list)
    tensor_split: list[float] = Field(default_factory=list)
    allow_peer: list[str] = Field(default_factory=list)
    restart: bool = False  # start afresh even if the job is the one running

    def same_job(self, other: PlacementRequest) -> bool:
        skip = {"generation", "model_url", "path", "restart"}
        return self.model_dump(exclude=skip) == other.model_dump(exclude=skip)


ANY = ("0.0.0.0", "::", "")


def rpc_hosts(cfg: Any) -> tuple[str, str]:
    """(address an RPC shard binds, address a head reaches it at).

    `--rpc-host` if given (0.0.0.0 only when said so); else the worker's own `--host`; if
    that is a wildcard, the address the gateway reaches this worker at (its advertised URL,
    or the interface on the route to the gateway), so the shard is never on every
    interface by default.
    """
    advertised = urllib.parse.urlsplit(cfg.url).hostname or ""
    if cfg.rpc_host:
        bind = cfg.rpc_host
    elif cfg.host not in ANY:
        bind = cfg.host
    elif advertised and advertised not in ANY:
        bind = advertised
    else:
        gateway = urllib.parse.urlsplit(cfg.join or "").hostname
        bind = (route_to(gateway) if gateway else None) or "127.0.0.1"
    reach = bind
    if bind in ANY:
        reach = advertised if advertised and advertised not in ANY else (
            route_to(urllib.parse.urlsplit(cfg.join or "").hostname or "127.0.0.1")
            or "127.0.0.1")
    return bind, reach


def stall_seconds() -> float:
    """How long a split head may go without a token while a request is active."""
    return float(os.environ.get("CORRAL_RPC_STALL_SECONDS", "30"))
