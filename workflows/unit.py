"""The transaction of a workflow: one atomic block whose audit rows (`audit_buffer`) and webhook
outbox rows (`outbox_buffer`) are written by one statement before commit (`insert_batch`: a
multi-row INSERT per table, both in one WITH), and whose live events go out together after
commit (`broadcast_batch`)."""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime

from django.db import transaction

from audit.services import audit_buffer
from common.broadcast import broadcast_batch, enqueue_task_on_commit
from common.errors import iso
from common.txbuffer import insert_batch
from notifications.outbox import outbox_buffer


@contextmanager
def unit_of_work():
    """`with unit_of_work():` or `@unit_of_work()` in place of `transaction.atomic`."""
    with transaction.atomic(), broadcast_batch(), insert_batch(), audit_buffer(), outbox_buffer():
        yield


def eta_refresh_enqueue(delivery_id, *, now: datetime) -> None:
    """After commit, a worker refreshes the delivery's ETA and tells the customer (the legs it
    covers changed with the status): the request itself sends no SQL for it."""
    enqueue_task_on_commit("tracking.refresh_eta", str(delivery_id), iso(now))
