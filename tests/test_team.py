"""A team backend: API keys, per-key limits across gateway replicas, usage, fair share, Redis.

Real processes on 127.0.0.1 (redis-server, gateway_factory, sim workers); the official `openai`
SDK is the client. Waits are polls with deadlines; processes are stopped in fixtures.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import client_for
from procs import HOST, Gateway, Proc, Worker, metric, start_redis, wait_for

MODEL = "smollm2-135m"
HEADER = "x-corral-worker"
CHAT = [{"role": "user", "content": "Say something."}]
TOKEN = "test-cluster-token"

KEYS = """
cluster_token = "test-cluster-token"
[[api_keys]]
key = "sk-alice-secret"
user = "alice"
rpm = 4
[[api_keys]]
key = "sk-bob-secret"
user = "bob"
[[api_keys]]
key = "sk-carol-secret"
user = "carol"
tpm = 100
"""


@pytest.fixture
def config(tmp_path: Path) -> Callable[..., str]:
    def write(extra: str = "", keys: str = KEYS) -> str:
        p = tmp_path / "corral.toml"
        p.write_text(keys + extra)
        return str(p)

    return write


def sim(factory: Callable[..., Worker], *extra: str, rate: float = 200, parallel: int = 4,
        **kw) -> Worker:
    return factory("--sim-tokens-per-second", str(rate), "--parallel", str(parallel),
                   "--sim-ttft", "0.01", *extra, backend="sim", **kw)


def states(g: Gateway) -> dict[str, str]:
    # /cluster is closed when API keys are configured: the cluster token opens it.
    return {w["id"]: w["state"] for w in httpx.get(
        f"{g.url}/cluster", timeout=5, headers={"Authorization": f"Bearer {TOKEN}"}).json()[
        "workers"]}


def wait_ready(g: Gateway, wid: str, timeout: float = 20) -> None:
    wait_for(lambda: states(g).get(wid) in ("ready", "busy"), timeout, 0.05,
             f"{wid} ready at {g.url}")


def chat(g: Gateway, key: str, max_tokens: int = 4) -> str:
    """The worker that served one chat completion."""
    raw = client_for(g.url, api_key=key).chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=max_tokens)
    assert raw.parse().choices[0].message.content
    return raw.headers[HEADER]


def usage(g: Gateway) -> dict:
    r = httpx.get(f"{g.url}/admin/usage", headers={"Authorization": f"Bearer {TOKEN}"},
                  timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- keys


def test_missing_or_unknown_key_is_401(worker_factory, gateway_factory, config) -> None:
    w = sim(worker_factory)
    g = gateway_factory("--worker", w.url, "--config", config())
    wait_ready(g, w.id)
    client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="sk-nobody", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    # No key at all (the SDK refuses to send none, so plain HTTP): the same 401 shape.
    r = httpx.post(f"{g.url}/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert chat(g, "sk-bob-secret") == w.id
    # The admin route wants the cluster token, not an API key.
    r = httpx.get(f"{g.url}/admin/usage", headers={"Authorization": "Bearer sk-bob-secret"})
    assert r.status_code == 401
    assert "secret" not in g.proc.log()


# --------------------------------------------------------------------------- two gateways


def test_two_gateways_share_workers_limits_and_usage(worker_factory, gateway_factory, config,
                                                     redis_url) -> None:
    conf = config()
    g1 = gateway_factory("--config", conf, "--redis", redis_url)
    g2 = gateway_factory("--config", conf, "--redis", redis_url)
    w = sim(worker_factory, "--join", g1.url, env={"CORRAL_CLUSTER_TOKEN": TOKEN})
    wait_ready(g1, w.id)
    wait_ready(g2, w.id)  # joined on g1, learned by g2 through Redis
    assert chat(g2, "sk-bob-secret") == w.id

    # alice: rpm = 4 across both gateways together.
    for g in (g1, g2, g1, g2):
        assert chat(g, "sk-alice-secret") == w.id
    for g in (g2, g1):
        with pytest.raises(openai.RateLimitError) as e:
            chat(g, "sk-alice-secret")
        assert e.value.body["code"] == "rate_limit_exceeded"
        assert e.value.body["type"] == "rate_limit_error"
        assert int(e.value.response.headers["retry-after"]) >= 1
    # bob has no limits and is unaffected by alice's.
    assert chat(g1, "sk-bob-secret") == w.id
    stream = client_for(g2.url, api_key="sk-bob-secret").chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=3, stream=True)
    assert [c for c in stream if c.choices]  # usage is not asked for, but still counted

    # Usage: the same cluster-wide totals from either gateway.
    def counted() -> bool:
        return all(usage(g)["users"].get(u, {}).get("requests") == n
                   for g in (g1, g2) for u, n in (("alice", 6), ("bob", 3)))
    wait_for(counted, 10, 0.05, "the usage of both gateways to reach Redis")
    for g in (g1, g2):
        a = usage(g)["users"]["alice"]
        assert a["by_status"] == {"200": 4, "429": 2}
        assert a["completion_tokens"] == 4 * 4 and a["prompt_tokens"] > 0
        assert a["total_tokens"] == a["prompt_tokens"] + a["completion_tokens"]
        bob = usage(g)["users"]["bob"]
        assert bob["requests"] == 3 and bob["completion_tokens"] == 4 + 4 + 3
    # Metrics: each replica counts its own share; together they are the totals.
    total = sum(metric(g.url, "corral_user_requests_total", user="alice", status="200")
                for g in (g1, g2))
    assert total == 4
    assert sum(metric(g.url, "corral_user_tokens_total", user="alice", kind="completion")
               for g in (g1, g2)) == 16
    assert metric(g1.url, "corral_rejected_total", reason="rate_limited") == 1
    # The worker leaving through g1 leaves g2 as well.
    r = httpx.delete(f"{g1.url}/cluster/workers/{w.id}",
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    w.proc.stop()
    wait_for(lambda: w.id not in states(g2), 10, 0.05, "g2 to drop the departed worker")
    for g in (g1, g2):
        assert "secret" not in g.proc.log()


def test_tokens_per_minute(worker_factory, gateway_factory, config, redis_url) -> None:
    w = sim(worker_factory)
    g = gateway_factory("--worker", w.url, "--config", config(), "--redis", redis_url)
    wait_ready(g, w.id)
    # carol: tpm = 100. ~13 prompt tokens + 60 reserved, then settled to the real usage.
    assert chat(g, "sk-carol-secret", max_tokens=60) == w.id
    with pytest.raises(openai.RateLimitError) as e:
        chat(g, "sk-carol-secret", max_tokens=60)
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in e.value.body["message"]
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert chat(g, "sk-carol-secret", max_tokens=5) == w.id  # still fits the minute
    assert chat(g, "sk-bob-secret", max_tokens=60) == w.id


def test_token_reservations_settle_to_real_usage(redis_url) -> None:
    """The limiter itself, on Redis and in memory: a reservation is corrected afterwards."""
    import redis.asyncio as aioredis

    from gateway.config import ApiKey
    from gateway.limits import Limiter
    from wire.errors import APIError

    async def scenario(lim: Limiter) -> None:
        await lim.start()
        key = ApiKey("sk-dave", "dave", rpm=None, tpm=1000)
        res = await lim.admit(key, 900)
        with pytest.raises(APIError) as e:
            await lim.admit(key, 200)
        assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
        assert int(e.value.headers["Retry-After"]) >= 1
        lim.settle(res, 100)  # it used 100 of the 900 it reserved
        await lim.stop()  # flushes
        await lim.start()
        second = await lim.admit(key, 200)
        assert second.tokens == 200
        await lim.stop()

    async def on_redis() -> None:
        r = aioredis.from_url(redis_url)
        try:
            await scenario(Limiter(r))
            assert await r.keys("*sk-dave*") == []  # keys are named by a digest
        finally:
            await r.aclose()

    asyncio.run(on_redis())
    asyncio.run(scenario(Limiter()))


def test_replicas_share_passive_ejections(redis_url) -> None:
    """A worker that failed a real request at one replica is ejected at the others."""
    from gateway.config import GatewayConfig
    from gateway.registry import Registry
    from gateway.state import RedisState
    from gateway.worker_record import Worker as W

    async def scenario() -> None:
        states_ = [RedisState(redis_url), RedisState(redis_url)]
        regs = [Registry(GatewayConfig(), s) for s in states_]
        ws = []
        for r in regs:
            w = W("w1", "http://127.0.0.1:9", "static")
            w.state = "ready"
            r.workers[w.id] = w
            ws.append(w)
        try:
            regs[0].eject(ws[0], "connect: refused")
            await regs[0]._share_registry()
            await regs[1]._share_registry()
            assert ws[1].state == "down"
            assert ws[1].last_error == "failed a request at another gateway replica"
            ws[1].state = "ready"  # re-admitted by its next probe: the mark is not re-applied
            await regs[1]._share_registry()
            assert ws[1].state == "ready"
        finally:
            for s in states_:
                await s.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- fair share


def test_fair_queue_order_is_round_robin_across_users() -> None:
    from gateway.admission import Waiter
    from gateway.fairqueue import FairQueue

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        q = FairQueue()
        ws = {name: Waiter("m", (), loop.create_future(), name[0])
              for name in ("a1", "a2", "a3", "b1", "c1", "c2")}
        for name in ("a1", "a2", "a3", "b1", "c1", "c2"):
            q.put(ws[name])
        names = {id(w): n for n, w in ws.items()}

        def order() -> list[str]:
            return [names[id(w)] for w in q.in_order()]

        assert len(q) == 6 and order() == ["a1", "b1", "c1", "a2", "c2", "a3"]
        q.remove(ws["a1"])  # a was served: b and c go first now
        assert order() == ["b1", "c1", "a2", "c2", "a3"]
        q.remove(ws["b1"])
        ws["d1"] = Waiter("m", (), loop.create_future(), "d")
        names[id(ws["d1"])] = "d1"
        q.put(ws["d1"])  # a newly waiting user joins the rotation at the back
        assert order() == ["c1", "a2", "d1", "c2", "a3"]
        assert q.users() == {"c": 2, "a": 2, "d": 1} and len(q) == 5

    asyncio.run(scenario())


def test_fair_share_under_flood(worker_factory, gateway_factory, config) -> None:
    """alice floods 40 requests; bob's one is served after about one request, not 40."""
    w = sim(worker_factory, rate=10, parallel=2)  # 5 tokens: ~0.5 s per request, 2 at once
    conf = config("[gateway]\nworker_queue_allowance = 0\n", KEYS.replace("rpm = 4", "rpm = 1000"))
    g = gateway_factory("--worker", w.url, "--config", conf)
    wait_ready(g, w.id)
    clients = {k: client_for(g.url, api_key=k) for k in ("sk-alice-secret", "sk-bob-secret")}
    done: list[str] = []
    lock = threading.Lock()

    def one(key: str, tag: str) -> None:
        clients[key].chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5)
        with lock:
            done.append(tag)

    def all_arrived() -> bool:  # every one of alice's requests is in flight, queued or done
        queued = metric(g.url, "corral_queue_length")
        return queued + metric(g.url, "corral_inflight") + len(done) >= 40 and queued >= 10

    with ThreadPoolExecutor(41) as pool:
        flood = [pool.submit(one, "sk-alice-secret", "a") for _ in range(40)]
        wait_for(all_arrived, 30, 0.02, "alice's flood to queue at the gateway")
        with lock:
            before = len(done)
        b = pool.submit(one, "sk-bob-secret", "b")
        b.result(timeout=60)
        with lock:
            a_while_b_waited = done.index("b") - before
        for f in flood:
            f.result(timeout=60)
    queued_before_bob = 40 - before - 2  # minus the 2 in service
    # bob waits for the 2 requests in service plus at most alice's next turn; in FIFO
    # order he would wait for all (>= 10) of hers queued before him.
    assert queued_before_bob >= 10
    assert a_while_b_waited <= 4, (before, done)
    assert len(done) - done.index("b") - 1 >= queued_before_bob - 4


