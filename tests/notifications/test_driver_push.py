"""Drivers register their phones for push; FCM's HTTP v1 backend sends new offers (time to live
= the offer's expiry), withdrawn offers, deliveries taken away and the end of a break to every
device, authenticated with a service account's OAuth2 token, and forgets tokens FCM reports as
unregistered. FCM and Google's token endpoint are a local server answering as their documented
APIs do."""
from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import parse_qs

import pytest
import time_machine
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.utils import timezone
from google.auth import jwt

from availability.services import breaks_expire
from common.actors import Actor
from notifications.models import PushDevice
from notifications.push import FcmPushBackend, PushTransientError
from tests.api import assert_error, client_for
from tests.factories import DeliveryFactory, DriverFactory, OpsUserFactory, online_driver
from tests.notifications.receiver import Answer, Receiver
from workflows import drivers as driver_flows
from workflows import offers as offer_flows
from workflows.deliveries import assignment_create, delivery_cancel, delivery_reassign

pytestmark = pytest.mark.django_db(transaction=True)

UNREGISTERED = json.dumps({"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
                                     "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                                  "errorCode": "UNREGISTERED"}]}}).encode()


@pytest.fixture
def fcm(settings, tmp_path):
    """The local Google: /token (OAuth2 JWT bearer grant) and /v1/projects/…/messages:send."""
    server = Receiver()
    base = f"http://127.0.0.1:{server.server.server_address[1]}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    account = {
        "type": "service_account", "project_id": "dispatch-test", "private_key_id": "k1", "private_key": pem.decode(),
        "client_email": "push@dispatch-test.iam.gserviceaccount.com", "client_id": "1", "token_uri": f"{base}/token",
    }
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(account))
    server.public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    server.token_uri = account["token_uri"]
    server.unregistered = set()

    def respond(received):
        if received.path == "/token":
            return Answer(200, {"Content-Type": "application/json"},
                          json.dumps({"access_token": "ya29.local", "expires_in": 3600, "token_type": "Bearer"}).encode())
        token = received.json()["message"]["token"]
        if token in server.unregistered:
            return Answer(404, {"Content-Type": "application/json"}, UNREGISTERED)
        return Answer(200, {"Content-Type": "application/json"},
                      json.dumps({"name": f"projects/dispatch-test/messages/{len(server.requests)}"}).encode())

    server.responder = respond
    settings.PUSH_BACKEND = "notifications.push.FcmPushBackend"
    settings.FCM_SERVICE_ACCOUNT_FILE, settings.FCM_API_BASE, settings.FCM_PROJECT_ID = str(path), base, ""
    yield server
    server.close()


def _sent(fcm):
    return [r for r in fcm.requests if r.path != "/token"]


def _register(driver, token, platform="android"):
    return client_for(driver.user).post(f"/v2/drivers/{driver.pk}/devices", {"platform": platform, "token": token}, format="json")


def test_a_driver_registers_and_removes_its_own_devices(db):
    driver, other = DriverFactory(), DriverFactory()
    first = _register(driver, "tok-A" * 20)
    assert first.status_code == 201 and first.json()["platform"] == "android" and first.json()["tokenEnd"] == ("tok-A" * 20)[-8:]
    again = _register(driver, "tok-A" * 20, platform="ios")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert PushDevice.objects.get().platform == "ios"

    moved = _register(other, "tok-A" * 20)  # the phone changed hands
    assert moved.status_code == 200 and PushDevice.objects.get().driver_id == other.pk

    as_driver = client_for(driver.user)
    assert_error(as_driver.post(f"/v2/drivers/{other.pk}/devices", {"platform": "web", "token": "x"}, format="json"), 404)
    assert_error(as_driver.delete(f"/v2/drivers/{other.pk}/devices/{first.json()['id']}"), 404)
    assert_error(as_driver.delete(f"/v2/drivers/{driver.pk}/devices/{first.json()['id']}"), 404)  # now the other's
    assert_error(client_for(OpsUserFactory()).post(f"/v2/drivers/{driver.pk}/devices", {"platform": "web", "token": "y"}, format="json"), 403)
    assert "platform" in assert_error(_register(driver, "z", platform="blackberry"), 400)["details"]
    # a token the unique index cannot hold (its entries stop near 2,700 bytes) was a 503
    for bad in ("t" * 2049, "é" * 1000, "has space", "tab\there"):
        assert "token" in assert_error(_register(driver, bad), 400)["details"], bad
    assert _register(driver, "t" * 2048).status_code == 201
    assert client_for(driver.user).delete(f"/v2/drivers/{driver.pk}/devices/{PushDevice.objects.get(token='t' * 2048).pk}").status_code == 204
    assert client_for(other.user).delete(f"/v2/drivers/{other.pk}/devices/{first.json()['id']}").status_code == 204
    assert not PushDevice.objects.exists()


