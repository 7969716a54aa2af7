"""The layered layout moved Driver to availability, performance and economics to analytics and
ratings to tracking without moving data: rows written under the old layout are read under
the new one, and the content types (so permissions and admin history) follow their models."""
import uuid
from decimal import Decimal

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [
    ("dispatch", "0005_delivery_eta_and_rating"),
    ("availability", "0002_initial"),
    ("offers", "0001_initial"),
    ("zones", "0001_initial"),
    ("contenttypes", "0002_remove_content_type_name"),
]
MOVED = {"driver": "availability", "driverperformance": "analytics", "deliverycost": "analytics",
         "deliveryrevenue": "analytics", "deliveryrating": "tracking"}


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def test_rows_written_by_the_old_layout_survive_the_move():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    old = _migrate(BEFORE)
    try:
        User = old.get_model("common", "User")
        Driver = old.get_model("dispatch", "Driver")
        Delivery = old.get_model("dispatch", "Delivery")
        Performance = old.get_model("dispatch", "DriverPerformance")
        Rating = old.get_model("dispatch", "DeliveryRating")
        ContentType = old.get_model("contenttypes", "ContentType")
        now = timezone.now()
        user = User.objects.create(id=uuid.uuid4(), username="old-layout-driver")
        owner = User.objects.create(id=uuid.uuid4(), username="old-layout-seller")
        driver = Driver.objects.create(id=uuid.uuid4(), user=user, name="Old Layout", phone="+15550001", vehicle="Bike",
                                       availability="available", rating=Decimal("4.50"))
        delivery = Delivery.objects.create(
            id=uuid.uuid4(), seller_order_id="OLD-1", created_by=owner, store_name="Store", status="delivered",
            pickup_location="SRID=4326;POINT(77.59 12.97)", dropoff_location="SRID=4326;POINT(77.60 12.98)",
            ready_at=now, tracking_token="t" * 32,
        )
        Performance.objects.create(driver=driver, deliveries_completed=3, total_earnings=Decimal("42.00"))
        Rating.objects.create(id=uuid.uuid4(), delivery=delivery, driver=driver, stars=5, created_at=now)
        for model, app_label in MOVED.items():
            # A database of the old layout never had the new labels (this one was built new).
            ContentType.objects.filter(app_label=app_label, model=model).delete()
            ContentType.objects.get_or_create(app_label="dispatch", model=model)

        new = _migrate(latest)

        NewDriver = new.get_model("availability", "Driver")
        moved = NewDriver.objects.get(pk=driver.pk)
        assert (moved.name, moved.availability, moved.rating, moved.user_id) == ("Old Layout", "available", Decimal("4.50"), user.pk)
        assert new.get_model("analytics", "DriverPerformance").objects.get(driver_id=driver.pk).deliveries_completed == 3
        assert new.get_model("tracking", "DeliveryRating").objects.get(delivery_id=delivery.pk).stars == 5
        assert new.get_model("offers", "DriverOffer")._meta.get_field("driver").related_model is NewDriver
        types = new.get_model("contenttypes", "ContentType").objects
        for model, app_label in MOVED.items():
            assert types.filter(app_label=app_label, model=model).exists(), model
            assert not types.filter(app_label="dispatch", model=model).exists(), model
    finally:
        _migrate(latest)  # leave the test database as the other tests expect it
