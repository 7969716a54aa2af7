"""Read side of performance and economics: driver rankings and the ops summary."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import connection
from django.db.models import (
    Case,
    Count,
    DecimalField,
    F,
    FloatField,
    IntegerField,
    Q,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Cast, Coalesce

from availability.models import Driver
from dispatch.models import Delivery
from offers.models import ANSWER_ACCEPTED, ANSWER_WITHDRAWN, DriverOffer

# API sort key → annotation on Driver
SORTS = {
    "deliveriesCompleted": "m_deliveries_completed",
    "acceptanceRate": "m_acceptance_rate",
    "onTimeRate": "m_on_time_rate",
    "customerRating": "rating",
    "avgResponseTimeMs": "m_avg_response_time_ms",
    "totalEarnings": "m_total_earnings",
}


def _ratio(num, den):
    return Case(
        When(**{f"{den}__gt": 0}, then=Cast(F(num), FloatField()) / Cast(F(den), FloatField())),
        default=Value(0.0),
        output_field=FloatField(),
    )


def drivers_with_performance():
    return Driver.objects.annotate(
        m_deliveries_completed=Coalesce(F("performance__deliveries_completed"), 0),
        m_answered=Coalesce(
            F("performance__offers_accepted") + F("performance__offers_rejected") + F("performance__offers_expired"), 0
        ),
        m_accepted=Coalesce(F("performance__offers_accepted"), 0),
        m_acceptance_rate=_ratio("m_accepted", "m_answered"),
        m_timed=Coalesce(F("performance__timed_deliveries"), 0),
        m_on_time=Coalesce(F("performance__on_time_deliveries"), 0),
        m_on_time_rate=_ratio("m_on_time", "m_timed"),
        m_responses=Coalesce(F("performance__responses"), 0),
        m_response_total=Coalesce(F("performance__response_time_total_ms"), 0),
        m_avg_response_time_ms=Case(
            # half up, in integers (as DriverPerformance.avg_response_time_ms; `/` alone truncated: 2989.67 → 2989)
            When(m_responses__gt=0, then=(2 * F("m_response_total") + F("m_responses")) / (2 * F("m_responses"))),
            default=Value(0), output_field=IntegerField()
        ),
        m_total_earnings=Coalesce(F("performance__total_earnings"), Value(Decimal("0")), output_field=DecimalField(max_digits=12, decimal_places=2)),
        m_updated_at=F("performance__updated_at"),
    )


_LATENCY_SQL = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s), percentile_cont(0.95) WITHIN GROUP (ORDER BY s), count(*)
FROM (SELECT EXTRACT(EPOCH FROM (assigned_at - ready_at)) AS s FROM dispatch_delivery
      WHERE created_at >= %(start)s AND created_at < %(end)s AND assigned_at IS NOT NULL {zone}) t
"""


def assignment_latency(*, start: datetime, end: datetime, zone_id=None) -> dict:
    sql = _LATENCY_SQL.format(zone="AND zone_id = %(zone)s" if zone_id else "")
    with connection.cursor() as cur:
        cur.execute(sql, {"start": start, "end": end, "zone": zone_id})
        p50, p95, n = cur.fetchone()
    return {"p50": round(p50, 3) if p50 is not None else None, "p95": round(p95, 3) if p95 is not None else None, "count": n}


def _money(value) -> float:
    return float((value or Decimal("0")).quantize(Decimal("0.01")))


def summary(*, start: datetime, end: datetime, zone_id=None) -> dict:
    deliveries = Delivery.objects.filter(created_at__gte=start, created_at__lt=end)
    # the offers of those deliveries (by the offer's own time, a delivery near an edge had its
    # offers split between two ranges, and a range with no delivery could show offers)
    offers = DriverOffer.objects.filter(delivery__created_at__gte=start, delivery__created_at__lt=end)
    if zone_id:
        deliveries = deliveries.filter(zone_id=zone_id)
        offers = offers.filter(delivery__zone_id=zone_id)
    by_status = dict(deliveries.order_by().values_list("status").annotate(n=Count("id")))
    o = offers.aggregate(
        total=Count("id"),
        accepted=Count("id", filter=ANSWER_ACCEPTED),  # (also those a reassign cancelled since)
        rejected=Count("id", filter=Q(status="REJECTED")),
        expired=Count("id", filter=Q(status="EXPIRED")),
        cancelled=Count("id", filter=ANSWER_WITHDRAWN),
    )
    answered = o["accepted"] + o["rejected"] + o["expired"]
    money = deliveries.aggregate(revenue=Sum("revenue__total_revenue"), cost=Sum("cost__total_cost"))
    revenue, cost = money["revenue"] or Decimal("0"), money["cost"] or Decimal("0")

    zones = []
    rows = (
        deliveries.order_by().values("zone_id", "zone__name")
        .annotate(n=Count("id"), revenue=Sum("revenue__total_revenue"), cost=Sum("cost__total_cost"))
        .order_by("zone__name")
    )
    for row in rows:
        r, c = row["revenue"] or Decimal("0"), row["cost"] or Decimal("0")
        zones.append({
            "zoneId": str(row["zone_id"]) if row["zone_id"] else None,
            "zoneName": row["zone__name"],
            "deliveries": row["n"],
            "revenue": _money(r), "cost": _money(c), "margin": _money(r - c),
            "assignmentLatencySeconds": assignment_latency(start=start, end=end, zone_id=row["zone_id"]) if row["zone_id"] else None,
        })
    return {
        "deliveries": {"total": sum(by_status.values()), "byStatus": by_status},
        "assignmentLatencySeconds": assignment_latency(start=start, end=end, zone_id=zone_id),
        "offers": o,
        "acceptanceRate": round(o["accepted"] / answered, 4) if answered else None,
        "revenue": _money(revenue),
        "cost": _money(cost),
        "margin": _money(revenue - cost),
        "byZone": zones,
    }
