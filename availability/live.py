"""The live fleet state in Redis: where each driver is now, written first by the location
fast lane, then persisted to PostgreSQL in batches from a stream.

Keys (all under the fleet's hash tag, `common.redis.fleet_key`, so one script may touch them
under Redis Cluster):

`{fleet}:drv:<id>`        hash: lat, lon, t (recorded-at, epoch s), acc, speed, heading
`{fleet}:tokens:<id>`     set: sha256 of the driver's API tokens seen (60 s at most, never
                          past a token's expiry; forgotten on revoke)
`{fleet}:tokens:gen`      counter of revocations: a token looked up before one is not cached
`{fleet}:fixes`           stream of accepted fixes, read by `manage.py consume_fixes`
`{fleet}:moved`           hash driver id → latest position since the last ops digest, with the
                          availability read with it and when that began ("lat,lon,t,heading,
                          status,status since")
`{fleet}:drivers:active`  hash driver id → the deliveries it is on, comma-separated in the order
                          they were assigned (for customer tracking; several with order stacking)
plus the GEO index of availability/geo.py (`{fleet}:drivers:geo`, `…:fix`, `…:status`,
`…:status_at`).

PostgreSQL stays the source of truth for everything but the last second of positions: the
stream consumer writes each fix with the same recorded-at guard, and the reconcile job and
`rebuild_geo_index` repair Redis from PostgreSQL.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone

import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.db import connection
from django.utils import timezone

from availability import geo
from availability.models import Driver
from common.redis import RedisFailed, ScriptBatcher, evalsha_many, fleet_key, get_redis

logger = logging.getLogger(__name__)

STREAM_KEY = fleet_key("fixes")
MOVED_KEY = fleet_key("moved")
ACTIVE_KEY = fleet_key("drivers:active")
STREAM_GROUP = "pg"
AUTH_TTL_SECONDS = 60
AUTH_GEN_KEY = fleet_key("tokens:gen")


driver_key = geo.live_driver_key


def auth_key(driver_id) -> str:
    return fleet_key(f"tokens:{driver_id}")


# One round trip per fix. KEYS: driver hash, status hash, GEO set, fix zset, stream, moved
# hash, active hash, auth key, throttle key, auth generation, status stamp hash. ARGV: driver id, lat, lon, t, acc, speed, heading,
# token digest ('' = already authenticated: the database path), throttle limit (-1: none), period,
# stream max length, append (1: fast lane, 0: already in PostgreSQL), max GEO latitude.
# Returns {code, accepted, active delivery ids (comma-separated)}: code 'ok', 'auth' (the token is not known to
# belong to this driver: resolve it and retry; the third item is then the auth generation) or 'throttled'.
_FIX_SCRIPT = """
local id = ARGV[1]
if ARGV[8] ~= '' then
  if redis.call('SISMEMBER', KEYS[8], ARGV[8]) == 0 then return {'auth', 0, redis.call('GET', KEYS[10]) or ''} end
  if tonumber(ARGV[9]) >= 0 then
    local n = redis.call('INCR', KEYS[9])
    if n == 1 then redis.call('EXPIRE', KEYS[9], tonumber(ARGV[10]) + 1) end
    if n > tonumber(ARGV[9]) then return {'throttled', 0, ''} end
  end
end
local active = redis.call('HGET', KEYS[7], id) or ''
local t = tonumber(ARGV[4])
local prev = redis.call('HGET', KEYS[1], 't')
if prev and tonumber(prev) >= t then return {'ok', 0, active} end
redis.call('HSET', KEYS[1], 'lat', ARGV[2], 'lon', ARGV[3], 't', ARGV[4], 'acc', ARGV[5], 'speed', ARGV[6], 'heading', ARGV[7])
local status = redis.call('HGET', KEYS[2], id)
if status == 'available' and math.abs(tonumber(ARGV[2])) <= tonumber(ARGV[13]) then
  local indexed_at = redis.call('ZSCORE', KEYS[4], id)
  if not indexed_at or tonumber(indexed_at) <= t then
    redis.call('GEOADD', KEYS[3], ARGV[3], ARGV[2], id)
    redis.call('ZADD', KEYS[4], ARGV[4], id)
  end
