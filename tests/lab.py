"""A LAN on one machine: boxes are network namespaces on a Linux bridge, one link each.

    with Lab({"gw": "1gbe", "w1": "1gbe", "w2": "wifi"}) as lab:
        gw = lab.start("gw", "gateway", "--port", "8000")
        lab["w1"].call(httpx.get, f"http://{lab.addr('gw')}:8000/healthz")

The bridge lives in a switch namespace of its own, so the lab's subnet (10.213.7.0/24)
exists only inside namespaces this module creates: nothing is added to the host's network
and nothing can reach anything outside the lab. Every box has `eth0` (its address) cabled
to a port of the bridge; a link profile shapes both directions of that cable: rate with
`tbf` (box egress and port egress); latency, where a profile has any, with the delay stage
of tests/lab_delay.py (this kernel has no netem: see there). The fast profiles get no delay
beyond the bridge's own (~0.03 ms), as their real one-way latency (0.05-0.15 ms) is below
what a user-space stage could add faithfully.

Processes run in a box with `ip netns exec` (their PID is ours: `ip` execs) and are stopped
by PID; the test process itself reaches a box from a thread moved into its namespace
(`Box.call`). `close()` runs on every path (context manager, pytest finalizer, atexit):
processes, delay stages, then `ip netns del` (which takes the veths and the bridge along).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).parent))

from lab_delay import setns  # noqa: E402
from procs import Proc  # noqa: E402

T = TypeVar("T")
SUBNET = "10.213.7"
PREFIX = "corlab"


@dataclass(frozen=True)
class Profile:
    """One box's cable to the switch: rate each way, added one-way latency and jitter."""

    name: str
    mbit: float
    delay_ms: float = 0.0
    jitter_ms: float = 0.0


PROFILES = {p.name: p for p in (
    Profile("1gbe", 1000),
    Profile("2.5gbe", 2500),
    Profile("thunderbolt", 10000),
    Profile("wifi", 200, delay_ms=2.0, jitter_ms=0.5),
)}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _tc(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"tc {' '.join(args)} in {ns}: {r.stderr.strip()}")


