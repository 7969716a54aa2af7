"""`/health/` and `/metrics` (SPEC "Wire conventions")."""
from __future__ import annotations

import uuid

import pytest

from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from tests.wire import CLOSED_REDIS_URL, assert_error_body, post_delivery


def http_requests_total(**labels) -> float:
    """Current value of http_requests_total for exactly these labels, read through /metrics."""
    text = APIClient().get("/metrics").content.decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "http_requests_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


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


def test_metrics_answer_only_this_machine_unless_a_token_is_set(db, anon, settings):
    settings.METRICS_TOKEN = ""
    assert anon.get("/metrics").status_code == 200  # the test client comes from 127.0.0.1
    remote = anon.get("/metrics", REMOTE_ADDR="203.0.113.9")
    assert remote.status_code == 403 and remote.json()["error"] == "Forbidden"


def test_with_a_metrics_token_a_bearer_is_required_from_anywhere(db, anon, settings):
    settings.METRICS_TOKEN = "s3cret-scrape"
    missing = anon.get("/metrics")
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert anon.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    ok = anon.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape", REMOTE_ADDR="203.0.113.9")
    assert ok.status_code == 200 and b"http_requests_total" in ok.content


@pytest.mark.parametrize("path", ["/health/", "/health/live", "/health/ready", "/health/jobs", "/metrics"])
@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_a_write_method_on_health_and_metrics_is_a_405_naming_get_and_head(path, method, db):
    """It was the CSRF check's 403 ("Forbidden"), for endpoints that need no login."""
    from django.test import Client

    r = getattr(Client(enforce_csrf_checks=True), method)(path)

    body = assert_error_body(r, 405, path=path)
    assert r["Allow"] == "GET, HEAD" and body["message"] == f'Method "{method.upper()}" not allowed.'


def test_every_reason_of_dropped_live_events_is_exported_from_the_start(anon, db, tmp_path):
    """A labelled counter nothing has incremented is not exported: `live_events_dropped_total`
    was missing from /metrics, and an alert on its rate saw no data instead of 0. Also under
    several processes (PROMETHEUS_MULTIPROC_DIR), where a fresh process wrote nothing."""
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from common.metrics import LIVE_EVENTS_DROPPED_REASONS

    text = anon.get("/metrics").content.decode()
    for reason in LIVE_EVENTS_DROPPED_REASONS:
        assert f'live_events_dropped_total{{reason="{reason}"}}' in text

    from django.conf import settings

    subprocess.run([sys.executable, "-c", "import common.metrics"], check=True, timeout=60, cwd=settings.BASE_DIR,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {s.labels["reason"]: s.value for s in families["live_events_dropped"].samples if s.name.endswith("_total")}
    assert samples == {reason: 0.0 for reason in LIVE_EVENTS_DROPPED_REASONS}
