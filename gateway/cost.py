"""What a request will cost on each worker: prompt reading plus decoding plus the queue.

A box is fast or slow at two separate things: reading a prompt (compute-bound; an iGPU
roughly doubles it) and generating tokens (memory-bandwidth-bound; the iGPU does not help).
Workers report both in `/status` (`prefill_tokens_per_second`, `decode_tokens_per_second`),
and a request's expected time to finish on worker w is

    wait + reads / prefill_rate(w) + completion / decode_rate(w) * (1 + DRAG * in_slots)

- reads: prompt tokens estimated from the body's text length (`CHARS_PER_TOKEN`, no
  tokenizer on the gateway); on the worker that holds the conversation's prompt cache
  (affinity) only the turn's new messages count, so a cached prefix is nearly free there.
- completion: `max_tokens`, or the model's typical completion length learned from finished
  requests when that is shorter (or when max_tokens is absent).
- wait: the later of the worker's prompt-reading backlog (the prompts this gateway sent it
  that should still be being read: a virtual finish time, `Worker.reader_free`, pushed on
  at every pick and draining with the clock) and the wait for a slot (the requests beyond
  its slots drain `slots` at a time, each about a typical completion long).
- room: past `worker_queue_allowance` requests beyond its slots, a worker still takes a
  job while its expected wait is under `worker_queue_seconds` (`full`).
- DRAG: sequences decoded in one batch slow each other a little on a real backend, so of
  two equal workers the one with fewer sequences in its slots is the faster.

The router (routing.py) picks the least expected finish; rates unknown on a worker fall
back to the mean of those known (prefill: counted as free everywhere when none is known).
This is the hot path: attribute reads and arithmetic only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.worker_record import Worker

CHARS_PER_TOKEN = 4.0  # a typical BPE on English text (the sim tokenizes exactly so)
DRAG = 0.1  # decode slowdown per other sequence in the worker's slots
DEFAULT_COMPLETION = 128.0  # tokens, until a model's typical length is learned
LEARN_RATE = 0.1  # weight of one finished request in a model's typical length


@dataclass(slots=True)
class Job:
    """One request's expected work, estimated once at the edge."""

    prompt_tokens: float  # the whole prompt
    new_tokens: float  # what a worker holding the conversation's cache still has to read
    completion_tokens: float  # expected generated tokens
    typical: float  # a typical request's completion on this model (for the slot queue)


class Lengths:
    """Typical completion length per model, learned from finished requests."""

    def __init__(self) -> None:
        self.typical: dict[str, float] = {}

    def observe(self, model: str, completion_tokens: int) -> None:
        if completion_tokens <= 0:
            return
        old = self.typical.get(model)
        self.typical[model] = (float(completion_tokens) if old is None
                               else old + LEARN_RATE * (completion_tokens - old))

    def job(self, model: str, prompt_chars: int, new_chars: int, max_tokens: int | None) -> Job:
        typical = self.typical.get(model)
        if max_tokens is None:
            completion = typical or DEFAULT_COMPLETION
        else:
            completion = min(float(max_tokens), typical) if typical else float(max_tokens)
        return Job(prompt_chars / CHARS_PER_TOKEN, min(new_chars, prompt_chars) / CHARS_PER_TOKEN,
                   max(1.0, completion), typical or completion)


def weigh(workers: Iterable[Worker]) -> None:
    """Sets each worker's effective `decode_rate` and `prefill_rate` from what it reports;
    a rate not reported (yet) is the mean of the known ones."""
    ws = list(workers)
    dec = [w.decode_tps or w.tokens_per_second for w in ws
           if (w.decode_tps or w.tokens_per_second) > 0]
    pre = [w.prefill_tps for w in ws if w.prefill_tps > 0]
    dec_default = sum(dec) / len(dec) if dec else 1.0
    pre_default = sum(pre) / len(pre) if pre else 0.0  # 0: prompts cost the same everywhere
    for w in ws:
        w.decode_rate = w.decode_tps or w.tokens_per_second or dec_default
        w.prefill_rate = w.prefill_tps or pre_default


def reads(w: Worker, job: Job, cached: bool) -> float:
    """Seconds of prompt reading the job adds on `w`."""
    rate = w.prefill_rate
    return (job.new_tokens if cached else job.prompt_tokens) / rate if rate > 0 else 0.0


def wait(w: Worker, job: Job, now: float) -> float:
    """Expected seconds before `w` starts reading the job: the later of its prompt-reading
    backlog and its slot queue."""
    slots = w.slots_total
    over = w.load + 1 - slots
    ahead = w.reader_free - now
    if over > 0:
        ahead = max(ahead, over * job.typical / (slots * w.decode_rate))
    return ahead if ahead > 0.0 else 0.0


def full(w: Worker, job: Job, now: float, allowance: int, seconds: float) -> bool:
    """Whether `w` has no room for the job: past `allowance` requests beyond its slots AND
    expected to make it wait more than `seconds`. A count alone misjudges prompt reading:
    six short prompts queued at a fast reader are nothing, six long ones at a slow reader
    are many seconds; past the bound the request waits in the gateway queue (fair share).
    Load no gateway sent (`external`: direct clients, or a 429 marking it saturated) has no
    estimate, so with any of it the count alone decides."""
    if w.load < w.slots_total + allowance:
        return False
    return w.external > 0 or wait(w, job, now) > seconds


def finish(w: Worker, job: Job, now: float, cached: bool = False) -> float:
    """Expected seconds until the job is done on `w`, were it sent there now."""
    load = w.load
    slots = w.slots_total
    in_slots = load if load < slots else slots
    return (wait(w, job, now) + reads(w, job, cached)
            + job.completion_tokens / w.decode_rate * (1.0 + DRAG * in_slots))


def reserve(w: Worker, job: Job, now: float, cached: bool = False) -> None:
    """The job goes to `w`: its prompt joins the worker's reading backlog."""
    w.reader_free = max(w.reader_free, now) + reads(w, job, cached)
