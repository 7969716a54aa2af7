"""`GET /v2/orders/{sellerOrderId}/delivery-status`: every status, every caller, masking, tokens."""
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from common.actors import Actor
from common.errors import iso
from tracking import selectors as tracking
from dispatch.models import Delivery
from workflows.deliveries import delivery_reassign
from tests.api import assert_error, client_for
from tests.factories import IntegrationUserFactory, OpsUserFactory, km_north
from tests.tracking_fixtures import delivery_in, john

pytestmark = pytest.mark.django_db


def status_url(delivery, token=None):
    url = f"/v2/orders/{delivery.seller_order_id}/delivery-status"
    return url if token is None else f"{url}?token={token}"


def customer_get(anon, delivery, token=None):
    return anon.get(status_url(delivery, delivery.tracking_token if token is None else token))


# ------------------------------------------------------------------------------ statuses


def test_a_ready_delivery_is_pending_for_the_customer_with_prep_time_and_no_driver(anon):
    with time_machine.travel(timezone.now(), tick=False):
        delivery = delivery_in("ready", prep_time_minutes=12)
        response = customer_get(anon, delivery)

    assert response.status_code == 200
    assert response.json() == {
        "status": "pending",
        "estimatedPrepTimeMinutes": 12,
        "trackingUrl": delivery.tracking_url,
        "deliveryId": str(delivery.pk),
    }
    assert response["Cache-Control"] == "no-store"


