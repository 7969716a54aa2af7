from channels.db import database_sync_to_async
from django.utils import timezone

from availability import events as availability_events
from common.broadcast import driver_group
from common.consumers import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, RelayConsumer, query_param
from common.errors import iso
from common.roles import driver_of
from dispatch.models import Assignment, AssignmentStatus
from offers import events as offer_events
from notifications.models import CustomerReply
from offers.models import DriverOffer, OfferStatus

SNAPSHOT_REPLIES = 50  # the latest customers' texts in a snapshot


def _own_driver_of(user, driver_id: str):
    driver = driver_of(user)
    return driver if driver is not None and str(driver.pk) == driver_id else None


@database_sync_to_async
def _own_driver(user, driver_id: str):
    return _own_driver_of(user, driver_id)


@database_sync_to_async
def _snapshot(driver) -> dict:
    """The driver's availability, pending offers and active deliveries, read after the socket joined its group:
    a change committed after this read reaches the socket as its event. (Read before the
    join, a change committed in between reached nobody: the app showed "available" to a
    paused driver until the next change.)"""
    driver.refresh_from_db(fields=["availability", "availability_until", "availability_reason", "last_availability_change"])
    pending = DriverOffer.objects.filter(driver_id=driver.pk, status=OfferStatus.PENDING, expires_at__gt=timezone.now())
    # (assignedAt: the delivery's, as its accept's events and GET /v2/deliveries/{id} give it)
    active = [
        {"deliveryId": str(delivery_id), "status": status, "assignedAt": iso(assigned_at)}
        for delivery_id, status, assigned_at in Assignment.objects.filter(driver_id=driver.pk, status=AssignmentStatus.ACTIVE)
        .order_by("created_at").values_list("delivery_id", "delivery__status", "delivery__assigned_at")
    ]
    return {
        "type": "availability_snapshot",
        "driverId": str(driver.pk),
        "availability": driver.availability,
        "until": iso(driver.availability_until),
        "reason": driver.availability_reason,
        "changedAt": iso(driver.last_availability_change),
        # offers made while the app was away, each as its `offer_created` (events are sent once)
        "pendingOffers": [offer_events.offer_created(offer) for offer in pending.order_by("created_at")],
        # the deliveries the driver holds now (one taken away meanwhile is not here: its
        # `assignment_cancelled` went while the app was away)
        "activeDeliveries": active,
        # what the customers of those deliveries texted back (a driver who was away, or took the
        # delivery over, missed their `customer_replied`), oldest first
        "customerReplies": [
            {"replyId": str(pk), "deliveryId": str(delivery_id), "body": body, "receivedAt": iso(received_at)}
            for pk, delivery_id, body, received_at in list(
                CustomerReply.objects.filter(delivery_id__in=[d["deliveryId"] for d in active])
                .order_by("-received_at").values_list("pk", "delivery_id", "body", "received_at")[:SNAPSHOT_REPLIES]
            )[::-1]
        ] if active else [],
    }


SNAPSHOT_ON = ("1", "true", "yes")


class DriverConsumer(RelayConsumer):
    """`/ws/drivers/<driverId>/?token=<apiToken>`: that driver's offers and availability, a
    delivery taken away from them (`assignment_cancelled`) and what the customer of a delivery
    they have texted back (`customer_replied`).

    With `&snapshot=1` the first message is an `availability_snapshot` (the state, the
    offers still pending and the deliveries held: an app back from a dropped connection finds there what it missed).
    Without it, no snapshot (the SPEC's events, and the two above): a client that took the first
    message after an offer for its `offer_created` read the snapshot instead."""

    relays = frozenset(availability_events.EVENT_TYPES + offer_events.EVENT_TYPES) | {"assignment_cancelled", "customer_replied"}

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.deny(CLOSE_UNAUTHENTICATED)
            return
        driver = await _own_driver(user, self.scope["url_route"]["kwargs"]["driver_id"])
        if driver is None:
            await self.deny(CLOSE_FORBIDDEN)
            return
        if await self.join_and_accept([driver_group(driver.pk)]) and (query_param(self.scope, "snapshot") or "").lower() in SNAPSHOT_ON:
            await self.send_json(await _snapshot(driver))

    def allowed(self, user) -> bool:
        return _own_driver_of(user, self.scope["url_route"]["kwargs"]["driver_id"]) is not None
