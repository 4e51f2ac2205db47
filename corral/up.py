"""`corral up`: one gateway and N local workers on this box, as child processes.

Workers take free ports and join the gateway with a cluster token made up for this run and
passed through the environment (never on a command line). The workers share the box's CPUs
by themselves (worker/hostcores.py: each computing worker takes its fair share, and the
others grow back when one dies), unless --threads fixes them. Ctrl-C or SIGTERM stops
everything: each child runs in its own process group, which is signalled by the child's PID
(SIGTERM, then SIGKILL after a grace period); children also get SIGTERM from the kernel if
this process dies without cleaning up (Linux).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import httpx
from rich.console import Console

GRACE_SECONDS = 10.0
READY_TIMEOUT = 600.0


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM us if `corral up` dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)


class _Stop(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Stop


class Children:
    """The processes we started, each the leader of its own process group."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(args, env=env, start_new_session=True,
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.procs.append((name, p))
        return p

    def exited(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs if p.poll() is not None]

    def stop(self) -> None:
        # Workers first, while the gateway still probes them: a stopping worker waits for
        # the gateway to see it leave (up to 1.5 s), which a stopped gateway never does.
        workers = [p for n, p in self.procs if n != "gateway"]
        gateways = [p for n, p in self.procs if n == "gateway"]
        for group in (workers, gateways):
            for p in group:
                self._signal(p, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_SECONDS
            for p in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.1, deadline - time.monotonic()))
        for p in workers + gateways:  # whatever is left, and anything a child left in its group
            self._signal(p, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)

    @staticmethod
    def _signal(p: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)  # the group led by this child's PID


def _worker_args(a: argparse.Namespace, port: int, join: str) -> list[str]:
    args = [sys.executable, "-m", "corral.cli", "worker", "--host", "127.0.0.1",
            "--port", str(port), "--backend", a.backend, "--join", join,
            "--ctx-size", str(a.ctx_size), "--device", a.device,
            "--sim-tokens-per-second", str(a.sim_tokens_per_second),
            "--sim-ttft", str(a.sim_ttft),
            "--sim-prefill-tokens-per-second", str(a.sim_prefill_tokens_per_second)]
    # llama workers start without a model: the gateway places it (replicas where it fits,
    # an RPC split where it fits no worker's --memory-limit).
    if a.model and not _placed_by_gateway(a):
        args += ["--model", a.model]
    if getattr(a, "batch_invariant", None):
        args += ["--batch-invariant", a.batch_invariant]
    if a.parallel:
        args += ["--parallel", str(a.parallel)]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if a.host_id:
        args += ["--host-id", a.host_id]
    if a.memory_limit:
        args += ["--memory-limit", str(a.memory_limit)]
    return args


def _gateway_args(a: argparse.Namespace) -> list[str]:
    args = [sys.executable, "-m", "corral.cli", "gateway", "--host", a.host,
            "--port", str(a.port)]
    if a.config:
        args += ["--config", a.config]
    if a.redis_url:
        args += ["--redis-url", a.redis_url]
    if _placed_by_gateway(a):
        from worker.models import DEFAULT_MODEL

        args += ["--model", a.model or DEFAULT_MODEL]
    return args


def _placed_by_gateway(a: argparse.Namespace) -> bool:
    return a.backend == "llama"


def _auth() -> dict[str, str]:
    """The cluster token for /cluster, closed once API keys are configured (auth.py)."""
    token = os.environ.get("CORRAL_CLUSTER_TOKEN", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _settled(base: str, n: int) -> bool:
    """All n workers joined, every declared model placed and serving, and no worker still
    loading a placement (with a split, some workers serve nothing themselves)."""
    c = httpx.get(f"{base}/cluster", timeout=2.0, headers=_auth()).json()
    if len(c.get("workers", [])) < n:
        return False
    placements = c.get("placements", [])
    busy = [w for w in c.get("workers", [])
            if (w.get("placement") or {}).get("state") in ("fetching", "loading")]
    return bool(placements) and not busy and all(
        p.get("state", "ready") == "ready" for p in placements)


def _unplaceable(base: str, n: int) -> list[str]:
    """Why each declared model cannot be placed, once the plan counted all n workers."""
    c = httpx.get(f"{base}/cluster", timeout=2.0, headers=_auth()).json()
    return [f"model {p['model']} cannot be placed: {p.get('reason')}"
            for p in c.get("placements", []) if p.get("state") == "unplaceable"
            and (p.get("offer") or {}).get("workers", 0) >= n]


def _ready_count(base: str) -> tuple[int, list[str]]:
    r = httpx.get(f"{base}/cluster", timeout=2.0, headers=_auth())
    ws = r.json().get("workers", [])
    ready = [w for w in ws if w.get("state") in ("ready", "busy")]
    models = sorted({m for w in ready for m in w.get("models", [])})
    return len(ready), models


def run(a: argparse.Namespace) -> int:
    console = Console(stderr=False)
    n = max(1, a.workers)
    token = os.environ.get("CORRAL_CLUSTER_TOKEN") or secrets.token_urlsafe(24)
    os.environ["CORRAL_CLUSTER_TOKEN"] = token  # _auth(): /cluster may be closed
    env = {**os.environ, "CORRAL_CLUSTER_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    host = "127.0.0.1" if a.host in ("0.0.0.0", "::", "") else a.host
    base = f"http://{host}:{a.port}"
    children = Children()
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    # Even when started in the background with SIGINT ignored, Ctrl-C/SIGINT stops us.
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        children.start("gateway", _gateway_args(a), env)
        for i in range(n):
            children.start(f"worker-{i + 1}", _worker_args(a, _free_port(), base), env)
        if not _wait_ready(console, children, base, n):
            return 1
        _, models = _ready_count(base)
        console.print(f"[bold green]Corral is up[/]: {n} worker(s) serving "
                      f"{', '.join(models) or '?'} "
                      f"({f'{a.threads} thread(s) each' if a.threads else 'sharing the CPUs'})")
        console.print(f"  OpenAI base URL  [bold]{base}/v1[/]")
        console.print(f"  dashboard        {base}/")
        console.print(f"  metrics          {base}/metrics")
        console.print(f"  status           corral status --gateway {base}")
        console.print("Press Ctrl-C to stop.", highlight=False)
        sys.stdout.flush()
        while True:
            gone = children.exited()
            if any(name == "gateway" for name, _ in gone):
                console.print("[red]the gateway exited; stopping[/]")
                return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        console.print("stopping…")
        return 0
    finally:
        children.stop()
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def _wait_ready(console: Console, children: Children, base: str, n: int) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    with console.status("starting the gateway…") as status:
        while time.monotonic() < deadline:
            gone = children.exited()
            if gone:
                names = ", ".join(f"{name} (exit {rc})" for name, rc in gone)
                console.print(f"[red]{names} stopped during startup; stopping everything[/]")
                return False
            try:
                ready, _ = _ready_count(base)
                stuck = _unplaceable(base, n)
            except (httpx.HTTPError, ValueError):
                time.sleep(0.25)
                continue
            if ready >= n or (ready and _settled(base, n)):
                return True
            if stuck:  # every worker is in, and still it fits nowhere: waiting is pointless
                for line in stuck:
                    console.print(f"[red]{line}[/]", highlight=False)
                console.print("[red]stopping: give the workers more memory (--memory-limit) "
                              "or more workers (--workers)[/]")
                return False
            status.update(f"loading the model: {ready}/{n} worker(s) ready…")
            time.sleep(0.25)
    console.print(f"[yellow]not every worker became ready within {READY_TIMEOUT:g}s; "
                  "serving with those that did[/]")
    return True
