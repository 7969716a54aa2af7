"""A change form writes the fields it changed, nothing else (common.admin.ChangedFieldsOnlyAdmin).

Django's admin saved the whole row as the request had read it: a driver-page save put back
the availability a `resume`/`end-shift` had just changed, and a crafted POST to a page of
read-only fields (a delivery) wrote the delivery back over a concurrent cancel. Also the
console's smaller answers an audit found wrong: the driver page's phone rule, the login's
landing page, a break's duration error, the admin's take action."""
import pytest
from django.contrib.gis.geos import Point

from audit.models import DeliveryAuditLog
from availability.models import Driver, DriverAvailability
from common.actors import Actor
from common.models import User
from dispatch.models import Delivery, DeliveryStatus
from tests.concurrency import behind_lock
from tests.factories import DeliveryFactory, DriverFactory
from tests.zones.test_zones_admin import form_data
from workflows.deliveries import delivery_cancel
from workflows.drivers import availability_end_shift


def _page(admin_client, url):
    return url, form_data(admin_client.get(url))


@pytest.mark.django_db(transaction=True)
def test_a_driver_page_saved_while_the_driver_ends_the_shift_keeps_the_shift_ended(admin_client):
    driver = DriverFactory(availability=DriverAvailability.AVAILABLE, vehicle="Honda Civic, Blue",
                           home_location=Point(30.55, 11.45, srid=4326))
    url, data = _page(admin_client, f"/admin/availability/driver/{driver.pk}/change/")
    data["vehicle"] = "Vespa, Red"

    answer = behind_lock(
        lambda: availability_end_shift(driver_id=driver.pk, actor=Actor("driver", driver.pk)),
        lambda: admin_client.post(url, data),
    )

    assert answer.status_code == 302
    driver.refresh_from_db()
    assert (driver.vehicle, driver.availability) == ("Vespa, Red", DriverAvailability.SHIFT_ENDED)


@pytest.mark.django_db(transaction=True)
def test_a_post_to_a_delivery_page_writes_nothing_over_a_concurrent_cancel(admin_client):
    delivery = DeliveryFactory()
    url = f"/admin/dispatch/delivery/{delivery.pk}/change/"
    data = {**form_data(admin_client.get(url)), "_save": "Save"}
    before = Delivery.objects.get(pk=delivery.pk).updated_at

    answer = behind_lock(
        lambda: delivery_cancel(delivery_id=delivery.pk, reason="customer called", actor=Actor.system()),
        lambda: admin_client.post(url, data),
    )

    assert answer.status_code in (200, 302)
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.CANCELLED and delivery.updated_at >= before


@pytest.mark.django_db
def test_a_new_vehicle_type_saved_on_the_page_brings_its_capacity(admin_client):
    driver = DriverFactory(vehicle_type="walking", home_location=Point(30.55, 11.45, srid=4326))
    assert driver.capacity == 1
    url, data = _page(admin_client, f"/admin/availability/driver/{driver.pk}/change/")
    data["vehicle_type"] = "car"

    assert admin_client.post(url, data).status_code == 302
    driver.refresh_from_db()
    assert (driver.vehicle_type, driver.capacity) == ("car", 3)


@pytest.mark.django_db
@pytest.mark.parametrize("phone", ["<script>", "abc", "12"])
def test_the_driver_page_takes_a_phone_by_the_apis_rule(admin_client, phone):
    driver = DriverFactory(phone="+34 612 345 678", home_location=Point(30.55, 11.45, srid=4326))
    url, data = _page(admin_client, f"/admin/availability/driver/{driver.pk}/change/")
    data["phone"] = phone

    r = admin_client.post(url, data)

    assert r.status_code == 200 and "Enter a phone number" in r.content.decode()
    driver.refresh_from_db()
    assert driver.phone == "+34 612 345 678"


@pytest.mark.django_db
def test_a_login_with_no_next_lands_on_the_console(client):
    """It went to Django's default /accounts/profile/, a 404 here."""
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_user("lead", password="pw-12345-x", is_staff=True)

    r = client.post("/admin/login/", {"username": "lead", "password": "pw-12345-x"}, follow=True)

    assert r.redirect_chain[0][0] == "/" and r.redirect_chain[-1][0] == "/admin/" and r.status_code == 200


