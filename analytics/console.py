"""Read side of the ops console: the live map's starting state and the dashboard's KPIs.

Reads only (no service, no workflow). The live map loads `live_map_state()` over the API
(`GET /v2/admin/live-map`), then follows `/ws/ops/`; the admin index shows `dashboard_kpis()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import connection
from django.db.models import Case, Count, Exists, F, IntegerField, OuterRef, Subquery, When

from availability import live
from availability.models import Driver, DriverAvailability
from common.errors import iso
from dispatch.models import OPEN_DELIVERY_STATUSES, Assignment, AssignmentStatus, Delivery, DeliveryStatus
from escalation.models import ACTIVE_TICKET_STATUSES, SupportTicket, TicketPriority, UnassignedOrder
from offers.models import ANSWER_ACCEPTED, ANSWERED, DriverOffer, OfferStatus
from zones.models import DeliveryZone

LIVE_MAP_MAX_DRIVERS = 5000
LIVE_MAP_MAX_DELIVERIES = 2000
IN_PROGRESS = (DeliveryStatus.ASSIGNED, DeliveryStatus.PICKED_UP, DeliveryStatus.IN_TRANSIT)
ONLINE = (DriverAvailability.AVAILABLE, DriverAvailability.BUSY)
OFF_WORK = (DriverAvailability.OFFLINE, DriverAvailability.SHIFT_ENDED)


def _health_band(score: int | None) -> str:
    if score is None:
        return "unknown"
    return "good" if score >= 70 else "fair" if score >= 40 else "poor"


def live_map_state(*, now: datetime) -> dict:
    """Drivers with a known position (Redis's live one where fresher than PostgreSQL's), open
    deliveries with their driver and escalation level, and the zones with their health (and
    their holes). Past the caps the map holds, the drivers at work (not offline, not off shift)
    with the freshest fixes come first, and the deliveries waiting longest; `truncated` says
    whether any were left out."""
    off_work = Case(When(availability__in=OFF_WORK, then=1), default=0, output_field=IntegerField())
    drivers = list(
        Driver.objects.filter(location__isnull=False)
        .order_by(off_work, F("location_recorded_at").desc(nulls_last=True), "pk")
        .values("pk", "name", "availability", "last_availability_change", "location", "location_heading",
                "location_recorded_at")[:LIVE_MAP_MAX_DRIVERS + 1]
    )
    drivers_truncated = len(drivers) > LIVE_MAP_MAX_DRIVERS
    drivers = drivers[:LIVE_MAP_MAX_DRIVERS]
    fresh = live.positions_of([d["pk"] for d in drivers])
    driver_rows = []
    for d in drivers:
        pos = fresh.get(str(d["pk"]))
        if pos is not None and (d["location_recorded_at"] is None or pos.recorded_at >= d["location_recorded_at"]):
            lat, lon, heading, at = pos.lat, pos.lon, pos.heading, pos.recorded_at
        else:
            lat, lon, heading, at = d["location"].y, d["location"].x, d["location_heading"], d["location_recorded_at"]
        driver_rows.append({
            "driverId": str(d["pk"]), "name": d["name"], "availability": d["availability"],
            "availabilityChangedAt": iso(d["last_availability_change"]), "lat": lat, "lon": lon, "heading": heading, "recordedAt": iso(at) if at else None,
        })

    # Each delivery with its driver and its escalation level in ONE statement, so one snapshot:
    # read apart, a commit in between gave an in-transit delivery no driver, or a waiting one a
    # driver (an audit: 35 of 2,828 rows while steps ran).
    open_deliveries = list(
        Delivery.objects.filter(status__in=OPEN_DELIVERY_STATUSES)
        .annotate(
            active_driver_id=Subquery(Assignment.objects.filter(delivery=OuterRef("pk"), status=AssignmentStatus.ACTIVE)
                                      .values("driver_id")[:1]),
            open_level=Subquery(UnassignedOrder.objects.filter(delivery=OuterRef("pk"), resolved_at__isnull=True)
                                .values("escalation_level")[:1]),
            is_unassigned=Exists(UnassignedOrder.objects.filter(delivery=OuterRef("pk"), resolved_at__isnull=True)),
        )
        .order_by("created_at", "pk")
        .values("pk", "seller_order_id", "store_name", "status", "zone_id", "pickup_location", "dropoff_location", "ready_at",
                "updated_at", "active_driver_id", "open_level", "is_unassigned")
        [:LIVE_MAP_MAX_DELIVERIES + 1]
    )
    deliveries_truncated = len(open_deliveries) > LIVE_MAP_MAX_DELIVERIES
    open_deliveries = open_deliveries[:LIVE_MAP_MAX_DELIVERIES]
    delivery_rows = [{
        "deliveryId": str(d["pk"]), "sellerOrderId": d["seller_order_id"], "storeName": d["store_name"],
        "status": d["status"], "zoneId": str(d["zone_id"]) if d["zone_id"] else None,
        "pickup": {"lat": d["pickup_location"].y, "lon": d["pickup_location"].x},
        "dropoff": {"lat": d["dropoff_location"].y, "lon": d["dropoff_location"].x},
        "driverId": str(d["active_driver_id"]) if d["active_driver_id"] else None,
        "unassigned": d["is_unassigned"], "escalationLevel": d["open_level"],
        "readyAt": iso(d["ready_at"]),
        # A status change stamps its time (`changedAt`) at or before the row's updated_at, and
        # one made after this read at or after it (workflows: `locked_now`, past the row's last
        # change): an event with an older `changedAt` is already in this state (docs/console.md).
        "updatedAt": iso(d["updated_at"]),
    } for d in open_deliveries]

    zone_rows = [{
        "zoneId": str(z.pk), "name": z.name, "priorityLevel": z.priority_level,
        "polygon": [[lat, lon] for lon, lat in z.geometry.exterior_ring.coords],
        "holes": [[[lat, lon] for lon, lat in z.geometry[i].coords] for i in range(1, len(z.geometry))],
        "healthScore": z.health_score, "health": _health_band(z.health_score),
        "driversOnline": z.current_drivers_online, "minDriversOnline": z.min_drivers_online,
        "belowMinimum": z.below_minimum,
    } for z in DeliveryZone.objects.order_by("priority_level", "name")]
    return {"drivers": driver_rows, "deliveries": delivery_rows, "zones": zone_rows, "generatedAt": iso(now),
            "truncated": {"drivers": drivers_truncated, "deliveries": deliveries_truncated}}


@dataclass
class Kpis:
    unassigned_by_level: dict[int, int]
    unassigned_total: int
    late_deliveries: int
    drivers: dict[str, int]
    zones: list[dict]
    offers_in_flight: int
    acceptance_rate: float | None
    offers_answered: int
    median_seconds_to_assign: float | None
    assigned_last_hour: int
    tickets_by_priority: dict[str, int] = field(default_factory=dict)

    @property
    def tickets_total(self) -> int:
        return sum(self.tickets_by_priority.values())


_MEDIAN_TO_ASSIGN_SQL = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM (assigned_at - ready_at))), count(*)
FROM dispatch_delivery
WHERE assigned_at >= %(since)s AND assigned_at <= %(now)s AND assigned_at >= ready_at
"""


