"""The location fast lane (availability/api/fastlane.py) in front of Django, through the real
ASGI application: same answers as the database path, Redis first, PostgreSQL from the stream.

These tests commit (`transaction=True`): the fast lane looks tokens up on a worker thread,
which sees only committed rows, as in production."""
import json
import socket
import threading
import time
from datetime import timedelta

import httpx
import pytest
import redis
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from availability import geo, live
from availability.events import DriverPositionsEvent
from availability.models import Driver
from common import hooks
from common.actors import Actor
from common.broadcast import OPS_GROUP, OPS_LOCATIONS_GROUP, delivery_group
from common.errors import iso
from common.models import ApiToken
from common.redis import get_redis
from common.tokens import api_token_create, api_token_issue, api_tokens_revoke, token_digest
from config.asgi import application
from dispatch.models import Delivery
from tests.api import token_for
from tests.factories import (
    DeliveryFactory,
    DriverFactory,
    IntegrationUserFactory,
    OpsUserFactory,
    online_driver,
)
from tests.typecheck import assert_event_shape
from tracking.events import DeliveryLocationUpdatedEvent
from tracking.selectors import tracking_status
from workflows.deliveries import assignment_create
from workflows.drivers import stale_drivers_mark_offline

pytestmark = pytest.mark.django_db(transaction=True)


def post(path, body=None, *, token=None, raw=None, headers=None):
    async def go():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            h = {"Content-Type": "application/json", **(headers or {})}
            if token:
                h["Authorization"] = f"Token {token}"
            content = raw if raw is not None else json.dumps(body)
            return await client.post(path, content=content, headers=h)

    return async_to_sync(go)()


def url(driver):
    return f"/v2/drivers/{driver.pk}/location"


def token(driver):
    return token_for(driver.user)


def recorded(offset=1):
    """A fix time `offset` seconds from now (the factories' drivers have a fix from now)."""
    return (timezone.now() + timedelta(seconds=offset)).isoformat().replace("+00:00", "Z")


def pg_fix_time(driver):
    return Driver.objects.get(pk=driver.pk).location_recorded_at


def comparable(response, driver):
    body = json.loads(response.content.decode().replace(str(driver.pk), "<driver>"))
    body.pop("timestamp", None)
    return response.status_code, body


CASES = {
    "valid": lambda d: ({"lat": 12.98, "lon": 77.6, "accuracyMeters": 5, "speed": 3.5, "heading": 90,
                         "recordedAt": "2026-01-01T10:00:00.250+05:30"}, token(d)),
    "nulls allowed": lambda d: ({"lat": 12.98, "lon": 77.6, "accuracyMeters": None, "speed": None, "heading": None,
                                 "recordedAt": "2026-01-01T04:30:00Z"}, token(d)),
    "naive time": lambda d: ({"lat": 12.98, "lon": 77.6, "recordedAt": "2026-01-01T04:30:00"}, token(d)),
    "string lat": lambda d: ({"lat": "12.9", "lon": 77.6}, token(d)),
    "bool lon": lambda d: ({"lat": 12.9, "lon": True}, token(d)),
    "lat out of range": lambda d: ({"lat": 90.5, "lon": 77.6}, token(d)),
    "missing lon": lambda d: ({"lat": 12.9}, token(d)),
    "null lat": lambda d: ({"lat": None, "lon": 77.6}, token(d)),
    "heading 360": lambda d: ({"lat": 12.9, "lon": 77.6, "heading": 360}, token(d)),
    "negative speed": lambda d: ({"lat": 12.9, "lon": 77.6, "speed": -1}, token(d)),
    "future": lambda d: ({"lat": 12.9, "lon": 77.6, "recordedAt": "2099-01-01T00:00:00Z"}, token(d)),
    "bad time": lambda d: ({"lat": 12.9, "lon": 77.6, "recordedAt": "yesterday"}, token(d)),
    "a date alone": lambda d: ({"lat": 12.9, "lon": 77.6, "recordedAt": "2026-01-01"}, token(d)),
    "a date and an hour": lambda d: ({"lat": 12.9, "lon": 77.6, "recordedAt": "2026-01-01T04"}, token(d)),
    "null time": lambda d: ({"lat": 12.9, "lon": 77.6, "recordedAt": None}, token(d)),
    "year 1 east of UTC": lambda d: ({"lat": 12.9, "lon": 77.6, "recordedAt": "0001-01-01T00:00:00+01:00"}, token(d)),
    "year 9999 west of UTC": lambda d: ({"lat": 12.9, "lon": 77.6, "recordedAt": "9999-12-31T23:30:00-01:00"}, token(d)),
    "nested 40 deep": lambda d: ({"lat": 12.9, "lon": 77.6, "x": json.loads("[" * 40 + "]" * 40)}, token(d)),
    "a list": lambda d: ([12.9, 77.6], token(d)),
    "no token": lambda d: ({"lat": 12.9, "lon": 77.6}, None),
    "bad token": lambda d: ({"lat": 12.9, "lon": 77.6}, "not-a-token"),
    "another driver": lambda d: ({"lat": 12.9, "lon": 77.6}, token(DriverFactory())),
    "ops": lambda d: ({"lat": 12.9, "lon": 77.6}, token_for(OpsUserFactory())),
    "integration": lambda d: ({"lat": 12.9, "lon": 77.6}, token_for(IntegrationUserFactory())),
}


def both_ways(settings, ask):
    """`ask(driver)` through the Django view, then through the fast lane, a new driver each."""
    answers = []
    for fast in (False, True):
        settings.LOCATION_FAST_LANE = fast
        answers.append(ask(DriverFactory()))
    return answers


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_fast_lane_answers_exactly_like_the_database_path(case, settings):
    def ask(driver):
        body, key = CASES[case](driver)
        return comparable(post(url(driver), body, token=key), driver)

    django, fast = both_ways(settings, ask)
    assert django == fast


def raw_post(path, content, headers):
    """A POST with exactly these headers (a list: a name may repeat)."""
    async def go():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            request = client.build_request("POST", path, content=content)
            request.headers = httpx.Headers([(k, v) for k, v in request.headers.items() if k.lower() in ("host", "content-length")]
                                            + headers)
            return await client.send(request)

    return async_to_sync(go)()


