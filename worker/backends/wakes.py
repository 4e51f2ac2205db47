"""Event-loop wake-ups a decode thread holds back until it lets go of the GIL.

A decode step hands its tokens to the event loop (`engine._Handoff`), which wakes the
loop through its self-pipe. Woken between two `llama_decode`s, the loop asks for the GIL
while the decode thread still has the step's Python to run, and takes it at the next call
that lets go (a numpy argmax, the self-pipe write of the next sequence's hand-off): the
step then waits until the loop has written every chunk it was given (~0.2 ms each, most of
it the kernel's loopback send). Held back to the moment the thread calls `llama_decode`,
the wake-up lands while the thread computes without the GIL, and the step runs as one
stretch of Python, as it does in-process (served c=4 step gap 1150 -> 750 us). The
writing itself still takes a core from llama.cpp's threads when none is spare (2 cores,
2 threads: tokens per second did not move); what goes is the step's waiting and the
wake-ups per sequence. A token reaches its client a gap later (a few hundred
microseconds), at the next step's start.

The decode thread `hold()`s, and `flush()`es right before each `llama_decode` and before
it waits for work; any other thread (and this one when not holding) wakes at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_local = threading.local()


def hold() -> None:
    """From now on, wake-ups asked for on this thread wait for `flush()`."""
    if getattr(_local, "pending", None) is None:
        _local.pending = []


def flush() -> None:
    """Runs the wake-ups held back so far, in order; holding goes on."""
    pending = getattr(_local, "pending", None)
    if not pending:
        return
    _local.pending = []
    for wake in pending:
        wake()


def release() -> None:
    """Runs what is held back and stops holding (the thread is leaving)."""
    flush()
    _local.pending = None


def wake(fn: Callable[[], None]) -> None:
    """Calls `fn` now, or at this thread's next `flush()` if it holds."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        fn()
    else:
        pending.append(fn)
