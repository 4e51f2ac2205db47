"""The engine's own bookkeeping, in-process (the sim backend only paces tokens here; every
backend's behaviour is tested for real in test_worker_api.py)."""

from __future__ import annotations

import asyncio
import threading

from worker.backends import wakes
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


def test_a_decode_thread_wakes_the_event_loop_when_it_flushes_not_per_token() -> None:
    """Tokens handed over mid-step wait for the thread's flush (right before its next
    `llama_decode`): a wake-up mid-step let the loop take the GIL from the step."""

    async def scenario() -> None:
        engine = Engine(SimBackend(tokens_per_second=400, ttft=0.0, slots=4))
        h = engine.handoff()
        woken: list[str] = []
        wake = h._wake
        h._wake = lambda: (woken.append(threading.current_thread().name), wake())
        got: list[str] = []
        drained = asyncio.Event()
        handed, flush_now = threading.Event(), threading.Event()

        def decode_thread() -> None:
            wakes.hold()
            try:
                h.put(got.append, "a")
                h.put(got.append, "b")
                h.put(drained.set)
                handed.set()
                flush_now.wait(10)
                wakes.flush()
            finally:
                wakes.release()

        t = threading.Thread(target=decode_thread, name="decode")
        t.start()
        assert await asyncio.to_thread(handed.wait, 10)
        assert woken == []  # three hand-overs, no wake-up yet
        flush_now.set()
        await asyncio.wait_for(drained.wait(), 10)
        await asyncio.to_thread(t.join, 10)
        assert woken == ["decode"] and got == ["a", "b"]  # one wake-up for all three

        drained.clear()
        other = threading.Thread(target=lambda: h.put(drained.set), name="other")
        other.start()  # a thread that does not hold wakes the loop at once
        await asyncio.to_thread(other.join, 10)
        assert woken == ["decode", "other"]
        await asyncio.wait_for(drained.wait(), 10)

    asyncio.run(scenario())
