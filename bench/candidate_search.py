#!/usr/bin/env python
"""Candidate search benchmark: the "nearest available drivers" query at city scale.

Loads N drivers (default 100,000) into Redis under keys of its own — a separate, empty
database (default 1) and its own hash tag (`{bench-cs-<pid>}`), never the app's keys — with
K of them (default 5,000) within the search radius of a pickup point. Fixes: most drivers
posted within the last --fresh-age-s (30) seconds; --stale-share (10 %) have a stale fix when
the bench starts (the new search removes them from the index during the warm-up, as it would
in service), and --ageing-per-s (10) drivers a second, spread over the fleet, go stale while
it runs, so the searches meet new stale drivers at a steady rate. Then it runs M searches
(default 2,000) from points a few metres around the pickup, each round with the time of that
round as `now`, through:

  new           availability.geo.search_near_redis, the real function, as dispatch calls it
                (positions=False; the first ring from this process's hint for the area)
  new-pos       the same with positions (drivers_available_near's default)
  new-cold      availability.geo.candidate_search with no hint (first ring R/8), no positions
  prev          the rings before this change (verbatim below): no purge, first ring R/8,
                COUNT max(2 × limit, limit + 20), ZMSCORE on every row walked, positions
  today         the implementation before the rings: one sorted GEOSEARCH over the whole
                radius, COUNT 2 × limit WITHDIST WITHCOORD, then ZMSCORE (×4 more while short)
  raw-ring      raw GEOSEARCH over the last ring `new` searched for that point (or the previous
                one, when it runs first), with its COUNT c, ASC WITHDIST: the same command as
                new's last step, alone, parsed by redis-py
  raw-ring-any  the same ring, COUNT c ANY WITHDIST
  raw-sorted    raw GEOSEARCH over the whole radius, ASC COUNT limit WITHDIST
  ping          PING: the round trip alone, the floor on this machine at this moment

in a new random order every round, so a load spike hits them alike. It prints p50/p95/p99/max in ms per variant,
the ratios of new / new-pos / new-cold to raw-ring (the target: within 3×), to prev and to
today, how many rings `new` searched and how many stale members it removed, whether every
search variant gave today's drivers in today's order for every search, and the machine's
state (nproc, load, Redis version) before and after. Timings are client-side, parsing
included (redis-py's pure-Python parser here: no hiredis); as in timeit, the garbage collector
does not run inside a timed call (it runs between rounds).
It talks to 127.0.0.1 only, stops after M searches or --max-seconds, whichever comes first,
and deletes its keys afterwards (also on Ctrl-C). No PostgreSQL access.

    .venv/bin/python bench/candidate_search.py                       # 100k / 5k / limit 100
    .venv/bin/python bench/candidate_search.py --limit 20 --searches 1000

Exit status 1 when a search variant disagreed with `today` on any search, 2 when setup failed.
"""
from __future__ import annotations