# --------------------------------------------------------------------------- Redis outage


def test_gateways_keep_serving_when_redis_dies(worker_factory, gateway_factory, config) -> None:
    redis, url = start_redis()
    try:
        conf = config("[gateway]\njoin_ttl = 4.0\n")  # workers heartbeat every 3 s
        g1 = gateway_factory("--config", conf, "--redis", url)
        g2 = gateway_factory("--config", conf, "--redis", url)
        w = sim(worker_factory, "--join", g1.url, env={"CORRAL_CLUSTER_TOKEN": TOKEN})
        wait_ready(g2, w.id)
        assert chat(g2, "sk-alice-secret") == w.id
        redis.kill()
        wait_for(lambda: "shared state unreachable" in g2.proc.log(), 10, 0.05,
                 "g2 to notice Redis is gone")
        # Past join_ttl without Redis, both still serve (g2 keeps the worker g1 announced).
        deadline = time.monotonic() + 5.0
        served = 0
        while time.monotonic() < deadline:
            assert chat(g2, "sk-bob-secret") == w.id
            assert chat(g1, "sk-bob-secret") == w.id
            served += 2
        assert served >= 4
        # Limits degrade to each replica enforcing them alone (logged once).
        assert chat(g2, "sk-alice-secret") == w.id
        wait_for(lambda: "enforcing them per gateway replica" in g2.proc.log(), 5, 0.05,
                 "the degraded-limits log line")
        assert g2.proc.log().count("enforcing them per gateway replica") == 1
        for _ in range(4):
            chat(g1, "sk-alice-secret")
        with pytest.raises(openai.RateLimitError):  # g1 alone: 4 per minute
            chat(g1, "sk-alice-secret")

        # Redis comes back on the same port: the gateways reconnect and share again.
        port = url.rsplit(":", 1)[1].split("/")[0]
        redis = Proc([redis.args[0], "--port", port, "--bind", HOST, "--save", "",
                      "--appendonly", "no"], name="redis-again").start()
        for g in (g1, g2):
            wait_for(lambda g=g: "shared state reachable again" in g.proc.log()
                     and "limits are shared again" in g.proc.log(), 20, 0.05,
                     "the gateways to reconnect")
        assert chat(g2, "sk-bob-secret") == w.id
        wait_for(lambda: usage(g1)["source"] == "redis"
                 and usage(g1)["users"].get("bob", {}).get("requests", 0) >= 4,
                 10, 0.1, "usage counted during the outage to reach Redis")
    finally:
        redis.stop()
