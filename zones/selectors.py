"""Reads about zones: membership, drivers inside a zone, preferences and zone health.

Membership everywhere is planar `ST_Covers(zone.geometry, point::geometry)` in SRID 4326:
a point on the boundary is inside, and the same rule serves deliveries, drivers and health.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.gis.db.models import PointField
from django.contrib.gis.geos import Point
from django.db import connection
from django.db.models import BooleanField, ExpressionWrapper, FloatField, Func, Q, QuerySet
from django.db.models.functions import Cast
from django.utils import timezone

from availability.models import Driver, DriverAvailability
from common.errors import iso
from common.exceptions import NotFound
from common.hotsql import cached_first
from common.redis import RedisUnavailable, get_redis
from dispatch.models import Delivery, DeliveryStatus
from zones.events import ZoneHealth
from zones.models import DeliveryZone, DriverZonePreference

logger = logging.getLogger(__name__)

HEALTH_CACHE_SECONDS = 60
ONLINE_STATES = (DriverAvailability.AVAILABLE, DriverAvailability.BUSY)


def health_cache_key(zone_id) -> str:
    return f"zone:health:{zone_id}"


def wait_window() -> timedelta:
    return timedelta(minutes=getattr(settings, "ZONE_HEALTH_WINDOW_MINUTES", 60))


class _GeographyArea(Func):
    """ST_Area of a 4326 geometry on the spheroid, in m² (only to break priority ties)."""

    template = "ST_Area(%(expressions)s::geography)"
    output_field = FloatField()


# ---------------------------------------------------------------------------- membership


def zones_covering(point: Point) -> QuerySet[DeliveryZone]:
    """Zones whose polygon covers `point` (boundary included), best first: priority level
    (1 = highest), then the smaller zone (the more specific one), then id."""
    return (
        DeliveryZone.objects.filter(geometry__covers=point)
        .annotate(area_m2=_GeographyArea("geometry"))
        .order_by("priority_level", "area_m2", "id")
    )


def zone_for_point(point: Point | None) -> DeliveryZone | None:
    """The zone a point belongs to (see `zones_covering`), or None outside every zone."""
    if point is None:
        return None
    if point.srid is None:
        point = Point(point.x, point.y, srid=4326)
    return zones_covering(point).first()


def zone_for_point_and_any(point: Point) -> tuple[DeliveryZone | None, bool]:
    """(the zone of `point` as `zone_for_point` picks it, whether any zone exists) in one
    query: intake refuses a pickup outside every zone only while there are zones."""
    if point.srid is None:
        point = Point(point.x, point.y, srid=4326)
    # every create and quote asks: compiled once per connection (common.hotsql), the point its
    # one parameter; the zones themselves are read by the statement every time
    best = cached_first(("zones.zone_for_point_and_any",), DeliveryZone, _best_zone_first, point)
    if best is None:
        return None, False
    return (best if best.covering else None), True


def _best_zone_first(point: Point) -> QuerySet[DeliveryZone]:
    return DeliveryZone.objects.annotate(
        covering=ExpressionWrapper(Q(geometry__covers=point), output_field=BooleanField()),
        area_m2=_GeographyArea("geometry"),
    ).order_by("-covering", "priority_level", "area_m2", "id")


def zone_get(*, zone_id) -> DeliveryZone:
    zone = DeliveryZone.objects.filter(pk=zone_id).first()
    if zone is None:
        raise NotFound("Zone not found.")
    return zone


def zones_list() -> QuerySet[DeliveryZone]:
    return DeliveryZone.objects.all()


def drivers_inside_zone(qs: QuerySet[Driver], *, zone_id) -> QuerySet[Driver]:
    """Narrow a Driver queryset to drivers whose last known location lies in the zone
    (boundary included, whatever the age of the fix). An unknown zone is a 404."""
    zone = DeliveryZone.objects.filter(pk=zone_id).only("id", "geometry").first()
    if zone is None:
        raise NotFound("Zone not found.")
    return qs.annotate(_location_geom=Cast("location", PointField(srid=4326))).filter(
        _location_geom__coveredby=zone.geometry
    )


# ------------------------------------------------------------------------- preferences


def zone_preferences_for(*, zone_id, driver_ids) -> dict[str, str]:
    """{driver id: PREFERRED | AVAILABLE | UNAVAILABLE} for the drivers who set a preference
    for this zone. Drivers without a row are absent (the dispatch engine treats them as
    AVAILABLE)."""
    ids = [str(d) for d in driver_ids]
    if not ids or zone_id is None:
        return {}
    rows = DriverZonePreference.objects.filter(zone_id=zone_id, driver_id__in=ids).values_list("driver_id", "preference")
    return {str(driver_id): preference for driver_id, preference in rows}


def zone_preferences_of_driver(*, driver_id) -> QuerySet[DriverZonePreference]:
    return DriverZonePreference.objects.filter(driver_id=driver_id).select_related("zone")


# ------------------------------------------------------------------------------ health


@dataclass(frozen=True)
class ZoneMetrics:
    drivers_online: int
    avg_wait_seconds: int
    ready_deliveries: int
    demand_level: int
    health_score: int


def demand_level_for(*, ready: int, online: int) -> int:
    """1 (nothing waiting) … 10 (two or more ready deliveries per online driver, or orders
    waiting with no driver online); at least 2 while anything waits. See docs/zones.md."""
    if ready <= 0:
        return 1
    if online <= 0:
        return 10
    ratio = min(ready / online, 2.0)
    return max(2, min(10, 1 + math.floor(4.5 * ratio + 0.5)))


def health_score_for(*, online: int, min_drivers: int, avg_wait: int, target_wait: int, demand: int) -> int:
    """0-100: 50 % driver coverage, 30 % wait against target, 20 % demand pressure."""
    coverage = 1.0 if min_drivers <= 0 else min(online / min_drivers, 1.0)
    target = max(target_wait, 1)
    wait = 1.0 if avg_wait <= target else max(0.0, 1.0 - (avg_wait - target) / target)
    pressure = 1.0 - (demand - 1) / 9
    return max(0, min(100, math.floor(100 * (0.5 * coverage + 0.3 * wait + 0.2 * pressure) + 0.5)))


_ONLINE_SQL = f"""
SELECT z.id, count(d.id)
FROM {DeliveryZone._meta.db_table} z
JOIN {Driver._meta.db_table} d
  ON d.availability = ANY(%(states)s)
 AND d.location IS NOT NULL
 AND d.location_recorded_at >= %(fresh_after)s
 AND ST_Covers(z.geometry, d.location::geometry)
