"""The gateway's configuration: one typed object, built once from flags, env and a TOML file.

Flags and `CORRAL_<FLAG>` environment variables arrive already merged by the CLI (flags
win). The config file adds what flags can't say: the cluster token, API keys, workers and
models. Precedence: flag/env > config file > default. `config_file.load_config` builds it
(and validates the file); this module is only the types.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ApiKey:
    """A client key; `rpm`/`tpm` limits are enforced by limits.py (None: unlimited).

    A key marked as a `frontend` (a chat UI the whole team reaches Corral through) has its
    forwarded end-user identity trusted (identity.py); `user_rpm`/`user_tpm` then limit each
    end user inside the key's own limits. Budgets (budgets.py) cap tokens per UTC day or
    month, for the key and for each of its end users. Keys added at run time (keys.py) carry
    only the digest of their secret (`key` is "").
    """

    key: str
    user: str
    rpm: int | None = None
    tpm: int | None = None
    frontend: str | None = None  # "openwebui" or "headers" (identity.py)
    frontend_jwt_secret: str | None = None
    frontend_headers: tuple[tuple[str, str], ...] = ()  # (field, header name) overrides
    user_rpm: int | None = None
    user_tpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    user_tokens_per_day: int | None = None
    user_tokens_per_month: int | None = None
    digest: str = ""  # sha256 hex of the secret; computed from `key` when empty
    source: str = "config"  # "config" (file or env) or "runtime" (keys.py)

    def __post_init__(self) -> None:
        if not self.digest and self.key:
            object.__setattr__(self, "digest", hashlib.sha256(self.key.encode()).hexdigest())

    @property
    def id(self) -> str:
        """A public name for the key (listing, revoking): never the secret."""
        return "key_" + self.digest[:12]

    @property
    def has_budget(self) -> bool:
        return bool(self.tokens_per_day or self.tokens_per_month
                    or self.user_tokens_per_day or self.user_tokens_per_month)

    def __repr__(self) -> str:  # never print a key or a secret
        return (f"ApiKey(id={self.id!r}, user={self.user!r}, rpm={self.rpm}, tpm={self.tpm}, "
                f"frontend={self.frontend!r})")


@dataclass(frozen=True)
class ModelEntry:
    """One catalogued model (`[[models]]`, `--model`, a GGUF in `--models-dir`).

    `spec` is what `worker.models.resolve` reads: a bundled name or a .gguf path. A pinned
    model is always placed, with at least `min_replicas`; an unpinned one is loaded when
    asked for and unloaded after `model_idle_ttl` without a request.
    """

    name: str
    spec: str
    pin: bool = False
    min_replicas: int = 1
    aliases: tuple[str, ...] = ()


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: list[str] = field(default_factory=list)  # static worker URLs
    models: list[str] = field(default_factory=list)  # --model and `models = ["..."]`: pinned
    model_entries: list[ModelEntry] = field(default_factory=list)  # `[[models]]` tables
    models_dir: str | None = None  # every *.gguf in it is catalogued, unpinned
    redis_url: str | None = None
    cluster_token: str = ""
    cluster_token_generated: bool = False
    cluster_name: str = "corral"  # advertised by mDNS (wire/mdns.py); never the token
    discover: bool | None = None  # mDNS advertising; None: when bound off loopback
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
    # With cost routing, a worker past that allowance still takes a request while the
    # expected wait there (its prompt-reading backlog, its slot queue) is under this: a fast
    # reader holding six short prompts has room; a slow one holding six long ones has not.
    # 0: the count alone.
    worker_queue_seconds: float = 0.0
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
    # Routing (routing.py): by each request's expected finish time on each worker, from its
    # prompt length and the workers' prefill and decode rates (cost.py); false: by load
    # over capacity alone (slots x decode speed), the scoring before both rates were known.
    cost_routing: bool = True
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
    # Closed views (auth.py): with API keys configured, /cluster, the dashboard and
    # /openapi.json need a key or the cluster token, unless the dashboard is public.
    public_dashboard: bool = False
    metrics_token: str = ""  # when set, GET /metrics needs it (or the cluster token)
    # Boxes people also use (lifecycle.py). A worker no placement has needed and no request
    # has touched for `idle_sleep_after` seconds is drained and runs its --sleep-command
    # (0: never); requests waiting `wake_after` seconds for a model an asleep box serves
    # wake it (Wake-on-LAN) and are held up to `wake_deadline` seconds while it rejoins. A
    # drain without a deadline of its own gets `drain_timeout` (0: until it is empty).
    idle_sleep_after: float = 0.0
    wake_after: float = 2.0
    wake_deadline: float = 90.0
    drain_timeout: float = 0.0
    # Many models (placer.py): an unpinned model with no request for this long is unloaded;
    # a request for a catalogued model loaded nowhere waits this long for it to load.
    model_idle_ttl: float = 900.0
    model_load_timeout: float = 120.0

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return (f"GatewayConfig(host={self.host!r}, port={self.port}, workers={self.workers}, "
                f"models={self.models}, api_keys={len(self.api_keys)})")
