"""Hosts whose workers decode on more threads than the host has CPUs.

Workers on one host share its cores by themselves (worker/hostcores.py), but an explicit
`--threads` is always honoured, and workers that cannot see each other (containers without
a shared directory) each take every core. Either way every token on that host gets slower
and the gateway's routing misjudges it, so the gateway says so: one log line when a host
becomes oversubscribed (and one when it stops), and a `warnings` list in `/cluster`.

Hosts are told apart by `hardware.host_id` (the hostname for workers that report none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("corral.gateway")

#: Seconds a host must stay oversubscribed before it is reported (shares settle in ~2 s).
SETTLE_SECONDS = 3.0


def oversubscribed(workers: Iterable[Any]) -> list[dict[str, Any]]:
    """One warning per host whose live workers' threads add up to more than its CPUs.

    `workers` are registry workers (`id`, `state`, `status`); down ones and sim ones (which
    compute nothing) are left out."""
    hosts: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for w in workers:
        st = w.status or {}
        hw = st.get("hardware") or {}
        if w.state == "down" or st.get("backend") == "sim" or not isinstance(hw, dict):
            continue
        host = hw.get("host_id") or hw.get("hostname")
        if host:
            hosts.setdefault(str(host), []).append((w.id, hw))
    out = []
    for host, members in sorted(hosts.items()):
        cpus = max(_int(hw.get("cpus")) or _int(hw.get("cores")) for _, hw in members)
        threads = {wid: _int(hw.get("threads")) for wid, hw in members}
        total = sum(threads.values())
        if not cpus or total <= cpus:
            continue
        members.sort(key=lambda m: m[0])
        names = ", ".join(
            f"{wid} {threads[wid]}{' (--threads)' if hw.get('threads_explicit') else ''}"
            for wid, hw in members)
        hostname = next((hw.get("hostname") for _, hw in members if hw.get("hostname")), "")
        where = f"{hostname} ({host})" if hostname and hostname != host else host
        out.append({
            "kind": "oversubscribed",
            "host": host,
            "hostname": hostname,
            "cpus": cpus,
            "threads": total,
            "workers": [wid for wid, _ in members],
            "message": f"host {where} is oversubscribed: its workers decode on {total} "
                       f"threads over {cpus} CPUs ({names}); every token there is slower. "
                       "Drop --threads so they share the CPUs, or move a worker.",
        })
    return out


def _int(v: Any) -> int:
    try:
        return max(0, int(v or 0))
    except (TypeError, ValueError):
        return 0


class HostWatch:
    """Keeps the settled warnings for `/cluster` and logs each oversubscribed host once when
    it starts and once when it ends.

    A host counts only once oversubscribed for `settle` seconds: when workers come and go,
    their shares re-adjust within a second or two, and that is no reason to cry wolf."""

    def __init__(self, registry: Any, interval: float, settle: float = SETTLE_SECONDS) -> None:
        self.registry = registry
        self.interval = interval
        self.settle = settle
        self.current: list[dict[str, Any]] = []
        self._since: dict[str, float] = {}  # host -> when it was first seen oversubscribed
        self._said: dict[str, tuple[str, ...]] = {}  # host -> the workers we named
        self._task: asyncio.Task[None] | None = None

    def check(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.monotonic() if now is None else now
        found = oversubscribed(list(self.registry.workers.values()))
        self._since = {w["host"]: self._since.get(w["host"], now) for w in found}
        self.current = [w for w in found if now - self._since[w["host"]] >= self.settle]
        said = {w["host"]: tuple(w["workers"]) for w in self.current}
        for w in self.current:
            if self._said.get(w["host"]) != said[w["host"]]:
                log.warning("%s", w["message"])
        for host in self._said.keys() - said.keys():
            log.warning("host %s is no longer oversubscribed", host)
        self._said = said
        return self.current

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a malformed /status must not end the watch; say so
                log.exception("checking the hosts' CPU use failed")
