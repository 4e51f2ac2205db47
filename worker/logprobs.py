"""Per-token log-probabilities in OpenAI's two shapes (chat and legacy completions).

Backends report `TokenLogprob`s (raw token bytes, the model's log-probabilities); this module
turns them into wire JSON, once per emitted chunk. It also holds a choice's logprobs back
until the text of their tokens has been sent, so a chunk's logprobs match its text and a
stop string's tokens never show.
"""

from __future__ import annotations

import math
from typing import Any

from worker.backends.base import TokenLogprob

#: OpenAI's value for "practically impossible" (JSON has no -Infinity).
FLOOR = -9999.0


def _lp(x: float) -> float:
    return FLOOR if math.isnan(x) or x < FLOOR else float(x)


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def chat_content(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` items."""
    return [
        {
            "token": _text(e.piece),
            "logprob": _lp(e.logprob),
            "bytes": list(e.piece),
            "top_logprobs": [
                {"token": _text(p), "logprob": _lp(lp), "bytes": list(p)} for p, lp in e.top
            ],
        }
        for e in entries
    ]


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": chat_content(entries), "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> tuple[dict[str, Any], int]:
    """Legacy `choices[i].logprobs` for tokens starting at character `offset` of the text;
    returns it with the offset after them."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        t = _text(e.piece)
        tokens.append(t)
        lps.append(_lp(e.logprob))
        tops.append({_text(p): _lp(lp) for p, lp in e.top})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}, offset


class Pending:
    """A choice's logprobs waiting for their text: released as the text goes out.

    Token pieces concatenate to the text (the detokenizer only delays incomplete UTF-8
    characters), so the bytes sent so far tell which tokens are out."""

    __slots__ = ("entries", "sent", "covered")

    def __init__(self) -> None:
        self.entries: list[TokenLogprob] = []
        self.sent = 0  # bytes of text sent
        self.covered = 0  # bytes of the tokens whose logprobs were released

    def add(self, entries: list[TokenLogprob]) -> None:
        self.entries.extend(entries)

    def take(self, text: str) -> list[TokenLogprob]:
        """The logprobs of the tokens `text` (just sent) completes."""
        self.sent += len(text.encode("utf-8"))
        out: list[TokenLogprob] = []
        i = 0
        for e in self.entries:
            if self.covered + len(e.piece) > self.sent:
                break
            self.covered += len(e.piece)
            out.append(e)
            i += 1
        del self.entries[:i]
        return out

    def rest(self) -> list[TokenLogprob]:
        out, self.entries = self.entries, []
        return out
