"""Which status messages a customer's socket sends (tracking.consumers._moves_on): no database."""
import pytest

from tracking.consumers import _moves_on


@pytest.mark.parametrize(("shown", "status", "sent"), [
    (None, "pending", True), ("pending", "pending", False), ("pending", "assigned", True),
    ("in_transit", "picked_up", False),  # two changes before the snapshot read: the older one's message comes after it
    ("assigned", "assigned", False), ("assigned", "pending", True),  # ops took it from its driver
    ("picked_up", "delivered", True), ("pending", "cancelled", True), ("in_transit", "failed", True),
])
def test_a_status_message_is_sent_only_when_it_moves_the_delivery_on(shown, status, sent):
    assert _moves_on(shown, status) is sent
