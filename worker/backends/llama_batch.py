"""The continuous-batching decode loop of the llama.cpp backend.

`parallel` slots share one llama.cpp context; slot i owns KV sequence id i. Every step
builds one `llama_batch`: one token for each sequence that is generating, then chunks of
the prompts still being prefilled (a fair share each of what is left of the step's token
budget), and runs one `llama_decode`. Each sequence samples from its own logits with its
own sampler chain. Sequences join and leave between steps.

Everything here runs on the loop's own thread, except `submit`/`cancel`/`close`/`call_soon`
and `set_threads`, which only touch the condition-protected hand-over state. A new thread
count (the host's cores re-shared, worker/hostcores.py) is applied between steps, on this
thread. `call_soon` runs other work on this thread between steps, one task per step (the
embedding context, `llama_embed.py`): every llama_decode of the process stays on one thread,
interleaved with generation.

Which slot a request takes and what KV it keeps is `llama_slots.py`; what becomes of a
step's logits (sampling, drafts, text) is `llama_tokens.py`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import llama_cpp

from worker.backends import llama_quick as quick
from worker.backends import wakes
from worker.backends.base import Sequence
from worker.backends.knobs import env_number
from worker.backends.llama_cache import HostCache, cache_mib
from worker.backends.llama_history import History, history_tokens
from worker.backends.llama_slots import Run, Slot, SlotAdmission, _finish_once
from worker.backends.llama_tokens import TokenOutput, token_bytes

log = logging.getLogger("corral.llama")

#: While some sequence is generating, a step carries only as many prompt tokens as fit in
#: about this long (measured on this box), so a long prompt's prefill delays everyone
#: else's next token by at most that much; between these bounds.
SHARED_STEP_SECONDS = 0.2  # measured: bench/prefill_chunk.py
SHARED_BUDGET_MIN, SHARED_BUDGET_MAX = 32, 256


def shared_step_seconds() -> float:
    """How long a step beside decoding sequences may take: SHARED_STEP_SECONDS, or
    CORRAL_LLAMA_STEP_SECONDS (bench/prefill_chunk.py measures the trade)."""
    return env_number("CORRAL_LLAMA_STEP_SECONDS", SHARED_STEP_SECONDS, float, 0.01, "seconds")


def shared_budget_max() -> int:
    """The most prompt tokens a step carries while others decode: SHARED_BUDGET_MAX, or
    CORRAL_LLAMA_PREFILL_CHUNK (bench/prefill_chunk.py measures the trade)."""
    return int(env_number("CORRAL_LLAMA_PREFILL_CHUNK", SHARED_BUDGET_MAX, int,
                          SHARED_BUDGET_MIN))


class BatchLoop(SlotAdmission, TokenOutput):
    def __init__(self, ctx: Any, vocab: Any, n_vocab: int, slots: int, n_batch: int,
                 n_ctx_seq: int, lookup: int = 0, offloaded: bool = False) -> None:
        self.ctx = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.vocab = vocab
        self.n_vocab = n_vocab
        self.n_batch = n_batch
        self.n_ctx_seq = n_ctx_seq
        self.slots = [Slot(i) for i in range(slots)]
        self.lookup = lookup  # longest prompt-lookup draft; 0: no speculation
        # Layers on other devices (an RPC split's peers, a GPU): llama_decode may return
        # before their compute ends (see `step`). On the CPU alone it has ended.
        self.offloaded = offloaded
        # Earlier answers as drafts too (llama_history.py); from `forget` on, so the load-
        # time calibration and invariance probe neither feed it nor draft from it.
        self.history: History | None = None
        mib = cache_mib()  # KV of sequences that lost their slot (llama_cache.py)
        self.host: HostCache | None = HostCache(ctx, mib << 20) if mib else None
        self.chunk_max = shared_budget_max()
        self.step_seconds = shared_step_seconds()
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._cv = threading.Condition()
        self._incoming: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()  # handed over, no free slot yet
        # Work for this thread between steps: called with None to run, or with the reason
        # the loop is gone (then it must only fail its caller).
        self._tasks: deque[Callable[[str | None], None]] = deque()
        self._stop = False
        self._dead: str | None = None  # why the loop is gone; later submits fail at once
        self._thread: threading.Thread | None = None
        self._pieces: dict[int, bytes] = {}
        self.rows = quick.LogitsRows(n_vocab)
        self._token_cost = 0.0  # seconds per batch token in prefill-heavy steps (EWMA)
        self._step_cost: dict[int, float] = {}  # rows -> seconds of a pure decode step (EWMA)
        self._want_threads: int | None = None  # set by set_threads, applied between steps
        self.threads = int(llama_cpp.llama_n_threads(ctx))  # what llama_decode uses now
        self.stats = {"prompt_cache_hits": 0, "prompt_cache_reused_tokens": 0,
                      "prompt_tokens_evaluated": 0, "decode_steps": 0,
                      "lookup_drafted_tokens": 0, "lookup_accepted_tokens": 0,
                      "decode_us": 0, "step_gap_us": 0}
        self._decoded_at: float | None = None  # end of the last llama_decode, while busy

    # ------------------------------------------------------------------ other threads
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llama-decode", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._dead is None:
                self._incoming.append(seq)
                self._cv.notify()
                return
            dead = self._dead
        _finish_once(seq, "error", dead)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def set_threads(self, n: int) -> None:
        """Asks for `n` decode threads from the next step on (also when idle)."""
        with self._cv:
            if n != (self._want_threads or self.threads):
                self._want_threads = n
                self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def call_soon(self, task: Callable[[str | None], None]) -> None:
        """Runs `task(None)` on the loop's thread before its next step (or `task(why)`, on
        the caller's thread, if the loop is gone)."""
        with self._cv:
            if self._dead is None:
                self._tasks.append(task)
                self._cv.notify()
                return
            dead = self._dead
        task(dead)

    def generating(self) -> bool:
        """Whether some sequence holds a slot (loop thread): other work should be brief."""
        return any(s.run for s in self.slots)

    def shared_budget(self) -> int:
        """Tokens that fit in a step without delaying the generating sequences much."""
        return self._shared_budget()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def forget(self) -> None:
        """Empties the KV cache and the stats (after calibration). Call it on the loop's
        thread (from a sequence's on_finish) with no other sequence running."""
        llama_cpp.llama_memory_clear(self.mem, True)
        for s in self.slots:
            s.tokens.clear()
        if self.host is not None:
            self.host.clear()
        budget = history_tokens() if self.lookup else 0  # only drafting runs use it
        self.history = History(budget) if budget else None
        for k in self.stats:
            self.stats[k] = 0

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.batch)

    # ------------------------------------------------------------------ the loop
    def _busy(self) -> bool:
        return bool(self._incoming or self._waiting or self._tasks
                    or any(s.run for s in self.slots))

    def _run(self) -> None:
        wakes.hold()  # the event loop is woken when this thread lets go of the GIL
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._busy() and self._want_threads is None:
                        self._decoded_at = None  # idle time is no step's overhead
                        wakes.flush()
                        self._cv.wait()
                    if self._stop:
                        break
                    want, self._want_threads = self._want_threads, None
                if want is not None and want != self.threads:
                    llama_cpp.llama_set_n_threads(self.ctx, want, want)
                    self.threads = int(llama_cpp.llama_n_threads(self.ctx))
                self.step()
        except BaseException:
            log.exception("the llama.cpp decode loop failed")
            self._fail_all("the model's decode loop failed")
            raise
        finally:
            wakes.release()
        self._fail_all("the worker is shutting down")

    def _fail_all(self, message: str) -> None:
        with self._cv:
            self._dead = message
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            tasks, self._tasks = list(self._tasks), deque()
        for task in tasks:
            _run_task(task, message)
        while self._waiting:
            _finish_once(self._waiting.popleft(), "error", message)
        for s in self.slots:
            if s.run is not None:
                self._leave(s.run, "error", message)

    def step(self) -> bool:
        """Admits, reaps and decodes once. Returns whether there was work."""
        with self._cv:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            task = self._tasks.popleft() if self._tasks else None
        if task is not None:
            wakes.flush()  # a task may be long (an embedding batch)
            _run_task(task, None)
        self._reap_cancelled()
        self._admit()
        runs = [s.run for s in self.slots if s.run is not None and not s.run.waiting]
        if not runs:
            wakes.flush()
            return any(s.run for s in self.slots)
        n = self._fill(runs)
        if n == 0:
            wakes.flush()
            return True
        self.batch.n_tokens = n
        wakes.flush()  # the event loop writes the last step's tokens while this one computes
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if self.offloaded:
            # Wait for the step here, letting go of the GIL: with an RPC split the compute
            # is asynchronous, and the logits read next (llama_quick, holding the GIL)
            # would wait. On the CPU alone the step is done: a let-go here would only
            # offer the GIL to the event loop while this thread has a step to finish.
            llama_cpp.llama_synchronize(self.ctx)
        t1 = time.perf_counter()
        took = t1 - t0
        self.stats["decode_steps"] += 1
        self.stats["decode_us"] += int(took * 1e6)
        if self._decoded_at is not None:  # Python's share: from one decode to the next
            self.stats["step_gap_us"] += int((t0 - self._decoded_at) * 1e6)
        self._decoded_at = t1
        if rc == 0 and n >= 32:  # a big step: learn the cost of a batch token
            per_token = took / n
            self._token_cost = per_token if not self._token_cost else (
                0.7 * self._token_cost + 0.3 * per_token)
        if rc == 0 and not any(r.prefilling for r in runs):
            old = self._step_cost.get(n)  # a decode step of n rows, drafts included
            self._step_cost[n] = took if old is None else 0.7 * old + 0.3 * took
        if rc != 0:
            self._decode_failed(runs, rc)
            return True
        for r in runs:
            self._after_decode(r)
        return True

    # ------------------------------------------------------------------ one step
    def _fill(self, runs: list[Run]) -> int:
        b = self.batch
        n = 0

        def add(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            b.token[n] = token
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq_id
            b.logits[n] = logits
            n += 1

        prefill = [r for r in runs if r.prefilling]
        n_decode = len(runs) - len(prefill)
        # Drafts only in pure decode steps: a prefill step is long already, and its
        # prompt tokens need the batch's room.
        for r in runs:
            r.draft = []
        if not prefill and self.lookup:
            n_decode += self._drafts(runs)
        for r in runs:  # the drafts not decoded are still tested, against the plain tokens
            if r.lookup is not None and not r.draft and not r.prefilling:
                r.lookup.watch(self.lookup)
        budget = (self._shared_budget() if n_decode else self.n_batch) - n_decode
        budget = max(budget, min(len(prefill), self.n_batch - n_decode))
        # A fair share each; what one needs less of goes to the ones after it.
        for i, r in enumerate(prefill):
            share = -(-budget // (len(prefill) - i)) if budget > 0 else 0
            r.chunk = min(share, len(r.seq.prompt) - len(r.slot.tokens))
            budget -= r.chunk
        # In slot (= seq id) order: with a per-sequence KV cache llama.cpp puts runs of
        # consecutive seq ids into one ubatch, so interleaving would split the step.
        for r in runs:
            r.out = -1
            sid, start = r.slot.seq_id, len(r.slot.tokens)
            if not r.prefilling:
                r.chunk = 0
                r.out = n
                add(r.next_token, start, sid, True)
                for k, t in enumerate(r.draft):
                    add(t, start + 1 + k, sid, True)
                continue
            tokens = r.seq.prompt
            for j in range(start, start + r.chunk):
                last = j == len(tokens) - 1
                if last:
                    r.out = n
                add(tokens[j], j, sid, last)
        return n

    def _drafts(self, runs: list[Run]) -> int:
        """Gives decode runs prompt-lookup drafts of one common length (llama.cpp splits a
        step into ubatches of equal tokens per sequence: uneven drafts would cost whole
        extra passes), or none when some run has none. Returns the rows added."""
        if any(r.lookup is None for r in runs):
            return 0
        room = min((self.n_batch - len(runs)) // len(runs), self._draft_rows(runs))
        if room <= 0:
            return 0
        drafts = []
        for r in runs:
            assert r.lookup is not None
            d = r.lookup.draft(min(room, self.n_ctx_seq - 1 - len(r.slot.tokens),
                                   r.seq.max_tokens - r.generated - 1))
            if not d:
                return 0
            drafts.append(d)
        k = min(len(d) for d in drafts)
        if k < room and self._value(len(runs), k, self._rate(runs)) <= self._value(
                len(runs), 0, 0.0):
            return 0  # shorter than planned, and too short to pay for its rows
        for r, d in zip(runs, drafts, strict=True):
            r.draft = d[:k]
        self.stats["lookup_drafted_tokens"] += k * len(runs)
        return k * len(runs)

    def _draft_rows(self, runs: list[Run]) -> int:
        """The draft length per run expected to give the most tokens per second (`_value`),
        0 when none beats a plain step. With the plain step or a batch token's cost not
        measured yet: as long as the runs allow."""
        n = len(runs)
        if not self._step_cost.get(n) or not self._token_cost:
            return self.n_batch
        rate = self._rate(runs)
        best_k, best = 0, self._value(n, 0, rate)
        for k in range(1, min(self.lookup, (self.n_batch - n) // n) + 1):
            if (v := self._value(n, k, rate)) > best:
                best_k, best = k, v
        return best_k

    @staticmethod
    def _rate(runs: list[Run]) -> float:
        return sum(r.lookup.rate for r in runs if r.lookup is not None) / len(runs)

    def _value(self, n: int, k: int, rate: float) -> float:
        """Expected tokens per second per run of a step where `n` runs decode k draft rows
        each. Row j is kept only if the j before it were, with probability rate^j (the
        runs' continuation rate), so a run earns 1 + rate + ... + rate^k tokens in a step
        of n x (1 + k) rows; that step takes what such a step took lately (`_step_cost`),
        or, never run yet, the plain step plus a batch token (`_token_cost`) per added
        row. Measured, since steps do not cost linearly in rows: on an EPYC 2 rows took
        2.2x one row, 5 rows 3.9x; on a Xeon (AVX-512) 2.1x and 2.6x (docs/BENCHMARKS.md)."""
        plain = self._step_cost.get(n) or 0.0
        took = self._step_cost.get(n * (1 + k)) or plain + n * k * self._token_cost
        # 1 + rate + ... + rate^k, in closed form: this runs for every k at every step
        earned = (1.0 - rate ** (k + 1)) / (1.0 - rate) if rate < 1.0 else k + 1.0
        return earned / took if took > 0 else 0.0

    def _shared_budget(self) -> int:
        top = min(self.chunk_max, self.n_batch)
        if not self._token_cost:
            return top
        fit = int(self.step_seconds / self._token_cost)
        return max(SHARED_BUDGET_MIN, min(top, fit))

    def _decode_failed(self, runs: list[Run], rc: int) -> None:
        # Keep the loop alive: the sequences of this batch fail, their KV is dropped.
        log.error("llama_decode returned %d for a batch of %d sequences", rc, len(runs))
        for r in runs:
            llama_cpp.llama_memory_seq_rm(self.mem, r.slot.seq_id, -1, -1)
            r.slot.tokens.clear()
            self._leave(r, "error", f"llama_decode failed ({rc})")


def _run_task(task: Callable[[str | None], None], error: str | None) -> None:
    try:
        task(error)
    except Exception:  # a failing task must not take generation down with it
        log.exception("a task on the decode thread failed")


__all__ = ["BatchLoop", "Run", "Slot", "token_bytes"]
