from __future__ import annotations

from channels.db import database_sync_to_async

from common.broadcast import TRACKING_LAYER, delivery_group
from common.consumers import CLOSE_UNAUTHENTICATED, RelayConsumer, query_param
from dispatch.models import DeliveryStatus
from tracking import selectors


class TrackingConsumer(RelayConsumer):
    """`/ws/track/<deliveryId>/?token=<trackingToken>`: one customer watching one delivery.

    A bad link closes with 4401 (no hint). On connect: a `delivery_snapshot` (the status
    endpoint's body); then `delivery_location_updated` and `delivery_eta_updated` as relayed,
    and on every status change a fresh `delivery_status_updated` (the status body again, read
    after the change committed, so nothing internal such as driver ids or ops' reasons reaches
    the customer). After a final status (delivered, failed, cancelled) it closes itself (1000).
    Only event types with a handler here reach a customer; anything else sent to the group is
    dropped.

    Each change's message has that change's status, not whatever the row says when this socket
    reads it: a delivery walked through its steps in quick succession (or a socket among
    hundreds, reading late) read the last status for every change, and the customer saw
    pending, in transit twice, delivered. A message whose status is the one last sent, or one
    before it in the delivery's course, is not sent (a change the snapshot already showed: each
    change moves the status on), except `pending` again (ops took the delivery from its driver)."""

    channel_layer_alias = TRACKING_LAYER  # Redis pub/sub: see settings.CHANNEL_LAYERS
    finished = False
    shown = None  # the status of the last message sent

    async def connect(self):
        delivery_id = self.scope["url_route"]["kwargs"]["delivery_id"]
        delivery = await database_sync_to_async(selectors.delivery_for_tracking_link)(
            delivery_id=delivery_id, token=query_param(self.scope, "token")
        )
        if delivery is None:
            await self.deny(CLOSE_UNAUTHENTICATED)
            return
        self.delivery_id = delivery.pk
        # Join first, then read: a change committed in between is sent after the snapshot.
        if await self.join_and_accept([delivery_group(delivery.pk)], credential=f"delivery:{delivery.pk}"):
            await self._send_status("delivery_snapshot")

    async def dispatch(self, message):
        # Location and ETA are pure relays (no database: no per-message thread hop), but
        # nothing more reaches a customer once the delivery is finished.
        if message.get("type") in ("delivery_location_updated", "delivery_eta_updated"):
            if not self.finished:
                await self.send_json(message["event"])
            return
        await super().dispatch(message)

    async def _send_status(self, kind: str, *, status: str | None = None) -> None:
        if self.finished:
            return
        body = await database_sync_to_async(selectors.tracking_update_for)(self.delivery_id, kind=kind, status=status)
        if body is None or (status is not None and not _moves_on(self.shown, body["status"])):
            return
        self.shown = body["status"]
        await self.send_json(body)
        if body["status"] in selectors.FINAL_STATUSES:
            self.finished = True
            await self.close(code=1000)

    async def delivery_status_changed(self, message):
        await self._send_status("delivery_status_updated", status=(message.get("event") or {}).get("status"))

    async def delivery_cancelled(self, message):
        await self._send_status("delivery_status_updated", status=DeliveryStatus.CANCELLED)


# A delivery's course as its customer sees it (selectors.customer_status); a reassign takes it
# back to pending, any other change moves it on.
_COURSE = {"pending": 0, "assigned": 1, "picked_up": 2, "in_transit": 3}


def _moves_on(shown: str | None, status: str) -> bool:
    if shown is None or status == "pending":
        return status != shown
    return _COURSE.get(status, len(_COURSE)) > _COURSE.get(shown, len(_COURSE))
