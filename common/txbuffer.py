"""A per-transaction buffer: what a workflow records while its transaction is open, handed
over in one piece just before it ends (the audit rows, the webhook outbox rows: one INSERT
each instead of one per row). An item added inside a savepoint that later rolls back is
dropped with it, as the INSERT it stands for would have been."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.db import transaction


class TransactionBuffer:
    def __init__(self, connection):
        self.connection = connection
        self.start_sids = set(connection.savepoint_ids)
        self.items: list[tuple[object, object | None]] = []  # (item, savepoint marker)

    def add(self, item) -> None:
        marker = None
        if set(self.connection.savepoint_ids) - self.start_sids:
            # Added inside a savepoint opened within the buffer: Django drops this marker if that
            # savepoint rolls back, and the item goes with it.
            def marker():
                return None

            transaction.on_commit(marker)
        self.items.append((item, marker))

    def take(self) -> list:
        """The items whose savepoints are still alive, in the order added; empties the buffer."""
        pending = {id(func) for _, func, _ in self.connection.run_on_commit}
        items = [item for item, marker in self.items if marker is None or id(marker) in pending]
        self.items = []
        return items


def current(local: threading.local) -> TransactionBuffer | None:
    return getattr(local, "buffer", None)


@contextmanager
def transaction_buffer(local: threading.local, flush: Callable[[list], object]) -> Iterator[TransactionBuffer | None]:
    """Collect items (`current(local).add`) inside the block and pass them to `flush` when it
    ends, still inside the caller's transaction (open it inside `transaction.atomic()`; outside
    a transaction it does nothing). A buffer inside a buffer joins the outer one; on an
    exception nothing is flushed (the transaction rolls back)."""
    outer = current(local)
    connection = transaction.get_connection()
    if outer is not None or not connection.in_atomic_block:
        yield outer
        return
    buffer = TransactionBuffer(connection)
    local.buffer = buffer
    try:
        yield buffer
    finally:
        local.buffer = None
    flush(buffer.take())