WHERE z.id = ANY(%(zone_ids)s)
GROUP BY z.id
"""


def _online_counts(zone_ids: list, *, now: datetime) -> dict:
    fresh_after = now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    with connection.cursor() as cur:
        cur.execute(_ONLINE_SQL, {"states": list(ONLINE_STATES), "fresh_after": fresh_after, "zone_ids": zone_ids})
        return {pk: n for pk, n in cur.fetchall()}


_WAIT_SQL = f"""
SELECT zone_id, count(*) FILTER (WHERE waiting), avg(wait_s)
FROM (
    SELECT zone_id, false AS waiting, EXTRACT(EPOCH FROM (assigned_at - ready_at)) AS wait_s
    FROM {Delivery._meta.db_table}
    WHERE zone_id = ANY(%(zone_ids)s) AND assigned_at IS NOT NULL
      AND assigned_at > %(since)s AND assigned_at <= %(now)s
    UNION ALL
    SELECT zone_id, true, EXTRACT(EPOCH FROM (%(now)s - ready_at))
    FROM {Delivery._meta.db_table}
    WHERE zone_id = ANY(%(zone_ids)s) AND status = %(ready)s AND ready_at <= %(now)s
) AS w
GROUP BY zone_id
"""


def _waits(zone_ids: list, *, now: datetime) -> dict:
    """zone id → (ready deliveries now, average wait in s over assignments in the window and
    deliveries still waiting)."""
    with connection.cursor() as cur:
        cur.execute(
            _WAIT_SQL,
            {"zone_ids": zone_ids, "since": now - wait_window(), "now": now, "ready": DeliveryStatus.READY},
        )
        return {pk: (ready, avg) for pk, ready, avg in cur.fetchall()}


def zone_metrics_compute(zones: list[DeliveryZone], *, now: datetime) -> dict:
    """zone id → ZoneMetrics, in three queries whatever the number of zones."""
    ids = [z.pk for z in zones]
    if not ids:
        return {}
    online = _online_counts(ids, now=now)
    waits = _waits(ids, now=now)
    out = {}
    for zone in zones:
        n_online = online.get(zone.pk, 0)
        ready, avg = waits.get(zone.pk, (0, None))
        avg_wait = max(0, math.floor(float(avg) + 0.5)) if avg is not None else 0
        demand = demand_level_for(ready=ready, online=n_online)
        out[zone.pk] = ZoneMetrics(
            drivers_online=n_online,
            avg_wait_seconds=avg_wait,
            ready_deliveries=ready,
            demand_level=demand,
            health_score=health_score_for(
                online=n_online, min_drivers=zone.min_drivers_online, avg_wait=avg_wait,
                target_wait=zone.target_wait_time_seconds, demand=demand,
            ),
        )
    return out


def zone_health_payload(zone: DeliveryZone, metrics: ZoneMetrics, *, updated_at: datetime) -> ZoneHealth:
    """The seed's ZoneHealth shape (what the cache holds and the health endpoint returns)."""
    return {
        "zoneId": str(zone.pk),
        "currentDriversOnline": metrics.drivers_online,
        "minDriversRequired": zone.min_drivers_online,
        "avgWaitTimeSeconds": metrics.avg_wait_seconds,
        "targetWaitTimeSeconds": zone.target_wait_time_seconds,
        "demandLevel": metrics.demand_level,
        "healthScore": metrics.health_score,
        "updatedAt": iso(updated_at),
    }


