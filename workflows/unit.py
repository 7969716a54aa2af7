"""The transaction of a workflow: one atomic block whose audit rows (`audit_buffer`) and webhook
outbox rows (`outbox_buffer`) are written by one statement before commit (`insert_batch`: a
multi-row INSERT per table, both in one WITH), and whose live events go out together after
commit (`broadcast_batch`)."""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime

from django.conf import settings
from django.db import transaction

from audit.services import audit_buffer
from common.broadcast import broadcast_batch, enqueue_due_on_commit
from common.errors import iso
from common.txbuffer import insert_batch
from notifications.outbox import outbox_buffer
from tracking.services import ETA_DUE_KEY, ETA_REFRESH_DUE_TASK, ETA_REFRESH_TASK


@contextmanager
def unit_of_work():
    """`with unit_of_work():` or `@unit_of_work()` in place of `transaction.atomic`."""
    with transaction.atomic(), broadcast_batch(), insert_batch(), audit_buffer(), outbox_buffer():
        yield


def eta_refresh_enqueue(delivery_id, *, now: datetime) -> None:
    """After commit, a worker refreshes the delivery's ETA and tells the customer (the legs it
    covers changed with the status): the request itself sends no SQL for it, and no Celery
    message either: the delivery is marked due in Redis and one `tracking.refresh_due_etas`
    takes every delivery marked since it last ran, `ETA_REFRESH_BATCH_SECONDS` after the first
    (`common.broadcast.enqueue_due_on_commit`)."""
    delivery_id, at = str(delivery_id), iso(now)
    enqueue_due_on_commit(
        ETA_REFRESH_DUE_TASK, ETA_DUE_KEY, delivery_id, at, fallback=(ETA_REFRESH_TASK, (delivery_id, at)),
        countdown=settings.ETA_REFRESH_BATCH_SECONDS,
    )
