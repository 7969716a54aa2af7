"""The candidate search (`availability.geo.drivers_near_redis`, the Lua rings) against a
brute-force reference on random fleets, and the fleet keys it runs on.

The reference recomputes every distance the way GEOSEARCH does (Redis's sphere and formula, on
the positions GEOPOS decodes) and keeps the `limit` nearest members within the radius whose fix
is fresh. Members whose distance is within 1 mm of another's, or within 1 cm of the radius, are
removed before searching, so that the order is never a coin toss."""
import math
import random
import uuid
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.utils import timezone
from redis.crc import key_slot

from availability import geo
from availability.models import Driver
from common.redis import get_redis
from tests.factories import CITY, DriverFactory, point

REDIS_EARTH_RADIUS_M = 6372797.560856
D_R = math.pi / 180.0


def r():
    return get_redis()


def redis_distance_m(lon1, lat1, lon2, lat2):
    """geohashGetDistance (Redis 7, geohash_helper.c), operation for operation."""
    lon1r, lon2r = lon1 * D_R, lon2 * D_R
    v = math.sin((lon2r - lon1r) / 2)
    if v == 0.0:
        return REDIS_EARTH_RADIUS_M * abs(lat2 * D_R - lat1 * D_R)
    lat1r, lat2r = lat1 * D_R, lat2 * D_R
    u = math.sin((lat2r - lat1r) / 2)
    a = u * u + math.cos(lat1r) * math.cos(lat2r) * v * v
    return 2.0 * REDIS_EARTH_RADIUS_M * math.asin(math.sqrt(a))


def destination(lat, lon, distance_m, bearing_deg):
    d, b = distance_m / REDIS_EARTH_RADIUS_M, math.radians(bearing_deg)
    p1, l1 = math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), math.degrees(l2)


class Fleet:
    """Members written straight into the GEO index (no PostgreSQL), with their decoded positions
    and a kind: `fresh`, `stale` (fix older than the cutoff) or `nofix` (no fix time at all)."""

    def __init__(self, centre, now):
        self.centre, self.now = centre, now
        self.cutoff = (now - timedelta(seconds=django_settings.DRIVER_STALE_AFTER_SECONDS)).timestamp()
        self.kind, self.pos = {}, {}

    def add(self, specs, rng):
        """specs: (distance_m, bearing, kind) triples."""
        geo_items, fixes = [], {}
        for distance_m, bearing, kind in specs:
            lat, lon = destination(*self.centre, distance_m, bearing)
            member = str(uuid.UUID(int=rng.getrandbits(128)))
            geo_items.extend((lon, lat, member))
            self.kind[member] = kind
            if kind == "fresh":
                fixes[member] = self.cutoff + rng.uniform(0, 500)
            elif kind == "stale":
                fixes[member] = self.cutoff - rng.uniform(0.001, 3000)
        for i in range(0, len(geo_items), 3000):
            r().geoadd(geo.GEO_KEY, geo_items[i:i + 3000])
        if fixes:
            r().zadd(geo.FIX_KEY, fixes)
        members = geo_items[2::3]
        for member, p in zip(members, r().geopos(geo.GEO_KEY, *members)):
            self.pos[member] = (float(p[1]), float(p[0]))  # (lat, lon) as Redis decodes them

    def distance_m(self, member):
        lat, lon = self.pos[member]
        return redis_distance_m(self.centre[1], self.centre[0], lon, lat)

    def drop_ambiguous(self, radius_m):
        """Remove members whose distance is within 1 mm of another's or within 1 cm of the radius."""
        ranked = sorted(self.pos, key=self.distance_m)
        dist = [self.distance_m(m) for m in ranked]
        doomed = {m for i, m in enumerate(ranked)
                  if abs(dist[i] - radius_m) < 0.01
                  or (i > 0 and dist[i] - dist[i - 1] < 0.001)
                  or (i + 1 < len(ranked) and dist[i + 1] - dist[i] < 0.001)}
        if doomed:
            r().zrem(geo.GEO_KEY, *doomed)
            r().zrem(geo.FIX_KEY, *doomed)
            for m in doomed:
                del self.pos[m], self.kind[m]

    def expected(self, radius_m, limit):
        inside = [m for m in self.pos if self.kind[m] == "fresh" and self.distance_m(m) <= radius_m]
        return sorted(inside, key=self.distance_m)[:limit]

    def search(self, radius_km, limit):
        return geo.candidate_search(
            r(), geo_key=geo.GEO_KEY, fix_key=geo.FIX_KEY, lat=self.centre[0], lon=self.centre[1],
            radius_km=radius_km, limit=limit, cutoff=self.cutoff,
        )

    def check(self, radius_km, limit):
        """The search's answer is the reference's, with Redis's distances and positions."""
        self.drop_ambiguous(radius_km * 1000)
        found, trace = self.search(radius_km, limit)
        expected = self.expected(radius_km * 1000, limit)
        assert [d.driver_id for d in found] == expected, trace
        for d in found:
            assert d.distance_km * 1000 == pytest.approx(self.distance_m(d.driver_id), abs=0.001)
            assert (d.lat, d.lon) == self.pos[d.driver_id]
        # the selector over the app's keys answers the same
        assert geo.drivers_near_redis(lat=self.centre[0], lon=self.centre[1], radius_km=radius_km, limit=limit,
                                      now=self.now) == found
        return found, trace


