"""The simulated city: where stores and drivers are, how orders arrive, how fast drivers drive
and how they answer offers. Pure Python and seeded: the same seed gives the same city, the
same orders and the same drivers whatever the policy (common random numbers, so policies are
compared on identical demand and supply).

The demo city (`zones.demo.DEMO_ZONES`, Bengaluru): five neighbourhoods under a catch-all
city zone. Stores cluster in the neighbourhoods (the hotspots), each with a popularity drawn
from a heavy-tailed law, so a few stores take a large share of the orders.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tracking import eta
from zones.demo import DEMO_ZONES

CITIES = ("demo",)
CITY_ZONE = "Greater Bengaluru"  # the catch-all zone: not a hotspot
CENTRE = (12.9716, 77.5946)  # (lat, lon)

# Traffic: a zone's speed as a share of the vehicle's typical speed (tracking.eta.SPEED_KMH).
ZONE_SPEED_FACTOR = {
    "Central Business District": 0.70, "Indiranagar": 0.85, "Koramangala": 0.85, "Jayanagar": 0.95,
    "Malleshwaram": 0.95, CITY_ZONE: 1.10,
}
# Hotspot weight of each neighbourhood: its share of stores (and so of orders and drivers).
HOTSPOT_WEIGHT = {
    "Central Business District": 0.30, "Indiranagar": 0.20, "Koramangala": 0.25, "Jayanagar": 0.15, "Malleshwaram": 0.10,
}
STORES = 160
OUTSKIRT_STORE_SHARE = 0.15  # stores outside the neighbourhoods, within OUTSKIRT_KM of the centre
OUTSKIRT_KM = 7.0
VEHICLES = (("motorbike", 0.50), ("scooter", 0.35), ("car", 0.10), ("bicycle", 0.05))

# Drivers
ACCEPT_BASE = (0.55, 0.98)  # a driver's acceptance of an offer at its door: uniform in this range
ACCEPT_DISTANCE_KM = 4.0  # acceptance falls as exp(-pickup distance / this)
RESPONSE_MEDIAN_S = (4.0, 14.0)  # a driver's median time to answer: uniform in this range
RESPONSE_SIGMA = 0.6  # log-normal spread of one answer around the driver's median
IGNORE_SHARE = (0.0, 0.10)  # share of offers a driver never answers (they expire)
BREAK_AFTER_DELIVERY = 0.03  # chance of a break after finishing a delivery
BREAK_MINUTES = (5, 20)
HANDOVER_S = (60.0, 180.0)  # at the store: parking, waiting for the bag
DROPOFF_S = (30.0, 120.0)  # at the door
SPEED_NOISE_SIGMA = 0.15  # log-normal noise on each leg's travel time
DROPOFF_MEDIAN_KM = 2.0  # drop-off distance from the store: log-normal around this
DROPOFF_SIGMA = 0.5
DROPOFF_MAX_KM = 6.0


def _inside(lon: float, lat: float, ring) -> bool:
    inside = False
    for (x1, y1), (x2, y2) in zip(ring, ring[1:]):
        if (y1 > lat) != (y2 > lat) and lon < (x2 - x1) * (lat - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


_BY_PRIORITY = sorted(DEMO_ZONES.items(), key=lambda kv: (kv[1][0], kv[0]))


def zone_at(lat: float, lon: float) -> str | None:
    """The demo zone of a point (overlaps resolve by priority, as `zones` does)."""
    for name, (_priority, _min, _exp, _radius, ring) in _BY_PRIORITY:
        if _inside(lon, lat, ring):
            return name
    return None


def _bbox(ring):
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    return min(lons), max(lons), min(lats), max(lats)


def _point_in_zone(rng: random.Random, name: str) -> tuple[float, float]:
    ring = DEMO_ZONES[name][4]
    x0, x1, y0, y1 = _bbox(ring)
    while True:
        lon, lat = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if _inside(lon, lat, ring):
            return lat, lon


def offset(lat: float, lon: float, km: float, bearing: float) -> tuple[float, float]:
    """The point `km` away from (lat, lon) towards `bearing` (radians), flat-earth (fine at city scale)."""
    dlat = km * math.cos(bearing) / 111.32
    dlon = km * math.sin(bearing) / (111.32 * math.cos(math.radians(lat)))
    return lat + dlat, lon + dlon


def _near(rng: random.Random, lat: float, lon: float, max_km: float) -> tuple[float, float]:
    return offset(lat, lon, max_km * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi))


def _pick(rng: random.Random, weighted):
    total = sum(w for _, w in weighted)
    x = rng.uniform(0, total)
    for item, w in weighted:
        x -= w
        if x <= 0:
            return item
    return weighted[-1][0]


@dataclass(frozen=True)
class Store:
    index: int
    lat: float
    lon: float
    zone: str
    popularity: float


@dataclass(frozen=True)
class DriverTraits:
    index: int
    vehicle_type: str
    lat: float  # where the driver starts
    lon: float
    accept_base: float
    response_median_s: float
    ignore_share: float
    seed: int  # of the driver's own random stream (its answers, its breaks)


@dataclass(frozen=True)
class Order:
    index: int
    at_s: float  # seconds from the start
    store: Store
    pickup: tuple[float, float]  # (lat, lon)
    dropoff: tuple[float, float]


class City:
    """The seeded demo city. Each concern draws from its own stream, so that (for instance)
    adding a driver does not change the orders."""

    def __init__(self, *, seed: int, name: str = "demo"):
        if name not in CITIES:
            raise ValueError(f"Unknown city {name!r}; known: {', '.join(CITIES)}.")
        self.name, self.seed = name, seed
        rng = random.Random(f"{seed}:stores")
        hotspots = list(HOTSPOT_WEIGHT.items())
        stores = []
        for i in range(STORES):
            if rng.random() < OUTSKIRT_STORE_SHARE:
                lat, lon = _near(rng, *CENTRE, OUTSKIRT_KM)
                zone = zone_at(lat, lon) or CITY_ZONE
            else:
                zone = _pick(rng, hotspots)
                lat, lon = _point_in_zone(rng, zone)
            stores.append(Store(i, lat, lon, zone, popularity=rng.paretovariate(1.5)))
        self.stores = stores
        self._store_weights = [(s, s.popularity) for s in stores]

    # ------------------------------------------------------------------ supply
    def drivers(self, count: int) -> list[DriverTraits]:
        """Drivers spread over the zones: near the stores (by store popularity, within 2 km),
        a fifth anywhere within OUTSKIRT_KM of the centre."""
        rng = random.Random(f"{self.seed}:drivers")
        drivers = []
        for i in range(count):
            if rng.random() < 0.2:
                lat, lon = _near(rng, *CENTRE, OUTSKIRT_KM)
            else:
                store = _pick(rng, self._store_weights)
                lat, lon = _near(rng, store.lat, store.lon, 2.0)
            drivers.append(DriverTraits(
                index=i, vehicle_type=_pick(rng, VEHICLES), lat=lat, lon=lon,
                accept_base=rng.uniform(*ACCEPT_BASE), response_median_s=rng.uniform(*RESPONSE_MEDIAN_S),
                ignore_share=rng.uniform(*IGNORE_SHARE), seed=rng.getrandbits(64),
            ))
        return drivers

    # ------------------------------------------------------------------ demand
    def orders(self, *, per_hour: float, seconds: float) -> list[Order]:
        """A Poisson process of `per_hour` orders over `seconds`; each from a store drawn by
        popularity (the hotspots), to a drop-off at a log-normal distance from it."""
        rng = random.Random(f"{self.seed}:orders")
        orders, t, rate = [], 0.0, per_hour / 3600.0
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= seconds:
                break
            store = _pick(rng, self._store_weights)
            pickup = offset(store.lat, store.lon, rng.uniform(0, 0.02), rng.uniform(0, 2 * math.pi))
            km = min(DROPOFF_MAX_KM, max(0.3, rng.lognormvariate(math.log(DROPOFF_MEDIAN_KM), DROPOFF_SIGMA)))
            dropoff = offset(store.lat, store.lon, km, rng.uniform(0, 2 * math.pi))
            orders.append(Order(len(orders), t, store, pickup, dropoff))
        return orders


class DriverMind:
    """One driver's choices, from its own random stream."""

    def __init__(self, traits: DriverTraits):
        self.traits = traits
        self.rng = random.Random(traits.seed)

    def answer(self, pickup_km: float) -> tuple[str, float]:
        """('accept' | 'reject' | 'ignore', seconds to answer)."""
        t = self.traits
        if self.rng.random() < t.ignore_share:
            return "ignore", 0.0
        seconds = min(120.0, self.rng.lognormvariate(math.log(t.response_median_s), RESPONSE_SIGMA))
        p = t.accept_base * math.exp(-pickup_km / ACCEPT_DISTANCE_KM)
        return ("accept" if self.rng.random() < p else "reject"), seconds

    def travel_seconds(self, a: tuple[float, float], b: tuple[float, float]) -> float:
        """Door to door at the speed of the zone the leg starts in, with noise."""
        km = eta.haversine_km(a[0], a[1], b[0], b[1])
        zone = zone_at(*a) or CITY_ZONE
        base = eta.travel_seconds(km, self.traits.vehicle_type) / ZONE_SPEED_FACTOR[zone]
        return max(5.0, base * self.rng.lognormvariate(0.0, SPEED_NOISE_SIGMA))

    def handover_seconds(self) -> float:
        return self.rng.uniform(*HANDOVER_S)

    def dropoff_seconds(self) -> float:
        return self.rng.uniform(*DROPOFF_S)

    def break_minutes(self) -> int | None:
        if self.rng.random() < BREAK_AFTER_DELIVERY:
            return self.rng.randint(*BREAK_MINUTES)
        return None
