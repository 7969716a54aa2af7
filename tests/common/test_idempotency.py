"""Idempotency-Key (SPEC "Wire conventions"): replays for 24 hours, conflicts, per-caller keys,
concurrent requests with one key, and purging expired records."""
from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from django.db import connections
from django.utils import timezone
from rest_framework.test import APIClient

from common.idempotency import MAX_KEY_LENGTH, purge_expired_idempotency_records
from common.models import IdempotencyRecord
from common.tasks import purge_idempotency_records
from tests.api import client_for, token_for
from tests.factories import IntegrationUserFactory
from tests.wire import MID_MINUTE, assert_error_body, deliveries_of, delivery_body, post_delivery, with_throttle_rates


def test_replaying_an_idempotency_key_returns_the_first_response_without_a_second_delivery(integration, integration_user):
    # given a delivery created with an Idempotency-Key
    first = post_delivery(integration, key="create-1")
    assert first.status_code == 201, first.content
    assert "Idempotent-Replayed" not in first
    # when the same request is sent again with the same key
    again = post_delivery(integration, key="create-1")
    # then the first response comes back, marked as a replay, and nothing new is created
    assert again.status_code == 201
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true"
    assert again["Content-Type"] == first["Content-Type"]
    assert deliveries_of(integration_user).count() == 1
    assert IdempotencyRecord.objects.get(key="create-1").status_code == 201


def test_reusing_an_idempotency_key_with_another_body_is_a_conflict(integration, integration_user):
    post_delivery(integration, key="create-2")

    r = post_delivery(integration, delivery_body(sellerOrderId="ORD-CONV-OTHER"), key="create-2")

    body = assert_error_body(r, 409, path="/v2/deliveries")
    assert body["message"] == "This Idempotency-Key was used with a different request."
    assert "Retry-After" not in r  # (a retry cannot resolve it)


def test_a_retry_while_the_first_request_runs_is_told_when_to_try_again(integration, integration_user):
    post_delivery(integration, key="create-running")
    IdempotencyRecord.objects.filter(key="create-running").update(status_code=None)  # as while it runs

    r = post_delivery(integration, key="create-running")

    body = assert_error_body(r, 409, path="/v2/deliveries")
    assert body["message"] == "A request with this Idempotency-Key is still being processed."
    assert r["Retry-After"] == "1"
    assert deliveries_of(integration_user).count() == 1

    # a claim older than any request runs was left by a process that died: no "retry in a second"
    IdempotencyRecord.objects.filter(key="create-running").update(created_at=timezone.now() - timedelta(minutes=2))
    stale = post_delivery(integration, key="create-running")
    assert assert_error_body(stale, 409, path="/v2/deliveries")["message"] == body["message"]
    assert "Retry-After" not in stale
    assert list(deliveries_of(integration_user).values_list("seller_order_id", flat=True)) == ["ORD-CONV-1"]


def test_the_same_idempotency_key_from_another_caller_is_independent(integration, integration_user, db):
    # given one integration used a key
    first = post_delivery(integration, key="shared-key")
    # when another integration uses the same key with the same body
    other_user = IntegrationUserFactory()
    second = post_delivery(client_for(other_user), key="shared-key")
    # then it is executed for that caller: its own delivery, not a replay
    assert (first.status_code, second.status_code) == (201, 201)
    assert "Idempotent-Replayed" not in second
    assert second.json()["id"] != first.json()["id"]
    assert deliveries_of(integration_user).count() == 1
    assert deliveries_of(other_user).count() == 1


def test_a_key_used_for_a_login_does_not_turn_a_call_without_credentials_into_a_409(db):
    """Callers without credentials are per address and path: the login's stored answer made any
    later call with the key and no credentials a 409 "used with a different request" on every
    endpoint, where a 401 belongs (schemathesis `ignored_auth`)."""
    anon = APIClient()
    anon.credentials(HTTP_IDEMPOTENCY_KEY="0")
    login = anon.post("/v2/auth/token", {"username": 5}, format="json")
    assert login.status_code == 400  # (stored)

    # (the longest paths too: a driver's step with two ids made a caller past its column, a 500)
    some_id = "11111111-2222-3333-4444-555555555555"
    step = f"/v2/drivers/{some_id}/deliveries/{some_id}/delivery-completed"
    for path in ("/v2/admin/escalation/check", "/v2/zones", step):
        assert_error_body(anon.post(path, {}, format="json"), 401, path=path)
    assert anon.post("/v2/auth/token", {"username": 5}, format="json").json() == login.json()  # still replayed


