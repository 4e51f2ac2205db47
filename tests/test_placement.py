"""The placement planner, on made-up worker inventories (a pure function: no processes)."""

from __future__ import annotations

import pytest

from gateway.memory_need import RUNTIME_BYTES, MemoryNeed, estimate
from gateway.placement import ModelSpec, Placement, WorkerSpec, explain, plan, roles, summary
from worker.models import resolve

MB = 1 << 20


def W(id: str, mb: int) -> WorkerSpec:  # noqa: N802 - reads like a table
    return WorkerSpec(id, mb * MB)


def test_estimate_reads_the_gguf_metadata() -> None:
    _, path = resolve("smollm2-135m")
    need = estimate(path, n_ctx=2048, slots=1)
    # The tensor bytes are the file minus its header and vocabulary.
    assert 90 * MB < need.weights < path.stat().st_size
    # 30 layers x 2048 cells x 3 KV heads x (64 + 64) x 2 bytes: llama.cpp reports 45.00 MiB.
    assert need.kv_cache == 45 * MB
    # llama.cpp reports a 99.38 MiB compute buffer for n_ubatch 512.
    assert 98 * MB < need.compute < 102 * MB
    assert need.runtime == RUNTIME_BYTES
    assert need.total == need.weights + need.kv_cache + need.compute + need.runtime
    two = estimate(path, n_ctx=2048, slots=2)
    assert two.kv_cache == 2 * need.kv_cache


def test_one_replica_by_default_on_the_best_fit_other_boxes_stay_free() -> None:
    # Not "every worker where it fits": one home, the worker leaving the least memory over.
    ps = plan([ModelSpec("m", 300 * MB)], [W("a", 1000), W("b", 400), W("c", 2000)])
    assert [(p.mode, p.workers) for p in ps] == [("replica", ("b",))]
    (view,) = summary(ps)
    assert view["mode"] == "replica" and view["head"] is None and view["workers"] == ["b"]


def test_replicas_up_to_the_target_skip_workers_too_small() -> None:
    ps = plan([ModelSpec("m", 300 * MB, replicas=3)],
              [W("a", 1000), W("small", 100), W("b", 300)])
    assert sorted(w for p in ps for w in p.workers) == ["a", "b"]
    assert all(p.mode == "replica" for p in ps)


def test_splits_over_the_fewest_workers_when_none_holds_it() -> None:
    ws = [W("a", 200), W("b", 200), W("c", 200)]
    ps = plan([ModelSpec("m", 350 * MB)], ws)
    assert len(ps) == 1
    p = ps[0]
    assert p.mode == "split" and len(p.workers) == 2
    assert p.head == p.workers[0]
    assert p.tensor_split == (0.5, 0.5)
    r = roles(ps)
    assert sorted(role for role, _ in r.values()) == ["head", "shard"]


def test_split_takes_the_largest_and_splits_by_memory() -> None:
    ws = [W("s1", 100), W("big", 600), W("mid", 300), W("s2", 100)]
    (p,) = plan([ModelSpec("m", 800 * MB)], ws)
    assert p.workers == ("big", "mid")  # two largest suffice: fewest workers
    assert p.head == "big"
    assert p.tensor_split == pytest.approx((2 / 3, 1 / 3), abs=1e-5)


def test_split_needs_three_when_two_are_not_enough() -> None:
    ws = [W("a", 300), W("b", 300), W("c", 300), W("d", 300)]
    (p,) = plan([ModelSpec("m", 700 * MB)], ws)
    assert p.mode == "split" and len(p.workers) == 3
    assert sum(p.tensor_split) == pytest.approx(1.0, abs=1e-5)


def test_unplaceable_model_is_left_out() -> None:
    assert plan([ModelSpec("m", 10_000 * MB)], [W("a", 100), W("b", 100)]) == []


def test_free_memory_moving_between_rounds_does_not_change_the_plan() -> None:
    # Two boxes offering their free memory: which one is smaller flips between probes, so
    # which one gets the model's home first flips too. The roles do not: same plan.
    m = [ModelSpec("m", 300 * MB), ModelSpec("n", 800 * MB)]
    first = plan(m, [W("a", 1000), W("b", 1001)])
    again = plan(m, [W("a", 1001), W("b", 1000)], first)
    assert again == first and len(first) == 2


def test_a_kept_split_keeps_its_ratios_when_free_memory_moves() -> None:
    m = [ModelSpec("m", 350 * MB)]
    (first,) = plan(m, [W("a", 200), W("b", 201)])
    (again,) = plan(m, [W("a", 202), W("b", 199)], [first])
    assert again.workers == first.workers and again.tensor_split == first.tensor_split
    # New members get ratios of their own.
    (other,) = plan(m, [W("c", 300), W("d", 100)], [first])
    assert other.tensor_split == (0.75, 0.25)


