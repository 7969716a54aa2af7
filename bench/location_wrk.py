#!/usr/bin/env python
"""Location fast lane under wrk: N drivers posting fixes as fast as the server answers, the same
server's GET /health/ as a yardstick, and how far PostgreSQL is behind Redis.

By default it starts its own server on a free loopback port (`uvicorn config.asgi:application
--workers 2 --no-access-log --lifespan off` and one `manage.py consume_fixes`) and stops it at
the end; `--base URL` uses a server that is already up instead (then a `consume_fixes` must be
running too, or pass `--start-consumer`). Drivers are made in-process through the services
(driver_create, a first fix, resume) in the dev database (DATABASE_URL), far from the demo city,
and deleted afterwards (`--cleanup end-shift` keeps them, shift ended). wrk is installed with
apt-get when missing; bench/location.lua rotates drivers and gives each fix a strictly newer
recordedAt, so every fix should be accepted.

Order: machine state → drivers → GET /health/ (wrk, `--health-seconds`) → warm-up (fills the
fast lane's token cache) → wait for the stream to drain → the measured run (`--seconds`), the
stream and a sample of drivers read every `--sample-every` s (Redis's newest recordedAt vs
PostgreSQL's) → time until the consumer group has nothing pending or unread → every driver's
fix in PostgreSQL checked against Redis → machine state again. CPU per process over the run
comes from /proc.

    .venv/bin/python bench/location_wrk.py                          # 2,000 drivers, 20 s, -t2 -c32
    .venv/bin/python bench/location_wrk.py --connections 64 --seconds 30
    .venv/bin/python bench/location_wrk.py --base http://127.0.0.1:8000 --drivers 500

Exit 1 when there were errors (non-2xx, socket errors, fixes not accepted, PostgreSQL not
matching Redis), 2 when setup failed. Loopback targets only; every step is bounded in time.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import ROOT, CpuMeter, Server, format_cpu, health_baseline, machine_state, refuse_non_loopback, run_wrk  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

TARGET_RATE, TARGET_P99_MS, TARGET_PG_LAG_S = 2500, 50.0, 1.0


def django_setup():
    import django

    django.setup()


# ---------------------------------------------------------------------------- drivers


def make_drivers(n: int, centre: tuple[float, float], rng: random.Random, run_id: str,
                 parallel: int = 6) -> list[tuple[str, str, float, float]]:
    """N drivers through the services: created, a first fix (PostgreSQL and Redis), resumed.
    `parallel` threads (each its own connection): the time is mostly commits and Redis."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection
    from django.utils import timezone

    from availability.services import driver_create
    from common.actors import Actor
    from workflows.drivers import availability_resume, driver_location_record

    spots = [(centre[0] + rng.uniform(-0.05, 0.05), centre[1] + rng.uniform(-0.05, 0.05)) for _ in range(n)]

    def one(i: int) -> tuple[str, str, float, float]:
        lat, lon = spots[i]
        driver, token = driver_create(name=f"Wrk Bench {run_id} {i}", phone=f"+1 555 {i:07d}", vehicle="Bench scooter",
                                      vehicle_type="scooter")
        # a little in the past, so the first wrk fix (wall clock) is newer whatever the clocks
        driver_location_record(driver_id=driver.pk, lat=lat, lon=lon, recorded_at=timezone.now() - timedelta(seconds=5),
                               accuracy_m=10)
        availability_resume(driver_id=driver.pk, actor=Actor("driver", driver.pk))
        return str(driver.pk), token, lat, lon

    def chunk(indices: range) -> list:
        try:
            return [one(i) for i in indices]
        finally:
            connection.close()

    size = math.ceil(n / parallel)
    with ThreadPoolExecutor(parallel) as pool:
        parts = list(pool.map(chunk, [range(k, min(n, k + size)) for k in range(0, n, size)]))
    return [d for part in parts for d in part]


