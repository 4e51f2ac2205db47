"""The engine's own bookkeeping, in-process (the sim backend only paces tokens here; every
backend's behaviour is tested for real in test_worker_api.py)."""

from __future__ import annotations

import asyncio

from worker.backends.base import SamplingParams
from worker.backends.sim import SimBackend
from worker.engine import Engine


def test_decode_speed_is_learned_only_from_requests_that_ran_alone() -> None:
    async def scenario() -> None:
        backend = SimBackend(tokens_per_second=400, ttft=0.0, slots=4)
        backend.load()
        engine = Engine(backend)
        engine.ready = True

        async def one() -> None:
            async for d in engine.generate([1, 2, 3], 12, SamplingParams(temperature=0)):
                if d.finish:
                    assert d.completion_tokens == 12

        try:
            engine.stats.tokens_per_second = 1.0  # a marker no real observation gives
            await asyncio.gather(one(), one())  # batched: slower each, not the box's speed
            assert engine.stats.tokens_per_second == 1.0
            await one()  # alone: observed
            assert engine.stats.tokens_per_second > 10
        finally:
            backend.close()

    asyncio.run(scenario())
