"""A simulated backend: deterministic filler at a fixed rate per slot.

For gateway timing tests and benchmarks only. It shares the engine, API, `/status` and
metrics with the real backends, so the gateway cannot tell it apart on the wire.

Two speeds, like a real box: decode at `tokens_per_second` per slot (bandwidth-bound, so
slots do not slow each other), and, when `prefill_tokens_per_second` is set, prompts read
at that rate one after another (compute-bound: a long prompt delays the next one's first
token on the same worker). With it 0, every first token comes a fixed `ttft` after submit.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

from wire.errors import bad_request
from worker.backends.base import Backend, Sequence

_FILLER = (
    "the herd moves across the open range while the corral waits by the river and every "
    "rider keeps a steady pace under a wide sky"
)
_WORDS = tuple(_FILLER.split(" "))


class SimBackend(Backend):
    name = "sim"

    def __init__(
        self,
        tokens_per_second: float = 50.0,
        ttft: float = 0.05,
        slots: int = 1,
        n_ctx: int = 4096,
        default_max_tokens: int = 64,
        prefill_tokens_per_second: float = 0.0,
    ) -> None:
        self.rate = tokens_per_second
        self.ttft = ttft
        self.prefill_rate = prefill_tokens_per_second
        self.calibrated_tokens_per_second = tokens_per_second  # exact by construction
        self.calibrated_prefill_tokens_per_second = prefill_tokens_per_second
        self._reader_free = 0.0  # when the prompt reader is done with the prompts queued
        self.slots = slots
        self.n_ctx = n_ctx
        self.default_max_tokens = default_max_tokens
        self._heap: list[tuple[float, int, Sequence, int]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def load(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sim-decode", daemon=True)
        self._thread.start()

    def tokenize(self, text: str) -> list[int]:
        # One token per 4 characters, like a typical BPE on English text.
        return [ord(c) for c in text[::4]] or [0]

    def render_chat(self, messages: list[dict[str, str]], continue_final: bool = False) -> str:
        parts = [f"<|{m['role']}|>{m['content']}<|end|>" for m in messages]
        if continue_final:
            parts[-1] = parts[-1].removesuffix("<|end|>")
            return "".join(parts)
        return "".join(parts) + "<|assistant|>"

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            now = time.monotonic()
            if self.prefill_rate > 0:  # read after the prompts ahead, at the prefill rate
                due = self._reader_free = (max(now, self._reader_free)
                                           + len(seq.prompt) / self.prefill_rate)
            else:
                due = now + self.ttft
            for s in (seq, *seq.forks):  # n > 1: identical filler for every choice
                heapq.heappush(self._heap, (due, next(self._order), s, 0))
            self._cv.notify()

    def capabilities(self) -> dict[str, int]:
        return {"top_logprobs": 0, "n": self.slots}

    def validate_choices(self, n: int, top_logprobs: int | None, greedy: bool) -> None:
        if top_logprobs is not None:
            raise bad_request("logprobs are not supported by the sim backend",
                              param="logprobs", code="unsupported_parameter")
        super().validate_choices(n, top_logprobs, greedy)

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled.set()
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    def _run(self) -> None:
        step = 1.0 / self.rate
        while True:
            with self._cv:
                while not self._stop:
                    if self._heap:
                        due = self._heap[0][0] - time.monotonic()
                        # A cancelled sequence is finished at once, not at its next tick.
                        if due <= 0 or any(s.cancelled.is_set() for _, _, s, _ in self._heap):
                            break
                        self._cv.wait(due)
                    else:
                        self._cv.wait()
                if self._stop:
                    return
                now = time.monotonic()
                ready = []
                keep = []
                for item in self._heap:
                    (ready if item[0] <= now or item[2].cancelled.is_set() else keep).append(item)
                heapq.heapify(keep)
                self._heap = keep
            for due, order, seq, n in ready:
                if seq.cancelled.is_set():
                    seq.on_finish("stop", None)
                    continue
                seq.on_tokens(_WORDS[(len(seq.prompt) + n) % len(_WORDS)] + " ", 1)
                n += 1
                if n >= seq.max_tokens:
                    seq.on_finish("length", None)
                    continue
                with self._cv:
                    heapq.heappush(self._heap, (due + step, order, seq, n))
