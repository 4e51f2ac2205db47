"""The lab's delay stage: holds a box's frames for a link's latency, addresses untouched.

    ip netns exec BOX python tests/lab_delay.py --switch-ns SW --delay-ms 2 --jitter-ms 0.5 \
        --up ub-x:eth0 --down db-x:p-x

This kernel has no netem (nor fq, so no EDT pacing), and no qdisc or tc action here can
hold a packet for a time. So tc redirects every frame the box's link sends (`clsact`
egress, `u32` match-all, `mirred` to a veth pair `ua`/`da` that carries the link's `tbf`
rate) and this process reads each frame off the pair's far end (`ub`/`db`, in the switch
namespace, unbridged) with an AF_PACKET socket, holds it `delay ± jitter`, and sends the
same bytes on the real port (box `eth0` uplink, switch port `p-x` downlink) with
PACKET_QDISC_BYPASS, so they skip the redirect that brought them here. The frame is sent
as it was built, already ARP-resolved: source and destination addresses are the box's own
(a TCP relay would replace them). PACKET_VNET_HDR carries GSO metadata, so 64 KiB TCP
super-frames pass without segmenting in Python. Order is kept: a frame never leaves before
the one ahead of it (jitter without reordering, as a Wi-Fi link's queue behaves).

Prints READY once its sockets are bound; on SIGTERM prints one JSON line with the delay
it actually added (ms: count, mean, p50, p99) and exits.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import random
import select
import signal
import socket
import sys
import time

SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    """Moves this thread into the network namespace at `path` (sockets made before stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def packet_socket(dev: str, send: bool) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    if send:
        s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    else:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((dev, ETH_P_ALL if not send else 0))
    s.setblocking(False)
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch-ns", required=True, help="name of the switch namespace")
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--up", required=True, help="RECV_DEV(switch ns):SEND_DEV(this ns)")
    ap.add_argument("--down", required=True, help="RECV_DEV:SEND_DEV, both in the switch ns")
    a = ap.parse_args()
    up_recv, up_send = a.up.split(":")
    down_recv, down_send = a.down.split(":")
    box_send = packet_socket(up_send, send=True)  # this (box) namespace
    setns(f"/run/netns/{a.switch_ns}")
    pipes = {  # recv socket -> (send socket, queue of (due, frame))
        packet_socket(up_recv, send=False): (box_send, collections.deque()),
        packet_socket(down_recv, send=False): (packet_socket(down_send, send=True),
                                               collections.deque()),
    }
    delay, jitter = a.delay_ms / 1000, a.jitter_ms / 1000
    added: list[float] = []
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("READY", flush=True)
    rng = random.Random(1)
    recvs = list(pipes)
    while not stop:
        now = time.monotonic()
        due = min((q[0][0] for _, q in pipes.values() if q), default=now + 0.2)
        try:
            ready, _, _ = select.select(recvs, [], [], max(0.0, due - now))
        except InterruptedError:
            continue
        now = time.monotonic()
        for r in ready:
            q = pipes[r][1]
            while True:
                try:
                    frame = r.recv(70000)
                except BlockingIOError:
                    break
                last = q[-1][0] if q else 0.0
                q.append((max(last, now + delay + rng.uniform(-jitter, jitter)), frame, now))
        now = time.monotonic()
        for s, q in pipes.values():
            while q and q[0][0] <= now:
                _, frame, arrived = q.popleft()
                with contextlib.suppress(OSError):  # a full link drops it, as a wire would
                    s.send(frame)
                added.append(time.monotonic() - arrived)
    ms = sorted(x * 1000 for x in added)
    n = len(ms)
    print(json.dumps({"count": n, "mean": sum(ms) / n if n else 0,
                      "p50": ms[n // 2] if n else 0,
                      "p99": ms[min(n - 1, int(n * 0.99))] if n else 0}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
