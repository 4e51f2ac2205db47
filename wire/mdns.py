"""Zero-config discovery: gateways advertise `_corral._tcp.local.`, workers browse for it.

A record holds what a worker needs to find a gateway and nothing it needs to join one:
the addresses, the port and TXT `cluster=<name>`, `v=1`. The cluster token is never in a
record; a worker that finds a gateway joins over HTTP with its token exactly as `--join`
does, and one without the token is refused as always.

Both sides run only when bound to a non-loopback address or asked (`--discover`), so the
many loopback tests never find each other or the host's real network; `--join URL` stays
the fallback where multicast does not pass (SSH tunnels, Docker bridges, some Wi-Fi).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE = "_corral._tcp.local."
DEFAULT_CLUSTER = "corral"
RECHECK_SECONDS = 1.0  # a found gateway not answering yet is tried again this often
log = logging.getLogger("corral.mdns")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def wanted(host: str, discover: bool | None) -> bool:
    """Discovery runs when asked, or by default when bound beyond loopback."""
    return discover if discover is not None else not is_loopback(host)


def local_addresses() -> list[str]:
    """This box's IPv4 addresses outside loopback, in interface order."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                out.append(ip.ip)
    return out


def _bound(host: str) -> list[str]:
    """The addresses a service bound to `host` is reachable at."""
    if host in ("0.0.0.0", "", "::"):
        return local_addresses() or ["127.0.0.1"]
    return [socket.gethostbyname(host)]


def _interfaces(host: str) -> InterfaceChoice | list[str]:
    return InterfaceChoice.All if host in ("0.0.0.0", "", "::") else [socket.gethostbyname(host)]


def source_address(peer_host: str) -> str:
    """The local address the kernel would send from to reach `peer_host`: the interface
    that reaches it, on a box with several. A UDP connect sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_host, 9))
        return s.getsockname()[0]


class Advertiser:
    """A gateway's record, registered while it runs."""

    def __init__(self, host: str, port: int, cluster: str = DEFAULT_CLUSTER) -> None:
        self.addrs = _bound(host)
        self.azc = AsyncZeroconf(interfaces=_interfaces(host), ip_version=IPVersion.V4Only)
        label = f"{cluster}-{self.addrs[0].replace('.', '-')}-{port}"
        self.info = ServiceInfo(
            SERVICE, f"{label}.{SERVICE}", port=port,
            addresses=[socket.inet_aton(a) for a in self.addrs],
            properties={"cluster": cluster, "v": "1"}, server=f"{label}.local.")

    async def start(self) -> None:
        await self.azc.async_register_service(self.info)
        log.warning("advertising %s on %s (mDNS %s)", self.info.name, self.addrs, SERVICE)

    async def stop(self) -> None:
        try:
            await self.azc.async_unregister_service(self.info)
        finally:
            await self.azc.async_close()


@dataclass(frozen=True)
class Found:
    """A gateway seen on the network."""

    name: str
    cluster: str
    addresses: tuple[str, ...]
    port: int


async def _reachable(found: Found) -> str | None:
    """The first of a record's addresses that accepts a TCP connection within 1 s."""
    for addr in found.addresses:
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(addr, found.port), 1.0)
        except (OSError, TimeoutError):
            continue
        w.close()
        return f"http://{addr}:{found.port}"
    return None


async def find_gateway(host: str, cluster: str | None) -> str:
    """Browses until a gateway of `cluster` (any cluster when None) answers; its URL.

    Several clusters and none named: the first that answers is taken and the others
    seen by then are logged, so the choice is visible. Browses until one is reachable
    (a caller wanting a deadline wraps it in asyncio.timeout)."""
    azc = AsyncZeroconf(interfaces=_interfaces(host), ip_version=IPVersion.V4Only)
    names: asyncio.Queue[str] = asyncio.Queue()

    def on_change(zeroconf: object, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.put_nowait(name)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE, handlers=[on_change])
    seen: dict[str, Found] = {}
    try:
        while True:
            name = await names.get()
            info = AsyncServiceInfo(SERVICE, name)
            if not await info.async_request(azc.zeroconf, 3000):
                continue
            props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            found = Found(name, props.get("cluster", ""), tuple(info.parsed_addresses()),
                          info.port or 0)
            seen[name] = found
            if cluster is not None and found.cluster != cluster:
                log.warning("mDNS: gateway %s is in cluster %r, not %r: ignored",
                            name, found.cluster, cluster)
                continue
            url = await _reachable(found)
            if url is None:  # not listening yet (records go out at start-up), or cut off
                log.info("mDNS: gateway %s advertises %s, none reachable yet",
                         name, found.addresses)
                asyncio.get_running_loop().call_later(RECHECK_SECONDS, names.put_nowait, name)
                continue
            others = sorted({f.cluster for f in seen.values()} - {found.cluster})
            if cluster is None and others:
                log.warning("mDNS: several clusters (%s); joining %r (name one with "
                            "--cluster)", ", ".join(others), found.cluster)
            return url
    finally:
        await browser.async_cancel()
        await azc.async_close()
