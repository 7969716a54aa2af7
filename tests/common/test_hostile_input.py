"""Hostile input on every write endpoint (SPEC "Wire conventions": bad input never produces a
500). The endpoints come from the OpenAPI schema, so a new one is walked without being listed:

- the same hostile requests to each (a 5 MB body, JSON nested 100 000 deep or just past the
  limit, malformed JSON, a body that is not UTF-8, NaN, NUL or a lone surrogate in a body
  string or key, NUL or a control character in the path, a query key or value, a broken
  percent-escape, NUL in the Idempotency-Key): 413 or 400 in the error body, whether or not
  the endpoint reads a body;
- each field of each request body, with the JSON type the schema gives swapped for another
  (a number sent as a string, a string as a number, a boolean as a string) and NUL in each
  string: 400 with `details` naming the field, nothing coerced.

The location endpoint, served first by the ASGI fast lane, and an endpoint of each Django
stack (lean: token, full: anonymous) are walked again through the real ASGI application
(tests below `ASGI`)."""
from __future__ import annotations

import copy
import functools
import json
import math
import uuid
from http import HTTPStatus

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from common.parsers import MAX_DEPTH
from config.asgi import application
from notifications.services import device_register, endpoint_create
from tests.api import assert_error, client_for, token_for
from tests.factories import DeliveryFactory, DriverFactory, OpsUserFactory, ZoneFactory
from tests.wire import ERROR_KEYS

WRITE_METHODS = ("post", "put", "patch", "delete")
# Who may call each operation (by path template); anyone else is ops. The walk calls each as
# a caller it allows, with ids that exist, so that the body is read (not a 401/403/404 first).
DRIVER_OPERATIONS = {
    "/v2/drivers/{driver_id}/location",
    "/v2/drivers/{driver_id}/offers/{offer_id}/accept",
    "/v2/drivers/{driver_id}/offers/{offer_id}/reject",
    "/v2/drivers/{driver_id}/deliveries/{delivery_id}/{step}",
    "/v2/drivers/{driver_id}/devices",
    "/v2/drivers/{driver_id}/devices/{device_id}",
}
ANONYMOUS_OPERATIONS = {"/v2/auth/token", "/v2/orders/{seller_order_id}/rating"}
SQUARE = {"type": "Polygon", "coordinates": [[[30.5, 10.9], [30.6, 10.9], [30.6, 11.0], [30.5, 11.0], [30.5, 10.9]]]}


@functools.cache
def _schema() -> dict:
    return SchemaGenerator().get_schema(request=None, public=True)


