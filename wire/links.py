"""Link measurement both apps share: a TCP handshake's round trip.

SYN to SYN-ACK is answered by the peer's kernel, so the time is the network's, not the
far process's (an HTTP ping would time its event loop too). On Linux the kernel's own
sample is read (TCP_INFO `tcpi_rtt`, taken when the SYN-ACK arrived), so our event loop's
scheduling delay is not counted either; elsewhere the connect is timed by the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
import urllib.parse

TCPI_RTT_OFFSET = 68  # struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_rtt is the 16th


async def connect_rtt(host: str, port: int, limit: float = 2.0) -> float:
    """One TCP handshake's duration in ms (the connection is closed at once)."""
    t0 = time.perf_counter()
    _, w = await asyncio.wait_for(asyncio.open_connection(host, port), limit)
    ms = (time.perf_counter() - t0) * 1000
    sock = w.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_INFO"):
        with contextlib.suppress(OSError, struct.error):
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            kernel_us = struct.unpack_from("I", info, TCPI_RTT_OFFSET)[0]
            if kernel_us:
                ms = kernel_us / 1000
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return ms


def host_port(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)