def test_a_model_left_out_is_explained_with_the_numbers() -> None:
    need = MemoryNeed(100 * MB, 45 * MB, 100 * MB)
    ws = [W("a", 70), W("b", 60)]
    (u,) = explain({"m": need}, ws, plan([ModelSpec("m", need.total)], ws)).values()
    assert (u.model, u.largest, u.largest_worker, u.split, u.workers) == (
        "m", 70 * MB, "a", 130 * MB, 2)
    assert u.reason == ("it needs 325.0 MiB (weights 100.0 MiB, KV cache 45.0 MiB, compute "
                        "100.0 MiB, runtime 80.0 MiB), but the largest worker (a) offers "
                        "70.0 MiB and all 2 worker(s) together 130.0 MiB")
    view = u.to_json()
    assert view["state"] == "unplaceable" and view["need"]["total"] == need.total
    assert view["offer"] == {"largest": 70 * MB, "largest_worker": "a", "split": 130 * MB,
                             "workers": 2}
    # Enough memory in all, but another model holds it: the reason says so.
    small = MemoryNeed(10 * MB, 0, 0, 0)
    ws = [W("a", 400)]
    ps = plan([ModelSpec("big", 400 * MB), ModelSpec("m", small.total)], ws)
    left = explain({"big": MemoryNeed(400 * MB, 0, 0, 0), "m": small}, ws, ps)
    assert list(left) == ["m"] and "other models are placed" in left["m"].reason
    # Placed models, or no workers at all, are not unplaceable.
    assert explain({"m": small}, ws, plan([ModelSpec("m", small.total)], ws)) == {}
    assert explain({"m": need}, [], []) == {}


def test_no_workers_no_placements() -> None:
    assert plan([ModelSpec("m", 1)], []) == []


def test_the_same_inventory_gives_the_same_plan_and_current_members_stay() -> None:
    ws = [W("a", 200), W("b", 200), W("c", 200)]
    first = plan([ModelSpec("m", 350 * MB)], ws)
    assert plan([ModelSpec("m", 350 * MB)], ws, first) == first
    # Current members win ties, whatever their ids.
    cur = [Placement("m", "split", ("c", "b"), "c", (0.5, 0.5))]
    (p,) = plan([ModelSpec("m", 350 * MB)], ws, cur)
    assert set(p.workers) == {"b", "c"}


def test_a_dead_member_is_replaced() -> None:
    ws = [W("a", 200), W("b", 200), W("c", 200)]
    (first,) = plan([ModelSpec("m", 350 * MB)], ws)
    alive = [w for w in ws if w.id != first.workers[1]]
    (again,) = plan([ModelSpec("m", 350 * MB)], alive, [first])
    assert again.mode == "split" and first.workers[1] not in again.workers
    assert first.workers[0] in again.workers


def test_a_big_joiner_turns_a_split_into_a_replica() -> None:
    ws = [W("a", 200), W("b", 200)]
    cur = plan([ModelSpec("m", 350 * MB)], ws)
    ps = plan([ModelSpec("m", 350 * MB)], [*ws, W("big", 1000)], cur)
    assert [(p.mode, p.workers) for p in ps] == [("replica", ("big",))]


def test_two_models_share_a_worker_that_holds_both() -> None:
    models = [ModelSpec("small", 100 * MB), ModelSpec("large", 500 * MB)]
    ws = [W("a", 600), W("b", 600), W("c", 150), W("d", 150)]
    ps = plan(models, ws)
    # Biggest first on the best fit, then the small one beside it: one box in use.
    assert [(p.model, p.workers) for p in ps] == [("large", ("a",)), ("small", ("a",))]


def test_two_models_one_split_one_replicated() -> None:
    models = [ModelSpec("big", 900 * MB), ModelSpec("tiny", 50 * MB)]
    ws = [W("a", 500), W("b", 500), W("c", 100)]
    ps = plan(models, ws)
    by_model = {p.model: p for p in ps}
    assert by_model["big"].mode == "split" and set(by_model["big"].workers) == {"a", "b"}
    assert by_model["tiny"].workers == ("c",)


def test_the_header_reader_agrees_with_the_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    from worker import gguf_meta

    _, path = resolve("smollm2-135m")
    ours = gguf_meta.read(path)
    ref = gguf.GGUFReader(path, "r")
    assert ours.tensor_bytes == sum(int(t.n_bytes) for t in ref.tensors)
    assert ours.n_tensors == len(ref.tensors)
    for key in ("llama.block_count", "llama.attention.head_count_kv", "general.architecture"):
        assert ours.get(key) == ref.fields[key].contents()
    assert len(ours.get("tokenizer.ggml.tokens")) == len(ref.fields["tokenizer.ggml.tokens"].data)


def test_a_file_that_is_not_gguf_is_refused(tmp_path) -> None:
    from worker import gguf_meta

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(gguf_meta.GGUFError):
        gguf_meta.read(bad)


def test_a_dead_shard_is_replaced_and_the_head_stays_whatever_the_rtt_noise() -> None:
    ws = [W("a", 200), W("b", 200), W("c", 200), W("d", 200)]
    cur = [Placement("m", "split", ("b", "c"), "b", (0.5, 0.5))]
    alive = [w for w in ws if w.id != "c"]  # the shard died
    # Loopback RTTs differ by noise: the spares' link measures a little faster.
    rtt = {frozenset("ab"): 0.09, frozenset("bd"): 0.08, frozenset("ad"): 0.05}

    def cost(head: str, members) -> float:
        return sum(rtt[frozenset((head, s))] for s in members if s != head)

    (p,) = plan([ModelSpec("m", 350 * MB)], alive, cur, cost)
    assert p.head == "b" and p.workers[0] == "b" and "c" not in p.workers
    # A clearly faster set still wins: the survivor's links are slow.
    rtt = {frozenset("ab"): 9.0, frozenset("bd"): 9.0, frozenset("ad"): 0.05}
    (p,) = plan([ModelSpec("m", 350 * MB)], alive, cur, cost)
    assert set(p.workers) == {"a", "d"}
