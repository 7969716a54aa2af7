"""The drop-off geofence of delivery-completed (docs/dispatch.md, "Geofence"): the driver
completes a delivery where the customer is, or says why not."""
from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings

from availability.live import position_latest
from availability.models import Driver
from common.actors import Actor
from common.exceptions import Conflict
from dispatch import services as deliveries
from dispatch.models import Delivery
from tracking.eta import haversine_km


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def geofence_check(delivery: Delivery, *, driver: Driver, override_reason: str, actor: Actor, now: datetime) -> None:
    """May `driver` complete `delivery` here? Judged by the driver's latest fix
    (`availability.live.position_latest`: one Redis round trip, and the row the caller locked;
    no SQL): within DROPOFF_GEOFENCE_METERS of the drop-off, yes. Farther, or with no fix newer
    than DRIVER_STALE_AFTER_SECONDS (an old fix says nothing about where the driver is now):
    a Conflict naming the distance, unless the driver gives `override_reason` — then the
    delivery is flagged and audited (`geofence_override`) in the caller's transaction, which
    completes it. A reason given within the geofence is not recorded. DROPOFF_GEOFENCE_METERS
    0: no check.

    The caller holds the delivery's and the driver's locks (the completion's own), so the
    answer and the completion are one decision; a fix that arrives meanwhile is judged by the
    next attempt."""
    limit = settings.DROPOFF_GEOFENCE_METERS
    if limit <= 0:
        return
    fix = position_latest(driver)
    recent = fix is not None and fix.recorded_at >= now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    distance = None
    if recent:
        dropoff = delivery.dropoff_location
        distance = haversine_km(fix.lat, fix.lon, dropoff.y, dropoff.x) * 1000.0
        if distance <= limit:
            return
    distance_m = round(distance) if distance is not None else None
    if override_reason:
        deliveries.delivery_geofence_override(
            delivery, reason=override_reason, distance_m=distance_m, limit_m=limit,
            fix_recorded_at=fix.recorded_at if fix else None, driver_id=driver.pk, actor=actor, now=now,
        )
        return
    details = {"distanceMeters": distance_m, "limitMeters": limit, "lastFixAt": _iso(fix.recorded_at if fix else None)}
    if recent:
        raise Conflict(
            f"You are {distance_m:,} m from the drop-off (the limit is {limit:,} m); move closer or give overrideReason.",
            details=details,
        )
    raise Conflict(
        f"Your location is not known (no fix in the last {settings.DRIVER_STALE_AFTER_SECONDS} s): send it "
        f"(POST /v2/drivers/{driver.pk}/location) and try again, or give overrideReason.",
        details=details,
    )
