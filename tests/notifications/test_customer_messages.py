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
                                   reason="customer_unavailable" if last == "delivery-failed" and step == last else "")
    kinds = sorted((m.delivery_id == done.pk, m.kind, m.channel) for m in CustomerMessage.objects.filter(status="sent"))
    assert kinds == sorted([(True, k, c) for k in ("assigned", "delivered") for c in ("sms", "email")]
                           + [(False, k, c) for k in ("assigned", "failed") for c in ("sms", "email")])
    assert "(nobody was there to receive it)" in [_sms(r)["Body"] for r in twilio.requests][-1]
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


@pytest.mark.parametrize("failure", [TimeoutError("timed out"), OSError(101, "Network is unreachable")],
                         ids=["connect timed out", "network unreachable"])
def test_a_send_that_never_connected_is_retried(twilio, monkeypatch, failure):
    """Only a refused connection or a failed look-up counted as never sent (their error texts):
    a connect that timed out, or an unreachable network, was taken for a send of unknown outcome
    and failed for good, with nothing sent (an audit: a full accept queue at the provider)."""
    import socket

    def cannot_connect(*args, **kwargs):
        raise failure

    delivery = DeliveryFactory(customer_phone=PHONE)
    with monkeypatch.context() as patched:
        patched.setattr(socket, "create_connection", cannot_connect)
        flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    message = CustomerMessage.objects.get(delivery=delivery)
    assert message.status == "pending" and message.attempts == 1 and twilio.requests == [], message.error
    with time_machine.travel(timezone.now() + timedelta(seconds=31), tick=False):
        assert customers.customer_messages_send_due() == 1
    message.refresh_from_db()
    assert (message.status, message.attempts) == ("sent", 2) and len(twilio.requests) == 1


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


def _failed(delivery, reason):
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in ("pickup-started", "pickup-completed", "delivery-started", "delivery-failed"):
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user),
                               reason=reason if step == "delivery-failed" else "")


def test_the_failure_reason_reaches_the_customer_as_a_phrase_in_their_language_never_the_drivers_words(twilio):
    """The driver's reason code went out raw ("(customer_unavailable)", in English inside the
    Spanish text), and the driver's free text word for word under the platform's name."""
    spanish, free_text = _delivery(customer_language="es"), _delivery()
    _failed(spanish, "address_not_found")
    _failed(free_text, "Call me on +91 99999 00000 and pay cash at http://evil.example/pay")

    bodies = [_sms(r)["Body"] for r in twilio.requests if _sms(r)["Body"].lower().startswith(spanish.store_name.lower())]
    spanish_failed = next(b for b in bodies if "no pudimos entregar" in b and spanish.seller_order_id in b)
    assert "(el repartidor no encontró la dirección)" in spanish_failed and "address_not_found" not in spanish_failed
    free_failed = next(_sms(r)["Body"] for r in twilio.requests
                       if "could not deliver" in _sms(r)["Body"] and free_text.seller_order_id in _sms(r)["Body"])
    assert "evil.example" not in free_failed and "99999" not in free_failed and "(" not in free_failed
    assert CustomerMessage.objects.filter(delivery=free_text, kind="failed", status="sent").count() == 2


def test_a_store_name_with_a_line_break_gets_its_email_with_a_one_line_subject(smtp_server, twilio):
    """A line break in a header is refused (BadHeaderError): the e-mail was never sent and its
    row stayed `sending` for good; and the console SMS log line could be split (forged)."""
    delivery = _delivery(store_name="Line1\r\nLine2\u2028Line3")
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())

    (mail,) = _mails(smtp_server)
    assert mail["Subject"] == f"Your order {delivery.seller_order_id} from Line1 Line2 Line3 has a driver"
    assert set(CustomerMessage.objects.filter(delivery=delivery).values_list("status", flat=True)) == {"sent"}


def test_the_console_sms_is_one_log_line(settings, caplog):
    from notifications.sms import ConsoleSmsBackend

    with caplog.at_level("INFO", logger="notifications.sms"):
        ConsoleSmsBackend().send(to=PHONE, body="Shop\nINFO forged line")
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


def test_a_message_that_cannot_be_made_is_failed_not_left_sending(twilio, monkeypatch):
    def broken(message, context, part):
        raise ValueError("template broken")

    monkeypatch.setattr(customers, "_render", broken)
    delivery = DeliveryFactory(customer_phone=PHONE)
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())

    message = CustomerMessage.objects.get(delivery=delivery)
    assert (message.status, message.error) == ("failed", "could not be made: template broken")
    assert twilio.requests == []


