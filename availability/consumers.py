from channels.db import database_sync_to_async

from availability import events as availability_events
from common.broadcast import driver_group
from common.consumers import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, RelayConsumer
from common.errors import iso
from common.roles import driver_of
from offers import events as offer_events


def _own_driver_of(user, driver_id: str):
    driver = driver_of(user)
    return driver if driver is not None and str(driver.pk) == driver_id else None


@database_sync_to_async
def _own_driver(user, driver_id: str):
    driver = _own_driver_of(user, driver_id)
    if driver is None:
        return None
    driver.refresh_from_db(fields=["availability", "availability_until", "availability_reason", "last_availability_change"])
    return driver


class DriverConsumer(RelayConsumer):
    """`/ws/drivers/<driverId>/?token=<apiToken>`: that driver's offers and availability, and
    a delivery taken away from them (`assignment_cancelled`)."""

    relays = frozenset(availability_events.EVENT_TYPES + offer_events.EVENT_TYPES) | {"assignment_cancelled"}

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.deny(CLOSE_UNAUTHENTICATED)
            return
        driver = await _own_driver(user, self.scope["url_route"]["kwargs"]["driver_id"])
        if driver is None:
            await self.deny(CLOSE_FORBIDDEN)
            return
        await self.join_and_accept([driver_group(driver.pk)])
        await self.send_json({
            "type": "availability_snapshot",
            "driverId": str(driver.pk),
            "availability": driver.availability,
            "until": iso(driver.availability_until),
            "reason": driver.availability_reason,
            "changedAt": iso(driver.last_availability_change),
        })

    def allowed(self, user) -> bool:
        return _own_driver_of(user, self.scope["url_route"]["kwargs"]["driver_id"]) is not None
