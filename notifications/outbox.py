"""The transactional outbox: every live event about a delivery that a service emits
(`common.broadcast.broadcast_on_commit`, offered here through `common.hooks.event_emitted`)
becomes a webhook event row in the same transaction as the change. It commits with the change
or not at all; a worker delivers it after commit (`notifications.deliver_webhooks`, enqueued
on commit, plus a sweep for what that missed: Redis or Celery down at commit, a worker killed
before it sent).

The payload is the delivery as the API shows it to its owner as the change left it, plus the
change. It is rendered in one of two ways, both from the row as the change left it:

- Inside a workflow's `unit_of_work()` (`outbox_buffer`) the rows of the transaction are
  written together just before commit, in the order emitted (`seq`), by the workflow's one
  INSERT statement (`common.txbuffer.insert_batch`, with its audit rows). The delivery is
  rendered from the row the workflow holds when it handed it over (`outbox_hold`: every field
  it changed is set on it, its latest assignment too), else read (one SELECT of the
  deliveries its events are about).
- A change made by one statement (the quick delivery steps, `outbox_row_sql`) writes its row in
  that statement: the envelope and the change are known beforehand, the delivery is not (the
  statement makes it). The row keeps the delivery's row as that statement left it
  (`delivery_row`: `to_jsonb` of the row and its latest assignment) and the worker renders
  the payload from it before fan-out (`outbox_render_pending`). The trade-off: the payload
  is the state at the event, as before, but is only complete once a worker has fanned the
  event out (a reader of the outbox table sees `data.change` alone until then), the JSON
  snapshot is kept until then, and it is rendered by the code the worker runs (after a
  deploy in between: the new serializer, a column added since: null).
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Max, Model
from django.utils import timezone

from common.broadcast import enqueue_kick_on_commit
from common.txbuffer import current, insert_rows, transaction_buffer
from common.errors import iso
from common.redis import RedisFailed, get_redis
from dispatch.models import Assignment, Delivery, DeliveryStatus
from notifications.models import OutboxEvent
from notifications.payloads import deliveries_for_payload, deliveries_from_rows, held_for_payload, render_delivery, webhook_body
from tracking.events import delivery_eta_updated
from tracking.services import TRACKED_STATUSES

logger = logging.getLogger(__name__)

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
        change["changedAt"] = event.get("cancelledAt")  # (as every other status change has it)
    return change


def outbox_buffer():
    """Collect the events emitted inside and write their outbox rows when the block ends,
    still inside the caller's transaction (open it inside `transaction.atomic()`). A buffer
    inside a buffer joins the outer one; on an exception nothing is written."""
    return transaction_buffer(_local, outbox_write)


def outbox_capture(event: dict) -> None:
    """The `common.hooks.on_event_emitted` handler: keep the events merchants are told of
    (except one whose row its statement wrote already: `outbox_written`)."""
    if webhook_type_for(event) is None or not event.get("deliveryId"):
        return
    written = getattr(_local, "written", None)
    if written:
        key = _key(event)
        if key in written:
            written.remove(key)
            return
    buffer = current(_local)
    if buffer is not None:
        buffer.add(dict(event))
    else:
        outbox_write([dict(event)])


def pickup_started_event(*, delivery_id, seller_order_id: str, status: str, driver_id, started_at, reason: str = "") -> dict:
    """The outbox's own event for a started pickup (`outbox_pickup_started`)."""
    event = {
        "type": PICKUP_STARTED,
        "deliveryId": str(delivery_id),
        "sellerOrderId": seller_order_id,
        "step": "pickup_started",
        "fromStatus": status,
        "status": status,
        "driverId": str(driver_id) if driver_id else None,
        "changedAt": iso(started_at),
        "pickupStartedAt": iso(started_at),
    }
    if reason:
        event["reason"] = reason
    return event


def outbox_pickup_started(delivery, *, driver_id, started_at, reason: str = "") -> None:
    """The driver started the pickup (the status stays `assigned`): a `delivery.status_changed`
    whose change has the fields of a status change plus `step` and `pickupStartedAt`. Written
    like a captured event: with the workflow's buffered rows, or at once in the caller's
    transaction."""
    outbox_capture(pickup_started_event(
        delivery_id=delivery.pk, seller_order_id=delivery.seller_order_id, status=delivery.status,
        driver_id=driver_id, started_at=started_at, reason=reason,
    ))


