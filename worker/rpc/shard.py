"""An RPC shard: ggml's RPC server in a child process, behind a peer allowlist.

ggml's RPC server has no authentication (its README says never to expose it), so it binds
127.0.0.1 on an internal port, and what listens on `--rpc-host` is a small TCP proxy that
accepts connections only from the placement's head and closes any other at once. Both
live in the child (`python -m worker.rpc.shard`): the server on a thread (ctypes releases
the GIL), the proxy on the asyncio loop. The child is started only when a placement asks
for a shard and killed (its whole process group) when the placement goes away, so the port
is bound exactly while the shard is placed.

`ShardHost` is the worker's handle on that child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

log = logging.getLogger("corral.rpc")

READY_TIMEOUT = 30.0


def child_env(threads: int) -> dict[str, str]:
    """Environment for a process that runs ggml next to others on shared cores."""
    return {**os.environ, "GGML_NO_BACKTRACE": "1", "OMP_WAIT_POLICY": "passive",
            "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def die_with_parent() -> None:
    """SIGKILL this process when the worker that started it dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def normalize_ip(addr: str) -> str:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def resolve_peers(hosts: Iterable[str]) -> set[str]:
    """IP addresses of the allowed peers (host names resolved once, at placement)."""
    out: set[str] = set()
    for h in hosts:
        h = h.strip().strip("[]")
        if not h:
            continue
        try:
            out.add(normalize_ip(h))
        except ValueError:
            for info in socket.getaddrinfo(h, None, type=socket.SOCK_STREAM):
                out.add(normalize_ip(str(info[4][0])))
    return out


# --------------------------------------------------------------------------- the child


class AllowlistProxy:
    """Accepts TCP connections from allowed peers only and pipes them to `upstream`."""

    def __init__(self, allowed: set[str], upstream: tuple[str, int]) -> None:
        self.allowed = allowed
        self.upstream = upstream
        self.refused = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = normalize_ip(peer[0]) if peer else "?"
        if ip not in self.allowed:
            self.refused += 1
            print(f"refused RPC connection from {ip} (allowed: {sorted(self.allowed)})",
                  file=sys.stderr, flush=True)
            writer.transport.abort()  # no byte reaches ggml
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = asyncio.ensure_future(_pipe(reader, up_writer))
        b = asyncio.ensure_future(_pipe(up_reader, writer))
        try:
            await asyncio.wait((a, b), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (a, b):
                t.cancel()
            for w in (writer, up_writer):
                w.transport.abort()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while True:
        data = await src.read(1 << 16)
        if not data:
            return
        dst.write(data)
        if dst.transport.get_write_buffer_size() > (1 << 20):
            await dst.drain()


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            # A connection that says nothing: the server drops it and accepts the next.
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def _serve_proxy(host: str, port: int, proxy: AllowlistProxy, ready: int) -> None:
    server = await asyncio.start_server(proxy.handle, host, port, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    os.write(ready, f"READY {bound}\n".encode())
    os.close(ready)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.rpc.shard")
    ap.add_argument("--host", required=True, help="interface the proxy listens on")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--allow", required=True, help="comma-separated peer addresses")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    die_with_parent()
    # Our stdout carries one line, READY <port>. ggml prints a line per connection to its
    # stdout: kept on stderr with GGML_RPC_DEBUG set, dropped otherwise.
    ready = os.dup(1)
    if os.environ.get("GGML_RPC_DEBUG"):
        os.dup2(2, 1)
    else:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    from worker.rpc.ggml import ggml

    g = ggml()
    internal = _free_loopback_port()
    threading.Thread(target=g.serve_rpc, args=(f"127.0.0.1:{internal}", a.threads),
                     name="ggml-rpc-server", daemon=True).start()
    _wait_listening(internal, READY_TIMEOUT)
    proxy = AllowlistProxy(resolve_peers(a.allow.split(",")), ("127.0.0.1", internal))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_proxy(a.host, a.port, proxy, ready))
    return 0


# --------------------------------------------------------------------------- the parent


class ShardHost:
    """The worker's handle on one shard child."""

    def __init__(self, host: str, allow: list[str], threads: int, port: int = 0) -> None:
        self.host = host
        self.allow = allow
        self.threads = threads
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str | None:
        if not self.proc or not self.port:
            return None
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> str:
        """Starts the child; blocks until its proxy listens. Returns host:port."""
        args = [sys.executable, "-m", "worker.rpc.shard", "--host", self.host,
                "--port", str(self.port), "--allow", ",".join(self.allow),
                "--threads", str(self.threads)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=child_env(self.threads),
                                     start_new_session=True)
        line = _read_line(self.proc, READY_TIMEOUT)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the RPC shard did not start: {line!r}")
        self.port = int(line.split()[1])
        log.warning("RPC shard listening on %s for %s", self.endpoint, ",".join(self.allow))
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)
        if p.stdout:
            p.stdout.close()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The child's first stdout line, or "" if it exits or stays silent too long."""
    assert proc.stdout is not None
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0].decode(errors="replace").strip() if out else ""


if __name__ == "__main__":
    sys.exit(main())
