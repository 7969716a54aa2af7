"""Messages to the customer: an SMS (through a local server answering like Twilio's Messages
API) and an e-mail (through a real SMTP server, aiosmtpd) on assignment with the tracking link,
when the driver is arriving, on delivery and on failure; in the delivery's language; at most
once per delivery and kind; each recorded."""
from __future__ import annotations

import base64
import email
import threading
from datetime import timedelta
from urllib.parse import parse_qs

import pytest
import time_machine
from django.db import connection
from django.test import Client
from django.utils import timezone

from common.actors import Actor
from notifications import customers, services
from notifications.models import CustomerMessage, OutboxEvent
from notifications.outbox import outbox_write
from tests.api import assert_error, client_for
from tests.factories import (
    CITY, DeliveryFactory, IntegrationUserFactory, OpsUserFactory, driver_at_dropoff, online_driver, point,
)
from tests.notifications.receiver import Answer
from tracking import events as tracking_events
from workflows import deliveries as flows

pytestmark = pytest.mark.django_db(transaction=True)

PHONE = "+14155552671"


def _delivery(**extra):
    return DeliveryFactory(customer_phone=PHONE, customer_email="jane@example.com", customer_name="Jane", **extra)


def _sms(request) -> dict:
    return {k: v[0] for k, v in parse_qs(request.body.decode()).items()}


def _mails(received):
    return [email.message_from_bytes(e.content) for e in received]


def test_on_assignment_the_customer_gets_an_sms_and_an_email_with_the_tracking_link(smtp_server, twilio):
    delivery = _delivery()
    driver = online_driver(name="Ravi Kumar")
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())

    (sms,) = twilio.requests
    assert sms.path == "/2010-04-01/Accounts/AC123/Messages.json"
    assert sms.headers["authorization"] == "Basic " + base64.b64encode(b"AC123:secret-token").decode()
    form = _sms(sms)
    assert form["To"] == PHONE and form["From"] == "+15005550006"
    assert delivery.tracking_url in form["Body"] and "Ravi" in form["Body"] and "Kumar" not in form["Body"]

    (mail,) = _mails(smtp_server)
    assert smtp_server[0].rcpt_tos == ["jane@example.com"]
    assert delivery.seller_order_id in mail["Subject"]
    assert delivery.tracking_url in mail.get_payload(decode=True).decode()

    by_channel = {m.channel: m for m in CustomerMessage.objects.filter(delivery=delivery)}
    assert by_channel["sms"].status == "sent" and by_channel["sms"].provider_id == "SM00000000000000000000000000000001"
    assert by_channel["sms"].template == "notifications/customer/en/assigned.sms.txt"
    assert by_channel["email"].status == "sent" and by_channel["email"].provider_id == mail["Message-ID"]


def test_delivered_and_failed_messages_and_each_only_once(smtp_server, twilio):
    done, failed = _delivery(), _delivery()
    for delivery, last in ((done, "delivery-completed"), (failed, "delivery-failed")):
        driver = online_driver()
        flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        for step in ("pickup-started", "pickup-completed", "delivery-started", last):
            if step == "delivery-completed":
                driver_at_dropoff(driver, delivery)
            flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user),
                                   reason="customer not home" if last == "delivery-failed" and step == last else "")
    kinds = sorted((m.delivery_id == done.pk, m.kind, m.channel) for m in CustomerMessage.objects.filter(status="sent"))
    assert kinds == sorted([(True, k, c) for k in ("assigned", "delivered") for c in ("sms", "email")]
                           + [(False, k, c) for k in ("assigned", "failed") for c in ("sms", "email")])
    assert "customer not home" in [_sms(r)["Body"] for r in twilio.requests][-1]
    sent = (len(twilio.requests), len(smtp_server))

    # the same events fanned out again (a replayed sweep): no second message
    OutboxEvent.objects.update(fanned_out_at=None)
    services.webhooks_deliver_due(max_seconds=10)
    customers.customer_messages_send_due()
    assert (len(twilio.requests), len(smtp_server)) == sent == (4, 4)