def _resolve(node: dict) -> dict:
    while "$ref" in node:
        node = _schema()["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    if "allOf" in node and len(node["allOf"]) == 1:
        return {**{k: v for k, v in node.items() if k != "allOf"}, **_resolve(node["allOf"][0])}
    return node


def write_operations() -> list[tuple[str, str, dict | None]]:
    """(method, path template, request body schema or None) of every write operation."""
    out = []
    for path, item in _schema()["paths"].items():
        for method, op in item.items():
            if method in WRITE_METHODS:
                body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
                out.append((method, path, _resolve(body) if body else None))
    return sorted(out, key=lambda o: (o[1], o[0]))


def example(node: dict, name: str = ""):
    """A value of the schema's shape (valid where it is cheap to be)."""
    node = _resolve(node)
    if name == "geometry":
        return copy.deepcopy(SQUARE)
    if "enum" in node:
        return node["enum"][0]
    if "oneOf" in node:
        return example(node["oneOf"][0], name)
    if "allOf" in node:
        return example(node["allOf"][0], name)
    kind = node.get("type")
    if kind == "object":
        return {key: example(sub, key) for key, sub in node.get("properties", {}).items()}
    if kind == "array":
        return [example(node["items"], name) for _ in range(max(1, node.get("minItems", 1)))]
    above = 1 if node.get("exclusiveMinimum") else 0
    if kind == "integer":
        return int(node.get("minimum", 1)) + above
    if kind == "number":
        return float(node.get("minimum", 1)) + above
    if kind == "boolean":
        return False
    if node.get("format") == "uuid":
        return str(uuid.uuid4())
    if node.get("format") == "uri":
        return "https://example.com/walker-1"
    if node.get("format") == "date-time":
        return timezone.now().isoformat().replace("+00:00", "Z")
    if "phone" in name.lower():
        return "+15551234567"
    if name == "handoffCode":  # four digits (its pattern)
        return "1234"
    return "walker-1"


def leaves(value, node: dict, path: tuple = ()):
    """(path, schema) of each scalar in `value`, described by `node` (oneOf: not walked, its
    alternatives take more than one JSON type on purpose)."""
    node = _resolve(node)
    if "oneOf" in node:
        return
    if isinstance(value, dict):
        props = node.get("properties", {})
        for key, item in value.items():
            yield from leaves(item, props.get(key, {}), (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:1]):
            yield from leaves(item, node.get("items", {}), (*path, i))
    elif path:
        yield path, node


def swapped(node: dict, value):
    """The value in another JSON type, one a lenient parser would convert back."""
    kind = node.get("type")
    if kind in ("integer", "number"):
        return str(value)
    if kind == "boolean":
        return "true"
    return 12345  # strings (plain, uuid, date-time, enum)


def _set(body, path, value):
    body = copy.deepcopy(body)
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return body


def field_cases(base: dict | list, schema: dict) -> list[tuple[str, tuple, object]]:
    """(label, field path, value) for each scalar field of the body: its JSON type swapped,
    and NUL in each free-text string."""
    cases = []
    for path, node in leaves(base, schema):
        label = ".".join(map(str, path))
        kind = node.get("type", "string")
        cases.append((f"{label} ({kind}) as {type(swapped(node, 0)).__name__}", path, swapped(node, _get(base, path))))
        if kind == "string" and "enum" not in node:
            cases.append((f"{label} with NUL", path, "a\x00b"))
    return cases


def operations_with_bodies():
    return [
        pytest.param(method, template, schema, id=f"{method.upper()} {template}")
        for method, template, schema in write_operations() if schema is not None
    ]


def _get(body, path):
    for step in path:
        body = body[step]
    return body


# ------------------------------------------------------------------------------ the world


class World:
    def __init__(self):
        ops_user = OpsUserFactory()
        self.ops = client_for(ops_user)
        self.driver = DriverFactory()
        self.driver_client = client_for(self.driver.user)
        self.delivery = DeliveryFactory()
        self.zone = ZoneFactory()
        self.params = {
            "driver_id": str(self.driver.pk), "delivery_id": str(self.delivery.pk), "zone_id": str(self.zone.pk),
            "seller_order_id": self.delivery.seller_order_id, "step": "pickup-started",
            "webhook_id": str(endpoint_create(owner=ops_user, all_deliveries=True, url="https://example.com/h", events=["*"]).pk),
            "device_id": str(device_register(driver=self.driver, platform="android", token="walker-device")[0].pk),
        }

    def client(self, template):
        if template in DRIVER_OPERATIONS:
            return self.driver_client
        if template in ANONYMOUS_OPERATIONS:
            return APIClient()
        return self.ops

    def url(self, template, *, nul_in_path=False):
        """A URL of the operation; `nul_in_path`: NUL in its last path parameter (where a
        string parameter still resolves and reaches the view), or at its end."""
        names = [p[1:-1] for p in template.split("/") if p.startswith("{")]
        url = template
        for name in names:
            value = self.params.get(name, str(uuid.uuid4()))
            url = url.replace("{" + name + "}", value + ("%00X" if nul_in_path and name == names[-1] else ""))
        if nul_in_path and not names:
            url += "%00"
        if template == "/v2/orders/{seller_order_id}/rating":
            url += f"?token={self.delivery.tracking_token}"
        return url


@pytest.fixture
def world(db):
    return World()


def assert_spec_error(response, status):
    body = assert_error(response, status)
    assert response["Content-Type"].startswith("application/json")
    assert set(body) <= ERROR_KEYS, set(body) - ERROR_KEYS
    assert body["error"] == HTTPStatus(status).phrase
    assert isinstance(body["message"], str) and body["message"]
    assert body["path"].startswith("/v2/")
    return body


def spec_error_problem(response, status, *, detail_field=None) -> str | None:
    """What is wrong with `response` as the SPEC's error body of `status`; None if nothing.
    `detail_field`: a field `details` must name (True: any)."""
    content = response.content[:200]
    if response.status_code != status:
        return f"{response.status_code} instead of {status}: {content!r}"
    if not response.get("Content-Type", "").startswith("application/json"):
        return f"not JSON: {content!r}"
    body = response.json()
    if set(body) - ERROR_KEYS or not {"statusCode", "timestamp", "path", "message", "error"} <= set(body):
        return f"not the error body: {sorted(body)}"
    if body["statusCode"] != status or body["error"] != HTTPStatus(status).phrase or not body["message"]:
        return f"wrong status, reason or message: {body}"
    if detail_field is True and not body.get("details"):
        return f"no details: {body}"
    if isinstance(detail_field, str) and detail_field not in body.get("details", {}):
        return f"details do not name {detail_field}: {body}"
    return None


# ------------------------------------------------------------- the same hostile requests to all

FIVE_MB = b'{"a": "' + b"x" * (5 * 1024 * 1024) + b'"}'
HOSTILE = {
    # name: (body bytes, extra query string, expected status)
    "a 5 MB body": (FIVE_MB, "", 413),
    "an array nested 100 000 deep": (b"[" * 100_000 + b"]" * 100_000, "", 400),
    "an object nested 100 000 deep": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "", 400),
    "nesting just past the limit": (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "", 400),
    "malformed JSON": (b'{"reason": ', "", 400),
    "a body that is not UTF-8": (b'{"reason": "\xff\xfe"}', "", 400),
    "NaN": (b'{"lat": NaN}', "", 400),
    "Infinity": (b'{"lat": Infinity}', "", 400),
    "NUL in a body string": (b'{"whatever": "a\\u0000b"}', "", 400),
    "NUL in a body key": (b'{"a\\u0000b": 1}', "", 400),
    "a lone surrogate in a body string": (b'{"reason": "\\ud800"}', "", 400),
    "NUL in a query value": (b"{}", "x=a%00b", 400),
    "NUL in a query key": (b"{}", "a%00b=1", 400),
    "a control character in a query value": (b"{}", "x=a%01b", 400),
    "a broken percent-escape in a query value": (b"{}", "x=%ff", 400),
}


