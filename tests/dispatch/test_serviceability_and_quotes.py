"""Serviceability at intake, `POST /v2/quotes` with the quote's fee lock, and pay caps (issue 15)."""
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from django.utils import timezone

from analytics.models import DeliveryCost, DeliveryRevenue
from common.actors import Actor
from dispatch.models import Delivery, Quote
from offers.models import DriverOffer
from tests.api import assert_error, client_for
from tests.concurrency import race
from tests.factories import DeliveryFactory, IntegrationUserFactory, ZoneFactory, driver_at_dropoff, km_north, online_driver
from workflows.deliveries import assignment_create, delivery_advance
from workflows.offers import offer_accept
from workflows.dispatching import delivery_dispatch

pytestmark = pytest.mark.django_db

CITY = {"lat": 12.9716, "lon": 77.5946}
NEAR = {"lat": 13.0, "lon": 77.6}  # 3.212 km from CITY
CITY_BOX = (77.50, 12.90, 77.70, 13.10)  # lon min, lat min, lon max, lat max


def body(order="SV-1", pickup=CITY, dropoff=NEAR, **extra):
    return {"sellerOrderId": order, "storeName": "Corner Shop", "pickupLocation": pickup, "dropoffLocation": dropoff,
            "autoDispatch": False, **extra}


@pytest.fixture(autouse=True)
def city_rules(settings):
    """A city running on zones (the defaults are off: the SPEC takes a delivery anywhere)."""
    settings.SERVICEABILITY_REQUIRE_ZONE = True
    settings.MAX_DELIVERY_DISTANCE_KM = 30


def north_of(point, km):
    p = km_north(km, lat=point["lat"], lon=point["lon"])
    return {"lat": round(p.y, 6), "lon": round(p.x, 6)}


# ------------------------------------------------------------------------- intake


@pytest.mark.parametrize("city_rules", [None])  # replaces the autouse fixture: the defaults
def test_by_default_a_delivery_is_taken_anywhere_as_the_spec_says(integration, city_rules):
    """The shared contract tests create deliveries at random spots with legs of thousands of km."""
    ZoneFactory(bbox=CITY_BOX)
    far = {"lat": -33.9, "lon": 151.2}

    r = integration.post("/v2/deliveries", body("ANY-1", pickup=far, dropoff={"lat": 28.61, "lon": 77.21}), format="json")

    assert r.status_code == 201, r.content


def test_a_pickup_outside_every_zone_is_refused_while_zones_exist(integration):
    ZoneFactory(bbox=CITY_BOX)
    far = {"lat": 19.07, "lon": 72.87}

    r = integration.post("/v2/deliveries", body(pickup=far, dropoff=north_of(far, 2)), format="json")

    err = assert_error(r, 400)
    assert list(err["details"]) == ["pickupLocation"]
    assert not Delivery.objects.exists()


def test_without_zones_or_with_the_rule_relaxed_any_pickup_is_taken(integration, settings):
    far = {"lat": 19.07, "lon": 72.87}
    assert integration.post("/v2/deliveries", body("SV-A", pickup=far, dropoff=north_of(far, 2)), format="json").status_code == 201

    ZoneFactory(bbox=CITY_BOX)
    settings.SERVICEABILITY_REQUIRE_ZONE = False
    r = integration.post("/v2/deliveries", body("SV-B", pickup=far, dropoff=north_of(far, 2)), format="json")
    assert r.status_code == 201, r.content
    assert r.json()["zoneId"] is None


def test_a_leg_of_thousands_of_kilometres_is_refused(integration):
    r = integration.post("/v2/deliveries", body(dropoff={"lat": 28.61, "lon": 77.21}), format="json")  # to Delhi

    err = assert_error(r, 400)
    assert list(err["details"]) == ["dropoffLocation"]
    assert "over the 30 km limit" in err["details"]["dropoffLocation"][0]


def test_the_leg_limit_comes_from_the_setting_or_the_zone(integration, settings):
    settings.MAX_DELIVERY_DISTANCE_KM = 10
    assert_error(integration.post("/v2/deliveries", body("L-1", dropoff=north_of(CITY, 12)), format="json"), 400)
    assert integration.post("/v2/deliveries", body("L-2", dropoff=north_of(CITY, 9)), format="json").status_code == 201

    ZoneFactory(bbox=CITY_BOX, max_delivery_distance_km=40)
    r = integration.post("/v2/deliveries", body("L-3", dropoff=north_of(CITY, 35)), format="json")
    assert r.status_code == 201, r.content
    assert_error(integration.post("/v2/deliveries", body("L-4", dropoff=north_of(CITY, 45)), format="json"), 400)


