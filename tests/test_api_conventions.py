"""The wire conventions every endpoint shares (SPEC "Wire conventions"): the error body,
Idempotency-Key, cursor pagination, throttling, the OpenAPI document, health, metrics,
token login, and rejecting bad input without a 500."""
from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone as dt_timezone
from http import HTTPStatus

import pytest
import time_machine
import yaml
from django.core.management import call_command
from django.db import connections
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from common.idempotency import MAX_KEY_LENGTH, purge_expired_idempotency_records
from common.models import IdempotencyRecord
from common.tasks import purge_idempotency_records
from dispatch.models import Delivery, Driver
from tests.conftest import assert_error, client_for
from tests.factories import DeliveryFactory, IntegrationUserFactory, UserFactory

CLOSED_REDIS_URL = "redis://127.0.0.1:6399/0"  # nothing listens there
ERROR_KEYS = {"statusCode", "timestamp", "path", "message", "error", "details"}
MID_MINUTE = datetime(2026, 3, 2, 10, 0, 5, tzinfo=dt_timezone.utc)  # 55 s left in the window


def delivery_body(**overrides) -> dict:
    body = {
        "sellerOrderId": "ORD-CONV-1",
        "storeName": "Corner Shop",
        "pickupLocation": {"lat": 12.9716, "lon": 77.5946},
        "dropoffLocation": {"lat": 12.9916, "lon": 77.6046},
        "prepTimeMinutes": 10,
        "deliveryFee": "4.50",
        "autoDispatch": False,
    }
    body.update(overrides)
    return body


def assert_error_body(response, status: int, *, path: str, extra_keys: frozenset = frozenset()) -> dict:
    """The SPEC's error body, checked field by field."""
    body = assert_error(response, status)
    assert response["Content-Type"].startswith("application/json")
    assert set(body) <= ERROR_KEYS | extra_keys, set(body) - ERROR_KEYS
    assert body["error"] == HTTPStatus(status).phrase
    assert body["path"] == path
    assert isinstance(body["message"], str) and body["message"]
    stamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    assert abs(stamp - timezone.now()) < timedelta(seconds=30)
    return body


def deliveries_of(user):
    return Delivery.objects.filter(created_by=user)


def post_delivery(client, body=None, *, key: str | None = None):
    extra = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post("/v2/deliveries", body if body is not None else delivery_body(), format="json", **extra)


def with_throttle_rates(settings, **rates) -> None:
    rest = dict(settings.REST_FRAMEWORK)
    rest["DEFAULT_THROTTLE_RATES"] = {**rest["DEFAULT_THROTTLE_RATES"], **rates}
    settings.REST_FRAMEWORK = rest


def http_requests_total(**labels) -> float:
    """Current value of http_requests_total for exactly these labels, read through /metrics."""
    text = APIClient().get("/metrics").content.decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "http_requests_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ------------------------------------------------------------------------- error body


def test_an_invalid_json_body_is_a_400_in_the_error_body(integration, integration_user):
    # given a body that is not JSON
    # when it is posted
    r = integration.post("/v2/deliveries", data=b'{"sellerOrderId": ', content_type="application/json")
    # then
    body = assert_error_body(r, 400, path="/v2/deliveries")
    assert body["message"].startswith("JSON parse error")
    assert deliveries_of(integration_user).count() == 0


def test_a_json_array_instead_of_an_object_is_a_400_with_details(integration, integration_user):
    r = integration.post("/v2/deliveries", data=json.dumps([delivery_body()]), content_type="application/json")

    body = assert_error_body(r, 400, path="/v2/deliveries")
    assert body["details"] == {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]}
    assert deliveries_of(integration_user).count() == 0


def test_missing_fields_are_a_400_listing_each_field_in_details(integration):
    r = integration.post("/v2/deliveries", {"storeName": "Corner Shop"}, format="json")

    body = assert_error_body(r, 400, path="/v2/deliveries")
    assert body["details"] == {
        "sellerOrderId": ["This field is required."],
        "pickupLocation": ["This field is required."],
        "dropoffLocation": ["This field is required."],
    }
    assert "sellerOrderId: This field is required." in body["message"]


