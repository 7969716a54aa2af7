"""DeliverySerializer renders with `common.representation.PlainRepresentation` (its fields
built once per class): the output must be DRF's own, key for key and in order, for every kind
of delivery and every reader (owner, ops, the assigned driver, another driver, hidden
tracking), in any active time zone, one by one and as a list."""
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from rest_framework import serializers

from common.representation import PlainRepresentation
from dispatch.api.serializers import DeliverySerializer
from dispatch.models import Assignment, AssignmentStatus, Delivery, DeliveryStatus
from tests.factories import DeliveryFactory, DriverFactory, ZoneFactory

pytestmark = pytest.mark.django_db


class DrfDeliverySerializer(DeliverySerializer):
    plain_representation = False  # DRF's Serializer.to_representation, fields built per instance


def _deliveries():
    now = timezone.now()
    driver, other = DriverFactory(), DriverFactory()
    waiting = DeliveryFactory(delivery_fee=None)
    assigned = DeliveryFactory(status=DeliveryStatus.ASSIGNED, assigned_at=now, delivery_fee=Decimal("49.5"),
                               zone=ZoneFactory(), customer_email="a@example.com", customer_language="hi")
    Assignment.objects.create(delivery=assigned, driver=driver)
    delivered = DeliveryFactory(status=DeliveryStatus.DELIVERED, assigned_at=now - timedelta(minutes=30),
                                pickup_started_at=now - timedelta(minutes=25), picked_up_at=now - timedelta(minutes=20),
                                in_transit_at=now - timedelta(minutes=19), delivered_at=now,
                                geofence_override_reason="gate closed", geofence_override_distance_m=260)
    Assignment.objects.create(delivery=delivered, driver=driver, status=AssignmentStatus.COMPLETED, ended_at=now)
    failed = DeliveryFactory(status=DeliveryStatus.FAILED, failed_at=now, failure_reason="nobody home",
                             failure_code="customer_unavailable", failure_note="rang twice")
    Assignment.objects.create(delivery=failed, driver=other, status=AssignmentStatus.COMPLETED, ended_at=now)
    reassigned = DeliveryFactory(status=DeliveryStatus.READY)
    Assignment.objects.create(delivery=reassigned, driver=other, status=AssignmentStatus.CANCELLED, ended_at=now,
                              end_reason="reassigned")
    cancelled = DeliveryFactory(status=DeliveryStatus.CANCELLED, cancelled_at=now, cancellation_reason="merchant",
                                handoff_code_failures=5, handoff_code_locked_at=now)
    return driver, other, [waiting, assigned, delivered, failed, reassigned, cancelled]


def _contexts(driver, other):
    return [{}, {"hide_tracking": True}, {"viewing_driver_id": driver.pk, "hide_tracking": True},
            {"viewing_driver_id": other.pk, "hide_tracking": True}]


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/Los_Angeles"])
def test_a_delivery_renders_exactly_as_drf_renders_it(zone):
    driver, other, deliveries = _deliveries()
    with timezone.override(zone):
        for delivery in deliveries:
            for context in _contexts(driver, other):
                fresh = Delivery.objects.get(pk=delivery.pk)
                plain = DeliverySerializer(fresh, context=context).data
                drf = DrfDeliverySerializer(Delivery.objects.get(pk=delivery.pk), context=context).data
                assert list(plain.items()) == list(drf.items()), (delivery.status, context)


def test_a_list_renders_exactly_as_drf_renders_it():
    driver, other, deliveries = _deliveries()
    qs = Delivery.objects.filter(pk__in=[d.pk for d in deliveries]).order_by("created_at")
    for context in _contexts(driver, other):
        plain = DeliverySerializer(list(qs), many=True, context=context).data
        drf = DrfDeliverySerializer(list(qs), many=True, context=context).data
        assert [list(d.items()) for d in plain] == [list(d.items()) for d in drf]


def test_a_serializer_with_a_field_that_needs_its_parent_is_refused():
    class Nested(PlainRepresentation, serializers.Serializer):
        inner = DeliverySerializer()

    with pytest.raises(TypeError, match="inner"):
        Nested({"inner": None}).data