HOSTILE_NAMES = [*HOSTILE, "NUL in the path", "NUL in the Idempotency-Key"]


def all_write_operations():
    return [pytest.param(method, template, id=f"{method.upper()} {template}") for method, template, _ in write_operations()]


def send(client, method, url, raw: bytes, **extra):
    return getattr(client, method)(url, data=raw, content_type="application/json", **extra)


@pytest.mark.parametrize(("method", "template"), all_write_operations())
def test_every_hostile_request_to_a_write_endpoint_is_refused_in_the_error_body(world, method, template):
    client = world.client(template)
    failures = []
    for name in HOSTILE_NAMES:
        extra = {}
        if name == "NUL in the path":
            url, raw, status = world.url(template, nul_in_path=True), b"{}", 400
        elif name == "NUL in the Idempotency-Key":
            url, raw, status, extra = world.url(template), b"{}", 400, {"HTTP_IDEMPOTENCY_KEY": "k\x00ey"}
        else:
            raw, query, status = HOSTILE[name]
            url = world.url(template)
            if query:
                url += ("&" if "?" in url else "?") + query

        problem = spec_error_problem(send(client, method, url, raw, **extra), status)

        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures)


def test_the_walk_covers_every_write_endpoint():
    operations = {(m, t) for m, t, _ in write_operations()}
    # the SPEC's writes, and the ones the app added; a new one joins the walk by itself
    assert ("post", "/v2/deliveries") in operations and ("put", "/v2/drivers/{driver_id}/zone-preferences") in operations
    assert len(operations) >= 22
    assert DRIVER_OPERATIONS | ANONYMOUS_OPERATIONS <= {t for _, t in operations}


# --------------------------------------------------------- each field, in the wrong JSON type


