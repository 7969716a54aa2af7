"""Every write to zones and drivers' zone preferences, and the zone-health job (STYLE rule 1).

Locks: zone rows are locked FOR NO KEY UPDATE (edits, the health job), so that a preference
write can hold FOR KEY SHARE on the zones it references (the zone cannot be deleted under it)
without blocking either.
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Iterable

from django.contrib.gis.geos import Polygon
from django.core.exceptions import ValidationError
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import Value
from django.db.models.functions import Lower
from django.utils import timezone

from availability.models import Driver
from common.broadcast import OPS_GROUP, broadcast_on_commit
from common.exceptions import Conflict, NotFound
from common.redis import RedisUnavailable, get_redis
from zones import events, selectors
from zones.geometry import validate_zone_polygon
from zones.models import DeliveryZone, DriverZonePreference, ZonePreference

logger = logging.getLogger(__name__)

_UNSET: Any = object()
EDITABLE_FIELDS = (
    "name", "geometry", "priority_level", "min_drivers_online", "target_wait_time_seconds",
    "offer_expires_seconds", "search_radius_km", "max_delivery_distance_km", "driver_pay_per_km", "driver_pay_cap",
    "proof_required", "dispatch_policy", "offer_batch_size", "broadcast_max_drivers", "matching_window_seconds",
    "stacking_enabled", "stacking_max_detour_minutes",
)
HEALTH_FIELDS = ("current_drivers_online", "avg_wait_time_seconds", "demand_level", "health_score", "last_updated")


# ------------------------------------------------------------------------------ zones


def _validate(zone: DeliveryZone) -> None:
    """Field ranges and the CHECK constraints, as in the admin form (django ValidationError)."""
    zone.geometry = _clean_geometry(zone.geometry)
    zone.full_clean(validate_unique=False)


def _clean_geometry(geometry) -> Polygon:
    try:
        return validate_zone_polygon(geometry)
    except ValidationError as exc:
        raise ValidationError({"geometry": exc.messages}) from exc


def zone_name_lock(name: str) -> None:
    """Hold the name (in any case) to the end of the transaction: two saves of one new name, or
    a rename racing a create, wait for each other here and the second sees the first's zone (a
    Conflict, or the console's form error), never the database's constraint."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended('zones.name:' || lower(%s), 0))", [name])


def _name_taken(name: str, *, exclude_id=None) -> bool:
    qs = DeliveryZone.objects.alias(lower_name=Lower("name")).filter(lower_name=Lower(Value(name)))  # zone_name_ci_unique
    if exclude_id is not None:
        qs = qs.exclude(pk=exclude_id)
    return qs.exists()


def _invalidate_health_cache_on_commit(zone_id) -> None:
    def _delete():
        try:
            get_redis().delete(selectors.health_cache_key(zone_id))
        except RedisUnavailable:
            logger.warning("zone health cache for %s not invalidated: Redis unavailable (expires in 60 s)", zone_id)

    transaction.on_commit(_delete, robust=True)


@transaction.atomic
def zone_create(
    *,
    name: str,
    geometry: Polygon,
    priority_level: int = 3,
    min_drivers_online: int = 5,
    target_wait_time_seconds: int = 300,
    offer_expires_seconds: int | None = None,
    search_radius_km: float | None = None,
    max_delivery_distance_km: float | None = None,
    driver_pay_per_km: Decimal | None = None,
    driver_pay_cap: Decimal | None = None,
    proof_required: str = "",
    dispatch_policy: str = "",
    offer_batch_size: int | None = None,
    broadcast_max_drivers: int | None = None,
    matching_window_seconds: int | None = None,
    stacking_enabled: bool | None = None,
    stacking_max_detour_minutes: int | None = None,
) -> DeliveryZone:
    """Create a zone, its health computed at once. An invalid polygon or out-of-range value is
    a ValidationError (400); a name already in use is a Conflict (409)."""
    geometry = _clean_geometry(geometry)
    zone = DeliveryZone(
        name=name, geometry=geometry, priority_level=priority_level, min_drivers_online=min_drivers_online,
        target_wait_time_seconds=target_wait_time_seconds, offer_expires_seconds=offer_expires_seconds,
        search_radius_km=search_radius_km, max_delivery_distance_km=max_delivery_distance_km,
        driver_pay_per_km=driver_pay_per_km, driver_pay_cap=driver_pay_cap, proof_required=proof_required,
        dispatch_policy=dispatch_policy, offer_batch_size=offer_batch_size, broadcast_max_drivers=broadcast_max_drivers,
        matching_window_seconds=matching_window_seconds, stacking_enabled=stacking_enabled,
        stacking_max_detour_minutes=stacking_max_detour_minutes,
    )
    try:
        with transaction.atomic():
            zone_name_lock(name)
            if _name_taken(name):
                raise Conflict(f"A zone named {name!r} already exists.")
            _validate(zone)
            zone.save(force_insert=True)
    except IntegrityError:
        raise Conflict(f"A zone named {name!r} already exists.")
    # Its health now, not at the job's next run: until then it showed the column's defaults, a
    # 300 s average wait dated its creation, while GET /v2/zones/{id}/health said 0 s (an audit).
    try:
        zone_health_refresh(zone_ids=[zone.pk])
        zone.refresh_from_db(fields=HEALTH_FIELDS)
    except DatabaseError:  # (the zone is stored: the job computes its health within the minute)
        logger.warning("health of the new zone %s could not be computed", zone.pk, exc_info=True)
    return zone


