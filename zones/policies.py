"""The dispatch policy in force for a zone: the zone's own fields where set, else the global
settings (docs/dispatch.md, "Dispatch policies"). `None` for the zone means a delivery outside
every zone: the global settings alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from availability.models import capacity_for_vehicle
from zones.models import DeliveryZone

# The target wait of a delivery outside every zone: a zone's default.
DEFAULT_TARGET_WAIT_SECONDS = DeliveryZone._meta.get_field("target_wait_time_seconds").default


@dataclass(frozen=True)
class ZonePolicy:
    policy: str  # dispatch.models.DispatchPolicy value
    batch_size: int  # batch: drivers offered at once
    broadcast_max: int  # broadcast: most drivers offered at once
    matching_window_seconds: int  # batched_matching: collection window (0: offer at once)
    target_wait_seconds: int  # batched_matching: the window never delays a delivery past this (since ready)
    stacking: bool  # order stacking allowed
    stacking_max_detour_minutes: int
    stacking_pickup_radius_meters: int


def _pick(zone, field: str, default):
    value = getattr(zone, field, None) if zone is not None else None
    return default if value in (None, "") else value


def zone_policy(zone) -> ZonePolicy:
    return ZonePolicy(
        policy=_pick(zone, "dispatch_policy", settings.DISPATCH_POLICY),
        batch_size=int(_pick(zone, "offer_batch_size", settings.DISPATCH_BATCH_SIZE)),
        broadcast_max=int(_pick(zone, "broadcast_max_drivers", settings.DISPATCH_BROADCAST_MAX)),
        matching_window_seconds=int(_pick(zone, "matching_window_seconds", settings.DISPATCH_MATCHING_WINDOW_SECONDS)),
        target_wait_seconds=int(_pick(zone, "target_wait_time_seconds", DEFAULT_TARGET_WAIT_SECONDS)),
        stacking=bool(_pick(zone, "stacking_enabled", settings.STACKING_ENABLED)),
        stacking_max_detour_minutes=int(_pick(zone, "stacking_max_detour_minutes", settings.STACKING_MAX_DETOUR_MINUTES)),
        stacking_pickup_radius_meters=int(settings.STACKING_PICKUP_RADIUS_METERS),
    )


def vehicle_capacity(vehicle_type: str | None) -> int:
    """Deliveries a driver may carry at once with stacking on (1 without stacking); the
    driver row's `capacity` column holds the same (availability.models.capacity_for_vehicle)."""
    return capacity_for_vehicle(vehicle_type)
