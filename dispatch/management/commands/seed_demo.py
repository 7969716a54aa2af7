"""Demo data for `make run`: a small city with ops, support and integration logins, drivers
with locations and tokens, and a few deliveries. Safe to run again (nothing is duplicated)."""
import math
import random
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.gis.geos import Point
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from availability.models import Driver, DriverAvailability
from availability.services import driver_create, driver_location_update
from common.actors import Actor
from common.groups import groups_sync
from common.roles import DISPATCHER_GROUP, INTEGRATIONS_GROUP, SUPPORT_GROUP
from common.tokens import api_token_create, api_tokens_revoke
from dispatch import services
from dispatch.models import Delivery
from workflows.deliveries import delivery_create
from workflows.drivers import availability_change
from zones.demo import ensure_demo_zones
from zones.services import zone_health_refresh

CITY = (12.9716, 77.5946)  # Bengaluru, as in the design's examples
DRIVERS = [
    ("Asha Rao", "Honda Activa, Red", "scooter"), ("Vikram Shetty", "Maruti Swift, White", "car"),
    ("Meera Iyer", "TVS Jupiter, Blue", "scooter"), ("Rahul Nair", "Bajaj Pulsar, Black", "motorbike"),
    ("Kavya Reddy", "Hyundai i20, Grey", "car"), ("Arjun Menon", "Hero Splendor, Red", "motorbike"),
    ("Divya Pillai", "Ather 450X, Green", "scooter"), ("Suresh Kumar", "Tata Ace, White", "van"),
    ("Nisha Das", "Honda Dio, Yellow", "scooter"), ("Imran Khan", "Royal Enfield, Black", "motorbike"),
    ("Priya Menon", "Hercules Cycle, Blue", "bicycle"), ("Karthik Gowda", "Toyota Etios, Silver", "car"),
]
STORES = ["Indiranagar Fresh Market", "Koramangala Bakery", "MG Road Pharmacy", "Jayanagar Grocers"]


def near(lat, lon, km, rng):
    d = km / 111.0
    return Point(lon + rng.uniform(-d, d) / math.cos(math.radians(lat)), lat + rng.uniform(-d, d), srid=4326)


def demo_token(user) -> str:
    """A fresh demo token (tokens are stored hashed, so the last run's cannot be shown
    again): the previous demo token of `user` is revoked."""
    api_tokens_revoke(user, name="demo")
    return api_token_create(user, name="demo")


class Command(BaseCommand):
    help = "Load demo data (idempotent)."

    @transaction.atomic
    def handle(self, *args, **options):
        rng = random.Random(42)
        User = get_user_model()
        integrations, _ = Group.objects.get_or_create(name=INTEGRATIONS_GROUP)
        support, _ = Group.objects.get_or_create(name=SUPPORT_GROUP)

        # `ops` runs the console as a Dispatcher (staff, least privilege: no users, tokens or
        # schedule); `admin` is the separate superuser login for those.
        roles = groups_sync()
        ops, _ = User.objects.get_or_create(username="ops", defaults={"email": "ops@example.com"})
        ops.is_staff, ops.is_superuser = True, False
        ops.set_password(settings.DEMO_OPS_PASSWORD)
        ops.save()
        ops.groups.add(roles[DISPATCHER_GROUP])
        admin, _ = User.objects.get_or_create(username="admin", defaults={"email": "admin@example.com"})
        admin.is_staff = admin.is_superuser = True
        admin.set_password(settings.DEMO_OPS_PASSWORD)
        admin.save()
        ops_token = demo_token(ops)

        agent, _ = User.objects.get_or_create(username="support", defaults={"email": "support@example.com"})
        agent.set_password(settings.DEMO_OPS_PASSWORD)
        agent.save()
        agent.groups.add(support)

        market, _ = User.objects.get_or_create(username="marketplace")
        market.set_unusable_password()
        market.save()
        market.groups.add(integrations)
        market_token = demo_token(market)

        driver_tokens = []
        for i, (name, vehicle, vtype) in enumerate(DRIVERS):
            username = f"demo-driver-{i + 1}"
            driver = Driver.objects.filter(user__username=username).first()
            if driver is None:
                driver, key = driver_create(
                    name=name, phone=f"+9198450{i:05d}", vehicle=vehicle, vehicle_type=vtype, username=username,
                    home_location=near(*CITY, 6, rng),
                )
            else:
                key = demo_token(driver.user)
            fix = near(*CITY, 3, rng)
            driver_location_update(
                driver_id=driver.pk, lat=fix.y, lon=fix.x, accuracy_m=15, recorded_at=timezone.now()
            )
            if i < 8 and driver.availability in (DriverAvailability.OFFLINE, DriverAvailability.SHIFT_ENDED):
                availability_change(driver_id=driver.pk, to_state=DriverAvailability.AVAILABLE, reason="demo", actor=Actor.system())
            driver_tokens.append((name, str(driver.pk), key))

        zones = ensure_demo_zones()  # before the deliveries, so that they get their zone

        for n, store in enumerate(STORES, start=1):
            order_id = f"DEMO-{n:04d}"
            if not Delivery.objects.filter(created_by=market, seller_order_id=order_id).exists():
                delivery_create(
                    data=services.DeliveryInput(
                        seller_order_id=order_id, store_name=store, pickup_location=near(*CITY, 2, rng),
                        dropoff_location=near(*CITY, 4, rng), dropoff_address=f"{10 + n} Demo Street, Bengaluru",
                        customer_name=f"Demo Customer {n}", customer_phone=f"+9190000{n:05d}",
                        prep_time_minutes=5 + n, delivery_fee=Decimal("45.00") + n,
                    ),
                    created_by=market,
                    actor=Actor.for_user(market),
                )

        zone_health_refresh()  # so the zones list shows health before the first beat tick

        out = self.stdout.write
        out("Demo data ready.")
        out(f"  ops console login:   ops / {settings.DEMO_OPS_PASSWORD}   (API token {ops_token})")
        out(f"  admin (superuser):   admin / {settings.DEMO_OPS_PASSWORD}   (users, API tokens, schedule)")
        out(f"  support agent login: support / {settings.DEMO_OPS_PASSWORD}")
        out(f"  integration token:   {market_token}   (user 'marketplace')")
        out("  drivers (name, id, API token):")
        for name, pk, key in driver_tokens[:5]:
            out(f"    {name:16} {pk} {key}")
        out(f"    ... and {len(driver_tokens) - 5} more (admin → Drivers)")
        out(f"  zones: {len(zones)} (admin → Delivery zones)")
