"""`/ws/ops/` over the real Redis channel layer."""
import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.contrib.gis.geos import Point

from common.actors import Actor
from common.broadcast import send_now
from config.asgi import application
from dispatch import events
from dispatch.consumers import OpsConsumer
from dispatch.services import DeliveryInput
from workflows.deliveries import assignment_create, delivery_cancel, delivery_create
from tests.factories import DriverFactory, OpsUserFactory
from tests.typecheck import assert_event_shape
from tests.sockets import refusal
from tests.api import token_for

pytestmark = pytest.mark.django_db(transaction=True)


def connect(path, headers=None):
    comm = WebsocketCommunicator(application, path, headers=headers or [])
    return comm


def test_the_channel_layer_is_redis():
    assert isinstance(get_channel_layer(), RedisPubSubChannelLayer)  # (Redis pub/sub: settings.CHANNEL_LAYERS)


def test_staff_receive_delivery_events_after_commit(integration_user):
    ops_user = OpsUserFactory()
    driver = DriverFactory()
    actor = Actor.for_user(integration_user)

    async def scenario():
        comm = connect(f"/ws/ops/?token={token_for(ops_user)}")
        connected, _ = await comm.connect()
        assert connected

        delivery = await database_sync_to_async(delivery_create)(
            data=DeliveryInput(
                seller_order_id="WS-1", store_name="Store", pickup_location=Point(77.6, 12.9, srid=4326),
                dropoff_location=Point(77.61, 12.91, srid=4326),
            ),
            created_by=integration_user,
            actor=actor,
        )
        created = await comm.receive_json_from(timeout=5)
        assert_event_shape(created, events.DeliveryCreatedEvent)
        assert created["deliveryId"] == str(delivery.pk) and created["status"] == "ready"

        await database_sync_to_async(assignment_create)(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        received = [await comm.receive_json_from(timeout=5) for _ in range(3)]
        by_type = {e["type"]: e for e in received}
        # (the ETA too, as the customer gets it: SPEC, /ws/ops/ gets every event; it was the customer's only)
        assert set(by_type) == {"availability_changed", "delivery_status_changed", "delivery_eta_updated"}
        assert by_type["delivery_eta_updated"]["deliveryId"] == str(delivery.pk)
        assert_event_shape(by_type["delivery_status_changed"], events.DeliveryStatusChangedEvent)
        assert by_type["delivery_status_changed"]["status"] == "assigned"
        assert by_type["delivery_status_changed"]["driverId"] == str(driver.pk)

        await database_sync_to_async(delivery_cancel)(delivery_id=delivery.pk, reason="test", actor=Actor.system())
        received = [await comm.receive_json_from(timeout=5) for _ in range(3)]
        by_type = {e["type"]: e for e in received}
        assert set(by_type) == {"assignment_cancelled", "availability_changed", "delivery_cancelled"}
        assert_event_shape(by_type["delivery_cancelled"], events.DeliveryCancelledEvent)
        assert_event_shape(by_type["assignment_cancelled"], events.AssignmentCancelledEvent)
        assert by_type["assignment_cancelled"]["driverId"] == str(driver.pk)
        assert by_type["delivery_cancelled"]["fromStatus"] == "assigned"
        assert by_type["delivery_cancelled"]["driverId"] == str(driver.pk)  # (the driver who had it)
        await comm.disconnect()

    async_to_sync(scenario)()


def test_nothing_is_sent_when_the_transaction_rolls_back(integration_user):
    ops_user = OpsUserFactory()

    def create_then_fail():
        from django.db import transaction

        try:
            with transaction.atomic():
                delivery_create(
                    data=DeliveryInput(
                        seller_order_id="WS-RB", store_name="Store", pickup_location=Point(77.6, 12.9, srid=4326),
                        dropoff_location=Point(77.61, 12.91, srid=4326),
                    ),
                    created_by=integration_user,
                    actor=Actor.system(),
                )
                raise RuntimeError("boom")
        except RuntimeError:
            pass

    async def scenario():
        comm = connect(f"/ws/ops/?token={token_for(ops_user)}")
        assert (await comm.connect())[0]
        await database_sync_to_async(create_then_fail)()
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()

    async_to_sync(scenario)()


def test_sockets_without_a_valid_token_close_4401_and_non_staff_4403(integration_user):
    async def scenario():
        for path in ("/ws/ops/", "/ws/ops/?token=nope"):
            comm = connect(path)
            assert await refusal(comm) == 4401, path
        comm = connect(f"/ws/ops/?token={token_for(integration_user)}")
        assert await refusal(comm) == 4403

    async_to_sync(scenario)()


def test_a_client_that_sets_headers_may_send_its_token_as_on_the_api(integration_user):
    """`Authorization: Token <key>`, the REST API's scheme; `?token=` wins when both are given."""
    ops_user = OpsUserFactory()

    def auth(key):
        return [(b"authorization", f"Token {key}".encode())]

    async def scenario():
        comm = connect("/ws/ops/", headers=auth(token_for(ops_user)))
        assert (await comm.connect())[0] is True
        assert await comm.receive_nothing(timeout=0.2)  # open, not closed
        await comm.disconnect()
        lower = connect("/ws/ops/", headers=[(b"authorization", f"token  {token_for(ops_user)}".encode())])
        assert (await lower.connect())[0] is True  # the scheme in any case, as DRF reads it
        assert await lower.receive_nothing(timeout=0.2)
        await lower.disconnect()
        for path, headers, code in (
            ("/ws/ops/", auth("nope"), 4401),
            ("/ws/ops/", auth(f"{token_for(ops_user)} extra"), 4401),
            ("/ws/ops/", [(b"authorization", f"Bearer {token_for(ops_user)}".encode())], 4401),
            ("/ws/ops/", auth(token_for(integration_user)), 4403),
            (f"/ws/ops/?token={token_for(integration_user)}", auth(token_for(ops_user)), 4403),
        ):
            assert await refusal(connect(path, headers=headers)) == code, (path, headers)

    async_to_sync(scenario)()


def test_a_bad_token_never_falls_back_to_the_browsers_session():
    """A console logged in by session that also sends a token: the token decides, and a bad
    one, short or absurdly long, is refused (before, a key over 64 characters was skipped and
    the session's user let in)."""
    from django.test import Client

    ops_user = OpsUserFactory()
    browser = Client()
    browser.force_login(ops_user)
    cookie = [(b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())]

    async def scenario():
        comm = connect("/ws/ops/", headers=cookie)
        assert (await comm.connect())[0] is True  # the session alone lets the console in
        assert await comm.receive_nothing(timeout=0.2)
        await comm.disconnect()
        for key in ("nope", "x" * 65, "y" * 9000):
            assert await refusal(connect(f"/ws/ops/?token={key}", headers=cookie)) == 4401, len(key)
            auth = [*cookie, (b"authorization", f"Token {key}".encode())]
            assert await refusal(connect("/ws/ops/", headers=auth)) == 4401, len(key)

    async_to_sync(scenario)()


def test_a_browser_from_a_foreign_origin_is_refused_but_an_allowed_origin_connects():
    ops_user = OpsUserFactory()

    async def scenario():
        bad = connect(f"/ws/ops/?token={token_for(ops_user)}", headers=[(b"origin", b"https://evil.example")])
        assert (await bad.connect())[0] is False
        good = connect(f"/ws/ops/?token={token_for(ops_user)}", headers=[(b"origin", b"http://localhost")])
        assert (await good.connect())[0] is True
        await good.disconnect()

    async_to_sync(scenario)()


def test_a_browser_page_on_another_port_of_this_host_is_refused(settings):
    """Cookies do not tell ports apart: a page of another app on the box (127.0.0.1:9999)
    carries the console's session cookie, and its socket to /ws/ops/ was let in (the host alone
    was checked) as the logged-in dispatcher. Same origin (the Host, port included), or an origin
    in CSRF_TRUSTED_ORIGINS."""
    ops_user = OpsUserFactory()
    url = f"/ws/ops/?token={token_for(ops_user)}"
    host = (b"host", b"127.0.0.1:8200")

    async def opens(origin: bytes, headers=(host,)) -> bool:
        comm = connect(url, headers=[(b"origin", origin), *headers])
        ok = (await comm.connect())[0]
        if ok:
            await comm.disconnect()
        return ok

    from common.consumers import ApiOriginValidator

    async def scenario():
        assert await opens(b"http://127.0.0.1:9999") is False
        assert await opens(b"http://127.0.0.1:8200") is True
        assert await opens(b"https://LOCALHOST", headers=[(b"host", b"localhost:443")]) is True  # default port, any case
        settings.CSRF_TRUSTED_ORIGINS = ["http://127.0.0.1:9999", "https://*.example.com"]
        assert await opens(b"http://127.0.0.1:9999") is True
        # a wildcard, as Django's CSRF check reads it (the host must be in ALLOWED_HOSTS too)
        assert ApiOriginValidator._same_or_trusted("https://console.example.com", "other.host")
        assert not ApiOriginValidator._same_or_trusted("http://console.example.com", "other.host")  # another scheme

    async_to_sync(scenario)()


def test_every_event_type_reaches_ops_and_unknown_ones_do_not_break_the_socket():
    ops_user = OpsUserFactory()
    expected = {
        "delivery_created", "delivery_status_changed", "delivery_cancelled", "availability_changed", "break_expired",
        "offer_created", "offer_accepted", "offer_rejected", "offer_expired", "offer_cancelled",
        "unassigned_order_escalated", "support_ticket_created", "zone_health_updated", "driver_performance_updated",
        "delivery_eta_updated", "delivery_location_updated",
    }
    assert expected <= OpsConsumer.relays

    async def scenario():
        comm = connect(f"/ws/ops/?token={token_for(ops_user)}")
        assert (await comm.connect())[0]
        await database_sync_to_async(send_now)(["ops"], {"type": "something_new", "x": 1})
        await database_sync_to_async(send_now)(["ops"], {"type": "driver_performance_updated", "driverId": "d"})
        got = await comm.receive_json_from(timeout=5)
        assert got == {"type": "driver_performance_updated", "driverId": "d"}
        await comm.disconnect()

    async_to_sync(scenario)()
