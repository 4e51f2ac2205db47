"""Prompt-lookup drafts for speculative decoding (llama backend): greedy and sampled
sequences alike, unconstrained and single-choice.

A sequence that quotes its prompt (summarise, edit, translate code, answer from a document)
repeats runs of tokens it has already seen. The decode loop asks `Lookup.draft` for the
tokens that followed the last occurrence of the sequence's latest n-gram (prompt and text
so far), decodes them in the same `llama_decode` as the sequence's next token, and keeps
the longest prefix the sequence's sampler agrees with (llama_tokens.TokenOutput._verify):
every kept token is one plain decoding would have sampled from the same logits with the
same chain state, so greedy text is the same and sampled text keeps its distribution,
only fewer steps are spent on it. No model, no extra memory beyond an index of n-grams.

Drafts that keep failing shrink (a free-form answer rarely repeats its prompt). A draft
row costs about a prompt token, on a small CPU half a plain step, so the batch loop drafts
only as many rows as the sequences' recent acceptance rate pays for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.backends.knobs import env_number
from worker.backends.llama_history import LONG, History

#: Longest draft per step (tokens); CORRAL_LLAMA_LOOKUP overrides it (0 turns drafting off).
#: On by default: the batch loop sizes each step's drafts by what they earn (their rows'
#: cost against the runs' acceptance rate, llama_batch.BatchLoop._draft_rows), so free
#: text gets almost none and is level with plain decoding, while text that repeats its
#: input ran 1.35x / 1.13x llama-server's tok/s at 1 / 4 streams (docs/BENCHMARKS.md); no
#: greedy answer changes where the prompt caches pass through the same states
#: (bench/greedy_identity.py).
DEFAULT_DRAFT = 8
NGRAMS = (3, 2)  # tried longest first: a 3-gram match predicts better than a 2-gram one
START = 4  # first draft length; doubled while drafts are kept whole
REST = 16  # tokens decoded plainly after a mostly rejected draft
#: How fast a low acceptance rate is forgotten, per token decoded without drafts: from a
#: failed draft (rate ~0) back to trying at 4 runs (0.83) takes ~50 tokens.
RECOVER = 1 / 64
START_RATE = 0.7


def draft_limit(value: int | None = None) -> int:
    """The configured longest draft: `value`, else CORRAL_LLAMA_LOOKUP, else the default."""
    if value is not None:
        return max(0, int(value))
    return int(env_number("CORRAL_LLAMA_LOOKUP", DEFAULT_DRAFT))


@dataclass
class Lookup:
    """The n-gram index of one sequence's tokens and how long its drafts may be now."""

    limit: int
    tokens: list[int] = field(default_factory=list)
    # n-gram -> index of the token that followed its latest occurrence
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    size: int = 0  # the current longest draft, adapted to what gets accepted
    rest: int = 0  # tokens to decode without drafting after drafts kept failing
    proposed: int = 0
    accepted: int = 0
    # Recent share of drafted tokens kept (EWMA): what the batch loop weighs against the
    # cost of a draft row (llama_batch.BatchLoop._draft_rows). It starts where one draft
    # row pays for a sequence alone on a small CPU, not more: most free text repeats little.
    rate: float = START_RATE
    # Earlier sequences' tokens (llama_history.py): drafts where they match a longer
    # context than this one's own tokens do.
    history: History | None = None
    from_history: bool = False  # the last draft came from `history`

    def __post_init__(self) -> None:
        self.size = min(self.limit, START)
        if self.history is not None and self.history.rate is not None:
            self.rate = max(self.rate, self.history.rate)  # what drafts earned lately

    def extend(self, new: list[int]) -> None:
        toks = self.tokens
        for t in new:
            j = len(toks)
            toks.append(t)
            for n in NGRAMS:
                if j >= n:
                    self.index[tuple(toks[j - n : j])] = j
        self.rest = max(0, self.rest - len(new))
        self.rate = min(1.0, self.rate + RECOVER * len(new))

    def draft(self, room: int) -> list[int]:
        """Up to min(size, room) tokens predicted to follow the tokens so far."""
        k = min(self.size, room)
        if k <= 0 or self.rest:
            return []
        toks = self.tokens
        history = self.history
        # The longest context seen wins: history's 6- and 4-grams, then this sequence's
        # 3-gram, history's, and this sequence's 2-gram.
        if history is not None and (d := history.draft(toks, k, LONG)):
            self.from_history = True
            return d
        for n in NGRAMS:
            if len(toks) <= n:
                continue
            at = self.index.get(tuple(toks[-n:]))
            if at is not None:
                self.from_history = False
                return toks[at : at + k]
            if n == NGRAMS[0] and history is not None and (d := history.draft(toks, k, (n,))):
                self.from_history = True
                return d
        return []

    def result(self, proposed: int, accepted: int) -> None:
        """Adapts the draft length to what was kept: a CPU step costs nearly as much per
        row as per sequence, so a draft must mostly be kept to pay for itself."""
        self.proposed += proposed
        self.accepted += accepted
        if self.from_history and self.history is not None:
            self.history.observe(proposed, accepted)
        if proposed:
            self.rate = 0.5 * self.rate + 0.5 * accepted / proposed
        if accepted == proposed:
            self.size = min(self.limit, self.size * 2)
        else:
            self.size = max(1, accepted)
        if accepted * 2 < proposed and self.accepted * 2 < self.proposed:
            self.rest = REST  # mostly wrong lately and overall: pause, then try small
            self.size = 1


__all__ = ["DEFAULT_DRAFT", "Lookup", "draft_limit"]