def unavailable() -> str | None:
    """Why this machine cannot build a lab (no `ip`/`tc`, no CAP_NET_ADMIN), or None."""
    if not (shutil.which("ip") and shutil.which("tc")):
        return "iproute2 (ip, tc) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode:
        return f"cannot create network namespaces (needs CAP_NET_ADMIN): {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def sweep_stale() -> None:
    """Deletes lab namespaces left by a lab process that no longer exists (a SIGKILLed
    run), never another live run's."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        pid = name[len(PREFIX):].split("-")[0] if name.startswith(PREFIX) else ""
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)


def _raise_exit(*_: object) -> None:
    raise SystemExit(143)


def _tbf(ns: str, dev: str, mbit: float) -> None:
    rate = mbit * 1e6 / 8  # bytes/s
    burst = max(256 * 1024, int(rate / 1000))  # 1 ms of line rate, at least 4 GSO frames
    _tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
        "burst", str(burst), "limit", str(burst + int(rate * 0.005)))


@dataclass
class Box:
    """A namespace with one address; `call` runs a function with its sockets in the box."""

    name: str
    ns: str
    addr: str
    profile: Profile

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        out: list[Any] = []
        err: list[BaseException] = []

        def run() -> None:
            try:
                setns(f"/run/netns/{self.ns}")  # this thread only
                out.append(fn(*args, **kw))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                err.append(exc)

        t = threading.Thread(target=run, name=f"in-{self.name}", daemon=True)
        t.start()
        t.join()
        if err:
            raise err[0]
        return out[0]


@dataclass
class Lab:
    """Boxes by name -> link profile name. Build in `__enter__` (or `up()`), gone in `close`."""

    links: dict[str, str]
    boxes: dict[str, Box] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    delays: dict[str, subprocess.Popen] = field(default_factory=dict)
    delay_stats: dict[str, dict] = field(default_factory=dict)
    _made: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{id(self) % 10000}"
        self.switch = f"{self.tag}-sw"

    def __getitem__(self, name: str) -> Box:
        return self.boxes[name]

    def addr(self, name: str) -> str:
        return self.boxes[name].addr

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> None:
        sweep_stale()
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (timeout, CI cancel) unwinds like Ctrl-C, so `close` runs.
            self._old_term = signal.signal(signal.SIGTERM, _raise_exit)
        self._netns(self.switch)
        sw = ["-n", self.switch]
        _ip(*sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip(*sw, "link", "set", "br0", "up")
        for i, (name, prof) in enumerate(self.links.items()):
            self._box(name, PROFILES[prof], f"{SUBNET}.{10 + i}")

    def _netns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _box(self, name: str, prof: Profile, addr: str) -> None:
        ns, port = f"{self.tag}-{name}", f"p-{name}"
        self._netns(ns)
        sw, bx = ["-n", self.switch], ["-n", ns]
        _ip(*sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip(*sw, "link", "set", port, "master", "br0", "up")
        _ip(*bx, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip(*bx, "link", "set", "eth0", "up")
        _ip(*bx, "route", "add", "224.0.0.0/4", "dev", "eth0")  # mDNS leaves by eth0
        self.boxes[name] = Box(name, ns, addr, prof)
        if not prof.delay_ms:
            _tbf(ns, "eth0", prof.mbit)
            _tbf(self.switch, port, prof.mbit)
            return
        # Uplink: eth0 egress -> ua (tbf) -> ub (switch ns) -> delay stage -> eth0 (bypass).
        # Downlink: port egress -> da (tbf) -> db -> delay stage -> port (bypass).
        _ip(*bx, "link", "add", "ua", "type", "veth", "peer", "name", f"ub-{name}",
            "netns", self.switch)
        _ip(*sw, "link", "add", f"da-{name}", "type", "veth", "peer", "name", f"db-{name}")
        for args in (bx + ["ua"], sw + [f"ub-{name}"], sw + [f"da-{name}"],
                     sw + [f"db-{name}"]):
            _ip(args[0], args[1], "link", "set", args[2], "up")
        _tbf(ns, "ua", prof.mbit)
        _tbf(self.switch, f"da-{name}", prof.mbit)
        for where, dev, to in ((ns, "eth0", "ua"), (self.switch, port, f"da-{name}")):
            _tc(where, "qdisc", "add", "dev", dev, "clsact")
            _tc(where, "filter", "add", "dev", dev, "egress", "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect",
                "dev", to)
        stage = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).with_name(
                "lab_delay.py")), "--switch-ns", self.switch, "--delay-ms",
             str(prof.delay_ms), "--jitter-ms", str(prof.jitter_ms),
             "--up", f"ub-{name}:eth0", "--down", f"db-{name}:{port}"],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.delays[name] = stage
        line = stage.stdout.readline()  # bounded: the stage prints READY or exits
        if line.strip() != "READY":
            raise RuntimeError(f"delay stage for {name} did not start: {line!r}")

    def reshape(self, box: str, profile: str) -> None:
        """Gives a running box's cable another rate-only profile (`tc qdisc replace`), its
        processes left running: a benchmark measures one layout on 1gbe, 2.5gbe and
        thunderbolt without restarting it. A profile with a delay needs a box built with it."""
        b, prof = self.boxes[box], PROFILES[profile]
        if prof.delay_ms or b.profile.delay_ms:
            raise ValueError(f"{box}: only rate-only profiles can be swapped in place")
        _tbf(b.ns, "eth0", prof.mbit)
        _tbf(self.switch, f"p-{box}", prof.mbit)
        b.profile = prof

    def start(self, box: str, *args: str, env: dict[str, str] | None = None,
              name: str | None = None) -> Proc:
        """`python -m corral.cli ARGS` inside `box`; stopped by PID in `close`. Each box is
        a host of its own (`CORRAL_HOST_ID`): namespaces share the machine id and /dev/shm,
        so workers in different boxes would otherwise share this machine's cores."""
        b = self.boxes[box]
        env = {"CORRAL_HOST_ID": f"lab-{box}", **(env or {})}
        p = Proc(["ip", "netns", "exec", b.ns, sys.executable, "-m", "corral.cli", *args],
                 env, name or f"{box}-{args[0]}").start()
        self.procs.append(p)
        return p

    def run(self, box: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A short command inside `box` (ping, tc -s), its output captured."""
        return subprocess.run(["ip", "netns", "exec", self.boxes[box].ns, *argv],
                              capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()
        self.procs.clear()
        for name, stage in self.delays.items():
            if stage.poll() is None:
                stage.terminate()
                try:
                    out, _ = stage.communicate(timeout=10)
                    last = out.strip().splitlines()[-1:] if out else []
                    self.delay_stats[name] = json.loads(last[0]) if last else {}
                except (subprocess.TimeoutExpired, ValueError):
                    stage.kill()
                    stage.wait(10)
        self.delays.clear()
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()
        atexit.unregister(self.close)
        old, self._old_term = getattr(self, "_old_term", None), None
        if old is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, old)