@pytest.mark.parametrize("tag, template_language", [
    ("ES", "es"), ("ES-MX", "es"), ("es-mx", "es"), ("zh-Hant-TW", "en"), ("sr-latn-rs", "en"), ("en-GB-oxendict", "en"),
])
def test_language_tags_match_in_any_case_and_with_several_subtags(twilio, tag, template_language):
    """Tags are case-insensitive (BCP 47): "ES" and "ES-MX" got English; tags of three parts
    were a 400 that refused the whole order."""
    merchant = IntegrationUserFactory()
    body = {"sellerOrderId": f"ORD-LANG-{tag}", "storeName": "Corner Shop", "autoDispatch": False,
            "pickupLocation": {"lat": CITY[0], "lon": CITY[1]}, "dropoffLocation": {"lat": CITY[0] + 0.01, "lon": CITY[1]},
            "customerPhone": PHONE, "customerLanguage": tag}
    created = client_for(merchant).post("/v2/deliveries", body, format="json")
    assert created.status_code == 201, created.content

    flows.assignment_create(delivery_id=created.json()["id"], driver_id=online_driver().pk, actor=Actor.system())
    message = CustomerMessage.objects.get(delivery_id=created.json()["id"])
    assert message.template == f"notifications/customer/{template_language}/assigned.sms.txt"
    assert message.language == tag  # kept as the seller gave it


def test_language_chain():
    assert customers.language_chain("ES-mx") == ["es-MX", "es", "en"]
    assert customers.language_chain("zh-hant-tw") == ["zh-Hant-TW", "zh-Hant", "zh", "en"]
    assert customers.language_chain("") == ["en"]


def test_news_a_cancellation_outdated_before_it_was_sent_is_skipped(twilio, no_worker):
    """The worker sent "a driver is picking up your order" (with the handoff code) after the
    delivery was cancelled: it did not look at the delivery again."""
    delivery = DeliveryFactory(customer_phone=PHONE, proof_required="code")
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    services.webhooks_deliver_due(max_seconds=10)  # the message is made; no worker has sent it yet
    flows.delivery_cancel(delivery_id=delivery.pk, reason="customer changed their mind", actor=Actor.system())

    assert customers.customer_messages_send_due() == 0

    message = CustomerMessage.objects.get(delivery=delivery, kind="assigned")
    assert (message.status, message.error) == ("skipped", "not sent: the delivery is cancelled")
    assert twilio.requests == []


