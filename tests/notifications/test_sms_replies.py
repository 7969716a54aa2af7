"""What Twilio tells us about customers' texts, signed with the account's auth token: a reply
STOP opts the number out and START opts it back in (the incoming-message webhook); a message
the status callback reports undelivered is marked so, and 21610 there records the opt-out."""
from __future__ import annotations

from urllib.parse import parse_qs, urlencode

import pytest
from django.test import Client

from common.actors import Actor
from notifications import customers
from notifications.models import CustomerMessage, CustomerOptOut
from notifications.sms import twilio_request_signed, twilio_signature
from tests.factories import DeliveryFactory, online_driver
from workflows import deliveries as flows

pytestmark = pytest.mark.django_db(transaction=True)

PHONE = "+14155552671"
INBOUND, STATUS = "/hooks/twilio/inbound", "/hooks/twilio/status"
FORM = "application/x-www-form-urlencoded"  # (as Twilio posts)


def _post(path: str, fields: dict, *, token: str = "secret-token", url: str | None = None, signature: str | None = None):
    """POST `fields` form-encoded as Twilio does, signed for `url` (the test client's own by
    default) with `token`, unless `signature` is given."""
    url = url or f"http://testserver{path}"
    if signature is None:
        signature = twilio_signature(token, url, [(name, [value]) for name, value in fields.items()])
    return Client(enforce_csrf_checks=True).post(path, urlencode(fields), content_type=FORM, HTTP_X_TWILIO_SIGNATURE=signature)


def _reply(body: str, **extra):
    return _post(INBOUND, {"MessageSid": "SM" + "1" * 32, "AccountSid": "AC123", "From": "+1 415-555-2671",
                           "To": "+15005550006", "Body": body, **extra})


def _assigned_delivery():
    delivery = DeliveryFactory(customer_phone=PHONE)
    flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
    return delivery


def _form(request) -> dict:
    return {k: v[0] for k, v in parse_qs(request.body.decode()).items()}