# (extra headers, Content-Type) of requests whose answer the Django view gives: the fast lane
# hands them over rather than answer otherwise
HEADER_CASES = {
    "text/json": ([], "text/json"),
    "json suffix type": ([], "application/merge-patch+json"),
    "utf-16 charset": ([], "application/json; charset=utf-16"),
    "upper-case type, utf-8": ([], "Application/JSON; charset=UTF-8"),
    "two content types": ([("Content-Type", "text/plain")], "application/json"),
    "accept html": ([("Accept", "text/html")], "application/json"),
    "accept xml or json": ([("Accept", "application/xml, application/json;q=0.5")], "application/json"),
    "accept anything": ([("Accept", "*/*")], "application/json"),
    "axios's accept": ([("Accept", "application/json, text/plain, */*")], "application/json"),
    "accept html, else anything": ([("Accept", "text/html, */*;q=0.1")], "application/json"),
    "accept json indented": ([("Accept", "application/json; indent=4")], "application/json"),
    "two authorizations": ([("Authorization", "Token bogus")], "application/json"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_headers_the_fast_lane_does_not_take_as_they_come_get_the_django_answer(case, settings):
    def ask(driver):
        extra, content_type = HEADER_CASES[case]
        headers = [*extra, ("Content-Type", content_type), ("Authorization", f"Token {token(driver)}")]
        body = {"lat": 12.9, "lon": 77.6, "recordedAt": "2026-01-01T04:30:00Z"}
        response = raw_post(url(driver), json.dumps(body).encode(), headers)
        kept = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "date", "content-length")}
        return (*comparable(response, driver), kept)

    django, fast = both_ways(settings, ask)
    assert django == fast


@pytest.mark.parametrize("accept", ["*/*", "application/json, text/plain, */*", "text/html, application/json;q=0.9"])
def test_common_accept_headers_are_served_by_the_fast_lane(accept):
    driver = online_driver()
    before = pg_fix_time(driver)
    response = post(url(driver), {"lat": 12.99, "lon": 77.61, "recordedAt": recorded()}, token=token(driver),
                    headers={"Accept": accept})
    assert response.status_code == 200 and response.json()["accepted"] is True
    assert pg_fix_time(driver) == before  # Redis only: the fast lane answered, not the view


def test_the_fast_lane_s_answer_has_the_api_s_headers(settings):
    def ask(driver):
        response = post(url(driver), {"lat": 12.9, "lon": 77.6}, token=token(driver))
        assert response.status_code == 200
        return sorted((k, v) for k, v in response.headers.items() if k not in ("x-request-id", "content-length", "date"))

    django, fast = both_ways(settings, ask)
    assert django == fast
    assert ("cross-origin-opener-policy", "same-origin") in fast and "vary" not in dict(fast)


def test_a_body_declared_too_large_is_refused_before_it_is_read(settings):
    driver = DriverFactory()
    sent = {"more": 0}

    async def go():
        messages = [{"type": "http.request", "body": b"{", "more_body": True}]

        async def receive():
            sent["more"] += 1
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        out = []

        async def send(message):
            out.append(message)

        scope = {"type": "http", "method": "POST", "path": url(driver), "raw_path": url(driver).encode(),
                 "query_string": b"", "root_path": "", "scheme": "http", "server": ("testserver", 80),
                 "client": ("127.0.0.1", 5000), "http_version": "1.1", "asgi": {"version": "3.0"},
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                             (b"content-length", b"1000000000"), (b"authorization", f"Token {token(driver)}".encode())]}
        await application(scope, receive, send)
        return out

    out = async_to_sync(go)()
    assert out[0]["status"] == 413 and sent["more"] == 0  # answered without reading the upload


def test_with_throttling_switched_off_the_fast_lane_takes_every_fix(settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": None}}
    driver = online_driver()
    codes = [post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(1 + i)}, token=token(driver)).status_code
             for i in range(3)]
    assert codes == [200, 200, 200]


def test_the_fast_lane_and_the_api_count_a_driver_s_requests_together(settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "3/min"}}
    driver = online_driver()
    key = token(driver)
    fast = [post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(1 + i)}, token=key).status_code
            for i in range(2)]
    api = post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(3)}, token=key,
               headers={"Idempotency-Key": "through-django"})  # the Django view, the same count
    assert fast == [200, 200] and api.status_code == 200
    assert post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(4)}, token=key).status_code == 429


def test_a_fix_through_django_older_than_the_one_redis_has_is_ignored_as_the_fast_lane_would(listen):
    driver = online_driver()
    delivery = DeliveryFactory()
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    key = token(driver)
    assert post(url(driver), {"lat": 12.99, "lon": 77.6, "recordedAt": recorded(2)}, token=key).json()["accepted"]
    customer = listen(f"delivery.{delivery.pk}")
    older = post(url(driver), {"lat": 12.90, "lon": 77.6, "recordedAt": recorded(1)}, token=key,
                 headers={"Idempotency-Key": "late-fix"})  # no stream consumer has written the newer one yet
    assert older.status_code == 200
    assert older.json()["accepted"] is False and older.json()["reason"] == "older_than_last_fix"
    assert [e for e in customer.drain() if e["type"] == "delivery_location_updated"] == []
    assert round(live.positions_of([driver.pk])[str(driver.pk)].lat, 2) == 12.99


def test_a_token_looked_up_while_it_was_revoked_is_not_cached(monkeypatch):
    """The fast lane's lookup reads the token before the revoke commits, the revoke clears the
    cache, then the lookup would remember the token again: a revocation since the lookup began
    keeps it out."""
    from availability.api import fastlane

    driver = online_driver()
    key = token(driver)
    lookup = fastlane._token_owner

    def lookup_then_revoked(digest):
        owner = lookup(digest)  # the token was live when read
        live.driver_auth_forget(driver.pk)  # ...and is revoked before the fast lane remembers it
        return owner

    monkeypatch.setattr(fastlane, "_token_owner", lookup_then_revoked)
    post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(1)}, token=key)
    assert not get_redis().smembers(live.auth_key(driver.pk))  # not remembered