@pytest.mark.parametrize("status", ["assigned", "picked_up", "in_transit"])
def test_under_way_the_customer_sees_the_driver_masked_their_fix_and_the_eta(anon, status, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        delivery = delivery_in(status)

    body = customer_get(anon, delivery).json()

    assert body["status"] == status
    assert body["driver"] == {"name": "John S.", "rating": 4.8, "vehicle": "Honda Civic, Blue", "phone": "***-***-5309"}
    assert body["location"]["accuracyMeters"] == 12.0
    assert body["location"]["lat"] == pytest.approx(km_north(2).y)
    assert body["location"]["lastUpdated"].endswith("Z")
    assert body["estimatedPickupTime"].endswith("Z") and body["estimatedDeliveryTime"].endswith("Z")
    assert body["estimatedDeliveryTime"] > body["estimatedPickupTime"]
    assert ("estimatedPrepTimeMinutes" in body) == (status == "assigned")
    assert body["trackingUrl"] == delivery.tracking_url and body["deliveryId"] == str(delivery.pk)
    assert list(body) == [  # the seed's order
        "status", "driver", "location", "estimatedPickupTime", "estimatedDeliveryTime",
        *(["estimatedPrepTimeMinutes"] if status == "assigned" else []), "trackingUrl", "deliveryId",
    ]


def test_once_picked_up_the_pickup_time_is_when_it_happened_not_the_estimate_before(anon, django_capture_on_commit_callbacks):
    """The pickup's status message (socket and this endpoint) is read before the ETA refresh the
    pickup asks for: it showed the estimate of before, up to 5 minutes ahead (a seller audit)."""
    with django_capture_on_commit_callbacks(execute=True):
        delivery = delivery_in("picked_up")
    picked_up_at = timezone.now() - timedelta(seconds=20)
    ahead = timezone.now() + timedelta(minutes=5)
    Delivery.objects.filter(pk=delivery.pk).update(picked_up_at=picked_up_at, eta_pickup_at=ahead)

    body = customer_get(anon, delivery).json()

    assert body["estimatedPickupTime"] == iso(picked_up_at)
    Delivery.objects.filter(pk=delivery.pk).update(status="assigned", picked_up_at=None)
    assert customer_get(anon, delivery).json()["estimatedPickupTime"] == iso(ahead)


@pytest.mark.parametrize("status", ["delivered", "failed", "cancelled"])
def test_after_the_delivery_is_finished_only_the_final_state_is_shown(anon, status, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        delivery = delivery_in(status)

    body = customer_get(anon, delivery).json()

    assert body == {"status": status, "trackingUrl": delivery.tracking_url, "deliveryId": str(delivery.pk)}


def test_a_reassigned_delivery_goes_back_to_pending_and_loses_its_driver(anon, ops_user, django_capture_on_commit_callbacks):
    delivery = delivery_in("assigned")
    delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor.for_user(ops_user))

    body = customer_get(anon, delivery).json()

    assert body["status"] == "pending" and "driver" not in body and "location" not in body


def test_a_driver_without_a_fix_is_shown_without_a_location(anon):
    delivery = delivery_in("assigned", driver=john(location=None, location_recorded_at=None))

    body = customer_get(anon, delivery).json()

    assert "location" not in body and "estimatedPickupTime" not in body and body["driver"]["name"] == "John S."


# ------------------------------------------------------------------------------ masking


@pytest.mark.parametrize(
    "name,shown",
    [("John Smith", "John S."), ("John Quincy smith", "John S."), ("Cher", "Cher"), ("  Ana   de la Cruz ", "Ana C.")],
)
def test_driver_names_are_first_name_and_last_initial(name, shown):
    assert tracking.driver_display_name(name) == shown


@pytest.mark.parametrize(
    "phone,shown",
    [("+1 (555) 867-5309", "***-***-5309"), ("5309", "***-***-5309"), ("+91 98450 12345", "***-***-2345"), ("12", "***-***-****")],
)
def test_phones_are_masked_to_the_last_four_digits(phone, shown):
    assert tracking.mask_phone(phone) == shown


def test_the_full_phone_number_never_appears_in_the_body(anon):
    delivery = delivery_in("assigned", driver=john(phone="+44 7700 900123"))

    content = customer_get(anon, delivery).content.decode()

    assert "7700 900" not in content and "+44" not in content and "***-***-0123" in content  # no digit run: ids and timestamps hold any


# ------------------------------------------------------------------------------ callers and tokens


def test_a_wrong_token_and_an_unknown_order_look_the_same(anon):
    delivery = delivery_in("assigned")

    wrong = assert_error(customer_get(anon, delivery, token="A" * 32), 404)
    unknown = assert_error(anon.get(f"/v2/orders/NO-SUCH-ORDER/delivery-status?token={delivery.tracking_token}"), 404)
    empty = assert_error(customer_get(anon, delivery, token=""), 404)
    too_long = assert_error(customer_get(anon, delivery, token=delivery.tracking_token + "x" * 100), 404)

    assert wrong["message"] == unknown["message"] == empty["message"] == too_long["message"] == "Order not found."


def test_without_a_token_an_anonymous_caller_gets_a_401_and_a_driver_a_403(anon):
    """SPEC: 401 without credentials, 403 logged in but not allowed (both were a 404)."""
    driver = john()
    delivery = delivery_in("assigned", driver=driver)

    assert assert_error(anon.get(status_url(delivery)), 401)["message"] == "Authentication credentials were not provided."
    assert_error(anon.get("/v2/orders/NO-SUCH-ORDER/delivery-status"), 401)  # before any lookup
    assert_error(client_for(driver.user).get(status_url(delivery)), 403)
    assert_error(client_for(driver.user).get("/v2/orders/NO-SUCH-ORDER/delivery-status"), 403)


def test_the_token_of_another_delivery_with_the_same_seller_order_id_does_not_open_this_one(anon):
    mine = delivery_in("assigned", seller_order_id="ORDER-1")
    theirs = delivery_in("ready", seller_order_id="ORDER-1")  # another integration's order

    body = customer_get(anon, theirs).json()
    assert body["deliveryId"] == str(theirs.pk) and body["status"] == "pending"
    assert customer_get(anon, mine).json()["deliveryId"] == str(mine.pk)
    assert_error(anon.get(f"/v2/orders/ORDER-2/delivery-status?token={mine.tracking_token}"), 404)


def test_an_integration_reads_its_own_order_and_not_anothers():
    owner, other = IntegrationUserFactory(), IntegrationUserFactory()
    delivery = delivery_in("assigned", created_by=owner)

    body = client_for(owner).get(status_url(delivery)).json()

    assert body["deliveryId"] == str(delivery.pk) and body["driver"]["phone"] == "***-***-5309"
    assert_error(client_for(other).get(status_url(delivery)), 404)


def test_ops_read_the_most_recently_created_delivery_with_that_seller_order_id():
    older = delivery_in("ready", seller_order_id="SHARED-1")
    newer = delivery_in("assigned", seller_order_id="SHARED-1")
    Delivery.objects.filter(pk=older.pk).update(created_at=timezone.now() - timedelta(hours=1))

    body = client_for(OpsUserFactory()).get(status_url(newer)).json()

    assert body["deliveryId"] == str(newer.pk) and body["status"] == "assigned"


def test_with_a_token_anyone_logged_in_is_answered_as_the_customer(anon):
    other = IntegrationUserFactory()
    delivery = delivery_in("ready")

    assert client_for(other).get(status_url(delivery, delivery.tracking_token)).json()["deliveryId"] == str(delivery.pk)
    assert_error(client_for(OpsUserFactory()).get(status_url(delivery, "wrong")), 404)


def test_with_a_good_token_a_bad_authorization_header_is_ignored(anon):
    """It was a 401 ("Invalid token."): the header was read before the link."""
    delivery = delivery_in("ready")
    anon.credentials(HTTP_AUTHORIZATION="Token deadbeef")

    assert customer_get(anon, delivery).json()["deliveryId"] == str(delivery.pk)
    assert_error(anon.get(status_url(delivery)), 401)  # without a link the header is the credential


def test_a_404_is_private_and_does_not_echo_the_token(anon):
    """The 404s had no `Cache-Control: no-store`, sent the referrer, and their `path` repeated
    the query: with `?token=<good>&token=bad` (the last one counts) the good token sat in a
    cacheable body."""
    delivery = delivery_in("ready")

    r = anon.get(status_url(delivery) + f"?token={delivery.tracking_token}&token=bad")
    body = assert_error(r, 404)

    assert r["Cache-Control"] == "no-store" and r["Referrer-Policy"] == "no-referrer"
    assert delivery.tracking_token not in r.content.decode()
    assert body["path"] == status_url(delivery) + "?token=[redacted]&token=[redacted]"


def test_tokens_are_compared_in_constant_time(anon, monkeypatch):
    delivery = delivery_in("ready")
    calls = []
    real = tracking.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tracking.hmac, "compare_digest", spy)
    assert customer_get(anon, delivery).status_code == 200
    assert_error(anon.get(f"/v2/orders/UNKNOWN/delivery-status?token={delivery.tracking_token}"), 404)

    assert (delivery.tracking_token.encode(), delivery.tracking_token.encode()) in calls
    assert len(calls) == 2  # the unknown order still costs one comparison


