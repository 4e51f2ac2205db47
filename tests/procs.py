"""Real processes for tests: workers, gateways and redis-server on 127.0.0.1 ports.

Every process is started by us, tracked by PID, and stopped by PID on teardown (even when
the test fails). Readiness is a poll with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], bool], timeout: float = 60.0, interval: float = 0.05,
             what: str = "condition") -> None:
    """Polls `pred` until it is true or the deadline passes (then fails loudly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` at `url`/metrics whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        head, _, value = line.rpartition(" ")
        if line.startswith("#") or head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class Proc:
    """A child process with its log file; `stop()` ends it and its process group."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    name: str = "proc"
    popen: subprocess.Popen | None = None
    log_path: Path | None = None
    terminated: bool = False  # SIGTERM sent (`terminate`): `stop` only waits

    def start(self) -> Proc:
        fd, path = tempfile.mkstemp(prefix=f"corral-{self.name}-", suffix=".log")
        self.log_path = Path(path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.popen = subprocess.Popen(
            self.args, stdout=fd, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.terminated = False
        os.close(fd)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        """SIGKILL the whole group: a crash, as a test's fault injection."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def freeze(self) -> None:
        """SIGSTOP the group: alive, sockets open, but silent (a hung box, as the gateway
        sees it)."""
        os.killpg(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM without waiting (`stop` waits): see `stop_all`."""
        if self.alive() and not self.terminated:
            self.terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)  # a frozen process must see the TERM
                os.killpg(self.pid, signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen is None:
            return
        if self.alive():
            try:
                self.terminate()  # once: a second SIGTERM would cut a worker's drain short
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
            except ProcessLookupError:
                pass
        # Children the process left behind in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.log_path and self.log_path.exists():
            self.log_path.unlink()

    def wait_http(self, url: str, timeout: float = 120.0,
                  ok: Callable[[httpx.Response], bool] | None = None) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-4000:]}")
            r = httpx.get(url, timeout=2.0)
            return ok(r) if ok else r.status_code == 200

        wait_for(ready, timeout, 0.1, f"{self.name} at {url}")


def stop_all(procs: Iterable[Proc], timeout: float = 15.0) -> None:
    """Stops `procs` side by side: all get SIGTERM, then each is waited for (and killed past
    `timeout`), so their shutdowns overlap instead of adding up. Stop workers before the
    gateway probing them: a SIGTERMed worker a gateway probed lately waits (up to 1.5 s)
    for a probe to see it draining."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        p.stop(timeout)


def corral(*args: str, env: dict[str, str] | None = None, name: str = "corral") -> Proc:
    return Proc([sys.executable, "-m", "corral.cli", *args], env or {}, name).start()


@dataclass
class Worker:
    proc: Proc
    port: int
    id: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_ready(self) -> None:
        """Polls /status until the worker serves (ready or busy); fails if it exits first."""
        self.proc.wait_http(f"{self.url}/status",
                            ok=lambda r: r.json().get("state") in ("ready", "busy"))


def start_worker(*extra: str, port: int | None = None, backend: str = "llama",
                 env: dict[str, str] | None = None, wait: bool = True) -> Worker:
    port = port or free_port()
    proc = corral("worker", "--host", HOST, "--port", str(port), "--backend", backend,
                  *extra, env=env, name=f"worker-{port}")
    w = Worker(proc, port, f"{HOST}:{port}")
    if wait:
        try:
            w.wait_ready()
        except BaseException:  # never leave a worker behind that the caller cannot stop
            proc.stop()
            raise
    return w


@dataclass
class Gateway:
    proc: Proc
    port: int
    token: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_gateway(*extra: str, port: int | None = None, token: str = "test-cluster-token",
                  env: dict[str, str] | None = None, wait: bool = True) -> Gateway:
    port = port or free_port()
    proc = corral("gateway", "--host", HOST, "--port", str(port), *extra,
                  env={"CORRAL_CLUSTER_TOKEN": token, **(env or {})}, name=f"gateway-{port}")
    g = Gateway(proc, port, token)
    if wait:
        try:
            proc.wait_http(f"{g.url}/healthz", timeout=30)
        except BaseException:
            proc.stop()
            raise
    return g


def start_redis() -> tuple[Proc, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    proc = Proc([exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
                name=f"redis-{port}").start()

    def up() -> bool:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_for(up, 20, 0.05, "redis-server")
    return proc, f"redis://{HOST}:{port}/0"
