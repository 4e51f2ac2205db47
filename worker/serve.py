"""Run one worker under uvicorn. SIGTERM drains first (worker/lifecycle.py): the gateway is
told `draining`, in-flight requests get up to `--drain-timeout` seconds to finish, then the
server stops, leaving its gateway. SIGINT, or a second signal, stops at once."""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import uvicorn

from worker.app import create_app
from worker.config import WorkerConfig
from worker.lifecycle import Lifecycle

log = logging.getLogger("corral.worker")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, life: Lifecycle, drain_timeout: float) -> None:
        super().__init__(config)
        self.life = life
        self.drain_timeout = drain_timeout
        self._loop = None
        self._terminating = False
        life.exit = self._exit

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        import asyncio

        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _exit(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit and not self._terminating
        if sig == signal.SIGTERM and first and self.drain_timeout > 0 and self._loop:
            self._terminating = True  # a second signal stops at once
            self._captured_signals.append(sig)  # re-raised after the server stops
            log.warning("SIGTERM: draining for at most %g s before exiting",
                        self.drain_timeout)
            self._loop.call_soon_threadsafe(self.life.drain, "leave", self.drain_timeout)
            return
        super().handle_exit(sig, frame)


def run(cfg: WorkerConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if cfg.polite:  # before any thread starts: every later thread inherits it
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    app = create_app(cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    DrainingServer(config, app.state.lifecycle, cfg.drain_timeout).run()
    return 0
