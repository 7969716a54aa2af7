"""The Redis GEO index of dispatchable drivers, and the "who is near" selector.

`drivers:geo`    GEO set of drivers that are `available` with a location fix.
`drivers:fix`    sorted set: the same drivers scored by the fix time (epoch seconds), so a
                 search can drop stale fixes without touching PostgreSQL.
`drivers:status` hash driver id → availability, for every driver.

Redis holds derived state only. It is written after commit, rebuilt by
`manage.py rebuild_geo_index` and repaired by the reconcile job; when Redis is unreachable the
PostGIS implementation answers the same question.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from availability.models import Driver, DriverAvailability
from common.redis import RedisUnavailable, get_redis

logger = logging.getLogger(__name__)

GEO_KEY = "drivers:geo"
FIX_KEY = "drivers:fix"
STATUS_KEY = "drivers:status"

# Redis GEO cannot store latitudes beyond ±85.05112878° (one such pair fails a whole GEOADD);
# a driver there is simply not indexed, and only the PostGIS path can find it.
GEO_MAX_LAT = 85.05112878

# Both implementations measure great-circle distance on a sphere, but not the same one: Redis
# uses a radius of 6372797.560856 m, PostGIS (`use_spheroid=false`) the WGS84 mean radius
# 6371008.7714 m, 1.4 m apart at 5 km. The PostGIS path is put on Redis's sphere so that both
# answer "within 5 km" and "how far" identically.
REDIS_EARTH_RADIUS_M = 6372797.560856
POSTGIS_SPHERE_RADIUS_M = 6371008.7714150598
_TO_REDIS_SPHERE = REDIS_EARTH_RADIUS_M / POSTGIS_SPHERE_RADIUS_M


@dataclass(frozen=True)
class NearbyDriver:
    driver_id: str
    distance_km: float
    lat: float
    lon: float


def _stale_cutoff(now: datetime) -> datetime:
    return now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)


# ----------------------------------------------------------------------------- writes


# One atomic step per driver. A transition sets the status; a fix (from_fix) leaves it alone and
# is dropped when the status already says the driver left `available` (a late fix write must not
# bring back a driver whose break has begun). Either way a position older than the one indexed
# is dropped, so after-commit writes that run out of order (two workers) never move a driver back.
_INDEX_SCRIPT = """
local member, state, lon, lat, ts = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if ARGV[6] == '1' then
  local known = redis.call('HGET', KEYS[3], member)
  if known and known ~= 'available' then return 0 end
else
  redis.call('HSET', KEYS[3], member, state)
end
if state == 'available' and lon ~= '' then
  local indexed_at = redis.call('ZSCORE', KEYS[2], member)
  if indexed_at and tonumber(indexed_at) > tonumber(ts) then return 0 end
  redis.call('GEOADD', KEYS[1], lon, lat, member)
  redis.call('ZADD', KEYS[2], ts, member)
else
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
return 1
"""
_index_scripts: dict[int, "redis.commands.core.Script"] = {}


def _indexable(lat: float | None, recorded_at: datetime | None) -> bool:
    return lat is not None and recorded_at is not None and abs(lat) <= GEO_MAX_LAT


def index_driver(
    *, driver_id, availability: str, lat: float | None, lon: float | None, recorded_at: datetime | None,
    from_fix: bool = False,
) -> None:
    """Bring one driver's Redis entries in line with its committed state. Never raises.

    `from_fix`: called for a location fix rather than a transition (see _INDEX_SCRIPT)."""
    member = str(driver_id)
    indexed = availability == DriverAvailability.AVAILABLE and _indexable(lat, recorded_at)
    try:
        client = get_redis()
        script = _index_scripts.get(id(client))
        if script is None:
            script = _index_scripts.setdefault(id(client), client.register_script(_INDEX_SCRIPT))
        script(
            keys=[GEO_KEY, FIX_KEY, STATUS_KEY],
            args=[member, availability, repr(lon) if indexed else "", repr(lat) if indexed else "",
                  repr(recorded_at.timestamp()) if indexed else "", "1" if from_fix else "0"],
        )
    except RedisUnavailable:
        logger.warning("GEO index not updated for driver %s: Redis unavailable (reconcile will repair)", member)
    except redis.RedisError:
        logger.exception("GEO index not updated for driver %s (reconcile will repair)", member)


def index_driver_on_commit(driver: Driver) -> None:
    """Queue `index_driver` for after the current transaction commits."""
    loc = driver.location
    args = dict(
        driver_id=driver.pk,
        availability=driver.availability,
        lat=loc.y if loc is not None else None,
        lon=loc.x if loc is not None else None,
        recorded_at=driver.location_recorded_at,
    )
    transaction.on_commit(lambda: index_driver(**args), robust=True)


def _desired_state(now: datetime):
    rows = Driver.objects.values_list("id", "availability", "location", "location_recorded_at")
    statuses, geo = {}, {}
    for pk, availability, loc, recorded_at in rows.iterator(chunk_size=2000):
        member = str(pk)
        statuses[member] = availability
        if availability == DriverAvailability.AVAILABLE and loc is not None and _indexable(loc.y, recorded_at):
            geo[member] = (loc.x, loc.y, recorded_at.timestamp())
    return statuses, geo


def rebuild_index(*, now: datetime | None = None) -> int:
    """Replace the index with PostgreSQL's state in one atomic swap. Returns GEO set size."""
    statuses, geo = _desired_state(now or timezone.now())
    r = get_redis()
    tmp = {k: f"{k}:rebuild" for k in (GEO_KEY, FIX_KEY, STATUS_KEY)}
    pipe = r.pipeline(transaction=True)
    pipe.delete(*tmp.values())
    if geo:
        items = []
        for member, (lon, lat, _) in geo.items():
            items.extend((lon, lat, member))
        pipe.geoadd(tmp[GEO_KEY], items)
        pipe.zadd(tmp[FIX_KEY], {m: ts for m, (_, _, ts) in geo.items()})
    if statuses:
        pipe.hset(tmp[STATUS_KEY], mapping=statuses)
    for key, temp in tmp.items():
        if key == STATUS_KEY and not statuses or key != STATUS_KEY and not geo:
            pipe.delete(key)
        else:
            pipe.rename(temp, key)
    pipe.execute()
    return len(geo)


