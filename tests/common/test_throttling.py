"""Throttling (SPEC "Wire conventions"): a 429 with Retry-After, counted per caller, failing open
when Redis is unreachable."""
from __future__ import annotations

import time_machine

from tests.wire import CLOSED_REDIS_URL, MID_MINUTE, assert_error_body, with_throttle_rates


def test_the_request_over_the_user_rate_is_a_429_with_retry_after(ops, settings):
    # given a limit of three requests a minute, 55 s before the window ends
    with_throttle_rates(settings, user="3/min")
    with time_machine.travel(MID_MINUTE, tick=False):
        statuses = [ops.get("/v2/deliveries").status_code for _ in range(3)]
        # when a fourth arrives in the same minute
        r = ops.get("/v2/deliveries")
        # then it is throttled, with the error body and when to come back
        body = assert_error_body(r, 429, path="/v2/deliveries")
    assert statuses == [200, 200, 200]
    assert r["Retry-After"] == "55"
    assert body["message"] == "Request was throttled. Expected available in 55 seconds."


def test_the_user_rate_is_counted_per_caller(ops, integration, settings):
    with_throttle_rates(settings, user="3/min")
    with time_machine.travel(MID_MINUTE, tick=False):
        for _ in range(4):
            ops.get("/v2/deliveries")
        assert ops.get("/v2/deliveries").status_code == 429
        # another caller still has its own allowance
        assert integration.get("/v2/deliveries").status_code == 200


def test_requests_are_served_when_redis_is_unreachable(ops, settings):
    # given a throttle that would stop the fourth request, and Redis down
    with_throttle_rates(settings, user="3/min")
    settings.REDIS_URL = CLOSED_REDIS_URL
    # when five requests arrive
    statuses = [ops.get("/v2/deliveries").status_code for _ in range(5)]
    # then throttling fails open: all are served
    assert statuses == [200] * 5


def test_an_anonymous_caller_is_counted_by_its_address_whatever_x_forwarded_for_says(anon, settings, db):
    """With DRF's NUM_PROXIES None the raw header was the caller: a new X-Forwarded-For each time
    was never throttled (password guessing on /v2/auth/token), and a victim's address in it spent
    the victim's allowance."""
    with_throttle_rates(settings, anon="3/min")
    with time_machine.travel(MID_MINUTE, tick=False):
        statuses = [
            anon.post("/v2/auth/token", {"username": "ops", "password": f"guess{n}"}, format="json",
                      HTTP_X_FORWARDED_FOR=f"203.0.113.{n}").status_code
            for n in range(4)
        ]
    assert statuses == [401, 401, 401, 429]


def test_a_victims_address_in_x_forwarded_for_does_not_spend_its_allowance(anon, settings, db):
    with_throttle_rates(settings, anon="3/min")
    with time_machine.travel(MID_MINUTE, tick=False):
        for _ in range(3):
            anon.post("/v2/auth/token", {"username": "ops", "password": "x"}, format="json",
                      HTTP_X_FORWARDED_FOR="198.51.100.7", REMOTE_ADDR="192.0.2.1")
        r = anon.post("/v2/auth/token", {"username": "ops", "password": "x"}, format="json", REMOTE_ADDR="198.51.100.7")
    assert r.status_code == 401
