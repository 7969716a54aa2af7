"""The Redis GEO index of dispatchable drivers, and the "who is near" selector.

The keys are fleet keys (`common.redis.fleet_key`): they share one hash tag, so the index
script and the search script, which touch several of them, stay in one Redis Cluster slot.

`{fleet}:drivers:geo`    GEO set of drivers that are `available` with a fresh location fix.
`{fleet}:drivers:fix`    sorted set: the same drivers scored by the fix time (epoch seconds).
                         A search removes the members whose fix went stale from both (see
                         _SEARCH_SCRIPT); their next fix puts them back.
`{fleet}:drivers:status` hash driver id → availability, for every driver.
`{fleet}:drivers:status_at` hash driver id → when that availability began (epoch seconds,
                         PostgreSQL's `last_availability_change`): the fix script puts it in
                         the ops position digest, so that the live map takes the newer of the
                         digest's availability and the last `availability_changed` it saw.
`{fleet}:drivers:version` hash driver id → how many transitions `index_driver` has written
                         (the reconcile repairs a member only if none came since it read).

Redis holds derived state only. It is written after commit, rebuilt by
`manage.py rebuild_geo_index` and repaired by the reconcile job; when Redis is unreachable the
PostGIS implementation answers the same question.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from availability.models import Driver, DriverAvailability
from common.redis import RedisUnavailable, fleet_key, get_redis

logger = logging.getLogger(__name__)

# Computed once, at import (the fleet tag is a deployment setting).
GEO_KEY = fleet_key("drivers:geo")
FIX_KEY = fleet_key("drivers:fix")
STATUS_KEY = fleet_key("drivers:status")
STATUS_AT_KEY = fleet_key("drivers:status_at")
VERSION_KEY = fleet_key("drivers:version")

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


class NearbyDriver(NamedTuple):
    """A driver found near a point. lat/lon: the position the index holds (None when the
    caller asked for no positions). A named tuple: the search builds up to hundreds a call."""

    driver_id: str
    distance_km: float
    lat: float | None = None
    lon: float | None = None


def _stale_cutoff(now: datetime) -> datetime:
    return now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)


# ----------------------------------------------------------------------------- writes


# One atomic step per driver. A transition sets the status; a fix (from_fix) leaves it alone and
# is dropped when the status already says the driver left `available` (a late fix write must not
# bring back a driver whose break has begun). Either way a position older than the one indexed
# is dropped, so after-commit writes that run out of order (two workers) never move a driver back.
# A transition stamps its status with its time (ARGV[7], '' = unknown: the stamp is removed).
_INDEX_SCRIPT = """
local member, state, lon, lat, ts = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if ARGV[6] == '1' then
  local known = redis.call('HGET', KEYS[3], member)
  if known and known ~= 'available' then return 0 end
else
  redis.call('HSET', KEYS[3], member, state)
  redis.call('HINCRBY', KEYS[4], member, 1)
  if ARGV[7] ~= '' then redis.call('HSET', KEYS[5], member, ARGV[7]) else redis.call('HDEL', KEYS[5], member) end
