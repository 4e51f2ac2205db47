"""What a worker reports at `/status` and sends to join a gateway."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The response header naming the worker that served a request.
WORKER_HEADER = "x-corral-worker"


#: `idle`: holds no model by design, waiting for the gateway to place one (placeable, not
#: routable, not down). `draining`: finishing what it has, taking nothing new (SIGTERM or
#: the gateway's drain). `asleep`: drained and put to sleep by the gateway's idle-sleep
#: (its sleep command ran); a Wake-on-LAN packet brings it back.
WorkerState = Literal["ready", "busy", "loading", "idle", "down", "draining", "asleep"]


class Wake(BaseModel):
    """How to wake this box with a Wake-on-LAN magic packet (worker/wol.py)."""

    mac: str
    interface: str = Field("", description="The interface that reaches the gateway.")
    broadcast: str = Field("", description="Its broadcast address (the packet goes there).")
    port: int = 9


class Memory(BaseModel):
    total: int = Field(description="Bytes this worker offers (the box, or --memory-limit).")
    available: int = Field(description="Bytes still free for placement.")
    physical_total: int | None = None
    model_bytes: int | None = None


class Hardware(BaseModel):
    model_config = ConfigDict(extra="allow")
    cpu: str = ""
    cores: int = 0
    threads: int = Field(0, description="CPU threads decoding now (0 while nothing is placed).")
    device: str = "CPU"
    devices: list[str] = Field(default_factory=list)
    hostname: str = ""
    host_id: str = Field("", description="Workers with the same host id share its CPUs.")
    cpus: int = Field(0, description="CPUs this worker may run on (affinity, cgroup quota).")
    threads_explicit: bool = Field(False, description="threads set by --threads, not shared.")
    host_workers: int | None = Field(None, description="Computing workers on this host, "
                                     "as this worker sees them.")
    #: Greedy output the same alone and batched, as the worker measured at load (None: not
    #: measured: a sim or idle worker, or the probe could not finish).
    batch_invariant: bool | None = None


class WorkerStatus(BaseModel):
    """What a worker reports at `GET /status`; the gateway routes on it."""

    model_config = ConfigDict(extra="allow")
    id: str
    backend: str
    models: list[str]
    state: WorkerState = "ready"
    queue_depth: int = 0
    slots_total: int = 1
    slots_busy: int = 0
    hardware: Hardware = Field(default_factory=Hardware)
    memory: Memory
    #: Single-sequence decode speed (kept for older gateways: the same figure as
    #: decode_tokens_per_second).
    tokens_per_second: float = 0.0
    #: Tokens/s decoding one sequence alone (bandwidth-bound), and reading a prompt
    #: (compute-bound: an iGPU may double it while decode stays): calibrated at load, then
    #: learned from real requests. 0: not measured yet.
    decode_tokens_per_second: float = 0.0
    prefill_tokens_per_second: float = 0.0
    n_ctx: int = 0
    prompt_cache: dict[str, int] = Field(default_factory=dict)
    #: What the backend honours, for routing: {"top_logprobs": max, "n": max choices,
    #: "embeddings": bool}. Absent (older workers): top_logprobs 0, n 1, no embeddings.
    capabilities: dict[str, int | bool] = Field(default_factory=dict)
    #: How the worker computes embeddings (pooling, dimensions, window, a note when the
    #: GGUF declares no pooling); None when it cannot.
    embeddings: dict[str, Any] | None = None
    #: Slots this worker offers now (polite mode shrinks it to 0 while the box's owner is
    #: busy); None: all of slots_total. The gateway routes by it.
    capacity: int | None = None
    #: Polite mode's view of the host (owner CPU, memory, input), when --polite.
    polite: dict[str, Any] | None = None
    #: Wake-on-LAN facts, when known; `sleep`: whether a sleep command is configured.
    wake: Wake | None = None
    sleep: bool = False


class DrainRequest(BaseModel):
    """`POST /control/drain` (worker) and `POST /cluster/workers/{id}/drain` (gateway)."""

    model_config = ConfigDict(extra="forbid")
    #: What happens once empty: `leave` (the worker leaves the cluster and exits) or
    #: `sleep` (it runs its --sleep-command and is `asleep` until woken).
    then: Literal["leave", "sleep"] = "leave"
    #: Seconds in-flight requests may take; past it the gateway continues them on other
    #: workers and the worker proceeds anyway. None: wait until they finish.
    deadline: float | None = Field(None, gt=0)


class JoinRequest(BaseModel):
    """A worker announcing itself to a gateway (`POST /cluster/workers`)."""

    url: str
    id: str | None = None
