"""A body larger than the route takes is a 413 before Django reads it (common.middleware.
EarlyBodyLimit in config.asgi): a declared Content-Length at once, a chunked body as soon as it
passes the limit. Driven as raw ASGI calls, so what is read is counted exactly."""
import asyncio
import json

import pytest
from asgiref.sync import async_to_sync

from config.asgi import application
from tests.api import token_for
from tests.factories import OpsUserFactory
from tests.wire import http_scope

pytestmark = pytest.mark.django_db(transaction=True)


def call(path, *, headers, chunks, method="POST"):
    """Run one HTTP request through the ASGI app: (status, headers, body, chunks read)."""
    queue = list(chunks)
    read = []
    sent = []

    async def receive():
        if not queue:  # Django then listens for a disconnect: none comes
            await asyncio.Event().wait()
        chunk = queue.pop(0)
        read.append(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    async def send(message):
        sent.append(message)

    scope = http_scope(method, path, [(k.lower().encode(), v.encode()) for k, v in headers.items()])
    async_to_sync(application)(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, len(read)


def test_a_declared_body_over_the_limit_is_a_413_before_a_byte_is_read(settings):
    settings.API_MAX_BODY_BYTES = 1024
    token = token_for(OpsUserFactory())
    status, headers, body, read = call(
        "/v2/zones", headers={"Authorization": f"Token {token}", "Content-Type": "application/json",
                              "Content-Length": str(10 * 1024 ** 3)},
        chunks=[b"x" * 1024] * 3,
    )
    assert status == 413 and read == 0
    error = json.loads(body)
    assert error["statusCode"] == 413 and error["path"] == "/v2/zones" and "1024 bytes" in error["message"]
    assert headers[b"content-type"] == b"application/json"


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(settings):
    """Refused once past the limit; the rest is read and dropped (up to the drain budget)
    before the 413 goes out, so the client, still sending, gets it rather than a reset."""
    settings.API_MAX_BODY_BYTES = 1024
    settings.API_BODY_DRAIN_BYTES = 3000
    status, _, body, read = call(
        "/v2/zones", headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, chunks=[b"x" * 600] * 10,
    )
    assert status == 413 and read == 6  # 1,200 bytes to judge, then dropped up to the 3,000 budget: never all 6,000
    assert json.loads(body)["error"] == "Request Entity Too Large"


def test_a_declared_body_over_the_limit_is_read_and_dropped_before_the_413_unless_the_client_waits(settings):
    """A client still sending when the server closes gets a reset, not the 413 (a phone's photo
    upload: a network error and a retry). Within the drain budget, the rest is read, never
    handed on. A client that sent `Expect: 100-continue` has sent nothing yet: answered at once."""
    settings.API_MAX_BODY_BYTES = 1024
    settings.API_BODY_DRAIN_BYTES = 8192
    headers = {"Content-Type": "application/json", "Content-Length": "6000"}

    status, _, _, read = call("/v2/zones", headers=headers, chunks=[b"x" * 1000] * 6)
    assert status == 413 and read == 6
    status, _, _, read = call("/v2/zones", headers={**headers, "Expect": "100-continue"}, chunks=[b"x" * 1000] * 6)
    assert status == 413 and read == 0
    status, _, _, read = call("/v2/zones", headers={**headers, "Content-Length": "9000"}, chunks=[b"x" * 1000] * 9)
    assert status == 413 and read == 0  # over the drain budget: answered at once


def test_a_sender_that_stalls_is_answered_after_the_drain_time(settings):
    settings.API_MAX_BODY_BYTES = 1024
    settings.API_BODY_DRAIN_SECONDS = 0.2
    status, _, _, read = call("/v2/zones", headers={"Content-Type": "application/json", "Content-Length": "6000"},
                              chunks=[b"x" * 1000] * 2)  # then nothing more comes
    assert status == 413 and read == 2


def test_a_chunked_body_within_the_limit_reaches_the_view_whole():
    token = token_for(OpsUserFactory())
    payload = json.dumps({"name": "Chunked", "geometry": {"type": "Polygon", "coordinates": [
        [[30.5, 10.9], [30.6, 10.9], [30.6, 11.0], [30.5, 11.0], [30.5, 10.9]]]}}).encode()
    status, _, body, _ = call(
        "/v2/zones", headers={"Authorization": f"Token {token}", "Content-Type": "application/json",
                              "Transfer-Encoding": "chunked"},
        chunks=[payload[:40], payload[40:90], payload[90:]],
    )
    assert status == 201, body
    assert json.loads(body)["properties"]["name"] == "Chunked"


def test_the_proof_upload_route_takes_its_own_larger_limit_for_multipart_only(settings):
    settings.API_MAX_BODY_BYTES = 1024
    settings.PROOF_MAX_BYTES = 4096
    path = "/v2/drivers/00000000-0000-0000-0000-000000000001/deliveries/00000000-0000-0000-0000-000000000002/proof"
    multipart = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": "3000"}
    status, _, _, read = call(path, headers=multipart, chunks=[b"-" * 3000])
    assert status != 413 and read == 1  # past the early check: Django answers (401 without a token)
    as_json = {"Content-Type": "application/json", "Content-Length": "3000"}
    assert call(path, headers=as_json, chunks=[b"-" * 3000])[0] == 413


def test_a_declared_page_body_over_the_page_limit_is_a_413_before_a_byte_is_read(settings):
    """The admin's login took a 300 MB post whole (spooled to disk) before its 403."""
    settings.PAGE_MAX_BODY_BYTES = 2048
    settings.API_BODY_DRAIN_BYTES = 1024  # over the drain budget: answered at once
    status, headers, body, read = call(
        "/admin/login/", headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(300 * 1024 ** 2)},
        chunks=[b"x" * 1024] * 3,
    )
    assert status == 413 and read == 0
    assert headers[b"content-type"] == b"text/plain; charset=utf-8" and headers[b"connection"] == b"close"
    assert body == b"Request body too large: at most 2,048 bytes."
    # within the drain budget the upload is read and dropped first (the client sees the 413, not a reset)
    settings.API_BODY_DRAIN_BYTES = 10_000
    status, _, _, read = call(
        "/support/login/", headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "3072"},
        chunks=[b"x" * 1024] * 3,
    )
    assert status == 413 and read == 3
    # within the limit: Django has it (the login page's CSRF refusal)
    status, _, _, _ = call("/admin/login/", headers={"Content-Type": "application/x-www-form-urlencoded",
                                                     "Content-Length": "1024"}, chunks=[b"x" * 1024])
    assert status == 403


