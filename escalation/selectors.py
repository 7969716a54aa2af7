"""Reads for escalation and support: the unassigned-orders list, the support queue, a ticket
page's delivery, map and timeline."""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.gis.db.models.functions import Distance
from django.contrib.gis.measure import D
from django.db.models import Count, Exists, OuterRef, Q, QuerySet

from audit.models import DeliveryAuditLog
from availability.models import Driver, DriverAvailability
from common.bidi import bidi_isolated
from common.exceptions import Conflict, NotFound
from common.roles import SUPPORT_GROUP
from dispatch.models import Delivery, DeliveryStatus
from escalation.levels import level_thresholds
from escalation.models import (
    ACTIVE_TICKET_STATUSES,
    SupportTicket,
    TicketComment,
    TicketStatus,
    UnassignedOrder,
)

# ------------------------------------------------------------------------- unassigned orders

OPEN, RESOLVED, ALL = "open", "resolved", "all"


def unassigned_orders_list(
    *, state: str = OPEN, level: int | None = None, failure_reason: str | None = None, status: str | None = None
) -> QuerySet[UnassignedOrder]:
    qs = UnassignedOrder.objects.all()
    if state == OPEN:
        qs = qs.filter(resolved_at__isnull=True)
    elif state == RESOLVED:
        qs = qs.filter(resolved_at__isnull=False)
    if level is not None:
        qs = qs.filter(escalation_level=level)
    if failure_reason:
        qs = qs.filter(failure_reason=failure_reason)
    if status:
        qs = qs.filter(escalation_status=status)
    return qs


def unassigned_orders_summary(queryset: QuerySet[UnassignedOrder]) -> dict:
    """Seed: {total, byEscalationLevel, byFailureReason} over the whole filtered list."""
    by_level = dict(queryset.order_by().values_list("escalation_level").annotate(n=Count("id")))
    by_reason = dict(queryset.order_by().values_list("failure_reason").annotate(n=Count("id")))
    return {
        "total": sum(by_level.values()),
        "byEscalationLevel": {str(level): n for level, n in sorted(by_level.items())},
        "byFailureReason": dict(sorted(by_reason.items())),
    }


def unassigned_delivery_id(*, record_id):
    """The delivery of an unassigned-order record (to lock it first: delivery → record)."""
    delivery_id = UnassignedOrder.objects.filter(pk=record_id).values_list("delivery_id", flat=True).first()
    if delivery_id is None:
        raise NotFound("Unassigned order not found.")
    return delivery_id


def deliveries_due_for_escalation(*, now: datetime, limit: int) -> list:
    """Ids of deliveries the escalation check must look at, longest waiting first: ready ones
    past a threshold whose open record (if any) is below the level due, and open records
    whose delivery is no longer ready (to be closed)."""
    thresholds = level_thresholds()
    open_record = UnassignedOrder.objects.filter(delivery=OuterRef("pk"), resolved_at__isnull=True)
    due = Q()
    for level, seconds in thresholds.items():
        cutoff = now - timedelta(seconds=seconds)
        below = open_record.filter(escalation_level__lt=level)
        due |= Q(ready_at__lte=cutoff) & (Exists(below) | ~Exists(open_record))
    ready = list(
        Delivery.objects.filter(status=DeliveryStatus.READY).filter(due)
        .order_by("ready_at").values_list("pk", flat=True)[:limit]
    )
    stale = list(
        UnassignedOrder.objects.filter(resolved_at__isnull=True).exclude(delivery__status=DeliveryStatus.READY)
        .order_by("first_attempt_at").values_list("delivery_id", flat=True)[:limit]
    )
    seen = set(ready)
    return ready + [d for d in stale if d not in seen]


# ---------------------------------------------------------------------------- support queue

ACTIVE = "active"
QUEUE_ORDERING = ("-priority_rank", "delivery__ready_at", "created_at", "id")


def tickets_queue(
    *, status: str | None = ACTIVE, priority: str | None = None, zone_id=None, level: int | None = None,
    assignee=None, unassigned_only: bool = False,
) -> QuerySet[SupportTicket]:
    """The support queue: most urgent first, then the delivery waiting longest. `status`
    "active" (the default) means open or in progress; None or "all" means every ticket."""
    qs = SupportTicket.objects.select_related("delivery", "delivery__zone", "unassigned_order", "assignee")
    if status == ACTIVE:
        qs = qs.filter(status__in=ACTIVE_TICKET_STATUSES)
    elif status and status != ALL:
        qs = qs.filter(status=status)
    if priority:
        qs = qs.filter(priority=priority)
    if zone_id:
        qs = qs.filter(delivery__zone_id=zone_id)
    if level is not None:
        qs = qs.filter(unassigned_order__escalation_level=level)
    if assignee is not None:
        qs = qs.filter(assignee=assignee)
    if unassigned_only:
        qs = qs.filter(assignee__isnull=True)
    return qs.order_by(*QUEUE_ORDERING)