@pytest.mark.parametrize(("method", "template", "schema"), operations_with_bodies())
def test_each_field_in_the_wrong_json_type_or_with_nul_is_a_400_naming_it(world, method, template, schema):
    base = example(schema)
    cases = field_cases(base, schema)
    assert cases
    # the example itself is not refused for a field the walk changes (or the 400 would prove nothing)
    control = send(world.client(template), method, world.url(template), json.dumps(base).encode())
    refused = set(control.json().get("details", {})) if control.status_code == 400 else set()
    assert not refused & {path[0] for _, path, _ in cases}, control.content
    failures = []
    for label, field_path, value in cases:
        r = send(world.client(template), method, world.url(template), json.dumps(_set(base, field_path, value)).encode())

        # a bare list (zone preferences) is validated as `preferences`: details name no field of it
        problem = spec_error_problem(r, 400, detail_field=field_path[0] if isinstance(field_path[0], str) else True)

        if problem:
            failures.append(f"{label}: {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("field", "value"),
    [("deliveryFee", "49.50"), ("deliveryFee", 49.5), ("deliveryFee", 49), ("deliveryFee", None)],
)
def test_money_is_a_number_or_a_decimal_string(integration, field, value):
    body = {"sellerOrderId": f"ORD-MONEY-{uuid.uuid4().hex[:8]}", "storeName": "Corner Shop",
            "pickupLocation": {"lat": 12.97, "lon": 77.59}, "dropoffLocation": {"lat": 12.99, "lon": 77.6},
            "autoDispatch": False, field: value}

    r = integration.post("/v2/deliveries", body, format="json")

    assert r.status_code == 201, r.content
    assert r.json()["deliveryFee"] == (49.0 if value is None else float(value))  # null: the pricing rule's (DEFAULT_DELIVERY_FEE)


@pytest.mark.parametrize("value", [True, [49.5], {"amount": 49.5}, "49.5.0", "1e3", "-1", "49.505", "", "  "])
def test_money_in_any_other_form_is_a_400(integration, value):
    body = {"sellerOrderId": "ORD-MONEY-BAD", "storeName": "Corner Shop", "autoDispatch": False,
            "pickupLocation": {"lat": 12.97, "lon": 77.59}, "dropoffLocation": {"lat": 12.99, "lon": 77.6},
            "deliveryFee": value}

    r = integration.post("/v2/deliveries", body, format="json")

    assert "deliveryFee" in assert_spec_error(r, 400)["details"]


def test_a_body_at_the_limit_is_read_and_one_byte_over_is_a_413(ops, settings):
    settings.API_MAX_BODY_BYTES = 2048
    body = json.dumps({"name": "Ann Limit", "phone": "+15551234567", "vehicle": "Blue Civic", "pad": ""})
    at_limit = body.replace('"pad": ""', '"pad": "' + "x" * (2048 - len(body)) + '"').encode()
    assert len(at_limit) == 2048

    assert ops.post("/v2/drivers", data=at_limit, content_type="application/json").status_code == 201
    r = ops.post("/v2/drivers", data=at_limit + b" ", content_type="application/json")

    body = assert_spec_error(r, 413)
    assert "2048" in body["message"]


def test_nul_in_a_page_url_is_a_plain_400(db, client):
    assert client.get("/track/00000000-0000-0000-0000-000000000000?token=a%00b").status_code == 400
    assert client.get("/admin/login/?next=a%00b").status_code == 400


def test_nul_in_a_tracking_query_or_sellerorderid_is_a_400_not_a_database_error(anon, db):
    assert_spec_error(anon.get("/v2/orders/ORD%00X/delivery-status?token=abc"), 400)
    assert_spec_error(anon.get("/v2/orders/ORD-1/delivery-status?token=a%00b"), 400)


# --------------------------------------------------------------------------------------- ASGI


def asgi_post(path, raw: bytes, headers: dict):
    async def go():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post(path, content=raw, headers={"Content-Type": "application/json", **headers})

    return async_to_sync(go)()


class _AsgiResponse:
    """httpx's response with the two things spec_error_problem reads as on Django's."""

    def __init__(self, response: httpx.Response):
        self.status_code, self.content, self._response = response.status_code, response.content, response

    def get(self, name, default=None):
        return self._response.headers.get(name, default)

    def json(self):
        return self._response.json()