def test_a_login_deactivated_in_a_transaction_is_forgotten_again_when_it_commits(settings):
    driver = online_driver()
    key = token(driver)
    assert post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(1)}, token=key).status_code == 200
    with transaction.atomic():  # as the user admin saves: the hook runs before the commit
        driver.user.is_active = False
        driver.user.save(update_fields=["is_active"])
        hooks.login_revoked(driver.user)
        # a fix meanwhile sees the login still active (not committed) and caches the token again
        get_redis().sadd(live.auth_key(driver.pk), token_digest(key))
    assert not get_redis().smembers(live.auth_key(driver.pk))  # forgotten again at the commit
    assert post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(2)}, token=key).status_code == 401


def test_malformed_json_and_an_unknown_driver_are_answered_by_django(settings):
    driver = DriverFactory()
    bad = post(url(driver), raw=b'{"lat": 12.9,', token=token(driver))
    assert bad.status_code == 400 and bad.json()["error"] == "Bad Request"
    other = post("/v2/drivers/00000000-0000-0000-0000-000000000000/location", {"lat": 1, "lon": 2}, token=token(driver))
    assert other.status_code == 404


def test_a_fix_is_in_redis_at_once_and_in_postgres_after_the_stream_consumer():
    driver = online_driver()
    before = pg_fix_time(driver)
    response = post(url(driver), {"lat": 12.99, "lon": 77.61, "recordedAt": recorded()}, token=token(driver))
    assert response.status_code == 200 and response.json()["accepted"] is True

    assert pg_fix_time(driver) == before  # PostgreSQL has not been touched by the request
    position = live.positions_of([driver.pk])[str(driver.pk)]
    assert (round(position.lat, 5), round(position.lon, 5)) == (12.99, 77.61)
    lon, lat = get_redis().geopos(geo.GEO_KEY, str(driver.pk))[0]
    assert round(lat, 4) == 12.99  # available: the GEO index moved with the fix

    call_command("consume_fixes", "--once")
    stored = Driver.objects.get(pk=driver.pk)
    assert (round(stored.location.y, 5), round(stored.location.x, 5)) == (12.99, 77.61)
    assert stored.location_recorded_at == position.recorded_at