def random_specs(rng, n, radius_m, kinds=(80, 15, 5)):
    """n members: a uniform spread over 1.6 × the radius, a hotspot somewhere inside it."""
    specs = []
    hot_d, hot_b, hot_r = rng.uniform(0, radius_m), rng.uniform(0, 360), rng.uniform(0.02, 0.3) * radius_m
    for _ in range(n):
        kind = rng.choices(["fresh", "stale", "nofix"], weights=kinds)[0]
        if rng.random() < 0.3:  # the hotspot (a point hot_r around the hotspot's centre, roughly)
            dlat, dlon = destination(0.0, 0.0, hot_r * math.sqrt(rng.random()), rng.uniform(0, 360))
            specs.append((None, (hot_d, hot_b, dlat, dlon), kind))
        else:
            specs.append((1.6 * radius_m * math.sqrt(rng.random()), rng.uniform(0, 360), kind))
    return specs


def resolve(specs, centre):
    """Turn hotspot offsets into (distance, bearing) from the centre."""
    out = []
    for d, b, kind in specs:
        if d is None:
            hot_d, hot_b, dlat, dlon = b
            h_lat, h_lon = destination(*centre, hot_d, hot_b)
            lat, lon = h_lat + dlat, h_lon + dlon
            d = redis_distance_m(centre[1], centre[0], lon, lat)
            y = math.sin(math.radians(lon - centre[1])) * math.cos(math.radians(lat))
            x = math.cos(math.radians(centre[0])) * math.sin(math.radians(lat)) - math.sin(
                math.radians(centre[0])) * math.cos(math.radians(lat)) * math.cos(math.radians(lon - centre[1]))
            b = math.degrees(math.atan2(y, x))
        out.append((d, b, kind))
    return out


# ------------------------------------------------------------------------- the property


@pytest.mark.parametrize("seed", range(24))
def test_the_search_answers_what_a_brute_force_search_answers(seed, monkeypatch):
    if seed % 4 == 1:
        # the walk past stale members, as when the purge cannot remove them (a caller whose
        # clock is ahead of Redis's, more than PURGE_MAX at once); the other seeds purge
        monkeypatch.setattr(geo, "PURGE_MAX", 0)
    rng = random.Random(seed)
    centre = CITY if seed % 3 == 0 else (rng.uniform(-60, 60), rng.uniform(-170, 170))
    radius_km = rng.choice([0.3, 1, 2.5, 5, 5, 12])
    radius_m = radius_km * 1000
    fleet = Fleet(centre, timezone.now())
    n = rng.choice([40, 300, 1200, 3000])
    stale_weight = rng.choice([0, 15, 50, 90])
    fleet.add(resolve(random_specs(rng, n, radius_m, kinds=(100 - stale_weight, stale_weight, 5)), centre), rng)
    if seed % 2:
        # a crowd of stale drivers: around the point, or in a band farther out
        inner = rng.choice([0, 0, 0.3, 0.6, 0.85]) * radius_m
        fleet.add([(rng.uniform(inner, inner + 0.08 * radius_m), rng.uniform(0, 360), "stale")
                   for _ in range(rng.choice([30, 400]))], rng)
    for limit in sorted({1, rng.choice([3, 5]), 20, 100, rng.choice([250, 700])}):
        fleet.check(radius_km, limit)


