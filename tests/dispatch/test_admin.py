import pytest

from audit.models import DeliveryAuditLog
from common.actors import Actor
from offers.models import DriverOffer
from workflows import offers
from workflows.deliveries import assignment_create
from tests.factories import DeliveryFactory, DriverFactory, online_driver

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "url",
    ["/admin/", "/admin/availability/driver/", "/admin/dispatch/delivery/", "/admin/dispatch/assignment/",
     "/admin/audit/deliveryauditlog/", "/admin/django_celery_beat/periodictask/"],
)
def test_ops_console_pages_render(admin_client, url):
    DriverFactory()
    DeliveryFactory()
    assert admin_client.get(url).status_code == 200


def test_filters_and_search_work(admin_client):
    DriverFactory(name="Zed Zebra", availability="on_break")
    DeliveryFactory(seller_order_id="FIND-ME")
    assert b"Zed Zebra" in admin_client.get("/admin/availability/driver/?availability__exact=on_break").content
    assert b"FIND-ME" in admin_client.get("/admin/dispatch/delivery/?q=FIND-ME").content


def test_delivery_page_shows_a_map_and_the_audit_timeline(admin_client, delivery, driver):
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())

    page = admin_client.get(f"/admin/dispatch/delivery/{delivery.pk}/change/")

    assert page.status_code == 200
    assert b"Assigned to" in page.content and b'id="delivery-timeline"' in page.content
    assert b'id="delivery-map"' in page.content and b"/static/leaflet/leaflet.js" in page.content


def test_driver_page_renders_with_history(admin_client, driver):
    assert admin_client.get(f"/admin/availability/driver/{driver.pk}/change/").status_code == 200


def test_cancel_action_goes_through_the_service(admin_client, admin_user, delivery):
    r = admin_client.post(
        "/admin/dispatch/delivery/",
        {"action": "cancel_deliveries", "_selected_action": [str(delivery.pk)], "apply": "1", "reason": "store closed"},
        follow=True,
    )

    assert r.status_code == 200
    delivery.refresh_from_db()
    assert delivery.status == "cancelled"
    audit = DeliveryAuditLog.objects.get(delivery=delivery, event_type="delivery_cancelled")
    assert audit.actor_type == "admin" and audit.actor_id == admin_user.pk


def test_cancel_action_reports_deliveries_that_cannot_be_cancelled(admin_client):
    done = DeliveryFactory(status="delivered")
    r = admin_client.post(
        "/admin/dispatch/delivery/",
        {"action": "cancel_deliveries", "_selected_action": [str(done.pk)], "apply": "1", "reason": "duplicate order"}, follow=True,
    )
    assert b"no longer be cancelled" in r.content
    done.refresh_from_db()
    assert done.status == "delivered"


def test_set_availability_action_asks_for_a_reason_then_uses_the_service(admin_client, admin_user):
    a, b = DriverFactory(), DriverFactory(availability="busy")
    selected = {"action": "set_availability", "_selected_action": [str(a.pk), str(b.pk)]}

    form = admin_client.post("/admin/availability/driver/", selected)
    assert form.status_code == 200 and b"reason" in form.content

    missing = admin_client.post("/admin/availability/driver/", {**selected, "apply": "1", "state": "paused"})
    assert missing.status_code == 200  # form shown again with the error
    a.refresh_from_db()
    assert a.availability == "available"

    done = admin_client.post(
        "/admin/availability/driver/", {**selected, "apply": "1", "state": "paused", "reason": "docs expired"}, follow=True
    )
    assert done.status_code == 200
    a.refresh_from_db()
    b.refresh_from_db()
    assert a.availability == "paused" and a.availability_reason == "docs expired"
    assert b.availability == "busy"  # refused, reported
    assert b"busy" in done.content
    row = a.availability_history.get()
    assert (row.actor_type, row.actor_id) == ("admin", admin_user.pk)


def test_dispatch_now_and_expire_actions_go_through_the_services(admin_client):
    a = online_driver(km=0.5)
    b = online_driver(km=1.0)
    delivery = DeliveryFactory()

    r = admin_client.post("/admin/dispatch/delivery/", {"action": "dispatch_now", "_selected_action": [str(delivery.pk)]}, follow=True)
    first = DriverOffer.objects.get(delivery=delivery)
    assert f"{delivery.seller_order_id}: offered to {a.name}".encode() in r.content  # (was the driver's id)
    assert first.driver_id == a.pk
    assert admin_client.get(f"/admin/dispatch/delivery/{delivery.pk}/change/").status_code == 200
    assert admin_client.get("/admin/offers/driveroffer/").status_code == 200

    admin_client.post("/admin/offers/driveroffer/", {"action": "expire_now", "_selected_action": [str(first.pk)]}, follow=True)
    first.refresh_from_db()
    assert first.status == "EXPIRED"
    assert DriverOffer.objects.get(delivery=delivery, status="PENDING").driver_id == b.pk


def test_reassign_action_takes_the_delivery_from_its_driver_and_reports_refusals(admin_client):
    a, b = online_driver(km=0.5), online_driver(km=1.0)
    delivery = DeliveryFactory()
    offer = offers.offer_create(delivery_id=delivery.pk, driver_id=a.pk, actor=Actor.system())
    offers.offer_accept(offer_id=offer.pk, driver_id=a.pk, actor=Actor("driver", a.pk))
    ready = DeliveryFactory()

    r = admin_client.post(
        "/admin/dispatch/delivery/",
        {"action": "reassign_deliveries", "_selected_action": [str(delivery.pk), str(ready.pk)], "apply": "1",
         "reason": "driver stuck in traffic"}, follow=True,
    )

    delivery.refresh_from_db()
    a.refresh_from_db()
    assert delivery.status == "ready" and a.availability == "available"
    assert delivery.current_offer.driver_id == b.pk
    assert f"taken from {a.name}, offered to {b.name}".encode() in r.content  # (was the driver's id, then `offered`)
    assert b"only an assigned delivery" in r.content  # the ready one was refused, reported