def test_an_older_fix_is_ignored_in_redis_and_in_postgres_even_under_concurrency():
    driver = online_driver()
    key = token(driver)
    base = timezone.now() - timedelta(seconds=20)
    times = [base + timedelta(seconds=i) for i in range(40)]
    order = list(reversed(times[::2])) + times[1::2]

    def send(ts):
        post(url(driver), {"lat": 12.9 + ts.second / 1000, "lon": 77.6, "recordedAt": ts.isoformat()}, token=key)

    threads = [threading.Thread(target=send, args=(ts,)) for ts in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    call_command("consume_fixes", "--once")
    newest = max(times)
    assert live.positions_of([driver.pk])[str(driver.pk)].recorded_at == newest
    assert pg_fix_time(driver) == newest
    late = post(url(driver), {"lat": 1, "lon": 1, "recordedAt": (newest - timedelta(seconds=1)).isoformat()}, token=key)
    assert late.json() == {**late.json(), "accepted": False, "reason": "older_than_last_fix"}


def _wait_for(check, seconds=15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_a_running_consumer_makes_its_group_again_when_the_stream_is_gone():
    """Redis restarted empty, or the stream deleted: the fast lane's next fix makes the stream
    again without the group; the running consumer makes the group and goes on."""
    from availability.management.commands.consume_fixes import Command

    driver = online_driver()
    consumer = Command()
    consumer.name, consumer.batch, consumer.stopping = "survivor", 100, False

    def run():
        try:
            consumer._run(claim_idle_ms=30_000, claim_every=15, digest_every=1, block_ms=50, once=False)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        post(url(driver), {"lat": 12.95, "lon": 77.55, "recordedAt": recorded(1)}, token=token(driver))
        assert _wait_for(lambda: round(Driver.objects.get(pk=driver.pk).location.y, 5) == 12.95)
        get_redis().delete(live.STREAM_KEY)
        post(url(driver), {"lat": 12.96, "lon": 77.56, "recordedAt": recorded(2)}, token=token(driver))
        assert _wait_for(lambda: round(Driver.objects.get(pk=driver.pk).location.y, 5) == 12.96)
    finally:
        consumer.stopping = True
        thread.join(10)
    assert [g["name"] for g in get_redis().xinfo_groups(live.STREAM_KEY)] == [live.STREAM_GROUP]


def test_malformed_stream_entries_are_dropped_without_holding_up_or_crashing_the_batch(caplog):
    driver = online_driver()
    r = get_redis()
    call_command("consume_fixes", "--once")  # the group
    t = str(time.time() + 1)
    bad = [
        {"d": "not-a-uuid", "lat": "1", "lon": "2", "t": t},
        {"d": str(driver.pk), "lat": "1", "lon": "2", "t": "1e20"},
        {"d": str(driver.pk), "lat": "1", "lon": "2", "t": "nan"},
        {"d": str(driver.pk), "lat": "95", "lon": "2", "t": t},
        {"d": str(driver.pk), "lat": "1", "lon": "2", "t": t, "speed": "inf"},
    ]
    for fields in bad:
        r.xadd(live.STREAM_KEY, fields)
    # the same driver in upper case, unhyphenated: the same driver
    r.xadd(live.STREAM_KEY, {"d": driver.pk.hex.upper(), "lat": "12.97", "lon": "77.57", "t": t})

    call_command("consume_fixes", "--once")
    assert round(Driver.objects.get(pk=driver.pk).location.y, 5) == 12.97
    assert r.xpending(live.STREAM_KEY, live.STREAM_GROUP)["pending"] == 0
    assert caplog.text.count("dropping malformed fix") == len(bad)


class Interleaved:
    """A consumer's Redis client (wrapping `client`) that runs `action` (another consumer's
    read) just before its `before_call`-th command."""

    def __init__(self, client, *, before_call: int, action):
        self._client, self._before, self._action, self._calls = client, before_call, action, 0

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._calls += 1
            if self._calls == self._before:
                self._action()
            return attr(*args, **kwargs)

        return call


def test_the_trim_never_drops_entries_another_consumer_reads_meanwhile():
    """Another consumer's read may come between any two round trips of this one's trim: the
    floor and the trim are one step, so what that consumer holds pending stays."""
    from availability.management.commands.consume_fixes import Command

    r = get_redis()
    call_command("consume_fixes", "--once")  # the group, with everything so far acknowledged
    driver = online_driver()
    for i in range(300):
        r.xadd(live.STREAM_KEY, {"d": str(driver.pk), "lat": "12.9", "lon": "77.6", "t": str(time.time() - 1000 + i)})
    held = []

    def other_consumer_reads():
        held.extend(r.xreadgroup(live.STREAM_GROUP, "other", {live.STREAM_KEY: ">"}, count=1000)[0][1])

    consumer = Command()
    consumer.r = Interleaved(r, before_call=2, action=other_consumer_reads)  # before its second command
    consumer._trim()
    if not held:
        other_consumer_reads()  # (the trim was one round trip: the read comes after it)
    assert len(held) == 300
    assert len(r.xrange(live.STREAM_KEY, min=held[0][0], max=held[-1][0])) == 300  # all still there


def test_the_group_forgets_consumers_long_gone_with_nothing_pending(monkeypatch):
    from availability.management.commands import consume_fixes

    driver = online_driver()
    r = get_redis()
    call_command("consume_fixes", "--once", "--consumer", "gone")  # reads, writes, acknowledges: nothing pending
    post(url(driver), {"lat": 12.95, "lon": 77.55, "recordedAt": recorded(1)}, token=token(driver))
    r.xreadgroup(live.STREAM_GROUP, "holding", {live.STREAM_KEY: ">"}, count=10)  # holds an entry
    monkeypatch.setattr(consume_fixes, "DEAD_CONSUMER_IDLE_MS", -1)  # every consumer "long gone"

    call_command("consume_fixes", "--once", "--consumer", "survivor", "--claim-idle-ms", "3600000")
    names = {c["name"] for c in r.xinfo_consumers(live.STREAM_KEY, live.STREAM_GROUP)}
    assert names == {"holding", "survivor"}  # the one with an entry pending stays, and so does this one


def test_forgetting_a_consumer_never_drops_what_it_reads_meanwhile(monkeypatch):
    """A consumer of the name being forgotten (a restart that reused host and pid) may read
    between any two round trips of the one forgetting it: the look and the removal are one
    step, so the entry it takes stays pending (claimable), not lost with a removed consumer."""
    from availability.management.commands import consume_fixes

    r = get_redis()
    call_command("consume_fixes", "--once", "--consumer", "gone")  # the group; "gone" holds nothing
    driver = online_driver()
    r.xadd(live.STREAM_KEY, {"d": str(driver.pk), "lat": "12.9", "lon": "77.6", "t": str(time.time() - 10)})
    monkeypatch.setattr(consume_fixes, "DEAD_CONSUMER_IDLE_MS", -1)  # every consumer "long gone"
    held = []

    def gone_reads_again():
        held.extend(r.xreadgroup(live.STREAM_GROUP, "gone", {live.STREAM_KEY: ">"}, count=10)[0][1])

    consumer = consume_fixes.Command()
    # "gone" reads just before the forgetting consumer's third command (the first is the claim)
    consumer.r, consumer.name, consumer.batch = Interleaved(r, before_call=3, action=gone_reads_again), "survivor", 100
    consumer._claim(3_600_000)
    if not held:
        gone_reads_again()  # (the look and the removal were one round trip: the read comes after)
    assert len(held) == 1
    assert r.xpending(live.STREAM_KEY, live.STREAM_GROUP)["pending"] == 1  # still there to be claimed


def test_a_consumer_killed_mid_batch_loses_nothing_it_read():
    driver = online_driver()
    post(url(driver), {"lat": 12.95, "lon": 77.55, "recordedAt": recorded(1)}, token=token(driver))
    r = get_redis()
    call_command("consume_fixes", "--once")  # creates the group, drains what was there
    post(url(driver), {"lat": 12.96, "lon": 77.56, "recordedAt": recorded(2)}, token=token(driver))
    # A consumer reads the entry and dies before writing and acknowledging it.
    read = r.xreadgroup(live.STREAM_GROUP, "dead-consumer", {live.STREAM_KEY: ">"}, count=10)
    assert read and read[0][1]
    assert round(Driver.objects.get(pk=driver.pk).location.y, 5) == 12.95

    call_command("consume_fixes", "--once", "--claim-idle-ms", "0", "--consumer", "restarted")
    assert round(Driver.objects.get(pk=driver.pk).location.y, 5) == 12.96
    assert r.xpending(live.STREAM_KEY, live.STREAM_GROUP)["pending"] == 0


def test_the_consumer_writes_the_free_drivers_before_it_waits_for_one_a_request_holds():
    """A request holding a driver's row must not make the consumer hold the rest of its batch
    uncommitted while it waits (the requests wanting those rows would queue behind it)."""
    held, free = online_driver(), online_driver()
    for driver in (held, free):
        assert post(url(driver), {"lat": 12.98, "lon": 77.62, "recordedAt": recorded()}, token=token(driver)).status_code == 200
    before = {d.pk: pg_fix_time(d) for d in (held, free)}
    locked, release, seen = threading.Event(), threading.Event(), {}

    def request_holding_the_row():
        with transaction.atomic():
            list(Driver.objects.select_for_update().filter(pk=held.pk))
            locked.set()
            release.wait(30)
        connection.close()

    def watch_the_consumer():
        try:
            deadline = time.monotonic() + 20
            with connection.cursor() as cur:
                while time.monotonic() < deadline and "waiting" not in seen:
                    cur.execute("SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                                " AND wait_event_type = 'Lock' AND query LIKE '%%UPDATE dispatch_driver%%'")
                    if cur.fetchone():
                        seen["waiting"] = True
                    else:
                        release.wait(0.005)
            seen["free"], seen["held"] = pg_fix_time(free), pg_fix_time(held)  # committed rows only
        finally:
            release.set()
            connection.close()

    holder, watcher = threading.Thread(target=request_holding_the_row), threading.Thread(target=watch_the_consumer)
    holder.start()
    assert locked.wait(10)
    watcher.start()
    call_command("consume_fixes", "--once")
    watcher.join(30), holder.join(30)

    assert seen.get("waiting") is True  # the consumer did wait for the held row
    assert seen["free"] > before[free.pk] and seen["held"] == before[held.pk]  # the free one already committed
    assert pg_fix_time(held) > before[held.pk]  # and the held one once the request let go


def test_the_consumer_lowers_its_own_priority_below_the_web_workers(monkeypatch, settings):
    from availability.management.commands import consume_fixes

    calls = []
    monkeypatch.setattr(consume_fixes.os, "nice", lambda n: calls.append(n) or n)
    settings.FIX_CONSUMER_NICE = 7
    call_command("consume_fixes", "--once")
    call_command("consume_fixes", "--once", "--nice", "3")
    call_command("consume_fixes", "--once", "--nice", "0")  # as the shell started it
    assert calls == [7, 3]


def test_with_redis_unreachable_the_fix_goes_straight_to_postgres(monkeypatch):
    driver = online_driver()

    async def down(*args, **kwargs):
        raise redis.ConnectionError("Redis is down")

    monkeypatch.setattr(live, "fix_record_async", down)
    response = post(url(driver), {"lat": 12.93, "lon": 77.53, "recordedAt": recorded()}, token=token(driver))
    assert response.status_code == 200 and response.json()["accepted"] is True
    assert round(Driver.objects.get(pk=driver.pk).location.y, 5) == 12.93  # written by the request itself


def test_with_redis_hanging_the_fast_lane_gives_up_after_the_socket_timeout_and_postgres_takes_the_fix(settings):
    """A Redis that accepts the connection and never answers: the fast lane stops waiting after
    REDIS_SOCKET_TIMEOUT (its own timeout: its client has no socket timeout) and hands the fix
    to the database path."""
    driver = online_driver()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    settings.REDIS_URL = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    settings.REDIS_SOCKET_TIMEOUT = 0.3
    try:
        started = time.monotonic()
        response = post(url(driver), {"lat": 12.94, "lon": 77.54, "recordedAt": recorded()}, token=token(driver))
        waited = time.monotonic() - started
    finally:
        silent.close()
    assert response.status_code == 200 and response.json()["accepted"] is True
    assert round(Driver.objects.get(pk=driver.pk).location.y, 5) == 12.94  # written by the request itself
    assert waited < 5  # not redis-py's default socket timeout (5 s), nor forever


def test_a_revoked_token_stops_working_at_once():
    driver = online_driver()
    key = token(driver)
    assert post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(1)}, token=key).status_code == 200
    assert get_redis().smembers(live.auth_key(driver.pk))  # the fast lane remembers the token

    api_tokens_revoke(driver.user)  # what logout and the token admin call (the cache is told)
    refused = post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(2)}, token=key)
    assert refused.status_code == 401


