from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from django.utils import timezone

from audit.models import DeliveryAuditLog
from common.actors import Actor
from common.txbuffer import current, insert_rows, transaction_buffer

_local = threading.local()


def _insert(rows: list[DeliveryAuditLog]) -> None:
    # One multi-row INSERT (inside a workflow's `insert_batch`, in the statement that writes
    # its outbox rows too); `seq` (nextval) is drawn row by row in list order, so the timeline
    # reads in the order the rows were recorded.
    insert_rows(rows)


def audit_buffer():
    """Collect the rows `audit_record` writes inside and insert them with one statement when
    the block ends, still inside the caller's transaction (so open it inside the workflow's
    `transaction.atomic()`; outside a transaction it does nothing). A buffer inside a buffer
    joins the outer one; on an exception nothing is written (the transaction rolls back)."""
    return transaction_buffer(_local, _insert)


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
    buffer = current(_local)
    if buffer is not None:
        buffer.add(row)
    else:
        row.save(force_insert=True)
    return row