def cleanup_drivers(ids: list[str], mode: str) -> str:
    """`delete`: the drivers, their logins, tokens and history, and their Redis entries;
    `end-shift`: through the workflow (they stay, shift ended)."""
    import redis
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from common.models import ApiToken

    from availability import geo, live
    from availability.models import Driver, DriverAvailabilityHistory
    from common.actors import Actor
    from workflows.drivers import availability_end_shift

    if mode == "none" or not ids:
        return "left as they are"
    if mode == "end-shift":
        failed = 0
        for i in ids:
            try:
                availability_end_shift(driver_id=i, actor=Actor("driver", i))
            except Exception:  # noqa: BLE001 - counted
                failed += 1
        return f"shift ended ({failed} failed)"
    r = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    for k in range(0, len(ids), 500):
        chunk = ids[k:k + 500]
        pipe = r.pipeline(transaction=False)
        pipe.delete(*[live.driver_key(i) for i in chunk], *[live.auth_key(i) for i in chunk])
        pipe.hdel(geo.STATUS_KEY, *chunk)
        pipe.hdel(geo.STATUS_AT_KEY, *chunk)
        pipe.hdel(live.MOVED_KEY, *chunk)
        pipe.hdel(live.ACTIVE_KEY, *chunk)
        pipe.zrem(geo.GEO_KEY, *chunk)
        pipe.zrem(geo.FIX_KEY, *chunk)
        pipe.execute()
    User = get_user_model()
    with transaction.atomic():
        user_ids = list(Driver.objects.filter(pk__in=ids).values_list("user_id", flat=True))
        DriverAvailabilityHistory.objects.filter(driver_id__in=ids).delete()
        ApiToken.objects.filter(user_id__in=user_ids).delete()
        deleted = Driver.objects.filter(pk__in=ids).delete()[0]
        User.objects.filter(pk__in=user_ids).delete()
    return f"deleted ({deleted} rows with cascades; Redis entries removed)"


# ---------------------------------------------------------------------------- stream and lag


class Stream:
    def __init__(self):
        import redis
        from django.conf import settings

        from availability import live

        self.live = live
        self.r = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)

    def state(self) -> dict:
        """pending (read, not acknowledged), lag (not read yet), drained."""
        key, group = self.live.STREAM_KEY, self.live.STREAM_GROUP
        try:
            groups = {g["name"]: g for g in self.r.xinfo_groups(key)}
            info = self.r.xinfo_stream(key)
        except Exception:  # noqa: BLE001 - no stream yet
            return {"pending": 0, "lag": 0, "drained": True, "length": 0}
        g = groups.get(group)
        if g is None:
            return {"pending": 0, "lag": None, "drained": False, "length": info["length"]}
        lag = g.get("lag")
        last = info.get("last-generated-id")
        drained = g["pending"] == 0 and (lag == 0 or g["last-delivered-id"] == last)
        return {"pending": g["pending"], "lag": lag, "drained": drained, "length": info["length"]}

    def wait_drained(self, limit_s: float, poll_s: float = 0.02) -> tuple[float | None, dict]:
        start = time.perf_counter()
        state = self.state()
        while not state["drained"]:
            if time.perf_counter() - start > limit_s:
                return None, state
            time.sleep(poll_s)
            state = self.state()
        return time.perf_counter() - start, state


class LagSampler(threading.Thread):
    """Every `every` s: PostgreSQL's newest recorded-at over a sample of drivers, then Redis's
    (read in that order, so query time counts against PostgreSQL), and the consumer group."""

    def __init__(self, ids: list[str], every: float):
        super().__init__(daemon=True)
        self.ids, self.every = ids, every
        self.stop = threading.Event()
        self.samples: list[dict] = []
        self.error: str | None = None

    def run(self):
        from django.db import connection

        from availability import live

        stream = Stream()
        keys = [live.driver_key(i) for i in self.ids]
        try:
            while not self.stop.wait(self.every):
                with connection.cursor() as cur:
                    cur.execute("SELECT extract(epoch FROM max(location_recorded_at)) FROM dispatch_driver WHERE id = ANY(%s::uuid[])",
                                [self.ids])
                    pg = float(cur.fetchone()[0])
                pipe = stream.r.pipeline(transaction=False)
                for k in keys:
                    pipe.hget(k, "t")
                rd = max(float(t) for t in pipe.execute() if t)
                st = stream.state()
                self.samples.append({"t": time.perf_counter(), "behind": rd - pg, "pending": st["pending"], "lag": st["lag"],
                                     "wall_minus_pg": time.time() - pg})
        except Exception as exc:  # noqa: BLE001 - reported
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            connection.close()


def check_persisted(ids: list[str]) -> tuple[int, float]:
    """Drivers whose PostgreSQL fix is older than Redis's, and the largest gap (s)."""
    import redis
    from django.conf import settings
    from django.db import connection

    from availability import live

    r = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.hget(live.driver_key(i), "t")
    redis_t = dict(zip(ids, pipe.execute()))
    with connection.cursor() as cur:
        cur.execute("SELECT id::text, extract(epoch FROM location_recorded_at) FROM dispatch_driver WHERE id = ANY(%s::uuid[])", [ids])
        pg_t = {i: float(t) for i, t in cur.fetchall()}
    behind = [float(redis_t[i]) - pg_t.get(i, 0.0) for i in ids if redis_t.get(i)]
    late = [b for b in behind if b > 1e-5]
    return len(late), max(late, default=0.0)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))]


