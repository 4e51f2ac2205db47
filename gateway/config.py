"""The gateway's configuration: one typed object, built once from flags, env and a TOML file.

Flags and `CORRAL_<FLAG>` environment variables arrive already merged by the CLI (flags
win). The config file adds what flags can't say: the cluster token, API keys, workers and
models. Precedence: flag/env > config file > default.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ApiKey:
    """A client key; `rpm`/`tpm` limits are enforced by limits.py (None: unlimited)."""

    key: str
    user: str
    rpm: int | None = None
    tpm: int | None = None

    def __repr__(self) -> str:  # never print a key
        return f"ApiKey(user={self.user!r}, rpm={self.rpm}, tpm={self.tpm})"


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: list[str] = field(default_factory=list)  # static worker URLs
    models: list[str] = field(default_factory=list)
    redis_url: str | None = None
    cluster_token: str = ""
    cluster_token_generated: bool = False
    api_keys: list[ApiKey] = field(default_factory=list)
    log_level: str = "warning"
    # Health and load probing.
    probe_interval: float = 0.5  # seconds between GET /status probes of each worker
    probe_timeout: float = 2.0
    join_ttl: float = 15.0  # a joined worker silent this long is dropped
    # Admission.
    queue_size: int = 256  # requests waiting in the gateway for a worker
    queue_timeout: float = 30.0  # seconds a request may wait there
    worker_queue_allowance: int = 2  # requests queued at a worker beyond its slots
    # A model whose last healthy worker went down less than this long ago (a restart, a
    # blip) lets new requests wait in the queue for one to come back, rather than 503 at once.
    down_grace: float = 10.0
    # Upstream.
    max_attempts: int = 3  # one try plus retries on other workers, before the first byte
    connect_timeout: float = 2.0
    read_timeout: float = 300.0  # between two bytes from a worker
    # A worker holding our requests that fails every probe for this long is frozen, not
    # slow (SIGSTOP, hung driver, cut cable): its requests move elsewhere. 0 turns it off.
    stall_timeout: float = 15.0
    max_connections: int = 1024
    lean_transport: bool = True  # httptools-based transport for worker traffic (transport.py)
    # Session affinity (affinity.py): a conversation goes back to the worker holding its KV.
    affinity: bool = True
    affinity_ttl: float = 1800.0  # seconds a conversation's worker is remembered
    affinity_slack: int = 2  # leave the preferred worker when it has this many more in flight
    # Stored Responses API responses (responses/store.py): kept this long, records over
    # this size not stored, at most this many in memory (Redis: bounded by the TTL).
    responses_ttl: float = 30 * 86400.0
    responses_max_bytes: int = 4 * 1024 * 1024
    responses_max_entries: int = 10_000
    # Guards at the door (guard.py).
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get 413
    head_timeout: float = 10.0  # seconds a client may take to send a request's headers
    body_timeout: float = 30.0  # seconds a client may take to send a request's body (408)

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return (f"GatewayConfig(host={self.host!r}, port={self.port}, workers={self.workers}, "
                f"models={self.models}, api_keys={len(self.api_keys)})")


def _keys_from_env(raw: str | None) -> list[ApiKey]:
    if not raw:
        return []
    return [ApiKey(k.strip(), f"key{i}") for i, k in enumerate(raw.split(",")) if k.strip()]


def _keys_from_file(items: Any) -> list[ApiKey]:
    keys = []
    if not isinstance(items, list):
        raise ValueError("api_keys must be an array of tables ([[api_keys]])")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not item["key"]:
            raise ValueError(f"api_keys[{i}] needs a non-empty string 'key'")
        keys.append(ApiKey(item["key"], str(item.get("user") or f"key{i}"),
                           _opt_int(item.get("rpm")), _opt_int(item.get("tpm"))))
    return keys


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def read_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    with Path(path).open("rb") as f:
        return tomllib.load(f)


def load_config(args: argparse.Namespace) -> GatewayConfig:
    """Builds the config from the CLI's namespace (flags + CORRAL_* env) and `--config`."""
    file = read_file(getattr(args, "config", None))
    workers = list(getattr(args, "worker", None) or []) + list(file.get("workers", []))
    models = list(getattr(args, "model", None) or []) + list(file.get("models", []))
    token = getattr(args, "cluster_token", None) or file.get("cluster_token") or ""
    generated = not token
    if generated:
        # Cluster writes always need a token; with none configured, make one up and say it.
        token = secrets.token_urlsafe(24)
    keys = _keys_from_file(file.get("api_keys", [])) + _keys_from_env(
        os.environ.get("CORRAL_API_KEYS"))
    cfg = GatewayConfig(
        host=args.host, port=args.port,
        workers=list(dict.fromkeys(w.rstrip("/") for w in workers)),
        models=list(dict.fromkeys(models)),
        redis_url=getattr(args, "redis_url", None) or file.get("redis_url"),
        cluster_token=token, cluster_token_generated=generated, api_keys=keys,
        log_level=getattr(args, "log_level", None) or "warning",
    )
    gw = file.get("gateway", {})  # optional [gateway] table for tuning knobs
    for name in ("probe_interval", "probe_timeout", "join_ttl", "queue_size", "queue_timeout",
                 "worker_queue_allowance", "down_grace", "max_attempts", "connect_timeout",
                 "read_timeout", "stall_timeout", "max_connections", "lean_transport",
                 "affinity", "affinity_ttl", "affinity_slack", "max_body_bytes", "head_timeout",
                 "body_timeout", "responses_ttl", "responses_max_bytes",
                 "responses_max_entries"):
        if name in gw:
            setattr(cfg, name, type(getattr(cfg, name))(gw[name]))
    return cfg