def _rates(settings, **rates):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        "anon": "1000/min", "user": "1000/min", "customer": "1000/min", "customer_address": "1000/min",
        "customer_miss": "1000/min", **rates}}


def test_customers_are_throttled_per_link_not_in_the_login_s_anonymous_count(anon, settings):
    """Customers behind one carrier's NAT share an address: polling their status spent the
    anonymous allowance per address, and with it the login's (POST /v2/auth/token 429)."""
    _rates(settings, anon="3/min", customer="3/min")
    mine, theirs = delivery_in("ready"), delivery_in("ready")

    assert [customer_get(anon, mine).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert customer_get(anon, theirs).status_code == 200  # another link, the same address
    rated = anon.post(f"/v2/orders/{theirs.seller_order_id}/rating?token={theirs.tracking_token}", {"stars": 5}, format="json")
    assert rated.status_code == 409  # (not delivered: the throttle let it through)
    login = anon.post("/v2/auth/token", {"username": "nobody", "password": "x"}, format="json")
    assert login.status_code == 401  # wrong credentials, not 429: the address's login allowance untouched


def test_an_address_has_a_ceiling_over_all_the_links_it_asks_about(anon, settings):
    _rates(settings, customer_address="3/min")
    deliveries = [delivery_in("ready") for _ in range(4)]

    assert [customer_get(anon, d).status_code for d in deliveries] == [200, 200, 200, 429]


def test_the_status_and_rating_endpoints_are_documented_with_the_token_parameter():
    from drf_spectacular.generators import SchemaGenerator

    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]

    for path, method, codes in (
        ("/v2/orders/{seller_order_id}/delivery-status", "get", {"200", "401", "403", "404", "429"}),
        ("/v2/orders/{seller_order_id}/rating", "post", {"201", "400", "401", "404", "409", "429"}),
    ):
        op = paths[path][method]
        assert any(p["name"] == "token" and p["in"] == "query" for p in op["parameters"]), path
        assert codes <= set(op["responses"]), (path, set(op["responses"]))


# ------------------------------------------------------------------------------ order ids in URLs


