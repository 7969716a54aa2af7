"""Side effects after commit: socket broadcasts and Celery enqueues (STYLE rule 4)."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from asgiref.sync import async_to_sync
from celery import current_app
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


def enqueue_task_on_commit(name: str, *args, **options) -> None:
    """Enqueue the registered Celery task `name` after commit (a broker failure is logged).

    By name, so a lower layer can schedule work whose task lives in an interface module
    (tasks call workflows; workflows and services schedule tasks) without importing it."""

    def _send():
        try:
            _registered_task(name).apply_async(args=args, **options)
        except Exception:
            logger.warning("enqueue of %s failed", name, exc_info=True)

    transaction.on_commit(_send, robust=True)


def _registered_task(name: str):
    tasks = current_app.tasks
    if name not in tasks:
        # Outside a worker the apps' tasks modules load lazily: autodiscover them once.
        current_app.loader.import_default_modules()
    return tasks[name]
