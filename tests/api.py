"""Plain helpers shared by the tests (the fixtures built on them live in conftest.py): an API
client authenticated as a user, the error-body check, a listener on the channel layer."""
import asyncio
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from rest_framework.test import APIClient


def client_for(user=None):
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {user.auth_token.key}")
    return client


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
        self.layer = get_channel_layer()
        self.groups = groups
        # A plain channel name (no "!") is read straight from Redis, with no buffer tied to one
        # event loop, so each drain() may run in its own loop.
        self.channel = f"test-listener.{uuid.uuid4().hex}"
        for g in groups:
            async_to_sync(self.layer.group_add)(g, self.channel)

    def drain(self, timeout=0.3):
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
