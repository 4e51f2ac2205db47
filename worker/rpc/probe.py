"""Is a ggml RPC server there and sane? One HELLO over plain TCP, with a timeout.

ggml's client aborts the whole process when a server it registers does not answer, so a
split head probes every shard with this first. The wire format (ggml RPC protocol 7):
request `| cmd: u8 = 14 (HELLO) | size: u64 | conn_caps: 24 bytes |`, response
`| size: u64 | major: u8 | minor: u8 | patch: u8 | pad: u8 | conn_caps: 24 bytes |`.
All-zero capabilities ask for plain TCP. A ggml RPC server serves one client at a time:
probe only a server no head is using (a busy one just times out).
"""

from __future__ import annotations

import socket
import struct
import time

RPC_CMD_HELLO = 14
CONN_CAPS_SIZE = 24
PROTO_MAJOR = 7
_RESPONSE_SIZE = 4 + CONN_CAPS_SIZE


class ProbeError(Exception):
    pass


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port endpoint: {endpoint!r}")
    return host.strip("[]"), int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("the server closed the connection")
        buf += chunk
    return bytes(buf)


def hello(endpoint: str, timeout: float = 2.0) -> tuple[int, int, int]:
    """The server's protocol version; raises ProbeError if it is not a usable RPC server."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", CONN_CAPS_SIZE)
                      + bytes(CONN_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(s, 8))
            if size != _RESPONSE_SIZE:
                raise ProbeError(f"unexpected HELLO response size {size}")
            major, minor, patch = _recv_exact(s, size)[:3]
    except (OSError, TimeoutError) as exc:
        raise ProbeError(f"{endpoint}: {exc or type(exc).__name__}") from None
    if major != PROTO_MAJOR:
        raise ProbeError(f"{endpoint}: RPC protocol {major}.{minor}.{patch}, "
                         f"this llama.cpp speaks {PROTO_MAJOR}.x")
    return major, minor, patch


def wait_hello(endpoint: str, deadline: float, timeout: float = 2.0) -> tuple[int, int, int]:
    """Probes until the server answers or `deadline` (time.monotonic()) passes."""
    last: ProbeError | None = None
    while True:
        try:
            return hello(endpoint, min(timeout, max(0.1, deadline - time.monotonic())))
        except ProbeError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise last
        time.sleep(0.2)
