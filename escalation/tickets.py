"""Every write to support tickets (STYLE rule 1).

Ticket actions that do not touch the delivery (take, comment, resolve, update) lock the ticket
alone. Escalation writes tickets while holding the delivery's lock: delivery → record → ticket.
The actions that change the delivery too (redispatch, cancel delivery: `workflows.escalations`)
go through the delivery's workflows first and then record the outcome here, locking the ticket
after, so the order is never reversed.

This module knows nothing of where tickets live: the escalation services reach it through the
ticket backend (`escalation.backends.LocalTicketBackend`), never the other way round.
"""
from __future__ import annotations

from datetime import datetime

from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from audit.services import audit_record
from common.actors import Actor
from common.bidi import bidi_isolated
from common.broadcast import OPS_GROUP, broadcast_on_commit
from common.db import after_previous
from common.exceptions import Conflict, InvalidInput, NotFound
from common.roles import is_support
from dispatch.models import Delivery
from escalation import events
from escalation.events import SUPPORT_EVENTS_GROUP
from escalation.models import (
    CommentKind,
    SupportTicket,
    TicketComment,
    TicketPriority,
    TicketStatus,
)

LIVE_GROUPS = (OPS_GROUP, SUPPORT_EVENTS_GROUP)

# Audit rows for ticket actions (take, comment, redispatch, cancel, resolve, ...): one event
# type, the action in `details.action`. Not (yet) in audit.AuditEventType's choices.
TICKET_AUDIT_EVENT = "support_ticket_updated"

_UNSET = object()


class TicketHeld(Conflict):
    """A take that would take the ticket over from the agent holding it (`holder`), who took it
    after the page the take came from was shown."""

    def __init__(self, holder: str):
        self.holder = holder
        super().__init__(f"{holder} took this ticket meanwhile; reload the page to take it over.")