end
if state == 'available' then
  -- the driver's live position (the fast lane's, KEYS[6]) when it is newer than the one given:
  -- a fix the stream consumer has not written to PostgreSQL yet (a resume right after the
  -- app's first fix read none there, took the driver out, and no later fix put it back)
  local live = redis.call('HMGET', KEYS[6], 'lat', 'lon', 't')
  local live_lat, live_lon, live_t = tonumber(live[1]), tonumber(live[2]), tonumber(live[3])
  if live_lat and live_lon and live_t and (ts == '' or live_t > tonumber(ts)) and math.abs(live_lat) <= tonumber(ARGV[8]) then
    lat, lon, ts = live[1], live[2], live[3]
  end
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
_index_scripts: dict[int, redis.commands.core.Script] = {}


def live_driver_key(driver_id) -> str:
    """The driver's live state in Redis (its last position, written by every accepted fix;
    `availability.live`), beside the index's keys (the fleet's hash tag)."""
    return fleet_key(f"drv:{driver_id}")


def _indexable(lat: float | None, recorded_at: datetime | None) -> bool:
    return lat is not None and recorded_at is not None and abs(lat) <= GEO_MAX_LAT


def index_driver(
    *, driver_id, availability: str, lat: float | None, lon: float | None, recorded_at: datetime | None,
    from_fix: bool = False, changed_at: datetime | None = None,
) -> None:
    """Bring one driver's Redis entries in line with its committed state. Never raises.

    `from_fix`: called for a location fix rather than a transition (see _INDEX_SCRIPT).
    `changed_at`: when the availability began (a transition's time). An available driver is
    indexed at the newer of the position given and its live one in Redis (the fast lane's fix,
    which the stream consumer may not have written to PostgreSQL yet)."""
    member = str(driver_id)
    indexed = availability == DriverAvailability.AVAILABLE and _indexable(lat, recorded_at)
    try:
        client = get_redis()
        script = _index_scripts.get(id(client))
        if script is None:
            script = _index_scripts.setdefault(id(client), client.register_script(_INDEX_SCRIPT))
        script(
            keys=[GEO_KEY, FIX_KEY, STATUS_KEY, VERSION_KEY, STATUS_AT_KEY, live_driver_key(member)],
            args=[member, availability, repr(lon) if indexed else "", repr(lat) if indexed else "",
                  repr(recorded_at.timestamp()) if indexed else "", "1" if from_fix else "0",
                  repr(changed_at.timestamp()) if changed_at is not None else "", repr(GEO_MAX_LAT)],
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
        changed_at=driver.last_availability_change,
    )
    transaction.on_commit(lambda: index_driver(**args), robust=True)


def _desired_state(now: datetime):
    """PostgreSQL's view: driver id → availability, → when it began (epoch seconds, for the
    drivers that have a time), and the indexable drivers' positions."""
    rows = Driver.objects.values_list("id", "availability", "last_availability_change", "location", "location_recorded_at")
    statuses, since, geo = {}, {}, {}
    for pk, availability, changed_at, loc, recorded_at in rows.iterator(chunk_size=2000):
        member = str(pk)
        statuses[member] = availability
        if changed_at is not None:
            since[member] = changed_at.timestamp()
        if availability == DriverAvailability.AVAILABLE and loc is not None and _indexable(loc.y, recorded_at):
            geo[member] = (loc.x, loc.y, recorded_at.timestamp())
    return statuses, since, geo


def rebuild_index(*, now: datetime | None = None) -> int:
    """Replace the index with PostgreSQL's state in one atomic swap. Returns GEO set size.

    Every driver's version is bumped in the swap, so that a reconcile that read Redis before
    it does not write its older reading over it. What changed between the read of PostgreSQL
    and the swap (a transition, a fix) is overwritten: `manage.py rebuild_geo_index` runs a
    reconcile right after, which repairs the statuses (positions follow with the next fix)."""
    statuses, since, geo = _desired_state(now or timezone.now())
    r = get_redis()
    tmp = {k: f"{k}:rebuild" for k in (GEO_KEY, FIX_KEY, STATUS_KEY, STATUS_AT_KEY)}
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
    if since:
        pipe.hset(tmp[STATUS_AT_KEY], mapping={m: repr(t) for m, t in since.items()})
    filled = {GEO_KEY: geo, FIX_KEY: geo, STATUS_KEY: statuses, STATUS_AT_KEY: since}
    for key, temp in tmp.items():
        if not filled[key]:
            pipe.delete(key)
        else:
            pipe.rename(temp, key)
    for member in statuses:
        pipe.hincrby(VERSION_KEY, member, 1)
    pipe.execute()
    return len(geo)


# The reconcile's repair of a chunk of members, each atomic and each only if no transition
# wrote the member since the reconcile read Redis, before it read PostgreSQL (its version and
# status unchanged: a transition meanwhile wrote Redis itself and is newer than the snapshot,
# even one undone since), and never moving a member to an older fix than the one indexed.
# A status it repairs gets PostgreSQL's time of it (the status stamp, '' = none), and a right
# status without a stamp (written before stamps existed) gets one.
# KEYS: GEO set, fix zset, status hash, version hash, status stamp hash. ARGV: eight per member:
# member, version read ('' = none), status read ('' = none), PostgreSQL's status ('' = no such
# driver), lon, lat, fix time ('' = no fix), PostgreSQL's time of the status ('' = none).
# Returns {removed from the index, statuses changed}.
_RECONCILE_SCRIPT = """
local removed, fixed = 0, 0
for i = 1, #ARGV, 8 do
  local m, want = ARGV[i], ARGV[i + 3]
  local cur = redis.call('HGET', KEYS[3], m) or ''
  if (redis.call('HGET', KEYS[4], m) or '') == ARGV[i + 1] and cur == ARGV[i + 2] then
    if want == '' then
      if cur ~= '' then redis.call('HDEL', KEYS[3], m) redis.call('HDEL', KEYS[5], m) fixed = fixed + 1 end
    elseif cur ~= want then
      redis.call('HSET', KEYS[3], m, want) fixed = fixed + 1
      if ARGV[i + 7] ~= '' then redis.call('HSET', KEYS[5], m, ARGV[i + 7]) else redis.call('HDEL', KEYS[5], m) end
    elseif ARGV[i + 7] ~= '' and redis.call('HEXISTS', KEYS[5], m) == 0 then
      redis.call('HSET', KEYS[5], m, ARGV[i + 7])
    end
    if want == 'available' then
      if ARGV[i + 6] ~= '' then
        local at = redis.call('ZSCORE', KEYS[2], m)
        if not at or tonumber(at) <= tonumber(ARGV[i + 6]) then
          redis.call('GEOADD', KEYS[1], ARGV[i + 4], ARGV[i + 5], m)
          redis.call('ZADD', KEYS[2], ARGV[i + 6], m)
        end
      end
    elseif redis.call('ZREM', KEYS[2], m) + redis.call('ZREM', KEYS[1], m) > 0 then
      removed = removed + 1
    end
  end
end
return {removed, fixed}
"""
_RECONCILE_CHUNK = 500
_SAME_PLACE_DEG = 1e-5  # GEO's 52-bit geohash keeps a position to ~0.6 m


def reconcile_index(*, now: datetime | None = None) -> dict[str, int]:
    """Repair drift between Redis and PostgreSQL without a full swap, safe alongside live
    updates: Redis is read first (one MULTI), then PostgreSQL, and only the members that differ
    are sent to `_RECONCILE_SCRIPT`, which repairs each only if no transition wrote it since,
    never to an older fix than the one indexed (the fast lane's fixes reach PostgreSQL later),
    and keeps indexed a driver PostgreSQL says is available with the fix only Redis has."""
    r = get_redis()
    pipe = r.pipeline(transaction=True)
    pipe.hgetall(STATUS_KEY)
    pipe.hgetall(VERSION_KEY)
    pipe.zrange(FIX_KEY, 0, -1, withscores=True)
    pipe.zrange(GEO_KEY, 0, -1)
    pipe.hkeys(STATUS_AT_KEY)
    known, versions, scored, in_geo, stamped = pipe.execute()
    stamped = set(stamped)
    scores = dict(scored)
    indexed = set(scores) | set(in_geo)
    statuses, since, geo = _desired_state(now or timezone.now())

    # members indexed at the fix time PostgreSQL has: repaired only if at another place
    same_time = [m for m, (_, _, ts) in geo.items() if statuses[m] == known.get(m) and scores.get(m) == ts and m in in_geo]
    moved = set()
    for start in range(0, len(same_time), 5000):
        chunk = same_time[start : start + 5000]
        for member, place in zip(chunk, r.geopos(GEO_KEY, *chunk)):
            lon, lat, _ = geo[member]
            if place is None or abs(place[0] - lon) > _SAME_PLACE_DEG or abs(place[1] - lat) > _SAME_PLACE_DEG:
                moved.add(member)

    args = []
    for member in set(statuses) | set(known) | indexed:
        want = statuses.get(member, "")
        lon, lat, ts = geo.get(member, ("", "", ""))
        if want == known.get(member, "") and (member in stamped or member not in since):
            if want != "available" and member not in indexed:
                continue  # nothing to change
            if want == "available" and (ts == "" or (member in in_geo and scores.get(member, -1) >= ts
                                                      and member not in moved)):
                continue  # indexed at this fix or a newer one only Redis has (or no fix to index)
        args.append((member, versions.get(member, ""), known.get(member, ""), want,
                     repr(lon) if ts != "" else "", repr(lat) if ts != "" else "", repr(ts) if ts != "" else "",
                     repr(since[member]) if member in since else ""))
    removed = fixed = 0
    script = r.register_script(_RECONCILE_SCRIPT)
    for start in range(0, len(args), _RECONCILE_CHUNK):
        flat = [value for member_args in args[start : start + _RECONCILE_CHUNK] for value in member_args]
        chunk_removed, chunk_fixed = script(keys=[GEO_KEY, FIX_KEY, STATUS_KEY, VERSION_KEY, STATUS_AT_KEY], args=flat)
        removed, fixed = removed + chunk_removed, fixed + chunk_fixed
    return {"removed": removed, "indexed": len(geo), "statusFixed": fixed}


# ------------------------------------------------------------------------------ reads

# The nearest `limit` fresh drivers within R, in one round trip, without measuring and sorting
# every member within R. A GEOSEARCH over R (ASC COUNT n) computes the distance of every member
# of the geohash boxes that cover R — 5,000 drivers within 5 km of a busy pickup and many more
# around them — however few it returns. The script instead searches growing rings
# r₀ < r₁ < … ≤ R, each `ASC COUNT c`: Redis returns the c nearest members within r, in its
# own exact order.
#
# Stale members first leave the index: the script removes (from both sets) up to PURGE_MAX
# members whose fix is older than the cutoff by the caller's clock *and* by Redis's (`TIME`),
# so the set holds fresh drivers only and the rings need not ask for spares. What is removed is
# stale for good (a later fix puts the driver back: the fix script and `index_driver` add a
# driver whose fix time is missing); a caller's `now` ahead of Redis's clock never removes a
# driver that is fresh by Redis's. Freshness is still checked, but only on the rows that make
# the answer: whatever the purge could not remove (fix times between Redis's cutoff and a
# later caller's, more than PURGE_MAX stale at once, a member without a fix time) is skipped
# exactly as before.
#
# Walking a ring's rows nearest first, the first `limit` with a fresh fix are the answer as
# soon as there are `limit` of them: every member not returned, within the ring or beyond it,
# is farther. Otherwise:
#   - the ring returned c members (there may be more within it, and the nearest c include
#     stale ones): ask the same ring for ×4 as many;
#   - the ring returned fewer than c (it is complete, so its member count and fresh share give
#     the density): grow the ring so that it should hold 1.25 × limit fresh drivers (×1.25 to ×4
#     per step), and c so that those are among the nearest c; at R, what the ring holds is the
#     answer.
# The answer is therefore exactly what one sorted search over R would give, in the same order,
# whatever the first ring and COUNT. The first ring comes from the caller: the distance of the
# limit-th driver the last search of that area found (×RING_HINT_MARGIN, see drivers_near_redis),
# so one ring of COUNT limit + a few usually suffices; without one, R × FIRST_RING_SHARE.
# Everything runs in one script: one round trip, one consistent snapshot; the two keys share a
# hash slot (fleet_key). The answer comes back as one string, "member\\ndist_m[\\nlon\\nlat]\\n…"
# (members are driver UUIDs; positions only when asked for): one bulk reply parses much faster
# than 2–4 × limit of them.
#
# ARGV: lon, lat, R (m), limit, stale cutoff (epoch s), first ring (m), first COUNT, stale after
# (s), positions ('1' or '0'), PURGE_MAX.
# Returns {answer, rings searched, last ring (m), its COUNT, members purged}.
_SEARCH_SCRIPT = """
local lon, lat = ARGV[1], ARGV[2]
local R, limit, cutoff = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local r, c = tonumber(ARGV[6]), tonumber(ARGV[7])
-- stale by both clocks: out of the index
local now = redis.call('TIME')
local below = math.min(cutoff, tonumber(now[1]) + tonumber(now[2]) / 1000000 - tonumber(ARGV[8]))
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%.17g', below),
                        'LIMIT', 0, tonumber(ARGV[10]))
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
local rings = 0
while true do
  rings = rings + 1
  -- R goes to Redis as it came (a Lua number would be printed again, maybe rounded). Past 24
  -- searches (it never takes that many) the whole radius, unbounded, settles it.
  local last, rows = r >= R or rings > 24
  if rings > 24 then
    rows = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', lon, lat, 'BYRADIUS', ARGV[3], 'm', 'ASC', 'WITHDIST')
    c = #rows + 1
  else
    rows = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', lon, lat, 'BYRADIUS', last and ARGV[3] or r, 'm',
                      'ASC', 'COUNT', c, 'WITHDIST')
  end
  local n = #rows
  -- the fresh ones, nearest first, until `limit`: fix times for about as many rows as should
  -- still be needed at the fresh share seen so far (at most 1,000 a call: unpack() is bounded)
  local members, dists, f, i = {}, {}, 0, 1
  while i <= n and f < limit do
    local j = math.min(n, i + math.min(999, math.ceil((limit - f) * (i + 7) / (f + 8) * 1.125) + 7))
    local batch = {}
    for k = i, j do batch[k - i + 1] = rows[k][1] end
    local scores = redis.call('ZMSCORE', KEYS[2], unpack(batch))
    for k = i, j do
      local score = scores[k - i + 1]
      if score and tonumber(score) >= cutoff then
        f = f + 1
        members[f] = rows[k][1]
        dists[f] = rows[k][2]
        if f == limit then break end
      end
    end
    i = j + 1
  end
  if f >= limit or (last and n < c) then
    local out = {}
    if ARGV[9] == '1' then
      for i = 1, f, 1000 do
        local j = math.min(f, i + 999)
        local pos = redis.call('GEOPOS', KEYS[1], unpack(members, i, j))
        for k = i, j do
          local p, o = pos[k - i + 1], 4 * k
          out[o - 3] = members[k]; out[o - 2] = dists[k]; out[o - 1] = p[1]; out[o] = p[2]
        end
      end
    else
      for k = 1, f do out[2 * k - 1] = members[k]; out[2 * k] = dists[k] end
    end
    return {table.concat(out, '\\n'), rings, tostring(last and R or r), c, #gone}
  end
  if n >= c then
    -- the c nearest within the ring include stale ones: the same ring, ×4 as many
    c = c * 4
  else
    -- the ring holds n members, f of them fresh: grow it to hold 1.25 × limit (+4) fresh
    local grow = 4
    if f > 0 then grow = math.sqrt((1.25 * limit + 4) / f) end
    if grow < 1.25 then grow = 1.25 elseif grow > 4 then grow = 4 end
    local want = math.ceil(1.5 * limit * (n + 2) / (f + 1)) + 16
    if c < want then c = want end
    r = r * grow
  end
end
"""
_search_scripts: dict[int, redis.commands.core.Script] = {}

# Without a hint, the first ring as a share of the radius (bench/candidate_search.py).
FIRST_RING_SHARE = 0.125
# Stale members one search removes at most (a search after a long outage, or after the
# reconcile job re-added stale drivers, stays short; the rest go with the next searches).
PURGE_MAX = 256
# The first ring from a hint: the last search's limit-th distance in that area × this margin
# (density varies within an area; a ring that turns out short costs a second, larger one).
RING_HINT_MARGIN = 1.15
RING_HINT_MIN_M = 10.0
# Hints per process, by (limit, ~5.5 km cell): at most this many, then forgotten.
RING_HINT_CELLS_PER_DEGREE = 20
RING_HINTS_MAX = 4096
_ring_hints: dict[tuple[int, int, int], float] = {}


def _first_count(limit: int) -> int:
    # the index holds fresh drivers only (the purge): a few spares for what it could not remove
    return limit + max(2, limit // 16)


@dataclass(frozen=True)
class SearchTrace:
    """How a search went, for the benchmark and tests: GEOSEARCH calls made (asking a ring again
    for more counts as another), the radius of the first and the last one in metres, the last
    one's COUNT, and how many stale members the search removed from the index."""

    rings: int
    last_radius_m: float
    last_count: int
    first_radius_m: float = 0.0
    purged: int = 0


def candidate_search(
    client: redis.Redis, *, geo_key: str, fix_key: str, lat: float, lon: float, radius_km: float, limit: int,
    cutoff: float, positions: bool = True, first_ring_m: float | None = None, stale_after: float | None = None,
) -> tuple[list[NearbyDriver], SearchTrace]:
    """The `limit` nearest members of `geo_key` within `radius_km` whose score in `fix_key` is
    at least `cutoff` (epoch seconds), nearest first; see _SEARCH_SCRIPT. Members older than
    both `cutoff` and Redis's clock − `stale_after` (default DRIVER_STALE_AFTER_SECONDS) are
    removed from both keys on the way. `positions=False`: lat and lon are None (cheaper).
    `first_ring_m`: the first ring's radius (default radius × FIRST_RING_SHARE)."""
    if limit <= 0:
        return [], SearchTrace(0, 0.0, 0)
    script = _search_scripts.get(id(client))
    if script is None:
        script = _search_scripts.setdefault(id(client), client.register_script(_SEARCH_SCRIPT))
    radius_m = radius_km * 1000.0
    first = radius_m * FIRST_RING_SHARE if first_ring_m is None else min(first_ring_m, radius_m)
    if stale_after is None:
        stale_after = settings.DRIVER_STALE_AFTER_SECONDS
    payload, rings, last_radius, last_count, purged = script(
        keys=[geo_key, fix_key],
        args=[repr(float(lon)), repr(float(lat)), repr(radius_m), int(limit), repr(float(cutoff)), repr(first),
              _first_count(limit), repr(float(stale_after)), "1" if positions else "0", PURGE_MAX],
    )
    trace = SearchTrace(int(rings), float(last_radius), int(last_count), first, int(purged))
    if not payload:
        return [], trace
    parts = payload.split("\n")
    make = tuple.__new__  # NearbyDriver(...) without the keyword machinery: 100 of them add up
    if positions:
        found = [make(NearbyDriver, (m, float(d) / 1000.0, float(la), float(lo)))
                 for m, d, lo, la in zip(parts[0::4], parts[1::4], parts[2::4], parts[3::4])]
    else:
        found = [make(NearbyDriver, (m, float(d) / 1000.0, None, None)) for m, d in zip(parts[0::2], parts[1::2])]
    return found, trace


def _hint_key(lat: float, lon: float, limit: int) -> tuple[int, int, int]:
    return limit, math.floor(lat * RING_HINT_CELLS_PER_DEGREE), math.floor(lon * RING_HINT_CELLS_PER_DEGREE)


def drivers_near_redis(
    *, lat: float, lon: float, radius_km: float, limit: int, now: datetime, positions: bool = True,
) -> list[NearbyDriver]:
    return search_near_redis(lat=lat, lon=lon, radius_km=radius_km, limit=limit, now=now, positions=positions)[0]


def search_near_redis(
    *, lat: float, lon: float, radius_km: float, limit: int, now: datetime, positions: bool = True,
) -> tuple[list[NearbyDriver], SearchTrace]:
    """drivers_near_redis, and how the search went (bench/candidate_search.py)."""
    # The first ring: where the last search for as many drivers around here found the last of
    # them (this process's memory; a wrong hint costs time, never changes the answer).
    key = _hint_key(lat, lon, limit)
    hint = _ring_hints.get(key)
    found, trace = candidate_search(
        get_redis(), geo_key=GEO_KEY, fix_key=FIX_KEY, lat=lat, lon=lon, radius_km=radius_km, limit=limit,
        cutoff=_stale_cutoff(now).timestamp(), positions=positions,
        first_ring_m=None if hint is None else max(RING_HINT_MIN_M, hint * RING_HINT_MARGIN),
    )
    if limit > 0:
        if len(_ring_hints) >= RING_HINTS_MAX and key not in _ring_hints:
            _ring_hints.clear()
        _ring_hints[key] = found[-1].distance_km * 1000.0 if len(found) == limit else radius_km * 1000.0
    return found, trace


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


def drivers_near_postgis(
    *, lat: float, lon: float, radius_km: float, limit: int, now: datetime, positions: bool = True,
) -> list[NearbyDriver]:
    with connection.cursor() as cur:
        cur.execute(
            _KNN_SQL,
            {"lat": lat, "lon": lon, "radius_m": radius_km * 1000.0, "cutoff": _stale_cutoff(now), "limit": limit,
             "to_redis_sphere": _TO_REDIS_SPHERE},
        )
        if not positions:
            return [NearbyDriver(str(pk), float(dist)) for pk, _, _, dist in cur.fetchall()]
        return [NearbyDriver(str(pk), float(dist), float(y), float(x)) for pk, y, x, dist in cur.fetchall()]


def drivers_available_near(
    *, lat: float, lon: float, radius_km: float, limit: int = 20, now: datetime | None = None, positions: bool = True,
) -> list[NearbyDriver]:
    """Available drivers with a fresh fix within `radius_km`, nearest first.

    Redis GEOSEARCH first; PostGIS (`ST_DWithin` + KNN on the GiST index) when Redis is down,
    and around a point beyond GEO_MAX_LAT, which GEOSEARCH refuses (a pickup at -87° was a 500
    on create and quote) and near which no driver is indexed.
    `positions=False`: each driver's lat and lon are None (dispatch ranks by distance only, and
    the search skips reading and sending the positions).
    """
    now = now or timezone.now()
    if abs(lat) > GEO_MAX_LAT:
        return drivers_near_postgis(lat=lat, lon=lon, radius_km=radius_km, limit=limit, now=now, positions=positions)
    try:
        return drivers_near_redis(lat=lat, lon=lon, radius_km=radius_km, limit=limit, now=now, positions=positions)
    except RedisUnavailable:
        logger.warning("drivers_available_near: Redis unavailable, using PostGIS")
        return drivers_near_postgis(lat=lat, lon=lon, radius_km=radius_km, limit=limit, now=now, positions=positions)
