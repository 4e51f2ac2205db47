"""In-process checks of the gateway's pure parts: routing arithmetic, the admission queue,
shared state and config loading. (Everything with sockets is in test_gateway_sim.py.)"""

from __future__ import annotations

import argparse
import asyncio
import collections

import pytest

from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.config_file import load_config
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.routing import Router
from gateway.state import MemoryState
from gateway.worker_record import Worker
from wire.errors import APIError


def _registry(speeds: list[float], slots: int = 4, cfg: GatewayConfig | None = None
              ) -> Registry:
    reg = Registry(cfg or GatewayConfig(), MemoryState())
    for i, tps in enumerate(speeds):
        w = Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}", "static")
        w.state, w.models, w.slots_total, w.tokens_per_second = "ready", frozenset({"m"}), \
            slots, tps
        reg.workers[w.id] = w
    reg._rebuild()
    return reg


def test_scores_follow_capacity_and_ties_are_random() -> None:
    reg = _registry([10, 40])
    router = Router(reg, allowance=100)
    for _ in range(20):  # idle: the faster worker, every time
        w = router.pick("m")
        assert w is not None and w.id == "w1"
        router.release(w)
    for _ in range(50):  # keep everything in flight: the split follows capacity 1:4
        assert router.pick("m") is not None
    assert (reg.workers["w0"].inflight, reg.workers["w1"].inflight) == (10, 40)

    reg = _registry([10, 10, 10])
    router = Router(reg, allowance=0)
    first = collections.Counter()
    for _ in range(300):
        w = router.pick("m")
        first[w.id] += 1
        router.release(w)
    assert len(first) == 3 and min(first.values()) > 50  # uniform among equals


def test_full_workers_are_skipped_and_p2c_handles_many() -> None:
    reg = _registry([10] * 8, slots=1)
    router = Router(reg, allowance=1)
    picked = [router.pick("m") for _ in range(16)]
    assert all(picked)  # 8 workers x (1 slot + 1 allowed) = 16 places
    assert router.pick("m") is None
    assert {w.inflight for w in reg.workers.values()} == {2}
    assert router.pick("m", exclude={"w0"}) is None
    assert router.pick("other-model") is None


def test_admission_queue_is_fifo_with_deadline_and_bound() -> None:
    cfg = GatewayConfig(queue_size=2, queue_timeout=0.3, worker_queue_allowance=0)
    reg = _registry([10], slots=1, cfg=cfg)
    adm = Admission(cfg, reg, Router(reg, 0), Metrics(reg))

    async def scenario() -> None:
        held = await adm.acquire("m")
        order: list[int] = []

        async def wait(i: int) -> None:
            w = await adm.acquire("m")
            order.append(i)
            adm.release(w)

        a = asyncio.create_task(wait(1))
        b = asyncio.create_task(wait(2))
        await asyncio.sleep(0)
        assert len(adm.queue) == 2
        with pytest.raises(APIError) as full:
            await adm.acquire("m")
        assert full.value.status == 429 and full.value.code == "queue_full"
        adm.release(held)
        await asyncio.gather(a, b)
        assert order == [1, 2]
        held = await adm.acquire("m")
        with pytest.raises(APIError) as late:
            await adm.acquire("m")
        assert late.value.code == "queue_timeout" and late.value.headers["Retry-After"]
        adm.release(held)
        assert reg.workers["w0"].inflight == 0
        with pytest.raises(APIError) as unknown:
            await adm.acquire("nope")
        assert unknown.value.status == 404
        reg.workers["w0"].state = "down"
        reg._rebuild()
        with pytest.raises(APIError) as down:
            await adm.acquire("m")
        assert down.value.status == 503

    asyncio.run(scenario())


def test_cancelled_waiter_passes_its_worker_on() -> None:
    cfg = GatewayConfig(queue_size=4, queue_timeout=5, worker_queue_allowance=0)
    reg = _registry([10], slots=1, cfg=cfg)
    adm = Admission(cfg, reg, Router(reg, 0), Metrics(reg))

    async def scenario() -> None:
        held = await adm.acquire("m")
        t = asyncio.create_task(adm.acquire("m"))
        await asyncio.sleep(0)
        adm.release(held)  # hands the slot to the waiter...
        t.cancel()  # ...which leaves before it runs
        with pytest.raises(asyncio.CancelledError):
            await t
        assert reg.workers["w0"].inflight == 0

    asyncio.run(scenario())