def test_a_city_at_dispatch_scale_is_answered_from_small_rings():
    """5,000 drivers within 5 km (a tenth of them stale) and more beyond: the 100 nearest come
    from a ring well inside the radius, not from sorting all 5,000."""
    rng = random.Random(5)
    fleet = Fleet(CITY, timezone.now())
    specs = [(4_990 * math.sqrt(rng.random()), rng.uniform(0, 360), "stale" if rng.random() < 0.1 else "fresh")
             for _ in range(5_000)]
    specs += [(math.sqrt(rng.uniform(5_010 ** 2, 15_000 ** 2)), rng.uniform(0, 360), "fresh") for _ in range(5_000)]
    fleet.add(specs, rng)

    found, trace = fleet.check(5, 100)

    assert len(found) == 100
    assert trace.rings <= 3 and trace.last_radius_m < 1_500, trace
    assert trace.last_count < 1_000


def test_stale_drivers_nearest_the_point_make_the_search_ask_for_more_not_give_fewer(monkeypatch):
    monkeypatch.setattr(geo, "PURGE_MAX", 0)  # stale members the purge did not remove
    rng = random.Random(11)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(rng.uniform(0, 400), rng.uniform(0, 360), "stale") for _ in range(1_500)], rng)
    fleet.add([(rng.uniform(400, 4_000), rng.uniform(0, 360), "fresh") for _ in range(600)], rng)
    fleet.add([(rng.uniform(0, 4_000), rng.uniform(0, 360), "nofix") for _ in range(100)], rng)

    found, trace = fleet.check(5, 50)

    assert len(found) == 50
    assert all(d.distance_km > 0.399 for d in found)  # past the stale crowd (positions move < 1 m in the index)
    assert 2 <= trace.rings <= 6, trace  # asked the same ring for ×4 more, a few times


def test_a_band_of_stale_drivers_at_the_edge_of_the_radius_does_not_hide_the_fresh_ones_beyond_it(monkeypatch):
    """Nobody near the point, so the rings grow to the whole radius and find it crowded with
    stale drivers: a full COUNT there is not the whole radius; the search must ask for more."""
    monkeypatch.setattr(geo, "PURGE_MAX", 0)
    rng = random.Random(12)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(rng.uniform(600, 900), rng.uniform(0, 360), "stale") for _ in range(300)], rng)
    fleet.add([(rng.uniform(900, 990), rng.uniform(0, 360), "fresh") for _ in range(40)], rng)

    found, trace = fleet.check(1, 20)

    assert len(found) == 20 and trace.last_radius_m == 1_000, trace


def test_more_than_a_thousand_asked_for_and_more_than_a_thousand_stale(monkeypatch):
    """Fix times and positions are read a thousand members at a time (Lua's unpack limit)."""
    monkeypatch.setattr(geo, "PURGE_MAX", 0)
    rng = random.Random(3)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(rng.uniform(0, 300), rng.uniform(0, 360), "stale") for _ in range(2_500)], rng)
    fleet.add([(rng.uniform(300, 3_000), rng.uniform(0, 360), "fresh") for _ in range(2_600)], rng)

    found, _ = fleet.check(5, 2_200)
    assert len(found) == 2_200

    found, _ = fleet.check(5, 5_000)  # more than there are: all of them
    assert len(found) == sum(1 for k in fleet.kind.values() if k == "fresh")