def test_an_expired_token_is_refused_even_when_cached():
    driver = online_driver()
    key, api_token = api_token_issue(driver.user, ttl=timedelta(seconds=30))
    assert post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(1)}, token=key).status_code == 200
    assert 0 < get_redis().ttl(live.auth_key(driver.pk)) <= 30  # never cached past its expiry

    ApiToken.objects.filter(pk=api_token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    get_redis().delete(live.auth_key(driver.pk))  # as the cache would have expired by now
    refused = post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(2)}, token=key)
    assert refused.status_code == 401


def test_a_driver_with_two_tokens_may_use_both():
    driver = online_driver()
    first, second = token(driver), api_token_create(driver.user, name="second phone")
    for n, key in enumerate([first, second, first, second], start=1):
        assert post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(n)}, token=key).status_code == 200
    assert len(get_redis().smembers(live.auth_key(driver.pk))) == 2


def test_a_deactivated_login_stops_working_even_with_a_cached_token():
    driver = online_driver()
    key = token(driver)
    assert post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(1)}, token=key).status_code == 200
    driver.user.is_active = False
    driver.user.save(update_fields=["is_active"])
    hooks.login_revoked(driver.user)
    assert post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(2)}, token=key).status_code == 401


def test_the_fast_lane_throttles_like_the_api(settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "user": "2/min"}}
    driver = online_driver()
    codes = [post(url(driver), {"lat": 12.9, "lon": 77.6, "recordedAt": recorded(1 + i)}, token=token(driver))
             for i in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 429]
    body = codes[2].json()
    assert body["error"] == "Too Many Requests" and body["message"].startswith("Request was throttled.")
    assert int(codes[2].headers["Retry-After"]) >= 1


