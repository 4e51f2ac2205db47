"""The worker's handle on its split head child (`python -m worker.rpc.head`).

A lost RPC peer aborts the process that holds the model and a frozen one hangs it, so the
head runs in a child process (`worker.rpc.head`) and the worker supervises it from here:
readiness, a watchdog that kills a head that makes no progress (no token out, no prompt
chunk in) for `stall_seconds` while a request is active, and the reason it broke for
`/status`. The child's exit codes are defined here, where they are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from worker.rpc.shard import child_env

log = logging.getLogger("corral.rpc")

LOAD_TIMEOUT = 600.0
EXIT_PROBE_FAILED = 3  # the head child's exit codes
EXIT_LOAD_FAILED = 4


class HeadProcess:
    """The worker's handle on its head child: start, readiness, watchdog, stop."""

    def __init__(self, worker_id: str, model_path: str, model_id: str, shards: list[str],
                 tensor_split: list[float], threads: int, parallel: int, ctx_size: int,
                 stall_seconds: float = 30.0) -> None:
        self.worker_id = worker_id
        self.model_path = model_path
        self.model_id = model_id
        self.shards = shards
        self.tensor_split = tensor_split
        self.threads = threads
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.stall_seconds = stall_seconds
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.broken: str | None = None
        self.progress: dict[str, Any] = {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> None:
        from worker.rpc.shard import _free_loopback_port

        self.port = _free_loopback_port()
        args = [sys.executable, "-m", "worker.rpc.head", "--port", str(self.port),
                "--model", self.model_path, "--model-id", self.model_id,
                "--id", self.worker_id, "--shards", ",".join(self.shards),
                "--tensor-split", ",".join(str(x) for x in self.tensor_split),
                "--threads", str(self.threads), "--parallel", str(self.parallel),
                "--ctx-size", str(self.ctx_size)]
        self.proc = subprocess.Popen(args, env=child_env(self.threads), start_new_session=True)

    async def start(self) -> None:
        """Starts the child and waits until it serves; raises with the reason if it fails."""
        self._spawn()
        deadline = time.monotonic() + LOAD_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(self._exit_reason())
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = await self.client.get(self.base + "/progress")
                if r.status_code == 200:
                    self.progress = r.json()
                    if self.progress.get("error"):
                        raise RuntimeError(f"the head failed to load: {self.progress['error']}")
                    if self.progress.get("ready"):
                        self.ready = True
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError("the head did not load in time")

    def _exit_reason(self) -> str:
        rc = self.proc.poll() if self.proc else None
        if rc == EXIT_PROBE_FAILED:
            return "an RPC shard did not answer HELLO"
        if rc is not None and rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else rc
            why = " (an RPC peer was lost)" if rc == -signal.SIGABRT else ""
            return f"the head process died of {name}{why}"
        return f"the head process exited with code {rc}"

    async def watch(self, on_broken: Any) -> None:
        """Runs while placed: notices a dead child, and kills one that stopped producing."""
        last_progress = -1
        last_change = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            if not self.alive():
                self._break(self._exit_reason(), on_broken)
                return
            try:
                r = await self.client.get(self.base + "/progress", timeout=2.0)
                p = r.json()
            except (httpx.HTTPError, ValueError):
                continue
            self.progress = p
            now = time.monotonic()
            busy = p.get("slots_busy", 0) > 0
            if p.get("progress") != last_progress or not busy:
                last_progress, last_change = p.get("progress", 0), now
            elif now - last_change > self.stall_seconds:
                self.kill()
                self._break(f"no token for {self.stall_seconds:g}s while a request was "
                            "active (an RPC peer froze); killed the head", on_broken)
                return

    def _break(self, why: str, on_broken: Any) -> None:
        if self.broken is None:
            self.broken = why
            self.ready = False
            log.error("split head broken: %s", why)
            on_broken(why)

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)

    async def stop(self) -> None:
        self.ready = False
        self.kill()
        self.proc = None
        await self.client.aclose()
