"""The continuous-batching decode loop of the llama.cpp backend.

`parallel` slots share one llama.cpp context; slot i owns KV sequence id i. Every step
builds one `llama_batch`: one token for each sequence that is generating, then chunks of
the prompts still being prefilled (a fair share each of what is left of the step's token
budget), and runs one `llama_decode`. Each sequence samples from its own logits with its
own sampler chain. Sequences join and leave between steps.

Each slot remembers which tokens its KV sequence holds. A new request takes the free slot
whose tokens share the longest prefix with its prompt, drops the rest of that KV, and
prefills only the remainder (at least the last prompt token, to get logits).

Everything here runs on the loop's own thread, except `submit`/`cancel`/`close`/`call_soon`
and `set_threads`, which only touch the condition-protected hand-over state. A new thread
count (the host's cores re-shared, worker/hostcores.py) is applied between steps, on this
thread. `call_soon` runs other work on this thread between steps, one task per step (the
embedding context, `llama_embed.py`): every llama_decode of the process stays on one thread,
interleaved with generation.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from worker.backends.base import Sequence
from worker.backends.knobs import env_number
from worker.backends.llama_cache import MIN_TOKENS, HostCache, cache_mib
from worker.backends.llama_logprobs import logprob_entry
from worker.backends.llama_lookup import Lookup
from worker.backends.llama_sampling import Detokenizer, sampler_chain

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


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this KV sequence holds
    run: Run | None = None
    last_used: float = 0.0


@dataclass
class Run:
    """A sequence occupying a slot."""

    seq: Sequence
    slot: Slot
    sampler: Any
    detok: Detokenizer = field(default_factory=Detokenizer)
    generated: int = 0
    next_token: int | None = None  # sampled, to be decoded in the next step
    out: int = -1  # index of this run's logits in the current batch, -1 if none
    chunk: int = 0  # prompt tokens this run adds in the current batch
    grammar: Any = None  # llama_grammar.GrammarSampler of a constrained sequence
    # n > 1: a fork waits (decodes nothing) until its parent has evaluated the prompt,
    # then gets a copy of the parent's KV sequence and samples from the same logits.
    waiting: bool = False
    forks: list[Run] = field(default_factory=list)
    lookup: Lookup | None = None  # a plain greedy sequence: prompt-lookup drafts
    argmax: bool = False  # greedy, unconstrained, no penalties: the top logit, read directly
    draft: list[int] = field(default_factory=list)  # decoded after next_token this step

    @property
    def prefilling(self) -> bool:
        return self.next_token is None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in strides first: cheap on long shared histories.
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchLoop:
    def __init__(self, ctx: Any, vocab: Any, n_vocab: int, slots: int, n_batch: int,
                 n_ctx_seq: int, lookup: int = 0) -> None:
        self.ctx = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.vocab = vocab
        self.n_vocab = n_vocab
        self.n_batch = n_batch
        self.n_ctx_seq = n_ctx_seq
        self.slots = [Slot(i) for i in range(slots)]
        self.lookup = lookup  # longest prompt-lookup draft; 0: no speculation
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
        self._token_cost = 0.0  # seconds per batch token in prefill-heavy steps (EWMA)
        self._want_threads: int | None = None  # set by set_threads, applied between steps
        self.threads = int(llama_cpp.llama_n_threads(ctx))  # what llama_decode uses now
        self.stats = {"prompt_cache_hits": 0, "prompt_cache_reused_tokens": 0,
                      "prompt_tokens_evaluated": 0, "decode_steps": 0,
                      "lookup_drafted_tokens": 0, "lookup_accepted_tokens": 0}

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
        for k in self.stats:
            self.stats[k] = 0

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.batch)

    # ------------------------------------------------------------------ the loop
    def _busy(self) -> bool:
        return bool(self._incoming or self._waiting or self._tasks
                    or any(s.run for s in self.slots))

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._busy() and self._want_threads is None:
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
            _run_task(task, None)
        self._reap_cancelled()
        self._admit()
        runs = [s.run for s in self.slots if s.run is not None and not s.run.waiting]
        if not runs:
            return any(s.run for s in self.slots)
        n = self._fill(runs)
        if n == 0:
            return True
        self.batch.n_tokens = n
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        self.stats["decode_steps"] += 1
        if rc == 0 and n >= 32:  # a prefill-heavy step: learn the cost of a batch token
            per_token = (time.perf_counter() - t0) / n
            self._token_cost = per_token if not self._token_cost else (
                0.7 * self._token_cost + 0.3 * per_token)
        if rc != 0:
            self._decode_failed(runs, rc)
            return True
        for r in runs:
            self._after_decode(r)
        return True

    # ------------------------------------------------------------------ admission
    def _reap_cancelled(self) -> None:
        if self._waiting:
            keep = deque(s for s in self._waiting if not s.cancelled.is_set())
            for s in self._waiting:
                if s.cancelled.is_set():
                    _finish_once(s, "stop", None)
            self._waiting = keep
        for slot in self.slots:
            if slot.run is not None and slot.run.seq.cancelled.is_set():
                self._leave(slot.run, "stop", None)

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self.slots if s.run is None]
            if not free:
                return
            if len(free) < 1 + len(self._waiting[0].forks):
                return  # n choices start together; the engine frees the slots they need
            seq = self._waiting.popleft()
            prompt = seq.prompt
            best, best_len = None, 0
            for s in free:
                k = common_prefix(s.tokens, prompt)
                if k > best_len:
                    best, best_len = s, k
            empty = [s for s in free if not s.tokens]
            if (self.host is None and best is not None and empty
                    and best_len * 2 < len(best.tokens)):
                best = None  # reusing a sliver would throw away most of a warm cache
            if best is None:  # no reuse: take an empty slot, else the least recently used
                best = min(free, key=lambda s: (bool(s.tokens), s.last_used))
                best_len = common_prefix(best.tokens, prompt)
            restored = False
            if self.host is not None:
                best, best_len, restored = self._from_host(prompt, free, best, best_len)
            keep = min(best_len, len(prompt) - 1)
            if restored and self.host is not None:
                self.host.restored_tokens += keep
            run = self._start(seq, best, keep)
            others = sorted((s for s in free if s is not best),
                            key=lambda s: (bool(s.tokens), s.last_used))
            for fork, slot in zip(seq.forks, others, strict=False):
                if run is None:  # the parent could not start: neither can its forks
                    _finish_once(fork, "error", "the request could not start")
                    continue
                child = self._start(fork, slot, 0)
                if child is not None:
                    child.waiting = True
                    run.forks.append(child)

    def _from_host(self, prompt: list[int], free: list[Slot], best: Slot, best_len: int
                   ) -> tuple[Slot, int, bool]:
        """A host-cache entry sharing more of `prompt` than the best free slot, copied into
        the emptiest free slot (whose own KV is kept in the cache first)."""
        assert self.host is not None
        entry, n = self.host.best(prompt, common_prefix)
        if entry is None or n < best_len + MIN_TOKENS:
            return best, best_len, False
        target = min(free, key=lambda s: (bool(s.tokens), s.last_used))
        self._keep_in_host(target, 0)
        target.tokens.clear()
        if not self.host.restore(entry, target.seq_id):
            return (target, 0, False) if target is best else (best, best_len, False)
        target.tokens = list(entry.tokens)
        return target, n, True

    def _keep_in_host(self, slot: Slot, keep: int) -> None:
        """Copies a slot's KV to the host cache before all but `keep` of it is dropped."""
        if self.host is not None and len(slot.tokens) - keep >= MIN_TOKENS:
            self.host.save(slot.seq_id, slot.tokens, common_prefix)

    def _start(self, seq: Sequence, slot: Slot, keep: int) -> Run | None:
        if not seq.prompt or len(seq.prompt) > self.n_ctx_seq:
            _finish_once(seq, "error", "the prompt does not fit this model's context")
            return None
        self._keep_in_host(slot, keep)
        if keep < len(slot.tokens) and not llama_cpp.llama_memory_seq_rm(
            self.mem, slot.seq_id, keep, -1
        ):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            keep = 0
        del slot.tokens[keep:]
        seq.cached_tokens = keep
        if keep:
            self.stats["prompt_cache_hits"] += 1
            self.stats["prompt_cache_reused_tokens"] += keep
        params = seq.params
        if seq.index and params.seed is not None:  # choice i of a seeded request: seed + i
            params = dataclasses.replace(params, seed=params.seed + seq.index)
        try:
            sampler = sampler_chain(params, self.n_vocab, self.n_ctx_seq)
        except Exception as exc:  # a broken sampler must not take the loop down
            _finish_once(seq, "error", f"sampler setup failed: {exc}")
            return None
        slot.run = Run(seq, slot, sampler, grammar=seq.constraint,
                       argmax=_argmax_only(seq))
        if self.lookup and _plain_greedy(seq):
            slot.run.lookup = Lookup(self.lookup)
            slot.run.lookup.extend(seq.prompt)
        return slot.run

    def _leave(self, run: Run, reason: str, error: str | None) -> None:
        slot = run.slot
        slot.run = None
        slot.last_used = time.monotonic()
        with contextlib.suppress(Exception):
            llama_cpp.llama_sampler_free(run.sampler)
        if run.grammar is not None:
            run.grammar.free()
        if reason != "error":
            # The tokens decoded so far stay in the KV for the next request to reuse;
            # still uncounted tokens (an incomplete character) are reported now.
            n = run.detok.take()
            if n:
                _emit(run.seq, run.detok.flush(), n)
        _finish_once(run.seq, reason, error)
        for f in run.forks:  # left before the prompt was evaluated: so do its forks
            if f.slot.run is f:
                self._leave(f, reason if reason == "error" else "stop", error)
        run.forks = []

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
        room = (self.n_batch - len(runs)) // len(runs)
        drafts = []
        for r in runs:
            if r.lookup is None:
                return 0
            d = r.lookup.draft(min(room, self.n_ctx_seq - 1 - len(r.slot.tokens),
                                   r.seq.max_tokens - r.generated - 1))
            if not d:
                return 0
            drafts.append(d)
        k = min(len(d) for d in drafts)
        for r, d in zip(runs, drafts, strict=True):
            r.draft = d[:k]
        self.stats["lookup_drafted_tokens"] += k * len(runs)
        return k * len(runs)

    def _shared_budget(self) -> int:
        top = min(self.chunk_max, self.n_batch)
        if not self._token_cost:
            return top
        fit = int(self.step_seconds / self._token_cost)
        return max(SHARED_BUDGET_MIN, min(top, fit))

    def _after_decode(self, r: Run) -> None:
        if r.chunk:
            start = len(r.slot.tokens)
            r.slot.tokens.extend(r.seq.prompt[start : start + r.chunk])
            self.stats["prompt_tokens_evaluated"] += r.chunk
        elif r.next_token is not None and r.out >= 0:
            r.slot.tokens.append(r.next_token)
        if r.out < 0:
            return
        forks, r.forks = r.forks, []
        for f in forks:  # the prompt is in: each fork gets a copy of it and samples
            if f.slot.run is not f:
                continue  # cancelled meanwhile
            llama_cpp.llama_memory_seq_cp(self.mem, r.slot.seq_id, f.slot.seq_id, -1, -1)
            f.slot.tokens = list(r.slot.tokens)
            f.waiting = False
            self._sample(f, r.out)
        if r.draft:
            self._verify(r)
        else:
            self._sample(r, r.out)

    def _verify(self, r: Run) -> None:
        """Keeps the longest prefix of the draft that greedy sampling agrees with: the
        token sampled after each kept one is the next, as one-at-a-time decoding gives."""
        draft, r.draft = r.draft, []
        kept = 0
        for k in range(len(draft) + 1):
            token = self._top(r.out + k)  # drafts are only made for plain greedy runs
            if not self._take(r, token, None) or k == len(draft) or token != draft[k]:
                break
            r.slot.tokens.append(token)  # decoded this step at its position: kept
            kept += 1
        self.stats["lookup_accepted_tokens"] += kept
        if r.lookup is not None:
            r.lookup.result(len(draft), kept)
        # The rejected rows' KV goes (kept rows and everything before stay).
        llama_cpp.llama_memory_seq_rm(self.mem, r.slot.seq_id, len(r.slot.tokens), -1)

    def _sample(self, r: Run, out: int) -> None:
        row = self._logits(out) if r.seq.logprobs is not None else None
        if r.argmax:
            token = self._top(out)
        elif r.grammar is None:
            token = llama_cpp.llama_sampler_sample(r.sampler, self.ctx, out)
        else:
            try:
                p = r.seq.params
                token = r.grammar.sample(r.sampler, self.ctx, out, self._is_eog,
                                         stateful=p.repeat_penalty != 1.0
                                         or bool(p.presence_penalty or p.frequency_penalty))
            except Exception as exc:  # a grammar failure ends this sequence, not the loop
                log.error("constrained sampling failed: %s", exc)
                self._leave(r, "error", f"constrained sampling failed: {exc}")
                return
        self._take(r, token, row)

    def _take(self, r: Run, token: int, row: Any) -> bool:
        """Emits a sampled token; False when it ended the sequence (which has left)."""
        r.generated += 1
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            r.detok.pending_tokens += 1  # no logprob entry: OpenAI leaves the stop out
            self._leave(r, "stop", None)
            return False
        piece = self._piece(token)
        if row is not None and r.seq.on_logprobs is not None:
            r.seq.on_logprobs([logprob_entry(row, token, piece, r.seq.logprobs or 0,
                                             self._piece)])
        text = r.detok.push(piece)
        if text:
            _emit(r.seq, text, r.detok.take())
        if r.generated >= r.seq.max_tokens or len(r.slot.tokens) >= self.n_ctx_seq:
            self._leave(r, "length", None)
            return False
        r.next_token = token
        if r.lookup is not None:
            r.lookup.extend([token])
        return True

    def _is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def _decode_failed(self, runs: list[Run], rc: int) -> None:
        # Keep the loop alive: the sequences of this batch fail, their KV is dropped.
        log.error("llama_decode returned %d for a batch of %d sequences", rc, len(runs))
        for r in runs:
            llama_cpp.llama_memory_seq_rm(self.mem, r.slot.seq_id, -1, -1)
            r.slot.tokens.clear()
            self._leave(r, "error", f"llama_decode failed ({rc})")

    def _top(self, out: int) -> int:
        """Greedy sampling without a sampler: llama.cpp's greedy sampler first copies the
        whole vocabulary into a candidate array (~120 us at 49k tokens); numpy's argmax
        reads the logits in place (~5 us) and breaks ties the same way, to the first."""
        return int(self._logits(out).argmax())

    def _logits(self, out: int) -> Any:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, out)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = token_bytes(self.vocab, token)
            self._pieces[token] = piece
        return piece


