"""The planner packs several models per worker by memory (a pure function: no processes):
pinned models keep `min_replicas`, busy ones get more where memory is free, and a model
without room evicts the least recently used unpinned one."""

from __future__ import annotations

from gateway.placement import ModelSpec, WorkerSpec, explain, hosted, plan

MB = 1 << 20


def W(id: str, mb: int) -> WorkerSpec:  # noqa: N802 - reads like a table
    return WorkerSpec(id, mb * MB)


def M(name: str, mb: int, **kw) -> ModelSpec:  # noqa: N802
    return ModelSpec(name, mb * MB, **kw)


def test_two_models_that_do_not_fit_one_box_go_one_per_box() -> None:
    ps = plan([M("a", 600), M("b", 500)], [W("w1", 700), W("w2", 700)])
    assert hosted(ps) == {"w1": ["a"], "w2": ["b"]}


def test_two_models_that_fit_one_box_land_there_and_the_other_box_stays_free() -> None:
    ps = plan([M("a", 600), M("b", 500)], [W("w1", 1200), W("w2", 1200)])
    assert hosted(ps) == {"w1": ["a", "b"]}


def test_pinned_models_get_min_replicas() -> None:
    ps = plan([M("p", 300, pinned=True, replicas=2), M("q", 300)],
              [W("w1", 700), W("w2", 700), W("w3", 700)])
    assert sorted(w for w, ms in hosted(ps).items() if "p" in ms) == ["w1", "w2"]
    assert sum("q" in ms for ms in hosted(ps).values()) == 1


def test_a_busy_model_gets_replicas_where_memory_is_free() -> None:
    ws = [W("w1", 700), W("w2", 700)]
    one = plan([M("a", 300)], ws)
    two = plan([M("a", 300, replicas=2)], ws, one)
    assert hosted(two) == {"w1": ["a"], "w2": ["a"]}
    assert set(one) <= set(two)  # the running replica stays


def test_a_new_model_evicts_the_least_recently_used_unpinned_one() -> None:
    ws = [W("w1", 700)]
    cur = plan([M("old", 300, last_used=1.0), M("recent", 300, last_used=5.0)], ws)
    assert hosted(cur) == {"w1": ["old", "recent"]}
    ps = plan([M("old", 300, last_used=1.0), M("recent", 300, last_used=5.0),
               M("new", 300, last_used=9.0, demanded=True)], ws, cur)
    assert hosted(ps) == {"w1": ["new", "recent"]}
    # A model nobody waits for (it lost its box, say) evicts nothing: it is not loaded.
    idle = plan([M("old", 300, last_used=1.0), M("recent", 300, last_used=5.0),
                 M("new", 300, last_used=9.0)], ws, cur)
    assert hosted(idle) == {"w1": ["old", "recent"]}


def test_a_pinned_model_is_never_evicted_and_an_unpinned_one_is_left_out() -> None:
    ws = [W("w1", 500)]
    models = [M("pin", 300, pinned=True, last_used=0.0),
              M("new", 300, last_used=9.0, demanded=True)]
    ps = plan(models, ws, plan(models[:1], ws))
    assert hosted(ps) == {"w1": ["pin"]}
    why = explain({m.name: _need(m.need) for m in models}, ws, ps)
    assert set(why) == {"new"} and "other models are placed" in why["new"].reason


def test_a_pinned_model_evicts_an_unpinned_one() -> None:
    ws = [W("w1", 500)]
    cur = plan([M("u", 300, last_used=9.0)], ws)
    ps = plan([M("u", 300, last_used=9.0), M("pin", 300, pinned=True)], ws, cur)
    assert hosted(ps) == {"w1": ["pin"]}


def test_an_evicted_model_moves_where_memory_is_left() -> None:
    ws = [W("w1", 700), W("w2", 400)]
    cur = plan([M("big", 600, last_used=1.0)], ws)
    assert hosted(cur) == {"w1": ["big"]}
    ps = plan([M("big", 600, last_used=1.0), M("small", 350, last_used=2.0)], ws, cur)
    assert hosted(ps) == {"w1": ["big"], "w2": ["small"]}  # no eviction needed at all


def test_a_split_takes_only_workers_holding_nothing() -> None:
    ps = plan([M("huge", 900), M("tiny", 50)], [W("a", 500), W("b", 500), W("c", 100)])
    by = {p.model: p for p in ps}
    assert by["huge"].mode == "split" and set(by["huge"].workers) == {"a", "b"}
    assert by["tiny"].workers == ("c",)


def _need(total: int):
    from gateway.memory_need import MemoryNeed

    return MemoryNeed(total - (80 << 20), 0, 0)
