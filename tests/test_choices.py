"""logprobs and n > 1 on the worker, for every real backend (the shared `api` workers).

Several facts are proven per request to keep the suite lean: greedy logprobs (chosen =
top), the token/bytes/text agreement, n choices with their indexes and finish reasons,
usage summed with the prompt counted once, and seeded determinism.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import API_SLOTS, COUNTING, MODEL, ApiTarget, chat, status
from procs import wait_for


def _top(api: ApiTarget) -> int:
    return 3 if api.caps.name == "llama" else 1  # openvino reports the chosen token only


def _idle(api: ApiTarget) -> None:
    wait_for(lambda: (s := status(api.worker))["slots_busy"] == 0 and s["queue_depth"] == 0,
             timeout=10, what="an idle worker")


def _check_greedy_entries(entries, text: str, k: int) -> None:
    assert entries, "no logprobs"
    assert "".join(e.token for e in entries) == text
    for e in entries:
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert e.logprob <= 0.0
        assert len(e.top_logprobs) == k
        # Greedy: the chosen token is the most likely one, with the same logprob.
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)


def test_chat_logprobs_and_n_greedy(api):
    """n=3 greedy with logprobs: three identical choices, each with full logprobs."""
    k = _top(api)
    plain = api.client.chat.completions.create(model=MODEL, messages=chat("Name a color."),
                                               temperature=0, max_tokens=10)
    r = api.client.chat.completions.create(model=MODEL, messages=chat("Name a color."),
                                           temperature=0, max_tokens=10, n=3, logprobs=True,
                                           top_logprobs=k)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.message.content == plain.choices[0].message.content
        assert c.finish_reason == plain.choices[0].finish_reason
        _check_greedy_entries(c.logprobs.content, c.message.content, k)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # counted once
    assert r.usage.completion_tokens == 3 * plain.usage.completion_tokens
    _idle(api)


def test_n_seeded_stream(api):
    """A seeded n=3 sampling stream: interleaved by index, every choice finishes, usage is
    the sum, and the same seed gives the same choices (streamed or not)."""
    kw = dict(model=MODEL, messages=chat("Write a word."), temperature=1.0, seed=11,
              max_tokens=8, n=3)
    before = status(api.worker)["prompt_cache"].get("prompt_tokens_evaluated", 0)
    texts, finish, roles, order, use = {}, {}, set(), [], None
    for ch in api.client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}):
        if ch.usage is not None:
            use = ch.usage
        for c in ch.choices:
            order.append(c.index)
            if c.delta.role:
                roles.add(c.index)
            if c.delta.content:
                assert c.index not in finish  # nothing after a choice's finish
                texts[c.index] = texts.get(c.index, "") + c.delta.content
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert roles == {0, 1, 2} and set(finish) == {0, 1, 2}
    assert set(finish.values()) <= {"stop", "length"}
    assert len(set(order)) == 3
    once = api.client.chat.completions.create(**kw)
    assert {c.index: c.message.content or "" for c in once.choices} == \
        {i: texts.get(i, "") for i in range(3)}
    assert {c.index: c.finish_reason for c in once.choices} == finish
    assert use.completion_tokens == once.usage.completion_tokens
    assert use.prompt_tokens == once.usage.prompt_tokens
    if api.caps.cache_counters:  # llama: the prompt was evaluated once, not three times
        after = status(api.worker)["prompt_cache"]["prompt_tokens_evaluated"]
        assert after - before <= use.prompt_tokens + 1
    _idle(api)


def test_completion_logprobs_stream(api):
    """Legacy completions stream with `logprobs`: per chunk tokens, offsets, alternatives."""
    k = _top(api)
    text, tokens, offsets = "", [], []
    for ch in api.client.completions.create(model=MODEL, prompt=COUNTING, temperature=0,
                                            max_tokens=8, logprobs=k, stream=True):
        for c in ch.choices:
            text += c.text
            if c.logprobs is None:
                continue
            lp = c.logprobs
            assert "".join(lp.tokens) == c.text
            for tok, lpv, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                     strict=True):
                assert len(top) <= k and tok in top  # greedy: chosen is among the top
                assert top[tok] == pytest.approx(max(top.values()), abs=1e-4) == \
                    pytest.approx(lpv, abs=1e-4)
            tokens += lp.tokens
            offsets += lp.text_offset
    assert "".join(tokens) == text and text.strip()
    expect, at = [], 0
    for t in tokens:
        expect.append(at)
        at += len(t)
    assert offsets == expect
    whole = api.client.completions.create(model=MODEL, prompt=COUNTING, temperature=0,
                                          max_tokens=8, logprobs=k)
    assert whole.choices[0].text == text
    assert whole.choices[0].logprobs.tokens == tokens
    _idle(api)


def test_bad_logprobs_and_n(api):
    client = api.client
    cases = [
        (dict(logprobs=True, top_logprobs=50), "top_logprobs"),
        (dict(top_logprobs=2), "top_logprobs"),  # without logprobs
        (dict(n=API_SLOTS + 1), "n"),
    ]
    if api.caps.name == "openvino":  # it reports only the chosen token
        cases.append((dict(logprobs=True, top_logprobs=2, temperature=0), "top_logprobs"))
        cases.append((dict(logprobs=True, top_logprobs=1, temperature=0.7), "top_logprobs"))
    for kw, param in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2,
                                               stream=stream, **kw)
            assert e.value.param == param, (kw, e.value)
    r = httpx.post(f"{api.url}/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                      "logprobs": 21}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = httpx.post(f"{api.url}/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                      "logprobs": 1, "echo": True}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    _idle(api)
