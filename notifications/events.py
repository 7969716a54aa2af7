"""Live events of customers' messages, for `/ws/ops/` and the driver of the delivery."""

from typing import Literal, TypedDict

from common.errors import iso


class CustomerRepliedEvent(TypedDict):
    """A customer texted our number back (not a keyword): ops see it, and so does the driver
    who has the delivery (also as a push notice), so "leave it at the door" reaches the door."""

    type: Literal["customer_replied"]
    replyId: str
    deliveryId: str | None  # None: the number had no text from us
    sellerOrderId: str | None
    driverId: str | None  # the driver who has the delivery now (None: nobody, or it is over)
    channel: str
    body: str
    receivedAt: str


def customer_replied(reply, *, delivery, driver_id) -> CustomerRepliedEvent:
    return {
        "type": "customer_replied",
        "replyId": str(reply.pk),
        "deliveryId": str(delivery.pk) if delivery else None,
        "sellerOrderId": delivery.seller_order_id if delivery else None,
        "driverId": str(driver_id) if driver_id else None,
        "channel": reply.channel,
        "body": reply.body,
        "receivedAt": iso(reply.received_at),
    }


EVENT_TYPES = ("customer_replied",)
