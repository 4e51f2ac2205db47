"""Fair share of a saturated cluster: waiting requests are served across users in turn.

Deficit round-robin with one request as the unit of cost (so: round-robin over users,
first come first served within a user). Each user with waiting requests has its own FIFO;
the users form a rotation. `in_order` interleaves them — the head of every user's queue in
rotation order, then every user's second, and so on — and a user whose request leaves the
queue (served, or gone) moves to the back of the rotation. A user firing 100 requests
therefore waits behind everyone else's *next* request, and a colleague's single request
is next in line as soon as the flooding user has been served once.

Same interface as `admission.FifoQueue`: `put`, `remove`, `in_order`, `len()`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

from gateway.waiter import Waiter

ANONYMOUS = ""


class FairQueue:
    def __init__(self) -> None:
        self._users: OrderedDict[str, deque[Waiter]] = OrderedDict()  # rotation order
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def put(self, w: Waiter) -> None:
        u = w.user or ANONYMOUS
        q = self._users.get(u)
        if q is None:
            q = self._users[u] = deque()  # a newly waiting user joins at the back
        q.append(w)
        self._n += 1

    def remove(self, w: Waiter) -> None:
        u = w.user or ANONYMOUS
        q = self._users.get(u)
        if q is None:
            return
        try:
            q.remove(w)  # O(1) in the common case: the head of the user's queue
        except ValueError:
            return
        self._n -= 1
        if q:
            self._users.move_to_end(u)  # had a turn: the others go first
        else:
            del self._users[u]

    def in_order(self) -> Iterator[Waiter]:
        """Waiters in the order they should be served (a snapshot; removal is safe)."""
        queues = [list(q) for q in self._users.values()]
        out: list[Waiter] = []
        depth = 0
        while queues:
            alive = []
            for q in queues:
                out.append(q[depth])
                if len(q) > depth + 1:
                    alive.append(q)
            queues = alive
            depth += 1
        return iter(out)

    def users(self) -> dict[str, int]:
        """Waiting requests per user (for introspection and tests)."""
        return {u: len(q) for u, q in self._users.items()}
