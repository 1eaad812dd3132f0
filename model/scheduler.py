"""Which waiting sequence takes the next free slot: priority, then age, a cap per group.

Sequences belong to groups (the worker's groups are jobs; `gencli generate` has one). Each group
keeps its sequences in a FIFO; the next admission goes to the group whose first waiting sequence
has the highest priority, then the earliest arrival, among the groups under their cap of running
sequences. The cap is what keeps a 10,000-line job from holding every slot while a 1-line job
waits. A sequence preempted to free memory goes back to the front of its group, keeping its
arrival, so it is the first of its group to be admitted again.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Protocol


class Waiting(Protocol):
    group: Hashable
    priority: int
    arrival: int


class Scheduler:
    def __init__(self, max_per_group: int | None = None):
        self.max_per_group = max_per_group  # None: no cap
        self._queues: dict[Hashable, deque] = {}
        self._running: dict[Hashable, int] = {}
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator:
        for q in self._queues.values():
            yield from q

    def add(self, seq: Waiting) -> None:
        seq.arrival = next(self._arrivals)
        self._queues.setdefault(seq.group, deque()).append(seq)

    def put_back(self, seq: Waiting) -> None:
        """A preempted sequence (released already): first of its group again, its arrival kept."""
        q = self._queues.setdefault(seq.group, deque())
        k = 0
        while k < len(q) and q[k].arrival < seq.arrival:
            k += 1
        q.insert(k, seq)

    def next(self):
        """The sequence to admit now (taken off the queue and counted as running), or None."""
        best = None
        for group, q in self._queues.items():
            if not q:
                continue
            if self.max_per_group is not None and self._running.get(group, 0) >= self.max_per_group:
                continue
            head = q[0]
            if best is None or (-head.priority, head.arrival) < (-best.priority, best.arrival):
                best = head
        if best is not None:
            q = self._queues[best.group]
            q.popleft()
            if not q:
                del self._queues[best.group]
            self._running[best.group] = self._running.get(best.group, 0) + 1
        return best

    def released(self, seq: Waiting) -> None:
        """A running sequence left its slot (finished, cancelled, preempted)."""
        n = self._running.get(seq.group, 0) - 1
        if n > 0:
            self._running[seq.group] = n
        else:
            self._running.pop(seq.group, None)

    def drop(self, seq: Waiting) -> bool:
        """Take a waiting sequence off its queue; False when it was not waiting."""
        q = self._queues.get(seq.group)
        if q is None or seq not in q:
            return False
        q.remove(seq)
        if not q:
            del self._queues[seq.group]
        return True
