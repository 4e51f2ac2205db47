"""The load-time batch-invariance probe (worker/backends/invariance.py), in-process.

The real backends run the probe at load (the llama one once per configuration of a host,
test_worker_llama.py) and report it in /status (test_worker_api.py checks it there against
real batched output); here a stepping fake whose text may depend on its batch company shows
the probe tells the two cases apart, deterministically, and that a kept verdict is read back
for its own key only.
"""

from __future__ import annotations

import threading

from worker.backends.base import Sequence
from worker.backends.invariance import STAGGER, measure, probe


class SteppingBackend:
    """Decodes every running sequence one token per step, like a batching backend.

    The probe decodes each prompt alone, then all of them again with staggered starts. A
    prompt seen before marks that second pass: there, after the first sequence's
    k x STAGGER-th token, the fake waits (bounded) for the k-th newcomer, so the joins
    overlap deterministically. With `company`, a token decoded in a batch reads "b", not "a".
    """

    def __init__(self, company: bool) -> None:
        self.company = company
        self.cv = threading.Condition()
        self.incoming: list[Sequence] = []
        self.seen: list[tuple[int, ...]] = []
        self.running = False

    def submit(self, seq: Sequence) -> None:
        with self.cv:
            self.incoming.append(seq)
            self.cv.notify_all()
            if self.running:
                return
            self.running = True
        threading.Thread(target=self._loop, daemon=True).start()

    def _take(self, running: list[list]) -> None:
        for s in self.incoming:
            if tuple(s.prompt) not in self.seen:
                self.seen.append(tuple(s.prompt))
            running.append([s, 0])
        self.incoming.clear()

    def _loop(self) -> None:
        running: list[list] = []  # [sequence, tokens produced]
        with self.cv:
            again = tuple(self.incoming[0].prompt) in self.seen
            self._take(running)
        expected = len(self.seen) if again else 1
        joined = 1
        while True:
            with self.cv:
                head = running[0][1] if running else 0
                if joined < expected and head >= STAGGER * joined:
                    self.cv.wait_for(lambda: self.incoming, timeout=10)
                joined += len(self.incoming)
                self._take(running)
                if not running:
                    self.running = False
                    return
            text = "b" if self.company and len(running) > 1 else "a"
            for item in list(running):
                item[0].on_tokens(text, 1)
                item[1] += 1
                if item[1] >= item[0].max_tokens:
                    running.remove(item)
                    item[0].on_finish("length", None)


def _tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_the_probe_passes_a_batch_invariant_backend() -> None:
    v = measure(SteppingBackend(company=False).submit, _tokenize, str, slots=4, timeout=30)
    assert v.invariant is True, v.detail


def test_the_probe_catches_output_that_depends_on_batch_company() -> None:
    v = measure(SteppingBackend(company=True).submit, _tokenize, str, slots=4, timeout=30)
    assert v.invariant is False
    assert "prompt 0 differs at character" in v.detail


def test_one_slot_is_invariant_by_construction() -> None:
    cleaned = threading.Event()
    v = measure(SteppingBackend(company=True).submit, _tokenize, str, slots=1,
                on_last_finish=cleaned.set, timeout=30)
    assert v.invariant is True
    assert cleaned.is_set()  # the cleanup hook still runs on the backend's thread


class _Backend:
    """What `probe` reads of a backend, over the stepping fake."""

    name = "fake"
    slots = 4
    batch_invariant = None

    def __init__(self, company: bool) -> None:
        self.fake = SteppingBackend(company)
        self.submits = 0

    def submit(self, seq: Sequence) -> None:
        self.submits += 1
        self.fake.submit(seq)

    def tokenize(self, text: str) -> list[int]:
        return _tokenize(text)

    def render_chat(self, messages: list[dict]) -> str:
        return messages[-1]["content"]


def test_a_verdict_is_kept_per_key_and_read_back(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = {"backend": "fake", "threads": 2}
    first = _Backend(company=True)
    probe(first, first.submit, key=key)
    assert first.batch_invariant is False and first.submits == 8  # 4 alone, 4 together
    again = _Backend(company=False)  # would measure True: the kept verdict is read instead
    cleaned = threading.Event()
    probe(again, again.submit, on_last_finish=cleaned.set, key=key)
    assert again.batch_invariant is False and again.submits == 1
    assert cleaned.is_set()  # the probe's cleanup still ran on the backend's thread
    other = _Backend(company=False)
    probe(other, other.submit, key={**key, "threads": 1})  # another key: measured
    assert other.batch_invariant is True and other.submits == 8
    assert len(list((tmp_path / "corral" / "invariance").glob("*.json"))) == 2
