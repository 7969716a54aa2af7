"""Escalation and ticket events on `/ws/ops/` and `/ws/support/` (real Redis channel layer)."""
from datetime import timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from common.actors import Actor
from config.asgi import application
from workflows.dispatching import delivery_dispatch
from escalation import events as ev
from escalation.models import SupportTicket
from escalation.tickets import ticket_take
from workflows.escalations import escalation_check
from tests.factories import DeliveryFactory, DriverFactory, OpsUserFactory, SupportUserFactory
from tests.typecheck import assert_event_shape
from tests.sockets import refusal
from tests.api import token_for

pytestmark = pytest.mark.django_db(transaction=True)


def stuck_delivery_ready_for(minutes):
    with time_machine.travel(timezone.now() - timedelta(minutes=minutes), tick=False):
        delivery = DeliveryFactory()
        delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    return delivery


async def receive_types(comm, n):
    return {e["type"]: e for e in [await comm.receive_json_from(timeout=5) for _ in range(n)]}


def test_ops_and_support_sockets_get_the_escalation_and_ticket_events():
    staff = OpsUserFactory()
    agent = SupportUserFactory()
    actor = Actor.for_user(agent)
    delivery = stuck_delivery_ready_for(6)

    async def scenario():
        ops = WebsocketCommunicator(application, f"/ws/ops/?token={token_for(staff)}")
        support = WebsocketCommunicator(application, f"/ws/support/?token={token_for(agent)}")
        assert (await ops.connect())[0] and (await support.connect())[0]

        await database_sync_to_async(escalation_check)()
        for comm in (ops, support):
            got = await receive_types(comm, 2)
            assert set(got) == {"support_ticket_created", "unassigned_order_escalated"}
            assert_event_shape(got["support_ticket_created"], ev.SupportTicketCreatedEvent)
            assert_event_shape(got["unassigned_order_escalated"], ev.UnassignedOrderEscalatedEvent)
            assert got["unassigned_order_escalated"]["deliveryId"] == str(delivery.pk)
            assert got["unassigned_order_escalated"]["level"] == 1

        ticket = await database_sync_to_async(SupportTicket.objects.get)()
        await database_sync_to_async(ticket_take)(ticket_id=ticket.pk, user=agent, actor=actor)
        for comm in (ops, support):
            updated = await comm.receive_json_from(timeout=5)
            assert_event_shape(updated, ev.SupportTicketUpdatedEvent)
            assert (updated["change"], updated["status"], updated["assigneeId"]) == ("taken", "in_progress", str(agent.pk))
        # the support socket carries only support events: not the delivery/offer traffic
        assert await support.receive_nothing(timeout=0.3)
        await ops.disconnect()
        await support.disconnect()

    async_to_sync(scenario)()


def test_the_support_socket_is_for_support_agents_and_staff_only():
    driver = DriverFactory()
    staff = OpsUserFactory()

    async def scenario():
        anon = WebsocketCommunicator(application, "/ws/support/")
        assert await refusal(anon) == 4401

        as_driver = WebsocketCommunicator(application, f"/ws/support/?token={token_for(driver.user)}")
        assert await refusal(as_driver) == 4403

        as_staff = WebsocketCommunicator(application, f"/ws/support/?token={token_for(staff)}")
        connected, _ = await as_staff.connect(timeout=10)
        assert connected
        await as_staff.disconnect()

        # a support agent without staff may not use the ops socket
        agent = await database_sync_to_async(SupportUserFactory)()
        ops = WebsocketCommunicator(application, f"/ws/ops/?token={token_for(agent)}")
        assert await refusal(ops) == 4403

    async_to_sync(scenario)()


def test_a_manual_escalation_to_level_3_announces_the_ticket_once():
    """Level 3 raises the ticket's priority and retitles it: two steps, one ticket state. The
    support queue got the same `support_ticket_updated` twice; identical events of one
    transaction now go once."""
    from workflows.escalations import unassigned_escalate

    staff = OpsUserFactory()
    agent = SupportUserFactory()
    stuck_delivery_ready_for(6)
    escalation_check()  # level 1: the ticket
    record = SupportTicket.objects.get().unassigned_order

    async def scenario():
        support = WebsocketCommunicator(application, f"/ws/support/?token={token_for(agent)}")
        assert (await support.connect())[0]
        await database_sync_to_async(unassigned_escalate)(
            record_id=record.pk, level=3, reason="VIP order", actor=Actor.for_user(staff), user=staff,
        )
        got = []
        while not await support.receive_nothing(timeout=0.5):
            got.append(await support.receive_json_from(timeout=5))
        updates = [e for e in got if e["type"] == "support_ticket_updated"]
        assert [(e["priority"], e["change"]) for e in updates] == [("urgent", "escalated")], got
        assert [e["type"] for e in got].count("unassigned_order_escalated") == 1
        await support.disconnect()

    async_to_sync(scenario)()
