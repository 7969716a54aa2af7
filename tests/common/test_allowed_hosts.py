"""A Host that ALLOWED_HOSTS does not name is a 400 on every HTTP path, in the SPEC's error body
on API paths (common.middleware.AllowedHostGuard in config.asgi; config.views.bad_request for
Django's own check). On the lean stack a token request with any Host was served, and a paginated
list (its `next` link asks for the host) was a 500."""
import asyncio
import json

import pytest
from asgiref.sync import async_to_sync

from config.asgi import application
from dispatch.models import Delivery
from tests.api import token_for
from tests.factories import DeliveryFactory, IntegrationUserFactory, OpsUserFactory, online_driver
from tests.wire import delivery_body, http_scope

pytestmark = pytest.mark.django_db(transaction=True)


def call(method, path, *, headers=(), body=b"", query=b""):
    """One HTTP request through the ASGI app: (status, headers, body)."""
    sent = []
    chunks = [body]

    async def receive():
        if not chunks:
            await asyncio.Event().wait()
        return {"type": "http.request", "body": chunks.pop(0), "more_body": False}

    async def send(message):
        sent.append(message)

    scope = http_scope(method, path, [(k.lower().encode(), v.encode()) for k, v in headers])
    scope["query_string"] = query
    async_to_sync(application)(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def assert_host_refused(status, headers, body, path):
    assert status == 400, body
    error = json.loads(body)
    assert error["statusCode"] == 400 and error["error"] == "Bad Request" and error["path"] == path
    assert error["message"] == "Invalid Host header: the host is not served here."
    assert headers[b"content-type"] == b"application/json"


def test_a_token_request_with_a_foreign_host_is_a_400_not_a_500():
    token = token_for(OpsUserFactory())
    DeliveryFactory()
    auth = ("Authorization", f"Token {token}")

    assert_host_refused(*call("GET", "/v2/deliveries", headers=[auth, ("Host", "evil.example")], query=b"limit=1"),
                        "/v2/deliveries?limit=1")
    status, _, body = call("GET", "/v2/deliveries", headers=[auth, ("Host", "testserver")], query=b"limit=1")
    assert status == 200 and len(json.loads(body)["deliveries"]) == 1


def test_a_write_with_a_foreign_host_changes_nothing():
    token = token_for(IntegrationUserFactory())
    headers = [("Authorization", f"Token {token}"), ("Content-Type", "application/json"), ("Host", "evil.example:8200")]

    assert_host_refused(*call("POST", "/v2/deliveries", headers=headers, body=json.dumps(delivery_body()).encode()),
                        "/v2/deliveries")
    assert not Delivery.objects.exists()


@pytest.mark.parametrize("hosts", [["testserver,evil.example"], ["testserver", "testserver"], ["bad host"], [""]])
def test_a_malformed_or_repeated_host_is_refused(hosts):
    assert_host_refused(*call("GET", "/health/", headers=[("Host", h) for h in hosts]), "/health/")


def test_the_location_fast_lane_and_the_pages_check_the_host_too():
    driver = online_driver()
    token = token_for(driver.user)
    fix = json.dumps({"lat": 12.97, "lon": 77.59, "recordedAt": "2026-01-01T00:00:00Z"}).encode()
    headers = [("Authorization", f"Token {token}"), ("Content-Type", "application/json"), ("Host", "evil.example")]

    assert_host_refused(*call("POST", f"/v2/drivers/{driver.pk}/location", headers=headers, body=fix),
                        f"/v2/drivers/{driver.pk}/location")
    status, headers, body = call("GET", "/admin/login/", headers=[("Host", "evil.example")])
    assert status == 400 and headers[b"content-type"].startswith(b"text/plain") and b"invalid Host" in body
    assert_host_refused(*call("POST", "/hooks/twilio/inbound", headers=[("Host", "evil.example")]), "/hooks/twilio/inbound")


def test_outside_the_pages_a_foreign_host_is_refused_in_the_error_body():
    """A plain GET of a socket's path and an unknown URL answer their other errors in the error
    body (426, 404); a foreign Host there was plain text (a fuzzing audit)."""
    for path in ("/ws/ops/", "/nope"):
        assert_host_refused(*call("GET", path, headers=[("Host", "evil.example")]), path)
    for page in ("/track/x", "/support/", "/"):
        status, headers, body = call("GET", page, headers=[("Host", "evil.example")])
        assert status == 400 and headers[b"content-type"].startswith(b"text/plain") and b"invalid Host" in body, page


def test_an_allowed_host_with_a_port_and_a_request_without_one_pass(settings):
    settings.ALLOWED_HOSTS = ["api.example.com", "testserver"]
    assert call("GET", "/health/live", headers=[("Host", "api.example.com:8443")])[0] == 200
    assert call("GET", "/health/live")[0] == 200  # HTTP/1.0: no Host; Django uses the server's name


def test_the_test_client_path_answers_in_the_error_body_too(client):
    """Django's own check (CommonMiddleware, the full stack outside ASGI) goes through handler400."""
    r = client.get("/health/", HTTP_HOST="evil.example")
    assert r.status_code == 400 and r.json()["message"] == "Invalid Host header: the host is not served here."
    r = client.get("/admin/login/", HTTP_HOST="evil.example")
    assert r.status_code == 400 and "json" not in r["Content-Type"]


def test_a_request_without_a_host_whose_server_name_is_not_allowed_is_a_400_not_a_500(settings):
    """HTTP/1.0 without Host: Django uses the server's name, which a paginated list's `next` link
    asked for (DisallowedHost, a 500 on the lean stack when the bind address is not allowed)."""
    token = token_for(OpsUserFactory())
    DeliveryFactory()
    settings.ALLOWED_HOSTS = ["api.example.com"]  # not the server's name ("testserver")

    status, _, body = call("GET", "/v2/deliveries", headers=[("Authorization", f"Token {token}")], query=b"limit=1")

    assert status == 400 and json.loads(body)["message"] == "Invalid Host header: the host is not served here."


def test_the_answer_for_a_host_follows_a_change_of_allowed_hosts(settings):
    assert call("GET", "/health/live", headers=[("Host", "api.example.com")])[0] == 400
    settings.ALLOWED_HOSTS = ["api.example.com"]
    assert call("GET", "/health/live", headers=[("Host", "api.example.com")])[0] == 200


def test_a_socket_with_a_foreign_host_is_refused_at_the_handshake():
    """The sockets checked the browser's Origin (same origin or trusted) but not the Host: a page
    on a name that resolves to this server (DNS rebinding) is its own origin, and a client
    without an Origin (a driver's app) reached the consumers under any name."""
    from channels.testing import WebsocketCommunicator

    driver = online_driver()
    path = f"/ws/drivers/{driver.pk}/?token={token_for(driver.user)}"

    async def opens(headers) -> bool:
        comm = WebsocketCommunicator(application, path, headers=headers)
        ok = (await comm.connect())[0]
        if ok:
            await comm.disconnect()
        return ok

    async def scenario():
        assert await opens([(b"host", b"evil.example")]) is False
        assert await opens([(b"host", b"evil.example:8200"), (b"origin", b"http://evil.example:8200")]) is False
        assert await opens([(b"host", b"testserver")]) is True
        assert await opens([]) is True  # no Host (a test client): left to the origin check, as on HTTP

    async_to_sync(scenario)()


def test_refusals_are_counted_and_logged_as_warnings_at_most_ten_a_minute(caplog):
    """Django's convention logged each refusal at ERROR: a scanner sending foreign Hosts filled
    the log and fired ERROR alerts without credentials. Each is counted; ten a minute are logged
    (WARNING), the next line saying how many were not."""
    from prometheus_client import REGISTRY

    from common.middleware import AllowedHostGuard, RefusedHostsLog

    async def inner(scope, receive, send):
        raise AssertionError("a foreign Host reached the app")

    now = [1000.0]
    guard = AllowedHostGuard(inner)
    guard.refusals_log = RefusedHostsLog(clock=lambda: now[0])
    assert isinstance(AllowedHostGuard.refusals_log, RefusedHostsLog)  # (the process's: the socket guard's too)

    def refuse(host: str) -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        async_to_sync(guard)(http_scope("GET", "/v2/deliveries", [(b"host", host.encode())]), receive, send)
        return sent[0]["status"]

    def lines():
        records = [r for r in caplog.records if r.name == "django.security.DisallowedHost"]
        caplog.clear()
        return records

    counted = REGISTRY.get_sample_value("http_invalid_host_total") or 0
    caplog.set_level("WARNING", logger="django.security.DisallowedHost")
    assert [refuse(f"scan{i}.example") for i in range(15)] == [400] * 15
    first = lines()
    assert len(first) == 10 and {r.levelname for r in first} == {"WARNING"}
    assert "'scan0.example'" in first[0].getMessage() and "not logged" not in first[9].getMessage()
    assert REGISTRY.get_sample_value("http_invalid_host_total") - counted == 15

    now[0] += 59.0  # the same minute: still nothing more
    refuse("scan15.example")
    assert lines() == []
    now[0] += 1.0  # the next: logged, with what was left out
    refuse("scan16.example")
    (line,) = lines()
    assert "'scan16.example'" in line.getMessage()
    assert "(6 more refused before this, not logged: at most 10 lines in 60 s)" in line.getMessage()
    refuse("scan17.example")
    assert "not logged" not in lines()[0].getMessage()
    assert REGISTRY.get_sample_value("http_invalid_host_total") - counted == 18