@pytest.mark.parametrize("policy", ["code", "code_or_photo"])
def test_the_customer_is_sent_the_handoff_code_with_the_assignment(smtp_server, twilio, policy):
    delivery = _delivery(proof_required=policy)
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())

    assert f"Handoff code: {delivery.handoff_code}." in _sms(twilio.requests[0])["Body"]
    assert f"Your handoff code is {delivery.handoff_code}" in _mails(smtp_server)[0].get_payload(decode=True).decode()


def test_no_code_is_sent_for_policies_that_do_not_take_one(smtp_server, twilio):
    for policy in ("none", "photo", "signature"):
        flows.assignment_create(delivery_id=_delivery(proof_required=policy).pk, driver_id=online_driver().pk, actor=Actor.system())

    assert len(twilio.requests) == 3 and len(smtp_server) == 3
    assert not any("code" in _sms(r)["Body"].lower() for r in twilio.requests)
    assert not any("code" in m.get_payload(decode=True).decode().lower() for m in _mails(smtp_server))


def test_the_spanish_message_carries_the_code_too(smtp_server, twilio):
    delivery = _delivery(proof_required="code", customer_language="es")
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())

    assert f"Código de entrega: {delivery.handoff_code}." in _sms(twilio.requests[0])["Body"]


def test_messages_in_the_customers_language(smtp_server, twilio):
    delivery = _delivery(customer_language="es-MX")
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    assert "va en camino" in _sms(twilio.requests[0])["Body"]
    assert "tiene repartidor" in _mails(smtp_server)[0]["Subject"]
    assert CustomerMessage.objects.get(delivery=delivery, channel="sms").template == "notifications/customer/es/assigned.sms.txt"


def test_a_number_that_is_not_valid_is_recorded_and_not_sent(twilio):
    delivery = DeliveryFactory(customer_phone="+15550001234")  # 555: not a valid US number
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    (message,) = CustomerMessage.objects.filter(delivery=delivery)
    assert (message.status, message.error) == ("skipped", "not a valid phone number")
    assert twilio.requests == []


def test_a_refused_number_is_not_retried_and_a_provider_outage_is(twilio):
    refused, retried = DeliveryFactory(customer_phone=PHONE), DeliveryFactory(customer_phone="+14155552672")
    twilio.answer(Answer(400, {"Content-Type": "application/json"}, b'{"code": 21211, "message": "Invalid To Phone Number", "status": 400}'))
    flows.assignment_create(delivery_id=refused.pk, driver_id=online_driver().pk, actor=Actor.system())
    message = CustomerMessage.objects.get(delivery=refused)
    assert message.status == "failed" and "21211" in message.error

    twilio.answer(Answer(503))
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        flows.assignment_create(delivery_id=retried.pk, driver_id=online_driver().pk, actor=Actor.system())
    message = CustomerMessage.objects.get(delivery=retried)
    assert message.status == "pending" and message.next_attempt_at == start + timedelta(seconds=30)
    with time_machine.travel(start + timedelta(seconds=29), tick=False):
        assert customers.customer_messages_send_due() == 0
    with time_machine.travel(start + timedelta(seconds=31), tick=False):
        assert customers.customer_messages_send_due() == 1
    message.refresh_from_db()
    assert (message.status, message.attempts) == ("sent", 2)
    assert [_sms(r)["To"] for r in twilio.requests] == [PHONE, "+14155552672", "+14155552672"]


def test_a_send_whose_outcome_is_unknown_is_never_repeated(twilio, settings):
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.3
    twilio.answer(Answer(201, delay=1.0))
    delivery = DeliveryFactory(customer_phone=PHONE)
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    message = CustomerMessage.objects.get(delivery=delivery)
    assert message.status == "failed" and message.error.startswith("outcome unknown")
    with time_machine.travel(timezone.now() + timedelta(hours=1), tick=False):
        assert customers.customer_messages_send_due() == 0
    assert len(twilio.requests) == 1


