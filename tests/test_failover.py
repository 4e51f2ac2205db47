"""Never drop a conversation: a worker SIGKILLed mid-answer, the answer still arrives.

Sim workers check the mechanics (same id/created, no second role chunk, the token budget
kept, usage for the whole answer, the final worker named, an error event when nobody can
continue, non-streamed requests retried whole); two real llama.cpp workers check that a
greedy answer continued elsewhere equals the uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from types import SimpleNamespace

import httpx
import orjson
import pytest
from conftest import MODEL, all_ready
from procs import Gateway, Worker, metric, wait_for

HEADER = "x-corral-worker"
CHAT = [{"role": "user", "content": "Tell me a long story about a horse."}]
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed")


def sim(factory: Callable[..., Worker], rate: float = 40) -> Worker:
    """A sim worker, started but not waited for: `ready_gateway` waits for them together."""
    return factory("--sim-tokens-per-second", str(rate), "--parallel", "4", "--sim-ttft",
                   "0.01", backend="sim", wait=False)


def ready_gateway(gateway_factory: Callable[..., Gateway], *workers: Worker,
                  extra: tuple[str, ...] = ()) -> Gateway:
    """A gateway over `workers` once each serves (they may still be starting) and the
    gateway sees all of them ready."""
    all_ready(*workers)
    args = [*extra, *(a for w in workers for a in ("--worker", w.url))]
    g = gateway_factory(*args)
    wait_for(lambda: sum(w["state"] in ("ready", "busy") for w in
                         httpx.get(f"{g.url}/cluster", timeout=5).json()["workers"])
             == len(workers), 30, 0.05, "all workers ready")
    return g


class Stream:
    """A raw SSE stream read on a thread: events as they come, the serving worker, lines."""

    def __init__(self, url: str, path: str, body: dict, deadline: float = 120) -> None:
        self.url, self.path, self.body, self.deadline = url, path, body, deadline
        self.events: list[dict] = []
        self.comments: list[str] = []
        self.done = False
        self.worker = ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", self.url + self.path, json=self.body,
                              timeout=self.deadline) as r:
                assert r.status_code == 200, r.read()
                self.worker = r.headers[HEADER]
                for line in r.iter_lines():
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.events.append(orjson.loads(line[6:]))
        except BaseException as exc:  # reported by join()
            self.error = exc

    def content(self) -> list[str]:
        out = []
        for ev in self.events:
            for ch in ev.get("choices") or ():
                part = ch.get("delta", {}).get("content") if "delta" in ch else ch.get("text")
                if part:
                    out.append(part)
        return out

    def join(self) -> None:
        self.thread.join(self.deadline + 10)
        assert not self.thread.is_alive(), "the stream hung"
        if self.error is not None:
            raise self.error


def kill_serving(stream: Stream, workers: list[Worker], after: int) -> Worker:
    """SIGKILLs the worker serving `stream` once `after` content events arrived."""
    wait_for(lambda: len(stream.content()) >= after or stream.error is not None, 60, 0.01,
             f"{after} content events")
    assert stream.error is None, stream.error
    victim = next(w for w in workers if w.id == stream.worker)
    victim.proc.kill()
    return victim


# --------------------------------------------------------------------------- sim workers


@pytest.mark.timeout(120)
def test_chat_stream_continues_on_another_worker(worker_factory, gateway_factory) -> None:
    ws = [sim(worker_factory), sim(worker_factory)]
    g = ready_gateway(gateway_factory, *ws)
    before = metric(g.url, "corral_retries_total", reason="midstream")
    s = Stream(g.url, "/v1/chat/completions",
               {"model": MODEL, "messages": CHAT, "max_tokens": 80, "stream": True,
                "stream_options": {"include_usage": True}})
    victim = kill_serving(s, ws, 10)
    s.join()
    survivor = next(w for w in ws if w is not victim)
    assert s.done, s.events[-3:]
    assert not [e for e in s.events if "error" in e], s.events[-3:]
    assert len({e["id"] for e in s.events}) == 1
    assert len({e["created"] for e in s.events}) == 1
    assert {e["model"] for e in s.events} == {MODEL}
    roles = [e for e in s.events if e["choices"] and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 1 and s.events[0] is roles[0]
    # The token budget holds across the failover: 80 in all, then "length".
    assert len(s.content()) == 80
    finishes = [c["finish_reason"] for e in s.events for c in e["choices"]
                if c["finish_reason"]]
    assert finishes == ["length"]
    usage = s.events[-1]["usage"]
    assert usage["completion_tokens"] == 80 and s.events[-1]["choices"] == []
    assert usage["total_tokens"] == usage["prompt_tokens"] + 80
    assert s.comments == [f": {HEADER}={survivor.id}"]
    assert metric(g.url, "corral_retries_total", reason="midstream") == before + 1


@pytest.mark.timeout(120)
def test_completion_stream_continues_and_usage_stays_hidden(worker_factory,
                                                            gateway_factory) -> None:
    ws = [sim(worker_factory), sim(worker_factory)]
    g = ready_gateway(gateway_factory, *ws)
    s = Stream(g.url, "/v1/completions",
               {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 60,
                "stream": True})
    kill_serving(s, ws, 5)
    s.join()
    assert s.done and not [e for e in s.events if "error" in e]
    assert len({(e["id"], e["created"]) for e in s.events}) == 1
    assert len(s.content()) == 60
    assert all("usage" not in e for e in s.events)  # the client did not ask for it


@pytest.mark.timeout(120)
def test_no_worker_left_ends_with_an_error_event(worker_factory, gateway_factory) -> None:
    w = sim(worker_factory)
    g = ready_gateway(gateway_factory, w)
    s = Stream(g.url, "/v1/chat/completions",
               {"model": MODEL, "messages": CHAT, "max_tokens": 200, "stream": True})
    kill_serving(s, [w], 5)
    s.join()
    assert not s.done
    err = s.events[-1]["error"]
    assert err["type"] == "server_error" and err["code"] == "worker_failed"
    assert set(err) == {"message", "type", "param", "code"}


def fail_non_streamed(g: Gateway, ws: list[Worker], fault: Callable[[Worker], None]
                      ) -> tuple[httpx.Response, Worker]:
    """Sends a non-streamed request, applies `fault` to the worker serving it, and returns
    the response the client got and that worker."""
    out: dict = {}

    def call() -> None:
        out["r"] = httpx.post(f"{g.url}/v1/chat/completions", timeout=60,
                              json={"model": MODEL, "messages": CHAT, "max_tokens": 60})

    t = threading.Thread(target=call, daemon=True)
    t.start()

    def serving() -> Worker | None:
        for w in ws:
            if httpx.get(f"{w.url}/status", timeout=2).json()["slots_busy"]:
                return w
        return None

    wait_for(lambda: serving() is not None, 30, 0.01, "a worker to take the request")
    victim = serving()
    assert victim is not None
    try:
        fault(victim)
        t.join(60)
    finally:
        victim.proc.thaw()
    assert not t.is_alive()
    return out["r"], victim


@pytest.mark.timeout(120)
def test_non_streamed_request_fails_over_whole(worker_factory, gateway_factory) -> None:
    ws = [sim(worker_factory), sim(worker_factory)]
    g = ready_gateway(gateway_factory, *ws)
    r, victim = fail_non_streamed(g, ws, lambda w: w.proc.kill())
    assert r.status_code == 200, r.text
    assert r.headers[HEADER] != victim.id
    assert r.json()["usage"]["completion_tokens"] == 60


# --------------------------------------------------------------------------- frozen workers
# A SIGSTOPped worker keeps its sockets open: nothing breaks, it just goes silent. The
# gateway must notice through its probes (stall_timeout) and move the requests, long before
# the read timeout.


def stall_gateway(gateway_factory: Callable[..., Gateway], tmp_path, *workers: Worker
                  ) -> Gateway:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[gateway]\nprobe_interval = 0.2\nprobe_timeout = 0.5\n"
                   "stall_timeout = 2.0\n")
    return ready_gateway(gateway_factory, *workers, extra=("--config", str(cfg)))


@pytest.mark.timeout(120)
def test_frozen_worker_mid_stream_is_left_for_another(worker_factory, gateway_factory,
                                                       tmp_path) -> None:
    ws = [sim(worker_factory), sim(worker_factory)]
    g = stall_gateway(gateway_factory, tmp_path, *ws)
    before = metric(g.url, "corral_upstream_errors_total", kind="stall")
    s = Stream(g.url, "/v1/chat/completions",
               {"model": MODEL, "messages": CHAT, "max_tokens": 80, "stream": True},
               deadline=60)  # far below the 300 s read timeout
    wait_for(lambda: len(s.content()) >= 10 or s.error is not None, 60, 0.01, "10 tokens")
    victim = next(w for w in ws if w.id == s.worker)
    victim.proc.freeze()
    try:
        s.join()
    finally:
        victim.proc.thaw()
    assert s.done and not [e for e in s.events if "error" in e], s.events[-3:]
    assert len(s.content()) == 80
    survivor = next(w for w in ws if w is not victim)
    assert s.comments == [f": {HEADER}={survivor.id}"]
    assert metric(g.url, "corral_upstream_errors_total", kind="stall") == before + 1


@pytest.mark.timeout(120)
def test_frozen_worker_non_streamed_request_is_retried(worker_factory, gateway_factory,
                                                        tmp_path) -> None:
    ws = [sim(worker_factory), sim(worker_factory)]
    g = stall_gateway(gateway_factory, tmp_path, *ws)
    r, victim = fail_non_streamed(g, ws, lambda w: w.proc.freeze())
    assert r.status_code == 200, r.text
    assert r.headers[HEADER] != victim.id
    assert r.json()["usage"]["completion_tokens"] == 60
    assert metric(g.url, "corral_retries_total", reason="stall") == 1


# --------------------------------------------------------------------------- real model


@needs_llama
@pytest.mark.timeout(400)
def test_greedy_answer_continued_elsewhere_equals_the_uninterrupted_one(
        worker_factory, gateway_factory) -> None:
    ws = [worker_factory("--parallel", "1", "--threads", "1", "--ctx-size", "2048", wait=False)
          for _ in range(2)]  # started together; ready_gateway waits until each serves
    g = ready_gateway(gateway_factory, *ws)
    msgs = [{"role": "system", "content": "You are a storyteller."},
            {"role": "user", "content": "Write a long story about a brave horse named Star."}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 160, "temperature": 0,
            "seed": 1}
    ref = httpx.post(f"{ws[0].url}/v1/chat/completions", json=body, timeout=300).json()
    want = ref["choices"][0]["message"]["content"]
    assert ref["usage"]["completion_tokens"] > 40, "the reference answer is too short"

    s = Stream(g.url, "/v1/chat/completions", {**body, "stream": True,
                                                "stream_options": {"include_usage": True}},
               deadline=300)
    kill_serving(s, ws, 20)
    s.join()
    assert s.done and not [e for e in s.events if "error" in e]
    assert "".join(s.content()) == want
    assert len({e["id"] for e in s.events}) == 1
    assert s.events[-1]["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
    assert metric(g.url, "corral_retries_total", reason="midstream") == 1


# --------------------------------------------------------------------------- in process


def _relay(path: str, body: dict, client_usage: bool = False):
    from gateway.upstream import Call, Relay

    call = Call(MODEL, path, orjson.dumps(body), True, client_usage)
    return Relay(None, call, None, None, None, b"")  # type: ignore[arg-type]


def _ev(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chat_chunk(delta: dict, finish: str | None = None, cid: str = "chatcmpl-a",
                created: int = 1) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}]}


def test_continuation_request_for_chat() -> None:
    r = _relay("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 10,
                                        "stream": True})
    r.pieces = [_ev(_chat_chunk({"role": "assistant", "content": ""}))
                + _ev(_chat_chunk({"content": "Once"})),
                _ev(_chat_chunk({"content": " upon"})) + _ev(_chat_chunk({"content": " a"}))]
    assert r._take_stock() is None  # not finished: continue elsewhere
    assert (r.text, r.sent_tokens) == ("Once upon a", 3)
    assert r.head == b'{"id":"chatcmpl-a","object":"chat.completion.chunk","created":1,'
    body = orjson.loads(r._continuation_body())
    assert body["messages"] == [*CHAT, {"role": "assistant", "content": "Once upon a"}]
    assert body["continue_final_message"] is True and body["max_tokens"] == 7

    # A client that continues a message itself: the text extends its final message, and
    # max_completion_tokens is what gets reduced.
    own = [*CHAT, {"role": "assistant", "content": "Hi"}]
    r = _relay("/v1/chat/completions", {"model": MODEL, "messages": own, "stream": True,
                                        "continue_final_message": True,
                                        "max_completion_tokens": 3})
    r.pieces = [_ev(_chat_chunk({"content": " there"}))]
    assert r._take_stock() is None
    body = orjson.loads(r._continuation_body())
    assert body["messages"][-1] == {"role": "assistant", "content": "Hi there"}
    assert body["max_completion_tokens"] == 2 and len(body["messages"]) == 2
    # Every token sent already: nothing to continue (the stream ends with "length").
    r.sent_tokens = 3
    assert r._continuation_body() is None
    end = r._length_ending()
    assert b'"finish_reason":"length"' in end and end.endswith(b"data: [DONE]\n\n")


def test_continuation_request_for_completions_with_echo() -> None:
    r = _relay("/v1/completions", {"model": MODEL, "prompt": "Say", "echo": True,
                                   "stream": True})
    chunk = {"id": "cmpl-a", "object": "text_completion", "created": 1, "model": MODEL}
    r.pieces = [_ev({**chunk, "choices": [{"index": 0, "text": t, "finish_reason": None}]})
                for t in ("Say", " one", " two")]
    assert r._take_stock() is None
    body = orjson.loads(r._continuation_body())
    # The echoed prompt is not generated text: 16 (the default) - 2 tokens left.
    assert body["prompt"] == "Say one two" and body["echo"] is False
    assert body["max_tokens"] == 14


def test_a_finished_answer_only_misses_its_tail() -> None:
    r = _relay("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stream": True},
               client_usage=True)
    r.prompt_tokens = 5
    counted: list[str] = []
    counter = SimpleNamespace(labels=lambda kind: SimpleNamespace(
        inc=lambda: counted.append(kind)))
    r.up = SimpleNamespace(metrics=SimpleNamespace(upstream_errors=counter))
    r.pieces = [_ev(_chat_chunk({"content": "Done"})), _ev(_chat_chunk({}, "stop"))]
    tail = r._take_stock()
    assert counted == ["midstream_tail"]
    assert tail is not None and tail.endswith(b"data: [DONE]\n\n")
    usage = orjson.loads(tail.split(b"\n\n")[0][6:])
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    assert usage["id"] == "chatcmpl-a" and usage["choices"] == []


def test_continuation_chunks_get_the_original_head_and_lose_their_role_chunk() -> None:
    r = _relay("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stream": True})
    r.head = b'{"id":"chatcmpl-a","object":"chat.completion.chunk","created":1,'
    r.failovers, r.skip_role = 1, True
    first = (_ev(_chat_chunk({"role": "assistant", "content": ""}, cid="chatcmpl-b",
                             created=2))
             + _ev(_chat_chunk({"content": "x"}, cid="chatcmpl-b", created=2)))
    out = r._rewritten(first)
    assert out == _ev(_chat_chunk({"content": "x"}))
    nxt = _ev(_chat_chunk({"content": "y"}, cid="chatcmpl-b", created=2))
    assert r._rewritten(nxt) == _ev(_chat_chunk({"content": "y"}))
