"""Workers on one host share its cores.

Each computing worker holds an flock on a file of its own in a per-host directory
(`/dev/shm/corral-hosts/<host id>/`, else the temp dir). The kernel drops the lock when the
process dies, however it dies, so a live worker is simply a file whose lock cannot be
taken; a file whose lock can be taken is a dead worker's and is removed by whoever sees it.
A worker without `--threads` decodes on its fair share: the host's CPUs left over by the
workers with a fixed thread count (an explicit `--threads`, or a backend that cannot re-size
once loaded: OpenVINO, a split's child) divided among the others (the remainder to the
first by name), at least 1. Workers re-read the directory every second and re-adjust.

The host id is `--host-id`/`CORRAL_HOST_ID`, else a hash of /etc/machine-id (systemd asks
that the raw id never leave the box), else the hostname. Test boxes that fake hosts with
network namespaces share both, hence the flag. Containers on one host see each other only
through a shared directory: mount one tmpfs at /dev/shm/corral-hosts in each, with the
same host id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("corral.worker")

#: Every record is written as one block of this size, so a reader never sees half of one.
RECORD_BYTES = 512
POLL_SECONDS = 1.0
_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def host_id(explicit: str | None = None) -> str:
    if explicit and explicit.strip():
        return explicit.strip()
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            raw = Path(path).read_text().strip()
            if raw:
                digest = hmac.new(b"corral host id", raw.encode(), hashlib.sha256)
                return "m-" + digest.hexdigest()[:16]
    return socket.gethostname() or "localhost"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _cgroup_quota() -> float | None:
    rel = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip().lstrip("/")
    for base in (Path("/sys/fs/cgroup") / rel, Path("/sys/fs/cgroup")):
        with contextlib.suppress(OSError, ValueError):
            quota, period = (base / "cpu.max").read_text().split()[:2]
            if quota != "max" and float(period) > 0:
                return float(quota) / float(period)
            return None
    return None


def default_root() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / "corral-hosts"


def _safe(name: str) -> str:
    return name if _SAFE.match(name) else hashlib.sha256(name.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Peer:
    """One live worker on this host, as its record says."""

    name: str  # the file's name: the order the remainder is handed out in
    id: str = ""
    threads: int | None = None  # fixed (--threads, or cannot re-size), None: a fair share
    active: bool = True  # computing (a model, a split head or a shard); idle ones take none


def fair_share(me: str, peers: Sequence[Peer], cpus: int) -> int:
    """Threads for the worker `me` (which wants a share) among the live `peers`."""
    active = [p for p in peers if p.active and p.name != me]
    fixed = sum(p.threads for p in active if p.threads)
    shared = sorted({p.name for p in active if not p.threads} | {me})
    base, extra = divmod(max(0, cpus - fixed), len(shared))
    return max(1, base + (1 if shared.index(me) < extra else 0))


class HostCores:
    """This worker's place on the host: its lock file, its record, its share of the cores."""

    def __init__(self, host: str, worker_id: str, explicit: int | None,
                 active: Callable[[], bool] = lambda: True, cpus: int | None = None,
                 root: Path | None = None) -> None:
        self.host_id = host
        self.worker_id = worker_id
        self.explicit = explicit if explicit and explicit > 0 else None
        self.cpus = cpus or usable_cpus()
        self.dir = (root or default_root()) / _safe(host)
        self.name = f"{_safe(worker_id)}.{os.getpid()}.{secrets.token_hex(3)}.lock"
        self._active = active
        self._fd: int | None = None
        self.pinned: int | None = None  # threads it cannot change any more (see pin)
        self._written: tuple[bool, int | None] | None = None  # (active, fixed) on file
        self.peers: list[Peer] = []
        self.threads = self.explicit or self.cpus

    def open(self) -> None:
        """Creates and locks this worker's file. Without a usable directory the worker
        still runs, on every core, and says why."""
        for attempt in range(3):
            try:
                self._create()
                return
            except FileNotFoundError:  # the last worker leaving removed the directory
                if attempt < 2:
                    continue
                exc: OSError = FileNotFoundError(f"{self.dir} keeps vanishing")
            except OSError as e:
                exc = e
            log.warning("cannot share the host's cores through %s (%s): this worker uses all "
                        "%d CPUs unless --threads says otherwise", self.dir, exc, self.cpus)
            self.close()
            return

    def _create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in (self.dir.parent, self.dir):  # shared by every user of the host
            with contextlib.suppress(OSError):
                d.chmod(0o1777)
        tmp = self.dir / (self.name + ".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._fd = fd
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._write(self._active(), self._fixed())
        os.rename(tmp, self.dir / self.name)  # seen by others only once locked

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        for name in (self.name, self.name + ".new"):
            with contextlib.suppress(OSError):
                os.unlink(self.dir / name)
        os.close(fd)
        with contextlib.suppress(OSError):
            self.scan()  # reaps dead workers' files, so the last one out leaves nothing
            self.dir.rmdir()  # only if no other worker is left in it

    def pin(self, threads: int | None) -> None:
        """Publishes that this worker decodes on `threads` whatever its share (a backend
        that cannot re-size), so the others share what is left; None undoes it."""
        self.pinned = threads if threads and threads > 0 else None

    def _fixed(self) -> int | None:
        return self.explicit or self.pinned

    def _write(self, active: bool, fixed: int | None) -> None:
        assert self._fd is not None
        rec = json.dumps({"id": self.worker_id, "pid": os.getpid(),
                          "threads": fixed, "active": active})
        os.pwrite(self._fd, rec.encode().ljust(RECORD_BYTES)[:RECORD_BYTES], 0)
        self._written = (active, fixed)

    def scan(self) -> list[Peer]:
        """The live workers of this host (this one included), removing dead ones' files."""
        out: list[Peer] = []
        try:
            names = sorted(os.listdir(self.dir))
        except OSError:
            return out
        for name in names:
            if name.endswith(".lock.new") and name != self.name + ".new":
                _reap_unfinished(self.dir / name)
            if not name.endswith(".lock") or name == self.name:
                continue
            peer = _probe(self.dir / name)
            if peer is not None:
                out.append(peer)
        active, fixed = self._written or (False, None)
        out.append(Peer(self.name, self.worker_id, fixed, active))
        return out

    def refresh(self) -> int:
        """Re-reads the host and returns the threads this worker should decode on now."""
        if self._fd is not None:
            want = (self._active(), self._fixed())
            if want != self._written:
                with contextlib.suppress(OSError):
                    self._write(*want)
            self.peers = self.scan()
        if self.explicit:
            self.threads = self.explicit
        elif self._fd is None:
            self.threads = self.cpus
        else:
            self.threads = fair_share(self.name, self.peers, self.cpus)
        return self.threads

    def live_workers(self) -> int:
        return sum(1 for p in self.peers if p.active)


def _probe(path: Path) -> Peer | None:
    """The record of a live worker's file; None (and the file removed) for a dead one's."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raw = os.pread(fd, RECORD_BYTES, 0)
            return _parse(path.name, raw)
        with contextlib.suppress(OSError):  # we got the lock: its owner is gone
            os.unlink(path)
        return None
    finally:
        os.close(fd)


def _reap_unfinished(path: Path) -> None:
    """Removes a file a worker died creating (it renames its file within microseconds)."""
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > 60:
            _probe(path)  # removes it unless its creator still holds its lock


def _parse(name: str, raw: bytes) -> Peer:
    try:
        rec = json.loads(raw.decode("utf-8", "replace").strip() or "{}")
        threads = rec.get("threads")
        return Peer(name, str(rec.get("id", "")),
                    int(threads) if isinstance(threads, int) and threads > 0 else None,
                    bool(rec.get("active", True)))
    except (ValueError, AttributeError):
        return Peer(name)  # unreadable: count it as a live worker wanting a share