def test_a_fix_redis_stored_after_the_fast_lane_stopped_waiting_is_accepted_and_told_to_the_customer(listen, monkeypatch):
    """The fast lane waits REDIS_SOCKET_TIMEOUT for its script; on a busy event loop the wait
    ran out after Redis had stored the fix, and the database path it handed the fix to found
    that very fix in Redis: "older_than_last_fix", though stored, and no customer event (a map
    audit under load: 53 such answers). That fix is accepted; a repeat of it, or another fix at
    the same time, is still ignored."""
    driver = online_driver()
    delivery = DeliveryFactory()
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    key = token(driver)
    customer = listen(delivery_group(delivery.pk))
    customer.drain()
    real = live.fix_record_async

    async def stored_then_timed_out(*args, **kwargs):
        outcome = await real(*args, **kwargs)
        if outcome.code == "ok":  # (not the first call's "auth": the token is looked up, then the fix recorded)
            raise TimeoutError  # (asyncio.timeout's, once the script has run)
        return outcome

    at = recorded(2)
    with monkeypatch.context() as slow:
        slow.setattr(live, "fix_record_async", stored_then_timed_out)
        response = post(url(driver), {"lat": 12.975, "lon": 77.605, "recordedAt": at}, token=key)
    assert response.status_code == 200
    assert response.json() == {"success": True, "accepted": True, "driverId": str(driver.pk), "recordedAt": at}
    assert pg_fix_time(driver).isoformat().replace("+00:00", "Z") == at
    events = [e for e in customer.drain(timeout=1.0) if e["type"] == "delivery_location_updated"]
    assert [e["location"]["lat"] for e in events] == [12.975]

    # a client's repeat of that fix, through the fast lane or Django, is "not newer", as before;
    # so is another place at that time, even handed over
    for headers in ({}, {"Idempotency-Key": "repeat"}):
        again = post(url(driver), {"lat": 12.975, "lon": 77.605, "recordedAt": at}, token=key, headers=headers)
        assert again.json()["accepted"] is False and again.json()["reason"] == "older_than_last_fix"
    with monkeypatch.context() as slow:
        slow.setattr(live, "fix_record_async", stored_then_timed_out)
        other = post(url(driver), {"lat": 12.976, "lon": 77.605, "recordedAt": at}, token=key)
    assert other.json()["accepted"] is False
    assert round(live.positions_of([driver.pk])[str(driver.pk)].lat, 3) == 12.975
    assert not [e for e in customer.drain(timeout=0.3) if e["type"] == "delivery_location_updated"]


def test_the_customer_gets_the_fix_from_the_fast_lane_and_ops_a_digest_and_each_location(listen):
    driver = online_driver()
    delivery = DeliveryFactory()
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    customer = listen(delivery_group(delivery.pk))
    ops = listen(OPS_GROUP)
    locations = listen(OPS_LOCATIONS_GROUP)
    customer.drain()
    ops.drain()
    locations.drain()

    post(url(driver), {"lat": 12.975, "lon": 77.605, "speed": 5.0, "recordedAt": recorded()}, token=token(driver))
    events = [e for e in customer.drain(timeout=1.0) if e["type"] == "delivery_location_updated"]
    assert len(events) == 1
    assert_event_shape(events[0], DeliveryLocationUpdatedEvent)
    assert events[0]["location"]["lat"] == 12.975 and events[0]["speed"] == 18.0  # km/h

    call_command("consume_fixes", "--once")  # publishes the digest
    digests = [e for e in ops.drain(timeout=1.0) if e["type"] == "driver_positions"]
    assert len(digests) == 1
    assert_event_shape(digests[0], DriverPositionsEvent)
    assert [d["driverId"] for d in digests[0]["drivers"]] == [str(driver.pk)]
    assert not [e for e in ops.drain(timeout=0.2) if e["type"] == "delivery_location_updated"]
    # each location to the ops sockets that want them (SPEC: /ws/ops/ gets "all of the above"),
    # sent by the consumer, once, as the customer's: one channel-layer message a batch
    (batch,) = locations.drain(timeout=1.0)
    assert batch == {"type": "delivery_locations", "events": [events[0]]}


def test_the_digest_says_when_the_availability_read_with_each_fix_began(listen, django_capture_on_commit_callbacks):
    """The live map takes the newer of the digest's availability and the last
    `availability_changed` it saw (a lost event is mended by the next fix): each entry carries
    its transition's time, the one the event had; a status written without one carries none."""
    from workflows import drivers as driver_workflows

    on_break, unstamped = online_driver(), online_driver(km=0.7)
    with django_capture_on_commit_callbacks(execute=True):
        driver_workflows.availability_take_break(driver_id=on_break.pk, duration_minutes=15, reason="tea",
                                                 actor=Actor("driver", on_break.pk))
    began = Driver.objects.get(pk=on_break.pk).last_availability_change
    ops = listen(OPS_GROUP)
    ops.drain()

    for driver in (on_break, unstamped):
        assert post(url(driver), {"lat": 12.975, "lon": 77.605, "recordedAt": recorded()}, token=token(driver)).json()["accepted"]
    call_command("consume_fixes", "--once")

    (digest,) = [e for e in ops.drain(timeout=1.0) if e["type"] == "driver_positions"]
    assert_event_shape(digest, DriverPositionsEvent)
    entries = {d["driverId"]: d for d in digest["drivers"]}
    assert entries[str(on_break.pk)]["availability"] == "on_break"
    assert entries[str(on_break.pk)]["availabilityChangedAt"] == iso(began)
    assert entries[str(unstamped.pk)]["availability"] == "available"
    assert entries[str(unstamped.pk)]["availabilityChangedAt"] is None


def test_a_stacked_driver_s_fix_reaches_every_customer_it_carries_for(listen, settings):
    """Order stacking: the live map holds both deliveries; the fast lane tells both customers,
    and the stream consumer (the database path) agrees with Redis, so it repeats nothing."""
    settings.STACKING_ENABLED = True
    driver = online_driver(km=0.0, vehicle_type="bicycle")
    first, second = DeliveryFactory(prep_time_minutes=0), DeliveryFactory(prep_time_minutes=0)
    assignment_create(delivery_id=first.pk, driver_id=driver.pk, actor=Actor.system())
    assignment_create(delivery_id=second.pk, driver_id=driver.pk, actor=Actor.system())
    assert live.known_state([str(driver.pk)])[str(driver.pk)][1] == (str(first.pk), str(second.pk))
    customers = listen(delivery_group(first.pk), delivery_group(second.pk))
    customers.drain()

    post(url(driver), {"lat": 12.972, "lon": 77.595, "recordedAt": recorded()}, token=token(driver))
    sent = [e["deliveryId"] for e in customers.drain(timeout=1.0) if e["type"] == "delivery_location_updated"]
    assert sorted(sent) == sorted([str(first.pk), str(second.pk)])

    call_command("consume_fixes", "--once")
    assert not [e for e in customers.drain(timeout=0.3) if e["type"] == "delivery_location_updated"]