def test_the_same_account_is_the_same_caller_however_it_sends_its_token(integration_user):
    """A retry is recognised when the header's scheme is written in another case (DRF takes
    any) or comes with another of the account's tokens (a new login): before, the caller was
    the header's exact text, and the retry ran the request a second time."""
    from common.tokens import api_token_create

    first = post_delivery(client_for(integration_user), key="retry-1")
    assert first.status_code == 201, first.content
    for header in (f"token {token_for(integration_user)}", f"TOKEN  {token_for(integration_user)}",
                   f"Token {api_token_create(integration_user, name='second login')}"):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=header)
        again = post_delivery(client, key="retry-1")
        assert again.status_code == 201 and again["Idempotent-Replayed"] == "true", header
        assert again.content == first.content
    assert deliveries_of(integration_user).count() == 1


def test_an_idempotency_key_is_replayed_until_24_hours_and_executed_again_after(integration, integration_user):
    t0 = datetime(2026, 3, 1, 9, 0, tzinfo=dt_timezone.utc)
    with time_machine.travel(t0, tick=False):
        first = post_delivery(integration, key="daily")
    assert first.status_code == 201

    # just inside the 24 h: replayed
    with time_machine.travel(t0 + timedelta(hours=23, minutes=59), tick=False):
        inside = post_delivery(integration, key="daily")
    assert inside["Idempotent-Replayed"] == "true"
    assert inside.content == first.content

    # past the 24 h: executed again, so it now meets the duplicate sellerOrderId
    with time_machine.travel(t0 + timedelta(hours=24, seconds=1), tick=False):
        after = post_delivery(integration, key="daily")
        body = assert_error_body(after, 409, path="/v2/deliveries")
    assert "Idempotent-Replayed" not in after
    assert body["message"] == "A delivery for sellerOrderId 'ORD-CONV-1' already exists."
    assert deliveries_of(integration_user).count() == 1


def test_a_dead_token_of_the_account_gets_no_replay(integration_user):
    """The replay comes before the view authenticates: an expired token of the account, or any
    token of a deactivated one, must not be taken for the account (a 401 from the view, as
    without the key)."""
    from datetime import timedelta as td

    from common.tokens import api_token_issue

    first = post_delivery(client_for(integration_user), key="dead-1")
    assert first.status_code == 201
    expired, token = api_token_issue(integration_user, name="old login", ttl=td(days=1))
    type(token).objects.filter(pk=token.pk).update(expires_at=timezone.now() - td(seconds=1))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {expired}")
    again = post_delivery(client, key="dead-1")
    assert again.status_code == 401 and "Idempotent-Replayed" not in again

    type(integration_user).objects.filter(pk=integration_user.pk).update(is_active=False)
    again = post_delivery(client_for(integration_user), key="dead-1")
    assert again.status_code == 401 and "Idempotent-Replayed" not in again


def test_a_retry_across_the_deploy_that_made_callers_accounts_is_still_replayed(integration, integration_user):
    """Records stored before were keyed by the header's text; for their 24 h a retry with the
    same header finds them."""
    import hashlib

    first = post_delivery(integration, key="legacy-1")
    header = f"Token {token_for(integration_user)}"
    IdempotencyRecord.objects.filter(key="legacy-1").update(  # as the older server wrote it
        caller="auth:" + hashlib.sha256(header.encode()).hexdigest(), response_body=first.content,
    )
    again = post_delivery(integration, key="legacy-1")
    assert again["Idempotent-Replayed"] == "true" and again.content == first.content
    assert deliveries_of(integration_user).count() == 1


