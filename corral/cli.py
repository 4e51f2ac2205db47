"""`corral up|gateway|worker|status|keys|drain|bench`.

Every flag also reads `CORRAL_<FLAG>` from the environment (flags win). Heavy modules
(llama_cpp, openvino) are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.config import WorkerConfig

#: Slots per worker: a team's requests decode together instead of queueing behind one
#: another (docs/BENCHMARKS.md, "Default --parallel"); llama-server also defaults to 4.
DEFAULT_PARALLEL = 4


def parse_size(text: str) -> int:
    """Bytes from `123`, `512M`, `2G`, `1.5GiB`."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


class _EnvDefaults(argparse.ArgumentParser):
    """An ArgumentParser whose defaults come from CORRAL_<FLAG> environment variables."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)
        long = next((a for a in args if a.startswith("--")), None)
        if long and action.dest != "help":
            env = "CORRAL_" + long[2:].upper().replace("-", "_")
            raw = os.environ.get(env)
            if raw is not None:
                if isinstance(action, argparse._AppendAction):
                    action.default = [v for v in raw.split(",") if v]
                elif isinstance(action, argparse._StoreTrueAction):
                    action.default = raw.lower() in ("1", "true", "yes", "on")
                else:
                    action.default = action.type(raw) if action.type else raw
            if action.help and action.help is not argparse.SUPPRESS:
                action.help += f" [env {env}]"
        return action


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _worker_flags(p: argparse.ArgumentParser, with_endpoint: bool = True) -> None:
    if with_endpoint:
        p.add_argument("--host", default="127.0.0.1", help="address to bind")
        p.add_argument("--port", type=int, default=8100, help="port to bind")
        p.add_argument("--model", default=None, help="model name or .gguf path")
    p.add_argument("--backend", default="llama", choices=["llama", "openvino", "sim"],
                   help="inference backend")
    p.add_argument("--parallel", type=positive_int, default=None,
                   help=f"slots decoded at once (default {DEFAULT_PARALLEL})")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for decoding (default: a fair share of the host's CPUs "
                   "among the workers on it, re-adjusted as they come and go)")
    p.add_argument("--host-id", default=None,
                   help="workers with the same host id share its CPUs (default: from "
                   "/etc/machine-id, else the hostname)")
    p.add_argument("--ctx-size", type=int, default=2048, help="context tokens per slot")
    p.add_argument("--memory-limit", type=parse_size, default=None,
                   help="memory offered to placement, e.g. 2G")
    p.add_argument("--device", default="CPU", help="openvino device: CPU, GPU, NPU, AUTO")
    p.add_argument("--batch-invariant", choices=["on", "off"], default=None,
                   help="openvino on CPU: 'on' (the default) keeps greedy output the same "
                        "alone and batched, which failover continuation relies on; 'off' "
                        "trades that for OpenVINO's faster defaults (docs/BENCHMARKS.md)")
    p.add_argument("--sim-tokens-per-second", type=float, default=50.0,
                   help="sim backend: decode rate per slot")
    p.add_argument("--sim-ttft", type=float, default=0.05,
                   help="sim backend: seconds to first token")
    p.add_argument("--sim-prefill-tokens-per-second", type=float, default=0.0,
                   help="sim backend: prompt tokens read per second, one prompt at a time "
                        "(0 keeps the fixed --sim-ttft)")


def _lifecycle_flags(p: argparse.ArgumentParser) -> None:
    """Drain, sleep, wake and polite mode (worker/lifecycle.py, wol.py, polite.py)."""
    p.add_argument("--drain-timeout", type=float, default=8.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before exiting")
    p.add_argument("--sleep-command", default=None,
                   help="run when the gateway puts this idle box to sleep, e.g. "
                        "'systemctl suspend' (without it the box never sleeps)")
    p.add_argument("--wake-mac", default=None,
                   help="MAC address for Wake-on-LAN (default: of the interface that "
                        "reaches the gateway)")
    p.add_argument("--wake-broadcast", default=None,
                   help="broadcast address the magic packet goes to (default: that "
                        "interface's)")
    p.add_argument("--wake-port", type=int, default=9, help="Wake-on-LAN UDP port")
    p.add_argument("--polite", action="store_true", default=False,
                   help="yield to the box's owner: offer no slots while other processes "
                        "use the CPU or memory (or a terminal is in use), back when idle")
    p.add_argument("--polite-cpu", type=float, default=0.25,
                   help="share of the host's CPUs used by others that makes a polite "
                        "worker yield")
    p.add_argument("--polite-cpu-low", type=float, default=None,
                   help="share below which it comes back (default half of --polite-cpu)")
    p.add_argument("--polite-memory", type=float, default=0.10,
                   help="available-memory share below which a polite worker yields")
    p.add_argument("--polite-calm", type=float, default=5.0,
                   help="seconds the owner must stay idle before a polite worker comes back")


def build_parser() -> argparse.ArgumentParser:
    parser = _EnvDefaults(prog="corral", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_EnvDefaults)

    w = sub.add_parser("worker", help="one worker: its --model, or the models a gateway "
                       "places on it")
    _worker_flags(w)
    w.add_argument("--id", default=None, help="worker id (default host:port)")
    w.add_argument("--join", default=None, help="gateway URL to join")
    w.add_argument("--advertise-url", default=None, help="URL the gateway reaches us at")
    w.add_argument("--cluster-token", default=None, help="token for joining a gateway")
    w.add_argument("--discover", action="store_true", default=None,
                   help="find the gateway by mDNS without --join (default: when --host is "
                        "not loopback)")
    w.add_argument("--cluster", default=None,
                   help="with discovery: join the gateway of this cluster name")
    w.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot")
    w.add_argument("--rpc-host", default=None,
                   help="interface an RPC shard listens on when placed (default --host)")
    w.add_argument("--log-level", default="warning")
    _lifecycle_flags(w)
    w.set_defaults(func=_cmd_worker)

    g = sub.add_parser("gateway", help="the OpenAI endpoint in front of the workers")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--worker", action="append", default=[], help="worker URL (repeatable)")
    g.add_argument("--model", action="append", default=[],
                   help="model to keep placed (repeatable)")
    g.add_argument("--models-dir", default=None,
                   help="catalogue every .gguf here: loaded on demand, unloaded when idle")
    g.add_argument("--redis-url", "--redis", dest="redis_url", default=None,
                   help="Redis URL for state shared by gateway replicas")
    g.add_argument("--config", default=None, help="corral.toml")
    g.add_argument("--cluster-token", default=None, help="token workers join with")
    g.add_argument("--cluster", default="corral",
                   help="cluster name advertised by mDNS (workers pick it with --cluster)")
    g.add_argument("--discover", action="store_true", default=None,
                   help="advertise by mDNS (default: when --host is not loopback)")
    g.add_argument("--log-level", default="warning")
    g.set_defaults(func=_cmd_gateway)

    u = sub.add_parser("up", help="a gateway and N local workers on this box")
    u.add_argument("--workers", type=int, default=2, help="local workers")
    u.add_argument("--model", default=None, help="model name or .gguf path")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=8000)
    u.add_argument("--config", default=None)
    u.add_argument("--redis-url", "--redis", dest="redis_url", default=None)
    _worker_flags(u, with_endpoint=False)
    u.set_defaults(func=_cmd_up)

    s = sub.add_parser("status", help="the cluster as a table")
    s.add_argument("--gateway", default="http://127.0.0.1:8000")
    s.add_argument("--json", action="store_true", help="print /cluster as JSON")
    s.add_argument("--token", default=None,
                   help="the cluster token, for a closed gateway (default: "
                   "$CORRAL_CLUSTER_TOKEN)")
    s.add_argument("--api-key", default=None, help="or an API key, for a closed gateway")
    s.set_defaults(func=_cmd_status)

    from corral import drain, keys

    keys.add_parser(sub)
    drain.add_parser(sub)

    b = sub.add_parser("bench", help="load generator for any OpenAI-compatible endpoint")
    b.add_argument("--base-url", required=True)
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--requests", type=int, default=50)
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=None,
                      help="closed loop: requests in flight (default 1)")
    mode.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--prompt", default="Tell me a short story about a horse.")
    b.add_argument("--stream", action="store_true")
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot", default=None, help="write a PNG plot here")
    b.add_argument("--api-key", default="none")
    b.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one request may take in total")
    b.add_argument("--seed", type=int, default=0, help="seed for Poisson arrival times")
    b.add_argument("--distinct-prompts", action="store_true",
                   help="number each prompt so no two requests share a prefix")
    b.set_defaults(func=_cmd_bench)
    return parser


def _cmd_worker(a: argparse.Namespace) -> int:
    from worker.serve import run

    return run(worker_config(a))


def worker_config(a: argparse.Namespace) -> WorkerConfig:
    """The `corral worker` flags as the worker's one typed configuration."""
    from worker.config import WorkerConfig
    from worker.models import DEFAULT_MODEL

    return WorkerConfig(
        host=a.host, port=a.port, backend=a.backend,
        # Without --model a worker that joins a gateway waits to be placed (a replica, a
        # split head or an RPC shard); one on its own serves the default model.
        model=a.model or (None if _joins(a) and a.backend != "sim" else DEFAULT_MODEL),
        rpc_host=a.rpc_host,
        id=a.id, join=a.join, advertise_url=a.advertise_url, cluster_token=a.cluster_token,
        discover=a.discover, cluster=a.cluster,
        parallel=a.parallel or DEFAULT_PARALLEL, threads=a.threads, host_id=a.host_id,
        ctx_size=a.ctx_size, max_queue=a.max_queue, memory_limit=a.memory_limit,
        device=a.device, batch_invariant=None if a.batch_invariant is None
        else a.batch_invariant == "on", sim_tokens_per_second=a.sim_tokens_per_second,
        sim_ttft=a.sim_ttft, sim_prefill_tokens_per_second=a.sim_prefill_tokens_per_second,
        log_level=a.log_level,
        drain_timeout=a.drain_timeout, sleep_command=a.sleep_command, wake_mac=a.wake_mac,
        wake_broadcast=a.wake_broadcast, wake_port=a.wake_port, polite=a.polite,
        polite_cpu=a.polite_cpu, polite_cpu_low=a.polite_cpu_low,
        polite_memory=a.polite_memory, polite_calm=a.polite_calm,
    )


def _joins(a: argparse.Namespace) -> bool:
    """The worker will join a gateway: by --join, or by mDNS discovery."""
    from wire.mdns import wanted

    return bool(a.join) or wanted(a.host, a.discover)


def _config_error(command: str, exc: Exception) -> int:
    """A config file that cannot be used: one clear message, no traceback, exit 2."""
    print(f"corral {command}: {exc}", file=sys.stderr)
    return 2


def _cmd_gateway(a: argparse.Namespace) -> int:
    from gateway.config_file import ConfigError, load_config

    try:
        cfg = load_config(a)
    except ConfigError as exc:
        return _config_error("gateway", exc)
    from gateway.serve import run

    return run(cfg)


def _cmd_up(a: argparse.Namespace) -> int:
    from corral.up import run
    from gateway.config_file import ConfigError, load

    try:  # before starting anything: the gateway child would refuse it anyway
        load(a.config)
    except ConfigError as exc:
        return _config_error("up", exc)
    return run(a)


def _cmd_status(a: argparse.Namespace) -> int:
    from corral.status import run

    return run(a)


def _cmd_bench(a: argparse.Namespace) -> int:
    from corral.bench import run

    return run(a)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
