import uuid

import pytest
from asgiref.sync import async_to_sync
from rest_framework.test import APIClient

from common.redis import get_redis
from tests.factories import DeliveryFactory, DriverFactory, IntegrationUserFactory, OpsUserFactory


@pytest.fixture(autouse=True)
def clean_redis(settings):
    """Tests use their own Redis database (see config/settings/test.py); empty it per test."""
    assert not settings.REDIS_URL.endswith("/0"), "tests must not touch the development Redis database"
    get_redis().flushdb()
    yield


def client_for(user=None):
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {user.auth_token.key}")
    return client


@pytest.fixture
def anon():
    return APIClient()


@pytest.fixture
def ops_user(db):
    return OpsUserFactory()


@pytest.fixture
def ops(ops_user):
    return client_for(ops_user)


@pytest.fixture
def integration_user(db):
    return IntegrationUserFactory()


@pytest.fixture
def integration(integration_user):
    return client_for(integration_user)


@pytest.fixture
def agent(db):
    """A support agent (group `support`, not staff)."""
    from tests.factories import SupportUserFactory

    return SupportUserFactory(first_name="Sam", last_name="Agent")


@pytest.fixture
def driver(db):
    return DriverFactory()


@pytest.fixture
def driver_client(driver):
    return client_for(driver.user)


@pytest.fixture
def delivery(integration_user):
    return DeliveryFactory(created_by=integration_user)


def assert_error(response, status):
    assert response.status_code == status, (response.status_code, response.content)
    body = response.json()
    for key in ("statusCode", "timestamp", "path", "message", "error"):
        assert key in body, (key, body)
    assert body["statusCode"] == status
    assert body["timestamp"].endswith("Z")
    return body


class ChannelListener:
    """Joins groups on the real Redis channel layer and collects what is sent to them."""

    def __init__(self, groups):
        from channels.layers import get_channel_layer

        self.layer = get_channel_layer()
        self.groups = groups
        # A plain channel name (no "!") is read straight from Redis, with no buffer tied to one
        # event loop, so each drain() may run in its own loop.
        self.channel = f"test-listener.{uuid.uuid4().hex}"
        for g in groups:
            async_to_sync(self.layer.group_add)(g, self.channel)

    def drain(self, timeout=0.3):
        import asyncio

        async def collect():
            out = []
            while True:
                try:
                    msg = await asyncio.wait_for(self.layer.receive(self.channel), timeout)
                except asyncio.TimeoutError:
                    return out
                out.append(msg["event"])

        return async_to_sync(collect)()

    def close(self):
        for g in self.groups:
            async_to_sync(self.layer.group_discard)(g, self.channel)


@pytest.fixture
def listen():
    """`listen("ops", "driver.<id>")` → a listener; `.drain()` returns the events received."""
    listeners = []

    def make(*groups):
        listener = ChannelListener(list(groups))
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        listener.close()