def asgi_cases(url: str, fix: dict) -> list[tuple[str, str, bytes, int]]:
    """(name, url, body, expected status) of the hostile requests, and a fix that is fine."""
    cases = [("NUL in the path", url + "%00", json.dumps(fix).encode(), 400)]
    for name, (raw, query, status) in HOSTILE.items():
        cases.append((name, f"{url}?{query}", json.dumps(fix).encode(), status) if query else (name, url, raw, status))
    return cases


@pytest.mark.django_db(transaction=True)
def test_hostile_location_fixes_through_the_asgi_app_are_refused_as_by_django():
    """The fast lane serves the happy path and hands anything unusual to Django, which refuses
    it as the walk above expects: the same answers whichever path a fix takes."""
    driver = DriverFactory()
    url = f"/v2/drivers/{driver.pk}/location"
    headers = {"Authorization": f"Token {token_for(driver.user)}"}
    fix = {"lat": 12.98, "lon": 77.6}
    cases = [
        *asgi_cases(url, fix),
        ("NUL in a string the fix does not use", url, b'{"lat": 12.98, "lon": 77.6, "note": "a\\u0000b"}', 400),
        ("lat as a string", url, b'{"lat": "12.98", "lon": 77.6}', 400),
        ("lon as a boolean", url, b'{"lat": 12.98, "lon": true}', 400),
    ]
    failures = []
    for name, target, raw, status in cases:
        problem = spec_error_problem(_AsgiResponse(asgi_post(target, raw, headers)), status)
        if problem:
            failures.append(f"{name}: {problem}")

    assert not failures, "\n".join(failures)
    assert asgi_post(url, json.dumps(fix).encode(), headers).status_code == 200  # and a plain fix still goes through


@pytest.mark.django_db(transaction=True)
def test_hostile_requests_through_both_django_stacks_of_the_asgi_app():
    stacks = {
        "lean (token)": ("/v2/deliveries", {"Authorization": f"Token {token_for(OpsUserFactory())}"}),
        "full (anonymous)": ("/v2/auth/token", {}),
    }
    failures = []
    for stack, (path, headers) in stacks.items():
        for name, target, raw, status in asgi_cases(path, {"username": "x", "password": "y"}):
            problem = spec_error_problem(_AsgiResponse(asgi_post(target, raw, headers)), status)
            if problem:
                failures.append(f"{stack}, {name}: {problem}")

    assert not failures, "\n".join(failures)


@pytest.mark.django_db(transaction=True)
def test_a_compressed_body_is_a_415_on_every_stack_and_identity_is_plain():
    """Read as it came, a gzip body was "malformed JSON" (400) and a `br` label on plain JSON
    was taken as is (201): the server decodes no Content-Encoding, so it says so, and names the
    one it takes in `Accept-Encoding`."""
    import gzip

    driver = DriverFactory()
    targets = {
        "fast lane": (f"/v2/drivers/{driver.pk}/location", {"Authorization": f"Token {token_for(driver.user)}"},
                      {"lat": 12.98, "lon": 77.6}),
        "lean (token)": ("/v2/quotes", {"Authorization": f"Token {token_for(OpsUserFactory())}"},
                         {"pickupLocation": {"lat": 12.97, "lon": 77.59}, "dropoffLocation": {"lat": 12.99, "lon": 77.6}}),
        "full (anonymous)": ("/v2/auth/token", {}, {"username": "x", "password": "y"}),
    }
    failures = []
    for stack, (path, headers, body) in targets.items():
        plain = json.dumps(body).encode()
        for label, raw in (("gzip", gzip.compress(plain)), ("br", plain), ("gzip, identity", plain)):
            answer = asgi_post(path, raw, {**headers, "Content-Encoding": label})
            problem = spec_error_problem(_AsgiResponse(answer), 415)
            if problem:
                failures.append(f"{stack}, {label}: {problem}")
            if answer.headers.get("Accept-Encoding") != "identity":  # (RFC 9110: say which codings are taken)
                failures.append(f"{stack}, {label}: Accept-Encoding {answer.headers.get('Accept-Encoding')!r}")
        answer = asgi_post(path, plain, {**headers, "Content-Encoding": "identity"})
        if answer.status_code == 415:
            failures.append(f"{stack}: identity refused")

    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("value", ["-0", "-0.00", -0.0])