def test_the_error_path_keeps_the_query_string(ops):
    r = ops.get("/v2/deliveries?limit=0&status=ready")

    body = assert_error_body(r, 400, path="/v2/deliveries?limit=0&status=ready")
    assert body["details"] == {"limit": ["Must be an integer between 1 and 200."]}


def test_a_request_without_a_token_is_a_401_with_a_challenge(anon, db):
    r = anon.get("/v2/deliveries")

    body = assert_error_body(r, 401, path="/v2/deliveries")
    assert body["message"] == "Authentication credentials were not provided."
    assert r["WWW-Authenticate"] == "Token"


def test_a_request_with_an_unknown_token_is_a_401_with_a_challenge(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token 0000000000000000000000000000000000000000")

    r = client.get("/v2/deliveries")

    body = assert_error_body(r, 401, path="/v2/deliveries")
    assert body["message"] == "Invalid token."
    assert r["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize("caller", ["driver_client", "integration"])
def test_a_driver_or_integration_calling_an_ops_endpoint_is_a_403(request, caller):
    client = request.getfixturevalue(caller)

    r = client.get("/v2/drivers")

    body = assert_error_body(r, 403, path="/v2/drivers")
    assert body["message"] == "Only ops staff may do this."


def test_an_unknown_delivery_id_is_a_404(ops):
    missing = uuid.uuid4()

    r = ops.get(f"/v2/deliveries/{missing}")

    body = assert_error_body(r, 404, path=f"/v2/deliveries/{missing}")
    assert body["message"] == "Delivery not found."


def test_another_integrations_delivery_is_a_404_not_a_403(integration, db):
    # given a delivery owned by some other integration
    theirs = DeliveryFactory(created_by=IntegrationUserFactory())
    # when our integration asks for it
    r = integration.get(f"/v2/deliveries/{theirs.pk}")
    # then its existence is not revealed
    assert_error_body(r, 404, path=f"/v2/deliveries/{theirs.pk}")


@pytest.mark.parametrize("path", ["/v2/deliveries/not-a-uuid", "/v2/no-such-endpoint", "/v2/deliveries/"])
def test_unknown_paths_under_v2_are_a_404_in_the_error_body(ops, path):
    r = ops.get(path)

    body = assert_error_body(r, 404, path=path)
    assert body["message"] == "Not found."


def test_an_unsupported_method_is_a_405_naming_the_allowed_ones(ops):
    r = ops.delete("/v2/deliveries")

    body = assert_error_body(r, 405, path="/v2/deliveries")
    assert body["message"] == 'Method "DELETE" not allowed.'
    assert {"GET", "POST"} <= {m.strip() for m in r["Allow"].split(",")}


def test_a_text_plain_body_is_a_415(integration, integration_user):
    r = integration.post("/v2/deliveries", data="sellerOrderId=1", content_type="text/plain")

    body = assert_error_body(r, 415, path="/v2/deliveries")
    assert body["message"] == 'Unsupported media type "text/plain" in request.'
    assert deliveries_of(integration_user).count() == 0


# ---------------------------------------------------------------------- idempotency


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


def test_a_400_response_is_replayed_too(integration, integration_user):
    invalid = {"storeName": "Corner Shop"}
    first = post_delivery(integration, invalid, key="bad-1")
    assert first.status_code == 400

    again = post_delivery(integration, invalid, key="bad-1")

    assert again.status_code == 400
    assert again["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert deliveries_of(integration_user).count() == 0


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
    token = user.auth_token.key
    n = 4
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def send(i: int) -> None:
        try:
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
            barrier.wait(timeout=10)
            r = post_delivery(client, key="race")
            results[i] = (r.status_code, r.get("Idempotent-Replayed"), r.content)
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
    assert len(executed) == 1, [(s, h) for s, h, _ in results]
    for status, replayed, content in results:
        if (status, replayed) == (201, "true"):
            assert content == executed[0][2]
        elif status != 201:
            assert status == 409
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


# ----------------------------------------------------------------------- pagination


def _page_through(client, url: str, key: str) -> list[list[str]]:
    pages = []
    while url:
        r = client.get(url)
        assert r.status_code == 200, r.content
        body = r.json()
        assert set(body) == {key, "next"}
        pages.append([item["id"] for item in body[key]])
        url = body["next"]
        assert len(pages) <= 10, "pagination does not terminate"
    return pages


def test_a_limited_page_has_that_many_items_and_a_next_link(ops, db):
    DeliveryFactory.create_batch(5)

    r = ops.get("/v2/deliveries?limit=2")

    assert r.status_code == 200
    body = r.json()
    assert len(body["deliveries"]) == 2
    assert body["next"].startswith("http://testserver/v2/deliveries?")
    assert "limit=2" in body["next"] and "cursor=" in body["next"]


def test_following_next_pages_through_every_delivery_once_newest_first(ops, db):
    created = DeliveryFactory.create_batch(5)

    pages = _page_through(ops, "/v2/deliveries?limit=2", "deliveries")

    assert [len(p) for p in pages] == [2, 2, 1]
    assert sum(pages, []) == [str(d.pk) for d in reversed(created)]


def test_deliveries_created_in_the_same_instant_are_paged_without_gaps_or_repeats(ops, db):
    with time_machine.travel(MID_MINUTE, tick=False):
        created = DeliveryFactory.create_batch(5)
    assert len({d.created_at for d in created}) == 1

    pages = _page_through(ops, "/v2/deliveries?limit=2", "deliveries")

    ids = sum(pages, [])
    assert len(ids) == 5
    assert set(ids) == {str(d.pk) for d in created}


@pytest.mark.parametrize("limit", ["0", "abc", "1000", "-1", "2.5"])
def test_a_limit_outside_1_to_200_is_a_400(ops, limit):
    r = ops.get(f"/v2/deliveries?limit={limit}")

    body = assert_error_body(r, 400, path=f"/v2/deliveries?limit={limit}")
    assert body["details"] == {"limit": ["Must be an integer between 1 and 200."]}


@pytest.mark.parametrize("cursor", ["garbage", "bm90LWEtY3Vyc29y", "cD1nYXJiYWdl", "bz0tMQ=="])
def test_a_garbage_cursor_is_a_400(ops, cursor):
    # plain garbage, base64 of "not-a-cursor", of "p=garbage" and of "o=-1"
    DeliveryFactory.create_batch(3)

    r = ops.get(f"/v2/deliveries?cursor={cursor}")

    assert_error_body(r, 400, path=f"/v2/deliveries?cursor={cursor}")


# ----------------------------------------------------------------------- throttling


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


# -------------------------------------------------------------------------- OpenAPI


def test_the_schema_and_the_docs_are_public(anon, db):
    schema = anon.get("/v2/schema/")
    docs = anon.get("/v2/docs/")

    assert schema.status_code == 200
    assert yaml.safe_load(schema.content)["info"]["title"] == "Dispatch platform API"
    assert docs.status_code == 200
    assert b"swagger-ui" in docs.content


def test_the_schema_validates_without_warnings(tmp_path, db):
    target = tmp_path / "schema.yml"

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))

    schema = yaml.safe_load(target.read_text())
    assert schema["openapi"].startswith("3.")
    assert "/v2/deliveries" in schema["paths"]


def test_every_operation_documents_401_and_429_and_every_post_the_idempotency_key(anon, db):
    schema = yaml.safe_load(anon.get("/v2/schema/").content)
    operations = [
        (path, method, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    posts = [(path, op) for path, method, op in operations if method == "post"]
    assert ("/v2/deliveries", "post") in {(p, m) for p, m, _ in operations}

    undocumented = [
        (method.upper(), path, code)
        for path, method, op in operations
        for code in ("401", "429")
        if code not in op["responses"]
    ]
    assert undocumented == []
    without_key = [
        path
        for path, op in posts
        if not any(p["in"] == "header" and p["name"] == "Idempotency-Key" for p in op.get("parameters", []))
    ]
    assert without_key == []


def test_every_post_documents_the_idempotency_400_and_409_and_the_key_bounds(anon, db):
    # Found by schemathesis: a blank key (400) or a reused one (409) came back from POSTs that
    # documented neither, e.g. POST /v2/admin/escalation/check.
    schema = yaml.safe_load(anon.get("/v2/schema/").content)
    posts = [(path, item["post"]) for path, item in schema["paths"].items() if "post" in item]

    undocumented = [(path, code) for path, op in posts for code in ("400", "409") if code not in op["responses"]]
    assert undocumented == []
    for path, op in posts:
        (key,) = [p for p in op["parameters"] if p["in"] == "header" and p["name"] == "Idempotency-Key"]
        assert key["schema"]["minLength"] == 1 and key["schema"]["maxLength"] == MAX_KEY_LENGTH, path


def test_every_paginated_list_documents_limit_as_1_to_200(anon, db):
    # Found by schemathesis: `limit=0` was schema-valid but is a 400.
    schema = yaml.safe_load(anon.get("/v2/schema/").content)
    limits = {
        path: param["schema"]
        for path, item in schema["paths"].items()
        for param in item.get("get", {}).get("parameters", [])
        if param["in"] == "query" and param["name"] == "limit"
    }

    assert "/v2/deliveries" in limits and "/v2/zones" in limits
    assert {path: (s["type"], s.get("minimum"), s.get("maximum")) for path, s in limits.items()} == {
        path: ("integer", 1, 200) for path in limits
    }


# ------------------------------------------------------------------ health, metrics


def test_health_is_ok_when_the_database_and_redis_answer(anon, db):
    r = anon.get("/health/")

    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_health_is_a_503_in_the_error_body_when_redis_is_down(anon, settings, db):
    settings.REDIS_URL = CLOSED_REDIS_URL

    r = anon.get("/health/")

    body = assert_error_body(r, 503, path="/health/", extra_keys=frozenset({"status", "checks"}))
    assert body["checks"] == {"database": "ok", "redis": "unavailable"}
    assert body["status"] == "unavailable"
    assert body["message"] == "Unavailable: redis."


def test_metrics_count_requests_by_route_template_not_raw_path(ops, anon):
    route = "/v2/deliveries/<uuid:delivery_id>"
    before = http_requests_total(method="GET", route=route, status="404")
    missing = uuid.uuid4()
    ops.get(f"/v2/deliveries/{missing}")
    ops.get("/v2/deliveries")

    r = anon.get("/metrics")

    assert r.status_code == 200
    assert r["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.content.decode())}
    samples = families["http_requests"].samples
    routes = {s.labels["route"] for s in samples if s.name == "http_requests_total"}
    assert {"/v2/deliveries", route} <= routes
    assert not any(str(missing) in r for r in routes)
    assert http_requests_total(method="GET", route=route, status="404") == before + 1


def test_a_replayed_post_is_counted_under_its_route(integration):
    labels = {"method": "POST", "route": "/v2/deliveries", "status": "201"}
    before = http_requests_total(**labels)

    post_delivery(integration, key="metrics-1")
    replay = post_delivery(integration, key="metrics-1")

    assert replay["Idempotent-Replayed"] == "true"
    assert http_requests_total(**labels) == before + 2


# ------------------------------------------------------------------------ auth token


def test_a_correct_username_and_password_get_the_users_token(anon, db):
    user = UserFactory(username="dana")

    r = anon.post("/v2/auth/token", {"username": "dana", "password": "pw-123456"}, format="json")

    assert r.status_code == 200
    assert r.json() == {"token": user.auth_token.key}


def test_a_wrong_password_is_a_401_in_the_error_body(anon, db):
    UserFactory(username="dana")

    r = anon.post("/v2/auth/token", {"username": "dana", "password": "wrong"}, format="json")

    body = assert_error_body(r, 401, path="/v2/auth/token")
    assert body["message"] == "Invalid username or password."
    assert "token" not in body


def test_an_inactive_users_correct_password_is_a_401(anon, db):
    UserFactory(username="gone", is_active=False)

    r = anon.post("/v2/auth/token", {"username": "gone", "password": "pw-123456"}, format="json")

    assert_error_body(r, 401, path="/v2/auth/token")


def test_a_token_request_without_credentials_is_a_400_naming_both_fields(anon, db):
    r = anon.post("/v2/auth/token", {}, format="json")

    body = assert_error_body(r, 400, path="/v2/auth/token")
    assert body["details"] == {"username": ["This field is required."], "password": ["This field is required."]}


# ------------------------------------------------------------------------ bad input

LONG_ID = "x" * 300

BAD_DELIVERY_FIELDS = [
    # (field path, raw JSON literal)
    (("pickupLocation", "lat"), '"NaN"'),
    (("pickupLocation", "lat"), "NaN"),
    (("pickupLocation", "lat"), '"Infinity"'),
    (("pickupLocation", "lat"), "1e309"),
    (("pickupLocation", "lon"), "-1e309"),
    (("pickupLocation", "lat"), '"1e999"'),
    (("pickupLocation", "lat"), "true"),
    (("pickupLocation", "lat"), "null"),
    (("pickupLocation", "lat"), '{"deg": 12}'),
    (("pickupLocation", "lat"), "[12.97]"),
    (("pickupLocation", "lat"), "90.0001"),
    (("dropoffLocation", "lon"), "180.5"),
    (("pickupLocation",), '"12.97,77.59"'),
    (("pickupLocation",), "[12.97, 77.59]"),
    (("pickupLocation",), '{"lat": 12.97}'),
    (("storeName",), '{"name": "Corner Shop"}'),
    (("storeName",), '"Corner\\u0000Shop"'),
    (("sellerOrderId",), '"\\ud800"'),
    (("storeName",), '"tail \\udfff"'),
    (("sellerOrderId",), f'"{LONG_ID}"'),
    (("sellerOrderId",), '""'),
    (("customerPhone",), '"\\u0000"'),
    (("prepTimeMinutes",), "-1"),
    (("prepTimeMinutes",), "1.5"),
    (("prepTimeMinutes",), "true"),
    (("prepTimeMinutes",), "1" + "0" * 5000),
    (("deliveryFee",), "1.234"),
    (("deliveryFee",), '"NaN"'),
    (("deliveryFee",), "1e309"),
    (("deliveryFee",), "-5"),
    (("autoDispatch",), '"\\ud800"'),
]


def _raw_body(field_path: tuple[str, ...], literal: str) -> bytes:
    body = delivery_body()
    target = body
    for name in field_path[:-1]:
        target = target[name]
    target[field_path[-1]] = "__VALUE__"
    return json.dumps(body).replace('"__VALUE__"', literal).encode()


@pytest.mark.parametrize(("field_path", "literal"), BAD_DELIVERY_FIELDS, ids=lambda v: ".".join(v) if isinstance(v, tuple) else v[:20])
def test_bad_input_in_a_delivery_is_a_400_and_creates_nothing(integration, integration_user, field_path, literal):
    r = integration.post("/v2/deliveries", data=_raw_body(field_path, literal), content_type="application/json")

    body = assert_error_body(r, 400, path="/v2/deliveries")
    if "details" in body:  # parse errors have none; field errors name the top-level field
        assert field_path[0] in body["details"], body["details"]
    assert deliveries_of(integration_user).count() == 0


def test_a_lone_surrogate_echoed_in_a_field_error_is_a_400_not_a_500(ops):
    # given a choice field, whose error message repeats the rejected value
    raw = b'{"name": "Ann Surrogate", "phone": "+15551234567", "vehicle": "Blue Civic", "vehicleType": "\\ud800"}'
    # when it is posted
    r = ops.post("/v2/drivers", data=raw, content_type="application/json")
    # then the error renders as UTF-8 JSON
    body = assert_error_body(r, 400, path="/v2/drivers")
    assert list(body["details"]) == ["vehicleType"]
    assert not Driver.objects.filter(name="Ann Surrogate").exists()