@pytest.mark.parametrize("change", ["ended", "made", "made_after_redis_lost_one"])
def test_an_assignment_made_or_ended_while_the_consumer_reads_postgres_is_not_undone(monkeypatch, change):
    """The consumer compares PostgreSQL's active deliveries with Redis's active map and repairs
    Redis; an assignment that changes after its PostgreSQL read (and writes Redis after its
    commit) must stay as its workflow wrote it, not be put back by the consumer's older read —
    also when Redis and PostgreSQL differed before (Redis had lost a delivery): the repair then
    is a compare-and-set on what was read, and leaves the newer write."""
    from workflows import drivers as driver_workflows

    driver = online_driver()
    delivery = DeliveryFactory()
    if change == "ended":
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    if change == "made_after_redis_lost_one":
        lost = DeliveryFactory()
        assignment_create(delivery_id=lost.pk, driver_id=driver.pk, actor=Actor.system())
        get_redis().hdel(live.ACTIVE_KEY, str(driver.pk))  # Redis lost it (PostgreSQL has it)
    real, changed = driver_workflows.positions_persist, []

    def persist_then_change(*args, **kwargs):
        persisted = real(*args, **kwargs)  # PostgreSQL read: the assignment as it was
        if not changed:  # now it changes, and its workflow writes Redis after commit
            changed.append(True)
            if change == "ended":
                live.active_delivery_clear(driver.pk, delivery.pk)
            else:
                live.active_delivery_set(driver.pk, delivery.pk)
        return persisted

    monkeypatch.setattr(driver_workflows, "positions_persist", persist_then_change)
    driver_workflows.fixes_process([live.Fix(driver_id=str(driver.pk), lat=12.95, lon=77.55, recorded_at=time.time())])
    assert live.known_state([str(driver.pk)])[str(driver.pk)][1] == (() if change == "ended" else (str(delivery.pk),))
    # (after "made_after_redis_lost_one" the lost delivery comes back with the driver's next batch)


def test_the_reconcile_job_does_not_undo_an_assignment_made_after_its_postgres_read(monkeypatch):
    """`live.active_reconcile` (every minute): an assignment committed after the job read
    PostgreSQL writes Redis itself; the job's older snapshot leaves it (a compare-and-set on
    what it read first), and repairs the rest."""
    driver, stray = online_driver(), online_driver()
    delivery, lost = DeliveryFactory(), DeliveryFactory()
    live.active_delivery_set(stray.pk, "00000000-0000-0000-0000-000000000001")  # PostgreSQL knows no such
    assignment_create(delivery_id=lost.pk, driver_id=driver.pk, actor=Actor.system())
    get_redis().hdel(live.ACTIVE_KEY, str(driver.pk))  # Redis lost it: the job's read differs from PostgreSQL's

    class ThenAssigned:
        """The job's database connection: right after its read, the assignment commits and
        its workflow writes Redis."""

        def cursor(self):
            cursor = connection.cursor()
            fetchall = cursor.fetchall

            def read_then_assign():
                rows = fetchall()
                live.active_delivery_set(driver.pk, delivery.pk)
                return rows

            cursor.fetchall = read_then_assign
            return cursor

    monkeypatch.setattr(live, "connection", ThenAssigned())
    live.active_reconcile()
    state = live.known_state([str(driver.pk), str(stray.pk)])
    assert state[str(driver.pk)][1] == (str(delivery.pk),)
    assert state[str(stray.pk)][1] == ()


def test_readers_of_the_position_see_the_fast_lane_before_postgres_does():
    """Tracking status and the stale-driver job read the live position, not PostgreSQL's,
    which trails by the consumer's lag (or more, while the consumer is down)."""
    driver = online_driver()
    delivery = DeliveryFactory()
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    post(url(driver), {"lat": 12.991, "lon": 77.611, "recordedAt": recorded(1)}, token=token(driver))

    status = tracking_status(Delivery.objects.get(pk=delivery.pk))
    assert status["location"]["lat"] == 12.991 and status["location"]["lon"] == 77.611

    idle = online_driver()
    Driver.objects.filter(pk=idle.pk).update(location_recorded_at=timezone.now() - timedelta(hours=1),
                                             last_availability_change=timezone.now() - timedelta(hours=1))
    post(url(idle), {"lat": 12.97, "lon": 77.59, "recordedAt": recorded(1)}, token=token(idle))
    assert stale_drivers_mark_offline() == 0  # PostgreSQL says an hour old; Redis says now
    assert Driver.objects.get(pk=idle.pk).availability == "available"


def test_the_stale_driver_job_leaves_a_driver_whose_fix_reached_redis_after_it_read_its_page(monkeypatch):
    """The job reads a page of candidates and their live positions, then changes them one at a
    time: a fix the fast lane takes in between (PostgreSQL still an hour old) keeps the driver."""
    idle = online_driver()
    hour_ago = timezone.now() - timedelta(hours=1)
    Driver.objects.filter(pk=idle.pk).update(location_recorded_at=hour_ago, last_availability_change=hour_ago)
    assert live.positions_known([idle.pk]) == {}  # no fix through the fast lane yet
    real = live.positions_known

    def page_then_a_fix(ids):
        known = real(ids)
        monkeypatch.setattr(live, "positions_known", real)  # the page's read only
        post(url(idle), {"lat": 12.97, "lon": 77.59, "recordedAt": recorded(1)}, token=token(idle))
        return known

    monkeypatch.setattr(live, "positions_known", page_then_a_fix)
    assert stale_drivers_mark_offline() == 0
    assert Driver.objects.get(pk=idle.pk).availability == "available"


def test_fixes_already_in_postgres_reach_the_live_state_in_one_pipeline_even_after_redis_forgot_the_script():
    """`fixes_record_persisted` (the simulator's fixes, one round trip a batch): every fix lands,
    an older one never wins, and a Redis that lost its scripts (restart, SCRIPT FLUSH) is
    served by loading the script once and sending again."""
    first, second = online_driver(), online_driver()
    now = timezone.now().timestamp()
    get_redis().script_flush()
    live.fixes_record_persisted([
        live.Fix(driver_id=str(first.pk), lat=12.91, lon=77.51, recorded_at=now),
        live.Fix(driver_id=str(second.pk), lat=12.92, lon=77.52, recorded_at=now),
        live.Fix(driver_id=str(first.pk), lat=12.99, lon=77.59, recorded_at=now - 30),  # older: ignored
    ])
    positions = live.positions_of([first.pk, second.pk])
    assert (round(positions[str(first.pk)].lat, 5), round(positions[str(first.pk)].lon, 5)) == (12.91, 77.51)
    assert (round(positions[str(second.pk)].lat, 5), round(positions[str(second.pk)].lon, 5)) == (12.92, 77.52)
    lon, lat = get_redis().geopos(geo.GEO_KEY, str(second.pk))[0]
    assert round(lat, 4) == 12.92  # available: in the GEO index where the fix says


