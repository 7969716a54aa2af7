"""The OpenAPI document (SPEC "Wire conventions"): public, valid, and documenting what every
operation can answer."""
from __future__ import annotations

import re

import yaml
from django.core.management import call_command

from common.idempotency import MAX_KEY_LENGTH


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


def test_every_operation_documents_the_400_for_a_control_character_in_its_path_or_query(ops, db):
    """Found by schemathesis (ST103): common.middleware answers 400 to a control character or
    invalid UTF-8 in any /v2/ path or query string, and GETs and DELETEs did not document it."""
    schema = yaml.safe_load(ops.get("/v2/schema/").content)
    undocumented = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            url = re.sub(r"\{[^}]+\}", "a%01b", path) + ("" if "{" in path else "?q=a%01b")
            response = getattr(ops, method)(url)
            assert response.status_code == 400, (method, url, response.status_code)
            if str(response.status_code) not in op["responses"]:
                undocumented.append((method.upper(), path))
    assert undocumented == []


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


def schema_patterns(schema) -> set[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return found


def test_no_pattern_in_the_schema_has_a_lookaround(anon, db):
    """Schema fuzzers generate strings from the patterns and cannot from a lookahead: found by
    schemathesis, which filtered out too many examples of POST /v2/drivers (the phone's
    "(?=(?:\\D*\\d){4})") and gave up on the operation."""
    patterns = schema_patterns(yaml.safe_load(anon.get("/v2/schema/").content))
    assert patterns and [p for p in patterns if "(?=" in p or "(?!" in p or "(?<" in p] == []


def test_the_schema_s_phone_pattern_is_the_phone_rule():
    import re

    from rest_framework.exceptions import ValidationError

    from dispatch.api.serializers import PHONE_PATTERN, validate_phone

    def rule(value: str) -> bool:  # the fields' max_length=32, then validate_phone
        if len(value) > 32:
            return False
        try:
            validate_phone(value)
        except ValidationError:
            return False
        return True

    def schema(value: str) -> bool:
        return len(value) <= 32 and re.search(PHONE_PATTERN, value) is not None

    samples = ["1234", "+1-555-0100", "(080) 4567 8901", "+44 20 7946 0958", "123", "+123", "----1-2-3",
               "1 2 3 4", "..1.2.3.4..", "+", "", "12a4", "++1234", "1234+", "+" + "1" * 31, "1" * 32, "1" * 33,
               "+" + "1" * 32, "(((1)))234", "12 34\u0662", " 1234", "12\n34"]
    assert [(v, rule(v)) for v in samples] == [(v, schema(v)) for v in samples]



def test_the_schema_states_the_rules_the_server_refuses_by(anon, db):
    """A fuzzing audit: `deliveryFee` 12.345 is refused (two decimal places at most) and a zone's
    position beyond lon 180 too, where the published schema said nothing of either (the fee's
    own help text replaced its field's description). Stated, not as `multipleOf` or bounds: a
    float `multipleOf: 0.01` makes validators refuse 0.07, and altitudes are taken."""
    schema = yaml.safe_load(anon.get("/v2/schema/").content)["components"]["schemas"]
    fee = schema["DeliveryCreateRequest"]["properties"]["deliveryFee"]
    assert "at most two decimal places" in fee["description"] and "Not with quoteId" in fee["description"]
    polygons = [s for name, s in schema.items() if name.endswith("ZoneWriteRequest")]  # (what clients send)
    assert polygons and all("lon -180..180, lat -90..90" in s["properties"]["geometry"]["description"] for s in polygons)
