"""common.validation.PlainValidation: the same validation as DRF's per-instance fields, on good
and bad bodies, with the fields built once per class and thread."""
import threading

import pytest
from rest_framework import serializers

from common.fields import LocationInputSerializer
from common.validation import PlainValidation
from dispatch.api.serializers import DeliveryCreateSerializer, DeliveryStepSerializer
from offers.api.serializers import AcceptSerializer


def drf_twin(cls):
    """The same serializer with DRF's own `fields` (built per instance) and validation."""
    return type(f"Drf{cls.__name__}", (cls,), {
        "fields": serializers.Serializer.__dict__["fields"],
        "to_internal_value": serializers.Serializer.to_internal_value,
    })


POINT = {"lat": 12.97, "lon": 77.59}
CREATE = {"sellerOrderId": "V-1", "storeName": "Shop", "pickupLocation": POINT, "dropoffLocation": {"lat": 13.0, "lon": 77.6}}
BODIES = {
    DeliveryStepSerializer: [{}, {"reason": "refused", "note": "x"}, {"handoffCode": "12a4"}, {"reason": 12},
                             {"overrideReason": "  "}, {"overrideReason": " gate "}, {"note": "n" * 1001}, []],
    AcceptSerializer: [{}, {"acceptedAt": "2026-12-02T10:00:00Z"}, {"acceptedAt": "yesterday"}],
    LocationInputSerializer: [POINT, {"lat": 91, "lon": 0}, {"lat": "12", "lon": 1}, {"lat": float("nan"), "lon": 1}, {}],
    DeliveryCreateSerializer: [
        CREATE, {**CREATE, "prepTimeMinutes": 5, "deliveryFee": "49.50", "customerPhone": "+4915123456789"},
        {**CREATE, "pickupLocation": {"lat": 100, "lon": 0}}, {**CREATE, "pickupLocation": "here"},
        {**CREATE, "deliveryFee": "1e3", "prepTimeMinutes": 12.5, "autoDispatch": "yes"},
        {**CREATE, "quoteId": "7b7e4f3e-4c1a-4a57-9d54-8ad7e0b1e0a1", "deliveryFee": 3}, {}, {"storeName": None},
    ],
}


@pytest.mark.parametrize("cls", list(BODIES), ids=lambda c: c.__name__)
def test_the_same_errors_and_values_as_drf_body_after_body(cls):
    assert issubclass(cls, PlainValidation)
    twin = drf_twin(cls)
    for body in BODIES[cls] * 2:  # the second round on the lent fields
        ours, drf = cls(data=body), twin(data=body)
        assert ours.is_valid() == drf.is_valid(), body
        assert ours.errors == drf.errors, body
        if drf.is_valid():
            assert ours.validated_data == drf.validated_data, body
    name = next(iter(cls._declared_fields))
    assert cls(data={}).fields[name] is cls(data={}).fields[name]
    assert twin(data={}).fields[name] is not twin(data={}).fields[name]


def test_fields_are_built_once_per_thread_and_read_the_serializer_at_hand():
    first, second = DeliveryStepSerializer(data={}, context={"n": 1}), DeliveryStepSerializer(data={}, context={"n": 2})
    assert first.fields["reason"] is second.fields["reason"]  # lent, not copied
    assert first.fields["reason"].context == {"n": 2}  # the last to take them
    assert first.is_valid() and first.fields["reason"].context == {"n": 1}  # validating takes them back

    other = {}
    thread = threading.Thread(target=lambda: other.update(field=DeliveryStepSerializer(data={}).fields["reason"]))
    thread.start()
    thread.join()
    assert other["field"] is not first.fields["reason"]  # another thread, its own fields


def test_a_serializer_with_a_nested_serializer_builds_its_fields_as_drf_does():
    class Nested(PlainValidation, serializers.Serializer):
        where = LocationInputSerializer()

    a, b = Nested(data={"where": POINT}), Nested(data={"where": {"lat": 1}})
    assert a.fields["where"] is not b.fields["where"]
    assert a.is_valid() and not b.is_valid()
    assert b.errors == {"where": {"lon": ["This field is required."]}}