def test_a_new_drivers_token_is_replayed_to_a_retry_but_never_stored_readable(ops, settings):
    """The first response is sealed at rest: the database holds no usable token (the new
    driver's `apiToken`, shown once), yet a retry that lost the response gets it whole. The
    sealing key comes from SECRET_KEY; after a rotation the old one opens it from
    SECRET_KEY_FALLBACKS, and without it the replay is a clear 409, never another driver."""
    from availability.models import Driver

    body = {"name": "Ann Idem", "phone": "+15550001234", "vehicle": "bike"}
    first = ops.post("/v2/drivers", body, format="json", HTTP_IDEMPOTENCY_KEY="driver-1")
    assert first.status_code == 201, first.content
    key = first.json()["apiToken"].encode()
    stored = bytes(IdempotencyRecord.objects.get(key="driver-1").response_body)
    assert key not in stored and b"apiToken" not in stored and b"Ann Idem" not in stored

    again = ops.post("/v2/drivers", body, format="json", HTTP_IDEMPOTENCY_KEY="driver-1")
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.content == first.content

    old_secret = settings.SECRET_KEY
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "rotated-" + old_secret, [old_secret]
    assert ops.post("/v2/drivers", body, format="json", HTTP_IDEMPOTENCY_KEY="driver-1").content == first.content
    settings.SECRET_KEY_FALLBACKS = []
    lost = ops.post("/v2/drivers", body, format="json", HTTP_IDEMPOTENCY_KEY="driver-1")
    assert_error_body(lost, 409, path="/v2/drivers")
    assert "new key" in lost.json()["message"]
    assert Driver.objects.filter(name="Ann Idem").count() == 1


def test_a_record_stored_before_sealing_is_replayed_as_it_was(integration, integration_user):
    first = post_delivery(integration, key="plain-1")
    IdempotencyRecord.objects.filter(key="plain-1").update(response_body=first.content)  # as an older server wrote it
    again = post_delivery(integration, key="plain-1")
    assert again["Idempotent-Replayed"] == "true" and again.content == first.content


