"""The OSRM routing backend against a real HTTP server started in the test (127.0.0.1:0), and
its fallback to the great-circle estimate when OSRM is slow, down or has no route."""
import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from common.actors import Actor
from tracking import eta
from tracking import services as eta_service
from dispatch.models import Delivery
from tracking.routing import GreatCircleBackend, OsrmBackend, get_routing_backend
from workflows.deliveries import assignment_create
from tests.factories import DeliveryFactory, DriverFactory, km_north

ORIGIN, DESTINATION = (12.9716, 77.5946), (12.9916, 77.6046)


class FakeOsrm:
    """A tiny OSRM: answers /route/v1/driving/... with a fixed route, or misbehaves on request."""

    def __init__(self):
        self.requests: list[str] = []
        self.delay = 0.0
        self.status = 200
        self.body = {"code": "Ok", "routes": [{"distance": 4321.0, "duration": 456.7}], "waypoints": []}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.requests.append(self.path)
                if fake.delay:
                    time.sleep(fake.delay)
                payload = json.dumps(fake.body).encode()
                try:
                    self.send_response(fake.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for serve_forever's next poll: the default 0.5 s held every test's teardown.
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def osrm():
    server = FakeOsrm()
    yield server
    server.stop()


def test_osrm_is_asked_for_the_driving_route_lon_lat_first_without_overview(osrm):
    backend = OsrmBackend(url=osrm.url, timeout=2, cooldown=30)

    leg = backend.leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="car")

    assert osrm.requests == ["/route/v1/driving/77.594600,12.971600;77.604600,12.991600?overview=false"]
    assert (leg.distance_km, leg.seconds, leg.source) == (4.321, 456.7, "osrm")


def test_for_bicycles_osrm_gives_the_road_distance_and_our_speed_the_time(osrm):
    leg = OsrmBackend(url=osrm.url, timeout=2, cooldown=30).leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="bicycle")

    assert leg.distance_km == 4.321 and leg.seconds == pytest.approx(4.321 / 15 * 3600)


def test_a_slow_osrm_times_out_falls_back_and_is_skipped_for_the_cooldown(osrm):
    osrm.delay = 1.5
    backend = OsrmBackend(url=osrm.url, timeout=0.2, cooldown=30)
    expected = GreatCircleBackend().leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="car")

    started = time.monotonic()
    first = backend.leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="car")
    second = backend.leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="car")
    elapsed = time.monotonic() - started

    assert first == expected and second == expected and first.source == "great_circle"
    assert elapsed < 1.0  # one timeout of 0.2 s, not two, and never the server's 1.5 s
    assert len(osrm.requests) == 1  # the second call did not go to OSRM


def test_after_the_cooldown_osrm_is_tried_again(osrm):
    backend = OsrmBackend(url=osrm.url, timeout=0.2, cooldown=0.3)
    osrm.delay = 1.0
    assert backend.leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="car").source == "great_circle"

    osrm.delay = 0
    time.sleep(0.35)
    assert backend.leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="car").source == "osrm"


@pytest.mark.parametrize(
    "status,body",
    [
        (400, {"code": "NoRoute", "message": "Impossible route between points"}),
        (200, {"code": "NoSegment"}),
        (200, {"code": "Ok", "routes": []}),
        (200, {"code": "Ok", "routes": [{"distance": "far"}]}),
        (200, ["not", "an", "object"]),
    ],
)
def test_an_unusable_answer_falls_back_for_that_leg_only(osrm, status, body):
    osrm.status, osrm.body = status, body
    backend = OsrmBackend(url=osrm.url, timeout=2, cooldown=30)

    assert backend.leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="car").source == "great_circle"
    osrm.status, osrm.body = 200, {"code": "Ok", "routes": [{"distance": 1000.0, "duration": 99.0}]}
    assert backend.leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="car").seconds == 99.0  # no cooldown


def test_a_refused_connection_falls_back():
    server = FakeOsrm()
    url = server.url
    server.stop()  # nothing listens there any more

    leg = OsrmBackend(url=url, timeout=0.5, cooldown=30).leg(origin=ORIGIN, destination=DESTINATION, vehicle_type="van")

    assert leg.source == "great_circle" and leg.seconds == pytest.approx(
        eta.travel_seconds(eta.haversine_km(*ORIGIN, *DESTINATION), "van")
    )


def test_routing_backend_setting_picks_osrm_and_the_stored_eta_uses_its_durations(osrm, settings, db):
    settings.ROUTING_BACKEND = "osrm"
    settings.OSRM_URL = osrm.url
    assert isinstance(get_routing_backend(), OsrmBackend)
    eta_service._leg_cache.clear()
    driver = DriverFactory(location=km_north(-2))
    delivery = DeliveryFactory(prep_time_minutes=0)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    now = driver.location_recorded_at + timedelta(seconds=1)

    result = eta_service.delivery_eta_refresh(delivery_id=delivery.pk, now=now)

    stored = Delivery.objects.get(pk=delivery.pk)
    assert result.pickup_at == stored.eta_pickup_at == now + timedelta(seconds=round(456.7))
    assert stored.eta_delivery_at == stored.eta_pickup_at + timedelta(seconds=round(456.7 + eta.HANDOVER_SECONDS))
    assert stored.eta_confidence == 0.9  # OSRM's base confidence, fresh and accurate fix
    assert len(osrm.requests) == 2  # driver → store, store → door


def test_when_osrm_is_down_the_stored_eta_is_the_great_circle_one_with_its_confidence(settings, db):
    server = FakeOsrm()
    server.delay = 1.0
    settings.ROUTING_BACKEND = "osrm"
    settings.OSRM_URL = server.url
    settings.OSRM_TIMEOUT_SECONDS = 0.2
    eta_service._leg_cache.clear()
    try:
        driver = DriverFactory(location=km_north(-2))
        delivery = DeliveryFactory(prep_time_minutes=0, dropoff_location=km_north(3))
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        now = driver.location_recorded_at + timedelta(seconds=1)

        result = eta_service.delivery_eta_refresh(delivery_id=delivery.pk, now=now)
    finally:
        server.stop()

    assert result.pickup_at == now + timedelta(seconds=round(2 * 1.3 / 25 * 3600))
    assert result.confidence == 0.8