import argparse
import gc
import ipaddress
import math
import os
import platform
import random
import statistics
import sys
import time
from bisect import bisect_left
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
PICKUP = (12.9716, 77.5946)  # the demo city (seed_demo)
REDIS_EARTH_RADIUS_M = 6372797.560856  # GEOSEARCH's sphere
VARIANTS = ("new", "new-pos", "new-cold", "prev", "today", "raw-ring", "raw-ring-any", "raw-sorted", "ping")
CHECKED = ("new", "new-pos", "new-cold", "prev")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/1",
                   help="loopback only; an empty database nobody else uses (the test runs here flush 7-15)")
    p.add_argument("--drivers", type=int, default=100_000, help="N drivers indexed (default 100,000)")
    p.add_argument("--inside", type=int, default=5_000, help="K of them within the radius (default 5,000)")
    p.add_argument("--radius-km", type=float, default=5.0)
    p.add_argument("--outer-km", type=float, default=40.0, help="the others lie between the radius and this")
    p.add_argument("--limit", type=int, default=100, help="drivers asked for (dispatch asks for 100)")
    p.add_argument("--stale-share", type=float, default=0.10, help="share of drivers with a stale fix at the start")
    p.add_argument("--fresh-age-s", type=float, default=30.0, help="the others' fixes are up to this old")
    p.add_argument("--ageing-per-s", type=float, default=10.0,
                   help="drivers (fleet-wide) whose fix goes stale each second of the run")
    p.add_argument("--searches", type=int, default=2_000, help="M searches per variant")
    p.add_argument("--warmup", type=int, default=50, help="untimed rounds first")
    p.add_argument("--jitter-m", type=float, default=50.0, help="search points lie this close to the pickup")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop timing after this long")
    p.add_argument("--first-ring-share", type=float, default=None,
                   help="override availability.geo.FIRST_RING_SHARE (tuning)")
    p.add_argument("--hint-margin", type=float, default=None,
                   help="override availability.geo.RING_HINT_MARGIN (tuning)")
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
    the same order, distances within 0.1 m (km to 4 places against metres to 4), same positions
    (when `found` has them)."""
    for k in range(max(len(found), len(expected))):
        x = found[k] if k < len(found) else None
        y = expected[k] if k < len(expected) else None
        if x is None or y is None or x.driver_id != y.driver_id or abs(x.distance_km - y.distance_km) > 0.0001 \
                or (x.lat is not None and (x.lat, x.lon) != (y.lat, y.lon)):
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




# availability.geo's search before this change, verbatim: rings from R/8 with COUNT
# max(2 × limit, limit + 20), the fix time of every row walked, positions by GEOPOS.
PREV_SCRIPT = """
local lon, lat = ARGV[1], ARGV[2]
local R, limit, cutoff = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local r, c = tonumber(ARGV[6]), tonumber(ARGV[7])
local rings = 0
while true do
  rings = rings + 1
  -- R goes to Redis as it came (a Lua number would be printed again, maybe rounded). Past 24
  -- searches (it never takes that many) the whole radius, unbounded, settles it.
  local last, rows = r >= R or rings > 24
  if rings > 24 then
    rows = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', lon, lat, 'BYRADIUS', ARGV[3], 'm', 'ASC', 'WITHDIST')
    c = #rows + 1
  else
    rows = redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', lon, lat, 'BYRADIUS', last and ARGV[3] or r, 'm',
                      'ASC', 'COUNT', c, 'WITHDIST')
  end
  local n = #rows
  -- the fresh ones, nearest first, until `limit`: fix times for about as many rows as should
  -- still be needed at the fresh share seen so far (at most 1,000 a call: unpack() is bounded)
  local members, dists, f, i = {}, {}, 0, 1
  while i <= n and f < limit do
    local j = math.min(n, i + math.min(999, math.ceil((limit - f) * (i + 7) / (f + 8) * 1.125) + 7))
    local batch = {}
    for k = i, j do batch[k - i + 1] = rows[k][1] end
    local scores = redis.call('ZMSCORE', KEYS[2], unpack(batch))
    for k = i, j do
      local score = scores[k - i + 1]
      if score and tonumber(score) >= cutoff then
        f = f + 1
        members[f] = rows[k][1]
        dists[f] = rows[k][2]
        if f == limit then break end
      end
    end
    i = j + 1
  end
  if f >= limit or (last and n < c) then
    local out = {}
    for i = 1, f, 1000 do
      local j = math.min(f, i + 999)
      local pos = redis.call('GEOPOS', KEYS[1], unpack(members, i, j))
      for k = i, j do
        local p = pos[k - i + 1]
        out[#out + 1] = members[k] .. '\\n' .. dists[k] .. '\\n' .. p[1] .. '\\n' .. p[2]
      end
    end
    return {table.concat(out, '\\n'), rings, tostring(last and R or r), c}
  end
  if n >= c then
    -- the c nearest within the ring are mostly stale: the same ring, ×4 as many
    c = c * 4
  else
    -- the ring holds n members, f of them fresh: grow it to hold 1.25 × limit (+4) fresh
    local grow = 4
    if f > 0 then grow = math.sqrt((1.25 * limit + 4) / f) end
    if grow < 1.25 then grow = 1.25 elseif grow > 4 then grow = 4 end
    local want = math.ceil(1.5 * limit * (n + 2) / (f + 1)) + 16
    if c < want then c = want end
    r = r * grow
  end
end
"""


def prev_search(script, geo_key, fix_key, *, lat, lon, radius_km, limit, cutoff, NearbyDriver):
    R = radius_km * 1000.0
    payload, *_ = script(keys=[geo_key, fix_key], args=[repr(float(lon)), repr(float(lat)), repr(R), int(limit),
                                                        repr(float(cutoff)), repr(R * 0.125), max(2 * limit, limit + 20)])
    parts = payload.split("\n") if payload else []
    return [NearbyDriver(parts[i], float(parts[i + 1]) / 1000.0, float(parts[i + 3]), float(parts[i + 2]))
            for i in range(0, len(parts), 4)]


# ----------------------------------------------------------------------------------- main


def load(client, geo_key, fix_key, args, rng, now_ts, stale_after):
    """Returns counts, and the fix times of the drivers within the radius (to know, at each
    round, how many of them are fresh)."""
    R = args.radius_km * 1000.0
    inner = R - args.jitter_m - 1.0          # K drivers within R of every search point
    outer_min = R + args.jitter_m + 1.0      # and the others outside R of every one
    outer = args.outer_km * 1000.0
    span = args.max_seconds + 120.0          # ageing drivers go stale over the run (and its set-up)
    ageing_share = min(1.0 - args.stale_share, args.ageing_per_s * span / args.drivers)
    pipe = client.pipeline(transaction=False)
    batch, fixes, inside_fixes = [], {}, []
    stats = {"inside": 0, "stale": 0, "ageing": 0}
    for i in range(args.drivers):
        inside = i < args.inside
        if inside:
            d = inner * math.sqrt(rng.random())
        else:
            d = math.sqrt(rng.uniform(outer_min ** 2, outer ** 2))
        lat, lon = destination(*PICKUP, d, rng.uniform(0, 360))
        member = f"{rng.getrandbits(128):032x}"
        member = f"{member[:8]}-{member[8:12]}-{member[12:16]}-{member[16:20]}-{member[20:]}"
        x = rng.random()
        if x < args.stale_share:
            fixed = now_ts - rng.uniform(stale_after + 1, 3 * stale_after)
            stats["stale"] += 1
        elif x < args.stale_share + ageing_share:
            fixed = now_ts - stale_after + rng.uniform(0, span)
            stats["ageing"] += 1
        else:
            fixed = now_ts - rng.uniform(0, args.fresh_age_s)
        fixes[member] = fixed
        batch.extend((lon, lat, member))
        stats["inside"] += inside
        if inside:
            inside_fixes.append(fixed)
        if len(batch) >= 30_000:
            pipe.geoadd(geo_key, batch)
            pipe.zadd(fix_key, fixes)
            pipe.execute()
            batch, fixes = [], {}
    if batch:
        pipe.geoadd(geo_key, batch)
        pipe.zadd(fix_key, fixes)
        pipe.execute()
    return stats, sorted(inside_fixes)


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
    if args.hint_margin is not None:
        geo.RING_HINT_MARGIN = args.hint_margin
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
        stale_after = settings.DRIVER_STALE_AFTER_SECONDS
        t0 = time.perf_counter()
        stats, inside_fixes = load(client, geo.GEO_KEY, geo.FIX_KEY, args, rng, time.time(), stale_after)
        if client.zcard(geo.GEO_KEY) != args.drivers:
            print("setup failed: the GEO set does not hold every driver", file=sys.stderr)
            return 2
        print(f"loaded {args.drivers:,} drivers in {time.perf_counter() - t0:.1f} s into db "
              f"{urlsplit(args.redis_url).path.strip('/') or 0} under {{{tag}}}: {stats['inside']:,} within "
              f"{args.radius_km:g} km of every search point; {stats['stale']:,} stale at the start, "
              f"{stats['ageing']:,} going stale during the run (~{args.ageing_per_s:g}/s), the others' fixes "
              f"< {args.fresh_age_s:g} s old; limit {args.limit}, first ring without a hint "
              f"{geo.FIRST_RING_SHARE:g} × radius, hint margin ×{geo.RING_HINT_MARGIN:g}")

        points = [destination(*PICKUP, args.jitter_m * math.sqrt(rng.random()), rng.uniform(0, 360))
                  for _ in range(args.searches + args.warmup)]
        kw = {"radius_km": args.radius_km, "limit": args.limit}
        prev_script = client.register_script(PREV_SCRIPT)
        R = args.radius_km * 1000.0
        ring = {}  # the last ring `new` searched, per round (for raw-ring): set by `new` itself

        purged = [0]  # stale members removed by any of the new variants

        def new(lat, lon, now, cutoff, positions=False):
            found, trace = geo.search_near_redis(lat=lat, lon=lon, now=now, positions=positions, **kw)
            if not positions:
                ring["trace"] = trace
            purged[0] += trace.purged
            return found

        def new_cold(lat, lon, now, cutoff):
            found, trace = geo.candidate_search(client, geo_key=geo.GEO_KEY, fix_key=geo.FIX_KEY, lat=lat, lon=lon,
                                                cutoff=cutoff, positions=False, **kw)
            purged[0] += trace.purged
            return found

        def raw(lat, lon, radius_m, count, **more):
            return client.geosearch(geo.GEO_KEY, longitude=lon, latitude=lat, radius=radius_m, unit="m", count=count,
                                    withdist=True, **more)

        def raw_ring(lat, lon, **more):
            t = ring.get("trace") or last_trace[0]
            return raw(lat, lon, t.last_radius_m, t.last_count, **more)

        funcs = {
            "new": new,
            "new-pos": lambda lat, lon, now, cutoff: new(lat, lon, now, cutoff, positions=True),
            "new-cold": new_cold,
            "prev": lambda lat, lon, now, cutoff: prev_search(prev_script, *keys, lat=lat, lon=lon, cutoff=cutoff,
                                                              NearbyDriver=geo.NearbyDriver, **kw),
            "today": lambda lat, lon, now, cutoff: today_search(client, *keys, lat=lat, lon=lon, cutoff=cutoff,
                                                                NearbyDriver=geo.NearbyDriver, **kw),
            "raw-ring": lambda lat, lon, now, cutoff: raw_ring(lat, lon, sort="ASC"),
            "raw-ring-any": lambda lat, lon, now, cutoff: raw_ring(lat, lon, any=True),
            "raw-sorted": lambda lat, lon, now, cutoff: raw(lat, lon, R, args.limit, sort="ASC"),
            "ping": lambda lat, lon, now, cutoff: client.ping(),
        }
        # A new random order every round: the first call of a round follows the harness's own
        # work and pays for it more often, and a call after a heavy one (today) finds the
        # caches cold; a load spike hits all alike. The raw-ring baselines search the ring
        # `new` searched for this point, or, when they run before it, for the previous point
        # (< 100 m away; the ring differs by a few metres).
        shuffler = random.Random(args.seed + 1)
        checked = [v for v in CHECKED if v in variants]
        timings = {v: [] for v in variants}
        mismatches = {v: 0 for v in checked}
        short = {v: 0 for v in checked}
        rings_hist, radii, counts = {}, [], []
        purged_warmup = 0
        last_trace = [geo.SearchTrace(1, R * geo.FIRST_RING_SHARE, geo._first_count(args.limit))]
        compared = 0
        # As timeit does: no garbage collection inside a timed call (a full collection of this
        # Django process takes milliseconds, and whichever variant it lands in pays for all of
        # them); the garbage is collected between rounds instead, untimed.
        gc.collect()
        gc.disable()
        started = time.perf_counter()
        for i, (lat, lon) in enumerate(points):
            if time.perf_counter() - started > args.max_seconds:
                print(f"stopped after {args.max_seconds:g} s: {max(0, i - args.warmup)} searches per variant")
                break
            if i % 100 == 0:
                gc.collect()
            now = datetime.now(UTC)  # one `now` per round: every variant answers the same question
            cutoff = (now - timedelta(seconds=stale_after)).timestamp()
            ring.clear()
            results = {}
            order = shuffler.sample(variants, len(variants))
            for v in order:
                t = time.perf_counter_ns()
                results[v] = funcs[v](lat, lon, now, cutoff)
                elapsed = (time.perf_counter_ns() - t) / 1e6
                if i >= args.warmup:
                    timings[v].append(elapsed)
            trace = ring.get("trace")
            if trace is not None:
                last_trace[0] = trace
                if i >= args.warmup:
                    rings_hist[trace.rings] = rings_hist.get(trace.rings, 0) + 1
                    radii.append(trace.last_radius_m)
                    counts.append(trace.last_count)
            if i + 1 == args.warmup:
                purged_warmup = purged[0]
            compared += "today" in results
            fresh_inside = len(inside_fixes) - bisect_left(inside_fixes, cutoff)
            for v in checked:
                if len(results[v]) != min(args.limit, fresh_inside):
                    short[v] += 1
                if "today" in results:
                    bad = first_difference(results[v], results["today"])
                    if bad is not None:
                        mismatches[v] += 1
                        if mismatches[v] == 1:
                            print(f"first mismatch of {v}, at ({lat!r}, {lon!r}), position {bad[0]}: "
                                  f"{v} {bad[1]} / today {bad[2]}")
        gc.enable()
        print(f"machine after:  {machine_state(client)}")
        print(f"in the index at the end: {client.zcard(geo.GEO_KEY):,} (stale members removed by the searches: "
              f"{purged_warmup:,} during the warm-up, {purged[0] - purged_warmup:,} during the timed rounds)")

        print(f"\n{'variant':<14} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
        summary = {}
        for v in variants:
            xs = sorted(timings[v])
            if not xs:
                continue
            summary[v] = {"p50": pct(xs, .50), "p95": pct(xs, .95), "p99": pct(xs, .99)}
            print(f"{v:<14} {len(xs):>5} {pct(xs, .50):>8.3f} {pct(xs, .95):>8.3f} {pct(xs, .99):>8.3f} "
                  f"{xs[-1]:>8.3f} {statistics.fmean(xs):>8.3f}")
        print()
        for ours in ("new", "new-pos", "new-cold"):
            for base in ("raw-ring", "raw-ring-any", "raw-sorted", "prev", "today"):
                if ours in summary and base in summary:
                    print(f"{ours:<8} / {base:<13} p50 ×{summary[ours]['p50'] / summary[base]['p50']:.2f}, "
                          f"p99 ×{summary[ours]['p99'] / summary[base]['p99']:.2f}")
        if rings_hist:
            radii.sort()
            print(f"new: rings per search {dict(sorted(rings_hist.items()))}; last ring median "
                  f"{statistics.median(radii):.0f} m, max {radii[-1]:.0f} m; its COUNT median "
                  f"{statistics.median(counts):.0f}")
        for v in checked:
            if compared:
                print(f"{v} vs today: {compared - mismatches[v]} of {compared} searches gave the same drivers in the "
                      f"same order (distances within 0.1 m, same positions where returned)")
            if short[v]:
                print(f"WARNING: {short[v]} searches by {v} returned fewer than min(limit, fresh inside) drivers")
        return 1 if any(mismatches.values()) or any(short.values()) else 0
    finally:
        if created:
            client.delete(*keys)
            left = client.exists(*keys)
            print(f"cleaned up: bench keys {'NOT ' if left else ''}deleted")


if __name__ == "__main__":
    sys.exit(main())