def token_bytes(vocab: Any, token: int) -> bytes:
    """The bytes of one token as text (special/control tokens render as nothing)."""
    size = 64
    while True:
        buf = (ctypes.c_char * size)()
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return bytes(buf[:n])
        size = -n


def _plain_greedy(seq: Sequence) -> bool:
    """Whether drafts can be verified by argmax alone: greedy, unconstrained, no
    penalties (they would see rejected tokens), no logprobs, a single choice."""
    return (_argmax_only(seq) and seq.logprobs is None and not seq.forks
            and seq.index == 0)


def _argmax_only(seq: Sequence) -> bool:
    """Whether the sampler chain is greedy alone (no grammar, no penalties to apply)."""
    p = seq.params
    return (p.greedy and seq.constraint is None and p.repeat_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty)


def _emit(seq: Sequence, text: str, n: int) -> None:
    seq.on_tokens(text, n)


def _run_task(task: Callable[[str | None], None], error: str | None) -> None:
    try:
        task(error)
    except Exception:  # a failing task must not take generation down with it
        log.exception("a task on the decode thread failed")


def _finish_once(seq: Sequence, reason: str, error: str | None) -> None:
    # on_finish releases the engine's slot: it must run exactly once, and a failing
    # callback must not stop the loop from serving the others.
    if getattr(seq, "_llama_finished", False):
        return
    seq._llama_finished = True  # type: ignore[attr-defined]
    try:
        seq.on_finish(reason, error)
    except Exception:
        log.exception("on_finish callback failed")
