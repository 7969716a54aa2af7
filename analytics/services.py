"""Driver performance, kept current as events happen (counters bumped by one upsert each).

Called by the offer and delivery services inside their transactions; each call emits
`driver_performance_updated` to ops after commit.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import connection
from django.db.models import Count, Q, Sum
from django.utils import timezone

from analytics.events import DriverPerformanceUpdatedEvent, PerformanceMetrics
from analytics.models import DriverPerformance
from availability.models import Driver
from common.broadcast import OPS_GROUP, broadcast_on_commit
from common.errors import iso
from dispatch.models import Delivery, DeliveryStatus
from offers.models import ANSWER_ACCEPTED, DriverOffer


def short_name(full_name: str) -> str:
    """"John Doe" → "John D." (what customers and dashboards show)."""
    parts = full_name.split()
    if len(parts) < 2:
        return full_name
    return f"{parts[0]} {parts[-1][0]}."


def metrics_of(perf: DriverPerformance, rating) -> PerformanceMetrics:
    return {
        "deliveriesCompleted": perf.deliveries_completed,
        "acceptanceRate": perf.acceptance_rate,
        "onTimeRate": perf.on_time_rate,
        "customerRating": float(rating),
        "avgResponseTimeMs": perf.avg_response_time_ms,
        "totalEarnings": float(perf.total_earnings),
    }


_COUNTERS = (
    "deliveries_completed", "deliveries_failed", "offers_accepted", "offers_rejected", "offers_expired",
    "responses", "response_time_total_ms", "timed_deliveries", "on_time_deliveries", "total_earnings",
)


def _bump_sql() -> str:
    table = DriverPerformance._meta.db_table
    columns = ", ".join(_COUNTERS)
    placeholders = ", ".join(f"%({c})s" for c in _COUNTERS)
    increments = ", ".join(f"{c} = p.{c} + EXCLUDED.{c}" for c in _COUNTERS)
    returning = ", ".join(f.column for f in DriverPerformance._meta.concrete_fields)
    driver_table = Driver._meta.db_table
    return (
        f"INSERT INTO {table} AS p (driver_id, {columns}, updated_at) VALUES (%(driver_id)s, {placeholders}, %(now)s) "
        f"ON CONFLICT (driver_id) DO UPDATE SET updated_at = EXCLUDED.updated_at, {increments} "
        f"RETURNING {returning}, "
        f"(SELECT d.name FROM {driver_table} d WHERE d.id = p.driver_id), "
        f"(SELECT d.rating FROM {driver_table} d WHERE d.id = p.driver_id)"
    )


def _bump(driver_id, now: datetime, **increments) -> None:
    """Add `increments` to the driver's counters (creating the row on the first event) in one
    upsert, which also returns the row and the driver's name and rating for the event."""
    params = {c: increments.get(c, 0) for c in _COUNTERS}
    params.update(driver_id=driver_id, now=now)
    with connection.cursor() as cursor:
        cursor.execute(_bump_sql(), params)
        *values, name, rating = cursor.fetchone()
    fields = [f.attname for f in DriverPerformance._meta.concrete_fields]
    perf = DriverPerformance.from_db(connection.alias, fields, values)
    event: DriverPerformanceUpdatedEvent = {
        "type": "driver_performance_updated",
        "driverId": str(driver_id),
        "driverName": short_name(name),
        "metrics": metrics_of(perf, rating),
        "updatedAt": iso(now),
    }
    broadcast_on_commit([OPS_GROUP], event)


def performance_offer_answered(*, driver_id, outcome: str, response_time_ms: int | None, now: datetime) -> None:
    """outcome: ACCEPTED | REJECTED | EXPIRED (a withdrawn offer does not count)."""
    field = {"ACCEPTED": "offers_accepted", "REJECTED": "offers_rejected", "EXPIRED": "offers_expired"}[outcome]
    increments = {field: 1}
    if response_time_ms is not None and outcome != "EXPIRED":
        increments.update(responses=1, response_time_total_ms=response_time_ms)
    _bump(driver_id, now, **increments)


def performance_delivery_finished(*, driver_id, delivery: Delivery, earning: Decimal, now: datetime) -> None:
    if delivery.status == DeliveryStatus.DELIVERED:
        promised = promised_delivery_time(delivery)
        increments = {"deliveries_completed": 1, "total_earnings": earning}
        if promised is not None:
            increments["timed_deliveries"] = 1
            increments["on_time_deliveries"] = int(delivery.delivered_at <= promised)
        _bump(driver_id, now, **increments)
    else:
        _bump(driver_id, now, deliveries_failed=1, total_earnings=earning)


def performance_rated(*, driver_id, now: datetime) -> None:
    """A customer's rating changed the driver's (`tracking.services.delivery_rate`, in this
    transaction): ops get the metrics with it, as after every other change."""
    _bump(driver_id, now)


def promised_delivery_time(delivery: Delivery):
    """On time means by the estimate the driver accepted (the accepted offer's payload)."""
    from django.utils.dateparse import parse_datetime

    offer = delivery.accepted_offer if delivery.accepted_offer_id else None
    if offer is None:
        return None
    value = (offer.offer_payload or {}).get("estimatedDeliveryTime")
    return parse_datetime(value) if value else None


def recompute_driver_performance(*, driver_ids=None, now: datetime | None = None) -> int:
    """Rebuild the counters from history (offers, deliveries, costs). Returns drivers written."""
    now = now or timezone.now()
    drivers = Driver.objects.all() if driver_ids is None else Driver.objects.filter(pk__in=driver_ids)
    count = 0
    for driver in drivers.iterator():
        offers = DriverOffer.objects.filter(driver=driver).aggregate(
            accepted=Count("id", filter=ANSWER_ACCEPTED),
            rejected=Count("id", filter=Q(status="REJECTED")),
            expired=Count("id", filter=Q(status="EXPIRED")),
            responses=Count("id", filter=(ANSWER_ACCEPTED | Q(status="REJECTED")) & Q(driver_response_time_ms__isnull=False)),
            response_ms=Sum("driver_response_time_ms", filter=ANSWER_ACCEPTED | Q(status="REJECTED")),
        )
        finished = Delivery.objects.filter(
            assignments__driver=driver, assignments__status__in=["completed", "failed"]
        ).select_related("accepted_offer", "cost").distinct()
        completed = failed = timed = on_time = 0
        earnings = Decimal("0")
        for delivery in finished:
            cost = getattr(delivery, "cost", None)
            earnings += cost.driver_payment if cost else Decimal("0")
            if delivery.status == DeliveryStatus.DELIVERED:
                completed += 1
                promised = promised_delivery_time(delivery)
                if promised is not None:
                    timed += 1
                    on_time += delivery.delivered_at <= promised
            else:
                failed += 1
        DriverPerformance.objects.update_or_create(
            driver=driver,
            defaults=dict(
                deliveries_completed=completed, deliveries_failed=failed,
                offers_accepted=offers["accepted"], offers_rejected=offers["rejected"], offers_expired=offers["expired"],
                responses=offers["responses"], response_time_total_ms=offers["response_ms"] or 0,
                timed_deliveries=timed, on_time_deliveries=on_time, total_earnings=earnings, updated_at=now,
            ),
        )
        count += 1
    return count