def test_fewer_fresh_drivers_than_asked_for_gives_all_of_them_and_none_beyond_the_radius():
    rng = random.Random(8)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(rng.uniform(0, 5_000), rng.uniform(0, 360), rng.choice(["fresh", "stale", "nofix"]))
               for _ in range(200)], rng)
    fleet.add([(rng.uniform(5_050, 9_000), rng.uniform(0, 360), "fresh") for _ in range(500)], rng)

    found, trace = fleet.check(5, 100)

    assert 0 < len(found) < 100
    assert trace.last_radius_m == 5_000
    assert max(d.distance_km for d in found) <= 5


def test_a_search_that_grows_for_long_settles_on_the_whole_radius(monkeypatch):
    """The script gives up growing after 24 searches and searches the whole radius, unbounded."""
    monkeypatch.setattr(geo, "FIRST_RING_SHARE", 1e-16)
    rng = random.Random(21)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(rng.uniform(100, 5_000), rng.uniform(0, 360), rng.choice(["fresh", "stale"])) for _ in range(300)], rng)

    found, trace = fleet.check(5, 20)

    assert trace.rings == 25 and len(found) == 20


def test_a_member_without_a_fix_time_is_never_a_candidate():
    rng = random.Random(1)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(100, 0, "nofix"), (200, 90, "fresh")], rng)

    found, _ = fleet.check(1, 5)

    assert [fleet.kind[d.driver_id] for d in found] == ["fresh"]


def test_edge_cases_limit_zero_radius_zero_empty_index():
    now = timezone.now()
    assert geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=10, now=now) == []
    fleet = Fleet(CITY, now)
    fleet.add([(0, 0, "fresh"), (50, 0, "fresh")], random.Random(2))
    assert geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=0, now=now) == []
    found = geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=0, limit=5, now=now)
    assert [round(d.distance_km * 1000, 1) for d in found] == [round(fleet.distance_m(d.driver_id), 1) for d in found]
    assert all(d.distance_km * 1000 <= 0.5 for d in found)


# ------------------------------------------------- stale members leave, the first ring


def fix_time(member):
    return r().zscore(geo.FIX_KEY, member)


def test_a_search_removes_the_stale_members_from_the_index_and_keeps_the_fresh_and_fixless_ones():
    rng = random.Random(31)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(rng.uniform(0, 3_000), rng.uniform(0, 360), kind)
               for kind in ["stale"] * 120 + ["fresh"] * 200 + ["nofix"] * 10], rng)
    stale = {m for m, k in fleet.kind.items() if k == "stale"}

    found, trace = fleet.check(5, 20)

    assert trace.purged == len(stale)
    assert all(fix_time(m) is None and r().geopos(geo.GEO_KEY, m)[0] is None for m in stale)
    kept = set(r().zrange(geo.GEO_KEY, 0, -1))
    assert kept == {m for m, k in fleet.kind.items() if k != "stale"}
    # the index now holds fresh drivers only (and the fix-less, never returned): one ring of
    # limit + a few answers
    found_again, trace = fleet.search(5, 20)
    assert found_again == found and trace.purged == 0


def test_one_search_removes_at_most_purge_max_and_still_answers_exactly(monkeypatch):
    monkeypatch.setattr(geo, "PURGE_MAX", 40)
    rng = random.Random(32)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(rng.uniform(0, 500), rng.uniform(0, 360), "stale") for _ in range(100)], rng)
    fleet.add([(rng.uniform(500, 3_000), rng.uniform(0, 360), "fresh") for _ in range(300)], rng)

    _, trace = fleet.check(5, 30)  # exact with 60 stale left, then again (drivers_near_redis) with 20
    assert trace.purged == 40 and r().zcard(geo.FIX_KEY) == 300 + 20
    _, trace = fleet.search(5, 30)
    assert trace.purged == 20
    _, trace = fleet.search(5, 30)
    assert trace.purged == 0
    assert r().zcard(geo.GEO_KEY) == r().zcard(geo.FIX_KEY) == 300


