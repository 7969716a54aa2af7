"""A customer who wants no more messages: the link in the e-mail (one-click unsubscribe, RFC
8058) or on the page it leads to, a number that replied STOP (Twilio refuses with 21610), or ops
in the console. Nothing is sent there again; pending messages are skipped."""
from __future__ import annotations

import email

import pytest
from django.test import Client

from common.actors import Actor
from notifications import customers, services
from notifications.models import CustomerMessage, CustomerOptOut
from tests.factories import DeliveryFactory, OpsUserFactory, online_driver
from tests.notifications.receiver import Answer
from workflows import deliveries as flows

pytestmark = pytest.mark.django_db(transaction=True)

PHONE = "+14155552671"


def _delivery(**extra):
    return DeliveryFactory(customer_phone=PHONE, customer_email="Jane@Example.com", customer_name="Jane", **extra)


def _assign(delivery):
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())


def _opt_out_path(delivery) -> str:
    return f"/track/{delivery.pk}/opt-out?token={delivery.tracking_token}"


def test_the_email_carries_a_one_click_unsubscribe_and_its_post_stops_every_message(smtp_server, twilio):
    first = _delivery()
    _assign(first)
    (mail,) = [email.message_from_bytes(e.content) for e in smtp_server]
    assert mail["List-Unsubscribe"].strip() == f"<{customers.opt_out_url(first)}>"  # (folded: a long line)
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f"To stop these messages: {customers.opt_out_url(first)}" in mail.get_payload(decode=True).decode()

    # a mail client's one-click: a form POST, no cookie, no CSRF token
    response = Client(enforce_csrf_checks=True).post(
        _opt_out_path(first), "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200 and b"no more delivery messages" in response.content
    assert response["Cache-Control"].startswith("private") or "no-store" in response["Cache-Control"]
    assert set(CustomerOptOut.objects.values_list("channel", "recipient", "source")) == {
        ("sms", PHONE, "customer"), ("email", "jane@example.com", "customer")}

    # the next delivery of the same customer (the address in another case): nothing sent
    sent = (len(twilio.requests), len(smtp_server))
    second = DeliveryFactory(customer_phone="+1 (415) 555-2671", customer_email="JANE@example.com")
    _assign(second)
    assert (len(twilio.requests), len(smtp_server)) == sent
    assert set(CustomerMessage.objects.filter(delivery=second).values_list("status", "error")) == {
        ("skipped", customers.OPTED_OUT)}


def test_the_page_asks_first_and_a_bad_link_is_a_404(db):
    delivery = _delivery()
    page = Client().get(_opt_out_path(delivery))
    assert page.status_code == 200 and b"Stop these messages" in page.content
    assert not CustomerOptOut.objects.exists()  # (a GET changes nothing: link previews fetch it)

    assert Client().post(f"/track/{delivery.pk}/opt-out?token=wrong").status_code == 404
    assert Client().post(f"/track/{delivery.pk}/opt-out").status_code == 404
    assert Client().put(_opt_out_path(delivery)).status_code == 405
    assert not CustomerOptOut.objects.exists()

    assert Client().post(_opt_out_path(delivery)).status_code == 200
    assert Client().post(_opt_out_path(delivery)).status_code == 200  # again: the same answer
    assert CustomerOptOut.objects.count() == 2


def test_pending_messages_are_skipped_at_once(twilio, no_worker):
    delivery = _delivery()
    _assign(delivery)
    services.webhooks_deliver_due(max_seconds=10)  # the messages are made; no worker sent them yet
    assert set(CustomerMessage.objects.values_list("status", flat=True)) == {"pending"}

    assert Client().post(_opt_out_path(delivery)).status_code == 200

    assert customers.customer_messages_send_due() == 0
    assert set(CustomerMessage.objects.values_list("status", "error")) == {("skipped", customers.OPTED_OUT)}
    assert twilio.requests == []


def test_a_number_that_replied_stop_is_recorded_and_never_tried_again(twilio):
    twilio.answer(Answer(400, {"Content-Type": "application/json"},
                         b'{"code": 21610, "message": "Attempt to send to unsubscribed recipient", "status": 400}'))
    first = DeliveryFactory(customer_phone=PHONE)
    _assign(first)
    message = CustomerMessage.objects.get(delivery=first)
    assert message.status == "skipped" and message.error.startswith(customers.OPTED_OUT) and "21610" in message.error
    assert CustomerOptOut.objects.get().source == "provider"

    second = DeliveryFactory(customer_phone=PHONE)
    _assign(second)
    assert len(twilio.requests) == 1  # the first try only
    assert CustomerMessage.objects.get(delivery=second).error == customers.OPTED_OUT


def test_ops_add_an_opt_out_in_the_console_and_a_superuser_removes_it_to_send_again(twilio):
    ops = OpsUserFactory(is_superuser=False)
    from common.groups import groups_sync
    from common.roles import DISPATCHER_GROUP

    ops.groups.add(groups_sync()[DISPATCHER_GROUP])
    console = Client()
    console.force_login(ops)
    response = console.post("/admin/notifications/customeroptout/add/", {"channel": "sms", "recipient": "+1 415 555 2671"})
    assert response.status_code == 302, response.content[:2000]
    opt_out = CustomerOptOut.objects.get()
    assert (opt_out.recipient, opt_out.source) == (PHONE, "ops")

    _assign(DeliveryFactory(customer_phone=PHONE))
    assert twilio.requests == []

    assert console.post(f"/admin/notifications/customeroptout/{opt_out.pk}/delete/", {"post": "yes"}).status_code == 403
    admin = Client()
    admin.force_login(OpsUserFactory(is_superuser=True))
    response = admin.post(f"/admin/notifications/customeroptout/{opt_out.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not CustomerOptOut.objects.exists()
    _assign(DeliveryFactory(customer_phone=PHONE))
    assert len(twilio.requests) == 1


def test_every_answer_under_the_link_is_private_even_those_made_outside_the_views(db):
    delivery = _delivery()
    answers = [
        Client().put(_opt_out_path(delivery)),  # 405 (the method decorator)
        Client().get(f"/track/not-a-uuid/opt-out?token={delivery.tracking_token}"),  # 404 (no route)
        Client().get(f"/track/{delivery.pk}/opt-out?token=%00"),  # 400 (the request guard)
        Client().get(_opt_out_path(delivery)),
    ]
    assert [a.status_code for a in answers] == [405, 404, 400, 200]
    assert all(a["Cache-Control"] == "no-store" and a["Referrer-Policy"] == "no-referrer" for a in answers)


def test_the_console_refuses_a_recipient_that_matches_nothing_and_a_duplicate_written_another_way(db):
    ops = OpsUserFactory(is_superuser=False)
    from common.groups import groups_sync
    from common.roles import DISPATCHER_GROUP

    ops.groups.add(groups_sync()[DISPATCHER_GROUP])
    console = Client()
    console.force_login(ops)
    add = "/admin/notifications/customeroptout/add/"
    for channel, typo in (("sms", "555-1234"), ("email", "jane at example.com")):
        response = console.post(add, {"channel": channel, "recipient": typo})
        assert response.status_code == 200 and b"Not a valid" in response.content
    assert not CustomerOptOut.objects.exists()

    assert console.post(add, {"channel": "email", "recipient": "Jane@Example.com"}).status_code == 302
    assert CustomerOptOut.objects.get().recipient == "jane@example.com"
    again = console.post(add, {"channel": "email", "recipient": "JANE@example.com "})
    assert again.status_code == 200 and b"already exists" in again.content
    assert CustomerOptOut.objects.count() == 1


def test_a_delivery_without_a_number_or_address_says_so_and_records_nothing(db):
    delivery = DeliveryFactory(customer_phone="", customer_email="")
    response = Client().post(_opt_out_path(delivery))
    assert response.status_code == 200 and b"no phone number or e-mail address" in response.content
    assert not CustomerOptOut.objects.exists()