def reconcile_index(*, now: datetime | None = None) -> dict[str, int]:
    """Repair drift between Redis and PostgreSQL without a full swap (safe to run concurrently
    with live updates: it only adds what PostgreSQL says and removes what it does not have)."""
    statuses, geo = _desired_state(now or timezone.now())
    r = get_redis()
    indexed = set(r.zrange(FIX_KEY, 0, -1)) | set(r.zrange(GEO_KEY, 0, -1))
    extra = indexed - set(geo)
    known = r.hgetall(STATUS_KEY)
    wrong_status = {m: s for m, s in statuses.items() if known.get(m) != s}
    unknown_status = set(known) - set(statuses)
    pipe = r.pipeline(transaction=False)
    if extra:
        pipe.zrem(GEO_KEY, *extra)
        pipe.zrem(FIX_KEY, *extra)
    if geo:
        items = []
        for member, (lon, lat, _) in geo.items():
            items.extend((lon, lat, member))
        pipe.geoadd(GEO_KEY, items)
        pipe.zadd(FIX_KEY, {m: ts for m, (_, _, ts) in geo.items()})
    if wrong_status:
        pipe.hset(STATUS_KEY, mapping=wrong_status)
    if unknown_status:
        pipe.hdel(STATUS_KEY, *unknown_status)
    pipe.execute()
    return {"removed": len(extra), "indexed": len(geo), "statusFixed": len(wrong_status) + len(unknown_status)}


# ------------------------------------------------------------------------------ reads


def drivers_near_redis(*, lat: float, lon: float, radius_km: float, limit: int, now: datetime) -> list[NearbyDriver]:
    r = get_redis()
    cutoff = _stale_cutoff(now).timestamp()
    # Fetch a little more than asked, since stale members are dropped below; when that was not
    # enough (many stale drivers nearest the point), search again for more.
    count = max(limit * 2, limit + 20)
    while True:
        rows = r.geosearch(
            GEO_KEY, longitude=lon, latitude=lat, radius=radius_km, unit="km", sort="ASC",
            count=count, withdist=True, withcoord=True,
        )
        if not rows:
            return []
        fix_times = r.zmscore(FIX_KEY, [row[0] for row in rows])
        out = []
        for (member, dist, (m_lon, m_lat)), fixed_at in zip(rows, fix_times):
            if fixed_at is None or fixed_at < cutoff:
                continue
            out.append(NearbyDriver(member, float(dist), float(m_lat), float(m_lon)))
            if len(out) == limit:
                return out
        if len(rows) < count:
            return out
        count *= 4


_KNN_SQL = """
SELECT id, ST_Y(location::geometry), ST_X(location::geometry),
       ST_Distance(location, ref.g, false) * %(to_redis_sphere)s / 1000.0
FROM dispatch_driver,
     (SELECT ST_SetSRID(ST_MakePoint(%(lon)s, %(lat)s), 4326)::geography AS g) AS ref
WHERE availability = 'available'
  AND location IS NOT NULL
  AND location_recorded_at >= %(cutoff)s
  AND ST_DWithin(location, ref.g, %(radius_m)s / %(to_redis_sphere)s, false)
ORDER BY location <-> ref.g
LIMIT %(limit)s
"""


def drivers_near_postgis(*, lat: float, lon: float, radius_km: float, limit: int, now: datetime) -> list[NearbyDriver]:
    with connection.cursor() as cur:
        cur.execute(
            _KNN_SQL,
            {"lat": lat, "lon": lon, "radius_m": radius_km * 1000.0, "cutoff": _stale_cutoff(now), "limit": limit,
             "to_redis_sphere": _TO_REDIS_SPHERE},
        )
        return [NearbyDriver(str(pk), float(dist), float(y), float(x)) for pk, y, x, dist in cur.fetchall()]


def drivers_available_near(*, lat: float, lon: float, radius_km: float, limit: int = 20, now: datetime | None = None) -> list[NearbyDriver]:
    """Available drivers with a fresh fix within `radius_km`, nearest first.

    Redis GEOSEARCH first; PostGIS (`ST_DWithin` + KNN on the GiST index) when Redis is down.
    """
    now = now or timezone.now()
    try:
        return drivers_near_redis(lat=lat, lon=lon, radius_km=radius_km, limit=limit, now=now)
    except RedisUnavailable:
        logger.warning("drivers_available_near: Redis unavailable, using PostGIS")
        return drivers_near_postgis(lat=lat, lon=lon, radius_km=radius_km, limit=limit, now=now)