def ticket_get(*, ticket_id) -> SupportTicket:
    ticket = (
        SupportTicket.objects.select_related(
            "delivery", "delivery__zone", "delivery__current_offer__driver", "unassigned_order",
            "unassigned_order__escalated_by", "assignee",
        ).filter(pk=ticket_id).first()
    )
    if ticket is None:
        raise NotFound("Ticket not found.")
    return ticket


def ticket_delivery_id(*, ticket_id, open_only: bool = False):
    """The delivery of a ticket (to lock it before the ticket: delivery → ticket). With
    `open_only`, a closed ticket is a Conflict (closed is final: no action from it)."""
    row = SupportTicket.objects.filter(pk=ticket_id).values_list("delivery_id", "status").first()
    if row is None or row[0] is None:
        raise NotFound("Ticket not found.")
    if open_only and row[1] == TicketStatus.CLOSED:
        raise Conflict("Ticket is closed; a closed ticket is final.")
    return row[0]


def ticket_comments(*, ticket_id) -> QuerySet[TicketComment]:
    return TicketComment.objects.filter(ticket_id=ticket_id).select_related("author").order_by("created_at", "seq")


def delivery_timeline(*, delivery_id) -> QuerySet[DeliveryAuditLog]:
    return DeliveryAuditLog.objects.filter(delivery_id=delivery_id).order_by("timestamp", "seq")


def support_agents():
    User = get_user_model()
    return User.objects.filter(Q(is_staff=True) | Q(groups__name=SUPPORT_GROUP), is_active=True).distinct().order_by("username")


# ------------------------------------------------------------------------------ pickup map

KM_PER_DEG_LAT = 110.574


@dataclass(frozen=True)
class MapPoint:
    x: float  # SVG user units, 0..size
    y: float
    label: str
    kind: str  # pickup | dropoff | available | busy


def pickup_map(*, delivery: Delivery, now: datetime, size: int = 240) -> dict:
    """A small self-contained map around the pickup (no tiles: an SVG the page draws): the
    pickup in the middle, rings at the dispatch and wide radii, the dropoff, and drivers with
    a fresh fix within the wide radius."""
    wide = float(settings.DISPATCH_WIDE_RADIUS_KM)
    normal = float(settings.DISPATCH_RADIUS_KM)
    lat0, lon0 = delivery.pickup_location.y, delivery.pickup_location.x
    half = size / 2
    scale = (half - 8) / wide  # px per km
    km_per_deg_lon = 111.320 * math.cos(math.radians(lat0))

    def project(point) -> tuple[float, float] | None:
        dx = (point.x - lon0) * km_per_deg_lon
        dy = (point.y - lat0) * KM_PER_DEG_LAT
        if math.hypot(dx, dy) > wide * 1.05:
            return None
        return round(half + dx * scale, 1), round(half - dy * scale, 1)

    points = [MapPoint(half, half, "pickup", "pickup")]
    drop = project(delivery.dropoff_location) if delivery.dropoff_location else None
    if drop:
        points.append(MapPoint(drop[0], drop[1], "dropoff", "dropoff"))
    cutoff = now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    drivers = (
        Driver.objects.filter(
            location__dwithin=(delivery.pickup_location, D(km=wide)), location_recorded_at__gte=cutoff,
            availability__in=[DriverAvailability.AVAILABLE, DriverAvailability.BUSY],
        )
        .annotate(distance=Distance("location", delivery.pickup_location)).order_by("distance")[:50]
    )
    nearby = []
    for driver in drivers:
        xy = project(driver.location)
        km = driver.distance.km
        nearby.append({"name": driver.name, "availability": driver.availability, "km": round(km, 1)})
        if xy:
            points.append(MapPoint(xy[0], xy[1], f"{bidi_isolated(driver.name)} ({driver.availability}, {km:.1f} km)", driver.availability))
    return {
        "size": size, "center": half, "points": points, "drivers": nearby,
        "rings": [{"km": normal, "r": round(normal * scale, 1)}, {"km": wide, "r": round(wide * scale, 1)}],
        "lat": round(lat0, 6), "lon": round(lon0, 6),
    }
