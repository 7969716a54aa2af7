"""Request ids: returned in X-Request-ID, taken from a trusted proxy, on every log line of
the request, and carried into the Celery tasks it enqueues."""
import json
import logging

import pytest
from pythonjsonlogger.json import JsonFormatter

from common.logfilters import RequestIdFilter, request_id
from config import celery as celery_config
from offers.tasks import expire_offer

pytestmark = pytest.mark.django_db


def test_every_response_carries_a_request_id_and_a_trusted_proxy_sets_it(client):
    first, second = client.get("/health/live"), client.get("/health/live")
    assert first["X-Request-ID"] and first["X-Request-ID"] != second["X-Request-ID"]
    given = client.get("/health/live", HTTP_X_REQUEST_ID="lb-7f3a")
    assert given["X-Request-ID"] == "lb-7f3a"  # the test client is 127.0.0.1: a trusted proxy
    untrusted = client.get("/health/live", HTTP_X_REQUEST_ID="lb-7f3a", REMOTE_ADDR="203.0.113.4")
    assert untrusted["X-Request-ID"] != "lb-7f3a"
    garbage = client.get("/health/live", HTTP_X_REQUEST_ID="x" * 200)
    assert len(garbage["X-Request-ID"]) == 32


def test_log_lines_are_json_with_the_request_id(settings):
    record = logging.LogRecord("dispatch.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    token = request_id.set("req-42")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id.reset(token)
    json_format = settings.LOGGING["formatters"]["json"]
    line = JsonFormatter(json_format["fmt"], rename_fields=json_format["rename_fields"]).format(record)
    fields = json.loads(line)
    assert {k: fields[k] for k in ("message", "request_id", "level", "logger")} == {
        "message": "hello world", "request_id": "req-42", "level": "INFO", "logger": "dispatch.test"}
    assert settings.LOGGING["handlers"]["console"]["formatter"] in ("json", "plain")
    assert "request_id" in settings.LOGGING["handlers"]["console"]["filters"]


def test_a_task_enqueued_by_a_request_runs_under_its_request_id():
    headers = {}
    token = request_id.set("req-77")
    try:
        celery_config._carry_request_id(headers=headers)
    finally:
        request_id.reset(token)
    assert headers["request_id"] == "req-77"

    task = expire_offer
    task.push_request(request_id="req-77", is_eager=False)
    try:
        celery_config._adopt_request_id(task_id="t-1", task=task)
        assert request_id.get() == "req-77"
        celery_config._drop_request_id(task_id="t-1")
        assert request_id.get() == "-"
    finally:
        task.pop_request()