def test_memory_state_sums_other_replicas() -> None:
    async def scenario() -> None:
        s = MemoryState()
        await s.publish_inflight("a", {"w1": 2})
        await s.publish_inflight("b", {"w1": 3, "w2": 1})
        assert await s.others_inflight("a") == {"w1": 3, "w2": 1}
        await s.forget_worker("w1")
        assert await s.others_inflight("a") == {"w2": 1}

    asyncio.run(scenario())


def test_config_file_and_env(tmp_path, monkeypatch) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('cluster_token = "t"\nworkers = ["http://a:1/"]\nmodels = ["x"]\n'
                    '[[api_keys]]\nkey = "sk-1"\nuser = "u"\nrpm = 5\n'
                    '[gateway]\nqueue_size = 7\n')
    monkeypatch.setenv("CORRAL_API_KEYS", "k2,k3")
    ns = argparse.Namespace(host="h", port=1, worker=["http://b:2"], model=[], config=str(conf),
                            cluster_token=None, redis_url=None, log_level="info")
    cfg = load_config(ns)
    assert cfg.workers == ["http://b:2", "http://a:1"] and cfg.models == ["x"]
    assert cfg.cluster_token == "t" and not cfg.cluster_token_generated
    assert [(k.key, k.user, k.rpm) for k in cfg.api_keys][0] == ("sk-1", "u", 5)
    assert [k.key for k in cfg.api_keys[1:]] == ["k2", "k3"]
    assert cfg.queue_size == 7
    assert "sk-1" not in repr(cfg) and "sk-1" not in repr(cfg.api_keys)
    ns.config, ns.cluster_token = None, None
    monkeypatch.delenv("CORRAL_API_KEYS")
    cfg = load_config(ns)
    assert cfg.cluster_token_generated and len(cfg.cluster_token) >= 24 and not cfg.api_keys


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_lean_transport_streams_reuses_and_survives_stale_connections(loop: str) -> None:
    import httpx

    from gateway.transport import LeanTransport

    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(next(h for h in head.split(b"\r\n")
                         if h.lower().startswith(b"content-length")).split(b":")[1])
            body = await reader.readexactly(n)
            path = head.split(b" ")[1]
            if path == b"/stream":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(3):
                    ev = b"data: %d\n\n" % i
                    writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            if path == b"/close":  # hang up without saying so: a stale keep-alive socket
                writer.close()
                return

    async def scenario() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(transport=LeanTransport(), timeout=5) as c:
            for i in range(5):
                r = await c.post(f"{base}/echo", content=b"x" * i)
                assert r.status_code == 200 and r.content == b"x" * i
            assert connections == 1  # keep-alive
            async with c.stream("POST", f"{base}/stream", content=b"") as r:
                got = [chunk async for chunk in r.aiter_raw()]
            assert b"".join(got) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            for _ in range(3):  # each response is followed by a silent close
                r = await c.post(f"{base}/close", content=b"ok")
                assert r.content == b"ok"
            # The socket closed but the event loop has not yet told the protocol (uvloop
            # then raises on write): the request must still go out, on a fresh connection.
            await c.post(f"{base}/echo", content=b"")
            before = connections
            # The direct call (non-streamed hot path): same pool, no httpx objects.
            lean = c._transport
            for body in (b"direct", b"again"):
                status, headers, data = await lean.post("127.0.0.1", port, "/echo", body, 5, 5)
                assert (status, data) == (200, body)
                assert headers["content-length"] == str(len(body))
            assert connections == before  # kept alive, shared with the client's requests
            idle = next(iter(c._transport._idle.values()))
            assert idle and not idle[-1].closed
            idle[-1].transport.close()
            r = await c.post(f"{base}/echo", content=b"fresh")
            assert r.content == b"fresh" and connections == before + 1
            # Worse: the handle is gone and nothing says so until a write raises (seen
            # with uvloop under load): still a stale socket, not a failed request.
            idle = next(iter(c._transport._idle.values()))
            conn = idle[-1]
            real = conn.transport

            class Gone:
                def is_closing(self) -> bool:
                    return False

                def write(self, data: bytes) -> None:
                    raise RuntimeError("unable to perform operation; the handler is closed")

                def close(self) -> None:
                    real.close()

            conn.transport = Gone()
            r = await c.post(f"{base}/echo", content=b"again")
            assert r.content == b"again" and connections == before + 2
            with pytest.raises(httpx.ConnectError):
                await c.get("http://127.0.0.1:9/")
        server.close()
        await server.wait_closed()

    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())
    else:
        asyncio.run(scenario())


