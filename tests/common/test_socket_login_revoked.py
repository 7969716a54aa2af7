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
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from common import hooks
from common.models import ApiToken
from common.roles import SUPPORT_GROUP
from common.tokens import api_token_create, api_token_issue, api_tokens_revoke
from config.asgi import application
from tests.api import client_for
from tests.factories import DriverFactory, OpsUserFactory, SupportUserFactory

pytestmark = pytest.mark.django_db(transaction=True)


async def open_socket(path, headers=()):
    comm = WebsocketCommunicator(application, path, headers=list(headers))
    connected, _ = await comm.connect(timeout=10)
    assert connected
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


@pytest.mark.parametrize("how", ["instance delete", "queryset delete", "expiry saved"])
def test_a_token_deleted_or_expired_through_the_models_closes_its_sockets_at_once(how):
    """From a shell (`token.delete()`, `ApiToken.objects.filter(…).delete()`, a new expiry
    saved), not through `api_tokens_revoke` or the admin: the token's sockets stayed open until
    their routine check, 5 minutes, while REST already refused it."""
    driver = DriverFactory()
    key, token = api_token_issue(driver.user, name="phone", ttl=timedelta(days=1))
    kept, _ = api_token_issue(driver.user, name="tablet", ttl=timedelta(days=1))

    def change():
        if how == "instance delete":
            ApiToken.objects.get(pk=token.pk).delete()
        elif how == "queryset delete":
            ApiToken.objects.filter(pk=token.pk).delete()
        else:
            token.expires_at = timezone.now() - timedelta(seconds=1)
            token.save()

    async def scenario():
        revoked = await open_socket(f"/ws/drivers/{driver.pk}/?token={key}")
        other = await open_socket(f"/ws/drivers/{driver.pk}/?token={kept}")
        await database_sync_to_async(change)()
        assert await closed_with(revoked) == 4401
        assert await other.receive_nothing(timeout=0.3)
        await other.disconnect()

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
        ops_user.is_active = False
        ops_user.save()  # (any path: the admin's form, a shell)

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
        hooks.login_revoked(driver.user)  # (an update sends no signal: as a caller that knows does)

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
    def broken(scope, allowed):
        raise RuntimeError("database away")

    async def scenario():
        comm = await open_socket(f"/ws/ops/?token={key}")
        monkeypatch.setattr(consumers, "_login_check", broken)
        await database_sync_to_async(hooks.login_revoked)(ops_user)
        assert await closed_with(comm) == 1011

    async_to_sync(scenario)()


def test_a_role_taken_away_closes_the_sockets_that_needed_it_with_4403():
    """A staff flag removed closes the ops socket; the support group removed (from either side
    of the relation) closes the agent's support socket. The login itself still holds: 4403."""
    ops_user = OpsUserFactory()
    agent, other_agent = SupportUserFactory(), SupportUserFactory()
    ops_key = api_token_create(ops_user, name="t")
    agent_key, other_key = api_token_create(agent, name="t"), api_token_create(other_agent, name="t")

    def demote():
        ops_user.is_staff = False
        ops_user.save(update_fields=["is_staff"])

    def remove_from_support(user, *, from_group_side=False):
        group = Group.objects.get(name=SUPPORT_GROUP)
        if from_group_side:
            group.user_set.remove(user)
        else:
            user.groups.remove(group)

    async def scenario():
        ops_socket = await open_socket(f"/ws/ops/?token={ops_key}")
        ops_support_socket = await open_socket(f"/ws/support/?token={ops_key}")
        agent_socket = await open_socket(f"/ws/support/?token={agent_key}")
        other_socket = await open_socket(f"/ws/support/?token={other_key}")
        await database_sync_to_async(demote)()
        assert await closed_with(ops_socket) == 4403
        assert await closed_with(ops_support_socket) == 4403  # staff could see support's queue too
        assert await agent_socket.receive_nothing(timeout=0.3)
        await database_sync_to_async(remove_from_support)(agent)
        assert await closed_with(agent_socket) == 4403
        assert await other_socket.receive_nothing(timeout=0.3)
        await database_sync_to_async(remove_from_support)(other_agent, from_group_side=True)
        assert await closed_with(other_socket) == 4403

    async_to_sync(scenario)()


def support_socket_closes_on(change, agent=None) -> int | None:
    """The close code of an agent's support socket (on a token) after `change()` commits."""
    agent = agent or SupportUserFactory()
    key = api_token_create(agent, name="t")
    codes = []

    async def scenario():
        comm = await open_socket(f"/ws/support/?token={key}")
        await database_sync_to_async(change)()
        codes.append(await closed_with(comm))

    async_to_sync(scenario)()
    return codes[0]