def test_after_a_redis_outage_the_reconcile_job_brings_redis_up_to_the_fixes_postgres_took(monkeypatch):
    """While Redis was unreachable the fixes went straight to PostgreSQL; Redis kept the fix
    before the outage. The reconcile job (every minute) reseeds it from PostgreSQL, so readers
    of Redis see the newer position and an out-of-order fix older than PostgreSQL's is no longer
    taken by the fast lane; a fix newer than PostgreSQL's that Redis took meanwhile stays."""
    from availability.tasks import reconcile_geo_index

    driver, other = online_driver(), online_driver()  # other: a fix in PostgreSQL only (a Redis restarted empty)
    key = token(driver)
    assert str(other.pk) not in live.positions_of([other.pk])
    assert post(url(driver), {"lat": 12.91, "lon": 77.51, "recordedAt": recorded(1)}, token=key).json()["accepted"]

    async def down(*args, **kwargs):
        raise redis.ConnectionError("Redis is down")

    with monkeypatch.context() as outage:  # every Redis write of the location path fails
        outage.setattr(live, "fix_record_async", down)
        outage.setattr(live, "fix_of", lambda driver_id: None)
        outage.setattr(live, "fix_record_persisted", lambda fix: None)
        outage.setattr(geo, "index_driver", lambda **kwargs: None)
        during = recorded(3)
        response = post(url(driver), {"lat": 12.93, "lon": 77.53, "recordedAt": during}, token=key)
        assert response.json()["accepted"] is True
    assert pg_fix_time(driver).isoformat().replace("+00:00", "Z") == during  # PostgreSQL took it
    assert round(live.positions_of([driver.pk])[str(driver.pk)].lat, 5) == 12.91  # Redis: the fix before

    result = reconcile_geo_index.delay().get(timeout=10)

    assert result["positionsReseeded"] == 2
    position = live.positions_of([driver.pk])[str(driver.pk)]
    assert (round(position.lat, 5), round(position.lon, 5)) == (12.93, 77.53)
    assert round(get_redis().geopos(geo.GEO_KEY, str(driver.pk))[0][1], 4) == 12.93  # available: indexed there
    older = post(url(driver), {"lat": 12.92, "lon": 77.52, "recordedAt": recorded(2)}, token=key)
    assert older.status_code == 200 and older.json()["accepted"] is False

    assert post(url(driver), {"lat": 12.95, "lon": 77.55, "recordedAt": recorded(4)}, token=key).json()["accepted"]
    assert live.positions_reseed() == 0  # Redis ahead of PostgreSQL (the consumer has not run): kept
    assert round(live.positions_of([driver.pk])[str(driver.pk)].lat, 5) == 12.95
    assert live.positions_of([other.pk])[str(other.pk)].recorded_at == pg_fix_time(other)


def test_a_path_with_a_final_newline_is_refused_as_django_refuses_it():
    """The fast lane's path pattern ended in "$", which also matches before a final newline:
    `…/location%0A` was taken (and the fix stored) where Django's stack answers 400."""
    driver = online_driver()
    before = live.positions_known([driver.pk])
    for suffix in ("%0A", "%0a"):
        r = post(url(driver) + suffix, {"lat": 12.5, "lon": 77.5, "recordedAt": recorded(1)}, token=token(driver))
        assert r.status_code == 400, r.text
        assert r.json()["message"] == "The path contains invalid characters (control characters or invalid UTF-8)."
    assert live.positions_known([driver.pk]) == before
    assert post(url(driver), {"lat": 12.5, "lon": 77.5, "recordedAt": recorded(1)}, token=token(driver)).status_code == 200


def test_an_ops_socket_gets_each_fast_lane_location_as_its_own_frame_and_the_map_s_none():
    """The consumer sends a batch's locations to `ops.locations` in one message; each ops socket
    that did not ask `?locations=0` writes them out one `delivery_location_updated` frame each."""
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator

    from tests.factories import OpsUserFactory

    first, second = online_driver(), online_driver(km=0.7)
    deliveries = [DeliveryFactory(), DeliveryFactory()]
    for driver, delivery in zip((first, second), deliveries, strict=True):
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    ops_token = token_for(OpsUserFactory())

    async def scenario():
        everything = WebsocketCommunicator(application, f"/ws/ops/?token={ops_token}")
        map_only = WebsocketCommunicator(application, f"/ws/ops/?token={ops_token}&locations=0")
        assert (await everything.connect())[0] and (await map_only.connect())[0]
        for driver in (first, second):
            body = {"lat": 12.975, "lon": 77.605, "recordedAt": recorded()}
            response = await database_sync_to_async(post)(url(driver), body, token=token(driver))
            assert response.json()["accepted"]
        await database_sync_to_async(call_command)("consume_fixes", "--once")
        frames = []
        while not await everything.receive_nothing(timeout=1.0):
            frames.append(await everything.receive_json_from(timeout=5))
        located = [f for f in frames if f["type"] == "delivery_location_updated"]
        assert sorted(f["deliveryId"] for f in located) == sorted(str(d.pk) for d in deliveries)
        for frame in located:
            assert_event_shape(frame, DeliveryLocationUpdatedEvent)
        assert "delivery_locations" not in {f["type"] for f in frames}  # (the batch is not a frame)
        others = []
        while not await map_only.receive_nothing(timeout=0.5):
            others.append((await map_only.receive_json_from(timeout=5))["type"])
        assert "delivery_location_updated" not in others and "driver_positions" in others
        for comm in (everything, map_only):
            await comm.disconnect()

    async_to_sync(scenario)()