def test_a_negative_zero_fee_is_stored_and_shown_as_zero(integration, value):
    body = {"sellerOrderId": f"ORD-ZERO-{uuid.uuid4().hex[:8]}", "storeName": "Corner Shop", "autoDispatch": False,
            "pickupLocation": {"lat": 12.97, "lon": 77.59}, "dropoffLocation": {"lat": 12.99, "lon": 77.6},
            "deliveryFee": value}

    r = integration.post("/v2/deliveries", body, format="json")

    assert r.status_code == 201, r.content
    fee = r.json()["deliveryFee"]
    assert fee == 0 and math.copysign(1, fee) == 1  # not -0.0


@pytest.mark.django_db(transaction=True)
def test_a_charset_that_is_not_a_text_encoding_is_a_400_on_every_stack():
    """`charset=undefined` or `punycode` made decoding raise a bare UnicodeError (a 500 in HTML),
    `base64` a LookupError; an unknown name is ignored, as Django does (the body is UTF-8)."""
    driver = DriverFactory()
    targets = {
        "fast lane": (f"/v2/drivers/{driver.pk}/location", {"Authorization": f"Token {token_for(driver.user)}"},
                      {"lat": 12.98, "lon": 77.6}, 200),
        "lean (token)": ("/v2/quotes", {"Authorization": f"Token {token_for(OpsUserFactory())}"},
                         {"pickupLocation": {"lat": 12.97, "lon": 77.59}, "dropoffLocation": {"lat": 12.99, "lon": 77.6}}, 200),
        "full (anonymous)": ("/v2/auth/token", {}, {"username": "x", "password": "y"}, 401),
    }
    failures = []
    for stack, (path, headers, body, plain_status) in targets.items():
        raw = json.dumps(body).encode()
        for charset in ("undefined", "punycode", "idna", "base64", "rot13", "zlib"):
            answer = asgi_post(path, raw, {**headers, "Content-Type": f"application/json; charset={charset}"})
            problem = spec_error_problem(_AsgiResponse(answer), 400)
            if problem:
                failures.append(f"{stack}, {charset}: {problem}")
            elif "is not a text encoding" not in answer.json()["message"]:
                failures.append(f"{stack}, {charset}: {answer.json()['message']}")
        for charset in ("utf-8", "UTF8", "latin-1", "no-such-charset"):
            answer = asgi_post(path, raw, {**headers, "Content-Type": f"application/json; charset={charset}"})
            if answer.status_code != plain_status:
                failures.append(f"{stack}, {charset}: {answer.status_code} {answer.text[:200]}")

    assert not failures, "\n".join(failures)


def test_a_json_body_in_a_failing_codec_is_refused_by_the_parser_itself():
    from common.parsers import BodyRejected, load_json_body

    for charset in ("undefined", "punycode", "base64"):
        with pytest.raises(BodyRejected):
            load_json_body(b'{"a": 1}', charset)


@pytest.mark.django_db(transaction=True)
def test_a_form_django_cannot_read_is_a_plain_400_on_the_pages_not_a_500():
    """A url-encoded form in latin-1 (Django refuses to read it: BadRequest) made the 400 page's
    own CSRF step read it again in every middleware layer, and the ASGI application failed; a
    multipart form declaring `charset=undefined` failed in Django's parser."""

    async def go():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            page = await client.get("/admin/login/")
            token = client.cookies["csrftoken"]
            answers = [await client.post("/admin/login/", content=f"csrfmiddlewaretoken={token}&username=a&password=b",
                                         headers={"Content-Type": "application/x-www-form-urlencoded; charset=iso-8859-1"})]
            body = (f'--xx\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n{token}\r\n--xx--\r\n').encode()
            for charset in ("undefined", "base64"):
                answers.append(await client.post("/admin/login/", content=body, headers={
                    "Content-Type": f"multipart/form-data; boundary=xx; charset={charset}"}))
            return page, answers

    page, answers = async_to_sync(go)()
    assert page.status_code == 200
    assert [a.status_code for a in answers] == [400, 400, 400]
    assert "Bad Request (400)" in answers[0].text
    assert answers[1].text == 'The request\'s charset "undefined" is not a text encoding: send UTF-8.'