def test_the_signature_is_twilios_documented_example_with_or_without_the_default_port():
    params = [("CallSid", ["CA1234567890ABCDE"]), ("Caller", ["+12349013030"]), ("Digits", ["1234"]),
              ("From", ["+12349013030"]), ("To", ["+18005551212"])]
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature("12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert twilio_request_signed("12345", "https://mycompany.com:443/myapp.php?foo=1&bar=2", params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    assert not twilio_request_signed("12345", "https://mycompany.com:8443/myapp.php?foo=1&bar=2", params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    assert not twilio_request_signed("12345", url, params[:-1], "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    assert not twilio_request_signed("", url, params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")


def test_a_reply_stop_opts_the_number_out_and_start_opts_it_back_in(twilio):
    first = _assigned_delivery()
    assert "Reply STOP to opt out." in _form(twilio.requests[0])["Body"]

    response = _reply(" stop ")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/xml")
    assert b"<Response></Response>" in response.content
    assert list(CustomerOptOut.objects.values_list("channel", "recipient", "source")) == [("sms", PHONE, "provider")]
    assert _reply("STOP").status_code == 200  # again: still one row
    assert CustomerOptOut.objects.count() == 1

    _assigned_delivery()
    assert len(twilio.requests) == 1  # the second delivery's message was not sent
    assert CustomerMessage.objects.exclude(delivery=first).get().error == customers.OPTED_OUT

    assert _reply("Start").status_code == 200
    assert not CustomerOptOut.objects.exists()
    _assigned_delivery()
    assert len(twilio.requests) == 2 and _form(twilio.requests[1])["To"] == PHONE


def test_twilios_opt_out_type_wins_and_other_texts_change_nothing(twilio):
    assert _reply("Where is my order? stop").status_code == 200
    assert _reply("HELP").status_code == 200
    assert not CustomerOptOut.objects.exists()

    assert _reply("ARRET", OptOutType="STOP").status_code == 200  # (a keyword of the account's own)
    assert CustomerOptOut.objects.get().recipient == PHONE

    customers.customer_opt_out(channel="sms", recipient=PHONE, source="ops")  # (kept: recorded before)
    assert _reply("oui", OptOutType="START").status_code == 200  # the number's own word wins over ops'
    assert not CustomerOptOut.objects.exists()


def test_a_request_not_signed_by_twilio_is_refused_and_changes_nothing(twilio, settings):
    fields = {"From": PHONE, "Body": "STOP"}
    for response in (
        _post(INBOUND, fields, signature=""),
        _post(INBOUND, fields, token="another-token"),
        _post(INBOUND, fields, url="http://testserver/hooks/twilio/other"),
        Client().post(INBOUND, urlencode({**fields, "Body": "START"}), content_type=FORM, HTTP_X_TWILIO_SIGNATURE=twilio_signature(
            "secret-token", "http://testserver" + INBOUND, [(k, [v]) for k, v in fields.items()])),  # (signed for other fields)
        _post(STATUS, {"MessageSid": "SM1", "MessageStatus": "failed", "ErrorCode": "21610"}, signature="x"),
    ):
        assert response.status_code == 403
        assert response.json()["statusCode"] == 403 and "Twilio" in response.json()["message"]
    assert not CustomerOptOut.objects.exists()

    odd = _post(INBOUND, fields, signature="é" + "A" * 27)  # (not ASCII: compare_digest raised, a 500)
    assert odd.status_code == 403
    as_json = Client().post(INBOUND, fields, content_type="application/json", HTTP_X_TWILIO_SIGNATURE="x")
    assert as_json.status_code == 415 and as_json.json()["statusCode"] == 415
    assert not CustomerOptOut.objects.exists()

    wrong = Client().get(INBOUND)
    assert wrong.status_code == 405 and wrong["Allow"] == "POST" and wrong.json()["error"] == "Method Not Allowed"

    settings.TWILIO_AUTH_TOKEN = ""
    off = _post(INBOUND, fields, token="")
    assert off.status_code == 404 and off.json()["path"] == INBOUND
    assert not CustomerOptOut.objects.exists()


def test_what_is_refused_before_the_hook_runs_is_in_the_apis_error_body_too(twilio):
    """A NUL in the URL, a charset that is no text encoding, over 1,000 fields: plain text or
    HTML from the pages' defences (a machine reads these answers). Control characters in the
    path or query are refused as on the API (they reached the hook, or made a 404: an audit)."""
    for response in (
        Client().post(INBOUND + "?x=%00", "From=1", content_type=FORM),
        Client().post(INBOUND + "?x=%01", "From=1", content_type=FORM),
        Client().post(INBOUND + "%01", "From=1", content_type=FORM),
        Client().generic("POST", INBOUND, b"From=1", content_type=FORM + "; charset=zip"),
        Client().get(INBOUND + "?" + "&".join(f"a{n}=b" for n in range(1001))),
    ):
        assert response.status_code == 400 and response["Content-Type"] == "application/json", response.content[:200]
        assert response.json()["statusCode"] == 400 and response.json()["path"].startswith(INBOUND)


def test_the_signature_is_checked_against_the_public_url_when_one_is_set(twilio, settings):
    settings.TWILIO_WEBHOOK_BASE_URL = "https://dispatch.example.com/"
    fields = {"From": PHONE, "Body": "STOP"}
    assert _post(INBOUND, fields).status_code == 403  # (signed for the URL the test client used)
    assert _post(INBOUND, fields, url="https://dispatch.example.com" + INBOUND).status_code == 200
    assert CustomerOptOut.objects.filter(recipient=PHONE).exists()

    CustomerOptOut.objects.all().delete()
    message = CustomerMessage.objects.get(delivery=_assigned_delivery())
    assert _form(twilio.requests[0])["StatusCallback"] == f"https://dispatch.example.com{STATUS}?message={message.pk}"


def test_a_report_that_comes_before_the_senders_answer_is_written_finds_its_message(twilio, settings):
    """Twilio may report a failure (21610 through a Messaging Service) before our sender has
    written the provider's id: by the id in the callback's URL the report finds the message, and
    the sender's own finish, which changes only a message still being sent, then changes nothing."""
    settings.TWILIO_WEBHOOK_BASE_URL = "https://dispatch.example.com"
    reported = {}

    def report_first(received):
        from tests.notifications.receiver import Answer

        callback = _form(received)["StatusCallback"]
        path = callback.removeprefix("https://dispatch.example.com")
        reported["response"] = _post(path, {"MessageSid": "SM9", "MessageStatus": "failed", "ErrorCode": "21610"}, url=callback)
        return Answer(201, {"Content-Type": "application/json"}, b'{"sid": "SM9", "status": "queued"}')

    twilio.responder = report_first
    message = CustomerMessage.objects.get(delivery=_assigned_delivery())
    assert reported["response"].status_code == 204
    assert (message.status, message.provider_id) == ("skipped", "SM9") and "21610" in message.error
    assert CustomerOptOut.objects.get().source == "provider"


def test_the_status_callback_marks_undelivered_messages_and_records_21610(twilio):
    first = _assigned_delivery()
    message = CustomerMessage.objects.get(delivery=first)
    assert message.status == "sent" and message.provider_id == "SM00000000000000000000000000000001"

    for status in ("sent", "delivered"):  # on its way, then there: nothing changes
        assert _post(STATUS, {"MessageSid": message.provider_id, "MessageStatus": status}).status_code == 204
    assert CustomerMessage.objects.get(pk=message.pk).status == "sent"

    assert _post(STATUS, {"MessageSid": message.provider_id, "MessageStatus": "undelivered", "ErrorCode": "30003"}).status_code == 204
    message.refresh_from_db()
    assert (message.status, message.error) == ("failed", "the SMS provider reported it undelivered (error 30003)")
    assert not CustomerOptOut.objects.exists()

    twilio.default.body = b'{"sid": "SM00000000000000000000000000000002", "status": "queued"}'
    second = CustomerMessage.objects.get(delivery=_assigned_delivery())
    assert _post(STATUS, {"MessageSid": "SMunknown", "MessageStatus": "failed", "ErrorCode": "21610"}).status_code == 204
    assert not CustomerOptOut.objects.exists()  # (not one of ours)
    assert _post(STATUS, {"MessageSid": second.provider_id, "MessageStatus": "failed", "ErrorCode": "21610"}).status_code == 204
    second.refresh_from_db()
    assert second.status == "skipped" and second.error.startswith(customers.OPTED_OUT) and "21610" in second.error
    assert list(CustomerOptOut.objects.values_list("recipient", "source")) == [(PHONE, "provider")]

    # a late report of the first message changes nothing more
    assert _post(STATUS, {"MessageSid": message.provider_id, "MessageStatus": "failed", "ErrorCode": "21610"}).status_code == 204
    assert CustomerMessage.objects.get(pk=message.pk).error == "the SMS provider reported it undelivered (error 30003)"


def test_any_other_text_is_the_customers_reply_kept_with_the_open_delivery_and_told_to_ops_and_its_driver(twilio):
    from asgiref.sync import async_to_sync
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator

    from config.asgi import application
    from dispatch.models import Assignment
    from notifications.events import CustomerRepliedEvent
    from notifications.models import CustomerReply
    from tests.api import token_for
    from tests.factories import OpsUserFactory
    from tests.typecheck import assert_event_shape

    current = _assigned_delivery()
    done = _assigned_delivery()  # texted after the current one, and over: the open one is the one answered
    flows.delivery_cancel(delivery_id=done.pk, reason="store closed", actor=Actor.system())  # (told: cancelled)
    assert CustomerMessage.objects.filter(delivery=done).count() == 2
    driver = Assignment.objects.get(delivery=current, status="active").driver
    ops_token, driver_token = token_for(OpsUserFactory()), token_for(driver.user)

    async def scenario():
        ops = WebsocketCommunicator(application, f"/ws/ops/?token={ops_token}&locations=0&positions=0")
        phone = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}/?token={driver_token}")
        assert (await ops.connect())[0] and (await phone.connect())[0]

        response = await database_sync_to_async(_reply)("Leave it at the door, please", MessageSid="SM" + "7" * 32)
        assert response.status_code == 200 and b"<Response></Response>" in response.content
        seen = await ops.receive_json_from(timeout=5)
        assert_event_shape(seen, CustomerRepliedEvent)
        assert seen == await phone.receive_json_from(timeout=5)
        assert (seen["deliveryId"], seen["sellerOrderId"], seen["driverId"], seen["channel"], seen["body"]) == (
            str(current.pk), current.seller_order_id, str(driver.pk), "sms", "Leave it at the door, please")

        # Twilio retries a webhook it got no answer to in time: the reply is kept, and told, once
        again = await database_sync_to_async(_reply)("Leave it at the door, please", MessageSid="SM" + "7" * 32)
        assert again.status_code == 200
        assert await ops.receive_nothing(timeout=0.5)
        await ops.disconnect()
        await phone.disconnect()
        return seen

    seen = async_to_sync(scenario)()
    reply = CustomerReply.objects.get()
    assert (reply.delivery_id, reply.sender, reply.body, reply.provider_id) == (
        current.pk, PHONE, "Leave it at the door, please", "SM" + "7" * 32)
    assert seen["replyId"] == str(reply.pk)
    assert not CustomerOptOut.objects.exists()

    # Twilio's own keywords are not replies; once the delivery is over, the latest one it was
    # about still gets the text, and nobody's driver hears of it
    assert _reply("help", MessageSid="SM" + "8" * 32).status_code == 200
    assert CustomerReply.objects.count() == 1
    flows.delivery_cancel(delivery_id=current.pk, reason="customer", actor=Actor.system())
    assert _reply("Why was it cancelled?", MessageSid="SM" + "9" * 32).status_code == 200
    late = CustomerReply.objects.get(provider_id="SM" + "9" * 32)
    assert late.delivery_id == current.pk

    # ops read them on the delivery's page and in their own list (which counts new ones live)
    admin = Client()
    admin.force_login(OpsUserFactory(is_superuser=True))
    page = admin.get(f"/admin/dispatch/delivery/{current.pk}/change/").content.decode()
    assert "customer replies" in page.lower() and "Leave it at the door, please" in page and "Why was it cancelled?" in page
    listing = admin.get("/admin/notifications/customerreply/?q=door").content.decode()
    assert "Leave it at the door, please" in listing and "Why was it cancelled?" not in listing
    assert 'data-events="customer_replied"' in listing


