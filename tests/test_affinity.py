"""Session affinity: the turns of a conversation go back to the worker holding its cache,
unless that worker is much busier than the rest; the map is shared through Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from conftest import MODEL, all_ready
from procs import Gateway, Worker, wait_for

from gateway.affinity import session_key
from gateway.config import GatewayConfig
from gateway.registry import Registry
from gateway.routing import Router
from gateway.state import MemoryState
from gateway.worker_record import Worker as RegWorker

HEADER = "x-corral-worker"
SYSTEM = {"role": "system", "content": "You are terse."}


def sims(factory: Callable[..., Worker], n: int) -> list[Worker]:
    """`n` sim workers, started together and then waited for."""
    return all_ready(*(factory("--sim-tokens-per-second", "200", "--parallel", "4",
                               "--sim-ttft", "0", backend="sim", wait=False)
                       for _ in range(n)))


def ready(gateway_factory: Callable[..., Gateway], ws: list[Worker], *extra: str) -> Gateway:
    g = gateway_factory(*extra, *[a for w in ws for a in ("--worker", w.url)])
    wait_for(lambda: sum(w["state"] == "ready" for w in
                         httpx.get(f"{g.url}/cluster", timeout=5).json()["workers"])
             == len(ws), 30, 0.05, "all workers ready")
    return g


def turn(g: Gateway, msgs: list[dict], **headers: str) -> str:
    r = httpx.post(f"{g.url}/v1/chat/completions", headers=headers, timeout=30,
                   json={"model": MODEL, "messages": msgs, "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.headers[HEADER]


def conversation(g: Gateway, opening: str, turns: int) -> list[str]:
    """Worker ids serving each turn of one growing chat."""
    msgs = [SYSTEM, {"role": "user", "content": opening}]
    served = []
    for i in range(turns):
        served.append(turn(g, msgs))
        msgs = [*msgs, {"role": "assistant", "content": f"answer {i}"},
                {"role": "user", "content": f"and then {i}?"}]
    return served


def test_turns_of_a_conversation_stay_on_one_worker(worker_factory, gateway_factory) -> None:
    g = ready(gateway_factory, sims(worker_factory, 3))
    for k in range(4):
        assert len(set(conversation(g, f"conversation {k}", 6))) == 1
    # An explicit session id outweighs the messages: different chats, one worker.
    first = turn(g, [{"role": "user", "content": "a"}], **{"x-session-id": "s1"})
    for i in range(5):
        assert turn(g, [{"role": "user", "content": f"b{i}"}], **{"x-session-id": "s1"}) == first


def test_identical_one_shot_requests_still_spread(worker_factory, gateway_factory) -> None:
    g = ready(gateway_factory, sims(worker_factory, 3))
    # No assistant turn, no session id: nothing to go back to. 12 on one worker of 3 by
    # chance has a probability of 3**-11.
    assert len({turn(g, [SYSTEM, {"role": "user", "content": "same"}])
                for _ in range(12)}) > 1


def test_affinity_off_spreads_turns(worker_factory, gateway_factory, tmp_path: Path) -> None:
    cfg = tmp_path / "corral.toml"
    cfg.write_text("[gateway]\naffinity = false\n")
    g = ready(gateway_factory, sims(worker_factory, 3), "--config", str(cfg))
    # Idle workers tie, and ties break at random: 12 turns on one of 3 workers by chance
    # has a probability of 3**-11.
    assert len(set(conversation(g, "hello", 12))) > 1


def test_load_guard_leaves_a_much_busier_preferred_worker(worker_factory, gateway_factory) -> None:
    g = ready(gateway_factory, sims(worker_factory, 3))  # affinity_slack = 2 by default
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}],
            "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=30) as http, contextlib.ExitStack() as streams:
        served = []
        for _ in range(4):
            r = streams.enter_context(http.stream("POST", f"{g.url}/v1/chat/completions",
                                                  json=body, headers={"x-session-id": "busy"}))
            assert r.status_code == 200
            served.append(r.headers[HEADER])
        # Loads 0,1,2 are within the slack of the idle others; at 3 the guard moves on.
        assert served[0] == served[1] == served[2] != served[3], served


def test_affinity_is_shared_by_replicas_through_redis(worker_factory, gateway_factory,
                                                      redis_url) -> None:
    ws = sims(worker_factory, 3)
    a = ready(gateway_factory, ws, "--redis-url", redis_url)
    b = ready(gateway_factory, ws, "--redis-url", redis_url)
    r = redis.Redis.from_url(redis_url)
    try:
        for k in range(4):
            msgs = [SYSTEM, {"role": "user", "content": f"shared {k}"}]
            key = "corral:affinity:" + session_key(MODEL, None, {"messages": msgs})[0]
            first = turn(a, msgs)
            # Replica a writes through in the background: wait until Redis has it.
            wait_for(lambda k=key: r.get(k) is not None, 10, 0.02, "the write-through")
            assert r.get(key).decode() == first
            # The conversation's next turns, at replica b, go to the same worker.
            later = [*msgs, {"role": "assistant", "content": "ok"},
                     {"role": "user", "content": "more"}]
            assert {turn(b, later) for _ in range(3)} == {first}
    finally:
        r.close()


# --------------------------------------------------------------------------- in process


def test_session_key_names_a_conversation() -> None:
    sys_msg = {"role": "system", "content": "s"}
    t1 = {"messages": [sys_msg, {"role": "user", "content": "q1"}]}
    t2 = {"messages": [*t1["messages"], {"role": "assistant", "content": "a1"},
                       {"role": "user", "content": "q2"}]}
    other = {"messages": [sys_msg, {"role": "user", "content": "another"}]}
    k1, k2 = session_key("m", None, t1), session_key("m", None, t2)
    # One key for every turn; only a later turn (an assistant message exists) prefers it.
    assert k1 is not None and k2 is not None and k1[0] == k2[0]
    assert (k1[1], k2[1]) == (False, True)
    assert session_key("m", None, other)[0] != k1[0]
    assert session_key("m2", None, t1)[0] != k1[0]  # per model
    # Without a system prompt the first user message names it; header and user win.
    assert session_key("m", None, {"messages": t2["messages"][1:]})[0] == session_key(
        "m", None, {"messages": t1["messages"][1:]})[0]
    assert session_key("m", "abc", t1) == session_key("m", "abc", other)
    assert session_key("m", "abc", t1)[1] is True
    assert session_key("m", None, {**t1, "user": "u"}) == session_key("m", None,
                                                                      {**other, "user": "u"})
    # Legacy completions follow only an explicit id.
    assert session_key("m", None, {"prompt": "x"}) is None
    assert session_key("m", "abc", {"prompt": "x"}) == session_key("m", "abc", t1)


def test_router_prefers_the_affine_worker_within_the_slack() -> None:
    reg = Registry(GatewayConfig(), MemoryState())
    for i in range(3):
        w = RegWorker(f"w{i}", f"http://127.0.0.1:{9000 + i}", "static")
        w.state, w.models, w.slots_total, w.tokens_per_second = "ready", frozenset({"m"}), 8, 10
        reg.workers[w.id] = w
    reg._rebuild()
    router = Router(reg, allowance=0, slack=2)
    got = [router.pick("m", prefer="w1").id for _ in range(4)]
    assert got == ["w1", "w1", "w1", got[3]] and got[3] != "w1"  # at 3 vs 0 it moves on
    assert router.pick("m", exclude={"w1"}, prefer="w1").id != "w1"
    assert router.pick("m", prefer="gone") is not None  # unknown preference: normal choice
    assert reg.workers["w1"].inflight == 3


def test_memory_state_affinity_expires() -> None:
    async def go() -> None:
        st = MemoryState()
        await st.set_affinity("k", "w1", ttl=60)
        assert await st.get_affinity("k") == "w1"
        await st.set_affinity("k", "w2", ttl=-1)  # already expired
        assert await st.get_affinity("k") is None
        assert await st.get_affinity("missing") is None

    asyncio.run(go())
