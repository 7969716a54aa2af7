from __future__ import annotations

from channels.db import database_sync_to_async

from common.consumers import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, RelayConsumer
from common.roles import is_support
from escalation import events as escalation_events
from escalation.events import SUPPORT_EVENTS_GROUP


class SupportConsumer(RelayConsumer):
    """`/ws/support/`: the escalation and ticket events, for support agents (group `support`)
    and staff, by session or `?token=`. The `/support/` queue listens here to refresh live;
    staff get the same events on `/ws/ops/` too."""

    relays = frozenset(escalation_events.EVENT_TYPES)

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.deny(CLOSE_UNAUTHENTICATED)
            return
        if not await database_sync_to_async(self.allowed)(user):
            await self.deny(CLOSE_FORBIDDEN)
            return
        await self.join_and_accept([SUPPORT_EVENTS_GROUP])

    def allowed(self, user) -> bool:
        return user.is_active and is_support(user)