def test_a_reply_from_a_number_we_never_texted_is_kept_for_ops_with_no_delivery(twilio):
    from notifications.models import CustomerReply

    other = DeliveryFactory(customer_phone="+14155550100")  # (a delivery of that number, but no text sent: not matched)
    assert _post(INBOUND, {"MessageSid": "SM" + "5" * 32, "From": "+14155550100", "Body": "Hello?\x00"}).status_code == 200
    reply = CustomerReply.objects.get()
    assert (reply.delivery_id, reply.sender, reply.body) == (None, "+14155550100", "Hello?")
    assert other.customer_replies.count() == 0

    # a closed delivery's texts are answered for a week; later the number may be someone else's
    from datetime import timedelta

    from django.utils import timezone

    done = _assigned_delivery()
    flows.delivery_cancel(delivery_id=done.pk, reason="store closed", actor=Actor.system())
    CustomerMessage.objects.filter(delivery=done).update(created_at=timezone.now() - timedelta(days=6))
    assert customers.sms_reply_received(sender=PHONE, body="Refund?", provider_id="SMa") == "reply"
    CustomerMessage.objects.filter(delivery=done).update(created_at=timezone.now() - timedelta(days=8))
    assert customers.sms_reply_received(sender=PHONE, body="Hi, new number", provider_id="SMb") == "reply"
    assert dict(CustomerReply.objects.filter(sender=PHONE).values_list("body", "delivery_id")) == {
        "Refund?": done.pk, "Hi, new number": None}


