"""Shared by the support API and support view tests."""
from datetime import timedelta

import time_machine
from django.utils import timezone

from common.actors import Actor
from workflows.dispatching import delivery_dispatch
from escalation.models import SupportTicket
from workflows.escalations import escalation_check
from tests.factories import DeliveryFactory


def ticket_for(minutes_waiting=6, **kwargs) -> SupportTicket:
    """A stuck delivery, escalated by the check `minutes_waiting` after it became ready."""
    ready = timezone.now() - timedelta(minutes=minutes_waiting)
    with time_machine.travel(ready, tick=False):
        delivery = DeliveryFactory(**kwargs)
        delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    escalation_check()
    return SupportTicket.objects.get(delivery=delivery)