end
if ARGV[12] == '1' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[11], '*', 'd', id, 'lat', ARGV[2], 'lon', ARGV[3], 't', ARGV[4],
             'acc', ARGV[5], 'speed', ARGV[6], 'heading', ARGV[7])
end
redis.call('HSET', KEYS[6], id, ARGV[2] .. ',' .. ARGV[3] .. ',' .. ARGV[4] .. ',' .. ARGV[7] .. ',' .. (status or '')
           .. ',' .. (status and redis.call('HGET', KEYS[11], id) or ''))
return {'ok', 1, active}
"""
_FIX_SHA = hashlib.sha1(_FIX_SCRIPT.encode()).hexdigest()


@dataclass(frozen=True)
class Fix:
    driver_id: str
    lat: float
    lon: float
    recorded_at: float  # epoch seconds
    accuracy_m: float | None = None
    speed: float | None = None
    heading: float | None = None


@dataclass(frozen=True)
class FixOutcome:
    code: str  # ok | auth | throttled
    accepted: bool = False
    active_delivery_ids: tuple[str, ...] = ()
    auth_generation: str = ""  # (code auth) the revocations counted before the token is looked up


def _num(value) -> str:
    return "" if value is None else repr(float(value))


def _script_call(fix: Fix, *, token_digest_: str, throttle_key: str, limit: int, period: int, append: bool):
    keys = [driver_key(fix.driver_id), geo.STATUS_KEY, geo.GEO_KEY, geo.FIX_KEY, STREAM_KEY, MOVED_KEY, ACTIVE_KEY,
            auth_key(fix.driver_id), throttle_key, AUTH_GEN_KEY, geo.STATUS_AT_KEY]
    args = [fix.driver_id, repr(fix.lat), repr(fix.lon), repr(fix.recorded_at), _num(fix.accuracy_m), _num(fix.speed),
            _num(fix.heading), token_digest_, limit, period, settings.FIX_STREAM_MAXLEN, "1" if append else "0",
            geo.GEO_MAX_LAT]
    return keys, args


def _outcome(reply) -> FixOutcome:
    code, accepted, third = reply
    if code == "auth":
        return FixOutcome(code=code, auth_generation=third or "")
    return FixOutcome(code=code, accepted=bool(int(accepted)), active_delivery_ids=split_ids(third))


async def fix_record_async(
    client: aioredis.Redis, fix: Fix, *, token_digest_: str, throttle_key: str, limit: int, period: int
) -> FixOutcome:
    """The fast lane's one round trip: auth, throttle, older-fix guard, position, GEO index,
    stream append, ops digest entry. Raises redis errors (the caller falls back)."""
    keys, args = _script_call(fix, token_digest_=token_digest_, throttle_key=throttle_key, limit=limit, period=period, append=True)
    # The fixes a worker receives together share one pipeline (ScriptBatcher).
    batcher = ScriptBatcher.for_client(client, _FIX_SCRIPT, settings.REDIS_SOCKET_TIMEOUT)
    return _outcome(await batcher.call(keys, args))


async def position_seed_async(client: aioredis.Redis, stored: Fix) -> None:
    """The position PostgreSQL has, into Redis unless Redis already knows a newer one."""
    keys, args = _script_call(stored, token_digest_="", throttle_key=fleet_key("throttle:none"), limit=0, period=1, append=False)
    try:
        await client.evalsha(_FIX_SHA, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        await client.eval(_FIX_SCRIPT, len(keys), *keys, *args)


def fix_record_persisted(fix: Fix) -> None:
    """A fix PostgreSQL already has (the direct write path): bring the live state up to it.
    Never raises."""
    fixes_record_persisted([fix])


def fixes_record_persisted(fixes: list[Fix]) -> None:
    """`fix_record_persisted` for several fixes in one round trip (a pipeline of the script,
    each fix still atomic on its own). Never raises."""
    if not fixes:
        return
    try:
        _fixes_record(get_redis(), fixes)
    except RedisFailed:
        logger.warning("live positions of %d driver(s) not updated (Redis unavailable)", len(fixes))


def _fixes_record(client: redis.Redis, fixes: list[Fix]) -> int:
    """Fixes PostgreSQL has, through the fix script in one pipeline (each newer-only, atomic);
    how many Redis took. Raises RedisFailed."""
    calls = [
        _script_call(fix, token_digest_="", throttle_key=fleet_key("throttle:none"), limit=0, period=1, append=False)
        for fix in fixes
    ]
    return sum(int(accepted) for _, accepted, _ in evalsha_many(client, _FIX_SCRIPT, calls))


# Every driver's fix of the last DRIVER_STALE_AFTER_SECONDS as PostgreSQL has it (older ones
# have left dispatch: the stale-driver job takes those drivers offline).
_RECENT_FIXES_SQL = (
    "SELECT id::text, ST_Y(location::geometry), ST_X(location::geometry), "
    "extract(epoch FROM location_recorded_at)::float8, location_accuracy_m, location_speed, location_heading "
    "FROM dispatch_driver WHERE location IS NOT NULL AND location_recorded_at > %s"
)
_RESEED_CHUNK = 1000  # a compare call of 1,000 drivers holds Redis ~1.3 ms here
# The indexes (1-based) of the drivers whose live fix time is missing or older than PostgreSQL's.
# KEYS: driver hashes. ARGV: PostgreSQL's fix time of each. (One script a chunk, not an HGET a
# driver: at 100k drivers 65 ms of the job's CPU instead of 600.)
_BEHIND_SCRIPT = """
local out = {}
for i = 1, #KEYS do
  local t = redis.call('HGET', KEYS[i], 't')
  if not t or tonumber(t) < tonumber(ARGV[i]) then out[#out + 1] = i end
end
return out
"""


def positions_reseed(*, now: datetime | None = None) -> int:
    """Bring Redis's live positions up to PostgreSQL's where PostgreSQL's are newer (the
    reconcile job). While Redis was unreachable, fixes went straight to PostgreSQL; until each
    driver's next fix, Redis kept the older one, which readers of Redis saw (dispatch ranking,
    the ops map), and against which an out-of-order fix older than PostgreSQL's was still
    accepted and reached the customer. A missing key (Redis restarted empty) is reseeded too.

    Redis is compared first (each driver's fix time, by script), then only the drivers PostgreSQL is ahead on
    go through the fix script, whose guard compares again atomically: a fix the fast lane
    accepts meanwhile is never overwritten. Returns how many were reseeded; raises RedisFailed
    when Redis cannot answer (the job then has nothing to repair yet)."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    with connection.cursor() as cur:
        cur.execute(_RECENT_FIXES_SQL, [cutoff])
        stored = [Fix(pk, lat, lon, t, acc, speed, heading) for pk, lat, lon, t, acc, speed, heading in cur.fetchall()]
    r = get_redis()
    behind = []
    for start in range(0, len(stored), _RESEED_CHUNK):
        chunk = stored[start : start + _RESEED_CHUNK]
        call = ([driver_key(fix.driver_id) for fix in chunk], [repr(fix.recorded_at) for fix in chunk])
        behind.extend(chunk[i - 1] for i in evalsha_many(r, _BEHIND_SCRIPT, [call])[0])
    reseeded = sum(_fixes_record(r, behind[start : start + _RESEED_CHUNK]) for start in range(0, len(behind), _RESEED_CHUNK))
    if reseeded:
        logger.warning("live positions of %d driver(s) were behind PostgreSQL's; reseeded", reseeded)
    return reseeded


# ------------------------------------------------------------------------------ auth cache


# Remember a token unless a revocation happened since the caller's lookup began (it read the
# generation before asking PostgreSQL): a lookup that raced a revoke must not cache it again.
# KEYS: auth set, generation. ARGV: generation seen, digest, max TTL, the token's TTL.
_REMEMBER_SCRIPT = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
redis.call('EXPIRE', KEYS[1], ARGV[4], 'LT')
return 1
"""


async def auth_remember_async(client: aioredis.Redis, *, driver_id, digest: str, ttl: int, generation: str) -> bool:
    """The token with this digest is the driver's, usable for `ttl` seconds more, as PostgreSQL
    said after the revocation count was `generation` (`FixOutcome.auth_generation`): remembered
    unless a token was revoked since. The set lives as long as its shortest-lived token (EXPIRE
    LT), at most AUTH_TTL_SECONDS. True if remembered."""
    keys = [auth_key(driver_id), AUTH_GEN_KEY]
    args = [generation, digest, AUTH_TTL_SECONDS, max(1, min(ttl, AUTH_TTL_SECONDS))]
    return bool(await client.eval(_REMEMBER_SCRIPT, len(keys), *keys, *args))


def driver_auth_forget(driver_id) -> None:
    """The driver's token was revoked or its login deactivated: the fast lane asks PostgreSQL
    again on its next fix (and is refused), and a lookup already under way is not cached.
    Never raises."""
    try:
        pipe = get_redis().pipeline(transaction=True)
        pipe.incr(AUTH_GEN_KEY)
        pipe.delete(auth_key(driver_id))
        pipe.execute()
    except RedisFailed:
        logger.warning("auth cache of driver %s not cleared (Redis unavailable; it expires in %s s)",
                       driver_id, AUTH_TTL_SECONDS)


def driver_auth_forget_for_user(user) -> None:
    driver_id = Driver.objects.filter(user_id=user.pk).values_list("pk", flat=True).first()
    if driver_id is not None:
        driver_auth_forget(driver_id)


# --------------------------------------------------------------------- active deliveries


def split_ids(value) -> tuple[str, ...]:
    """The comma-separated delivery ids of the active map (or of the location SQL) as a tuple."""
    return tuple(v for v in (value or "").split(",") if v)


# Add / remove one delivery in a driver's comma-separated list, atomically (two assignments of
# one stacked driver committing at once must not lose each other).
_ACTIVE_ADD_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or cur == '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1 end
for id in string.gmatch(cur, '[^,]+') do if id == ARGV[2] then return 0 end end
redis.call('HSET', KEYS[1], ARGV[1], cur .. ',' .. ARGV[2])
return 1
"""
_ACTIVE_REMOVE_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local kept = {}
for id in string.gmatch(cur, '[^,]+') do if id ~= ARGV[2] then table.insert(kept, id) end end
if #kept == 0 then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], table.concat(kept, ',')) end
return 1
"""


def active_delivery_set(driver_id, delivery_id) -> None:
    """After commit: the driver is now (also) on `delivery_id` (its fixes reach that customer)."""
    _active_write(lambda r: r.eval(_ACTIVE_ADD_SCRIPT, 1, ACTIVE_KEY, str(driver_id), str(delivery_id)), driver_id)


def active_delivery_clear(driver_id, delivery_id=None) -> None:
    """After commit: the driver is no longer on `delivery_id` (on none, without one)."""
    if delivery_id is None:
        _active_write(lambda r: r.hdel(ACTIVE_KEY, str(driver_id)), driver_id)
    else:
        _active_write(lambda r: r.eval(_ACTIVE_REMOVE_SCRIPT, 1, ACTIVE_KEY, str(driver_id), str(delivery_id)), driver_id)


# A driver's list set to ARGV[3] ('' = none) only if it is still ARGV[2], what was read before
# PostgreSQL was: an assignment made or ended since then wrote Redis itself, and is newer.
_ACTIVE_REPAIR_SCRIPT = """
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


def active_delivery_repair(driver_id, delivery_ids: tuple[str, ...], *, read: tuple[str, ...]) -> bool:
    """PostgreSQL says the driver is on `delivery_ids` (or none): make Redis agree, unless its
    list changed since it was `read` (before PostgreSQL was read). Whether it was repaired."""
    try:
        return bool(get_redis().eval(
            _ACTIVE_REPAIR_SCRIPT, 1, ACTIVE_KEY, str(driver_id), ",".join(read), ",".join(delivery_ids)
        ))
    except RedisFailed:
        logger.warning("active delivery of driver %s not updated in Redis (the fix consumer repairs it)", driver_id)
        return False


def known_state(driver_ids: list[str]) -> dict[str, tuple[str | None, tuple[str, ...]]] | None:
    """Driver id → (availability status, active deliveries) as Redis knows them; None when
    Redis does not answer (nothing is repaired then)."""
    if not driver_ids:
        return {}
    try:
        pipe = get_redis().pipeline(transaction=False)
        pipe.hmget(geo.STATUS_KEY, driver_ids)
        pipe.hmget(ACTIVE_KEY, driver_ids)
        statuses, actives = pipe.execute()
    except RedisFailed:
        return None
    return {d: (s, split_ids(a)) for d, s, a in zip(driver_ids, statuses, actives)}


_ACTIVE_SQL = (
    "SELECT driver_id::text, string_agg(delivery_id::text, ',' ORDER BY created_at, id) "
    "FROM dispatch_assignment WHERE status = 'active' GROUP BY driver_id"
)


def active_reconcile() -> int:
    """Make the active-delivery map equal PostgreSQL's active assignments (the reconcile job):
    Redis read first, then PostgreSQL, and each differing driver set only if Redis still holds
    what was read (an assignment made or ended meanwhile wrote Redis itself, and is newer)."""
    r = get_redis()
    read = r.hgetall(ACTIVE_KEY)
    with connection.cursor() as cur:
        cur.execute(_ACTIVE_SQL)
        desired = dict(cur.fetchall())
    calls = [
        ([ACTIVE_KEY], [driver, read.get(driver, ""), desired.get(driver, "")])
        for driver in read.keys() | desired.keys() if read.get(driver, "") != desired.get(driver, "")
    ]
    if calls:
        evalsha_many(r, _ACTIVE_REPAIR_SCRIPT, calls)
    return len(desired)


def _active_write(op, driver_id) -> None:
    try:
        op(get_redis())
    except RedisFailed:
        logger.warning("active delivery of driver %s not updated in Redis (the fix consumer repairs it)", driver_id)


# ------------------------------------------------------------------------------ reads


@dataclass(frozen=True)
class Position:
    lat: float
    lon: float
    recorded_at: datetime
    accuracy_m: float | None
    speed: float | None
    heading: float | None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def positions_of(driver_ids) -> dict[str, Position]:
    """The freshest known position of each driver, from Redis ({} when Redis is down: the
    caller reads PostgreSQL, at most a second behind)."""
    try:
        return positions_known(driver_ids)
    except RedisFailed:
        return {}


def positions_known(driver_ids) -> dict[str, Position]:
    """`positions_of`, raising when Redis cannot answer: for a caller that must not take "no
    live position" for "none fresher than PostgreSQL's" (the stale-driver job)."""
    ids = [str(i) for i in driver_ids]
    if not ids:
        return {}
    pipe = get_redis().pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(driver_key(i))
    rows = pipe.execute()
    out = {}
    for i, row in zip(ids, rows):
        if row and row.get("t"):
            out[i] = Position(
                lat=float(row["lat"]), lon=float(row["lon"]),
                recorded_at=datetime.fromtimestamp(float(row["t"]), tz=dt_timezone.utc),
                accuracy_m=_float(row.get("acc")), speed=_float(row.get("speed")), heading=_float(row.get("heading")),
            )
    return out


def fix_of(driver_id) -> tuple[float, float, float] | None:
    """(recorded-at in epoch seconds, lat, lon) of the driver's live position in Redis, the
    newest fix any path accepted (the stream consumer may not have written it to PostgreSQL
    yet); None when Redis has none or is down."""
    try:
        t, lat, lon = get_redis().hmget(driver_key(driver_id), ["t", "lat", "lon"])
    except RedisFailed:
        return None
    if not t or not lat or not lon:
        return None
    return float(t), float(lat), float(lon)


def position_latest(driver: Driver) -> Position | None:
    """The driver's latest fix: the fresher of its live position in Redis (one round trip)
    and the fix on `driver` as the caller read the row (PostgreSQL trails Redis by the stream
    consumer's lag; Redis may have lost the key, or be down). None when neither has one."""
    live = positions_of([driver.pk]).get(str(driver.pk))
    stored = None
    if driver.location is not None and driver.location_recorded_at is not None:
        stored = Position(
            lat=driver.location.y, lon=driver.location.x, recorded_at=driver.location_recorded_at,
            accuracy_m=driver.location_accuracy_m, speed=driver.location_speed, heading=driver.location_heading,
        )
    if live is None or (stored is not None and stored.recorded_at > live.recorded_at):
        return stored
    return live


_DRAIN_SCRIPT = """
local moved = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return moved
"""


def moved_drain() -> dict[str, str]:
    """Every driver that moved since the last call, with its latest position (atomic)."""
    flat = get_redis().eval(_DRAIN_SCRIPT, 1, MOVED_KEY)
    return dict(zip(flat[0::2], flat[1::2]))
