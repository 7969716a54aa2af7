"""At most SOCKET_MAX_PER_CREDENTIAL sockets of one kind per login (per customer link on
/ws/track/) in a web process; one more is accepted and closed with 4429 (one leaked token held
300 sockets, each a group member every event is sent to). Over the real Redis channel layer."""
import logging

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from common import consumers
from common.tokens import api_token_create
from config.asgi import application
from tests.api import token_for
from tests.factories import DeliveryFactory, DriverFactory, OpsUserFactory
from tests.sockets import refusal

pytestmark = pytest.mark.django_db(transaction=True)


async def opened(path):
    comm = WebsocketCommunicator(application, path)
    connected, _ = await comm.connect(timeout=10)
    assert connected, path
    return comm


def test_one_socket_over_the_cap_is_closed_with_4429_and_a_closed_one_frees_its_place(settings, caplog):
    settings.SOCKET_MAX_PER_CREDENTIAL = 2
    ops, other = OpsUserFactory(), OpsUserFactory()
    path = f"/ws/ops/?token={token_for(ops)}"
    second_token = api_token_create(ops, name="second device")

    async def scenario():
        first, second = await opened(path), await opened(path)
        assert await refusal(WebsocketCommunicator(application, path)) == 4429
        # another login has a count of its own, and so has another token of the same user (a
        # leaked token filling the cap leaves its user's other credentials their places)
        third = await opened(f"/ws/ops/?token={token_for(other)}")
        fourth = await opened(f"/ws/ops/?token={second_token}")
        await third.disconnect()
        await fourth.disconnect()
        await first.disconnect()
        again = await opened(path)  # the closed socket's place is free
        assert await refusal(WebsocketCommunicator(application, path)) == 4429
        await again.disconnect()
        await second.disconnect()

    with caplog.at_level(logging.INFO, logger="common.consumers"):
        async_to_sync(scenario)()
    assert consumers._open_sockets == {}  # every socket that closed gave its place back
    assert [r.getMessage() for r in caplog.records if "4429" in r.getMessage()] == [
        "OpsConsumer refused (4429): 2 sockets of this credential already open here"] * 2


def test_a_driver_and_a_customer_link_are_capped_each_and_refusals_take_no_place(settings):
    settings.SOCKET_MAX_PER_CREDENTIAL = 1
    driver = DriverFactory(availability="offline")
    delivery, another = DeliveryFactory(), DeliveryFactory()
    mine = f"/ws/drivers/{driver.pk}/?token={token_for(driver.user)}&snapshot=1"
    link = f"/ws/track/{delivery.pk}/?token={delivery.tracking_token}"

    async def scenario():
        own = await opened(mine)
        assert (await own.receive_json_from(timeout=5))["type"] == "availability_snapshot"
        assert await refusal(WebsocketCommunicator(application, mine)) == 4429
        watching = await opened(link)
        assert (await watching.receive_json_from(timeout=5))["type"] == "delivery_snapshot"
        assert await refusal(WebsocketCommunicator(application, link)) == 4429
        # a bad link is refused for what it is, counted nowhere; another delivery's link is its own
        assert await refusal(WebsocketCommunicator(application, f"/ws/track/{delivery.pk}/?token=bad")) == 4401
        other = await opened(f"/ws/track/{another.pk}/?token={another.tracking_token}")
        for comm in (own, watching, other):
            await comm.disconnect()
        assert consumers._open_sockets == {}

    async_to_sync(scenario)()


def test_zero_is_no_cap(settings):
    settings.SOCKET_MAX_PER_CREDENTIAL = 0
    ops = OpsUserFactory()

    async def scenario():
        comms = [await opened(f"/ws/ops/?token={token_for(ops)}") for _ in range(25)]
        for comm in comms:
            await comm.disconnect()

    async_to_sync(scenario)()
    assert consumers._open_sockets == {}
