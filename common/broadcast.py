"""Side effects after commit: socket broadcasts and Celery enqueues (STYLE rule 4)."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)

OPS_GROUP = "ops"


def driver_group(driver_id) -> str:
    return f"driver.{driver_id}"


def delivery_group(delivery_id) -> str:
    return f"delivery.{delivery_id}"


def send_now(groups: Iterable[str], event: Mapping[str, Any]) -> None:
    """Send one event to groups; a channel-layer failure is logged, never raised."""
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": event["type"], "event": dict(event)}
    for group in groups:
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception:  # Redis down or full: live events are best-effort
            logger.warning("broadcast to %s failed for %s", group, event["type"], exc_info=True)


def broadcast_on_commit(groups: Iterable[str], event: Mapping[str, Any]) -> None:
    """Send `event` to `groups` once the current transaction commits (at once outside one)."""
    groups = list(groups)
    payload = dict(event)
    transaction.on_commit(lambda: send_now(groups, payload), robust=True)


def enqueue_on_commit(task, *args, **kwargs) -> None:
    """`task.apply_async(args, **kwargs)` after commit; a broker failure is logged."""

    def _send():
        try:
            task.apply_async(args=args, **kwargs)
        except Exception:
            logger.warning("enqueue of %s failed", getattr(task, "name", task), exc_info=True)

    transaction.on_commit(_send, robust=True)