def test_clearing_a_group_closes_its_members_support_sockets():
    assert support_socket_closes_on(lambda: Group.objects.get(name=SUPPORT_GROUP).user_set.clear()) == 4403


def test_a_password_changed_in_the_admin_closes_that_users_session_sockets_and_keeps_token_sockets():
    """The admin's password form (an ops lead resetting a lost laptop's login): the user's
    browser sessions end, so do their sockets; sockets on an API token (which a password
    change does not revoke, as in Django) stay."""
    agent = SupportUserFactory()
    key = api_token_create(agent, name="t")
    browser, admin = Client(), Client()
    browser.force_login(agent)
    admin.force_login(OpsUserFactory(is_superuser=True))
    cookie = [(b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())]

    def reset_password():
        return admin.post(f"/admin/common/user/{agent.pk}/password/",
                          {"password1": "a-new-Pass-4242", "password2": "a-new-Pass-4242"})

    async def scenario():
        by_session = await open_socket("/ws/support/", cookie)
        by_token = await open_socket(f"/ws/support/?token={key}")
        response = await database_sync_to_async(reset_password)()
        assert response.status_code == 302, getattr(response, "context", None) and response.context["form"].errors
        assert await closed_with(by_session) == 4401
        assert await by_token.receive_nothing(timeout=0.5)
        await by_token.disconnect()

    async_to_sync(scenario)()


def test_a_drivers_socket_stays_open_when_their_login_is_edited_without_losing_anything():
    """A harmless edit (a name) re-checks the socket, which passes."""
    driver = DriverFactory()
    key = api_token_create(driver.user, name="t")

    def rename():
        driver.user.first_name = "Renamed"
        driver.user.save()

    async def scenario():
        comm = await open_socket(f"/ws/drivers/{driver.pk}/?token={key}")
        await database_sync_to_async(rename)()
        assert await comm.receive_nothing(timeout=0.8)
        await comm.disconnect()

    async_to_sync(scenario)()



@pytest.mark.parametrize("change", ["rename", "delete"])
def test_renaming_or_deleting_the_support_group_closes_its_members_support_sockets(change):
    """Roles are group names: a renamed group is no longer the role; a deleted one takes its
    memberships with it, and sends no m2m signal."""
    def apply():
        group = Group.objects.get(name=SUPPORT_GROUP)
        if change == "rename":
            group.name = "support-old"
            group.save()
        else:
            group.delete()

    assert support_socket_closes_on(apply) == 4403


def test_deleting_a_user_closes_their_sockets():
    agent = SupportUserFactory()
    assert support_socket_closes_on(agent.delete, agent) == 4401


def test_a_routine_check_sees_what_sends_no_signal_and_keeps_sockets_open_when_it_cannot_run(monkeypatch, settings):
    """A bulk update (no model signal) takes the staff flag away: the next routine check
    (every SOCKET_LOGIN_RECHECK_SECONDS) closes the ops socket with 4403. A routine check that
    cannot run (the database away) is no reason to drop every client: the socket stays open
    and checks again later. A token socket of a still-staff user stays open throughout."""
    from django.contrib.auth import get_user_model

    from common import consumers

    settings.SOCKET_LOGIN_RECHECK_SECONDS = 1
    demoted, kept = OpsUserFactory(), OpsUserFactory()
    demoted_key, kept_key = api_token_create(demoted, name="t"), api_token_create(kept, name="t")
    real_check, failures = consumers._login_check, []

    @database_sync_to_async
    def broken(scope, allowed):
        failures.append(scope["user"].pk)
        raise RuntimeError("database away")

    async def scenario():
        losing = await open_socket(f"/ws/ops/?token={demoted_key}")
        staying = await open_socket(f"/ws/ops/?token={kept_key}")
        monkeypatch.setattr(consumers, "_login_check", broken)  # (after the check on connect)
        assert await losing.receive_nothing(timeout=2.5)  # two routine checks failed: still open
        assert demoted.pk in failures and kept.pk in failures
        monkeypatch.setattr(consumers, "_login_check", real_check)
        await database_sync_to_async(get_user_model().objects.filter(pk=demoted.pk).update)(is_staff=False)
        assert await closed_with(losing, timeout=3) == 4403
        assert await staying.receive_nothing(timeout=1.5)
        await staying.disconnect()

    async_to_sync(scenario)()