@pytest.mark.django_db
def test_an_out_of_range_break_says_only_that(admin_client):
    driver = DriverFactory()
    r = admin_client.post("/admin/availability/driver/", {
        "action": "set_availability", "_selected_action": [str(driver.pk)], "apply": "1",
        "state": "on_break", "reason": "lunch", "duration_minutes": "99999"})

    page = r.content.decode()
    assert "Ensure this value is less than or equal to 1440" in page and "Required when the state is on_break" not in page


@pytest.mark.django_db
def test_taking_tickets_in_the_admin_says_so(admin_client):
    from tests.support_fixtures import ticket_for

    ticket = ticket_for()
    r = admin_client.post("/admin/escalation/supportticket/", {"action": "take", "_selected_action": [str(ticket.pk)]},
                          follow=True)

    assert "You have taken 1 ticket." in r.content.decode()


@pytest.mark.django_db
def test_taking_tickets_in_the_admin_leaves_one_another_agent_holds(admin_client):
    """The bulk take took a ticket over from the agent working it (taken after the list was shown)."""
    from escalation import tickets
    from escalation.models import SupportTicket
    from tests.factories import SupportUserFactory
    from tests.support_fixtures import ticket_for

    held, free = ticket_for(), ticket_for()
    agent = SupportUserFactory(first_name="Ana", last_name="First")
    tickets.ticket_take(ticket_id=held.pk, user=agent, actor=Actor.for_user(agent))

    r = admin_client.post("/admin/escalation/supportticket/", {
        "action": "take", "_selected_action": [str(held.pk), str(free.pk)]}, follow=True)

    page = r.content.decode()
    assert "Ana First holds this ticket; take it over on its support page." in page
    assert "You have taken 1 ticket." in page
    assert SupportTicket.objects.get(pk=held.pk).assignee_id == agent.pk
    assert SupportTicket.objects.get(pk=free.pk).assignee.username == "admin"


@pytest.mark.django_db
def test_an_offers_page_is_read_only_and_the_list_still_expires(admin_client):
    """Every field of an offer is read-only; its page offered Save and said "changed successfully"."""
    from offers.models import DriverOffer
    from workflows.dispatching import delivery_dispatch
    from tests.factories import online_driver

    online_driver()
    delivery = DeliveryFactory()
    delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    offer = DriverOffer.objects.get(delivery=delivery)

    page = admin_client.get(f"/admin/offers/driveroffer/{offer.pk}/change/").content.decode()
    assert 'name="_save"' not in page and "Close" in page
    from workflows import offers as offer_flows

    other = online_driver(km=3)
    answered = offer_flows.offer_create(delivery_id=DeliveryFactory().pk, driver_id=other.pk, actor=Actor.system())
    offer_flows.offer_reject(offer_id=answered.pk, driver_id=other.pk, reason="too far", actor=Actor("driver", other.pk))
    r = admin_client.post("/admin/offers/driveroffer/", {"action": "expire_now",
                                                          "_selected_action": [str(offer.pk), str(answered.pk)]},
                          follow=True)
    page = r.content.decode()
    assert "Expired 1 offer." in page and "1 offer of the selection not expired: no longer pending, or being answered at that moment." in page
    offer.refresh_from_db()
    assert offer.status == "EXPIRED"
    # ops' expiry is theirs in the audit trail (it read `system`, as the timer's does)
    expired = DeliveryAuditLog.objects.get(delivery_id=delivery.pk, event_type="offer_expired")
    admin_user = User.objects.get(username="admin")
    assert (expired.actor_type, expired.actor_id) == ("admin", admin_user.pk)