# ------------------------------------------------------------------------- quotes


def test_a_quote_answers_with_the_rules_eta_and_price_of_a_real_delivery(integration, settings):
    settings.DEFAULT_DELIVERY_FEE = "40.00"
    settings.DELIVERY_FEE_PER_KM = "2.00"
    zone = ZoneFactory(bbox=CITY_BOX)
    online_driver(km=1.0)  # 1 km north of the pickup, by car: 1 × 1.3 / 25 km/h = 187.2 s
    online_driver(km=3.0)
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False):
        r = integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR, "prepTimeMinutes": 1},
                             format="json")

    assert r.status_code == 200, r.content
    q = r.json()
    quote = Quote.objects.get()
    assert q["quoteId"] == str(quote.pk) and q["expiresAt"] == "2026-02-01T10:05:00Z"
    assert (q["serviceable"], q["reasons"], q["zoneId"]) == (True, [], str(zone.pk))
    assert q["distanceKm"] == 3.212
    assert q["deliveryFee"] == 46.42  # 40 + 2 × 3.2117 km, half-up to the cent
    assert q["availableDriversNearby"] == 2
    assert q["estimatedPickupAt"] == "2026-02-01T10:03:08Z"  # the drive (187.2 s) outlasts the 1 min prep
    # + the leg by car (3.2117 × 1.3 / 25 h = 601.2 s) + 2 min handover = 908.4 s
    assert q["estimatedDeliveryAt"] == "2026-02-01T10:15:09Z"


def test_an_unserviceable_quote_says_why_and_locks_nothing(integration):
    ZoneFactory(bbox=CITY_BOX)
    far = {"lat": 19.07, "lon": 72.87}

    q = integration.post("/v2/quotes", {"pickupLocation": far, "dropoffLocation": CITY}, format="json").json()

    assert q["serviceable"] is False and q["quoteId"] is None and q["expiresAt"] is None
    assert [(r["code"], r["field"]) for r in q["reasons"]] == [
        ("outside_zones", "pickupLocation"), ("distance_exceeded", "dropoffLocation"),
    ]
    assert q["availableDriversNearby"] == 0 and q["estimatedPickupAt"] is None
    assert not Quote.objects.exists()


def test_a_quote_counts_and_prices_only_the_drivers_dispatch_would_offer_to(integration):
    """A driver holding another delivery's offer, or UNAVAILABLE for the zone, was counted and
    priced; the delivery then found nobody (audit)."""
    from workflows import offers as offer_flows
    from zones.models import DriverZonePreference

    zone = ZoneFactory(bbox=CITY_BOX)
    holding, unwilling = online_driver(km=0.2), online_driver(km=0.4)
    offer_flows.offer_create(delivery_id=DeliveryFactory(seller_order_id="OTHER").pk, driver_id=holding.pk,
                             actor=Actor.system())
    DriverZonePreference.objects.create(driver=unwilling, zone=zone, preference="UNAVAILABLE")

    q = integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()
    assert q["serviceable"] is True and q["availableDriversNearby"] == 0 and q["estimatedPickupAt"] is None

    online_driver(km=3.0)
    q = integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()
    assert q["availableDriversNearby"] == 1 and q["estimatedPickupAt"] is not None


def test_no_driver_nearby_means_no_estimates(integration):
    q = integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()
    assert q["serviceable"] is True and q["availableDriversNearby"] == 0
    assert q["estimatedPickupAt"] is None and q["estimatedDeliveryAt"] is None


def test_a_quote_locks_its_fee_for_five_minutes(integration, settings):
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        quote = integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()
        settings.DEFAULT_DELIVERY_FEE = "99.00"  # the price went up after the quote
        t.shift(timedelta(minutes=4, seconds=59))
        r = integration.post("/v2/deliveries", body(quoteId=quote["quoteId"]), format="json")

    assert r.status_code == 201, r.content
    assert r.json()["deliveryFee"] == quote["deliveryFee"] == 49.0
    assert Quote.objects.get().delivery_id == Delivery.objects.get().pk


