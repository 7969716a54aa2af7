"""Live events of escalation and support (seed: Escalation Events), as TypedDicts.

They go to `/ws/ops/` (group `ops`) and to the support agents' socket `/ws/support/`
(group `support`). `support_ticket_updated` is not in the seed: it lets the support queue
refresh live when a ticket is taken, commented, escalated, resolved or closed.
"""
from typing import Literal, NotRequired, TypedDict

from common.errors import iso

SUPPORT_EVENTS_GROUP = "support"


class UnassignedOrderEscalatedEvent(TypedDict):
    type: Literal["unassigned_order_escalated"]
    deliveryId: str
    sellerOrderId: str
    level: int
    reason: str
    escalatedAt: str
    supportTicketId: NotRequired[str]


class SupportTicketCreatedEvent(TypedDict):
    type: Literal["support_ticket_created"]
    ticketId: str
    deliveryId: str
    sellerOrderId: str
    priority: str
    title: str
    description: str
    createdAt: str


class SupportTicketUpdatedEvent(TypedDict):
    type: Literal["support_ticket_updated"]
    ticketId: str
    deliveryId: str
    sellerOrderId: str
    status: str
    priority: str
    assigneeId: str | None
    change: str  # taken, commented, updated, escalated, redispatched, resolved, closed, reopened
    updatedAt: str


def unassigned_order_escalated(record, *, level: int, reason: str, escalated_at) -> UnassignedOrderEscalatedEvent:
    event: UnassignedOrderEscalatedEvent = {
        "type": "unassigned_order_escalated",
        "deliveryId": str(record.delivery_id),
        "sellerOrderId": record.seller_order_id,
        "level": level,
        "reason": reason,
        "escalatedAt": iso(escalated_at),
    }
    if record.support_ticket_id:
        event["supportTicketId"] = record.support_ticket_id
    return event


def support_ticket_created(ticket, *, seller_order_id: str) -> SupportTicketCreatedEvent:
    return {
        "type": "support_ticket_created",
        "ticketId": str(ticket.pk),
        "deliveryId": str(ticket.delivery_id),
        "sellerOrderId": seller_order_id,
        "priority": ticket.priority,
        "title": ticket.title,
        "description": ticket.description,
        "createdAt": iso(ticket.created_at),
    }


def support_ticket_updated(ticket, *, seller_order_id: str, change: str) -> SupportTicketUpdatedEvent:
    return {
        "type": "support_ticket_updated",
        "ticketId": str(ticket.pk),
        "deliveryId": str(ticket.delivery_id),
        "sellerOrderId": seller_order_id,
        "status": ticket.status,
        "priority": ticket.priority,
        "assigneeId": str(ticket.assignee_id) if ticket.assignee_id else None,
        "change": change,
        "updatedAt": iso(ticket.updated_at),
    }


EVENT_TYPES = ("unassigned_order_escalated", "support_ticket_created", "support_ticket_updated")