@transaction.atomic
def zone_update(
    *,
    zone_id,
    name: str = _UNSET,
    geometry: Polygon = _UNSET,
    priority_level: int = _UNSET,
    min_drivers_online: int = _UNSET,
    target_wait_time_seconds: int = _UNSET,
    offer_expires_seconds: int | None = _UNSET,
    search_radius_km: float | None = _UNSET,
    max_delivery_distance_km: float | None = _UNSET,
    driver_pay_per_km: Decimal | None = _UNSET,
    driver_pay_cap: Decimal | None = _UNSET,
    proof_required: str = _UNSET,
    dispatch_policy: str = _UNSET,
    offer_batch_size: int | None = _UNSET,
    broadcast_max_drivers: int | None = _UNSET,
    matching_window_seconds: int | None = _UNSET,
    stacking_enabled: bool | None = _UNSET,
    stacking_max_detour_minutes: int | None = _UNSET,
) -> DeliveryZone:
    """Change a zone's settings or boundary. A new boundary refreshes the drivers' distances
    to the zone centre; the cached health is dropped after commit. Deliveries keep the zone
    they were given at creation."""
    if isinstance(name, str):  # (the name's lock first, as the console's form takes it: then the zone's row)
        zone_name_lock(name)
    zone = DeliveryZone.objects.select_for_update(of=("self",), no_key=True).filter(pk=zone_id).first()
    if zone is None:
        raise NotFound("Zone not found.")
    changes = {
        "name": name, "geometry": geometry, "priority_level": priority_level,
        "min_drivers_online": min_drivers_online, "target_wait_time_seconds": target_wait_time_seconds,
        "offer_expires_seconds": offer_expires_seconds, "search_radius_km": search_radius_km,
        "max_delivery_distance_km": max_delivery_distance_km, "driver_pay_per_km": driver_pay_per_km,
        "driver_pay_cap": driver_pay_cap, "proof_required": proof_required, "dispatch_policy": dispatch_policy,
        "offer_batch_size": offer_batch_size, "broadcast_max_drivers": broadcast_max_drivers,
        "matching_window_seconds": matching_window_seconds, "stacking_enabled": stacking_enabled,
        "stacking_max_detour_minutes": stacking_max_detour_minutes,
    }
    changes = {k: v for k, v in changes.items() if v is not _UNSET}
    if not changes:
        return zone
    if "geometry" in changes:
        changes["geometry"] = _clean_geometry(changes["geometry"])
    geometry_changed = "geometry" in changes and not changes["geometry"].equals_exact(zone.geometry)
    for field, value in changes.items():
        setattr(zone, field, value)
    if "name" in changes and _name_taken(zone.name, exclude_id=zone.pk):
        raise Conflict(f"A zone named {zone.name!r} already exists.")
    _validate(zone)
    try:
        with transaction.atomic():
            zone.save(update_fields=[*changes, "updated_at"])
    except IntegrityError:
        raise Conflict(f"A zone named {zone.name!r} already exists.")
    if geometry_changed:
        zone_preferences_refresh_distances(zone_id=zone.pk)
    _invalidate_health_cache_on_commit(zone.pk)
    return zone


# ------------------------------------------------------------------------- preferences


_DISTANCE_SQL = f"""
UPDATE {DriverZonePreference._meta.db_table} AS p
SET distance_to_zone_center = CASE
        WHEN d.home_location IS NULL THEN NULL
        ELSE round((ST_Distance(d.home_location, ST_Centroid(z.geometry)::geography) / 1000.0)::numeric, 2)
    END
FROM {Driver._meta.db_table} AS d, {DeliveryZone._meta.db_table} AS z
WHERE p.driver_id = d.id AND p.zone_id = z.id
  AND (%(driver_id)s::uuid IS NULL OR p.driver_id = %(driver_id)s::uuid)
  AND (%(zone_id)s::uuid IS NULL OR p.zone_id = %(zone_id)s::uuid)
  AND p.distance_to_zone_center IS DISTINCT FROM CASE
        WHEN d.home_location IS NULL THEN NULL
        ELSE round((ST_Distance(d.home_location, ST_Centroid(z.geometry)::geography) / 1000.0)::numeric, 2)
    END
"""


@transaction.atomic
def zone_preferences_refresh_distances(*, driver_id=None, zone_id=None) -> int:
    """Recompute `distance_to_zone_center` (km, spheroid distance from the driver's home to
    the zone centroid, 2 decimals; null without a home) for one driver's rows, one zone's
    rows, or all rows. Call it whenever a zone's boundary or a driver's home changes.
    Returns how many rows changed."""
    with connection.cursor() as cur:
        cur.execute(
            _DISTANCE_SQL,
            {"driver_id": str(driver_id) if driver_id else None, "zone_id": str(zone_id) if zone_id else None},
        )
        return cur.rowcount