@pytest.mark.parametrize("fee", ["omitted", None])
def test_a_delivery_created_without_a_fee_gets_the_fee_a_quote_would_have_given(integration, settings, fee):
    """The seller was shown `deliveryFee: null` (the seed's column is NOT NULL) while the quote for
    the same leg said 46.42, and economics charged the rule anyway."""
    settings.DEFAULT_DELIVERY_FEE = "40.00"
    settings.DELIVERY_FEE_PER_KM = "2.00"
    quote = integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()

    r = integration.post("/v2/deliveries", body(**({} if fee == "omitted" else {"deliveryFee": None})), format="json")

    assert r.status_code == 201, r.content
    assert r.json()["deliveryFee"] == quote["deliveryFee"] == 46.42
    assert Delivery.objects.get().delivery_fee == Decimal("46.42")
    assert integration.get(f"/v2/deliveries/{r.json()['id']}").json()["deliveryFee"] == 46.42


def test_an_expired_or_used_quote_is_a_conflict(integration):
    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        first = integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()
        second = integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()
        assert integration.post("/v2/deliveries", body("Q-1", quoteId=first["quoteId"]), format="json").status_code == 201
        assert_error(integration.post("/v2/deliveries", body("Q-2", quoteId=first["quoteId"]), format="json"), 409)
        t.shift(timedelta(minutes=5))
        assert_error(integration.post("/v2/deliveries", body("Q-3", quoteId=second["quoteId"]), format="json"), 409)
    assert Delivery.objects.count() == 1


def test_the_hourly_purge_deletes_the_quotes_never_used_a_day_after_they_expired(integration):
    """Nothing deleted quotes: anyone with a token makes them at the throttles' rate."""
    from dispatch.tasks import purge_expired_quotes

    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        used, unused, later = (
            integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()["quoteId"]
            for _ in range(3))
        assert integration.post("/v2/deliveries", body("Q-P", quoteId=used), format="json").status_code == 201
        Quote.objects.filter(pk=later).update(expires_at=timezone.now() + timedelta(hours=2))
        t.shift(timedelta(hours=24, minutes=4))  # the others expired 23 h 59 min ago
        assert purge_expired_quotes() == 0
        t.shift(timedelta(minutes=2))
        assert purge_expired_quotes() == 1
    assert sorted(str(pk) for pk in Quote.objects.values_list("pk", flat=True)) == sorted([used, later])


def test_the_purge_goes_on_batch_after_batch_within_its_time(integration):
    """One batch of 5,000 an hour fell behind what the throttles let one token make."""
    from workflows.quotes import quotes_purge

    with time_machine.travel("2026-02-01T10:00:00Z", tick=False) as t:
        for _ in range(5):
            integration.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json")
        t.shift(timedelta(days=2))
        assert quotes_purge(batch_size=2) == 5
    assert not Quote.objects.exists()


@pytest.mark.parametrize("case", ["another_owner", "other_places", "with_a_fee", "unknown"])
def test_a_quote_is_only_for_its_owner_and_its_places(integration, integration_user, case):
    owner = client_for(IntegrationUserFactory()) if case == "another_owner" else integration
    quote_id = owner.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json").json()["quoteId"]
    payload = {
        "another_owner": body(quoteId=quote_id),
        "other_places": body(quoteId=quote_id, dropoff=north_of(CITY, 5)),
        "with_a_fee": body(quoteId=quote_id, deliveryFee="10.00"),
        "unknown": body(quoteId="00000000-0000-0000-0000-000000000000"),
    }[case]

    err = assert_error(integration.post("/v2/deliveries", payload, format="json"), 400)

    assert set(err["details"]) == ({"deliveryFee"} if case == "with_a_fee" else {"quoteId"})
    assert not Delivery.objects.exists()


