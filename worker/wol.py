"""Wake-on-LAN facts a worker reports: its MAC, the interface that reaches the gateway, and
that interface's broadcast address (where the gateway sends the magic packet).

The interface is the one the kernel would send from to the gateway (a UDP connect, which
sends nothing); without a gateway URL, the one holding the default route. Loopback and
interfaces without a hardware address cannot be woken: nothing is reported for them, unless
`--wake-mac` / `--wake-broadcast` say otherwise (tests use loopback broadcast).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import urllib.parse

import psutil

from wire.status import Wake
from worker.config import WorkerConfig

log = logging.getLogger("corral.worker")

NO_MAC = "00:00:00:00:00:00"


def route_to(host: str) -> str | None:
    """This box's address on the route to `host` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def _broadcast(addr: str, netmask: str | None) -> str:
    """The subnet's directed broadcast, from the netmask (an interface's own broadcast
    field is not always set: `ip addr add` without `brd +` leaves it empty or odd)."""
    if not netmask:
        return "255.255.255.255"
    return str(ipaddress.IPv4Network(f"{addr}/{netmask}", strict=False).broadcast_address)


def interface_for(ip: str) -> tuple[str, str, str] | None:
    """(interface, MAC, broadcast) of the interface holding IPv4 address `ip`."""
    for name, addrs in psutil.net_if_addrs().items():
        v4 = next((a for a in addrs if a.family == socket.AF_INET and a.address == ip), None)
        if v4 is None:
            continue
        mac = next((a.address for a in addrs if a.family == psutil.AF_LINK), "")
        return name, mac.lower().replace("-", ":"), _broadcast(ip, v4.netmask)
    return None


def discover(cfg: WorkerConfig) -> Wake | None:
    """What the gateway needs to wake this box, or None when it cannot be woken."""
    gateway = urllib.parse.urlsplit(cfg.join or "").hostname or "192.0.2.1"  # default route
    found = None
    ip = route_to(gateway)
    if ip is not None:
        found = interface_for(ip)
    name, mac, bcast = found or ("", "", "")
    mac = (cfg.wake_mac or mac).lower()
    if not mac or mac == NO_MAC:
        return None
    return Wake(mac=mac, interface=name, broadcast=cfg.wake_broadcast or bcast
                or "255.255.255.255", port=cfg.wake_port)


class WakeInfo:
    """`discover`, cached: re-read when the gateway URL changes (mDNS finds it late)."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self._for: str | None = "\0"
        self._wake: Wake | None = None

    def get(self) -> Wake | None:
        if self._for != self.cfg.join:
            self._for = self.cfg.join
            try:
                self._wake = discover(self.cfg)
            except Exception as exc:  # noqa: BLE001 - report nothing, say why once
                log.warning("cannot tell how to wake this box: %s", exc)
                self._wake = None
        return self._wake