def test_a_socket_whose_token_expired_closes_even_when_the_check_cannot_run(monkeypatch, settings):
    """At its token's expiry the check fails (the database away): the socket closes (1011)
    rather than staying open past its expiry, or checking again at once in a loop."""
    from common import consumers

    settings.SOCKET_LOGIN_RECHECK_SECONDS = 60
    ops_user = OpsUserFactory()
    key, _ = api_token_issue(ops_user, name="short", ttl=timedelta(seconds=2))
    calls = []

    @database_sync_to_async
    def broken(scope, allowed):
        calls.append(1)
        raise RuntimeError("database away")

    async def scenario():
        comm = await open_socket(f"/ws/ops/?token={key}")
        monkeypatch.setattr(consumers, "_login_check", broken)
        assert await closed_with(comm, timeout=6) == 1011
        assert len(calls) == 1

    async_to_sync(scenario)()


def test_a_consumer_cancelled_without_its_disconnect_stops_checking(monkeypatch, settings):
    """An application task cancelled mid-life (a server shutting down, a client gone while a
    handler awaited) never reaches `disconnect`: its routine login check still goes with it,
    instead of keeping the dead consumer alive and checking every few minutes."""
    import asyncio

    from common import consumers

    settings.SOCKET_LOGIN_RECHECK_SECONDS = 1
    key = api_token_create(OpsUserFactory(), name="t")
    real_check, calls = consumers._login_check, []

    async def counting(scope, allowed):
        calls.append(1)
        return await real_check(scope, allowed)

    async def scenario():
        comm = await open_socket(f"/ws/ops/?token={key}")
        monkeypatch.setattr(consumers, "_login_check", counting)  # (after the check on connect)
        comm.future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await comm.future
        await asyncio.sleep(1.5)  # past the first routine check (0.8-1.0 s after connect)
        assert calls == []

    async_to_sync(scenario)()


def test_pruning_expired_tokens_or_saving_a_token_unchanged_tells_nobody(monkeypatch):
    """Every login prunes the user's expired tokens: each deletion told the caches and the
    sockets (a query, a cache generation bump, a group send) for tokens nothing accepted."""
    from common.tokens import api_tokens_prune

    driver = DriverFactory()
    _, old = api_token_issue(driver.user, name="login", ttl=timedelta(days=1))
    _, live_token = api_token_issue(driver.user, name="login", ttl=timedelta(days=1))
    ApiToken.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    told = []
    monkeypatch.setattr(hooks, "_login_revoked", [told.append])

    assert api_tokens_prune(driver.user) == 1
    live_token.save(update_fields=["name"])
    assert told == []

    live_token.expires_at = timezone.now()
    live_token.save(update_fields=["expires_at"])
    assert [user.pk for user in told] == [driver.user.pk]


@pytest.mark.parametrize("path", ["driver", "ops"])
def test_a_token_revoked_while_its_socket_connects_closes_it(monkeypatch, path):
    """The revocation committed between the look-up on connect and the socket's joining its
    login's group: its message reached no one, and the socket stayed open on the dead token,
    getting events, until its routine check minutes later (an audit: 22 of 60 driver sockets)."""
    from channels.layers import get_channel_layer

    from common.consumers import login_group
    from tests.sockets import refusal

    user = DriverFactory().user if path == "driver" else OpsUserFactory()
    key, _ = api_token_issue(user, name="phone", ttl=timedelta(days=1))
    url = f"/ws/drivers/{user.driver.pk}/?token={key}" if path == "driver" else f"/ws/ops/?token={key}"
    layer = get_channel_layer()
    real_add = layer.group_add

    async def add(group, channel):
        if group == login_group(user.pk):  # revoked (and told) just before this socket is in the group
            await database_sync_to_async(api_tokens_revoke)(user, name="phone")
        await real_add(group, channel)

    monkeypatch.setattr(layer, "group_add", add)
    assert async_to_sync(refusal)(WebsocketCommunicator(application, url)) == 4401


def test_a_socket_whose_login_cannot_be_checked_on_connect_is_refused_1011(monkeypatch):
    """The database away at the check after the join: the connect raised, the socket died with no
    close code and its channel stayed in its groups, a dead member every event was sent to."""
    from channels.layers import get_channel_layer

    from common import consumers
    from tests.sockets import refusal

    user = OpsUserFactory()
    key = api_token_create(user, name="t")

    @database_sync_to_async
    def broken(scope, allowed):
        raise RuntimeError("database away")

    monkeypatch.setattr(consumers, "_login_check", broken)
    group = consumers.login_group(user.pk)

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/ops/?token={key}")
        code = await refusal(comm)
        await comm.disconnect()  # (the server's websocket.disconnect after the close)
        layer = get_channel_layer()._get_layer()  # (pub/sub: this loop's members of the group)
        return code, len(layer.groups.get(layer._get_group_channel_name(group), ()))

    code, members = async_to_sync(scenario)()
    assert code == 1011 and members == 0  # refused, and out of its groups again
