"""The OpenAPI schema says what the server does (issue 15, defect 5): every query parameter of
every GET in the schema is sent the values its schema refuses, and values it allows that a
client could be surprised by (an empty one), and the answer must agree with the schema. Body
rules the schema states as patterns or bounds are checked against the server the same way."""
from __future__ import annotations

import functools
import re
from urllib.parse import parse_qs, urlsplit

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator

from common.validators import validate_positive
from tests.api import client_for
from tests.factories import DeliveryFactory, DriverFactory, OpsUserFactory, ZoneFactory
from zones.api.serializers import ZoneWriteSerializer
from zones.models import DeliveryZone

pytestmark = pytest.mark.django_db


@functools.cache
def _schema() -> dict:
    return SchemaGenerator().get_schema(request=None, public=True)


def _component(name: str) -> dict:
    return _schema()["components"]["schemas"][name]


def _string_allows(rule: dict, value: str) -> bool:
    if "oneOf" in rule:
        return sum(_string_allows(branch, value) for branch in rule["oneOf"]) == 1
    return (
        rule.get("minLength", 0) <= len(value) <= rule.get("maxLength", 10**9)
        and ("pattern" not in rule or bool(re.search(rule["pattern"], value)))
    )


def query_parameters() -> list[tuple[str, dict]]:
    return [
        (path, param)
        for path, item in sorted(_schema()["paths"].items())
        for method, op in item.items() if method == "get"
        for param in op.get("parameters", []) if param["in"] == "query"
    ]


def refused_by_schema(param: dict) -> list[str]:
    """Values the parameter's schema does not allow."""
    schema = param["schema"]
    values = [] if param.get("allowEmptyValue") else [""]
    if "enum" in schema:
        values.append("not-one-of-them")
    if schema.get("type") == "integer":
        values += ["x", "1.5"]
        values += [str(schema["maximum"] + 1)] if "maximum" in schema else []
        values += [str(schema["minimum"] - 1)] if "minimum" in schema else []
    if schema.get("format") in ("uuid", "date-time"):
        values.append("nope")
    if schema.get("type") == "boolean":
        values.append("maybe")
    if "maxLength" in schema:
        values.append("a" * (schema["maxLength"] + 1))
    if "pattern" in schema:
        values += [v for v in ("!!!", "a b") if not re.search(schema["pattern"], v)]
    return [v for v in values if not (v == "" and "pattern" not in schema and schema.get("type") == "string"
                                       and "enum" not in schema and "format" not in schema and not schema.get("minLength"))]


@pytest.fixture
def urls():
    delivery = DeliveryFactory()
    ids = {"driver_id": DriverFactory().pk, "delivery_id": delivery.pk, "zone_id": ZoneFactory().pk,
           "seller_order_id": delivery.seller_order_id}

    def url(path):
        for key, value in ids.items():
            path = path.replace("{%s}" % key, str(value))
        return path

    return url


def test_every_query_parameter_answers_as_its_schema_says(urls):
    ops = client_for(OpsUserFactory())
    surprises = []
    checked = 0
    for path, param in query_parameters():
        if param["name"] == "token" or "{" in urls(path):
            continue  # the customer's token: its own tests (tracking)
        for value in refused_by_schema(param):
            r = ops.get(urls(path), {param["name"]: value})
            checked += 1
            if r.status_code != 400:
                surprises.append(f"{path} {param['name']}={value!r}: {r.status_code}, the schema refuses it")
            elif param["name"] not in r.json().get("details", {}):
                surprises.append(f"{path} {param['name']}={value!r}: 400 without details.{param['name']}")
        if param.get("allowEmptyValue"):
            with time_machine.travel(timezone.now(), tick=False):  # the same "now" for both (summary windows)
                empty, absent = ops.get(urls(path), {param["name"]: ""}), ops.get(urls(path))
            checked += 1
            if empty.status_code != absent.status_code or empty.json() != absent.json():
                surprises.append(f"{path} {param['name']}='': {empty.status_code}, the schema says it is as if left out")
    assert checked > 60
    assert surprises == [], "\n".join(surprises)


def test_cursors_are_documented_as_what_the_server_accepts(ops, db):
    cursor = next(p for _, p in query_parameters() if p["name"] == "cursor")["schema"]
    for garbage in ("!!!", "garbage", "b3JkZXI9MQ=="):  # not base64; bad padding; base64 of an unknown token
        body = ops.get("/v2/deliveries", {"cursor": garbage}).json()
        assert body["statusCode"] == 400 and "cursor" in body["details"], garbage
    assert not re.search(cursor["pattern"], "!!!")
    DriverFactory.create_batch(2)
    page = ops.get("/v2/drivers", {"limit": 1}).json()
    issued = parse_qs(urlsplit(page["next"]).query)["cursor"][0]
    assert re.search(cursor["pattern"], issued)  # what the server hands out fits the pattern


