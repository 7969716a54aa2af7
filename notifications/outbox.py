"""The transactional outbox: every live event about a delivery that a service emits
(`common.broadcast.broadcast_on_commit`, offered here through `common.hooks.event_emitted`)
becomes a webhook event row in the same transaction as the change. It commits with the change
or not at all; a worker delivers it after commit (`notifications.deliver_webhooks`, enqueued
on commit, plus a sweep for what that missed: Redis or Celery down at commit, a worker killed
before it sent).

Inside a workflow's `unit_of_work()` (`outbox_buffer`) the rows of the transaction are written
together just before commit: one SELECT of the deliveries (their representation at the end of
the change) and one INSERT, in the order emitted (`seq`). Outside a buffer each event is
written at once, in the caller's transaction if one is open.
"""
from __future__ import annotations

import threading
import uuid
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from common.broadcast import enqueue_task_on_commit
from common.txbuffer import current, transaction_buffer
from common.errors import iso
from dispatch.models import DeliveryStatus
from notifications.models import OutboxEvent
from notifications.payloads import deliveries_for_payload, render_delivery, webhook_body

DELIVER_TASK = "notifications.deliver_webhooks"
ETA_TYPE = "delivery.eta_updated"
# Not a live event: pickup-started changes no status and emits none, yet merchants are told of
# it (`outbox_pickup_started`). Only the outbox knows this type; no socket ever carries it.
PICKUP_STARTED = "delivery_pickup_started"
_SKIP_KEYS = {"type", "deliveryId", "sellerOrderId"}

_local = threading.local()


def webhook_type_for(event: dict) -> str | None:
    """The webhook event type of a live event, or None when merchants are not told of it."""
    kind = event.get("type")
    if kind == "delivery_created":
        return "delivery.created"
    if kind == "delivery_status_changed":
        if event.get("status") == DeliveryStatus.ASSIGNED:
            return "delivery.assigned"
        if event.get("status") == DeliveryStatus.READY:
            return "delivery.unassigned"  # ops took it away from its driver: waiting for another
        return "delivery.status_changed"
    if kind in ("delivery_cancelled", PICKUP_STARTED):
        return "delivery.status_changed"
    if kind == "delivery_eta_updated":
        return ETA_TYPE
    if kind == "unassigned_order_escalated":
        return "delivery.escalated"
    if kind == "delivery_proof_added":
        return "delivery.proof_added"
    return None


def _change(event: dict) -> dict:
    change = {k: v for k, v in event.items() if k not in _SKIP_KEYS}
    if event.get("type") == "delivery_cancelled":
        change["status"] = DeliveryStatus.CANCELLED
    return change


def outbox_buffer():
    """Collect the events emitted inside and write their outbox rows when the block ends,
    still inside the caller's transaction (open it inside `transaction.atomic()`). A buffer
    inside a buffer joins the outer one; on an exception nothing is written."""
    return transaction_buffer(_local, outbox_write)


def outbox_capture(event: dict) -> None:
    """The `common.hooks.on_event_emitted` handler: keep the events merchants are told of."""
    if webhook_type_for(event) is None or not event.get("deliveryId"):
        return
    buffer = current(_local)
    if buffer is not None:
        buffer.add(dict(event))
    else:
        outbox_write([dict(event)])


def outbox_pickup_started(delivery, *, driver_id, started_at, reason: str = "") -> None:
    """The driver started the pickup (the status stays `assigned`): a `delivery.status_changed`
    whose change has the fields of a status change plus `step` and `pickupStartedAt`. Written
    like a captured event: with the workflow's buffered rows, or at once in the caller's
    transaction."""
    event = {
        "type": PICKUP_STARTED,
        "deliveryId": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "step": "pickup_started",
        "fromStatus": delivery.status,
        "status": delivery.status,
        "driverId": str(driver_id) if driver_id else None,
        "changedAt": iso(started_at),
        "pickupStartedAt": iso(started_at),
    }
    if reason:
        event["reason"] = reason
    outbox_capture(event)


def outbox_write(events: list[dict]) -> list[OutboxEvent]:
    """Write the outbox rows of `events` (live events about deliveries), in order, and have a
    worker deliver them after commit. ETA updates go out at most once per
    `WEBHOOK_ETA_MIN_INTERVAL_SECONDS` per delivery."""
    if not events:
        return []
    now = timezone.now()
    deliveries = deliveries_for_payload({e["deliveryId"] for e in events})
    throttled = _eta_throttled({e["deliveryId"] for e in events if webhook_type_for(e) == ETA_TYPE}, now=now)
    rows = []
    for event in events:
        kind = webhook_type_for(event)
        delivery = deliveries.get(event["deliveryId"])
        if delivery is None or (kind == ETA_TYPE and event["deliveryId"] in throttled):
            continue
        if kind == ETA_TYPE:
            throttled.add(event["deliveryId"])  # one per delivery and transaction as well
        event_id = uuid.uuid4()
        data = {**render_delivery(delivery), "change": _change(event)}
        rows.append(OutboxEvent(
            event_id=event_id, type=kind, delivery_id=delivery.pk, owner_id=delivery.created_by_id, created_at=now,
            payload=webhook_body(webhook_id=f"msg_{event_id.hex}", type=kind, created_at=now, data=data),
        ))
    if rows:
        OutboxEvent.objects.bulk_create(rows)  # `seq` drawn row by row, in list order
        enqueue_task_on_commit(DELIVER_TASK)
    return rows


def _eta_throttled(delivery_ids: set[str], *, now) -> set[str]:
    if not delivery_ids:
        return set()
    since = now - timedelta(seconds=settings.WEBHOOK_ETA_MIN_INTERVAL_SECONDS)
    recent = OutboxEvent.objects.filter(delivery_id__in=list(delivery_ids), type=ETA_TYPE, created_at__gt=since)
    return {str(d) for d in recent.values_list("delivery_id", flat=True)}
