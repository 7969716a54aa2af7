from __future__ import annotations

from common.broadcast import OPS_GROUP
from common.consumers import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, RelayConsumer
from common.roles import is_ops


class OpsConsumer(RelayConsumer):
    """`/ws/ops/`: every live event, for staff (session or `?token=`)."""

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not is_ops(user):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.accept()
        await self.join([OPS_GROUP])

    async def delivery_created(self, message):
        await self.relay(message)

    async def delivery_status_changed(self, message):
        await self.relay(message)

    async def delivery_cancelled(self, message):
        await self.relay(message)

    async def availability_changed(self, message):
        await self.relay(message)

    async def break_expired(self, message):
        await self.relay(message)

    async def zone_health_updated(self, message):
        await self.relay(message)

    async def offer_created(self, message):
        await self.relay(message)

    async def offer_accepted(self, message):
        await self.relay(message)

    async def offer_rejected(self, message):
        await self.relay(message)

    async def offer_expired(self, message):
        await self.relay(message)

    async def offer_cancelled(self, message):
        await self.relay(message)