def outbox_hold(delivery: Model) -> None:
    """The workflow holds `delivery` as its transaction will leave it: every field it changes
    is set on this instance, and `latest_assignments` (the latest assignment, or none) too.
    Inside an `outbox_buffer` the payloads of its events are rendered from it when the buffer
    ends, instead of reading the row again (outside a buffer: nothing to do, events are
    written as they come). Dropped with a savepoint that rolls back, as an event is."""
    buffer = current(_local)
    if buffer is not None:
        buffer.add(delivery)


def _key(event: dict) -> tuple:
    return webhook_type_for(event), str(event.get("deliveryId")), json.dumps(_change(event), sort_keys=True)


@contextmanager
def outbox_written(*events: dict):
    """The rows of `events` were written by the statement of the change (`outbox_row_sql`):
    a worker delivers them after commit, and when the workflow emits them inside the block
    they are not written again. Any other event is written as usual."""
    enqueue_kick_on_commit(DELIVER_TASK)
    previous = getattr(_local, "written", None)
    _local.written = [_key(e) for e in events]
    try:
        yield
    finally:
        _local.written = previous


# Writes the outbox row of one event for the delivery row(s) of `{source}` (a CTE of the
# caller's statement: the delivery's row as that statement leaves it), keeping that row and
# its latest assignment (as `deliveries_for_payload` picks it: at the statement's snapshot)
# for the worker to render the payload from.
_ROW_SQL = """
INSERT INTO {outbox} (event_id, type, delivery_id, owner_id, endpoint_id, payload, created_at, fanned_out_at, delivery_row)
SELECT %(ob_event_id)s::uuid, %(ob_type)s::text, src.id, src.created_by_id, NULL, %(ob_payload)s::jsonb,
       %(ob_created_at)s::timestamptz, NULL,
       jsonb_build_object('delivery', to_jsonb(src), 'assignment', (
           SELECT jsonb_build_object('id', a.id, 'driver_id', a.driver_id, 'status', a.status, 'end_reason', a.end_reason)
           FROM {assignment} a WHERE a.delivery_id = src.id ORDER BY a.created_at DESC, a.id DESC LIMIT 1
       ))
FROM {source} src
"""


def outbox_row_sql(event: dict, *, source: str, now: datetime | None = None) -> tuple[str, dict] | None:
    """For a change made by one statement: the data-modifying SQL (`INSERT … SELECT … FROM
    {source}`, to add to that statement as a CTE) that writes the outbox row of `event`, the
    live event the change will emit, for the delivery row of the CTE `source`, and its
    parameters (named `ob_*`). None when merchants are not told of the event. The statement
    writes nothing when `source` is empty. When it wrote the row, emit the event inside
    `outbox_written(event)`.
    ETA updates are throttled by what was sent before, so not written this way."""
    kind = webhook_type_for(event)
    if kind is None or not event.get("deliveryId"):
        return None
    if kind == ETA_TYPE:
        raise ValueError("ETA updates are written by outbox_write (they are throttled)")
    now = now or timezone.now()
    event_id = uuid.uuid4()
    payload = webhook_body(webhook_id=f"msg_{event_id.hex}", type=kind, created_at=now, data={"change": _change(event)})
    sql = _ROW_SQL.format(outbox=OutboxEvent._meta.db_table, assignment=Assignment._meta.db_table, source=source)
    return sql, {
        "ob_event_id": event_id, "ob_type": kind, "ob_payload": json.dumps(payload), "ob_created_at": now,
    }


