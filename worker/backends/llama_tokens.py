"""After a decode step of the llama.cpp backend: each run's next token, drafts kept or
rejected, text out.

Plain greedy runs take numpy's argmax of their logits row; the others go through their own
llama.cpp sampler chain (and grammar). A part of `llama_batch.BatchLoop`, on its thread.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from worker.backends import llama_quick as quick
from worker.backends.llama_logprobs import logprob_entry
from worker.backends.llama_slots import Run, Slot, _emit

log = logging.getLogger("corral.llama")


class TokenOutput:
    """Sampling, draft verification and detokenised output, per run and step."""

    ctx: Any
    mem: Any
    vocab: Any
    n_vocab: int
    n_ctx_seq: int
    slots: list[Slot]
    stats: dict[str, int]
    _pieces: dict[int, bytes]
    rows: quick.LogitsRows

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
            quick.memory_seq_cp(self.mem, r.slot.seq_id, f.slot.seq_id, -1, -1)
            f.slot.tokens = list(r.slot.tokens)
            f.waiting = False
            self._sample(f, r.out)
        if r.draft:
            self._verify(r)
        else:
            self._sample(r, r.out)

    def _verify(self, r: Run) -> None:
        """Keeps the longest prefix of the draft that sampling agrees with. Position k's
        logits are those of the prompt, the text so far and draft[:k]; while every token
        sampled equals the draft's, the next position's context is what one-at-a-time
        decoding would have had, so its logits are the ones it would have sampled from.
        The first token that differs is emitted and ends the step. Each emitted token is
        sampled once, in order, from its own logits by the sequence's own chain (its RNG
        and penalties advance exactly as without drafts): greedy text stays the same and
        sampled text keeps its distribution (and, seeded, its text)."""
        draft, r.draft = r.draft, []
        kept = 0
        for k in range(len(draft) + 1):
            token = self._pick(r, r.out + k)
            if not self._take(r, token, None) or k == len(draft) or token != draft[k]:
                break
            r.slot.tokens.append(token)  # decoded this step at its position: kept
            kept += 1
        self.stats["lookup_accepted_tokens"] += kept
        if r.lookup is not None:
            r.lookup.result(len(draft), kept)
        # The rejected rows' KV goes (kept rows and everything before stay).
        quick.memory_seq_rm(self.mem, r.slot.seq_id, len(r.slot.tokens), -1)

    def _sample(self, r: Run, out: int) -> None:
        row = self._logits(out) if r.seq.logprobs is not None else None
        if r.grammar is None:
            token = self._pick(r, out)
        else:
            try:
                p = r.seq.params
                token = r.grammar.sample(r.sampler, self.ctx, out, self._logits, self._is_eog,
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
        if quick.vocab_is_eog(self.vocab, token):
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

    def _pick(self, r: Run, out: int) -> int:
        """An unconstrained run's next token from logits row `out`."""
        return self._top(out) if r.argmax else quick.sampler_sample(r.sampler, self.ctx, out)

    def _is_eog(self, token: int) -> bool:
        return bool(quick.vocab_is_eog(self.vocab, token))

    def _top(self, out: int) -> int:
        """Greedy sampling without a sampler: llama.cpp's greedy sampler first copies the
        whole vocabulary into a candidate array (~120 us at 49k tokens); numpy's argmax
        reads the logits in place (~5 us) and breaks ties the same way, to the first."""
        return int(self._logits(out).argmax())

    def _logits(self, out: int) -> Any:
        return self.rows.get(self.ctx, out)

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
        n = quick.token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return bytes(buf[:n])
        size = -n
