"""Text someone else wrote, put into the console's sentences and labels (common.bidi)."""
import pytest

from common.bidi import bidi_isolated

FSI, PDI = "\u2068", "\u2069"


@pytest.mark.parametrize("text,shown", [
    ("Ravi Kumar", "Ravi Kumar"),  # as it is: most names
    ("Zoë Ōtsuka 山田", "Zoë Ōtsuka 山田"),
    ("Ravi \u202eevil", FSI + "Ravi evil" + PDI),  # an override: dropped, and isolated
    ("Ravi\u200f", FSI + "Ravi" + PDI),  # a right-to-left mark: a strong direction of its own
    ("Ravi \u2069\u202eevil", FSI + "Ravi evil" + PDI),  # its own PDI cannot close the isolate
    ("محمد علي", FSI + "محمد علي" + PDI),  # right-to-left letters: isolated, kept
    ("שלום", FSI + "שלום" + PDI),
    (42, "42"),
], ids=["latin", "other scripts", "override", "rlm", "own pdi", "arabic", "hebrew", "not text"])
def test_text_is_isolated_only_when_it_could_reorder_its_surroundings(text, shown):
    assert bidi_isolated(text) == shown


def test_a_json_block_on_a_console_page_shows_the_controls_as_escapes():
    from common.admin import json_block

    shown = str(json_block({"storeName": "<b>Shop</b>\u202eevil", "estimatedEarning": 104.7}))
    assert "\u202e" not in shown and "\\u202e" in shown
    assert "&lt;b&gt;Shop&lt;/b&gt;" in shown and "&quot;estimatedEarning&quot;: 104.7" in shown


@pytest.mark.django_db
def test_console_pages_of_a_store_name_with_an_rlo_do_not_read_the_rest_backwards(admin_client):
    """The audit entry's and the webhook event's payloads, the support ticket's description
    and an action's refusal of a driver's name (an audit: "estimatedEarning": 104.7 read 7.401)."""
    from datetime import timedelta

    from django.utils import timezone

    from audit.models import DeliveryAuditLog
    from common.actors import Actor
    from escalation.models import SupportTicket
    from notifications.models import OutboxEvent
    from tests.factories import DeliveryFactory, DriverFactory, IntegrationUserFactory
    from tests.notifications.webhook_helpers import endpoint_via_api
    from workflows.deliveries import delivery_cancel
    from workflows.dispatching import delivery_dispatch
    from workflows.escalations import escalation_check

    merchant = IntegrationUserFactory()
    endpoint_via_api(merchant, "https://example.com/hooks")
    delivery = DeliveryFactory(store_name="Shop\u202eevil", created_by=merchant)
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())  # (nobody: an unassigned record)
    escalation_check(now=timezone.now() + timedelta(minutes=6))
    ticket = SupportTicket.objects.get(delivery=delivery)
    assert "\u2068Shopevil\u2069" in ticket.description and "\u202e" not in ticket.description
    delivery_cancel(delivery_id=delivery.pk, reason="shop shut", actor=Actor.system())

    entry = DeliveryAuditLog.objects.filter(delivery=delivery).exclude(details={}).order_by("seq").last()
    event = OutboxEvent.objects.filter(delivery_id=delivery.pk).last()
    for url in (f"/admin/audit/deliveryauditlog/{entry.pk}/change/", f"/admin/notifications/outboxevent/{event.pk}/change/"):
        page = admin_client.get(url)
        assert page.status_code == 200 and "\u202e" not in page.content.decode(), url

    from common.models import DeferredTask

    kept = DeferredTask.objects.create(task="offers.push_offer", args=[{"pickupStoreName": "Shop\u202eevil"}],
                                       created_at=timezone.now(), expires_at=timezone.now() + timedelta(minutes=1))
    page = admin_client.get(f"/admin/common/deferredtask/{kept.pk}/change/").content.decode()
    assert "Shop\\u202eevil" in page and "\u202e" not in page

    driver = DriverFactory(name="Ravi\u202eevil", availability="paused")
    done = admin_client.post("/admin/availability/driver/", {
        "action": "set_availability", "_selected_action": [str(driver.pk)], "apply": "1", "state": "paused",
        "reason": "again"}, follow=True)
    assert "\u2068Ravievil\u2069: Driver is paused" in done.content.decode()  # (its list cell is a paragraph of its own)
