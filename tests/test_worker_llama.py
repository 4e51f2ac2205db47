"""The llama.cpp backend, end to end: real worker processes on the bundled model, driven
by the official OpenAI SDK (and raw httpx where the SDK cannot misbehave on purpose)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, client_for
from procs import Worker, start_worker, wait_for

pytest.importorskip("llama_cpp")

SYSTEM = "You are a concise assistant."
# SmolLM2's chat template (from the GGUF), rendered by hand for one system + user turn.
CHATML = "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n" \
         "<|im_start|>assistant\n"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy continues counting: never stops early


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


@pytest.fixture(scope="module")
def client(llama_worker: Worker) -> openai.OpenAI:
    return client_for(llama_worker.url)


@pytest.fixture(scope="module")
def wide_worker() -> Iterator[Worker]:
    """Four slots and a small context, for batching and exact-fit tests."""
    w = start_worker("--parallel", "4", "--threads", "2", "--ctx-size", "256")
    yield w
    w.proc.stop()


@pytest.fixture(scope="module")
def tokenizer():
    """The model's own tokenizer, in this process, to check the worker's counts."""
    import llama_cpp

    from worker.models import resolve

    llm = llama_cpp.Llama(str(resolve(MODEL)[1]), vocab_only=True, verbose=False)
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=True)


def status(w: Worker) -> dict:
    return httpx.get(f"{w.url}/status", timeout=5).json()


def greedy(client: openai.OpenAI, user: str, max_tokens: int = 16, **kw) -> tuple[str, str]:
    r = client.chat.completions.create(model=MODEL, messages=chat(user), temperature=0,
                                       max_tokens=max_tokens, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def stream_chat(client: openai.OpenAI, messages: list[dict], **kw) -> tuple[list[str], str, object]:
    deltas, finish, use = [], None, None
    for ch in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                             stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            use = ch.usage
        for c in ch.choices:
            if c.delta.content:
                deltas.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    return deltas, finish, use


# --------------------------------------------------------------------------- basics


def test_chat_usage_matches_tokenization(client, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=chat("Say hello."),
                                       temperature=0, max_tokens=6)
    expected = len(tokenizer(CHATML.format(sys=SYSTEM, user="Say hello.")))
    assert r.object == "chat.completion"
    assert r.usage.prompt_tokens == expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_length_counts_exactly_max_tokens(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=COUNTING, temperature=0, max_tokens=7)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == len(tokenizer(COUNTING))
    assert r.choices[0].text.strip().startswith("9")

    deltas, finish, use = stream_chat(client, chat("Write a long story about a horse."),
                                      temperature=0, max_tokens=9)
    assert finish == "length"
    assert use.completion_tokens == 9
    assert "".join(deltas)


def test_completions_stream_equals_non_stream(client):
    full = client.completions.create(model=MODEL, prompt=COUNTING, temperature=0,
                                     max_tokens=12).choices[0].text
    parts, finishes, usage = [], [], None
    for ch in client.completions.create(model=MODEL, prompt=COUNTING, temperature=0,
                                        max_tokens=12, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.text)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert "".join(parts) == full
    assert finishes == ["length"]
    assert usage is not None and usage.completion_tokens == 12


def test_chat_stream_equals_non_stream_and_is_valid_text(client):
    messages = chat("Translate 'good morning, friend' into Japanese and French.")
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=40).choices[0].message.content
    deltas, finish, use = stream_chat(client, messages, temperature=0, max_tokens=40)
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas)  # no half characters, streamed or not
    assert finish in ("stop", "length")
    assert use.completion_tokens <= 40


# --------------------------------------------------------------------------- stop strings


def test_stop_string_and_list(client):
    full, _ = greedy(client, "List five fruits, one per line.", max_tokens=30)
    words = [w for w in full.split() if len(w) >= 4]
    assert len(words) >= 2, full
    stop = words[1]
    cut = full.index(stop)

    text, finish = greedy(client, "List five fruits, one per line.", max_tokens=30, stop=stop)
    assert finish == "stop"
    assert stop not in text
    assert text == full[:cut]

    text2, finish2 = greedy(client, "List five fruits, one per line.", max_tokens=30,
                            stop=["qqzzy never", stop])
    assert (text2, finish2) == (text, "stop")

    deltas, finish3, _ = stream_chat(client, chat("List five fruits, one per line."),
                                     temperature=0, max_tokens=30, stop=[stop])
    assert finish3 == "stop"
    assert "".join(deltas) == full[:cut]


# --------------------------------------------------------------------------- determinism


def test_greedy_is_deterministic(client):
    a = greedy(client, "Describe the sea in one sentence.", max_tokens=20)
    b = greedy(client, "Describe the sea in one sentence.", max_tokens=20)
    assert a == b


def test_greedy_alone_equals_greedy_in_a_batch(wide_worker):
    client = client_for(wide_worker.url)
    prompts = ["Tell me about cats.", "What is 2+2?", "Write a haiku about rain.",
               "Name three colors and a number."]
    alone = [greedy(client, p, max_tokens=24)[0] for p in prompts]
    batched: list[str | None] = [None] * len(prompts)
    peak = [0]
    stop_polling = threading.Event()

    def poll() -> None:
        while not stop_polling.is_set():
            peak[0] = max(peak[0], status(wide_worker)["slots_busy"])

    def run(i: int) -> None:
        batched[i] = greedy(client, prompts[i], max_tokens=24)[0]

    poller = threading.Thread(target=poll)
    poller.start()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop_polling.set()
    poller.join(10)
    assert batched == alone
    assert peak[0] >= 2  # they really shared the decode loop


def test_seed_reproducible(client):
    kw = dict(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234)
    a = client.chat.completions.create(model=MODEL, messages=chat("Invent a name."), **kw)
    b = client.chat.completions.create(model=MODEL, messages=chat("Invent a name."), **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    texts = {
        client.completions.create(model=MODEL, prompt="Once upon a time", temperature=1.0,
                                  max_tokens=16, seed=s).choices[0].text
        for s in (1, 2, 3, 4)
    }
    assert len(texts) > 1  # the seed does steer sampling


def test_penalties_accepted(client):
    r = client.completions.create(model=MODEL, prompt=COUNTING, temperature=0, max_tokens=12,
                                  frequency_penalty=1.5, presence_penalty=1.0)
    plain = client.completions.create(model=MODEL, prompt=COUNTING, temperature=0,
                                      max_tokens=12)
    assert r.usage.completion_tokens >= 1
    assert r.choices[0].text != plain.choices[0].text  # penalised digits: another path


# --------------------------------------------------------------------------- bad requests


def test_bad_requests(client, llama_worker):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=chat("hi"), n=2, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2,
                                       extra_body={"temperature": "hot"})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"max_tokens": "x"})
    # Unknown fields are ignored, as the OpenAI API does.
    ok = client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2,
                                        extra_body={"frobnicate": {"x": 1}})
    assert ok.choices[0].message.content is not None

    r = httpx.post(f"{llama_worker.url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"


def test_prompt_beyond_context(client, llama_worker):
    n_ctx = status(llama_worker)["n_ctx"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * (n_ctx + 10), max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=n_ctx)
    assert e.value.code == "context_length_exceeded"


def test_exact_fit_prompt(wide_worker, tokenizer):
    client = client_for(wide_worker.url)
    n_ctx = status(wide_worker)["n_ctx"]
    assert n_ctx == 256
    unit = " hello"
    assert len(tokenizer(unit * 10)) == 10
    prompt = unit * (n_ctx - 1)  # leaves room for exactly one completion token
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == n_ctx - 1
    assert r.usage.completion_tokens == 1
    assert r.choices[0].finish_reason == "length"
    # Without max_tokens the budget is the rest of the context: still one token.
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=None, temperature=0)
    assert r.usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=unit * n_ctx, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    assert status(wide_worker)["state"] == "ready"


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=chat("hi"), max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)


# --------------------------------------------------------------------------- slots and queue


def test_client_disconnect_frees_slot(llama_worker):
    body = {"model": MODEL, "prompt": COUNTING, "temperature": 0, "max_tokens": 1500,
            "stream": True}
    url = f"{llama_worker.url}/v1/completions"
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # one iterator: breaking out of a for loop would close it
        got = 0
        for _ in range(50):  # bounded; three events come long before 50 lines
            if next(lines).startswith("data: {"):
                got += 1
            if got >= 3:
                break
        assert got >= 3
        assert status(llama_worker)["slots_busy"] == 1  # still generating for us
        # Leaving the block closes the connection mid-stream.
    t0 = time.monotonic()
    wait_for(lambda: status(llama_worker)["slots_busy"] == 0, timeout=5,
             what="the slot to be freed after the disconnect")
    # 1500 tokens take far longer than this at this model's speed: it was the disconnect.
    assert time.monotonic() - t0 < 5


def test_queue_depth_rises_beyond_slots(llama_worker):
    client = client_for(llama_worker.url)
    slots = status(llama_worker)["slots_total"]
    n = slots + 3
    results: list[str | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            r = client.completions.create(model=MODEL, prompt=COUNTING, temperature=0,
                                          max_tokens=24)
            results[i] = r.choices[0].finish_reason
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    seen = {"queue": 0, "busy": 0}

    def queued() -> bool:
        s = status(llama_worker)
        seen["queue"] = max(seen["queue"], s["queue_depth"])
        seen["busy"] = max(seen["busy"], s["slots_busy"])
        return seen["queue"] >= 1

    wait_for(queued, timeout=30, interval=0.02, what="queue_depth to rise")
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == ["length"] * n
    assert seen["busy"] == slots
    wait_for(lambda: status(llama_worker)["queue_depth"] == 0
             and status(llama_worker)["slots_busy"] == 0, timeout=10, what="an idle worker")


def test_long_prefill_does_not_stall_decoding(llama_worker):
    """A long prompt is prefilled in chunks, so a running stream keeps getting tokens."""
    url = f"{llama_worker.url}/v1/completions"
    ticks: list[float] = []
    long_sent: list[float] = []
    long_first: list[float] = []
    stop = threading.Event()

    def runner() -> None:
        body = {"model": MODEL, "prompt": COUNTING, "temperature": 0, "max_tokens": 600,
                "stream": True}
        with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as r:
            lines = r.iter_lines()
            for _ in range(1300):  # bounded by max_tokens
                line = next(lines, None)
                if line is None or stop.is_set():
                    return
                if line.startswith("data: {"):
                    ticks.append(time.monotonic())

    t = threading.Thread(target=runner)
    t.start()
    try:
        wait_for(lambda: len(ticks) >= 2, timeout=60, what="the running stream")
        prompt = " ".join(f"Line {i}: the herd crossed the river." for i in range(90))
        body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 1,
                "stream": True}
        long_sent.append(time.monotonic())
        with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                    long_first.append(time.monotonic())
                    break
        assert long_first
        window = long_first[0] - long_sent[0]
        during = [long_sent[0], *(x for x in ticks if long_sent[0] < x < long_first[0])]
        gap = max(b - a for a, b in zip(during, during[1:], strict=False)) if len(during) > 1 \
            else window
        # ~1000 prompt tokens go in several chunks, with a token for the stream in each
        # step: no single pause of the stream comes near the whole prefill.
        assert len(during) >= 4 and gap < 0.4 * window, (len(during), gap, window)
    finally:
        stop.set()
        t.join(120)


# --------------------------------------------------------------------------- prompt cache


def test_prompt_cache_reused_on_second_turn(client, llama_worker):
    before = status(llama_worker)["prompt_cache"]
    turn1 = [{"role": "system", "content": "You are a pirate. Answer in pirate speak."},
             {"role": "user", "content": "Where is the treasure buried, captain?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, temperature=0,
                                        max_tokens=16)
    turn2 = [*turn1, {"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And who guards it?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, temperature=0,
                                        max_tokens=8)
    after = status(llama_worker)["prompt_cache"]
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens  # the whole first turn came from the KV cache
    assert cached < r2.usage.prompt_tokens
    assert after["prompt_cache_hits"] >= before["prompt_cache_hits"] + 1
    reused = after["prompt_cache_reused_tokens"] - before["prompt_cache_reused_tokens"]
    assert reused >= cached


# --------------------------------------------------------------------------- continuation


def test_continue_final_message_matches_uninterrupted(client):
    messages = chat("Explain why the sky is blue in two sentences.")
    deltas, _, _ = stream_chat(client, messages, temperature=0, max_tokens=32)
    full = "".join(deltas)
    assert len(deltas) >= 10
    # Cut where the gateway would: after a delta, at a word boundary mid-answer.
    k = next(i for i in range(len(deltas) // 2, len(deltas)) if deltas[i].startswith(" "))
    prefix = "".join(deltas[:k])
    r = client.chat.completions.create(
        model=MODEL, messages=[*messages, {"role": "assistant", "content": prefix}],
        temperature=0, max_tokens=32, extra_body={"continue_final_message": True},
    )
    continued = prefix + r.choices[0].message.content
    assert continued[: len(full)] == full
    with pytest.raises(openai.BadRequestError):  # nothing to continue
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                       extra_body={"continue_final_message": True})


def test_status_reports_the_llama_backend(llama_worker):
    s = status(llama_worker)
    assert s["backend"] == "llama"
    assert s["models"] == [MODEL]
    assert s["n_ctx"] == 2048
    assert s["tokens_per_second"] > 0
    assert s["hardware"]["device"] == "CPU"
    assert {"prompt_cache_hits", "prompt_cache_reused_tokens"} <= set(s["prompt_cache"])


def test_detokenizer_holds_back_split_characters():
    from worker.backends.llama_sampling import Detokenizer

    d = Detokenizer()
    data = "né 🐎!".encode()
    out = [d.push(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) == "né 🐎!"
    assert all("\ufffd" not in o for o in out)
    assert out[1] == ""  # the first byte of "é" waits for the second
    assert d.take() == len(data)