def test_nothing_is_sent_while_customer_messages_are_switched_off(twilio, no_worker, settings):
    delivery = DeliveryFactory(customer_phone=PHONE)
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    services.webhooks_deliver_due(max_seconds=10)
    settings.CUSTOMER_MESSAGES_ENABLED = False

    assert customers.customer_messages_send_due() == 0
    assert CustomerMessage.objects.get(delivery=delivery).status == "pending" and twilio.requests == []
    settings.CUSTOMER_MESSAGES_ENABLED = True
    assert customers.customer_messages_send_due() == 1


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "mail.nowhere.invalid"])
def test_a_mail_server_that_cannot_be_reached_is_retried(settings, no_worker, host):
    """A refused connection was retried, but a DNS failure or a connect timeout was recorded
    as "outcome unknown" and never sent, though nothing had reached a server."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = host, _free_port(), 2
    delivery = DeliveryFactory(customer_email="jane@example.com", customer_phone="")
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    services.webhooks_deliver_due(max_seconds=10)
    start = timezone.now()

    with time_machine.travel(start, tick=False):
        assert customers.customer_messages_send_due() == 0

    message = CustomerMessage.objects.get(delivery=delivery)
    assert message.status == "pending" and message.error.startswith("could not reach the mail server")
    assert message.next_attempt_at == start + timedelta(seconds=30)


@pytest.mark.parametrize("answer, status", [("451 4.3.0 Try again later", "pending"), ("554 5.7.1 Rejected", "failed")])
def test_a_mail_server_refusing_the_message_for_now_is_retried_for_good_is_not(settings, no_worker, answer, status):
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            return answer

    controller = Controller(Handler(), hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_USE_TLS = "127.0.0.1", controller.port, False
        delivery = DeliveryFactory(customer_email="jane@example.com", customer_phone="")
        flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
        services.webhooks_deliver_due(max_seconds=10)
        assert customers.customer_messages_send_due() == 0
    finally:
        controller.stop()

    message = CustomerMessage.objects.get(delivery=delivery)
    assert message.status == status and answer.split(" ", 1)[0] in message.error


def test_a_customer_told_of_a_driver_is_told_of_the_cancellation_and_only_they(smtp_server, twilio):
    """After "your order is on its way" a cancellation left the customer waiting for a driver
    who was never coming. A customer never told of one hears nothing from us (the seller
    cancelled before anything was sent)."""
    told, untold = _delivery(customer_language="es"), _delivery()
    flows.assignment_create(delivery_id=told.pk, driver_id=online_driver().pk, actor=Actor.system())
    for delivery in (told, untold):
        flows.delivery_cancel(delivery_id=delivery.pk, reason="out of stock", actor=Actor.system())

    assert sorted(CustomerMessage.objects.filter(delivery=told).values_list("kind", "channel", "status")) == sorted(
        (kind, channel, "sent") for kind in ("assigned", "cancelled") for channel in ("sms", "email"))
    assert not CustomerMessage.objects.filter(delivery=untold).exists()
    assert "fue cancelado y no será entregado" in _sms(twilio.requests[-1])["Body"]
    assert _mails(smtp_server)[-1]["Subject"] == f"Tu pedido {told.seller_order_id} fue cancelado"


def test_the_arriving_message_goes_from_the_fixes_when_no_eta_webhook_does(twilio):
    """It was seen only in an ETA update's webhook row, which the merchants' throttle (one per
    60 s a delivery) holds back, and which an ETA that did not move never makes: a driver at the
    door 34 s after the last one told the customer nothing (an audit). The fixes' ETA cadence
    checks it now, from the fix itself."""
    import time

    from availability import live
    from workflows import drivers as driver_workflows

    delivery = _delivery()
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in ("pickup-started", "pickup-completed", "delivery-started"):
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user))
    assert OutboxEvent.objects.filter(delivery_id=delivery.pk, type="delivery.eta_updated").exists()  # (the throttle's)
    drop = delivery.dropoff_location

    def fix(lat, lon):
        driver_workflows.fixes_process([live.Fix(driver_id=str(driver.pk), lat=lat, lon=lon, recorded_at=time.time())])

    fix(drop.y - 0.02, drop.x)  # ~2.2 km away
    assert not CustomerMessage.objects.filter(delivery=delivery, kind="arriving").exists()
    fix(drop.y - 0.001, drop.x)  # ~110 m
    fix(drop.y - 0.0005, drop.x)

    (arriving,) = CustomerMessage.objects.filter(delivery=delivery, kind="arriving", channel="sms")
    assert arriving.status == "sent" and sum("almost there" in _sms(r)["Body"] for r in twilio.requests) == 1
    assert OutboxEvent.objects.filter(delivery_id=delivery.pk, type="delivery.eta_updated").count() == 1  # (still throttled)
    assert CustomerMessage.objects.filter(delivery=delivery, kind="arriving", channel="email").count() == 1


def test_the_arriving_message_waits_for_the_delivery_to_be_under_way(twilio):
    """A driver at the drop-off before the pickup (assigned, picked up) is not arriving."""
    import time

    from availability import live
    from workflows import drivers as driver_workflows

    delivery = _delivery()
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    drop = delivery.dropoff_location
    driver_workflows.fixes_process([live.Fix(driver_id=str(driver.pk), lat=drop.y, lon=drop.x, recorded_at=time.time())])

    assert not CustomerMessage.objects.filter(delivery=delivery, kind="arriving").exists()


def test_a_customer_told_of_a_driver_is_told_of_the_new_one_after_a_reassign(smtp_server, twilio):
    """Ops took the delivery from Ravi and Meena accepted it: the customer kept "on its way with
    Ravi" and heard nothing more (a seller audit). Told once a delivery; the first assignment's
    event fanned out again makes nothing."""
    from offers.models import DriverOffer
    from workflows.offers import offer_accept

    delivery = _delivery()
    first = online_driver(name="Ravi Kumar", km=0.5)
    flows.assignment_create(delivery_id=delivery.pk, driver_id=first.pk, actor=Actor.system())
    second = online_driver(name="Meena Das", km=1.0)
    flows.delivery_reassign(delivery_id=delivery.pk, reason="driver's bike broke down", actor=Actor.system())
    offer = DriverOffer.objects.get(delivery=delivery, status="PENDING")
    assert offer.driver_id == second.pk
    offer_accept(offer_id=offer.pk, driver_id=second.pk, actor=Actor("driver", second.pk))

    assert sorted(CustomerMessage.objects.filter(delivery=delivery).values_list("kind", "channel", "status")) == sorted(
        (kind, channel, "sent") for kind in ("assigned", "driver_changed") for channel in ("sms", "email"))
    assert {str(m) for m in CustomerMessage.objects.filter(delivery=delivery, kind="assigned").values_list("driver_id", flat=True)} == {
        str(first.pk)}  # (who it named)
    body = _sms(twilio.requests[-1])["Body"]
    assert "new driver, Meena" in body and delivery.tracking_url in body and "Ravi" not in body
    assert _mails(smtp_server)[-1]["Subject"] == f"Your order {delivery.seller_order_id} from {delivery.store_name} has a new driver"

    # a second reassign: the customer is told of the third driver too
    third = online_driver(name="Kiran Rao", km=1.5)
    flows.delivery_reassign(delivery_id=delivery.pk, reason="Meena's shift ended", actor=Actor.system())
    offer = DriverOffer.objects.get(delivery=delivery, status="PENDING")
    assert offer.driver_id == third.pk
    offer_accept(offer_id=offer.pk, driver_id=third.pk, actor=Actor("driver", third.pk))
    changed = CustomerMessage.objects.filter(delivery=delivery, kind="driver_changed").order_by("created_at", "channel")
    assert [(str(m.driver_id), m.status) for m in changed] == [(str(d.pk), "sent") for d in (second, second, third, third)]
    assert "new driver, Kiran" in _sms(twilio.requests[-1])["Body"]

    kept = _delivery()
    flows.assignment_create(delivery_id=kept.pk, driver_id=online_driver(name="Asha Rao", km=2.0).pk, actor=Actor.system())
    (assigned,) = OutboxEvent.objects.filter(delivery=kept, type="delivery.assigned")
    customers.message_rows_for_events([assigned], now=timezone.now())  # (its message went already)
    assert sorted(CustomerMessage.objects.filter(delivery=kept).values_list("kind", flat=True)) == ["assigned", "assigned"]


def test_a_message_still_waiting_when_another_driver_takes_over_names_the_new_one_and_only_once(twilio, no_worker):
    """The first message, made before the reassign and sent after it, names the new driver: no
    "new driver" message follows it. A driver-changed message overtaken by yet another driver
    before it went is skipped (the newer one's says so)."""
    from offers.models import DriverOffer
    from workflows.offers import offer_accept

    delivery = _delivery()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver(name="Ravi Kumar", km=0.5).pk,
                            actor=Actor.system())
    services.webhooks_deliver_due(max_seconds=10)  # the assigned messages are made, not sent
    second = online_driver(name="Meena Das", km=1.0)
    flows.delivery_reassign(delivery_id=delivery.pk, reason="bike broke down", actor=Actor.system())
    offer_accept(offer_id=DriverOffer.objects.get(delivery=delivery, status="PENDING").pk, driver_id=second.pk,
                 actor=Actor("driver", second.pk))
    services.webhooks_deliver_due(max_seconds=10)
    assert customers.customer_messages_send_due() == 2
    assert "on its way with Meena" in _sms(twilio.requests[-1])["Body"]
    assert sorted(CustomerMessage.objects.filter(delivery=delivery).values_list("kind", "status")) == [
        ("assigned", "sent"), ("assigned", "sent")]

    third, fourth = online_driver(name="Kiran Rao", km=1.5), online_driver(name="Lata Shah", km=2.0)
    for driver in (third, fourth):
        flows.delivery_reassign(delivery_id=delivery.pk, reason="again", actor=Actor.system())
        offer_accept(offer_id=DriverOffer.objects.get(delivery=delivery, status="PENDING").pk, driver_id=driver.pk,
                     actor=Actor("driver", driver.pk))
        services.webhooks_deliver_due(max_seconds=10)
    assert customers.customer_messages_send_due() == 2  # (Lata's text and e-mail; Kiran's are overtaken)
    changed = dict(CustomerMessage.objects.filter(delivery=delivery, kind="driver_changed", channel="sms")
                   .values_list("driver_id", "status"))
    assert changed == {third.pk: "skipped", fourth.pk: "sent"}
    assert "new driver, Lata" in _sms(twilio.requests[-1])["Body"]