def zone_health_cached_many(zone_ids) -> dict[str, ZoneHealth]:
    """What the cache holds for these zones (MGET); missing or unreadable entries are absent.
    Raises RedisUnavailable when Redis is down."""
    ids = [str(z) for z in zone_ids]
    if not ids:
        return {}
    values = get_redis().mget([health_cache_key(z) for z in ids])
    out = {}
    for zone_id, raw in zip(ids, values):
        if raw is None:
            continue
        try:
            out[zone_id] = json.loads(raw)
        except (TypeError, ValueError):
            logger.warning("unreadable zone health cache entry for %s", zone_id)
    return out


def zone_health_cache_store(payloads: list[ZoneHealth]) -> None:
    """SET … EX 60 every payload in one pipeline. Never raises: the cache is derived state."""
    if not payloads:
        return
    try:
        pipe = get_redis().pipeline(transaction=False)
        for p in payloads:
            pipe.set(health_cache_key(p["zoneId"]), json.dumps(p), ex=HEALTH_CACHE_SECONDS)
        pipe.execute()
    except RedisUnavailable:
        logger.warning("zone health not cached for %d zones: Redis unavailable", len(payloads))


@dataclass(frozen=True)
class HealthResult:
    health: ZoneHealth
    cache: str  # "hit" | "miss" | "unavailable"


def zone_health_get(*, zone_id, now: datetime | None = None) -> HealthResult:
    """A zone's health from the cache; on a miss it is computed now and cached for 60 s.
    When Redis is down it is computed (and not cached): never an error."""
    zone = zone_get(zone_id=zone_id)
    cache = "miss"
    try:
        cached = zone_health_cached_many([zone.pk]).get(str(zone.pk))
    except RedisUnavailable:
        logger.warning("zone health cache unavailable; computing zone %s", zone.pk)
        cached, cache = None, "unavailable"
    if cached is not None:
        return HealthResult(cached, "hit")
    now = now or timezone.now()
    health = zone_health_payload(zone, zone_metrics_compute([zone], now=now)[zone.pk], updated_at=now)
    if cache == "miss":
        zone_health_cache_store([health])
    return HealthResult(health, cache)
