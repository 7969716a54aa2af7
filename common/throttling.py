"""Fixed-window rate limits kept in Redis with INCR: atomic, O(1), shared by all processes.

DRF's built-in throttles keep a list of timestamps per caller in the cache and rewrite it on
each request (a read-modify-write race and O(rate) work); at thousands of requests per
minute per driver that is both wrong and slow.
"""
from __future__ import annotations

import hashlib
import logging
import time

from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from common.redis import RedisUnavailable, fleet_key, get_redis

logger = logging.getLogger(__name__)

_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(rate: str) -> tuple[int, int]:
    count, _, period = rate.partition("/")
    return int(count), _PERIODS[period.strip().lower()]


# INCR and EXPIRE as one command (one script call costs the request less Python than a
# two-command pipeline; the same round trip, the same key and TTL)
_COUNT_LUA = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return n
"""
_scripts: dict[int, object] = {}


def _count(key: str, ttl: int) -> int:
    client = get_redis()
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(_COUNT_LUA)
    return int(script(keys=[key], args=[ttl]))


class RedisRateThrottle(BaseThrottle):
    scope = ""

    def get_ident_for(self, request, view) -> str | None:
        raise NotImplementedError

    def allow_request(self, request, view) -> bool:
        ident = self.get_ident_for(request, view)
        if ident is None:
            return True
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(getattr(view, "throttle_scope", None) or self.scope)
        if not rate:
            return True
        limit, period = parse_rate(rate)
        now = time.time()
        window = int(now // period)
        self._wait = period - (now % period)
        key = self.key_for(request, ident, window)
        try:
            count = _count(key, period + 1)
        except RedisUnavailable:
            logger.warning("throttle skipped: Redis unavailable")
            return True
        return count <= limit

    def key_for(self, request, ident: str, window: int) -> str:
        return f"throttle:{self.scope}:{ident}:{window}"

    def wait(self):
        return getattr(self, "_wait", None)


class AnonRateThrottle(RedisRateThrottle):
    scope = "anon"

    def get_ident_for(self, request, view):
        if request.user and request.user.is_authenticated:
            return None
        return self.get_ident(request)


class CustomerLinkThrottle(RedisRateThrottle):
    """The customer's endpoints (`?token=`: delivery status, rating), anonymous callers: counted
    per tracking link (THROTTLE_CUSTOMER_RATE), not in the per-address `anon` count that guards
    the login. Customers behind one carrier's NAT share an address: a few hundred of them
    polling their status spent each other's allowance, and the login's. The address still has a
    ceiling of its own (`CustomerAddressThrottle`), so that fresh made-up links cannot each get
    a full allowance."""

    scope = "customer"

    def get_ident_for(self, request, view):
        if request.user and request.user.is_authenticated:
            return None
        token = request.query_params.get("token")
        if not token:
            return None  # (no link: the address's count alone)
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class CustomerAddressThrottle(AnonRateThrottle):
    """The ceiling per client address on the customer's endpoints (THROTTLE_CUSTOMER_ADDRESS_RATE)."""

    scope = "customer_address"


class CustomerNoLinkThrottle(AnonRateThrottle):
    """An anonymous call of a customer's endpoint without a link counts where any anonymous
    call does (`anon`, the login's count): only a link buys the customer's allowance."""

    def get_ident_for(self, request, view):
        if request.query_params.get("token"):
            return None
        return super().get_ident_for(request, view)


class CustomerMissThrottle(AnonRateThrottle):
    """Links that matched no delivery, per address (THROTTLE_CUSTOMER_MISS_RATE): each made-up
    link would otherwise get a fresh per-link allowance, every one a database lookup. Counted
    by the view on each miss (`customer_miss_record`), read here: an address over the limit is
    refused whatever link it sends."""

    scope = "customer_miss"

    def allow_request(self, request, view) -> bool:
        ident = self.get_ident_for(request, view)
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)
        if ident is None or not rate or not request.query_params.get("token"):
            return True
        limit, period = parse_rate(rate)
        now = time.time()
        self._wait = period - (now % period)
        try:
            misses = get_redis().get(self.key_for(request, ident, int(now // period)))
        except RedisUnavailable:
            return True
        return int(misses or 0) < limit


def customer_miss_record(request) -> None:
    """A customer's link matched no delivery: one more miss for the caller's address (see
    CustomerMissThrottle). Never raises."""
    throttle = CustomerMissThrottle()
    rate = api_settings.DEFAULT_THROTTLE_RATES.get(throttle.scope)
    ident = throttle.get_ident_for(request, None)
    if ident is None or not rate:
        return
    _, period = parse_rate(rate)
    try:
        _count(throttle.key_for(request, ident, int(time.time() // period)), period + 1)
    except RedisUnavailable:
        logger.warning("customer miss not counted: Redis unavailable")


class UserRateThrottle(RedisRateThrottle):
    scope = "user"

    def get_ident_for(self, request, view):
        if request.user and request.user.is_authenticated:
            return str(request.user.pk)
        return None

    def key_for(self, request, ident, window):
        # a driver's count is the one the location fast lane keeps (its fixes count too); the
        # token authentication has the driver at hand (no query for it here)
        state = getattr(request.user, "_state", None)
        driver = state.fields_cache.get("driver") if state is not None else None
        if driver is not None:
            return driver_throttle_key(driver.pk, window)
        return super().key_for(request, ident, window)


def driver_throttle_key(driver_id, window: int) -> str:
    """The user throttle's count of a driver's login in one window, shared by the API and the
    location fast lane (whose fix script counts it: under the fleet's hash tag)."""
    return fleet_key(f"throttle:drv:{driver_id}:{window}")