def test_a_chunked_page_body_is_refused_once_past_the_page_limit(settings):
    """A chunked body to a page was spooled whole by Django before its 403; now counted as it
    streams and refused past PAGE_MAX_BODY_BYTES, the rest drained within the budget."""
    settings.PAGE_MAX_BODY_BYTES = 2048
    settings.API_BODY_DRAIN_BYTES = 10_000
    chunked = {"Content-Type": "application/x-www-form-urlencoded", "Transfer-Encoding": "chunked"}
    status, headers, body, read = call("/admin/login/", headers=chunked, chunks=[b"x" * 1024] * 5)
    assert status == 413 and read == 5  # past the limit at the third chunk; the last two drained
    assert headers[b"content-type"] == b"text/plain; charset=utf-8" and headers[b"connection"] == b"close"
    assert body == b"Request body too large: at most 2,048 bytes."
    # over the drain budget as well: answered at the chunk that passed the limit
    settings.API_BODY_DRAIN_BYTES = 1024
    status, _, _, read = call("/support/login/", headers=chunked, chunks=[b"x" * 1024] * 5)
    assert status == 413 and read == 3
    # within the limit Django has it (the login page's CSRF refusal)
    status, _, _, read = call("/admin/login/", headers=chunked, chunks=[b"x" * 1024] * 2)
    assert status == 403 and read == 2


def test_a_hooks_body_over_the_limit_is_refused_in_the_apis_error_body(settings):
    """Twilio's hooks are read by a machine: their 413 was the pages' plain text."""
    settings.PAGE_MAX_BODY_BYTES = 2048
    settings.API_BODY_DRAIN_BYTES = 1024
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for headers, chunks in (({**form, "Content-Length": "4096"}, [b"x" * 1024] * 4),
                            ({**form, "Transfer-Encoding": "chunked"}, [b"x" * 1024] * 4)):
        status, answered, body, _ = call("/hooks/twilio/inbound", headers=headers, chunks=chunks)
        assert status == 413 and answered[b"content-type"] == b"application/json"
        error = json.loads(body)
        assert (error["statusCode"], error["error"], error["path"]) == (413, "Request Entity Too Large", "/hooks/twilio/inbound")


def test_a_chunked_page_body_whose_client_leaves_while_it_is_drained_gets_no_answer(settings):
    settings.PAGE_MAX_BODY_BYTES = 2048
    settings.API_BODY_DRAIN_BYTES = 10_000
    messages = [{"type": "http.request", "body": b"x" * 1024, "more_body": True}] * 3 + [{"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = http_scope("POST", "/admin/login/", [(b"content-type", b"application/x-www-form-urlencoded"),
                                                 (b"transfer-encoding", b"chunked")])
    async_to_sync(application)(scope, receive, send)
    assert sent == [] and messages == []
