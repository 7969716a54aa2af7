"""A socket's login revoked while it is open (docs/api.md: "a revoked or expired token stops
working at once everywhere"): the ops, driver and support sockets close with 4401 when their
token is revoked or expires, or their login is deactivated; a socket of the same user on
another, live token stays. Over the real Redis channel layer, with committed rows (the check
runs on a worker thread)."""
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from common import hooks
from common.models import ApiToken
from common.tokens import api_token_create, api_token_issue, api_tokens_revoke
from config.asgi import application
from tests.api import client_for
from tests.factories import DriverFactory, OpsUserFactory, SupportUserFactory

pytestmark = pytest.mark.django_db(transaction=True)


async def open_socket(path, headers=()):
    comm = WebsocketCommunicator(application, path, headers=list(headers))
    connected, _ = await comm.connect(timeout=10)
    assert connected
    if path.startswith("/ws/drivers/"):
        assert (await comm.receive_json_from(timeout=5))["type"] == "availability_snapshot"
    assert await comm.receive_nothing(timeout=0.2)  # open (a refusal would close at once)
    return comm


async def closed_with(comm, timeout=5) -> int | None:
    message = await comm.receive_output(timeout=timeout)
    assert message["type"] == "websocket.close", message
    return message.get("code")


def test_revoking_one_token_closes_its_sockets_and_leaves_the_users_other_tokens_sockets_open():
    agent = SupportUserFactory()
    first, second = api_token_create(agent, name="phone"), api_token_create(agent, name="laptop")

    async def scenario():
        on_first = await open_socket(f"/ws/support/?token={first}")
        on_second = await open_socket("/ws/support/", [(b"authorization", f"Token {second}".encode())])
        await database_sync_to_async(api_tokens_revoke)(agent, name="phone")
        assert await closed_with(on_first) == 4401
        assert await on_second.receive_nothing(timeout=0.5)  # still live
        await on_second.disconnect()

    async_to_sync(scenario)()


def test_logging_out_through_the_api_closes_the_sockets_of_that_token():
    ops_user = OpsUserFactory()
    key = api_token_create(ops_user, name="login")

    async def scenario():
        comm = await open_socket(f"/ws/ops/?token={key}")
        client = client_for()
        client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        assert (await database_sync_to_async(client.delete)("/v2/auth/token")).status_code == 204
        assert await closed_with(comm) == 4401

    async_to_sync(scenario)()


def test_a_deactivated_login_closes_its_token_and_session_sockets():
    ops_user = OpsUserFactory()
    key = api_token_create(ops_user, name="t")
    browser = Client()
    browser.force_login(ops_user)
    cookie = (b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())

    def deactivate():
        type(ops_user).objects.filter(pk=ops_user.pk).update(is_active=False)
        hooks.login_revoked(ops_user)  # as the admin's user form does

    async def scenario():
        by_token = await open_socket(f"/ws/ops/?token={key}")
        by_session = await open_socket("/ws/ops/", [cookie])
        await database_sync_to_async(deactivate)()
        assert await closed_with(by_token) == 4401
        assert await closed_with(by_session) == 4401

    async_to_sync(scenario)()


def test_a_drivers_socket_closes_when_its_token_expires_or_its_expiry_is_brought_forward():
    driver = DriverFactory()
    soon, _ = api_token_issue(driver.user, name="short", ttl=timedelta(seconds=3))
    later, later_token = api_token_issue(driver.user, name="long", ttl=timedelta(days=1))

    def bring_forward():
        ApiToken.objects.filter(pk=later_token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        hooks.login_revoked(driver.user)  # as the admin's token form does

    async def scenario():
        expiring = await open_socket(f"/ws/drivers/{driver.pk}/?token={soon}")
        other = await open_socket(f"/ws/drivers/{driver.pk}/?token={later}")
        assert await closed_with(expiring, timeout=10) == 4401  # at its expiry, 3 s after it was made
        assert await other.receive_nothing(timeout=0.3)
        await database_sync_to_async(bring_forward)()
        assert await closed_with(other) == 4401

    async_to_sync(scenario)()


def test_logging_out_of_one_browser_closes_that_sessions_sockets_only():
    """Django's logout flushes the session after its signal; the sockets of that session are
    told once it is gone. The same agent's other browser (another session) stays."""
    agent = SupportUserFactory()
    leaving, staying = Client(), Client()
    leaving.force_login(agent)
    staying.force_login(agent)

    def cookie(browser):
        return [(b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())]

    async def scenario():
        gone = await open_socket("/ws/support/", cookie(leaving))
        kept = await open_socket("/ws/support/", cookie(staying))
        response = await database_sync_to_async(leaving.post)("/support/logout/")
        assert response.status_code == 302
        assert await closed_with(gone) == 4401
        assert await kept.receive_nothing(timeout=0.5)
        await kept.disconnect()

    async_to_sync(scenario)()


def test_a_check_that_cannot_run_closes_the_socket_for_its_client_to_reconnect(monkeypatch):
    """The database away during the re-check: the socket is not left open unchecked; 1011 (a
    server error: reconnect), not 4401 (which would send the user to log in again)."""
    from common import consumers

    ops_user = OpsUserFactory()
    key = api_token_create(ops_user, name="t")

    @database_sync_to_async
    def broken(scope):
        raise RuntimeError("database away")

    async def scenario():
        comm = await open_socket(f"/ws/ops/?token={key}")
        monkeypatch.setattr(consumers, "_login_still_valid", broken)
        await database_sync_to_async(hooks.login_revoked)(ops_user)
        assert await closed_with(comm) == 1011

    async_to_sync(scenario)()
