"""The delivery in webhook payloads exactly as the API shows it to its owner: the API's own
serializer, registered with `notifications.payloads` at start-up (notifications/apps.py)."""
from __future__ import annotations

import json

from rest_framework.renderers import JSONRenderer

from dispatch.api.serializers import DeliverySerializer
from notifications.payloads import latest_assignments_of


def delivery_representation(delivery) -> dict:
    """`delivery` from `notifications.payloads.deliveries_for_payload`: its latest assignment
    is annotated, and handed to the serializer as its prefetch (no query per delivery)."""
    if getattr(delivery, "latest_assignments", None) is None:
        delivery.latest_assignments = latest_assignments_of(delivery)
    data = DeliverySerializer(delivery, context={}).data
    return json.loads(JSONRenderer().render(data))  # JSON types: decimals as numbers, as on the wire
