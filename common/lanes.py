"""A fair lane: N turns shared among callers so that one caller's burst cannot keep another
waiting behind all of it: `FairLane` on one event loop (config.asgi: the proof-upload lane),
`FairGate` for threads (dispatch.proofs: the decode slots inside that lane; a first-come gate
there undid the lane's fairness, a burst's queued decodes still went first).

A turn that comes free goes to the waiting caller holding the fewest turns, the one that has
waited longest among equals; a caller alone takes every free turn (nothing is held back when
nobody else waits). `seat(key)` gives one caller's view of the lane with a Semaphore's
`locked()` / `acquire()` / `release()`, so a caller waiting for its turn can be cancelled (its
client gone): a cancelled waiter leaves the queue, and one cancelled just after it was given
a turn hands the turn on.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter, deque


class FairLane:
    def __init__(self, size: int):
        self.size = size
        self.busy = 0
        self.held: Counter = Counter()  # turns each caller holds
        self.waiting: dict[object, deque] = {}  # a caller's waiters, oldest first: (arrival, future)
        self._arrivals = itertools.count()

    def locked(self) -> bool:
        """Every turn taken."""
        return self.busy >= self.size

    def seat(self, key) -> Seat:
        return Seat(self, key)

    def _take(self, key) -> None:
        self.busy += 1
        self.held[key] += 1

    def _give_back(self, key) -> None:
        self.busy -= 1
        self.held[key] -= 1
        if not self.held[key]:
            del self.held[key]
        self._hand_on()

    def _hand_on(self) -> None:
        """Free turns to the waiters: each to the caller holding the fewest, longest waiting among equals."""
        while self.busy < self.size and self.waiting:
            key = _next_caller(self.held, {k: queue[0][0] for k, queue in self.waiting.items()})
            queue = self.waiting[key]
            _, future = queue.popleft()
            if not queue:
                del self.waiting[key]
            if future.done():  # (cancelled: its caller left)
                continue
            self._take(key)
            future.set_result(True)

    def _leave(self, key, entry) -> None:
        queue = self.waiting.get(key)
        if queue is not None and entry in queue:
            queue.remove(entry)
            if not queue:
                del self.waiting[key]


def _next_caller(held: Counter, first_arrival: dict):
    """The waiting caller a free turn goes to: the one holding the fewest turns, the one whose
    first waiter came first among equals."""
    return min(first_arrival, key=lambda key: (held[key], first_arrival[key]))


class FairGate:
    """FairLane's rule for threads: `acquire(key, timeout)` (False if no turn came in time) and
    `release(key)`."""

    def __init__(self, size: int):
        self.size = size
        self.busy = 0
        self.held: Counter = Counter()
        self.waiting: list[tuple[int, object, threading.Event]] = []  # (arrival, caller, its wake-up)
        self._lock = threading.Lock()
        self._arrivals = itertools.count()

    def acquire(self, key, timeout: float) -> bool:
        with self._lock:
            if self.busy < self.size and not self.waiting:
                self._take(key)
                return True
            entry = (next(self._arrivals), key, threading.Event())
            self.waiting.append(entry)
        if entry[2].wait(timeout):
            return True
        with self._lock:
            if entry[2].is_set():  # (given a turn just as the wait ran out: it is ours)
                return True
            self.waiting.remove(entry)
            return False

    def release(self, key) -> None:
        with self._lock:
            self.busy -= 1
            self.held[key] -= 1
            if not self.held[key]:
                del self.held[key]
            while self.busy < self.size and self.waiting:
                firsts = {}
                for arrival, caller, _ in self.waiting:
                    firsts.setdefault(caller, arrival)
                chosen = _next_caller(self.held, firsts)
                entry = next(e for e in self.waiting if e[1] == chosen)
                self.waiting.remove(entry)
                self._take(chosen)
                entry[2].set()

    def _take(self, key) -> None:
        self.busy += 1
        self.held[key] += 1


class Seat:
    """One caller's view of a FairLane, as a Semaphore."""

    def __init__(self, lane: FairLane, key):
        self.lane, self.key = lane, key

    def locked(self) -> bool:
        """No turn for this caller now: every turn taken, or others wait before it."""
        lane = self.lane
        return lane.busy >= lane.size or any(not f.done() for queue in lane.waiting.values() for _, f in queue)

    async def acquire(self) -> bool:
        lane = self.lane
        if not self.locked():
            lane._take(self.key)
            return True
        entry = (next(lane._arrivals), asyncio.get_running_loop().create_future())
        lane.waiting.setdefault(self.key, deque()).append(entry)
        lane._hand_on()  # (a turn free behind waiters who have left: taken at once)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                lane._give_back(self.key)  # given a turn as it was cancelled: handed on
            else:
                lane._leave(self.key, entry)
            raise
        return True

    def release(self) -> None:
        self.lane._give_back(self.key)
