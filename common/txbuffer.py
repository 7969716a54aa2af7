"""A per-transaction buffer: what a workflow records while its transaction is open, handed
over in one piece just before it ends (the audit rows, the webhook outbox rows). An item added
inside a savepoint that later rolls back is dropped with it, as the INSERT it stands for would
have been.

`insert_batch()` goes one step further: the buffers that end inside it hand their rows to it
(`insert_rows`) instead of inserting them, and it writes the rows of every table with one
statement when it ends (`common.db.insert_many`): a workflow's audit rows and webhook outbox
rows are one INSERT … INSERT statement, not one per table."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.db import transaction

from common.db import insert_many


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


_batch = threading.local()


def insert_rows(rows: list) -> None:
    """Insert the unsaved `rows` (one model): inside an `insert_batch()` with the batch's
    other rows when it ends (rows given inside a savepoint that rolls back are dropped with
    it), else at once (one multi-row INSERT)."""
    if not rows:
        return
    buffer = current(_batch)
    if buffer is not None:
        buffer.add(list(rows))
    else:
        insert_many(rows)


def insert_batch():
    """The rows given to `insert_rows` inside the block are written by one statement when it
    ends (`common.db.insert_many`: one multi-row INSERT per list, in the order given), still
    inside the caller's transaction (open it inside `transaction.atomic()`; outside a
    transaction it does nothing). A batch inside a batch joins the outer one; on an exception
    nothing is written (the transaction rolls back). Open it around the buffers that flush
    into it (`workflows.unit`)."""
    return transaction_buffer(_batch, lambda groups: insert_many(*groups))
