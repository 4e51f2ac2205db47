"""Polite mode (`--polite`): a worker on a box someone also uses gives way to its owner.

Every half second it measures what the owner takes: the host's busy CPU time minus this
worker's own process tree (itself and its children: a split head, an RPC shard), as a
share of the host's CPUs; the memory still available; and, where visible, input at a
terminal (a tty's access time is its last input, as `w` reads it; a graphical session's
input is not visible to an unprivileged process, so there the CPU rule alone applies).

While any of them says the owner is busy, the worker offers 0 slots (`capacity` in
`/status`): the gateway routes around it from its next probe, and what is in flight
finishes. It offers its slots again once the owner has stayed idle for `polite_calm`
seconds, with the CPU share below a lower mark than the one that made it yield
(hysteresis: a load hovering at the threshold does not flap). The process also runs at
the lowest CPU priority (nice 19, set by worker/serve.py), so the requests it finishes
while yielding take only CPU time the owner leaves unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import time
from typing import Any

import psutil

from worker.config import WorkerConfig

log = logging.getLogger("corral.worker")

SAMPLE_SECONDS = 0.5
TTYS = ("/dev/pts/[0-9]*", "/dev/tty[0-9]*")


def input_idle() -> float | None:
    """Seconds since the last input at any terminal on this box; None when none is seen."""
    now = time.time()
    latest = 0.0
    for pattern in TTYS:
        for path in glob.glob(pattern):
            with contextlib.suppress(OSError):
                latest = max(latest, os.stat(path).st_atime)
    return None if latest == 0.0 else max(0.0, now - latest)


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0)


class Polite:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.high = cfg.polite_cpu
        self.low = cfg.polite_cpu_low if cfg.polite_cpu_low is not None else cfg.polite_cpu / 2
        self.cpus = psutil.cpu_count() or 1
        self.me = psutil.Process()
        self.yielding = False
        self.reason = ""
        self.owner_cpu = 0.0  # share of the host's CPUs used by others
        self.memory_available = 1.0  # share of the host's memory
        self.input_idle: float | None = None
        self.yields = 0
        self._calm_since: float | None = None
        self._own: dict[int, float] = {}
        self._busy = _busy_seconds()
        self._at = time.monotonic()
        self._own_seconds()

    def _own_seconds(self) -> float:
        """CPU seconds our tree used since the last call (a child seen first counts from
        its next sample)."""
        used, seen = 0.0, {}
        procs = [self.me]
        with contextlib.suppress(psutil.Error):
            procs += self.me.children(recursive=True)
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            s = t.user + t.system
            seen[p.pid] = s
            if p.pid in self._own:
                used += max(0.0, s - self._own[p.pid])
        self._own = seen
        return used

    def sample(self) -> None:
        now = time.monotonic()
        busy = _busy_seconds()
        own = self._own_seconds()
        wall = max(1e-3, now - self._at)
        foreign = max(0.0, (busy - self._busy) - own)
        self._busy, self._at = busy, now
        self.owner_cpu = min(1.0, foreign / wall / self.cpus)
        vm = psutil.virtual_memory()
        self.memory_available = vm.available / vm.total if vm.total else 1.0
        self.input_idle = input_idle()
        self._decide(now)

    def _decide(self, now: float) -> None:
        why = []
        if self.owner_cpu >= self.high:
            why.append(f"others use {self.owner_cpu:.0%} of the CPUs")
        if self.memory_available < self.cfg.polite_memory:
            why.append(f"only {self.memory_available:.0%} of memory available")
        if self.input_idle is not None and self.input_idle < self.cfg.polite_input_idle:
            why.append(f"terminal input {self.input_idle:.0f} s ago")
        if why:
            self._calm_since = None
            if not self.yielding:
                self.yielding, self.yields = True, self.yields + 1
                log.warning("polite: yielding to the owner (%s): offering 0 slots",
                            "; ".join(why))
            self.reason = "; ".join(why)
            return
        if not self.yielding:
            return
        if self.owner_cpu >= self.low:  # between the marks: hold on
            self._calm_since = None
            return
        self._calm_since = self._calm_since or now
        if now - self._calm_since >= self.cfg.polite_calm:
            self.yielding, self.reason = False, ""
            log.warning("polite: the owner is idle (others use %.0f%% of the CPUs): "
                        "offering every slot again", self.owner_cpu * 100)

    def capacity(self, slots: int) -> int:
        return 0 if self.yielding else slots

    def view(self) -> dict[str, Any]:
        return {"yielding": self.yielding, "reason": self.reason or None,
                "owner_cpu": round(self.owner_cpu, 3),
                "memory_available": round(self.memory_available, 3),
                "input_idle_seconds": None if self.input_idle is None
                else round(self.input_idle, 1),
                "input": "terminals" if self.input_idle is not None else "not visible",
                "cpu_high": self.high, "cpu_low": self.low, "yields": self.yields}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            try:
                self.sample()
            except Exception:  # never take the worker down over it; say why
                log.exception("polite: sampling the host failed")
