"""Plain helpers shared by the tests (the fixtures built on them live in conftest.py): an API
client authenticated as a user, the error-body check, a listener on the channel layer."""
import asyncio
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from rest_framework.test import APIClient


def token_for(user) -> str:
    """An API token of `user` (one per user object: made on first use, then remembered)."""
    from common.tokens import api_token_create

    if getattr(user, "_test_api_key", None) is None:
        user._test_api_key = api_token_create(user, name="test")
    return user._test_api_key


def client_for(user=None):
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
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
    """Joins groups on the real Redis channel layers and collects what is sent to them.

    Groups on a pub/sub layer (both layers by default: settings.CHANNEL_LAYERS) are subscribed
    to in Redis directly, on the layer's own channel names, so the test sees exactly what a web
    process subscribed to the group receives, with no buffer tied to one event loop. Groups on
    a core layer (CHANNELS_LAYER=core) are joined with a plain channel name (no "!"), read
    straight from Redis, so each drain() may run in its own loop."""

    def __init__(self, groups):
        from channels_redis.pubsub import RedisPubSubChannelLayer
        from django.conf import settings

        from common.broadcast import layer_alias
        import redis

        self.channel = f"test-listener.{uuid.uuid4().hex}"
        self.groups, self.layer, self.layers_by_channel = [], None, {}
        for g in groups:
            alias = layer_alias(g)
            layer = get_channel_layer(alias)
            if isinstance(layer, RedisPubSubChannelLayer):
                prefix = settings.CHANNEL_LAYERS[alias]["CONFIG"]["prefix"]
                self.layers_by_channel[f"{prefix}__group__{g}".encode()] = layer
            else:
                self.layer = layer
                self.groups.append(g)
                async_to_sync(layer.group_add)(g, self.channel)
        self.pubsub = None
        if self.layers_by_channel:
            self.pubsub = redis.Redis.from_url(settings.REDIS_URL).pubsub()  # bytes: msgpack
            self.pubsub.subscribe(*self.layers_by_channel)
            confirmed = 0
            while confirmed < len(self.layers_by_channel):  # Redis has the subscriptions before we go on
                message = self.pubsub.get_message(timeout=5)
                assert message is not None, "no subscribe confirmation from Redis"
                confirmed += message["type"] == "subscribe"

    def drain(self, timeout=0.3):
        async def collect():
            out = []
            while True:
                try:
                    msg = await asyncio.wait_for(self.layer.receive(self.channel), timeout)
                except asyncio.TimeoutError:
                    return out
                out.append(msg["event"])

        out = async_to_sync(collect)() if self.groups else []
        if self.pubsub is not None:
            while (message := self.pubsub.get_message(timeout=timeout)) is not None:
                if message["type"] == "message":
                    out.append(self.layers_by_channel[message["channel"]].deserialize(message["data"])["event"])
        return out

    def close(self):
        for g in self.groups:
            async_to_sync(self.layer.group_discard)(g, self.channel)
        if self.pubsub is not None:
            self.pubsub.close()
