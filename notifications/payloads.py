"""What a webhook carries: `{id, type, createdAt, data}`, where `data` is the delivery as the
API represents it to its owner (`GET /v2/deliveries/{id}`, the same camelCase keys and values)
plus `change`, the fields of the change itself (from/to status, reason, escalation level, ETA).

The representation is the API's own: `notifications/apps.py` registers it at start-up
(`set_delivery_renderer`, the API serializer lives in an interface module this layer does not
import), so a field the API gains is in the webhooks too. `delivery_data` is the fallback
before start-up wiring (and a reference kept equal by the tests)."""
from __future__ import annotations

import json
import uuid
from datetime import timezone as dt_timezone

from django.utils import timezone

from common.errors import iso
from common.fields import point_json
from dispatch.models import Assignment, AssignmentStatus, Delivery, DeliveryStatus


FINISHED = (DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.CANCELLED)


_FOR_PAYLOAD_SQL = """
SELECT d.*, a.id AS latest_assignment_id, a.driver_id AS latest_driver_id,
       a.status AS latest_assignment_status, a.end_reason AS latest_end_reason
FROM {deliveries} d
LEFT JOIN LATERAL (
    SELECT id, driver_id, status, end_reason FROM {assignments}
    WHERE delivery_id = d.id ORDER BY created_at DESC, id DESC LIMIT 1
) a ON true
WHERE d.id = ANY(%s)
"""


def deliveries_for_payload(ids) -> dict[str, Delivery]:
    """The deliveries by id (as text), each with its latest assignment's id, driver, status and
    end reason annotated: one statement, written by hand (a raw query builds the rows as the
    ORM does; compiling the equivalent queryset, four correlated subqueries, was a third of
    the fix consumer's CPU when each batch's ETA update rendered its delivery)."""
    ids = [i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids]
    if not ids:
        return {}
    sql = _FOR_PAYLOAD_SQL.format(deliveries=Delivery._meta.db_table, assignments=Assignment._meta.db_table)
    return {str(d.pk): d for d in Delivery.objects.raw(sql, [ids])}


def held_for_payload(delivery: Delivery) -> Delivery:
    """A delivery a workflow holds (`latest_assignments` set: its latest assignment, or none)
    with the annotations of `deliveries_for_payload`, for either renderer."""
    latest = delivery.latest_assignments[0] if delivery.latest_assignments else None
    delivery.latest_assignment_id = latest.pk if latest else None
    delivery.latest_driver_id = latest.driver_id if latest else None
    delivery.latest_assignment_status = latest.status if latest else None
    delivery.latest_end_reason = latest.end_reason if latest else None
    return delivery


_FROM_ROWS_SQL = """
SELECT d.*, s.key AS snapshot_key,
       (s.snapshot->'assignment'->>'id')::uuid AS latest_assignment_id,
       (s.snapshot->'assignment'->>'driver_id')::uuid AS latest_driver_id,
       s.snapshot->'assignment'->>'status' AS latest_assignment_status,
       s.snapshot->'assignment'->>'end_reason' AS latest_end_reason
FROM jsonb_each(%s::jsonb) AS s(key, snapshot),
     jsonb_populate_record(NULL::{table}, s.snapshot->'delivery') AS d
"""


def deliveries_from_rows(snapshots: dict) -> dict:
    """Deliveries rebuilt from snapshots written with an event (`{"delivery": to_jsonb(row),
    "assignment": {id, driver_id, status, end_reason} | null}`, see `notifications.outbox`),
    by key, annotated as `deliveries_for_payload` annotates them: one statement, in which
    PostgreSQL turns each JSON row back into a row of the table (`jsonb_populate_record`), so
    every column is read exactly as the ORM reads the table."""
    if not snapshots:
        return {}
    by_text = {str(key): key for key in snapshots}
    param = json.dumps({str(key): snapshot for key, snapshot in snapshots.items()})
    rows = Delivery.objects.raw(_FROM_ROWS_SQL.format(table=Delivery._meta.db_table), [param])
    return {by_text[d.snapshot_key]: d for d in rows if d.pk is not None}  # no row in it: not rendered