def test_the_arriving_message_goes_once_when_the_driver_is_within_500_m(twilio):
    delivery = _delivery()
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in ("pickup-started", "pickup-completed", "delivery-started"):
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user))
    now = timezone.now()

    def eta_event_with_driver_at(lat, lon, at):
        type(driver).objects.filter(pk=driver.pk).update(location=point(lat, lon))
        with time_machine.travel(at, tick=False):
            outbox_write([tracking_events.delivery_eta_updated(
                delivery_id=delivery.pk, pickup_at=at, delivery_at=at, confidence=0.9, calculated_at=at)])
            services.webhooks_deliver_due(max_seconds=10)

    drop = delivery.dropoff_location
    eta_event_with_driver_at(drop.y - 0.02, drop.x, now + timedelta(minutes=1))  # ~2.2 km away
    assert not CustomerMessage.objects.filter(delivery=delivery, kind="arriving").exists()
    eta_event_with_driver_at(drop.y - 0.003, drop.x, now + timedelta(minutes=3))  # ~330 m
    eta_event_with_driver_at(drop.y - 0.001, drop.x, now + timedelta(minutes=5))
    (arriving,) = CustomerMessage.objects.filter(delivery=delivery, kind="arriving", channel="sms")
    assert arriving.status == "sent" and "almost there" in _sms(twilio.requests[-1])["Body"]
    assert sum("almost there" in _sms(r)["Body"] for r in twilio.requests) == 1


def test_the_delivery_api_takes_an_email_and_a_language_and_stores_the_phone_as_e164(db):
    merchant = IntegrationUserFactory()
    body = {"sellerOrderId": "ORD-CUST-1", "storeName": "Corner Shop", "autoDispatch": False,
            "pickupLocation": {"lat": CITY[0], "lon": CITY[1]}, "dropoffLocation": {"lat": CITY[0] + 0.01, "lon": CITY[1]},
            "customerPhone": "+1 (415) 555-2671", "customerEmail": "jane@example.com", "customerLanguage": "es"}
    created = client_for(merchant).post("/v2/deliveries", body, format="json")
    assert created.status_code == 201, created.content
    data = created.json()
    assert (data["customerPhone"], data["customerEmail"], data["customerLanguage"]) == ("+14155552671", "jane@example.com", "es")
    # The SPEC takes any phone string of its pattern: one that is not a possible number is kept as given
    odd = client_for(merchant).post("/v2/deliveries", {**body, "sellerOrderId": "ORD-ODD", "customerPhone": "+1-555-0100"}, format="json")
    assert odd.status_code == 201 and odd.json()["customerPhone"] == "+1-555-0100"
    for field, value in (("customerEmail", "not-an-address"), ("customerLanguage", "español"), ("customerPhone", "12")):
        bad = client_for(merchant).post("/v2/deliveries", {**body, "sellerOrderId": f"ORD-BAD-{field}", field: value}, format="json")
        assert field in assert_error(bad, 400)["details"]


def test_the_delivery_admin_page_lists_the_customer_messages(twilio):
    delivery = _delivery()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    admin = OpsUserFactory(is_superuser=True)
    client = Client()
    client.force_login(admin)
    page = client.get(f"/admin/dispatch/delivery/{delivery.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "customer messages" in html.lower() and "SM00000000000000000000000000000001" in html


def test_two_workers_sending_one_message_at_once_send_it_once(twilio, no_worker):
    delivery = DeliveryFactory(customer_phone=PHONE)
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    services.webhooks_deliver_due(max_seconds=10)  # the fan-out makes the message; no worker sent it
    (message,) = CustomerMessage.objects.filter(delivery=delivery, status="pending")
    barrier = threading.Barrier(2)
    results = []

    def worker():
        try:
            barrier.wait()
            results.append(customers.customer_message_send(message_id=message.pk))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [0, 1]
    assert len(twilio.requests) == 1
    message.refresh_from_db()
    assert message.status == "sent" and message.attempts == 1
