"""Keeping each search's deadline: how many rerank pairs fit (a running estimate of the cost of one pair),
and who runs the model next when searches queue for the cores (the earliest deadline).

The estimate rises fast (half way to a slower sample), so load is felt within a batch or two, and falls
more slowly (0.3 of the way to a faster one). It must never lock reranking out: a `max` rule that
kept the slowest sample let one slow batch (1.1 s for 10 pairs on a 2-core CPU) raise the estimate above
the budget, after which no search reranked, so nothing was measured and the estimate never came down.
Now a search that cannot afford a full batch reranks the pairs that fit (and measures them), and a search
that can afford none lowers the estimate a little, so a later search measures again.

Under concurrent load the searches take turns on the model (`DeadlineLock`): overlapping runs on the
same cores only slow each other, and a batch priced before a wait would overrun. The turn goes to the
earliest deadline, so a search that has waited longest finishes first and a newer one, seeing less time
left once its turn comes, reranks fewer candidates instead of missing its deadline.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from contextlib import contextmanager
from typing import Iterator


class PairCost:
    """Thread-safe: every search of one Retriever shares it."""

    RISE = 0.5
    FALL = 0.3
    RELAX = 0.9

    def __init__(self) -> None:
        self._ms: float | None = None
        self._lock = threading.Lock()

    @property
    def ms_per_pair(self) -> float | None:
        return self._ms

    def observe(self, ms_per_pair: float) -> None:
        with self._lock:
            if self._ms is None:
                self._ms = ms_per_pair
            else:
                rate = self.RISE if ms_per_pair > self._ms else self.FALL
                self._ms += rate * (ms_per_pair - self._ms)

    def affordable(self, remaining_ms: float, wanted: int) -> int:
        """Pairs (at most `wanted`) that fit in `remaining_ms`; all of them before the first measurement."""
        if remaining_ms <= 0:
            return 0
        with self._lock:
            ms = self._ms
        if ms is None or ms <= 0:
            return wanted
        fit = remaining_ms / ms  # inf with no deadline (the sweep measures the full cost)
        return wanted if fit >= wanted else max(0, int(fit))

    def relax(self) -> None:
        """A search reranked nothing on the estimate's word alone: lower it so a later one measures again."""
        with self._lock:
            if self._ms is not None:
                self._ms *= self.RELAX


class DeadlineLock:
    """A mutex whose waiters are served earliest deadline first (ties in arrival order), not at random."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._held = False
        self._waiting: list[tuple[float, int]] = []
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    def acquire(self, deadline: float) -> None:
        with self._condition:
            ticket = (deadline, next(self._arrivals))
            heapq.heappush(self._waiting, ticket)
            while self._held or self._waiting[0] != ticket:
                self._condition.wait()
            heapq.heappop(self._waiting)
            self._held = True

    def release(self) -> None:
        with self._condition:
            if not self._held:
                raise RuntimeError("DeadlineLock released while not held")
            self._held = False
            self._condition.notify_all()

    @contextmanager
    def turn(self, deadline: float) -> Iterator[None]:
        self.acquire(deadline)
        try:
            yield
        finally:
            self.release()