def _shown_assignment(delivery) -> tuple[object, object]:
    """(assignment id, driver id) as the API shows them: the active assignment, or the one a
    finished delivery ended with (not one ops took away), else none."""
    if delivery.latest_assignment_id is None:
        return None, None
    if delivery.latest_assignment_status == AssignmentStatus.ACTIVE or (
        delivery.status in FINISHED and delivery.latest_end_reason != "reassigned"
    ):
        return delivery.latest_assignment_id, delivery.latest_driver_id
    return None, None


def _text(value) -> str | None:
    return str(value) if value else None


def delivery_data(delivery: Delivery) -> dict:
    """The delivery's API representation (ops/owner view). `delivery` comes from
    `deliveries_for_payload` (its latest assignment annotated)."""
    fee = delivery.delivery_fee
    assignment_id, driver_id = _shown_assignment(delivery)
    return {
        "id": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "sellerId": delivery.seller_id,
        "storeName": delivery.store_name,
        "status": delivery.status,
        "zoneId": _text(delivery.zone_id),
        "pickupLocation": point_json(delivery.pickup_location),
        "dropoffLocation": point_json(delivery.dropoff_location),
        "dropoffAddress": delivery.dropoff_address,
        "customerName": delivery.customer_name,
        "customerPhone": delivery.customer_phone,
        "customerEmail": delivery.customer_email,
        "customerLanguage": delivery.customer_language,
        "prepTimeMinutes": delivery.prep_time_minutes,
        "deliveryFee": float(fee) if fee is not None else None,
        "driverId": _text(driver_id),
        "assignmentId": _text(assignment_id),
        "trackingUrl": delivery.tracking_url,
        "offerAcceptanceCount": delivery.offer_acceptance_count,
        "currentOfferId": _text(delivery.current_offer_id),
        "acceptedOfferId": _text(delivery.accepted_offer_id),
        "failureReason": delivery.failure_reason,
        "cancellationReason": delivery.cancellation_reason,
        "createdAt": iso(delivery.created_at),
        "readyAt": iso(delivery.ready_at),
        "assignedAt": iso(delivery.assigned_at),
        "pickupStartedAt": iso(delivery.pickup_started_at),
        "pickedUpAt": iso(delivery.picked_up_at),
        "inTransitAt": iso(delivery.in_transit_at),
        "deliveredAt": iso(delivery.delivered_at),
        "failedAt": iso(delivery.failed_at),
        "cancelledAt": iso(delivery.cancelled_at),
        "updatedAt": iso(delivery.updated_at),
    }


_renderer = None


def set_delivery_renderer(renderer) -> None:
    """`renderer(delivery) -> dict` (JSON-ready) renders a delivery from
    `deliveries_for_payload` as the API does."""
    global _renderer
    _renderer = renderer


def render_delivery(delivery: Delivery) -> dict:
    """The delivery as the API shows it, its times in UTC with a Z whatever the request's time
    zone: the console (OPS_TIME_ZONE, common.middleware.OpsTimeZoneMiddleware) rendered the
    webhooks of its actions with +05:30 times."""
    with timezone.override(dt_timezone.utc):
        return (_renderer or delivery_data)(delivery)


def latest_assignments_of(delivery: Delivery) -> list[Assignment]:
    """The annotated latest assignment as the API serializer's prefetch gives it."""
    if delivery.latest_assignment_id is None:
        return []
    return [Assignment(
        pk=delivery.latest_assignment_id, delivery_id=delivery.pk, driver_id=delivery.latest_driver_id,
        status=delivery.latest_assignment_status, end_reason=delivery.latest_end_reason,
    )]


def webhook_body(*, webhook_id: str, type: str, created_at, data: dict) -> dict:
    return {"id": webhook_id, "type": type, "createdAt": iso(created_at), "data": data}
