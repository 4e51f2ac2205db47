"""The worker's configuration: one typed object, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from worker.models import DEFAULT_MODEL


@dataclass
class WorkerConfig:
    host: str = "127.0.0.1"
    port: int = 8100
    backend: str = "llama"  # llama | openvino | sim
    model: str | None = DEFAULT_MODEL
    id: str | None = None
    join: str | None = None  # gateway URL to join
    advertise_url: str | None = None  # how the gateway reaches us (default http://host:port)
    cluster_token: str | None = None
    discover: bool | None = None  # mDNS browse without --join; None: when bound off loopback
    cluster: str | None = None  # the cluster to join when several gateways advertise
    parallel: int = 1
    threads: int | None = None  # None: a fair share of the host's CPUs (worker.hostcores)
    host_id: str | None = None  # None: from /etc/machine-id, else the hostname
    ctx_size: int = 2048  # tokens per slot
    max_queue: int = 64
    memory_limit: int | None = None
    rpc_host: str | None = None  # where an RPC shard listens (default: host)
    device: str = "CPU"  # openvino: CPU | GPU | NPU | AUTO
    # openvino on CPU: the batch-invariant properties (None: CORRAL_OPENVINO_BATCH_INVARIANT,
    # else on); off trades greedy identity alone vs batched for speed.
    batch_invariant: bool | None = None
    sim_tokens_per_second: float = 50.0
    sim_ttft: float = 0.05
    sim_prefill_tokens_per_second: float = 0.0  # 0: a fixed sim_ttft instead
    log_level: str = "warning"
    # Lifecycle (worker/lifecycle.py): SIGTERM drains for at most this long, then exits; the
    # gateway's idle-sleep runs `sleep_command` after a drain; Wake-on-LAN facts it reports
    # (worker/wol.py finds them; these override).
    drain_timeout: float = 8.0
    sleep_command: str | None = None
    wake_mac: str | None = None
    wake_broadcast: str | None = None
    wake_port: int = 9
    # Polite mode (worker/polite.py): yield to the box's owner.
    polite: bool = False
    polite_cpu: float = 0.25  # others' CPU share of the host that makes us yield
    polite_cpu_low: float | None = None  # ...and below which we come back (default half)
    polite_memory: float = 0.10  # available memory share below which we yield
    polite_calm: float = 5.0  # seconds the owner must stay idle before we come back
    polite_input_idle: float = 30.0  # terminal input this recent makes us yield

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"

    @property
    def worker_id(self) -> str:
        return self.id or f"{self.host}:{self.port}"