def dashboard_kpis(*, now: datetime) -> Kpis:
    """The admin index's tiles. "Late": an in-progress delivery whose delivery ETA has passed.
    The hour's figures: offers answered (accepted, rejected or expired) that were created in
    the last hour, and deliveries first assigned in the last hour (ready → assigned)."""
    hour_ago = now - timedelta(hours=1)
    levels = dict(
        UnassignedOrder.objects.filter(resolved_at__isnull=True)
        .values_list("escalation_level").annotate(n=Count("pk")).values_list("escalation_level", "n")
    )
    by_state = dict(Driver.objects.values_list("availability").annotate(n=Count("pk")).values_list("availability", "n"))
    drivers = {state: by_state.get(state, 0) for state in DriverAvailability.values}
    drivers["online"] = sum(by_state.get(s, 0) for s in ONLINE)
    zones = [
        {"id": z["pk"], "name": z["name"], "online": z["current_drivers_online"], "min": z["min_drivers_online"],
         "below": z["current_drivers_online"] < z["min_drivers_online"]}
        for z in DeliveryZone.objects.order_by("priority_level", "name")
        .values("pk", "name", "current_drivers_online", "min_drivers_online")
    ]
    answered = DriverOffer.objects.filter(ANSWERED, created_at__gte=hour_ago).aggregate(
        total=Count("pk"), accepted=Count("pk", filter=ANSWER_ACCEPTED)
    )
    with connection.cursor() as cur:
        cur.execute(_MEDIAN_TO_ASSIGN_SQL, {"since": hour_ago, "now": now})
        median, assigned = cur.fetchone()
    tickets = dict(
        SupportTicket.objects.filter(status__in=ACTIVE_TICKET_STATUSES)
        .values_list("priority").annotate(n=Count("pk")).values_list("priority", "n")
    )
    return Kpis(
        unassigned_by_level={level: levels.get(level, 0) for level in range(0, 4)},
        unassigned_total=sum(levels.values()),
        late_deliveries=Delivery.objects.filter(status__in=IN_PROGRESS, eta_delivery_at__lt=now).count(),
        drivers=drivers,
        zones=zones,
        offers_in_flight=DriverOffer.objects.filter(status=OfferStatus.PENDING, expires_at__gt=now).count(),
        acceptance_rate=(answered["accepted"] / answered["total"]) if answered["total"] else None,
        offers_answered=answered["total"],
        median_seconds_to_assign=float(median) if median is not None else None,
        assigned_last_hour=assigned,
        tickets_by_priority={p: tickets.get(p, 0) for p in reversed(TicketPriority.values)},
    )