@pytest.mark.django_db
def test_an_unassigned_orders_and_a_tickets_pages_are_read_only_with_their_list_actions_kept(admin_client):
    """Every field is read-only; their pages offered Save, said "changed successfully" and wrote
    "No fields changed." into the admin history."""
    from django.contrib.admin.models import LogEntry

    from tests.support_fixtures import ticket_for

    ticket = ticket_for()
    record = ticket.unassigned_order
    for url in (f"/admin/escalation/unassignedorder/{record.pk}/change/", f"/admin/escalation/supportticket/{ticket.pk}/change/"):
        page = admin_client.get(url).content.decode()
        assert 'name="_save"' not in page and 'name="_continue"' not in page and "Close" in page, url
        assert admin_client.post(url, {"_save": "Save"}).status_code == 403, url
    assert not LogEntry.objects.exists()
    form = admin_client.post("/admin/escalation/unassignedorder/", {"action": "escalate", "_selected_action": [str(record.pk)]})
    assert b"Escalate unassigned orders" in form.content
    taken = admin_client.post("/admin/escalation/supportticket/", {"action": "take", "_selected_action": [str(ticket.pk)]},
                              follow=True)
    assert taken.status_code == 200 and b"You have taken 1 ticket." in taken.content


@pytest.mark.django_db
def test_a_stale_driver_page_does_not_put_back_what_another_page_saved(admin_client):
    """Two tabs on one driver: the second, opened before the first saved, changes the phone and
    leaves the name as it showed it. The name the first saved stays (it was put back: an audit)."""
    driver = DriverFactory(name="Asha", phone="+34 612 345 678", home_location=Point(30.55, 11.45, srid=4326))
    url = f"/admin/availability/driver/{driver.pk}/change/"
    first, second = form_data(admin_client.get(url)), form_data(admin_client.get(url))

    assert admin_client.post(url, {**first, "name": "Asha Rao"}).status_code == 302
    assert admin_client.post(url, {**second, "phone": "+34 612 345 679"}).status_code == 302

    driver.refresh_from_db()
    assert (driver.name, driver.phone) == ("Asha Rao", "+34 612 345 679")


@pytest.mark.django_db
def test_a_stale_driver_page_does_not_put_back_a_zone_preference_another_page_saved(admin_client):
    from tests.factories import ZoneFactory
    from zones.models import DriverZonePreference

    driver = DriverFactory(vehicle="Honda", home_location=Point(30.55, 11.45, srid=4326))
    zone = ZoneFactory(name="North")
    DriverZonePreference.objects.create(driver=driver, zone=zone, preference="PREFERRED")
    url = f"/admin/availability/driver/{driver.pk}/change/"
    first, second = form_data(admin_client.get(url)), form_data(admin_client.get(url))
    row = next(key for key, value in first.items() if key.endswith("-preference") and not key.startswith("initial-"))

    assert admin_client.post(url, {**first, row: "UNAVAILABLE"}).status_code == 302
    assert admin_client.post(url, {**second, "vehicle": "Vespa"}).status_code == 302

    assert DriverZonePreference.objects.get(driver=driver, zone=zone).preference == "UNAVAILABLE"
    assert Driver.objects.get(pk=driver.pk).vehicle == "Vespa"


@pytest.mark.django_db
def test_a_stale_zone_page_does_not_put_back_what_another_page_saved(admin_client):
    from tests.factories import ZoneFactory
    from zones.models import DeliveryZone

    zone = ZoneFactory(min_drivers_online=1, target_wait_time_seconds=300)
    url = f"/admin/zones/deliveryzone/{zone.pk}/change/"
    first, second = form_data(admin_client.get(url)), form_data(admin_client.get(url))

    assert admin_client.post(url, {**first, "min_drivers_online": "7"}).status_code == 302
    assert admin_client.post(url, {**second, "target_wait_time_seconds": "444"}).status_code == 302

    zone = DeliveryZone.objects.get(pk=zone.pk)
    assert (zone.min_drivers_online, zone.target_wait_time_seconds) == (7, 444)
    # and the polygon, which neither page changed, was not written again
    assert admin_client.post(url, form_data(admin_client.get(url))).status_code == 302
    assert DeliveryZone.objects.get(pk=zone.pk).updated_at == zone.updated_at


@pytest.mark.django_db
def test_the_set_availability_page_has_one_heading(admin_client):
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    page = admin_client.post("/admin/availability/driver/", {
        "action": "set_availability", "_selected_action": [str(driver.pk)]}).content.decode()

    assert page.count("<h1>") == 1 and "<h1>Set availability</h1>" in page
