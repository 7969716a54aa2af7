"""Serviceability and quotes: whether a delivery from a pickup to a drop-off is taken, and at
what fee. One set of rules for `POST /v2/deliveries` (refused with a 400 naming the field) and
`POST /v2/quotes` (answered with the reasons), the same ETA estimates and pricing as a real
delivery (`tracking.eta`, `zones.pricing`).

Rules (docs/dispatch.md, "Serviceability and quotes"): while any zone exists, the pickup must
lie in one (`SERVICEABILITY_REQUIRE_ZONE=false` lifts it); the pickup-to-drop-off leg at most
the zone's `max_delivery_distance_km`, else `MAX_DELIVERY_DISTANCE_KM`. Coordinates are not
judged on land or sea.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.gis.geos import Point
from django.utils import timezone

from availability.geo import drivers_available_near
from availability.models import Driver
from common.exceptions import InvalidInput
from dispatch import services as deliveries
from dispatch.models import Delivery, Quote
from tracking import eta
from workflows.dispatching import rank_candidates, search_radius_for
from workflows.unit import unit_of_work
from zones import pricing
from zones.selectors import zone_for_point_and_any

NEARBY_LIMIT = 100  # drivers counted as "available nearby"


@dataclass(frozen=True)
class Reason:
    code: str  # outside_zones | distance_exceeded
    field: str
    message: str


@dataclass
class Serviceability:
    zone: object
    distance_km: float
    reasons: list[Reason] = field(default_factory=list)

    @property
    def serviceable(self) -> bool:
        return not self.reasons


def serviceability_of(*, pickup: Point, dropoff: Point) -> Serviceability:
    zone, any_zone = zone_for_point_and_any(pickup)
    distance = eta.point_distance_km(pickup, dropoff)
    result = Serviceability(zone=zone, distance_km=distance)
    if zone is None and any_zone and settings.SERVICEABILITY_REQUIRE_ZONE:
        result.reasons.append(Reason("outside_zones", "pickupLocation", "The pickup is outside every delivery zone."))
    limit = pricing.max_leg_km(zone)
    if limit is not None and distance > limit:
        result.reasons.append(Reason(
            "distance_exceeded", "dropoffLocation",
            f"The pickup-to-drop-off distance ({distance:.1f} km) is over the {limit:g} km limit.",
        ))
    return result


def serviceability_ensure(*, pickup: Point, dropoff: Point) -> Serviceability:
    """The serviceability of a new delivery; InvalidInput (400, the fields in `details`) when
    it is not serviceable."""
    result = serviceability_of(pickup=pickup, dropoff=dropoff)
    if not result.serviceable:
        details: dict[str, list[str]] = {}
        for reason in result.reasons:
            details.setdefault(reason.field, []).append(reason.message)
        raise InvalidInput(details)
    return result


@dataclass
class QuoteResult:
    serviceability: Serviceability
    delivery_fee: Decimal
    drivers_nearby: int
    estimated_pickup_at: datetime | None
    estimated_delivery_at: datetime | None
    quote: Quote | None


@unit_of_work()
def quote_create(
    *, created_by, pickup: Point, dropoff: Point, prep_time_minutes: int = 0, now: datetime | None = None
) -> QuoteResult:
    """What `POST /v2/deliveries` would do with this pickup and drop-off now: serviceable or
    why not, the fee (locked for `QUOTE_TTL_SECONDS` by the quote it stores when serviceable),
    and the pickup and delivery estimates from the driver dispatch would offer it to first
    (the first in dispatch's order, docs/dispatch.md; none: no estimates)."""
    now = now or timezone.now()
    result = serviceability_of(pickup=pickup, dropoff=dropoff)
    fee = pricing.delivery_fee(leg_km=result.distance_km)
    # The delivery it would be (unsaved): the same ETA rules as a real one.
    draft = Delivery(pickup_location=pickup, dropoff_location=dropoff, prep_time_minutes=prep_time_minutes,
                     ready_at=now, zone=result.zone)
    nearby = drivers_available_near(
        lat=pickup.y, lon=pickup.x, radius_km=search_radius_for(draft), limit=NEARBY_LIMIT, now=now, positions=False,
    ) if result.serviceable else []
    # screened as dispatch would (a driver holding another offer, or UNAVAILABLE for the zone,
    # was counted and priced while the delivery then found nobody), the estimate from the
    # driver dispatch would offer it to first
    candidates = rank_candidates(draft, nearby).ranked
    pickup_at = delivery_at = None
    if candidates:
        first = candidates[0]
        vehicle = Driver.objects.filter(pk=first.driver_id).values_list("vehicle_type", flat=True).first() or "car"
        pickup_s = eta.pickup_eta_seconds(delivery=draft, distance_to_pickup_km=first.distance_km, vehicle_type=vehicle, now=now)
        deliver_s = pickup_s + eta.travel_seconds(result.distance_km, vehicle) + eta.HANDOVER_SECONDS
        pickup_at = now + timedelta(seconds=math.ceil(pickup_s))
        delivery_at = now + timedelta(seconds=math.ceil(deliver_s))
    quote = None
    if result.serviceable:
        quote = deliveries.quote_insert(
            created_by=created_by, pickup_location=pickup, dropoff_location=dropoff, prep_time_minutes=prep_time_minutes,
            zone=result.zone, distance_km=result.distance_km, delivery_fee=fee, now=now,
            ttl_seconds=settings.QUOTE_TTL_SECONDS,
        )
    return QuoteResult(
        serviceability=result, delivery_fee=fee, drivers_nearby=len(candidates),
        estimated_pickup_at=pickup_at, estimated_delivery_at=delivery_at, quote=quote,
    )


def quote_use(*, quote_id, created_by, data, now: datetime):
    """The fee a quote locked, for a delivery being created from it (see
    `dispatch.services.quote_claim`). Inside the intake's transaction."""
    return deliveries.quote_claim(
        quote_id=quote_id, created_by=created_by, pickup_location=data.pickup_location,
        dropoff_location=data.dropoff_location, now=now,
    )


def quotes_purge(*, now: datetime | None = None, batch_size: int = 5000, max_seconds: float = 60.0) -> int:
    """The hourly purge: delete the quotes never used that expired more than
    QUOTE_RETENTION_SECONDS ago, in batches, until none is left or the batch that passes
    `max_seconds` (the next run goes on). A quote can be asked for by anyone with a token, at
    any rate the throttles allow, and nothing deleted them. Returns how many were deleted."""
    now = now or timezone.now()
    deadline = time.monotonic() + max_seconds
    cutoff = now - timedelta(seconds=settings.QUOTE_RETENTION_SECONDS)
    expired = Quote.objects.filter(used_at__isnull=True, expires_at__lt=cutoff).order_by()
    total = 0
    while True:
        ids = list(expired.values_list("pk", flat=True)[:batch_size])
        if ids:
            deleted, _ = Quote.objects.filter(pk__in=ids, used_at__isnull=True).delete()
            total += deleted
        if len(ids) < batch_size or time.monotonic() >= deadline:
            return total
