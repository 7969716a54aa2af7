from __future__ import annotations

from analytics import events as analytics_events
from availability import events as availability_events
from common.broadcast import OPS_GROUP, OPS_LOCATIONS_GROUP
from common.consumers import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, RelayConsumer, query_param
from common.roles import is_ops
from dispatch import events as dispatch_events
from escalation import events as escalation_events
from notifications import events as notification_events
from offers import events as offer_events
from tracking import events as tracking_events
from zones import events as zone_events


LOCATIONS_OFF = ("0", "false", "no")


class OpsConsumer(RelayConsumer):
    """`/ws/ops/`: every live event, for staff (session or `?token=`): the SPEC's "all of the
    above", each delivery's `delivery_location_updated` included, and the per-second
    `driver_positions` digest. With `?locations=0` no `delivery_location_updated` (one a fix of
    every driver on a delivery: the live map, which draws from the digest, asks for none); with
    `?positions=0` no digest (the console's lists and dashboard, which only count state changes,
    had every moved driver parsed and thrown away each second)."""

    positions_off = False

    relays = frozenset(
        dispatch_events.EVENT_TYPES + availability_events.EVENT_TYPES + offer_events.EVENT_TYPES
        + zone_events.EVENT_TYPES + escalation_events.EVENT_TYPES + tracking_events.EVENT_TYPES
        + analytics_events.EVENT_TYPES + notification_events.EVENT_TYPES
    )

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.deny(CLOSE_UNAUTHENTICATED)
            return
        if not self.allowed(user):
            await self.deny(CLOSE_FORBIDDEN)
            return
        groups = [OPS_GROUP]
        self.positions_off = query_param(self.scope, "positions") in LOCATIONS_OFF
        if query_param(self.scope, "locations") not in LOCATIONS_OFF:
            groups.append(OPS_LOCATIONS_GROUP)
        await self.join_and_accept(groups)

    def allowed(self, user) -> bool:
        return is_ops(user)

    async def dispatch(self, message):
        if self.positions_off and message.get("type") == "driver_positions":
            return
        await super().dispatch(message)

    async def delivery_locations(self, message):
        """A stream consumer's batch of `delivery_location_updated` events (OPS_LOCATIONS_GROUP):
        one frame each, as the customer gets them."""
        for event in message["event"].get("events", ()):
            await self.send_json(event)