def _lock_ticket(ticket_id) -> SupportTicket:
    """The ticket, locked, after a key-share lock on its delivery: the lock the audit row's
    foreign key takes anyway, taken first, in the order of the workflows (delivery, then
    ticket). Taken after, an agent's resolve (ticket, then delivery) and a cancel of the
    same delivery (delivery, then ticket) deadlocked. The assignee is not joined: after a wait
    for the lock, PostgreSQL re-reads the locked row but not the joined ones, and a take
    read the assignee the other agent had just replaced."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 1 FROM {Delivery._meta.db_table} WHERE id = "
            f"(SELECT delivery_id FROM {SupportTicket._meta.db_table} WHERE id = %s) FOR KEY SHARE",
            [ticket_id],
        )
    ticket = SupportTicket.objects.select_for_update(of=("self",)).select_related("delivery").filter(pk=ticket_id).first()
    if ticket is None:
        raise NotFound("Ticket not found.")
    return ticket


def _stamped(now: datetime | None, ticket: SupportTicket) -> datetime:
    """The time of a change of the ticket just locked: the caller's or the clock's (read after
    the lock), and after the ticket's last change (a change that waited for the lock is not
    stamped before the one it waited for: "resolved" listed before the "taken" it followed)."""
    return after_previous(now or timezone.now(), ticket.updated_at)


def _name(user) -> str:
    return user.get_full_name() or user.get_username()


def _note(ticket: SupportTicket, body: str, *, now: datetime, author=None, kind: str = CommentKind.SYSTEM) -> TicketComment:
    return TicketComment.objects.create(ticket=ticket, author=author, kind=kind, body=body, created_at=now)


def _touched(ticket: SupportTicket, *, change: str, now: datetime, fields: list[str]) -> None:
    ticket.updated_at = now
    ticket.save(update_fields=[*fields, "updated_at"])
    broadcast_on_commit(
        LIVE_GROUPS, events.support_ticket_updated(ticket, seller_order_id=ticket.delivery.seller_order_id, change=change)
    )


def _audit_ticket(ticket: SupportTicket, *, action: str, actor: Actor, now: datetime, **details) -> None:
    audit_record(
        delivery=ticket.delivery, event_type=TICKET_AUDIT_EVENT, actor=actor, now=now,
        details={"ticketId": str(ticket.pk), "action": action, **details},
    )


# ---------------------------------------------------------------- written by the escalation


def ticket_create_locked(
    *, delivery, unassigned_order, type: str, priority: str, title: str, description: str, now: datetime
) -> SupportTicket:
    """Open a ticket for a delivery. The caller holds the delivery's lock; the database allows
    one ticket per unassigned-order record."""
    try:
        with transaction.atomic():
            ticket = SupportTicket.objects.create(
                delivery=delivery, unassigned_order=unassigned_order, type=type, priority=priority,
                title=title[:255], description=description, created_at=now, updated_at=now,
            )
    except IntegrityError:
        raise Conflict("This unassigned order already has a ticket.")
    broadcast_on_commit(LIVE_GROUPS, events.support_ticket_created(ticket, seller_order_id=delivery.seller_order_id))
    return ticket


@transaction.atomic
def ticket_note_add(*, ticket_id, body: str, now: datetime) -> TicketComment:
    ticket = _lock_ticket(ticket_id)
    now = _stamped(now, ticket)
    note = _note(ticket, body, now=now)
    ticket.updated_at = now
    ticket.save(update_fields=["updated_at"])  # no event of its own: the escalation that wrote it has one
    return note


@transaction.atomic
def ticket_raise_priority(*, ticket_id, priority: str, note: str, now: datetime) -> SupportTicket:
    """Escalation raised the stakes: new priority, and a finished ticket is opened again."""
    ticket = _lock_ticket(ticket_id)
    now = _stamped(now, ticket)
    fields = ["priority"]
    change = "escalated"
    ticket.priority = priority
    reopened_from = None
    if not ticket.is_active:
        reopened_from = ticket.status
        ticket.status = TicketStatus.OPEN
        ticket.resolved_at = ticket.closed_at = None
        ticket.resolution = ""  # (the old note stays in the history; the next resolve writes its own)
        fields += ["status", "resolved_at", "closed_at", "resolution"]
        change = "reopened"
        note += " Reopened: the delivery still has no driver."
        if ticket.assignee_id is not None:  # open: back in the queue for whoever takes it
            note += f" Unassigned from {_name(ticket.assignee)}."
            ticket.assignee, ticket.taken_at = None, None
            fields += ["assignee", "taken_at"]
    _note(ticket, note, now=now)
    if reopened_from is not None:  # (like every ticket action: the raise alone has escalation_critical)
        _audit_ticket(ticket, action="reopened", actor=Actor.system(), now=now, previousStatus=reopened_from,
                      priority=priority)
    _touched(ticket, change=change, now=now, fields=fields)
    return ticket


@transaction.atomic
def ticket_retitle(*, ticket_id, title: str, note: str, now: datetime) -> SupportTicket:
    """Escalation moved the ticket's record to another level: the title says the new level and
    the note (its history) says the move."""
    ticket = _lock_ticket(ticket_id)
    now = _stamped(now, ticket)
    ticket.title = title[:255]
    _note(ticket, note, now=now)
    _touched(ticket, change="escalated", now=now, fields=["title"])
    return ticket


@transaction.atomic
def ticket_finish(*, ticket_id, status: str, resolution: str, actor: Actor, now: datetime) -> SupportTicket:
    """Resolve or close a ticket because of what happened to its delivery (assigned,
    cancelled). Already finished that way: left alone."""
    ticket = _lock_ticket(ticket_id)
    now = _stamped(now, ticket)
    if ticket.status == status or ticket.status == TicketStatus.CLOSED:
        return ticket
    ticket.status = status
    fields = ["status"]
    if status == TicketStatus.CLOSED:
        ticket.closed_at = now
        fields.append("closed_at")
    else:
        ticket.resolved_at = now
        fields.append("resolved_at")
    if not ticket.resolution:
        ticket.resolution = resolution
        fields.append("resolution")
    _note(ticket, f"{status.capitalize()} automatically: {resolution}", now=now)
    _audit_ticket(ticket, action=status, actor=actor, now=now, resolution=resolution)
    _touched(ticket, change=status, now=now, fields=fields)
    return ticket


# ------------------------------------------------------------------------ support agents


@transaction.atomic
def ticket_take(*, ticket_id, user, actor: Actor, now: datetime | None = None, seen_assignee_id=_UNSET) -> SupportTicket:
    """An agent takes the ticket: assigned to them, in progress. `seen_assignee_id`: who held
    it on the page the agent pressed Take on (None: nobody); if another agent took it since,
    nothing changes (409), and the page, reloaded, offers to take it over."""
    ticket = _lock_ticket(ticket_id)
    now = _stamped(now, ticket)
    if not ticket.is_active:
        raise Conflict(f"Ticket is {ticket.status}; it can no longer be taken.")
    if ticket.assignee_id == user.pk and ticket.status == TicketStatus.IN_PROGRESS:
        return ticket
    if seen_assignee_id is not _UNSET and ticket.assignee_id is not None and ticket.assignee_id != user.pk \
            and str(ticket.assignee_id) != str(seen_assignee_id or ""):  # (released meanwhile: free to take)
        raise TicketHeld(_name(ticket.assignee))
    previous = ticket.assignee
    ticket.assignee = user
    ticket.status = TicketStatus.IN_PROGRESS
    ticket.taken_at = now
    text = f"Taken by {_name(user)}" + (f" (over from {_name(previous)})" if previous and previous.pk != user.pk else "") + "."
    _note(ticket, text, now=now)
    _audit_ticket(ticket, action="taken", actor=actor, now=now,
                  assigneeId=str(user.pk), previousAssigneeId=str(previous.pk) if previous else None)
    _touched(ticket, change="taken", now=now, fields=["assignee", "status", "taken_at"])
    return ticket


@transaction.atomic
def ticket_comment(*, ticket_id, user, actor: Actor, body: str, now: datetime | None = None) -> TicketComment:
    body = (body or "").strip()
    if not body:
        raise InvalidInput({"body": ["A comment cannot be empty."]})
    ticket = _lock_ticket(ticket_id)
    if ticket.status == TicketStatus.CLOSED:  # (it was taken: "closed is final" held for every change but this)
        raise Conflict("Ticket is closed; a closed ticket is final.")
    now = _stamped(now, ticket)
    comment = _note(ticket, body, now=now, author=user, kind=CommentKind.COMMENT)
    _audit_ticket(ticket, action="commented", actor=actor, now=now, commentId=str(comment.pk))
    _touched(ticket, change="commented", now=now, fields=[])
    return comment


@transaction.atomic
def ticket_resolve(*, ticket_id, user, actor: Actor, resolution: str, now: datetime | None = None) -> SupportTicket:
    """The agent resolves the ticket with a resolution note."""
    ticket = _lock_ticket(ticket_id)
    if not ticket.is_active:
        raise Conflict(f"Ticket is already {ticket.status}.")
    return ticket_update(ticket_id=ticket_id, user=user, actor=actor, status=TicketStatus.RESOLVED,
                         resolution=resolution, now=now)


# Status changes a person may make (the system may also reopen a finished ticket on escalation).
TRANSITIONS = {
    TicketStatus.OPEN: {TicketStatus.IN_PROGRESS, TicketStatus.RESOLVED, TicketStatus.CLOSED},
    TicketStatus.IN_PROGRESS: {TicketStatus.OPEN, TicketStatus.RESOLVED, TicketStatus.CLOSED},
    TicketStatus.RESOLVED: {TicketStatus.OPEN, TicketStatus.IN_PROGRESS, TicketStatus.CLOSED},
    TicketStatus.CLOSED: set(),
}


@transaction.atomic
def ticket_update(
    *, ticket_id, user, actor: Actor, status=_UNSET, priority=_UNSET, assignee_id=_UNSET, resolution=_UNSET,
    now: datetime | None = None,
) -> SupportTicket:
    """Change a ticket's status, priority, assignee or resolution (PATCH, and the resolve
    action). Finishing a ticket (resolved/closed) needs a resolution note; a closed ticket
    is final (409)."""
    ticket = _lock_ticket(ticket_id)
    now = _stamped(now, ticket)
    was = ticket.status
    fields: list[str] = []
    changes: dict = {}
    notes: list[str] = []

    if status is not _UNSET and status == was and status in (TicketStatus.RESOLVED, TicketStatus.CLOSED):
        # (with another note too: a second agent's resolve replaced the first one's note)
        raise Conflict(f"Ticket is already {was}.")
    if resolution is not _UNSET:
        resolution = (resolution or "").strip()
        if resolution != ticket.resolution:
            ticket.resolution = resolution
            fields.append("resolution")
            changes["resolution"] = resolution
    if priority is not _UNSET and priority != ticket.priority:
        if priority not in TicketPriority.values:
            raise InvalidInput({"priority": [f"Must be one of {', '.join(TicketPriority.values)}."]})
        notes.append(f"Priority {ticket.priority} → {priority}.")
        changes["priority"] = [ticket.priority, priority]
        ticket.priority = priority
        fields.append("priority")
    if assignee_id is not _UNSET and str(assignee_id or "") != str(ticket.assignee_id or ""):
        assignee = get_user_model().objects.filter(pk=assignee_id).first() if assignee_id else None
        if assignee_id and (assignee is None or not (assignee.is_active and is_support(assignee))):
            raise InvalidInput({"assigneeId": ["Must be an active support agent or staff user."]})
        notes.append(f"Assigned to {_name(assignee)}." if assignee else "Unassigned.")
        changes["assigneeId"] = str(assignee.pk) if assignee else None
        # (taken by the new holder now: it kept the first holder's time through reassigns)
        ticket.assignee, ticket.taken_at = assignee, (now if assignee is not None else None)
        fields += ["assignee", "taken_at"]
        if assignee is not None and ticket.status == TicketStatus.OPEN and status is _UNSET:
            status = TicketStatus.IN_PROGRESS
        if assignee is None and ticket.status == TicketStatus.IN_PROGRESS and status is _UNSET:
            status = TicketStatus.OPEN  # (held by nobody: back in the queue)
    if (status == TicketStatus.IN_PROGRESS and ticket.assignee_id is None and assignee_id is _UNSET
            and ticket.status != TicketStatus.IN_PROGRESS and user is not None):
        # In progress is someone's: the one who puts it there works it (it was "in progress ·
        # nobody", listed among the unassigned; an audit)
        notes.append(f"Assigned to {_name(user)}.")
        changes["assigneeId"] = str(user.pk)
        ticket.assignee, ticket.taken_at = user, now
        fields += ["assignee", "taken_at"]
    change = "updated"
    if status is not _UNSET and status != ticket.status:
        if status not in TicketStatus.values:
            raise InvalidInput({"status": [f"Must be one of {', '.join(TicketStatus.values)}."]})
        if status not in TRANSITIONS[ticket.status]:
            raise Conflict(f"Ticket is {ticket.status}; it cannot become {status}.")
        if status in (TicketStatus.RESOLVED, TicketStatus.CLOSED) and not ticket.resolution:
            raise InvalidInput({"resolution": ["A resolution note is required to resolve or close a ticket."]})
        changes["status"] = [ticket.status, status]
        notes.append(f"{status.replace('_', ' ').capitalize()} by {_name(user)}"
                     + (f": {ticket.resolution}" if status in (TicketStatus.RESOLVED, TicketStatus.CLOSED) else "."))
        if status == TicketStatus.RESOLVED:
            ticket.resolved_at = now
            fields.append("resolved_at")
            change = "resolved"
        elif status == TicketStatus.CLOSED:
            ticket.closed_at = now
            fields.append("closed_at")
            change = "closed"
        else:
            if ticket.status in (TicketStatus.RESOLVED,):
                ticket.resolved_at = None
                fields.append("resolved_at")
                change = "reopened"
                if "resolution" not in changes:  # the next resolve needs its own note (this one stays in the notes)
                    ticket.resolution = ""
                    fields.append("resolution")
            if status == TicketStatus.OPEN and ticket.assignee_id is not None and assignee_id is _UNSET:
                # open is the queue's: a ticket released or reopened is held by nobody (it kept
                # its assignee, and the queue showed an open ticket someone held)
                notes.append(f"Unassigned from {_name(ticket.assignee)}.")
                changes["assigneeId"] = None
                ticket.assignee, ticket.taken_at = None, None
                fields += ["assignee", "taken_at"]
            elif status == TicketStatus.OPEN and ticket.assignee_id is None and ticket.taken_at is not None:
                ticket.taken_at = None  # (nobody holds it)
                fields.append("taken_at")
            if status == TicketStatus.IN_PROGRESS and ticket.taken_at is None:
                ticket.taken_at = now
                fields.append("taken_at")
        ticket.status = status
        fields.append("status")
    if not fields:
        return ticket
    if was == TicketStatus.CLOSED:
        raise Conflict("Ticket is closed; a closed ticket is final.")
    if ("resolution" in changes or "status" in changes) and ticket.status in (TicketStatus.RESOLVED, TicketStatus.CLOSED) \
            and not ticket.resolution:
        raise InvalidInput({"resolution": ["A resolved or closed ticket keeps a resolution note."]})
    if ("status" in changes or "assigneeId" in changes) and ticket.status == TicketStatus.IN_PROGRESS \
            and ticket.assignee_id is None:  # (`assigneeId: null` with it, or on one in progress)
        raise InvalidInput({"assigneeId": ["An in-progress ticket is someone's: name who works it, or put it back open."]})
    if notes:
        _note(ticket, " ".join(notes), now=now)
    _audit_ticket(ticket, action=change, actor=actor, now=now, changes=changes)
    _touched(ticket, change=change, now=now, fields=fields)
    return ticket


# ------------------------------------- outcomes of the cross-app actions (workflows.escalations)


@transaction.atomic
def ticket_redispatched(
    *, ticket_id, user, actor: Actor, radius_km: float, outcome: str, offer, failure_reason: str | None,
    now: datetime,
) -> SupportTicket:
    """An agent dispatched the ticket's delivery again (already done by the caller): note the
    outcome on the ticket, audit it and tell the live queue."""
    ticket = _lock_ticket(ticket_id)
    if ticket.status == TicketStatus.CLOSED:  # (closed since the caller looked: its transaction rolls the dispatch back)
        raise Conflict("Ticket is closed; a closed ticket is final.")
    now = _stamped(now, ticket)
    found = f"offered to {bidi_isolated(offer.driver.name)}" if offer is not None else f"nobody found ({failure_reason})"
    _note(ticket, f"Redispatched within {radius_km:g} km by {_name(user)}: {found}.", now=now)
    _audit_ticket(
        ticket, action="redispatched", actor=actor, now=now, searchRadiusKm=radius_km, outcome=outcome,
        offerId=str(offer.pk) if offer else None,
        driverId=str(offer.driver_id) if offer else None,
    )
    _touched(ticket, change="redispatched", now=now, fields=[])
    return ticket


@transaction.atomic
def ticket_delivery_cancelled(*, ticket_id, user, actor: Actor, reason: str, now: datetime) -> SupportTicket:
    """An agent cancelled the ticket's delivery (already done by the caller): the ticket is
    closed with the agent's reason as its resolution, after any note already there (a resolved
    ticket's, or a draft: the cancel replaced it, and the agent's note was then only in the
    audit trail)."""
    ticket = _lock_ticket(ticket_id)
    now = _stamped(now, ticket)
    text = f"Delivery cancelled by {_name(user)}: {reason}"
    fields = []
    if ticket.status != TicketStatus.CLOSED:
        ticket.status = TicketStatus.CLOSED
        ticket.closed_at = now
        ticket.resolution = f"{ticket.resolution}\n{text}" if ticket.resolution else text
        fields += ["status", "closed_at", "resolution"]
    # (a closed ticket is final: it keeps its resolution, and the cancel goes in its history)
    _note(ticket, text, now=now)
    _audit_ticket(ticket, action="delivery_cancelled", actor=actor, now=now, reason=reason)
    _touched(ticket, change="closed" if fields else "updated", now=now, fields=fields)
    return ticket