def test_a_caller_whose_clock_is_ahead_never_removes_a_driver_fresh_by_redis_clock():
    """`now` later than Redis's clock (a test, a skewed web server): a driver stale by that `now`
    but fresh by Redis's clock is not returned, and stays in the index for everyone else."""
    real_now = timezone.now()
    fleet = Fleet(CITY, real_now)
    fleet.add([(100, 0, "fresh"), (200, 90, "fresh")], random.Random(33))
    nearer, farther = sorted(fleet.pos, key=fleet.distance_m)
    r().zadd(geo.FIX_KEY, {nearer: fleet.cutoff + 60})  # fresh for another minute
    r().zadd(geo.FIX_KEY, {farther: fleet.cutoff + 500})

    later = geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=1, limit=5,
                                   now=real_now + timedelta(seconds=120))

    assert [d.driver_id for d in later] == [farther]
    assert fix_time(nearer) == fleet.cutoff + 60
    assert [d.driver_id for d in geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=1, limit=5,
                                                        now=real_now)] == [nearer, farther]


@pytest.mark.parametrize("seed", range(6))
def test_whatever_the_first_ring_the_answer_is_the_same(seed):
    """The first ring (a hint from an earlier search, maybe of a denser or emptier place) only
    changes how many rings the search takes, never what it answers."""
    rng = random.Random(100 + seed)
    fleet = Fleet(CITY, timezone.now())
    fleet.add(resolve(random_specs(rng, rng.choice([300, 1500]), 3_000, kinds=(80, 15, 5)), CITY), rng)
    fleet.drop_ambiguous(3_000)
    for limit in (1, 20, 100):
        expected = fleet.expected(3_000, limit)
        for first_ring_m in (0.5, 40, 400, 1_500, 3_000, 30_000):
            found, trace = geo.candidate_search(
                r(), geo_key=geo.GEO_KEY, fix_key=geo.FIX_KEY, lat=CITY[0], lon=CITY[1], radius_km=3, limit=limit,
                cutoff=fleet.cutoff, first_ring_m=first_ring_m)
            assert [d.driver_id for d in found] == expected, (limit, first_ring_m, trace)
            assert trace.first_radius_m == min(first_ring_m, 3_000)


def test_without_positions_the_same_drivers_and_distances_and_no_positions():
    rng = random.Random(34)
    fleet = Fleet(CITY, timezone.now())
    fleet.add([(rng.uniform(0, 4_000), rng.uniform(0, 360), rng.choice(["fresh", "fresh", "stale", "nofix"]))
               for _ in range(400)], rng)
    with_positions, _ = fleet.check(5, 50)

    without = geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=50, now=fleet.now, positions=False)

    assert [(d.driver_id, d.distance_km) for d in without] == [(d.driver_id, d.distance_km) for d in with_positions]
    assert all(d.lat is None and d.lon is None for d in without)


def test_at_dispatch_scale_a_search_after_the_first_in_the_area_takes_one_ring():
    """5,000 drivers within 5 km, a tenth of them stale: the first searches remove the stale ones
    (PURGE_MAX a search) and leave a hint; the next, from a point nearby, searches one ring of
    COUNT limit + a few."""
    rng = random.Random(35)
    fleet = Fleet(CITY, timezone.now())
    specs = [(4_990 * math.sqrt(rng.random()), rng.uniform(0, 360), "stale" if rng.random() < 0.1 else "fresh")
             for _ in range(5_000)]
    specs += [(math.sqrt(rng.uniform(5_010 ** 2, 15_000 ** 2)), rng.uniform(0, 360), "fresh") for _ in range(5_000)]
    fleet.add(specs, rng)
    stale = sum(1 for k in fleet.kind.values() if k == "stale")
    searches = math.ceil(stale / geo.PURGE_MAX)
    assert searches >= 2
    geo._ring_hints.clear()
    near_here = dict(radius_km=5, limit=100, now=fleet.now, positions=False)

    traces = []
    for _ in range(searches):
        previous, trace = geo.search_near_redis(lat=CITY[0], lon=CITY[1], **near_here)
        traces.append(trace)
    assert traces[0].first_radius_m == 5_000 * geo.FIRST_RING_SHARE
    assert [t.purged for t in traces] == [geo.PURGE_MAX] * (searches - 1) + [stale - (searches - 1) * geo.PURGE_MAX]
    assert r().zcard(geo.GEO_KEY) == r().zcard(geo.FIX_KEY) == 10_000 - stale

    found, trace = geo.search_near_redis(**dict(zip(("lat", "lon"), destination(*CITY, 30, 45))), **near_here)

    assert len(found) == 100
    assert trace.rings == 1 and trace.last_count == geo._first_count(100) and trace.purged == 0, trace
    assert trace.first_radius_m == pytest.approx(previous[-1].distance_km * 1000 * geo.RING_HINT_MARGIN)
    assert all(fleet.kind[d.driver_id] == "fresh" for d in found)


