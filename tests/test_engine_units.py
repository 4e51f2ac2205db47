"""The engine's own bookkeeping, in-process (the sim backend only paces tokens here; every
backend's behaviour is tested for real in test_worker_api.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from wire.errors import APIError
from worker.backends import wakes
from worker.backends.base import SamplingParams, Sequence
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


class _Held(SimBackend):
    """Takes sequences and finishes them only when the test says (as a backend thread
    would, from its own thread); `backlog` of them may wait beyond the slots."""

    def __init__(self, slots: int, backlog: int) -> None:
        super().__init__(tokens_per_second=400, ttft=0.0, slots=slots)
        self.backlog = backlog
        self.seqs: list[Sequence] = []
        self.submitted = threading.Semaphore(0)

    def submit(self, seq: Sequence) -> None:
        self.seqs.append(seq)
        self.submitted.release()

    def finish(self, i: int) -> None:
        t = threading.Thread(target=self.seqs[i].on_finish, args=("stop", None))
        t.start()
        t.join(10)


def test_a_backlog_reaches_the_backend_before_a_slot_frees_and_counts_as_queue() -> None:
    """The llama backend starts a waiting sequence the step its slot frees; through the
    engine's own queue it would come a step later (the finish reaches the event loop while
    the next step runs). What waits in the backend still counts as queue, and the queue's
    bound holds."""

    async def scenario() -> None:
        backend = _Held(slots=2, backlog=2)
        engine = Engine(backend, max_queue=3)

        async def one() -> str | None:
            async for d in engine.generate([1, 2, 3], 8, SamplingParams(temperature=0)):
                if d.finish:
                    return d.finish
            return None

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        for _ in range(4):  # two running, two in the backend's backlog
            assert await asyncio.to_thread(backend.submitted.acquire, True, 10)
        assert len(backend.seqs) == 4
        assert (engine.slots_busy, engine.queue_depth) == (2, 3)  # the fifth waits here
        with pytest.raises(APIError) as refused:  # past max_queue
            await one()
        assert refused.value.status == 429
        backend.finish(0)
        assert await asyncio.to_thread(backend.submitted.acquire, True, 10)
        assert len(backend.seqs) == 5 and engine.queue_depth == 2
        for i in range(1, 5):
            backend.finish(i)
        assert await asyncio.gather(*tasks[1:]) == ["stop"] * 4
        assert (engine.slots_busy, engine.queue_depth) == (0, 0)
        assert await tasks[0] == "stop"

    asyncio.run(scenario())