def _existing_zone_ids_locked(zone_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Lock the referenced zones FOR KEY SHARE (they cannot be deleted before we commit) and
    return those that exist."""
    if not zone_ids:
        return set()
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT id FROM {DeliveryZone._meta.db_table} WHERE id = ANY(%s) ORDER BY id FOR KEY SHARE",
            [zone_ids],
        )
        return {row[0] for row in cur.fetchall()}


@transaction.atomic
def zone_preferences_set(
    *, driver_id, preferences: Iterable[tuple[uuid.UUID, str]], now: datetime | None = None
) -> list[DriverZonePreference]:
    """Replace a driver's zone preferences with `preferences` [(zone id, preference)].

    Zones left out lose their row (the driver is AVAILABLE there again). Unknown zone ids and
    repeated zones are a ValidationError naming them. Rows that stay keep their id. Distances
    to the zone centres are computed from the driver's home.
    """
    now = now or timezone.now()
    items = [(uuid.UUID(str(zone_id)), preference) for zone_id, preference in preferences]
    seen: set[uuid.UUID] = set()
    repeated: list[str] = []
    for zone_id, _ in items:
        if zone_id in seen and str(zone_id) not in repeated:
            repeated.append(str(zone_id))
        seen.add(zone_id)
    if repeated:
        raise ValidationError({"zoneId": [f"Zone {z} is listed more than once." for z in repeated]})
    bad = sorted({p for _, p in items if p not in ZonePreference.values})
    if bad:
        raise ValidationError({"preference": [f"{p!r} is not one of {', '.join(ZonePreference.values)}." for p in bad]})

    # Serialises two PUTs for one driver; NO KEY so that offers/assignments referencing the
    # driver (FK checks take KEY SHARE) are not blocked.
    driver = Driver.objects.select_for_update(of=("self",), no_key=True).filter(pk=driver_id).first()
    if driver is None:
        raise NotFound("Driver not found.")
    existing = _existing_zone_ids_locked(sorted(seen))
    unknown = [str(z) for z, _ in items if z not in existing]
    if unknown:
        raise ValidationError({"zoneId": [f"Unknown zone {z}." for z in unknown]})

    DriverZonePreference.objects.filter(driver=driver).exclude(zone_id__in=seen).delete()
    if items:
        DriverZonePreference.objects.bulk_create(
            [
                DriverZonePreference(driver=driver, zone_id=z, preference=p, created_at=now, updated_at=now)
                for z, p in items
            ],
            update_conflicts=True,
            unique_fields=["driver", "zone"],
            update_fields=["preference", "updated_at"],
        )
    zone_preferences_refresh_distances(driver_id=driver.pk)
    return list(selectors.zone_preferences_of_driver(driver_id=driver.pk))


# ------------------------------------------------------------------------------ health


def zone_health_refresh(*, now: datetime | None = None, zone_ids=None, batch_size: int = 200) -> int:
    """The zone-health job: for every zone (or those in `zone_ids`) compute drivers online,
    average wait, demand and health score; write them on the zone row; after commit cache
    `zone:health:{id}` for 60 s (one pipeline per batch) and emit `zone_health_updated` to ops.

    Idempotent (the same `now` writes the same values). Safe when two run at once: zones are
    claimed with SKIP LOCKED, so a zone is computed by one of them. Bounded batches, each in
    its own transaction. Returns how many zones were refreshed.
    """
    now = now or timezone.now()
    refreshed = 0
    after = None
    while True:
        with transaction.atomic():
            qs = DeliveryZone.objects.select_for_update(of=("self",), no_key=True, skip_locked=True).order_by("pk")
            if zone_ids is not None:
                qs = qs.filter(pk__in=list(zone_ids))
            if after is not None:
                qs = qs.filter(pk__gt=after)
            zones = list(qs[:batch_size])
            if not zones:
                break
            after = zones[-1].pk
            metrics = selectors.zone_metrics_compute(zones, now=now)
            payloads = []
            for zone in zones:
                m = metrics[zone.pk]
                zone.current_drivers_online = m.drivers_online
                zone.avg_wait_time_seconds = m.avg_wait_seconds
                zone.demand_level = m.demand_level
                zone.health_score = m.health_score
                zone.last_updated = now
                payloads.append(selectors.zone_health_payload(zone, m, updated_at=now))
            DeliveryZone.objects.bulk_update(zones, HEALTH_FIELDS)
            # Cache first, then tell ops: a client reacting to the event reads the new value.
            transaction.on_commit(lambda p=payloads: selectors.zone_health_cache_store(p), robust=True)
            for zone, health in zip(zones, payloads):
                broadcast_on_commit([OPS_GROUP], events.zone_health_updated(zone_name=zone.name, health=health))
            refreshed += len(zones)
        if len(zones) < batch_size:
            break
    return refreshed
