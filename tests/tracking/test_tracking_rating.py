"""`POST /v2/orders/{sellerOrderId}/rating?token=`: once, after delivery; the driver's rating
is the average of their ratings, also when two customers rate the same driver at once."""
import threading
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction

from availability.models import Driver
from tracking.models import DeliveryRating
from tracking.services import delivery_rate
from tests.api import assert_error, client_for
from tests.tracking_fixtures import delivery_in, john


def rate(client, delivery, body, token=None):
    token = delivery.tracking_token if token is None else token
    return client.post(f"/v2/orders/{delivery.seller_order_id}/rating?token={token}", body, format="json")


@pytest.mark.django_db
def test_a_customer_rates_a_delivered_order_and_the_driver_rating_becomes_the_average(anon):
    driver = john(rating=5)
    first, second = delivery_in("delivered", driver=driver), delivery_in("delivered", driver=driver)

    response = rate(anon, first, {"stars": 4, "comment": "Friendly"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["success"] is True and body["stars"] == 4 and body["comment"] == "Friendly"
    assert body["deliveryId"] == str(first.pk) and body["createdAt"].endswith("Z")
    driver.refresh_from_db()
    assert driver.rating == Decimal("4.00")

    assert rate(anon, second, {"stars": 1}).status_code == 201
    driver.refresh_from_db()
    assert driver.rating == Decimal("2.50")
    assert DeliveryRating.objects.get(delivery=second).comment == ""


@pytest.mark.django_db
def test_customers_behind_one_address_each_have_their_own_idempotency_keys(anon):
    """Idempotency-Key is per caller; a customer is their link, not their address (two with one
    key: the second was a 409 "used with a different request", and so was the real customer
    after someone had tried the key with a wrong link)."""
    driver = john(rating=5)
    mine, theirs = delivery_in("delivered", driver=driver), delivery_in("delivered", driver=driver)
    anon.credentials(HTTP_IDEMPOTENCY_KEY="rate-once")

    assert_error(rate(anon, mine, {"stars": 2}, token="not-the-link"), 404)
    first = rate(anon, mine, {"stars": 5})
    assert first.status_code == 201, first.content
    assert rate(anon, theirs, {"stars": 4}).status_code == 201

    again = rate(anon, mine, {"stars": 5})  # the same customer's retry: the first answer again
    assert again.status_code == 201 and again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert DeliveryRating.objects.filter(delivery__in=[mine, theirs]).count() == 2


@pytest.mark.django_db
def test_a_rating_without_a_link_is_a_401_and_with_a_wrong_one_a_404(anon):
    """The link is the only credential here (SPEC: 401 without credentials; it was a 404)."""
    delivery = delivery_in("delivered")

    no_link = anon.post(f"/v2/orders/{delivery.seller_order_id}/rating", {"stars": 5}, format="json")

    assert assert_error(no_link, 401)["message"] == "Authentication credentials were not provided."
    assert_error(rate(anon, delivery, {"stars": 5}, token="wrong"), 404)
    assert not DeliveryRating.objects.filter(delivery=delivery).exists()


@pytest.mark.django_db
def test_an_order_is_rated_once_only(anon):
    driver = john(rating=5)
    delivery = delivery_in("delivered", driver=driver)
    assert rate(anon, delivery, {"stars": 5}).status_code == 201

    body = assert_error(rate(anon, delivery, {"stars": 1}), 409)

    assert "already been rated" in body["message"]
    assert DeliveryRating.objects.filter(delivery=delivery).count() == 1
    driver.refresh_from_db()
    assert driver.rating == Decimal("5.00")


@pytest.mark.django_db
def test_the_database_refuses_a_second_rating_of_one_delivery():
    delivery = delivery_in("delivered")
    driver = Driver.objects.get(assignments__delivery=delivery)
    DeliveryRating.objects.create(delivery=delivery, driver=driver, stars=5, created_at=delivery.delivered_at)

    with pytest.raises(IntegrityError), transaction.atomic():
        DeliveryRating.objects.create(delivery=delivery, driver=driver, stars=3, created_at=delivery.delivered_at)


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["ready", "assigned", "picked_up", "in_transit", "failed", "cancelled"])
def test_only_a_delivered_order_can_be_rated(anon, status):
    delivery = delivery_in(status)

    assert_error(rate(anon, delivery, {"stars": 5}), 409)
    assert not DeliveryRating.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body,field",
    [
        ({}, "stars"),
        ({"stars": 0}, "stars"),
        ({"stars": 6}, "stars"),
        ({"stars": "5"}, "stars"),
        ({"stars": 4.5}, "stars"),
        ({"stars": True}, "stars"),
        ({"stars": None}, "stars"),
        ({"stars": 5, "comment": "x" * 1001}, "comment"),
        ({"stars": 5, "comment": 12}, "comment"),
    ],
)
def test_invalid_ratings_are_a_400_naming_the_field(anon, body, field):
    delivery = delivery_in("delivered")

    error = assert_error(rate(anon, delivery, body), 400)

    assert field in error["details"], error
    assert not DeliveryRating.objects.exists()


@pytest.mark.django_db
def test_a_wrong_or_missing_token_is_refused_before_any_validation(anon):
    delivery = delivery_in("delivered")

    assert_error(rate(anon, delivery, {"stars": 9}, token="nope"), 404)
    assert_error(anon.post(f"/v2/orders/{delivery.seller_order_id}/rating", {"stars": 9}, format="json"), 401)
    assert not DeliveryRating.objects.exists()


@pytest.mark.django_db
def test_an_api_token_does_not_replace_the_tracking_token(integration_user):
    delivery = delivery_in("delivered", created_by=integration_user)

    assert_error(
        client_for(integration_user).post(f"/v2/orders/{delivery.seller_order_id}/rating", {"stars": 5}, format="json"), 403
    )
    assert not DeliveryRating.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_ratings_of_one_driver_at_once_are_both_counted():
    driver = john(rating=5)
    deliveries = [delivery_in("delivered", driver=driver) for _ in range(6)]
    stars = [1, 2, 3, 4, 5, 5]
    barrier = threading.Barrier(len(deliveries))
    errors = []

    def run(delivery, n):
        try:
            barrier.wait(timeout=10)
            delivery_rate(delivery_id=delivery.pk, stars=n)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(d, n)) for d, n in zip(deliveries, stars)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert errors == []
    driver.refresh_from_db()
    assert driver.rating == Decimal("3.33")  # 20 / 6


@pytest.mark.django_db(transaction=True)
def test_ops_hear_of_the_drivers_new_rating(anon, listen):
    """The rating changed the driver's `customerRating` with no `driver_performance_updated`:
    the console kept the old one until the driver's next offer or delivery."""
    from analytics.events import DriverPerformanceUpdatedEvent
    from tests.typecheck import assert_event_shape

    driver = john(rating=5)
    first, second = delivery_in("delivered", driver=driver), delivery_in("delivered", driver=driver)
    events = listen("ops")

    assert rate(anon, first, {"stars": 4}).status_code == 201
    assert rate(anon, second, {"stars": 1}).status_code == 201

    updates = [e for e in events.drain() if e["type"] == "driver_performance_updated"]
    assert [(u["driverId"], u["metrics"]["customerRating"]) for u in updates] == [(str(driver.pk), 4.0), (str(driver.pk), 2.5)]
    assert_event_shape(updates[-1], DriverPerformanceUpdatedEvent)
    assert rate(anon, first, {"stars": 2}).status_code == 409  # refused: nothing to tell
    assert not [e for e in events.drain() if e["type"] == "driver_performance_updated"]
