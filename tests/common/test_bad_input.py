"""Rejecting bad input without a 500 (SPEC "Wire conventions"): non-finite numbers, lone
surrogates, NUL characters, overlong values and wrong JSON types are a 400 in the error body."""
from __future__ import annotations

import json

import pytest

from availability.models import Driver
from tests.wire import assert_error_body, deliveries_of, delivery_body


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