def test_generated_cluster_token_goes_to_an_owner_only_file(tmp_path, monkeypatch) -> None:
    import stat

    from gateway.serve import save_token

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = save_token("s3cret-token")
    assert path.read_text().strip() == "s3cret-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    save_token("another")  # rewriting tightens the mode again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == "another"


def _readers(cfg: GatewayConfig) -> Registry:
    reg = _registry([100.0], slots=1, cfg=cfg)
    w = reg.workers["w0"]
    w.decode_tps, w.prefill_tps = 100.0, 1000.0
    reg._weigh()
    return reg


def test_cost_routing_room_follows_expected_wait_and_a_timer_reopens_a_reader() -> None:
    """Past its allowance a worker still takes a job while the expected wait there is
    under `worker_queue_seconds`; when only its prompt-reading backlog keeps it full, a
    timer (no request finishing) hands it to the waiter as the backlog drains."""
    import time

    from gateway.cost import Job

    cfg = GatewayConfig(worker_queue_allowance=0, worker_queue_seconds=0.2, queue_timeout=5)
    reg = _readers(cfg)
    router = Router(reg, 0, queue_seconds=0.2)
    job = Job(prompt_tokens=10, new_tokens=10, completion_tokens=8, typical=8)
    assert router.pick("m", job=job) is not None  # the slot
    w = reg.workers["w0"]
    w.reader_free = 0.0
    # One in its slot, 8 tokens at 100/s ahead: 0.08 s of wait < 0.2 s, so still room.
    assert router.pick("m", job=job) is w and w.inflight == 2
    w.inflight = 1
    w.reader_free = time.monotonic() + 5.0  # 5 s of prompts to read: no room
    assert router.pick("m", job=job) is None
    assert router.pick("m", job=None) is None  # the count alone: full too

    adm = Admission(cfg, reg, router, Metrics(reg))

    async def scenario() -> None:
        w.reader_free = time.monotonic() + 0.4  # room again at +0.2 s, by the clock only
        # Handed over by the timer: no release comes, and the queue timeout is 5 s.
        got = await asyncio.wait_for(adm.acquire("m", job=job), 3.0)
        assert got is w and w.inflight == 2

    asyncio.run(scenario())



def test_cost_routing_holds_a_long_prompt_for_the_fast_reader() -> None:
    """A full worker still competes with its wait counted: a long prompt that finishes
    sooner after the fast reader's backlog than on an idle slow reader waits for it (None,
    `holding`: admission keeps it and lets those behind take the room), a short prompt
    takes the idle slow reader at once, and each one already waiting counts against the
    fast reader for the next."""
    import time

    from gateway.cost import Job

    cfg = GatewayConfig(worker_queue_allowance=0)
    reg = _registry([50.0, 50.0], slots=1, cfg=cfg)
    slow, fast = reg.workers["w0"], reg.workers["w1"]
    for w, rate in ((slow, 1000.0), (fast, 3000.0)):
        w.decode_tps, w.prefill_tps = 50.0, rate
    reg._weigh()
    router = Router(reg, 0)
    fast.inflight, fast.reader_free = 1, time.monotonic() + 2.5  # full, 2.5 s to read
    long_job = Job(prompt_tokens=6000, new_tokens=6000, completion_tokens=8, typical=30)
    short_job = Job(prompt_tokens=50, new_tokens=50, completion_tokens=8, typical=30)
    assert router.pick("m", job=long_job) is None and router.holding  # ~4.8 s vs 6.2 s
    assert router.held == {fast.id: 1}
    assert router.pick("m", job=short_job) is slow
    router.release(slow)
    router.held[fast.id] = 4  # four ahead of it wait for the fast one: 2.4 s more there
    assert router.pick("m", job=long_job) is slow