def test_a_400_response_is_replayed_too(integration, integration_user):
    invalid = {"storeName": "Corner Shop"}
    first = post_delivery(integration, invalid, key="bad-1")
    assert first.status_code == 400

    again = post_delivery(integration, invalid, key="bad-1")

    assert again.status_code == 400
    assert again["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert deliveries_of(integration_user).count() == 0


def test_a_retry_with_its_json_spaced_or_ordered_otherwise_is_the_same_request(integration, integration_user):
    body = delivery_body()
    first = integration.post("/v2/deliveries", json.dumps(body), content_type="application/json", HTTP_IDEMPOTENCY_KEY="k")
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2)

    again = integration.post("/v2/deliveries", reordered, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k")

    assert first.status_code == 201 and again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.content == first.content and deliveries_of(integration_user).count() == 1


def test_a_record_hashed_from_the_raw_json_before_the_change_is_still_replayed(integration, integration_user):
    """Records written before JSON bodies were compared by value hold the raw bytes' hash: a
    retry across the deploy is still replayed."""
    raw = json.dumps(delivery_body()).encode()
    first = integration.post("/v2/deliveries", raw, content_type="application/json", HTTP_IDEMPOTENCY_KEY="legacy")
    IdempotencyRecord.objects.filter(key="legacy").update(
        request_hash=hashlib.sha256(b"POST\0/v2/deliveries\0" + raw).hexdigest())

    again = integration.post("/v2/deliveries", raw, content_type="application/json", HTTP_IDEMPOTENCY_KEY="legacy")

    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true" and again.content == first.content


def test_a_request_that_never_ran_releases_the_key(integration, integration_user):
    """A 415 (a body the endpoint does not take) was stored: the same bytes sent again as JSON
    with the key replayed the 415."""
    raw = json.dumps(delivery_body())
    refused = integration.post("/v2/deliveries", raw, content_type="text/plain", HTTP_IDEMPOTENCY_KEY="k415")
    assert refused.status_code == 415

    retried = integration.post("/v2/deliveries", raw, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k415")

    assert retried.status_code == 201, retried.content
    assert "Idempotent-Replayed" not in retried and deliveries_of(integration_user).count() == 1


def test_a_throttled_response_releases_the_idempotency_key(integration, integration_user, settings):
    # given the caller is at its limit
    with_throttle_rates(settings, user="1/min")
    with time_machine.travel(MID_MINUTE, tick=False):
        assert post_delivery(integration, delivery_body(sellerOrderId="ORD-A"), key="a").status_code == 201
        throttled = post_delivery(integration, key="b")
    assert throttled.status_code == 429
    # when the same key is retried in the next window
    with time_machine.travel(MID_MINUTE + timedelta(minutes=1), tick=False):
        retried = post_delivery(integration, key="b")
    # then the request runs; the 429 was not stored as the key's answer
    assert retried.status_code == 201, retried.content
    assert "Idempotent-Replayed" not in retried
    assert deliveries_of(integration_user).count() == 2


@pytest.mark.parametrize("key", ["k" * (MAX_KEY_LENGTH + 1), "   "])
def test_an_overlong_or_blank_idempotency_key_is_a_400(integration, integration_user, key):
    r = post_delivery(integration, key=key)

    body = assert_error_body(r, 400, path="/v2/deliveries")
    assert body["message"] == "Idempotency-Key must be 1 to 255 characters."
    assert deliveries_of(integration_user).count() == 0
    assert not IdempotencyRecord.objects.filter(key__in=[key, key.strip()]).exists()


def test_an_idempotency_key_of_exactly_255_characters_is_accepted(integration):
    r = post_delivery(integration, key="k" * MAX_KEY_LENGTH)

    assert r.status_code == 201, r.content
    assert IdempotencyRecord.objects.get(key="k" * MAX_KEY_LENGTH).status_code == 201


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_one_idempotency_key_create_exactly_one_delivery():
    # given four copies of one request, released at the same moment
    user = IntegrationUserFactory()
    token = token_for(user)
    n = 4
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def send(i: int) -> None:
        try:
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
            barrier.wait(timeout=10)
            r = post_delivery(client, key="race")
            results[i] = (r.status_code, r.get("Idempotent-Replayed"), r.content, r.get("Retry-After"))
        except Exception as exc:  # surfaced by the assertions below
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    # then exactly one executed; the others saw the claim (409) or the stored answer (replay)
    assert all(isinstance(r, tuple) for r in results), results
    executed = [r for r in results if r[0] == 201 and r[1] is None]
    assert len(executed) == 1, [(s, h) for s, h, _, _ in results]
    for status, replayed, content, retry_after in results:
        if (status, replayed) == (201, "true"):
            assert content == executed[0][2]
        elif status != 201:
            assert status == 409 and retry_after == "1"
            assert json.loads(content)["message"] in (
                "A request with this Idempotency-Key is still being processed.",
                "This Idempotency-Key could not be claimed; retry.",
            )
    assert deliveries_of(user).count() == 1


PURGE_CALLER = "user:purge-test"


def _record(key: str, age: timedelta, now: datetime) -> IdempotencyRecord:
    return IdempotencyRecord.objects.create(
        caller=PURGE_CALLER, key=key, method="POST", path="/v2/deliveries", request_hash="0" * 64,
        status_code=201, response_body=b"{}", content_type="application/json", created_at=now - age,
    )


def test_purging_idempotency_records_deletes_only_those_past_24_hours(db):
    now = timezone.now()
    _record("old", timedelta(hours=24, seconds=1), now)
    _record("older", timedelta(days=3), now)
    _record("fresh", timedelta(hours=23, minutes=59), now)

    deleted = purge_expired_idempotency_records(now=now)

    assert deleted == 2
    assert list(IdempotencyRecord.objects.filter(caller=PURGE_CALLER).values_list("key", flat=True)) == ["fresh"]


def test_purging_idempotency_records_works_in_bounded_batches(db):
    now = timezone.now()
    for i in range(3):
        _record(f"old-{i}", timedelta(days=2), now)

    assert purge_expired_idempotency_records(now=now, batch_size=2) == 2
    assert purge_expired_idempotency_records(now=now, batch_size=2) == 1
    assert purge_expired_idempotency_records(now=now, batch_size=2) == 0
    assert not IdempotencyRecord.objects.filter(caller=PURGE_CALLER).exists()


def test_the_purge_task_runs_eagerly_and_deletes_expired_records(db):
    now = timezone.now()
    _record("old", timedelta(days=2), now)
    _record("fresh", timedelta(minutes=5), now)

    result = purge_idempotency_records.delay()

    assert purge_idempotency_records.name == "common.purge_idempotency_records"
    assert result.get(timeout=5) == 1
    assert list(IdempotencyRecord.objects.filter(caller=PURGE_CALLER).values_list("key", flat=True)) == ["fresh"]