def test_a_new_offer_is_pushed_to_every_device_with_its_expiry_as_time_to_live(fcm):
    driver = online_driver()
    _register(driver, "phone-token")
    _register(driver, "tablet-token", platform="ios")
    delivery = DeliveryFactory()
    offer = offer_flows.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, expires_in_seconds=60, actor=Actor.system())

    (token_request,) = [r for r in fcm.requests if r.path == "/token"]
    grant = {k: v[0] for k, v in parse_qs(token_request.body.decode()).items()}
    assert grant["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    # signed with the service account's key, for Google's token audience (google-auth sets it)
    claims = jwt.decode(grant["assertion"], certs=fcm.public_pem, audience="https://oauth2.googleapis.com/token")
    assert claims["iss"] == "push@dispatch-test.iam.gserviceaccount.com" and "firebase.messaging" in claims["scope"]

    sent = _sent(fcm)
    assert {r.json()["message"]["token"] for r in sent} == {"phone-token", "tablet-token"}
    for request in sent:
        assert request.path == "/v1/projects/dispatch-test/messages:send"
        assert request.headers["authorization"] == "Bearer ya29.local"
        message = request.json()["message"]
        assert message["data"]["type"] == "offer_created" and message["data"]["offerId"] == str(offer.pk)
        assert 55 <= int(message["android"]["ttl"].rstrip("s")) <= 60 and message["android"]["priority"] == "high"
    offer.refresh_from_db()
    assert offer.notification_method == "both"


def test_a_token_fcm_reports_unregistered_is_forgotten_and_the_others_still_get_it(fcm):
    driver = online_driver()
    _register(driver, "old-phone")
    _register(driver, "new-phone")
    fcm.unregistered.add("old-phone")
    event = {"offerId": "o-1", "deliveryId": "d-1", "expiresAt": (timezone.now() + timedelta(seconds=30)).isoformat()}
    assert FcmPushBackend().send_offer(driver_id=str(driver.pk), event=event) is True
    assert list(PushDevice.objects.values_list("token", flat=True)) == ["new-phone"]
    fcm.unregistered.add("new-phone")
    assert FcmPushBackend().send_offer(driver_id=str(driver.pk), event=event) is False
    assert not PushDevice.objects.exists()


def test_an_fcm_outage_is_an_error_the_task_retries(fcm):
    driver = online_driver()
    _register(driver, "phone")
    event = {"offerId": "o-1", "expiresAt": (timezone.now() + timedelta(seconds=30)).isoformat()}
    assert FcmPushBackend().send_offer(driver_id=str(driver.pk), event=event) is True  # the access token is cached now
    fcm.answer(Answer(503, {"Content-Type": "application/json"}, b'{"error": {"code": 503, "status": "UNAVAILABLE"}}'))
    with pytest.raises(PushTransientError):
        FcmPushBackend().send_offer(driver_id=str(driver.pk), event=event)
    assert PushDevice.objects.count() == 1


def test_a_withdrawn_offer_and_the_end_of_a_break_are_pushed(fcm):
    driver = online_driver()
    _register(driver, "phone")
    delivery = DeliveryFactory()
    offer_flows.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, expires_in_seconds=60, actor=Actor.system())
    driver_flows.availability_take_break(driver_id=driver.pk, duration_minutes=1, reason="lunch", actor=Actor.for_user(driver.user))
    types = [r.json()["message"]["data"]["type"] for r in _sent(fcm)]
    assert types == ["offer_created", "offer_cancelled"]
    with time_machine.travel(timezone.now() + timedelta(minutes=2), tick=False):
        breaks_expire()
    types = [r.json()["message"]["data"]["type"] for r in _sent(fcm)]
    assert types[-1] == "break_expired"


def test_a_delivery_taken_away_from_its_driver_is_pushed(fcm):
    driver = online_driver()
    _register(driver, "phone")
    cancelled, reassigned = DeliveryFactory(), DeliveryFactory()
    ops = Actor.for_user(OpsUserFactory())
    assignment_create(delivery_id=cancelled.pk, driver_id=driver.pk, actor=ops)
    delivery_cancel(delivery_id=cancelled.pk, reason="store closed", actor=ops)
    assignment_create(delivery_id=reassigned.pk, driver_id=driver.pk, actor=ops)
    delivery_reassign(delivery_id=reassigned.pk, reason="too slow", actor=ops)

    messages = [r.json()["message"] for r in _sent(fcm)]
    assert [(m["notification"]["title"], m["data"]["type"], m["data"]["deliveryId"], m["data"]["reason"]) for m in messages] == [
        ("Delivery cancelled", "assignment_cancelled", str(cancelled.pk), "delivery_cancelled"),
        ("Delivery reassigned", "assignment_cancelled", str(reassigned.pk), "reassigned"),
    ]
    assert all(m["token"] == "phone" and m["android"]["ttl"] == "300s" for m in messages)


