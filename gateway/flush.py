"""A background task that calls `tick` every few seconds, and flushes once more on stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class PeriodicFlush:
    """`start()` runs `tick` every `interval` seconds until `stop()`, which cancels the loop
    and calls `flush` one last time (errors ignored: the process is going away).

    `tick` handles its own errors; one that escapes ends the loop."""

    def __init__(self, tick: Callable[[], Awaitable[None]],
                 flush: Callable[[], Awaitable[None]], interval: float) -> None:
        self.tick = tick
        self.flush = flush
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            with contextlib.suppress(Exception):
                await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.tick()