def test_a_reply_during_a_reassign_is_told_to_whoever_has_the_delivery_once_it_is_done(twilio, monkeypatch):
    """The driver was read without a lock: a reply racing ops' reassign went to the driver who
    had just lost the delivery (a gate code, to the wrong person)."""
    from tests.concurrency import behind_lock

    told = []
    monkeypatch.setattr(customers, "broadcast_on_commit", lambda groups, event: told.append((groups, event)))
    delivery = _assigned_delivery()

    behind_lock(
        lambda: flows.delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor.system()),
        lambda: customers.sms_reply_received(sender=PHONE, body="Gate code 4411", provider_id="SM" + "4" * 32),
    )

    ((groups, event),) = told
    assert groups == ["ops"] and event["driverId"] is None and event["deliveryId"] == str(delivery.pk)


def test_a_drivers_snapshot_holds_what_the_customers_of_its_deliveries_texted(twilio):
    from asgiref.sync import async_to_sync
    from channels.testing import WebsocketCommunicator

    from config.asgi import application
    from dispatch.models import Assignment
    from tests.api import token_for

    delivery = _assigned_delivery()
    driver = Assignment.objects.get(delivery=delivery, status="active").driver
    assert _reply("Leave it with the neighbour at 4B", MessageSid="SM" + "3" * 32).status_code == 200
    assert _reply("Thanks!", MessageSid="SM" + "2" * 32).status_code == 200

    token = token_for(driver.user)

    async def snapshot():
        comm = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}/?token={token}&snapshot=1")
        assert (await comm.connect())[0]
        first = await comm.receive_json_from(timeout=5)
        await comm.disconnect()
        return first

    first = async_to_sync(snapshot)()
    assert [(r["deliveryId"], r["body"]) for r in first["customerReplies"]] == [
        (str(delivery.pk), "Leave it with the neighbour at 4B"), (str(delivery.pk), "Thanks!")]


def test_a_number_texting_in_a_loop_is_kept_but_told_to_nobody_past_the_hourly_cap(twilio, settings, monkeypatch):
    settings.CUSTOMER_REPLIES_TOLD_PER_HOUR = 3
    told = []
    monkeypatch.setattr(customers, "broadcast_on_commit", lambda groups, event: told.append(event["body"]))
    _assigned_delivery()

    for n in range(5):
        assert customers.sms_reply_received(sender=PHONE, body=f"hello {n}", provider_id=f"SMloop{n}") == "reply"

    assert told == ["hello 0", "hello 1", "hello 2"]
    from notifications.models import CustomerReply
    assert CustomerReply.objects.filter(sender=PHONE).count() == 5  # (all listed in the console)
