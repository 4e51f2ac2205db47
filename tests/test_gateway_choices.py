"""logprobs and n > 1 through a real gateway: capability routing and mid-stream failover.

Real llama.cpp / OpenVINO workers on the bundled model. A logprobs stream whose worker is
SIGKILLed mid-answer is continued elsewhere (greedy: the same text, logprobs for every
token); an n > 1 stream cut the same way ends with an OpenAI-shaped error event, every
event before it carrying a valid index.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import MODEL, client_for
from procs import Worker
from test_failover import HEADER, Stream, kill_serving, needs_llama, ready_gateway

MSGS = [{"role": "system", "content": "You are a storyteller."},
        {"role": "user", "content": "Write a long story about a brave horse named Star."}]


@needs_llama
@pytest.mark.timeout(400)
def test_routing_prefers_a_worker_that_honours_the_request(
        llama_worker: Worker, openvino_api_worker: Worker, gateway_factory) -> None:
    # The session's workers, only asked here (no new loads): llama with 2 slots (it honours
    # top_logprobs), OpenVINO with 4 (it takes n=4); the openvino fixture skips without it.
    llama, ov = llama_worker, openvino_api_worker
    g = ready_gateway(gateway_factory, llama, ov)
    c = client_for(g.url, timeout=120)
    base = dict(model=MODEL, messages=MSGS, max_tokens=2)
    for _ in range(4):  # top_logprobs > 1: only llama honours it (openvino reports 0)
        r = c.chat.completions.with_raw_response.create(**base, logprobs=True, top_logprobs=3)
        assert r.headers[HEADER] == llama.id
        assert len(r.parse().choices[0].logprobs.content[0].top_logprobs) == 3
    for _ in range(4):  # n=4: only the openvino worker has four slots
        r = c.chat.completions.with_raw_response.create(**base, n=4)
        assert r.headers[HEADER] == ov.id
        assert [ch.index for ch in r.parse().choices] == [0, 1, 2, 3]
    # Nobody honours both: the request goes to one anyway, whose 400 names the limit.
    r = httpx.post(f"{g.url}/v1/chat/completions", timeout=60,
                   json={**base, "n": 4, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("n", "top_logprobs")


def _chat(events: list[dict]) -> tuple[dict[int, str], dict[int, list], dict[int, str]]:
    text: dict[int, str] = {}
    lps: dict[int, list] = {}
    finish: dict[int, str] = {}
    for ev in events:
        for ch in ev.get("choices") or ():
            i = ch["index"]
            text[i] = text.get(i, "") + (ch["delta"].get("content") or "")
            lps.setdefault(i, []).extend((ch.get("logprobs") or {}).get("content") or [])
            if ch.get("finish_reason"):
                finish[i] = ch["finish_reason"]
    return text, lps, finish


@needs_llama
@pytest.mark.timeout(400)
def test_midstream_failover_of_logprobs_and_n_streams(worker_factory, gateway_factory):
    # Started together; ready_gateway waits until each serves.
    ws = [worker_factory("--parallel", "3", "--threads", "1", wait=False) for _ in range(3)]
    g = ready_gateway(gateway_factory, *ws)

    # n=3: the serving worker dies mid-answer -> an OpenAI-shaped error event, no cut.
    s = Stream(g.url, "/v1/chat/completions",
               {"model": MODEL, "messages": MSGS, "max_tokens": 300, "temperature": 0.8,
                "seed": 3, "n": 3, "stream": True}, deadline=300)
    victim = kill_serving(s, ws, 12)
    s.join()
    assert not s.done
    assert "error" in s.events[-1], s.events[-3:]
    assert s.events[-1]["error"]["code"] == "worker_failed"
    body = [e for e in s.events[:-1]]
    assert body and all("error" not in e for e in body)
    assert {ch["index"] for e in body for ch in e["choices"]} <= {0, 1, 2}
    text, _, finish = _chat(body)
    assert len(text) == 3 and len(finish) < 3  # cut before the answer was complete

    # A greedy logprobs stream continued on the other worker: same text as uninterrupted,
    # one logprob entry per token, every entry's token in the text.
    survivor, spare = (w for w in ws if w is not victim)
    ask = {"model": MODEL, "messages": MSGS, "max_tokens": 120, "temperature": 0,
           "logprobs": True, "top_logprobs": 2}
    ref = httpx.post(f"{survivor.url}/v1/chat/completions", json=ask, timeout=300).json()
    want = ref["choices"][0]["message"]["content"]
    assert ref["usage"]["completion_tokens"] > 40, "the reference answer is too short"
    s = Stream(g.url, "/v1/chat/completions",
               {**ask, "stream": True, "stream_options": {"include_usage": True}},
               deadline=300)
    kill_serving(s, [survivor, spare], 15)
    s.join()
    assert s.done and not [e for e in s.events if "error" in e], s.events[-3:]
    assert any(c.startswith(": x-corral-worker=") for c in s.comments)  # it failed over
    text, lps, finish = _chat(s.events)
    assert list(text) == [0] and text[0] == want
    assert "".join(e["token"] for e in lps[0]) == want
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in lps[0])
    use = next(e["usage"] for e in s.events if e.get("usage"))
    assert use["completion_tokens"] == ref["usage"]["completion_tokens"] == len(lps[0])
