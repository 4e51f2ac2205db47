"""Link measurement both apps share: a TCP handshake's round trip, timed.

SYN to SYN-ACK is answered by the peer's kernel, so the time is the network's, not the
far process's (an HTTP ping would time its event loop too).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse


async def connect_rtt(host: str, port: int, limit: float = 2.0) -> float:
    """One TCP handshake's duration in ms (the connection is closed at once)."""
    t0 = time.perf_counter()
    _, w = await asyncio.wait_for(asyncio.open_connection(host, port), limit)
    ms = (time.perf_counter() - t0) * 1000
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return ms


def host_port(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)