def outbox_write(items: list) -> list[OutboxEvent]:
    """Write the outbox rows of the events in `items` (live events about deliveries), in
    order, and have a worker deliver them after commit. ETA updates go out at most once per
    `WEBHOOK_ETA_MIN_INTERVAL_SECONDS` per delivery. A delivery in `items` (`outbox_hold`) is
    rendered as it is; the others are read."""
    events = [item for item in items if isinstance(item, dict)]
    if not events:
        return []
    now = timezone.now()
    # The throttle first: an ETA update it drops (most of them: the stream consumer refreshes
    # ETAs more often than merchants hear of them) needs no delivery read and rendered.
    last_sent = _eta_throttled({e["deliveryId"] for e in events if webhook_type_for(e) == ETA_TYPE}, now=now)
    throttled = set(last_sent)
    held_back = {e["deliveryId"]: last_sent[e["deliveryId"]] for e in events
                 if webhook_type_for(e) == ETA_TYPE and e["deliveryId"] in throttled}
    events = [e for e in events if not (webhook_type_for(e) == ETA_TYPE and e["deliveryId"] in throttled)]
    if not events:
        eta_hold_back(held_back)
        return []
    held = {  # without its latest assignment set it is read like the others
        str(item.pk): held_for_payload(item) for item in items
        if not isinstance(item, dict) and getattr(item, "latest_assignments", None) is not None
    }
    deliveries = {key: held[key] for key in {e["deliveryId"] for e in events} if key in held}
    unknown = {e["deliveryId"] for e in events} - set(deliveries)
    if unknown:
        deliveries |= deliveries_for_payload(unknown)
    rows = []
    for event in events:
        kind = webhook_type_for(event)
        delivery = deliveries.get(event["deliveryId"])
        if delivery is None:
            continue
        if kind == ETA_TYPE and event["deliveryId"] in throttled:
            held_back.setdefault(event["deliveryId"], now)  # (a second in this transaction: the latest waits)
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
        insert_rows(rows)  # `seq` drawn row by row, in list order (with the audit rows, in a workflow)
        enqueue_kick_on_commit(DELIVER_TASK)
    eta_hold_back(held_back)
    return rows


def outbox_render_pending(events: list[OutboxEvent]) -> list[OutboxEvent]:
    """Render the payloads still to be rendered (`delivery_row`, see the module docstring) of
    `events` (locked by the caller) and save them; returns the events ready to fan out (an
    event whose row cannot be rendered is logged and left for a later try: the events of its
    delivery after it wait, in order)."""
    pending = [e for e in events if e.delivery_row is not None]
    if not pending:
        return events
    rendered, failed = [], set()
    try:
        with transaction.atomic():  # a row PostgreSQL cannot read back must not stop the others
            deliveries = deliveries_from_rows({e.seq: e.delivery_row for e in pending})
    except DatabaseError:
        deliveries = {}
        for event in pending:
            try:
                with transaction.atomic():
                    deliveries |= deliveries_from_rows({event.seq: event.delivery_row})
            except DatabaseError:
                pass  # logged below, as not rendered
    for event in pending:
        try:
            data = {**render_delivery(deliveries[event.seq]), "change": event.payload["data"]["change"]}
        except Exception:
            logger.exception("webhook event %s: its payload could not be rendered", event.seq)
            failed.add(event.seq)
            continue
        event.payload = {**event.payload, "data": data}
        event.delivery_row = None
        rendered.append(event)
    if rendered:
        OutboxEvent.objects.bulk_update(rendered, ["payload", "delivery_row"])
    return [e for e in events if e.seq not in failed]


def _eta_throttled(delivery_ids: set[str], *, now) -> dict[str, datetime]:
    """The deliveries among `delivery_ids` told of an ETA within the interval: id → when."""
    if not delivery_ids:
        return {}
    since = now - timedelta(seconds=settings.WEBHOOK_ETA_MIN_INTERVAL_SECONDS)
    recent = (OutboxEvent.objects.filter(delivery_id__in=list(delivery_ids), type=ETA_TYPE, created_at__gt=since)
              .values("delivery_id").annotate(last=Max("created_at")).values_list("delivery_id", "last"))
    return {str(d): last for d, last in recent}


