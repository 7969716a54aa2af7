"""Order stacking (docs/dispatch.md, "Order stacking"): which busy drivers may take one more
delivery. Opt-in per zone (`zones.policies.zone_policy(zone).stacking`); elsewhere a driver
carries one delivery at a time, as before.

A busy driver qualifies for a ready delivery when
- it has room: fewer active assignments than its vehicle's capacity (VEHICLE_CAPACITY; the
  database refuses more whatever happens here),
- it carries a delivery not yet on its way — assigned, or picked up and not yet started
  (`delivery-started`): "the same pickup" means the same store before the driver leaves it —
  whose pickup is within STACKING_PICKUP_RADIUS_METERS of the new delivery's pickup,
- and taking it makes the driver's route (`tracking.route`) finish at most the zone's
  `stacking_max_detour_minutes` later: the wait for the order at the store, the pickup stop,
  and the leg from its last drop-off to the new one with the handover. The new delivery is
  dropped off last, so each carried customer is delayed by the pickup part only.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings

from availability.geo import NearbyDriver
from availability.models import Driver, DriverAvailability
from dispatch.models import Delivery, DeliveryStatus
from dispatch.selectors import carried_deliveries, stackable_drivers_near
from tracking.eta import point_distance_km
from tracking.route import stacking_detour_seconds
from zones.policies import zone_policy

STACKABLE_POOL = 50  # busy drivers considered per delivery
# A carried delivery the driver is still at (or on the way to) the store for.
NOT_YET_LEFT = (DeliveryStatus.ASSIGNED, DeliveryStatus.PICKED_UP)


def _zone(delivery: Delivery):
    return delivery.zone if getattr(delivery, "zone_id", None) else None


def stacking_on(delivery: Delivery) -> bool:
    return zone_policy(_zone(delivery)).stacking


def _qualifies(delivery: Delivery, carried: list, *, vehicle_type: str, lat: float, lon: float, now: datetime) -> bool:
    policy = zone_policy(_zone(delivery))
    radius_km = policy.stacking_pickup_radius_meters / 1000.0
    near = any(
        c.status in NOT_YET_LEFT and point_distance_km(c.pickup_location, delivery.pickup_location) <= radius_km
        for c in carried
    )
    if not near:
        return False
    detour = stacking_detour_seconds(carried, delivery, vehicle_type=vehicle_type, driver_lat=lat, driver_lon=lon, now=now)
    return detour <= policy.stacking_max_detour_minutes * 60


def stacking_candidates(delivery: Delivery, *, now: datetime) -> list[NearbyDriver]:
    """Busy drivers who may take `delivery` on top of what they carry (nearest first); none
    outside a stacking zone. Two queries: the drivers, then what they carry."""
    policy = zone_policy(_zone(delivery))
    if not policy.stacking:
        return []
    lat, lon = delivery.pickup_location.y, delivery.pickup_location.x
    cutoff = now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    rows = stackable_drivers_near(
        lat=lat, lon=lon, radius_m=policy.stacking_pickup_radius_meters, cutoff=cutoff, limit=STACKABLE_POOL
    )
    if not rows:
        return []
    carried = carried_deliveries([r[0] for r in rows])
    out = []
    for driver_id, vehicle, d_lat, d_lon, km in rows:
        if _qualifies(delivery, carried.get(driver_id, []), vehicle_type=vehicle, lat=d_lat, lon=d_lon, now=now):
            out.append(NearbyDriver(driver_id=driver_id, distance_km=km, lat=d_lat, lon=d_lon))
    return out


def driver_may_stack(delivery: Delivery, driver: Driver, *, now: datetime) -> bool:
    """Whether the locked, busy `driver` may take `delivery` as well, as above (re-checked when
    it accepts, and when ops assign it directly)."""
    if driver.availability != DriverAvailability.BUSY or not stacking_on(delivery):
        return False
    if driver.active_assignments >= driver.capacity or driver.location is None:
        return False
    carried = carried_deliveries([driver.pk]).get(str(driver.pk), [])
    return _qualifies(
        delivery, carried, vehicle_type=driver.vehicle_type, lat=driver.location.y, lon=driver.location.x, now=now
    )
