"""Where support tickets live: a small interface, chosen by `SUPPORT_TICKET_BACKEND`.

The default, `LocalTicketBackend`, keeps tickets in this project (`SupportTicket`, worked in
the `/support/` views). An external helpdesk can be plugged in by implementing the same five
methods and pointing the setting at it.

The escalation services and workflow (`escalation.services`, `workflows.escalations`) call
the backend inside their transaction, while holding the delivery's row lock, and store the id
it returns on the unassigned-order record. A backend must therefore not block on the network:
one that talks to an outside system should record what it has to send and send it after
commit (e.g. `common.broadcast.enqueue_task_on_commit` with a Celery task that retries), returning
its own reference at once.
"""
from __future__ import annotations

from datetime import datetime
from typing import Protocol

from django.conf import settings
from django.utils.module_loading import import_string

from common.actors import Actor
from escalation import tickets


class TicketBackend(Protocol):
    def open_ticket(
        self, *, delivery, unassigned_order, type: str, priority: str, title: str, description: str, now: datetime
    ) -> str:
        """Open a ticket; returns its id (stored as the record's `supportTicketId`)."""

    def add_note(self, *, ticket_id: str, body: str, now: datetime) -> None:
        """Append a system note (an escalation step, a redispatch result, ...)."""

    def raise_priority(self, *, ticket_id: str, priority: str, note: str, now: datetime) -> None:
        """Raise the priority (level 3: urgent); a resolved or closed ticket is reopened."""

    def retitle_ticket(self, *, ticket_id: str, title: str, note: str, now: datetime) -> None:
        """The record went to another escalation level: a title naming the new level, and a
        note of the move in the ticket's history."""

    def close_ticket(self, *, ticket_id: str, status: str, resolution: str, actor: Actor, now: datetime) -> None:
        """Finish the ticket as `resolved` (the delivery got a driver) or `closed` (it was
        cancelled). A ticket already finished that way is left alone."""


class LocalTicketBackend:
    """Tickets in this project's database (`escalation.models.SupportTicket`, written by
    `escalation.tickets`, which never imports this module: no cycle)."""

    def open_ticket(self, *, delivery, unassigned_order, type, priority, title, description, now) -> str:
        ticket = tickets.ticket_create_locked(
            delivery=delivery, unassigned_order=unassigned_order, type=type, priority=priority,
            title=title, description=description, now=now,
        )
        return str(ticket.pk)

    def add_note(self, *, ticket_id, body, now) -> None:
        tickets.ticket_note_add(ticket_id=ticket_id, body=body, now=now)

    def raise_priority(self, *, ticket_id, priority, note, now) -> None:
        tickets.ticket_raise_priority(ticket_id=ticket_id, priority=priority, note=note, now=now)

    def retitle_ticket(self, *, ticket_id, title, note, now) -> None:
        tickets.ticket_retitle(ticket_id=ticket_id, title=title, note=note, now=now)

    def close_ticket(self, *, ticket_id, status, resolution, actor, now) -> None:
        tickets.ticket_finish(ticket_id=ticket_id, status=status, resolution=resolution, actor=actor, now=now)


def get_ticket_backend() -> TicketBackend:
    return import_string(settings.SUPPORT_TICKET_BACKEND)()