# -------------------------------------------------------------------- through PostgreSQL


@pytest.mark.django_db
def test_with_stale_drivers_crowding_the_pickup_redis_and_postgis_agree():
    """Drivers in PostgreSQL, indexed by rebuild_index: stale ones nearest the point, fresh ones
    and unavailable ones around them; both implementations give the same drivers in order."""
    rng = random.Random(2026)
    now = timezone.now()
    stale_at = now - timedelta(seconds=django_settings.DRIVER_STALE_AFTER_SECONDS + 30)
    specs = [(rng.uniform(20, 600), "stale") for _ in range(250)]
    specs += [(rng.uniform(600, 6_000), rng.choice(["fresh"] * 6 + ["stale", "on_break", "busy"])) for _ in range(550)]
    specs.sort()
    keep = [s for i, s in enumerate(specs)
            if (i == 0 or s[0] - specs[i - 1][0] >= 2) and (i + 1 == len(specs) or specs[i + 1][0] - s[0] >= 2)
            and abs(s[0] - 5_000) >= 20]
    User = get_user_model()
    users = User.objects.bulk_create([User(username=f"cs-{i}") for i in range(len(keep))])
    drivers = []
    for user, (distance_m, kind) in zip(users, keep):
        lat, lon = destination(*CITY, distance_m, rng.uniform(0, 360))
        fields = {"user": user, "location": point(lat, lon), "location_recorded_at": now - timedelta(seconds=30)}
        if kind == "stale":
            fields["location_recorded_at"] = stale_at
        elif kind != "fresh":
            fields["availability"] = kind
        drivers.append(DriverFactory.build(**fields))
    Driver.objects.bulk_create(drivers)
    geo.rebuild_index()

    for limit in (1, 10, 100, 1_000):
        by_redis = geo.drivers_near_redis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=limit, now=now)
        by_postgis = geo.drivers_near_postgis(lat=CITY[0], lon=CITY[1], radius_km=5, limit=limit, now=now)
        assert [d.driver_id for d in by_redis] == [d.driver_id for d in by_postgis], limit
        for a, b in zip(by_redis, by_postgis):
            assert abs(a.distance_km - b.distance_km) * 1000 < 1, (a, b)
    assert by_redis and all(d.distance_km > 0.6 for d in by_redis)


# ------------------------------------------------------------------------------ the keys


def test_the_index_keys_are_fleet_keys_in_one_cluster_slot():
    tag = django_settings.REDIS_FLEET_TAG
    assert (geo.GEO_KEY, geo.FIX_KEY, geo.STATUS_KEY) == (
        f"{{{tag}}}:drivers:geo", f"{{{tag}}}:drivers:fix", f"{{{tag}}}:drivers:status")
    # the scripts touch several keys at once, and rebuild_index renames temporary keys onto them
    keys = [geo.GEO_KEY, geo.FIX_KEY, geo.STATUS_KEY] + [f"{k}:rebuild" for k in (geo.GEO_KEY, geo.FIX_KEY, geo.STATUS_KEY)]
    assert len({key_slot(k.encode()) for k in keys}) == 1


@pytest.mark.django_db
def test_nothing_is_written_under_the_old_key_names(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        driver = DriverFactory()
        geo.index_driver_on_commit(driver)
    geo.rebuild_index()
    geo.reconcile_index()
    assert not r().exists("drivers:geo", "drivers:fix", "drivers:status")
    assert r().zscore(geo.FIX_KEY, str(driver.pk)) is not None
