#!/usr/bin/env python
"""Candidate search benchmark: the "nearest available drivers" query at city scale.

Loads N drivers (default 100,000) into Redis under keys of its own — a separate, empty
database (default 1) and its own hash tag (`{bench-cs-<pid>}`), never the app's keys — with
K of them (default 5,000) within the search radius of a pickup point and a share of stale
fixes spread over all of them. Then it runs M searches (default 2,000) from points a few metres around the
pickup, each through:

  new           availability.geo.drivers_near_redis, the real function: sorted rings in one
                Lua script (see availability/geo.py)
  today         the implementation it replaced: one sorted GEOSEARCH over the whole radius,
                COUNT 2 × limit WITHDIST WITHCOORD, then ZMSCORE (×4 more while short)
  rings-py      new's rings driven from Python, a round trip per ring (alternative 1)
  any-lua       rings searched COUNT c ANY, complete when short, sorted in Lua (alternative 2)
  raw-sorted    raw GEOSEARCH over the whole radius, ASC COUNT limit WITHDIST WITHCOORD
  raw-ring      raw GEOSEARCH over the last ring new searched for that point, with its COUNT c,
                ASC WITHDIST: the same command as new's last step, alone
  raw-ring-any  the same ring, COUNT c ANY WITHDIST
  raw-any-limit raw GEOSEARCH over the whole radius, COUNT limit ANY WITHDIST WITHCOORD (fast,
                but *not* the nearest: the issue's reference figure)
  ping          PING: the round trip alone, the floor on this machine at this moment

round robin, so a load spike hits them alike. It prints p50/p95/p99/max in ms per variant,
the ratios of `new` to the raw searches and to `today`, how many searches `new` made, whether
new, rings-py and any-lua gave today's drivers in today's order for every search, and the
machine's state (nproc, load, Redis version). Timings are client-side, parsing included
(redis-py's pure-Python parser here: no hiredis).
It talks to 127.0.0.1 only, stops after M searches or --max-seconds, whichever comes first,
and deletes its keys afterwards (also on Ctrl-C). No PostgreSQL access.

    .venv/bin/python bench/candidate_search.py                       # 100k / 5k / limit 100
    .venv/bin/python bench/candidate_search.py --limit 20 --searches 1000

Exit status 1 when `new` disagreed with `today` on any search, 2 when setup failed.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
PICKUP = (12.9716, 77.5946)  # the demo city (seed_demo)
REDIS_EARTH_RADIUS_M = 6372797.560856  # GEOSEARCH's sphere
VARIANTS = ("new", "today", "rings-py", "any-lua", "raw-sorted", "raw-ring", "raw-ring-any", "raw-any-limit", "ping")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/1",
                   help="loopback only; an empty database nobody else uses (the test runs here flush 7-15)")
    p.add_argument("--drivers", type=int, default=100_000, help="N drivers indexed (default 100,000)")
    p.add_argument("--inside", type=int, default=5_000, help="K of them within the radius (default 5,000)")
    p.add_argument("--radius-km", type=float, default=5.0)
    p.add_argument("--outer-km", type=float, default=40.0, help="the others lie between the radius and this")
    p.add_argument("--limit", type=int, default=100, help="drivers asked for (dispatch asks for 100)")
    p.add_argument("--stale-share", type=float, default=0.10, help="share of drivers with a stale fix")
    p.add_argument("--searches", type=int, default=2_000, help="M searches per variant")
    p.add_argument("--warmup", type=int, default=50, help="untimed rounds first")
    p.add_argument("--jitter-m", type=float, default=50.0, help="search points lie this close to the pickup")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop timing after this long")
    p.add_argument("--first-ring-share", type=float, default=None,
                   help="override availability.geo.FIRST_RING_SHARE (tuning)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset of: %(default)s")
    p.add_argument("--seed", type=int, default=20261125)
    args = p.parse_args(argv)
    if not 0 < args.inside <= args.drivers:
        p.error("need 0 < --inside <= --drivers")
    if not 0 <= args.stale_share < 1:
        p.error("--stale-share must be in [0, 1)")
    if args.outer_km * 1000 <= args.radius_km * 1000 + 2 * args.jitter_m + 2:
        p.error("--outer-km must exceed the radius")
    return args


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"refusing {url!r}: only a loopback address (127.0.0.1) may be benchmarked")


def destination(lat, lon, distance_m, bearing_deg):
    d, b = distance_m / REDIS_EARTH_RADIUS_M, math.radians(bearing_deg)
    p1, l1 = math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), math.degrees(l2)


def machine_state(client) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info = client.info("server")
    return (f"nproc {os.cpu_count()}, loadavg {load}, redis-server {info.get('redis_version')}, "
            f"python {platform.python_version()}")


def first_difference(found, expected):
    """(position, found, expected) where two answers first differ, or None: the same drivers in
    the same order, distances within 0.1 m (km to 4 places against metres to 4), same positions."""
    for k in range(max(len(found), len(expected))):
        x = found[k] if k < len(found) else None
        y = expected[k] if k < len(expected) else None
        if x is None or y is None or x.driver_id != y.driver_id or abs(x.distance_km - y.distance_km) > 0.0001 \
                or (x.lat, x.lon) != (y.lat, y.lon):
            return k, x, y
    return None


def pct(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))]


# ----------------------------------------------------------------- the variants besides `new`


def today_search(client, geo_key, fix_key, *, lat, lon, radius_km, limit, cutoff, NearbyDriver):
    """availability.geo.drivers_near_redis before the rings (verbatim but for the keys)."""
    count = max(limit * 2, limit + 20)
    while True:
        rows = client.geosearch(
            geo_key, longitude=lon, latitude=lat, radius=radius_km, unit="km", sort="ASC",
            count=count, withdist=True, withcoord=True,
        )
        if not rows:
            return []
        fix_times = client.zmscore(fix_key, [row[0] for row in rows])
        out = []
        for (member, dist, (m_lon, m_lat)), fixed_at in zip(rows, fix_times):
            if fixed_at is None or fixed_at < cutoff:
                continue
            out.append(NearbyDriver(member, float(dist), float(m_lat), float(m_lon)))
            if len(out) == limit:
                return out
        if len(rows) < count:
            return out
        count *= 4


def rings_python(client, geo_key, fix_key, *, lat, lon, radius_km, limit, cutoff, geo):
    """`new`'s rings driven from Python: a GEOSEARCH and a ZMSCORE round trip per ring, then
    GEOPOS for the answer. Same rules as the script."""
    R = radius_km * 1000.0
    r, c = R * geo.FIRST_RING_SHARE, geo._first_count(limit)
    while True:
        last = r >= R
        rows = client.geosearch(geo_key, longitude=lon, latitude=lat, radius=R if last else r, unit="m",
                                sort="ASC", count=c, withdist=True)
        scores = client.zmscore(fix_key, [m for m, _ in rows]) if rows else []
        fresh = [(m, d) for (m, d), s in zip(rows, scores) if s is not None and s >= cutoff][:limit]
        if len(fresh) >= limit or (last and len(rows) < c):
            pos = client.geopos(geo_key, *[m for m, _ in fresh]) if fresh else []
            return [geo.NearbyDriver(m, d / 1000.0, p[1], p[0]) for (m, d), p in zip(fresh, pos)]
        if len(rows) >= c:
            c *= 4
        else:
            f = len(fresh)
            grow = 4.0 if not f else min(4.0, max(1.25, math.sqrt((1.25 * limit + 4) / f)))
            c = max(c, math.ceil(1.5 * limit * (len(rows) + 2) / (f + 1)) + 16)
            r *= grow


# The alternative the issue suggested: rings searched `COUNT c ANY` (unsorted, Redis stops after
# c), complete when fewer than c come back; the script then sorts the fresh ones itself, by the
# distance GEOSEARCH prints (0.1 mm steps, so two drivers within 0.1 mm of each other may come
# out in the other order than Redis's exact sort). A truncated ring shrinks, or is bisected
# against the last complete one with a larger c; after 12 rings, today's sorted search.
ANY_RINGS_SCRIPT = """
local lon, lat = ARGV[1], ARGV[2]
local R, limit, cutoff = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local r, c = tonumber(ARGV[6]), tonumber(ARGV[7])
local function fresh_of(rows)
  local out, n, i = {}, #rows, 1
  while i <= n do
    local j = math.min(i + 999, n)
    local members = {}
    for k = i, j do members[#members + 1] = rows[k][1] end
    local scores = redis.call('ZMSCORE', KEYS[2], unpack(members))
    for k = i, j do
      local s = scores[k - i + 1]
      if s and tonumber(s) >= cutoff then out[#out + 1] = {rows[k][1], tonumber(rows[k][2]), rows[k][2]} end
    end
    i = j + 1
  end
  return out
end
local function answer(fresh)
  table.sort(fresh, function(a, b) if a[2] ~= b[2] then return a[2] < b[2] end return a[1] < b[1] end)
  local out, members = {}, {}
  local n = math.min(limit, #fresh)
  for k = 1, n do members[k] = fresh[k][1] end
  if n > 0 then
    local pos = redis.call('GEOPOS', KEYS[1], unpack(members))
    for k = 1, n do
      out[#out + 1] = fresh[k][1]; out[#out + 1] = fresh[k][3]; out[#out + 1] = pos[k][1]; out[#out + 1] = pos[k][2]
    end
  end
  return table.concat(out, '\\n')
end
local lo, hi = nil, nil
for rings = 1, 12 do
  if r >= R then r = R end
  local rows = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', lon, lat, 'BYRADIUS', r >= R and ARGV[3] or r, 'm',
                          'COUNT', c, 'ANY', 'WITHDIST')
  local n = #rows
  if n < c then
    local fresh = fresh_of(rows)
    local f = #fresh
    if f >= limit or r >= R then return answer(fresh) end
    lo = r
    local grow = 4
    if f > 0 then grow = math.sqrt((1.25 * limit + 4) / f) end
    if grow < 1.25 then grow = 1.25 elseif grow > 4 then grow = 4 end
    local expect = (n + 1) * grow * grow
    if c < 2 * expect + 32 then c = math.ceil(2 * expect + 32) end
    r = r * grow
    if hi and r >= hi then r = (lo + hi) / 2; c = c * 2 end
  else
    hi = r
    if lo then r = (lo + hi) / 2; c = c * 2 else r = r / 2 end
  end
end
c = 4 * limit
while true do
  local rows = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', lon, lat, 'BYRADIUS', ARGV[3], 'm',
                          'ASC', 'COUNT', c, 'WITHDIST')
  local fresh = fresh_of(rows)
  if #fresh >= limit or #rows < c then return answer(fresh) end
  c = c * 4
end
"""


def rings_any_lua(script, geo_key, fix_key, *, lat, lon, radius_km, limit, cutoff, geo):
    R = radius_km * 1000.0
    payload = script(keys=[geo_key, fix_key], args=[repr(lon), repr(lat), repr(R), limit, repr(cutoff),
                                                     repr(R * geo.FIRST_RING_SHARE), max(4 * limit, 256)])
    parts = payload.split("\n") if payload else []
    return [geo.NearbyDriver(parts[i], float(parts[i + 1]) / 1000.0, float(parts[i + 3]), float(parts[i + 2]))
            for i in range(0, len(parts), 4)]


# ----------------------------------------------------------------------------------- main


def load(client, geo_key, fix_key, args, rng, now_ts, stale_after):
    R = args.radius_km * 1000.0
    inner = R - args.jitter_m - 1.0          # K drivers within R of every search point
    outer_min = R + args.jitter_m + 1.0      # and the others outside R of every one
    outer = args.outer_km * 1000.0
    pipe = client.pipeline(transaction=False)
    batch, fixes = [], {}
    stats = {"inside": 0, "inside_fresh": 0, "stale": 0}
    for i in range(args.drivers):
        inside = i < args.inside
        if inside:
            d = inner * math.sqrt(rng.random())
        else:
            d = math.sqrt(rng.uniform(outer_min ** 2, outer ** 2))
        lat, lon = destination(*PICKUP, d, rng.uniform(0, 360))
        member = f"{rng.getrandbits(128):032x}"
        member = f"{member[:8]}-{member[8:12]}-{member[12:16]}-{member[16:20]}-{member[20:]}"
        stale = rng.random() < args.stale_share
        fixes[member] = now_ts - (rng.uniform(stale_after + 1, 3 * stale_after) if stale else rng.uniform(0, stale_after - 60))
        batch.extend((lon, lat, member))
        stats["inside"] += inside
        stats["inside_fresh"] += inside and not stale
        stats["stale"] += stale
        if len(batch) >= 30_000:
            pipe.geoadd(geo_key, batch)
            pipe.zadd(fix_key, fixes)
            pipe.execute()
            batch, fixes = [], {}
    if batch:
        pipe.geoadd(geo_key, batch)
        pipe.zadd(fix_key, fixes)
        pipe.execute()
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    require_loopback(args.redis_url)
    # Point the app's Redis client at the bench database and give the fleet keys a tag of our
    # own *before* Django reads its settings: availability.geo computes its keys at import.
    tag = f"bench-cs-{os.getpid()}"
    os.environ["REDIS_URL"] = args.redis_url
    os.environ["REDIS_FLEET_TAG"] = tag
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.conf import settings

    from availability import geo
    from common.redis import get_redis

    assert settings.REDIS_URL == args.redis_url and geo.GEO_KEY.startswith("{" + tag + "}"), geo.GEO_KEY
    if args.first_ring_share is not None:
        geo.FIRST_RING_SHARE = args.first_ring_share
    client = get_redis()
    keys = [geo.GEO_KEY, geo.FIX_KEY]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        print(f"unknown variants: {sorted(set(variants) - set(VARIANTS))}", file=sys.stderr)
        return 2
    created = False
    try:
        if client.dbsize():
            # someone else's (a test run flushes its database before every test): not ours to
            # share, and our keys would vanish mid-run
            print(f"{args.redis_url} is not empty; pick an unused database with --redis-url", file=sys.stderr)
            return 2
        created = True
        print(f"machine before: {machine_state(client)}")
        rng = random.Random(args.seed)
        now = datetime.now(UTC)
        stale_after = settings.DRIVER_STALE_AFTER_SECONDS
        cutoff = (now - timedelta(seconds=stale_after)).timestamp()
        t0 = time.perf_counter()
        stats = load(client, geo.GEO_KEY, geo.FIX_KEY, args, rng, now.timestamp(), stale_after)
        if client.zcard(geo.GEO_KEY) != args.drivers:
            print("setup failed: the GEO set does not hold every driver", file=sys.stderr)
            return 2
        print(f"loaded {args.drivers:,} drivers in {time.perf_counter() - t0:.1f} s into db "
              f"{urlsplit(args.redis_url).path.strip('/') or 0} under {{{tag}}}: {stats['inside']:,} within "
              f"{args.radius_km:g} km of every search point ({stats['inside_fresh']:,} fresh), "
              f"{stats['stale']:,} stale overall; limit {args.limit}, first ring {geo.FIRST_RING_SHARE:g} × radius")

        points = [destination(*PICKUP, args.jitter_m * math.sqrt(rng.random()), rng.uniform(0, 360))
                  for _ in range(args.searches + args.warmup)]
        kw = {"radius_km": args.radius_km, "limit": args.limit}
        any_script = client.register_script(ANY_RINGS_SCRIPT)
        traces = {}
        for lat, lon in points:  # how `new` searches each point (untimed), for the raw-ring baselines
            traces[(lat, lon)] = geo.candidate_search(
                client, geo_key=geo.GEO_KEY, fix_key=geo.FIX_KEY, lat=lat, lon=lon, cutoff=cutoff, **kw)[1]

        def raw(lat, lon, radius_m, count, **more):
            return client.geosearch(geo.GEO_KEY, longitude=lon, latitude=lat, radius=radius_m, unit="m", count=count,
                                    withdist=True, **more)

        R = args.radius_km * 1000.0
        funcs = {
            "new": lambda lat, lon: geo.drivers_near_redis(lat=lat, lon=lon, now=now, **kw),
            "today": lambda lat, lon: today_search(client, *keys, lat=lat, lon=lon, cutoff=cutoff,
                                                   NearbyDriver=geo.NearbyDriver, **kw),
            "rings-py": lambda lat, lon: rings_python(client, *keys, lat=lat, lon=lon, cutoff=cutoff, geo=geo, **kw),
            "any-lua": lambda lat, lon: rings_any_lua(any_script, *keys, lat=lat, lon=lon, cutoff=cutoff, geo=geo, **kw),
            "raw-sorted": lambda lat, lon: raw(lat, lon, R, args.limit, sort="ASC", withcoord=True),
            "raw-ring": lambda lat, lon: raw(lat, lon, traces[(lat, lon)].last_radius_m, traces[(lat, lon)].last_count,
                                             sort="ASC"),
            "raw-ring-any": lambda lat, lon: raw(lat, lon, traces[(lat, lon)].last_radius_m,
                                                 traces[(lat, lon)].last_count, any=True),
            "raw-any-limit": lambda lat, lon: raw(lat, lon, R, args.limit, any=True, withcoord=True),
            "ping": lambda lat, lon: client.ping(),
        }
        checked = [v for v in ("new", "rings-py", "any-lua") if v in variants]
        timings = {v: [] for v in variants}
        mismatches = {v: 0 for v in checked}
        short = {v: 0 for v in checked}
        compared = 0
        started = time.perf_counter()
        for i, (lat, lon) in enumerate(points):
            if time.perf_counter() - started > args.max_seconds:
                print(f"stopped after {args.max_seconds:g} s: {max(0, i - args.warmup)} searches per variant")
                break
            results = {}
            order = variants[i % len(variants):] + variants[:i % len(variants)]
            for v in order:
                t = time.perf_counter_ns()
                results[v] = funcs[v](lat, lon)
                elapsed = (time.perf_counter_ns() - t) / 1e6
                if i >= args.warmup:
                    timings[v].append(elapsed)
            compared += "today" in results
            for v in checked:
                if len(results[v]) != min(args.limit, stats["inside_fresh"]):
                    short[v] += 1
                if "today" in results:
                    bad = first_difference(results[v], results["today"])
                    if bad is not None:
                        mismatches[v] += 1
                        if mismatches[v] == 1:
                            print(f"first mismatch of {v}, at ({lat!r}, {lon!r}), position {bad[0]}: "
                                  f"{v} {bad[1]} / today {bad[2]}")
        print(f"machine after:  {machine_state(client)}")
        if client.zcard(geo.GEO_KEY) != args.drivers:
            print("WARNING: the bench keys changed during the run (someone flushed the database?)")

        print(f"\n{'variant':<14} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
        summary = {}
        for v in variants:
            xs = sorted(timings[v])
            if not xs:
                continue
            summary[v] = {"p50": pct(xs, .50), "p95": pct(xs, .95), "p99": pct(xs, .99)}
            print(f"{v:<14} {len(xs):>5} {pct(xs, .50):>8.3f} {pct(xs, .95):>8.3f} {pct(xs, .99):>8.3f} "
                  f"{xs[-1]:>8.3f} {statistics.fmean(xs):>8.3f}")
        if "new" in summary:
            for base in ("raw-sorted", "raw-ring", "raw-ring-any", "today"):
                if base in summary:
                    print(f"new / {base:<13} p50 ×{summary['new']['p50'] / summary[base]['p50']:.2f}, "
                          f"p99 ×{summary['new']['p99'] / summary[base]['p99']:.2f}")
        rings = [t.rings for t in traces.values()]
        radii = sorted(t.last_radius_m for t in traces.values())
        hist = {n: rings.count(n) for n in sorted(set(rings))}
        print(f"new: searches per query {hist}; last ring median {statistics.median(radii):.0f} m, "
              f"max {radii[-1]:.0f} m; its COUNT median {statistics.median(t.last_count for t in traces.values()):.0f}")
        for v in checked:
            if compared:
                print(f"{v} vs today: {compared - mismatches[v]} of {compared} searches gave the same drivers in the "
                      f"same order (distances within 0.1 m, same positions)")
            if short[v]:
                print(f"WARNING: {short[v]} searches by {v} returned fewer than min(limit, fresh inside) drivers")
        return 1 if mismatches.get("new") or short.get("new") else 0
    finally:
        if created:
            client.delete(*keys)
            left = client.exists(*keys)
            print(f"cleaned up: bench keys {'NOT ' if left else ''}deleted")


if __name__ == "__main__":
    sys.exit(main())