def test_an_order_id_with_a_slash_is_found_by_its_status_and_rating_urls(anon, integration, integration_user):
    """Sellers' order ids like "2026/12/0001": taken at creation, so reachable by path, the
    slash sent as %2F or as it is (before, `<str:>` could not match it: a 404 for ever)."""
    from urllib.parse import quote

    created = integration.post("/v2/deliveries", {
        "sellerOrderId": "2026/12/0001", "storeName": "Store", "pickupLocation": {"lat": 12.9, "lon": 77.6},
        "dropoffLocation": {"lat": 12.91, "lon": 77.61},
    }, format="json")
    assert created.status_code == 201, created.content
    delivery = Delivery.objects.get(pk=created.json()["id"])
    for order_id in (quote(delivery.seller_order_id, safe=""), delivery.seller_order_id):
        seller = integration.get(f"/v2/orders/{order_id}/delivery-status")
        assert seller.status_code == 200 and seller.json()["deliveryId"] == str(delivery.pk), order_id
        customer = anon.get(f"/v2/orders/{order_id}/delivery-status?token={delivery.tracking_token}")
        assert customer.status_code == 200, order_id
    rating = anon.post(f"/v2/orders/{quote(delivery.seller_order_id, safe='')}/rating?token={delivery.tracking_token}",
                       {"stars": 5}, format="json")
    assert rating.status_code == 409, rating.content  # found: not delivered yet (a 404 before)


@pytest.mark.parametrize("order_id", ["AUD\t1", "AUD\n2", "AUD\u00853", "AUD\ufffd4", "AUD\x7f5"])
def test_an_order_id_no_url_can_carry_is_refused_at_creation(integration, integration_user, order_id):
    """The status and rating URLs (and `?sellerOrderId=`) refuse control characters and U+FFFD
    with a 400, so creating such an order made one nobody could look up by its id."""
    created = integration.post("/v2/deliveries", {
        "sellerOrderId": order_id, "storeName": "Store", "pickupLocation": {"lat": 12.9, "lon": 77.6},
        "dropoffLocation": {"lat": 12.91, "lon": 77.61},
    }, format="json")
    assert_error(created, 400)
    assert "sellerOrderId" in created.json()["details"]
    assert not Delivery.objects.filter(created_by=integration_user).exists()


def test_after_a_reassign_the_new_drivers_customer_never_sees_the_previous_drivers_estimates(
    anon, ops_user, django_capture_on_commit_callbacks
):
    """The stored estimates were made for the previous driver; until the first refresh for the
    new one (about a second later, by the ETA task) the status shows none."""
    from tracking.services import delivery_eta_refresh
    from workflows.deliveries import assignment_create

    with django_capture_on_commit_callbacks(execute=True):
        delivery = delivery_in("assigned")
    assert "estimatedPickupTime" in customer_get(anon, delivery).json()  # the first driver's
    delivery_reassign(delivery_id=delivery.pk, reason="driver stuck", actor=Actor.for_user(ops_user))
    second = john(name="Second Driver", phone="+15555550999", location=km_north(4))
    assignment_create(delivery_id=delivery.pk, driver_id=second.pk, actor=Actor.system())

    body = customer_get(anon, delivery).json()
    assert body["status"] == "assigned" and body["driver"]["name"] == "Second D."
    assert "estimatedPickupTime" not in body and "estimatedDeliveryTime" not in body

    delivery_eta_refresh(delivery_id=delivery.pk)  # the refresh for the new driver
    assert "estimatedPickupTime" in customer_get(anon, delivery).json()


def test_made_up_links_are_limited_per_address_and_a_call_without_one_counts_as_any_anonymous_call(anon, settings):
    """Each made-up link got a fresh per-link allowance (review): misses are counted per
    address; and without a link the call is an anonymous one like the login's."""
    _rates(settings, customer_miss="2/min", anon="3/min")
    delivery = delivery_in("ready")
    made_up = [customer_get(anon, delivery, token=f"guess-{i}").status_code for i in range(3)]
    assert made_up == [404, 404, 429]
    assert customer_get(anon, delivery).status_code == 429  # the address, whatever link it sends now

    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "customer_miss": "1000/min"}}
    without = [anon.get(status_url(delivery)).status_code for _ in range(3)]
    assert without == [401, 401, 401]  # counted as anonymous calls: the login has one left
    assert anon.post("/v2/auth/token", {"username": "nobody", "password": "x"}, format="json").status_code == 429
