from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.models import DeliveryAuditLog
from common.actors import Actor

_local = threading.local()


class _Buffer:
    """The audit rows of one workflow's transaction, written by one INSERT before commit."""

    def __init__(self, connection):
        self.connection = connection
        self.start_sids = set(connection.savepoint_ids)
        self.rows: list[tuple[DeliveryAuditLog, object | None]] = []  # (row, savepoint marker)

    def add(self, row: DeliveryAuditLog) -> None:
        marker = None
        if set(self.connection.savepoint_ids) - self.start_sids:
            # Written inside a savepoint opened within the buffer: Django drops this marker if
            # that savepoint rolls back, and the row goes with it, as an INSERT there would.
            def marker():
                return None

            transaction.on_commit(marker)
        self.rows.append((row, marker))

    def flush(self) -> list[DeliveryAuditLog]:
        pending = {id(func) for _, func, _ in self.connection.run_on_commit}
        rows = [row for row, marker in self.rows if marker is None or id(marker) in pending]
        self.rows = []
        if rows:
            # One multi-row INSERT; `seq` (nextval) is drawn row by row in list order, so the
            # timeline reads in the order the rows were recorded.
            DeliveryAuditLog.objects.bulk_create(rows)
        return rows


@contextmanager
def audit_buffer():
    """Collect the rows `audit_record` writes inside and insert them with one statement when
    the block ends, still inside the caller's transaction (so open it inside the workflow's
    `transaction.atomic()`; outside a transaction it does nothing). A buffer inside a buffer
    joins the outer one; on an exception nothing is written (the transaction rolls back)."""
    outer = getattr(_local, "buffer", None)
    connection = transaction.get_connection()
    if outer is not None or not connection.in_atomic_block:
        yield outer
        return
    buffer = _Buffer(connection)
    _local.buffer = buffer
    try:
        yield buffer
    finally:
        _local.buffer = None
    buffer.flush()


def audit_record(
    *, delivery, event_type: str, actor: Actor, details: dict[str, Any] | None = None, now: datetime | None = None
) -> DeliveryAuditLog:
    """Append one audit row. Call it inside the transaction that makes the change (inside an
    `audit_buffer()` the row is written when the buffer ends, before commit)."""
    row = DeliveryAuditLog(
        delivery=delivery,
        timestamp=now or timezone.now(),
        event_type=event_type,
        actor_id=actor.id,
        actor_type=actor.type,
        details=details or {},
    )
    buffer = getattr(_local, "buffer", None)
    if buffer is not None:
        buffer.add(row)
    else:
        row.save(force_insert=True)
    return row