# ---------------------------------------------------------------------------- main


def main(args) -> int:
    benchlib.ensure_wrk()
    before_state = machine_state("machine before")
    django_setup()
    server = None
    ids: list[str] = []
    try:
        if args.base:
            refuse_non_loopback(args.base)
            base = args.base
            if args.start_consumer:
                server = Server(consumers=1)
                server.web = None
                server.consumer_procs.append(server._spawn("consume_fixes-0", [str(ROOT / ".venv/bin/python"), "manage.py",
                                                                                "consume_fixes"]))
        else:
            server = Server(workers=args.workers, consumers=args.consumers)
            server.start()
            base = server.base
        consumers = benchlib.running("consume_fixes")
        if not consumers:
            print("warning: no `manage.py consume_fixes` is running: PostgreSQL will not follow", file=sys.stderr)

        rng = random.Random(args.seed)
        centre = (rng.uniform(-40, 40), rng.uniform(-140, 140))  # far from the demo city
        run_id = f"{int(time.time()) % 1000000:06d}"
        t0 = time.perf_counter()
        try:
            drivers = make_drivers(args.drivers, centre, rng, run_id)
        except Exception as exc:  # noqa: BLE001
            print(f"setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        ids = [d[0] for d in drivers]
        drivers_file = Path(args.drivers_file or tempfile.mkstemp(prefix="bench-drivers-", suffix=".txt")[1])
        drivers_file.write_text("".join(f"{i} {tok} {lat:.7f} {lon:.7f}\n" for i, tok, lat, lon in drivers))
        print(f"setup: {len(drivers)} drivers (created, first fix, resumed) around {centre[0]:.3f},{centre[1]:.3f} "
              f"in {time.perf_counter() - t0:.1f} s; id/token file {drivers_file}", flush=True)

        if args.wait_quiet:
            print(f"waiting for a quiet machine: {benchlib.wait_quiet(args.wait_quiet)}", flush=True)
            machine_state("machine at the start of the measurement")
        stream = Stream()
        port = int(base.rsplit(":", 1)[1].split("/")[0])
        web_pids = server.web_pids() if server and server.web else benchlib.uvicorn_pids(port)
        health = health_baseline(base, seconds=args.health_seconds, threads=args.threads, connections=args.connections)
        lua_args = ["fixes", str(drivers_file), str(args.threads)]
        warmed = 0
        for _ in range(3 if args.warmup > 0 else 0):  # until every driver posted once (its token cached)
            warm, _ = run_wrk(base, seconds=args.warmup, threads=args.threads, connections=args.connections, lua_args=lua_args)
            warmed += warm.requests
            drained_in, st = stream.wait_drained(60)
            drained = f"in {drained_in:.1f} s" if drained_in is not None else f"NOT within 60 s: {st}"
            print(f"warm-up {warm.seconds:.0f} s: {warm.ok_rate:,.0f} fixes/s, p99 {warm.p99_ms:.1f} ms; stream drained {drained}",
                  flush=True)
            if warmed >= 1.2 * len(ids):
                break

        meter = CpuMeter({"uvicorn": web_pids, "consume_fixes": consumers, "bench (this)": [os.getpid()]})
        sampler = LagSampler(rng.sample(ids, min(args.sample_drivers, len(ids))), args.sample_every)
        cpu_before = meter.snapshot()
        sampler.start()
        result, _ = run_wrk(base, seconds=args.seconds, threads=args.threads, connections=args.connections,
                                   lua_args=lua_args)
        cpu_after = meter.snapshot()
        end_state = stream.state()
        drained_in, final_state = stream.wait_drained(args.drain_limit)
        sampler.stop.set()
        sampler.join(5)
        late, worst = check_persisted(ids) if drained_in is not None else (None, None)
        health_after = health_baseline(base, seconds=args.health_seconds, threads=args.threads, connections=args.connections)
        after_state = machine_state("machine after")

        cpu = meter.report(cpu_before, cpu_after, {"wrk": result.cpu_s})
        behind = [s["behind"] for s in sampler.samples]
        pending = [s["pending"] + (s["lag"] or 0) for s in sampler.samples]
        # the yardstick is the better of the two /health/ runs (before and after): a busy
        # machine during one of them lowers it, and a lower yardstick flatters the ratio
        best_health = max(health.ok_rate, health_after.ok_rate)
        ratio = result.ok_rate / best_health if best_health else float("nan")
        print()
        print(f"location fixes: wrk -t{args.threads} -c{args.connections}, {result.seconds:.1f} s, {len(ids)} drivers, "
              f"against {base}")
        print(f"  fixes/s        {result.ok_rate:,.0f}   ({result.requests} requests; target {TARGET_RATE:,})")
        print(f"  latency ms     p50 {result.p50_ms:.1f}  p90 {result.p90_ms:.1f}  p99 {result.p99_ms:.1f}  "
              f"p99.9 {result.p999_ms:.1f}  max {result.max_ms:.1f}   (target p99 < {TARGET_P99_MS:.0f})")
        print(f"  non-2xx        {result.non_2xx} {result.statuses if result.non_2xx else ''}"
              + (f"  socket errors {result.socket_errors}" if result.socket_errors else ""))
        if result.bad_bodies:
            print(f"    {result.bad_bodies[:500]}")
        print(f"  not accepted   {result.not_accepted} (200 with accepted=false)")
        print(f"  /health/       {health.ok_rate:,.0f} req/s before, {health_after.ok_rate:,.0f} after  →  "
              f"fixes/s ÷ best health req/s = {ratio:.2f}")
        if behind:
            print(f"  PostgreSQL behind Redis (newest recordedAt of {len(sampler.ids)} drivers, every {args.sample_every} s, "
                  f"n={len(behind)}): p50 {statistics.median(behind):.2f} s  p95 {pct(behind, 95):.2f} s  max {max(behind):.2f} s "
                  f"(target ≤ {TARGET_PG_LAG_S:.0f} s)")
            print(f"  stream backlog during the run (unread + unacknowledged): p50 {pct(pending, 50):.0f}  max {max(pending)}")
        if sampler.error:
            print(f"  lag sampler failed: {sampler.error}")
        print(f"  stream at wrk's end: {end_state['lag']} unread, {end_state['pending']} unacknowledged; drained "
              + (f"{drained_in:.2f} s later" if drained_in is not None else f"NOT within {args.drain_limit} s: {final_state}"))
        if late is not None:
            print(f"  after draining: {late} of {len(ids)} drivers older in PostgreSQL than in Redis"
                  + (f" (worst {worst:.3f} s)" if late else ""))
        print(f"  CPU over the run (% of one core; machine: % of all {benchlib.NPROC} cores): {format_cpu(cpu)}")
        print(f"  machine time by kind: {CpuMeter.split(cpu_before, cpu_after)}")
        print(f"  load average before {before_state['loadavg']}, after {after_state['loadavg']}")
        met = (result.ok_rate >= TARGET_RATE and result.p99_ms < TARGET_P99_MS and bool(behind) and max(behind) <= TARGET_PG_LAG_S)
        print(f"  target         {TARGET_RATE:,} fixes/s, p99 < {TARGET_P99_MS:.0f} ms, PostgreSQL ≤ {TARGET_PG_LAG_S:.0f} s behind: "
              f"{'met' if met else 'not met'}")
        errors = result.non_2xx or result.socket_errors or result.not_accepted or drained_in is None or late
        return 1 if errors else 0
    finally:
        if ids:
            try:
                print(f"cleanup: {len(ids)} bench drivers {cleanup_drivers(ids, args.cleanup)}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"cleanup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if server:
            server.stop()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="use this running server (loopback only) instead of starting one")
    p.add_argument("--start-consumer", action="store_true", help="with --base: start one consume_fixes too")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers of the server started here")
    p.add_argument("--consumers", type=int, default=1, help="consume_fixes processes started here")
    p.add_argument("--drivers", type=int, default=2000)
    p.add_argument("--drivers-file", default=None, help="where to write the id/token file (default: a temp file)")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (requests in flight)")
    p.add_argument("--health-seconds", type=float, default=10)
    p.add_argument("--warmup", type=float, default=3, help="seconds of fixes before the measured run (0: none)")
    p.add_argument("--sample-every", type=float, default=0.5)
    p.add_argument("--sample-drivers", type=int, default=50)
    p.add_argument("--drain-limit", type=float, default=120, help="seconds to wait for the stream to drain")
    p.add_argument("--cleanup", choices=("delete", "end-shift", "none"), default="delete")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="after setup, wait up to this long for the machine to be quiet (< 10 %% busy, no pytest)")
    args = p.parse_args(argv)
    if not (1 <= args.drivers <= 20_000 and 0 < args.seconds <= 600 and 1 <= args.connections <= 2_000
            and 1 <= args.threads <= 16 and args.connections >= args.threads):
        p.error("--drivers 1..20000, --seconds 0..600, --threads 1..16, --connections threads..2000")
    if args.drivers < args.connections * 4:
        p.error("use at least 4 drivers per connection, so a driver never has two fixes in flight")
    return args


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: clean up and stop the server first
    sys.exit(main(parse_args()))