def test_a_driver_keeps_its_ten_latest_devices_listed_in_pages_and_short_tokens_are_not_shown(db):
    """150 registrations were 150 devices, each pushed every offer (one FCM call apiece, 10 s
    timeout each), all listed in one response without `next`; a token of 8 characters or
    fewer was shown whole in `tokenEnd`."""
    driver = DriverFactory()
    tokens = [f"fcm-token-{i:03d}-" + "x" * 140 for i in range(12)]
    start = timezone.now()
    for i, token in enumerate(tokens):
        with time_machine.travel(start + timedelta(seconds=i), tick=False):
            assert _register(driver, token).status_code == 201
    assert sorted(PushDevice.objects.filter(driver=driver).values_list("token", flat=True)) == sorted(tokens[2:])
    with time_machine.travel(start + timedelta(seconds=20), tick=False):
        _register(driver, tokens[2])  # seen again: now the newest, kept when a 13th comes
    with time_machine.travel(start + timedelta(seconds=21), tick=False):
        _register(driver, "fcm-token-new-" + "x" * 140)
    assert tokens[2] in PushDevice.objects.filter(driver=driver).values_list("token", flat=True)
    assert PushDevice.objects.filter(driver=driver).count() == 10

    api = client_for(driver.user)
    first = api.get(f"/v2/drivers/{driver.pk}/devices?limit=4").json()
    assert len(first["devices"]) == 4 and first["next"]
    listed, page = [d["id"] for d in first["devices"]], first
    while page["next"]:
        page = api.get(page["next"]).json()
        listed += [d["id"] for d in page["devices"]]
    assert sorted(listed) == sorted(str(pk) for pk in PushDevice.objects.filter(driver=driver).values_list("pk", flat=True))

    short = _register(DriverFactory(), "a").json()
    assert short["tokenEnd"] == "" and _register(DriverFactory(), "abcdefghijkl").json()["tokenEnd"] == "jkl"


def test_the_migration_trims_the_devices_drivers_had_beyond_the_cap(db):
    """Registrations before the cap left drivers with any number of devices."""
    from importlib import import_module

    from django.db import connection

    trim = import_module("notifications.migrations.0007_push_devices_within_the_cap").TRIM
    crowded, few = DriverFactory(), DriverFactory()
    start = timezone.now()
    for i in range(14):
        PushDevice.objects.create(driver=crowded, platform="android", token=f"crowded-{i:02d}-" + "x" * 40,
                                  created_at=start, last_seen_at=start + timedelta(seconds=i))
    for i in range(3):
        PushDevice.objects.create(driver=few, platform="ios", token=f"few-{i}-" + "x" * 40, created_at=start, last_seen_at=start)

    with connection.cursor() as cursor:
        cursor.execute(trim)

    kept = sorted(PushDevice.objects.filter(driver=crowded).values_list("token", flat=True))
    assert kept == sorted(f"crowded-{i:02d}-" + "x" * 40 for i in range(4, 14))  # the 10 seen last
    assert PushDevice.objects.filter(driver=few).count() == 3


def test_two_registrations_at_once_leave_the_driver_ten_devices(db):
    """Each registration trimmed what it saw, without the other's new device: two at once left
    11 (the second waits for the first now, and trims after it)."""
    from notifications import services
    from tests.concurrency import behind_lock

    driver = DriverFactory()
    start = timezone.now() - timedelta(minutes=5)
    for i in range(10):
        services.device_register(driver=driver, platform="android", token=f"old-{i}", now=start + timedelta(seconds=i))

    behind_lock(
        hold=lambda: services.device_register(driver=driver, platform="android", token="first",
                                              now=start + timedelta(seconds=20)),
        call=lambda: services.device_register(driver=driver, platform="ios", token="second",
                                              now=start + timedelta(seconds=21)),
    )

    tokens = set(PushDevice.objects.filter(driver=driver).values_list("token", flat=True))
    assert len(tokens) == 10 and {"first", "second"} <= tokens and not {"old-0", "old-1"} & tokens


def test_a_customers_text_back_is_pushed_to_the_driver_who_has_the_delivery(fcm):
    from notifications import customers
    from notifications.models import CustomerMessage

    driver = online_driver()
    _register(driver, "phone")
    delivery = DeliveryFactory(customer_phone="+14155552671", seller_order_id="ORD-77")
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    CustomerMessage.objects.filter(delivery=delivery, channel="sms").update(status="sent")  # (as Twilio took it)

    text = "Gate code 4411 " + "🚪" * 400  # (1,615 bytes in UTF-8: FCM refuses a message over 4,096)
    assert customers.sms_reply_received(sender="+14155552671", body=text, provider_id="SM1") == "reply"

    (message,) = [r.json()["message"] for r in _sent(fcm)]
    assert message["notification"]["title"] == "Customer of ORD-77"
    assert message["notification"]["body"] == "Gate code 4411 " + "🚪" * 246  # (1,000 bytes, no character cut)
    assert message["data"] == {"type": "customer_replied", "replyId": message["data"]["replyId"], "deliveryId": str(delivery.pk)}