@pytest.mark.parametrize("phone", ["+1 555 0100", "1234", "(080) 4110-2233", "12a4", "(12)", "----", "+12 3", "1" * 33, ""])
def test_the_phone_pattern_is_the_servers_rule(ops, phone):
    matches = _string_allows(_component("DriverCreateRequest")["properties"]["phone"], phone)
    r = ops.post("/v2/drivers", {"name": "Ann", "phone": phone, "vehicle": "bike"}, format="json")
    assert (r.status_code == 201) == matches, (phone, r.content)

    # The customer's phone must also be a possible number (libphonenumber), which no pattern
    # says: what the schema refuses, the server refuses.
    matches = _string_allows(_component("DeliveryCreateRequest")["properties"]["customerPhone"], phone)
    body = {"sellerOrderId": f"PH-{phone}", "storeName": "S", "pickupLocation": {"lat": 1, "lon": 1},
            "dropoffLocation": {"lat": 1.01, "lon": 1}, "customerPhone": phone, "autoDispatch": False}
    r = ops.post("/v2/deliveries", body, format="json")
    if not matches:
        assert r.status_code == 400 and "customerPhone" in r.json()["details"], (phone, r.content)


def test_the_heading_bound_is_exclusive_as_documented(db):
    heading = _component("LocationRequest")["properties"]["heading"]
    assert (heading["minimum"], heading["maximum"], heading["exclusiveMaximum"]) == (0, 360, True)
    driver = DriverFactory()
    me = client_for(driver.user)
    fix = {"lat": 12.9, "lon": 77.6}
    assert me.post(f"/v2/drivers/{driver.pk}/location", {**fix, "heading": 359.9}, format="json").status_code == 200
    assert me.post(f"/v2/drivers/{driver.pk}/location", {**fix, "heading": 360}, format="json").status_code == 400


def test_cross_field_rules_are_in_the_schema_and_enforced(ops, db):
    paths = _schema()["paths"]
    override = _component("OverrideRequest")["properties"]["durationMinutes"]
    assert "on_break" in override["description"]
    driver = DriverFactory()
    r = ops.post(f"/v2/drivers/{driver.pk}/availability", {"state": "on_break", "reason": "x"}, format="json")
    assert r.status_code == 400 and "durationMinutes" in r.json()["details"]

    step = paths["/v2/drivers/{driver_id}/deliveries/{delivery_id}/{step}"]["post"]
    assert "delivery-failed" in step["description"] and "reason" in step["description"]

    summary = {p["name"]: p for p in paths["/v2/admin/analytics/summary"]["get"]["parameters"]}
    assert "before `to`" in summary["from"]["description"] and "366 days" in summary["from"]["description"]
    r = ops.get("/v2/admin/analytics/summary", {"from": "2026-02-02T00:00:00Z", "to": "2026-02-01T00:00:00Z"})
    assert r.status_code == 400 and "from" in r.json()["details"]

    ticket_patch = _component("PatchedTicketPatchRequest")  # and as anyOf (found by schemathesis: `{}` was valid)
    assert "At least one of" in ticket_patch["description"]
    assert ticket_patch["anyOf"] == [{"required": [name]} for name in ("status", "priority", "assigneeId", "resolution")]
    # and so a body is required (schemathesis sent none: the documented-optional body was a 400);
    # the zone PATCH, whose empty body is a 200, keeps an optional one
    assert paths["/v2/support/tickets/{ticket_id}"]["patch"]["requestBody"]["required"] is True
    assert not paths["/v2/zones/{zone_id}"]["patch"]["requestBody"].get("required")


