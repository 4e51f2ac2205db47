"""Prompt-lookup speculative decoding (worker/backends/llama_lookup.py): the same greedy (and
seeded sampled) text with and without it, on the real model, and drafts that were really kept.

Two llama workers, drafting off (`CORRAL_LLAMA_LOOKUP=0`) and on, get the same requests in
the same order, one at a time (so each worker's prompt cache goes through the same states):
a prompt that makes the model repeat its input, where drafts are long and mostly right,
and a free-form one, where they are short and mostly wrong, until the same request comes
again: then the earlier answer (llama_history.py) drafts it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import client_for, require_backend, serve_worker, status
from procs import Worker, metric

from worker.backends.llama_history import START_RATE, History, learned
from worker.backends.llama_lookup import Lookup

TEXT = ("The corral stood at the edge of the valley. Every morning the horses came down from "
        "the hills to drink at the river, and the old rancher counted them one by one as they "
        "passed the gate. In winter the snow covered the fences and the horses stayed in the "
        "barn, eating hay and waiting for spring.")
PROMPTS = (f"Repeat the following text exactly, word for word:\n\n{TEXT}",
           "Write a long essay about the history of Rome.")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Worker, Worker]]:
    require_backend("llama")
    args = ("--parallel", "2", "--threads", "2", "--ctx-size", "1024")
    plain = serve_worker(*args, env={"CORRAL_LLAMA_LOOKUP": "0"})
    drafting = serve_worker(*args, env={"CORRAL_LLAMA_LOOKUP": "8"})
    a, b = next(plain), next(drafting)
    try:
        yield a, b
    finally:
        for gen in (plain, drafting):
            gen.close()


def _answer(w: Worker, prompt: str, stream: bool) -> str:
    c = client_for(w.url, timeout=300)
    kw = {"model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}],
          "max_tokens": 96, "temperature": 0}
    if not stream:
        return c.chat.completions.create(**kw).choices[0].message.content or ""
    return "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(stream=True, **kw) if ch.choices)


def test_greedy_text_is_the_same_with_and_without_drafts(pair):
    plain, drafting = pair
    assert status(plain)["hardware"]["lookup_draft_tokens"] == 0
    assert status(drafting)["hardware"]["lookup_draft_tokens"] == 8
    for i, prompt in enumerate(PROMPTS):
        for stream in (False, True):
            before = status(drafting)["prompt_cache"]
            want = _answer(plain, prompt, stream)
            got = _answer(drafting, prompt, stream)
            assert got == want, (i, stream)
        if i == 0:  # the repeating answer: drafts were made and most were kept
            pc = status(drafting)["prompt_cache"]
            assert pc["lookup_accepted_tokens"] * 2 > pc["lookup_drafted_tokens"] > 0, pc
    # The free-form request's second time (streamed): drafted from its first answer, which
    # history holds, and mostly kept; its own text alone would have drafted little.
    pc = status(drafting)["prompt_cache"]
    assert pc.get("lookup_history_drafts", 0) > before.get("lookup_history_drafts", 0), pc
    drafted = pc["lookup_drafted_tokens"] - before["lookup_drafted_tokens"]
    kept = pc["lookup_accepted_tokens"] - before["lookup_accepted_tokens"]
    assert kept * 4 > drafted * 3 and kept > 48, (before, pc)
    # The same counts in Prometheus.
    assert metric(drafting.url, "corral_worker_history_drafts_total") == \
        pc["lookup_history_drafts"]
    assert metric(drafting.url, "corral_worker_draft_accepted_tokens_total") == \
        pc["lookup_accepted_tokens"]
    assert status(plain)["prompt_cache"]["lookup_drafted_tokens"] == 0


def test_sampled_text_takes_drafts_and_stays_the_seeded_text(pair):
    """A sampled request (Open WebUI's kind) is drafted too: each position is sampled in
    turn with the request's own seeded chain, so the text is the one the plain worker
    samples with the same seed, and the repeating answer keeps many drafts."""
    plain, drafting = pair
    kept_in_all = 0
    for seed in (7, 11):
        before = status(drafting)["prompt_cache"]
        kw = {"model": "smollm2-135m", "max_tokens": 96, "temperature": 0.3, "seed": seed,
              "top_p": 0.95, "messages": [{"role": "user", "content": PROMPTS[0]}]}
        want = client_for(plain.url, timeout=300).chat.completions.create(**kw)
        got = client_for(drafting.url, timeout=300).chat.completions.create(**kw)
        assert got.choices[0].message.content == want.choices[0].message.content, seed
        pc = status(drafting)["prompt_cache"]
        drafted = pc["lookup_drafted_tokens"] - before["lookup_drafted_tokens"]
        kept = pc["lookup_accepted_tokens"] - before["lookup_accepted_tokens"]
        # At temperature 0.7 the sampled answer strays from the text it repeats often
        # enough that whether drafts pay followed the box's measured step costs: 35 of 59
        # kept once, none at all another time (EPYC, same seeds). At 0.3 it quotes the text
        # and 34-49 of 34-60 drafted tokens were kept per seed over six runs (EPYC).
        assert kept * 4 > drafted > 0, (seed, before, pc)
        kept_in_all += kept
    assert kept_in_all >= 10


def test_lookup_drafts_what_followed_the_latest_ngram():
    lk = Lookup()
    lk.extend([1, 2, 3, 4, 5, 6, 9, 1, 2, 3])
    assert lk.draft(room=8) == [4, 5, 6, 9, 1, 2, 3]
    assert lk.draft(room=2) == [4, 5]
    lk.extend([4, 7])  # a 2-gram when the 3-gram is new
    assert lk.draft(room=8) == []
    lk.extend([5, 6])
    assert lk.draft(room=3) == [9, 1, 2]


def test_history_drafts_what_followed_the_same_tokens_last_time():
    h = History(budget=12)
    h.add([1, 2, 3, 4, 5, 6, 7])
    assert h.draft([9, 2, 3, 4, 5], 2) == [6, 7]  # 4-gram match
    assert h.draft([8, 2, 3, 4], 8) == [5, 6, 7]  # 3-gram match
    assert h.draft([9, 9, 9, 4], 8) == []  # a 2-gram is too little to go on
    h.add([20, 21, 22, 23, 24, 25])  # over the budget: the first sequence goes
    assert h.tokens == 6 and h.draft([2, 3, 4], 8) == []
    assert {sid for sid, _ in h.index.values()} == {1}  # nothing points at the one gone
    assert h.draft([21, 22, 23], 8) == [24, 25]
    assert h.drafts == 0  # counted once verified (observe), not when looked up


def test_history_keeps_an_answer_and_the_end_of_its_prompt():
    from worker.backends.llama_history import PROMPT_TAIL

    h = History(budget=1000)
    prompt = list(range(100, 100 + PROMPT_TAIL + 10))
    h.add(prompt + [1, 2, 3], answer_at=len(prompt))
    assert h.tokens == PROMPT_TAIL + 3
    assert h.draft(prompt[-4:], 8) == [1, 2, 3]  # the prompt's end predicts the answer
    assert h.draft(prompt[:4], 8) == []  # its body is not kept


def test_a_sequence_drafts_from_history_where_its_own_tokens_do_not_repeat():
    h = History(budget=100)
    h.add([5, 6, 7, 8, 9, 10])
    lk = Lookup(history=h)
    lk.extend([1, 6, 7, 8])
    assert lk.draft(room=8) == [9, 10]  # no 3-gram of its own: history's
    lk.extend([1, 6, 7])
    assert lk.draft(room=8) == [8, 1, 6, 7]  # its own 3-gram before history's
    h.add([2, 8, 1, 6, 7, 60, 61])
    assert lk.draft(room=8) == [60, 61] and lk.from_history  # history's 4-gram before it


def test_a_new_sequence_starts_from_the_rate_history_drafts_earned():
    h = History(budget=100)
    h.add([5, 6, 7, 8, 9, 10, 11, 12])
    first = Lookup(history=h)
    assert first.rate == START_RATE  # nothing learned yet
    first.extend([1, 6, 7, 8])
    assert first.draft(room=8) == [9, 10, 11, 12] and first.from_history
    first.result(4, 4)
    assert h.rate == first.rate == learned(START_RATE, 4, 0) > START_RATE
    assert Lookup(history=h).rate == h.rate  # the next one starts from it
    for _ in range(3):
        h.observe(0, 1)
    assert Lookup(history=h).rate == h.rate < START_RATE  # and below the start
    assert h.drafts == 1  # decoded drafts; the tested positions only teach the rate


def test_watched_drafts_teach_the_rate_without_decoding():
    """The draft a step does not decode is checked against the tokens decoded plainly:
    each position that matches raises the rate, the first that does not lowers it and
    ends the watch; a decoded draft's outcome counts the same way."""
    lk = Lookup()
    lk.extend([1, 2, 3, 4, 5, 6, 1, 2, 3])
    lk.watch(8)
    assert lk.shadow == [4, 5, 6, 1, 2, 3]
    lk.extend([4, 5])
    assert lk.rate == learned(START_RATE, 2, 0) and lk.shadow == [6, 1, 2, 3]
    lk.watch(8)  # still watching the same draft: no new one
    assert lk.shadow == [6, 1, 2, 3]
    lk.extend([9])
    assert lk.rate == learned(START_RATE, 2, 1) and lk.shadow == []
    before = lk.rate
    lk.watch(8)  # [5, 9]'s continuation: nothing seen after 5, 9 yet
    lk.extend([7])
    assert lk.rate == before and lk.proposed == 0
    lk.result(4, 2)
    assert lk.rate == learned(before, 2, 1) and (lk.proposed, lk.accepted) == (4, 2)


def test_no_draft_without_a_repeated_ngram():
    lk = Lookup()
    lk.extend([1, 2, 3, 4])
    assert lk.draft(room=8) == []


def test_the_prefill_chunk_beside_decoding_is_configurable(monkeypatch):
    pytest.importorskip("llama_cpp")
    from worker.backends.llama_batch import SHARED_BUDGET_MAX, shared_budget_max

    monkeypatch.delenv("CORRAL_LLAMA_PREFILL_CHUNK", raising=False)
    assert shared_budget_max() == SHARED_BUDGET_MAX
    monkeypatch.setenv("CORRAL_LLAMA_PREFILL_CHUNK", "128")
    assert shared_budget_max() == 128
    monkeypatch.setenv("CORRAL_LLAMA_PREFILL_CHUNK", "lots")
    with pytest.raises(ValueError, match="CORRAL_LLAMA_PREFILL_CHUNK"):
        shared_budget_max()
    from worker.backends.llama_batch import SHARED_STEP_SECONDS, shared_step_seconds

    monkeypatch.delenv("CORRAL_LLAMA_STEP_SECONDS", raising=False)
    assert shared_step_seconds() == SHARED_STEP_SECONDS
    monkeypatch.setenv("CORRAL_LLAMA_STEP_SECONDS", "0.8")
    assert shared_step_seconds() == 0.8


def test_drafts_are_as_long_as_gives_the_most_tokens_per_second():
    """k draft rows each earn 1 + rate + ... + rate^k tokens per run in a step of
    runs x (1 + k) rows, timed as measured for that many rows, else linearly guessed."""
    pytest.importorskip("llama_cpp")
    from types import SimpleNamespace

    from worker.backends.llama_batch import BatchLoop

    def runs(rate: float, n: int) -> list:
        return [SimpleNamespace(lookup=SimpleNamespace(rate=rate)) for _ in range(n)]

    def loop(costs: dict[int, float]) -> BatchLoop:
        lp = object.__new__(BatchLoop)  # the sizing reads only these
        lp._step_cost, lp._token_cost, lp.n_batch, lp.lookup = costs, 0.005, 512, 8
        return lp

    rows = BatchLoop._draft_rows
    linear = loop({4: 0.025, 1: 0.010})  # only plain steps measured: a row guessed at 5 ms
    assert [rows(linear, runs(r, 4)) for r in (0.6, 0.9, 0.97)] == [0, 1, 3]
    assert [rows(linear, runs(r, 1)) for r in (0.4, 0.6, 0.9)] == [0, 1, 3]
    # A Xeon's measured steps: a second row costs as much as a plain step, more rows
    # little, so a sequence alone drafts long drafts or none; the linear guess says 1.
    xeon = loop({1: 0.0115, 2: 0.0245, 3: 0.0286, 5: 0.0297, 6: 0.034, 7: 0.036, 8: 0.04,
                 9: 0.042})
    assert [rows(xeon, runs(r, 1)) for r in (0.6, 0.8, 0.9)] == [0, 4, 8]
    assert rows(xeon, runs(0.6, 2)) == 2  # 2 runs of 3 rows: 6 rows, 1.4x a plain step
    unmeasured = loop({})
    assert rows(unmeasured, runs(0.1, 4)) == 512


def test_a_draft_shorter_than_planned_is_decoded_only_if_it_pays():
    """The loop plans k rows from the rate; a lookup may find fewer. On the EPYC's
    measured steps a second row costs more than a plain step, so one draft row never
    pays: such a draft is not decoded (and is watched instead)."""
    pytest.importorskip("llama_cpp")
    from types import SimpleNamespace

    from worker.backends.llama_batch import BatchLoop

    lp = object.__new__(BatchLoop)
    lp._step_cost = {1: 0.0076, 2: 0.0164, 3: 0.0205, 4: 0.0222, 5: 0.0297, 8: 0.0365,
                     9: 0.04}
    lp._token_cost, lp.n_batch, lp.lookup, lp.n_ctx_seq = 0.005, 512, 8, 2048
    lp.stats = {"lookup_drafted_tokens": 0}

    def run(tokens: list[int]) -> SimpleNamespace:
        lk = Lookup(rate=0.97)
        lk.extend(tokens)
        return SimpleNamespace(lookup=lk, slot=SimpleNamespace(tokens=tokens), generated=0,
                               seq=SimpleNamespace(max_tokens=64), draft=[])

    assert lp._draft_rows([run([1])]) == 8
    long = run([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3])
    assert lp._drafts([long]) == 8 and long.draft == [4, 5, 6, 7, 8, 9, 10, 1]
    short = run([1, 2, 3, 4, 1, 2, 3])  # only [4, 1, 2, 3] follows
    assert lp._drafts([short]) == 4 and short.draft == [4, 1, 2, 3]
    one = run([1, 4, 4, 4])  # the 2-gram [4, 4]: one token follows it
    assert lp._drafts([one]) == 0 and one.draft == []
    assert lp.stats["lookup_drafted_tokens"] == 12