# An ETA update the throttle held back is not dropped: its delivery is marked here for the end of
# its interval (a sorted set: delivery id → when it may go), and `eta_updates_held_back_write`
# then writes the delivery's ETA as it is by then, unless it is what merchants were last told.
# Dropped, a pickup inside the minute after the accept (the common case) left the seller with
# the pre-pickup ETA until a later fix moved it again.
ETA_HELD_BACK_KEY = "{webhook-eta}:held-back"
_TAKE_HELD_BACK_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""


def eta_hold_back(last_sent: dict[str, datetime]) -> None:
    """Mark the deliveries whose ETA update was held back (id → when merchants were last told)
    for the end of their interval, once the caller's transaction commits (no Redis call while
    it holds the delivery's row); an earlier mark stays (NX). Redis down: logged, and the
    update is dropped, as before."""
    if not last_sent:
        return
    interval = timedelta(seconds=settings.WEBHOOK_ETA_MIN_INTERVAL_SECONDS)
    _eta_mark({d: (at + interval).timestamp() for d, at in last_sent.items()}, nx=True)


def _eta_mark(due: dict[str, float], *, nx: bool) -> None:
    def mark():
        try:
            get_redis().zadd(ETA_HELD_BACK_KEY, due, nx=nx)
        except RedisFailed:
            logger.warning("could not hold back the ETA updates of %d deliveries for later", len(due), exc_info=True)
    transaction.on_commit(mark, robust=True)


def eta_updates_held_back_write(*, now: datetime | None = None, limit: int = 500) -> int:
    """Write the ETA updates whose interval has ended (`eta_hold_back`): each delivery still
    tracked, with an ETA other than the one in its last ETA update, gets one with its ETA as it
    is now. Run by every webhook sweep and kick (safe in several at once: a mark is taken by
    one). The deliveries are locked while it reads and writes (a step committing meanwhile
    waits, so no ETA goes out after the delivery's final status); one another transaction
    holds is marked again for the next run, as are all of them when the write fails. Returns
    the number of rows written. (The marks' times are the web process's and are compared with
    this one's clock: hosts whose clocks agree, as elsewhere.)"""
    now = now or timezone.now()
    try:
        client = get_redis()
        due = client.register_script(_TAKE_HELD_BACK_LUA)(keys=[ETA_HELD_BACK_KEY], args=[now.timestamp(), limit])
    except RedisFailed:
        logger.warning("could not take the held-back ETA updates", exc_info=True)
        return 0
    ids = [d.decode() if isinstance(d, bytes) else d for d in due]
    if not ids:
        return 0
    try:
        with transaction.atomic():
            return _eta_held_back_write_locked(ids, now=now)
    except Exception:
        _eta_mark(dict.fromkeys(ids, now.timestamp()), nx=True)  # (after the rollback: outside any transaction)
        raise


def _eta_held_back_write_locked(ids: list[str], *, now: datetime) -> int:
    rows = list(
        Delivery.objects.select_for_update(of=("self",), skip_locked=True).filter(pk__in=ids).order_by("pk")
        .values_list("pk", "status", "eta_pickup_at", "eta_delivery_at", "eta_confidence", "eta_calculated_at")
    )
    held = set(ids) - {str(row[0]) for row in rows}
    if held:  # another transaction has them (a step, a refresh): the next run looks again
        _eta_mark(dict.fromkeys(held, now.timestamp()), nx=True)
    current = {str(pk): values for pk, status, *values in rows
               if status in TRACKED_STATUSES and values[0] is not None and values[1] is not None}
    told = {
        str(pk): change for pk, change in OutboxEvent.objects.filter(delivery_id__in=list(current), type=ETA_TYPE)
        .order_by("delivery_id", "-created_at", "-seq").distinct("delivery_id").values_list("delivery_id", "payload__data__change")
    }
    events = []
    for pk, (pickup, drop, confidence, at) in current.items():
        event = delivery_eta_updated(delivery_id=pk, pickup_at=pickup, delivery_at=drop, confidence=confidence,
                                     calculated_at=at or now)
        last = told.get(pk) or {}
        if (last.get("estimatedPickupTime"), last.get("estimatedDeliveryTime")) != (
                event["estimatedPickupTime"], event["estimatedDeliveryTime"]):
            events.append(event)
    return len(outbox_write(events)) if events else 0