def test_free_text_path_and_query_parameters_document_the_characters_any_url_refuses(db):
    """Found by schemathesis (positive data refused): `seller_order_id` and `token` allowed any
    string, and a control character in them is the middleware's 400."""
    from common.middleware import _BAD_API_URL_CHARS

    free_text = {
        (path, param["in"], param["name"]): param["schema"].get("pattern")
        for path, item in _schema()["paths"].items()
        for op in item.values() if isinstance(op, dict)
        for param in op.get("parameters", [])
        if param["in"] in ("path", "query") and param["schema"].get("type") == "string"
        and not {"format", "enum"} & param["schema"].keys()
    }
    assert ("/v2/orders/{seller_order_id}/rating", "path", "seller_order_id") in free_text
    assert ("/v2/deliveries", "query", "sellerOrderId") in free_text
    assert [key for key, pattern in free_text.items() if pattern is None] == []
    url_text = re.compile(free_text["/v2/orders/{seller_order_id}/rating", "path", "seller_order_id"])
    for code in [*range(0x00, 0xA1), 0xAD, 0x2028, 0xFFFD, 0xFFFF, 0x1F600]:
        char = chr(code)
        assert bool(url_text.match(f"a{char}b")) == (not _BAD_API_URL_CHARS.search(char)), hex(code)


def test_a_zone_s_search_radius_is_documented_and_checked_as_greater_than_0(ops, db):
    for name in ("ZoneWriteRequest", "PatchedZoneWriteRequest"):
        radius = _component(name)["properties"]["searchRadiusKm"]
        assert (radius["minimum"], radius["exclusiveMinimum"], radius["maximum"], radius["nullable"]) == (0, True, 100, True)

    square = {"type": "Polygon", "coordinates": [[[77.5, 12.9], [77.6, 12.9], [77.6, 13.0], [77.5, 13.0], [77.5, 12.9]]]}
    refused = ops.post("/v2/zones", {"name": "Zero", "geometry": square, "searchRadiusKm": 0}, format="json")
    assert refused.status_code == 400
    assert refused.json()["details"] == {"searchRadiusKm": ["Must be greater than 0."]}
    created = ops.post("/v2/zones", {"name": "Small", "geometry": square, "searchRadiusKm": 0.5}, format="json")
    assert created.status_code == 201, created.json()

    # One rule, written once: the admin's form (the model field) and the API's field run the same check.
    model_field = DeliveryZone._meta.get_field("search_radius_km")
    assert validate_positive in model_field.validators
    assert validate_positive in ZoneWriteSerializer().fields["searchRadiusKm"].validators
    with pytest.raises(ValidationError) as refused_by_admin:
        model_field.clean(0.0, None)
    assert refused_by_admin.value.messages == ["Must be greater than 0."]


def test_a_webhook_s_events_are_documented_and_checked_as_at_least_one(ops, db):
    for name in ("WebhookEndpointCreateRequest", "PatchedWebhookEndpointUpdateRequest"):
        assert _component(name)["properties"]["events"]["minItems"] == 1

    refused = ops.post("/v2/webhooks", {"url": "https://example.com/hook", "events": []}, format="json")
    assert refused.status_code == 400
    assert refused.json()["details"] == {"events": ['Subscribe to at least one event type, or ["*"] for all.']}



@pytest.mark.parametrize(("value", "allowed"), [
    ("\t", False), ("  \x1c\u3000 ", False), ("", False), ("a\x00b", False),  # blank once trimmed; NUL anywhere
    (" lunch ", True), ("\ufeff", True), ("tab\tinside", True),  # \ufeff is no whitespace to str.strip()
])
def test_free_text_body_fields_document_blank_and_nul_as_the_server_refuses_them(ops, db, value, allowed):
    """`reason: "\\t"` matched the schema (minLength 1) and was refused ("may not be blank"):
    schema-driven clients saw valid requests fail. A request field's pattern now says it."""
    rule = _component("OverrideRequest")["properties"]["reason"]
    driver = DriverFactory()

    r = ops.post(f"/v2/drivers/{driver.pk}/availability", {"state": "paused", "reason": value}, format="json")

    assert _string_allows(rule, value) is allowed
    assert (r.status_code == 200) is allowed, r.content
    single_line = _component("WebhookEndpointCreateRequest")["properties"]["description"]
    assert _string_allows(single_line, "two\nlines") is False and _string_allows(single_line, "") is True
    assert _string_allows(single_line, "\tNightly\n") is True  # trimmed first: the server takes it


def test_a_free_text_query_parameter_keeps_the_url_rule(db):
    """drf-spectacular maps a query serializer as a request: its free-text pattern (NUL only)
    took the place of the URL rule the middleware applies (control characters, U+FFFD)."""
    from common.validators import URL_TEXT_PATTERN

    params = {p["name"]: p for p in _schema()["paths"]["/v2/deliveries"]["get"]["parameters"]}
    assert params["sellerOrderId"]["schema"]["pattern"] == URL_TEXT_PATTERN
