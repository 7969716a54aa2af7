"""The location fast lane: `POST /v2/drivers/{id}/location` served by a native ASGI handler in
front of Django (no middleware, no DRF, no thread hop), answering once Redis has the fix.

The happy path only: a driver's own token, a JSON body that validates, no Idempotency-Key.
Everything else, and everything when Redis does not answer, is handed to the Django view
unchanged (the body replayed), so validation errors, 401/403/404, idempotent replays and the
Redis-down fallback (the direct PostgreSQL write) are exactly the ones the API always gave.

One Redis round trip per fix (availability/live.py's script: auth, throttle, older-fix guard,
position, GEO index, stream append, ops digest entry); the customer's
`delivery_location_updated` goes to the delivery's group from here, one hop. PostgreSQL is
written in batches by `manage.py consume_fixes`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from datetime import datetime
from datetime import timezone as dt_timezone

import orjson
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework.settings import api_settings

from availability import live
from availability.api.serializers import MAX_CLOCK_SKEW
from common import metrics
from common.broadcast import TRACKING_LAYER, delivery_group
from common.errors import error_body
from common.fields import DATE_TIME_SHAPE
from common.parsers import MAX_DEPTH
from common.logfilters import new_request_id, request_id
from common.redis import RedisFailed, breaker, redis_address
from common.throttling import driver_throttle_key, parse_rate
from common.tokens import authorization_token, token_digest
from tracking.events import delivery_location_updated

logger = logging.getLogger(__name__)

PATH = re.compile(r"^/v2/drivers/(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/location\Z")  # (\Z: "$" also matches before a final newline)
MAX_BODY = 16 * 1024
ROUTE = "/v2/drivers/<uuid:driver_id>/location"


def _headers() -> list[tuple[bytes, bytes]]:
    """The headers the Django view's response has on the lean stack (ApiHeadersMiddleware),
    built once per value of the settings they follow."""
    key = (settings.SECURE_REFERRER_POLICY, settings.SECURE_CROSS_ORIGIN_OPENER_POLICY)
    headers = _headers_by_settings.get(key)
    if headers is None:
        headers = [(b"content-type", b"application/json"), (b"allow", b"POST, OPTIONS"),
                   (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
        if key[0]:
            headers.append((b"referrer-policy", key[0].encode()))
        if key[1]:
            headers.append((b"cross-origin-opener-policy", key[1].encode()))
        _headers_by_settings[key] = headers
    return headers


_headers_by_settings: dict[tuple, list[tuple[bytes, bytes]]] = {}


# Request headers the fast lane reads: a request with two of one of them is Django's to judge
# (it joins them), as is an Accept with no plain JSON range (Django's negotiation answers 406,
# or renders otherwise)
_READ_HEADERS = frozenset((b"authorization", b"content-type", b"accept", b"content-length", b"idempotency-key",
                           b"transfer-encoding"))
_PLAIN_ACCEPT = frozenset((b"*/*", b"application/json"))


# In the scope of a request the fast lane hands to Django after its wait for Redis ran out.
FIX_HANDED_OVER = "dispatch.location_fix_handed_over"


class _Delegate(Exception):
    """Not for the fast lane: let Django answer."""


def _number(body: dict, name: str, low: float, high: float | None, *, required: bool, below: float | None = None):
    value = body.get(name)
    if value is None:  # missing or null: an error for lat/lon, allowed for the optional ones
        if required:
            raise _Delegate
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Delegate
    value = float(value)
    if not math.isfinite(value) or value < low or (high is not None and value > high) or (below is not None and value >= below):
        raise _Delegate
    return value


def _recorded_at(body: dict, now: datetime) -> datetime:
    if "recordedAt" not in body:
        return now
    raw = body["recordedAt"]
    if not isinstance(raw, str) or not DATE_TIME_SHAPE.match(raw):  # (a date alone: refused there)
        raise _Delegate
    try:
        parsed = parse_datetime(raw)
    except (ValueError, OverflowError):
        raise _Delegate
    if parsed is None:
        raise _Delegate
    try:
        if timezone.is_naive(parsed):
            parsed = timezone.make_aware(parsed, timezone.get_default_timezone())
        parsed = parsed.astimezone(dt_timezone.utc)
    except (ValueError, OverflowError):  # out of range once in UTC (year 1 or 9999 with an offset)
        raise _Delegate
    if parsed > now + MAX_CLOCK_SKEW:
        raise _Delegate
    return parsed


def parse_fix(driver_id: str, raw: bytes, now: datetime) -> tuple[live.Fix, datetime]:
    """The body, validated by the LocationSerializer's rules; _Delegate for anything else.
    So is a large body (not parsed on the event loop: Django answers 413 past its limit) and a
    \\u escape: NUL or a lone surrogate, in any key or string, is refused there
    (common.parsers), and orjson takes NUL."""
    if len(raw) > MAX_BODY or b"\\u" in raw or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        raise _Delegate  # (more openers than the depth limit: the parser there judges the nesting)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Delegate
    if not isinstance(body, dict):
        raise _Delegate
    recorded_at = _recorded_at(body, now)
    fix = live.Fix(
        driver_id=driver_id,
        lat=_number(body, "lat", -90, 90, required=True),
        lon=_number(body, "lon", -180, 180, required=True),
        recorded_at=recorded_at.timestamp(),
        accuracy_m=_number(body, "accuracyMeters", 0, 100_000, required=False),
        speed=_number(body, "speed", 0, 150, required=False),
        heading=_number(body, "heading", 0, None, required=False, below=360),
    )
    return fix, recorded_at


def _iso(dt: datetime) -> str:
    value = dt.astimezone(dt_timezone.utc).isoformat()
    return value[:-6] + "Z" if value.endswith("+00:00") else value


def _fast_headers(scope) -> dict[bytes, bytes] | None:
    """The request's headers, or None when Django is to answer it: a query (the endpoint takes
    none: Django's request guard judges one), two of a header the fast lane reads (Django joins
    them), an Idempotency-Key (a replay), a Content-Encoding (a 415 unless identity), a body
    without Content-Length or larger than the fast lane parses, a Content-Type other than JSON in UTF-8, an Accept with no plain JSON range
    (Django's negotiation), no token."""
    if scope.get("query_string"):
        return None
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in headers and name in _READ_HEADERS:
            return None
        headers[name] = value
    if b"idempotency-key" in headers or b"transfer-encoding" in headers or b"content-encoding" in headers:
        return None
    declared = headers.get(b"content-length", b"")
    if not declared.isdigit() or int(declared) > MAX_BODY:
        return None
    if not _utf8_json(headers.get(b"content-type", b"")):
        return None
    accept = headers.get(b"accept")
    if accept is not None and accept not in _PLAIN_ACCEPT and not _accepts_plain_json(accept):
        return None
    return headers if _token(headers) is not None else None


def _accepts_plain_json(accept: bytes) -> bool:
    """Some range of the Accept header takes JSON as the view renders it (a range with other
    parameters than q, such as `indent=4`, changes the rendering: Django's)."""
    for media_range in accept.split(b","):
        media, _, params = media_range.partition(b";")
        if media.strip().lower() in (b"application/json", b"application/*", b"*/*") and all(
            not p.strip() or p.strip().lower().startswith(b"q=") for p in params.split(b";")
        ):
            return True
    return False


def _utf8_json(content_type: bytes) -> bool:
    media, _, params = content_type.partition(b";")
    if media.strip().lower() != b"application/json":
        return False
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"charset" and value.strip().strip(b'"').lower() not in (b"utf-8", b"utf8"):
            return False
    return True


def _token(headers: dict[bytes, bytes]) -> str | None:
    return authorization_token(headers.get(b"authorization", b""))


def _token_owner(digest: str) -> tuple[str, bool, live.Fix | None, int] | None:
    """(driver id, usable, the driver's stored fix, seconds the answer may be cached) of the
    token with this digest, or None: a token that is not a driver's. Usable: the login is
    active and the token unexpired. One query, on a cache miss only (the fast lane then
    remembers the token in Redis, and seeds the driver's position there so that a fix older
    than the stored one is refused as the database would)."""
    try:
        with connection.cursor() as cur:
            cur.execute(_OWNER_SQL, [digest])
            row = cur.fetchone()
    finally:
        connection.close()  # a worker thread, outside any request: hand the connection back
    if row is None:
        return None
    driver_id, active, lat, lon, recorded_at, acc, speed, heading, expires_at = row
    stored = None
    if recorded_at is not None and lat is not None:
        stored = live.Fix(driver_id=str(driver_id), lat=lat, lon=lon, recorded_at=recorded_at.timestamp(),
                          accuracy_m=acc, speed=speed, heading=heading)
    ttl = live.AUTH_TTL_SECONDS
    if expires_at is not None:
        ttl = min(ttl, math.floor((expires_at - datetime.now(dt_timezone.utc)).total_seconds()))
    return str(driver_id), bool(active) and ttl > 0, stored, ttl


_OWNER_SQL = (
    "SELECT d.id, u.is_active, ST_Y(d.location::geometry), ST_X(d.location::geometry), d.location_recorded_at, "
    "d.location_accuracy_m, d.location_speed, d.location_heading, t.expires_at "
    "FROM common_apitoken t JOIN common_user u ON u.id = t.user_id "
    "JOIN dispatch_driver d ON d.user_id = u.id WHERE t.digest = %s"
)


class LocationFastLane:
    """ASGI app: the fast lane for location fixes, Django for everything else."""

    def __init__(self, django_app):
        self.django_app = django_app
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, aioredis.Redis]] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not settings.LOCATION_FAST_LANE:
            return await self.django_app(scope, receive, send)
        match = PATH.match(scope["path"])
        if match is None:
            return await self.django_app(scope, receive, send)
        started = time.perf_counter()
        headers = _fast_headers(scope)
        if headers is None:  # Django's to answer, its body unread (a 413 at once past the limit)
            return await self.django_app(scope, receive, send)
        trusted = (scope.get("client") or ("",))[0] in settings.REQUEST_ID_TRUSTED_PROXIES
        rid = new_request_id(headers.get(b"x-request-id", b"").decode("latin1") if trusted else None)
        token = request_id.set(rid)
        try:
            await self._handle(scope, receive, send, match, started, headers)
        finally:
            request_id.reset(token)

    async def _handle(self, scope, receive, send, match, started, headers):
        chunks, complete = await self._read_body(receive)
        if complete:
            try:
                status = await self._serve(scope, headers, match["id"], b"".join(chunks), send)
                metrics.observe_http("POST", ROUTE, status, time.perf_counter() - started)
                return
            except _Delegate:
                pass
        await self.django_app(scope, _replay(chunks, complete, receive), send)

    async def _read_body(self, receive) -> tuple[list[bytes], bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return chunks, False
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False):
                return chunks, True
            if size > MAX_BODY:
                return chunks, False

    def _redis(self) -> aioredis.Redis:
        """One async client (and connection pool) per event loop: a server runs one loop per
        process; the loop is kept with its client so that its id cannot be reused."""
        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            # No socket timeout: redis-py would wrap every send in `asyncio.wait_for`, a
            # task per command (a tenth of a POST's CPU); `_serve` bounds each step with one
            # `asyncio.timeout` instead, and redis-py drops a connection whose command was cut.
            client = aioredis.Redis.from_url(
                settings.REDIS_URL, decode_responses=True, socket_timeout=None,
                socket_connect_timeout=settings.REDIS_SOCKET_TIMEOUT, max_connections=settings.FAST_LANE_REDIS_CONNECTIONS,
            )
            entry = self._clients[id(loop)] = (loop, client)
        return entry[1]

    async def _serve(self, scope, headers: dict[bytes, bytes], driver_id: str, raw: bytes, send) -> int:
        key = _token(headers)
        now = datetime.now(dt_timezone.utc)
        fix, recorded_at = parse_fix(driver_id, raw, now)
        rate = api_settings.DEFAULT_THROTTLE_RATES.get("user")  # DRF's user throttle, its count shared
        limit, period = parse_rate(rate) if rate else (-1, 1)  # (-1: no limit)
        window = int(time.time() // period)
        throttle_key = driver_throttle_key(driver_id, window)
        client = self._redis()
        digest = token_digest(key)
        address = redis_address(settings.REDIS_URL)
        if not breaker.allow(address):
            raise _Delegate  # a hung Redis: the database path at once, not after a timeout
        try:
            async with asyncio.timeout(settings.REDIS_SOCKET_TIMEOUT):
                outcome = await live.fix_record_async(
                    client, fix, token_digest_=digest, throttle_key=throttle_key, limit=limit, period=period
                )
            if outcome.code == "auth":
                owner = await sync_to_async(_token_owner, thread_sensitive=False)(digest)
                if owner is None or owner[:2] != (driver_id, True):
                    raise _Delegate  # not this driver's live token: Django answers 401/403/404
                async with asyncio.timeout(settings.REDIS_SOCKET_TIMEOUT):
                    if owner[2] is not None:
                        await live.position_seed_async(client, owner[2])
                    await live.auth_remember_async(client, driver_id=driver_id, digest=digest, ttl=owner[3],
                                                   generation=outcome.auth_generation)
                    outcome = await live.fix_record_async(
                        client, fix, token_digest_=digest, throttle_key=throttle_key, limit=limit, period=period
                    )
        except RedisFailed:  # TimeoutError (asyncio.timeout) is an OSError
            # Not counted by the breaker: this timeout also runs while the fix waits on a busy
            # event loop, and a breaker opened by load would send every fix to the slow path.
            # The database path's own Redis calls (socket timeouts) count a hung Redis.
            logger.warning("location fast lane: Redis unavailable, falling back to the database path")
            # Redis may have run the script after the wait ran out: the database path then finds
            # this very fix there, the fast lane's own write, not an older fix's (FIX_HANDED_OVER).
            scope[FIX_HANDED_OVER] = True
            raise _Delegate
        except DatabaseError:
            raise _Delegate  # the token lookup failed: Django answers (a 503 in the SPEC's body)
        breaker.succeeded(address)  # (a probe after the breaker's open spell closes it)
        if outcome.code == "throttled":
            return await self._throttled(scope, send, window, period)
        if outcome.code != "ok":
            raise _Delegate
        body = {"success": True, "accepted": outcome.accepted, "driverId": driver_id, "recordedAt": _iso(recorded_at)}
        if not outcome.accepted:
            body["reason"] = "older_than_last_fix"
        await _respond(send, 200, orjson.dumps(body))
        if outcome.accepted:
            # After the driver has its answer; the server keeps this call alive until it ends.
            for delivery_id in outcome.active_delivery_ids:  # several with order stacking
                await self._tell_customer(delivery_id, fix, recorded_at)
        return 200

    async def _throttled(self, scope, send, window: int, period: int) -> int:
        wait = max(1, math.ceil((window + 1) * period - time.time()))
        message = f"Request was throttled. Expected available in {wait} second{'s' if wait != 1 else ''}."
        await _respond(send, 429, orjson.dumps(error_body(429, scope["path"], message)),
                       extra=[(b"retry-after", str(wait).encode())])
        return 429

    async def _tell_customer(self, delivery_id: str, fix: live.Fix, recorded_at: datetime) -> None:
        event = delivery_location_updated(
            delivery_id=delivery_id, lat=fix.lat, lon=fix.lon, accuracy_m=fix.accuracy_m, speed_mps=fix.speed,
            heading=fix.heading, recorded_at=recorded_at,
        )
        try:
            await get_channel_layer(TRACKING_LAYER).group_send(delivery_group(delivery_id), {"type": event["type"], "event": event})
        except Exception:  # live events are best-effort
            logger.warning("location of delivery %s not sent to its customer", delivery_id, exc_info=True)


async def _respond(send, status: int, body: bytes, extra=()) -> None:
    headers = [*_headers(), (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.get().encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(chunks: list[bytes], complete: bool, receive):
    """A `receive` that hands Django the body chunks already read, then the rest."""
    pending = list(chunks)

    async def replay():
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending) or not complete}
        return await receive()  # the rest of the body, or (Django listens for it) the disconnect

    return replay
