"""WebSocket paths the routes do not know, or know without their trailing slash.

Channels' URLRouter raised `ValueError: No route found` for an unknown path: the upgrade was
answered 500 and the server logged a traceback (a client that left out the slash of
`/ws/ops/` got that)."""
import logging

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from config.asgi import application
from tests.api import token_for
from tests.factories import DriverFactory, OpsUserFactory
from tests.sockets import refusal

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("path", [
    "/ws/nope/", "/ws/", "/ws//drivers/x/", "/ws/drivers/", "/ws/track/", "/ws/ops/extra/",
    "/ws/drivers/{driver}/extra/", "/ws/track/{driver}/x/y/",
])
def test_an_unknown_socket_path_is_closed_with_4404_and_nothing_logged_as_an_error(path, caplog):
    driver = DriverFactory()
    path = path.format(driver=driver.pk)

    async def scenario():
        comm = WebsocketCommunicator(application, f"{path}?token={token_for(driver.user)}")
        assert await refusal(comm) == 4404, path

    with caplog.at_level(logging.WARNING):
        async_to_sync(scenario)()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_sockets_answer_without_their_trailing_slash_too():
    driver = DriverFactory(availability="offline")
    ops = OpsUserFactory()

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}?token={token_for(driver.user)}&snapshot=1")
        assert (await comm.connect(timeout=10))[0]
        assert (await comm.receive_json_from(timeout=5))["type"] == "availability_snapshot"
        await comm.disconnect()

        comm = WebsocketCommunicator(application, f"/ws/ops?token={token_for(ops)}")
        assert (await comm.connect(timeout=10))[0]
        await comm.disconnect()

        assert await refusal(WebsocketCommunicator(application, "/ws/ops")) == 4401
        assert await refusal(WebsocketCommunicator(application, "/ws/support")) == 4401
        assert await refusal(WebsocketCommunicator(application, f"/ws/track/{driver.pk}?token=bad")) == 4401

    async_to_sync(scenario)()


@pytest.mark.parametrize("method", ["get", "post", "head"])
@pytest.mark.parametrize("path", ["/ws/ops/", "/ws/drivers/x/?token=secret-token", "/ws/nope"])
def test_a_socket_path_asked_over_plain_http_says_it_wants_an_upgrade(method, path):
    """A browser tab or curl on a socket path got Django's HTML 404 (and a POST, the CSRF page)."""
    from django.test import Client

    response = getattr(Client(), method)(path)

    assert response.status_code == 426
    assert response["Upgrade"] == "websocket" and response["Content-Type"] == "application/json"
    if method != "head":
        body = response.json()
        assert (body["statusCode"], body["error"], body["path"]) == (426, "Upgrade Required", path.split("?")[0])
        assert "WebSocket" in body["message"] and "secret-token" not in response.content.decode()