def test_drivers_may_not_ask_for_quotes(anon):
    driver = online_driver()
    assert_error(client_for(driver.user).post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json"), 403)
    assert_error(anon.post("/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json"), 401)


@pytest.mark.django_db(transaction=True)
def test_two_deliveries_racing_for_one_quote_get_it_once(integration_user):
    quote_id = client_for(integration_user).post(
        "/v2/quotes", {"pickupLocation": CITY, "dropoffLocation": NEAR}, format="json",
    ).json()["quoteId"]

    def create(n):
        return lambda: client_for(integration_user).post("/v2/deliveries", body(f"RACE-{n}", quoteId=quote_id), format="json").status_code

    results, errors = race([create(n) for n in range(4)])

    assert errors == []
    assert sorted(results) == [201, 409, 409, 409]
    assert Delivery.objects.count() == 1


# ------------------------------------------------------------------------- pay caps


def test_an_offer_never_promises_more_than_the_zones_cap(settings):
    settings.DRIVER_PAY_CAP = "1000.00"
    zone = ZoneFactory(bbox=CITY_BOX, driver_pay_per_km=Decimal("20.00"), driver_pay_cap=Decimal("60.00"))
    online_driver(km=4.0)
    near = DeliveryFactory(zone=zone, dropoff_location=km_north(0.5))
    far = DeliveryFactory(zone=zone, dropoff_location=km_north(9.0))
    near_offer = delivery_dispatch(delivery_id=near.pk, actor=Actor.system()).offer
    near_offer.status = "CANCELLED"
    near_offer.save(update_fields=["status"])
    far_offer = delivery_dispatch(delivery_id=far.pk, actor=Actor.system()).offer

    # 30 base + 20/km × (4 km to the pickup + 0.5 km leg) = 120 → capped at 60; the zone's rate applies
    assert near_offer.offer_payload["estimatedEarning"] == 60.0
    assert far_offer.offer_payload["estimatedEarning"] == 60.0


def test_outside_any_zone_the_global_rate_and_cap_apply(settings):
    settings.DRIVER_PAY_CAP = "50.00"
    online_driver(km=0.5)
    short = DeliveryFactory(dropoff_location=km_north(1.0))  # 30 + 8 × (0.5 + 1) = 42
    offer = delivery_dispatch(delivery_id=short.pk, actor=Actor.system()).offer
    assert offer.offer_payload["estimatedEarning"] == 42.0
    DriverOffer.objects.filter(pk=offer.pk).update(status="CANCELLED")
    long = DeliveryFactory(dropoff_location=km_north(6.0))  # 30 + 8 × 6.5 = 82 → 50
    assert delivery_dispatch(delivery_id=long.pk, actor=Actor.system()).offer.offer_payload["estimatedEarning"] == 50.0


def test_economics_never_pay_above_the_cap(settings):
    settings.DRIVER_PAY_CAP = "150.00"
    driver = online_driver(km=0.5)
    delivery = DeliveryFactory()
    offer = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).offer
    # an offer made before the cap existed, promising the 149,129 of the issue
    DriverOffer.objects.filter(pk=offer.pk).update(offer_payload={**offer.offer_payload, "estimatedEarning": 149129.0})
    offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk))
    for step in ("pickup-started", "pickup-completed", "delivery-started", "delivery-completed"):
        if step == "delivery-completed":
            driver_at_dropoff(driver, delivery)
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor("driver", driver.pk))

    assert DeliveryCost.objects.get(delivery=delivery).driver_payment == Decimal("150.00")


def test_a_delivery_without_a_fee_is_charged_the_pricing_rule(settings):
    settings.DEFAULT_DELIVERY_FEE = "20.00"
    settings.DELIVERY_FEE_PER_KM = "10.00"
    settings.DELIVERY_FEE_CAP = "35.00"
    driver = online_driver(km=0.5)
    short = DeliveryFactory(delivery_fee=None, dropoff_location=km_north(1.0))
    long = DeliveryFactory(delivery_fee=None, dropoff_location=km_north(5.0))
    for delivery in (short, long):
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        for step in ("pickup-started", "pickup-completed", "delivery-started", "delivery-completed"):
            if step == "delivery-completed":
                driver_at_dropoff(driver, delivery)
            delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor("driver", driver.pk))

    assert DeliveryRevenue.objects.get(delivery=short).delivery_fee == Decimal("30.00")  # 20 + 10 × 1 km leg
    assert DeliveryRevenue.objects.get(delivery=long).delivery_fee == Decimal("35.00")  # 20 + 10 × 5 = 70 → the cap
