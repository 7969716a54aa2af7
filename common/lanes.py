"""A fair lane: N turns on one event loop, shared among callers so that one caller's burst
cannot keep another waiting behind all of it (config.asgi: the proof-upload lane).

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
            key = min(self.waiting, key=lambda k: (self.held[k], self.waiting[k][0][0]))
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
