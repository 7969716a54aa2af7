#!/usr/bin/env python
"""Customer tracking fan-out: S customer sockets on S active deliveries, their drivers posting
fixes to the location fast lane at a set rate; end-to-end latency from the POST to the
customer's socket.

Loopback targets only. By default it starts its own server on a free port (uvicorn
config.asgi --workers 2, one `manage.py consume_fixes`) and stops it afterwards; `--base URL`
uses a server that is already up. Setup (`--setup orm`, the default) makes S drivers (created,
first fix, resumed) and S deliveries around a random spot far from the demo city in-process
through the workflows, and assigns delivery i to driver i (ops assignment); `--setup api` does
it over HTTP as ops (create, offer, accept: slower, ~6 requests a pair). It measures the same
server's GET /health/ with wrk, opens `/ws/track/<id>/?token=` for every delivery (each must
get its `delivery_snapshot`), posts one warm-up fix per driver (`--warmup`; the server's token
cache then knows every driver, and every delivery gets its first ETA: the bench waits for the
consumer to store them all), then each driver posts a fix every `--fix-interval` seconds
(phases spread evenly) for `--seconds`, moving as `--movement` says, through a small
keep-alive HTTP client (bench/rawhttp.py; httpx could not post 1,000/s from one process
alongside 5,000 sockets).

For every accepted fix it waits for the `delivery_location_updated` with that fix's time on
that delivery's socket: latency = socket receive − POST start (one clock, this process).
A fix whose event has not arrived `--grace` seconds after the run is a drop. CPU per process
group over the measured window comes from /proc. Afterwards the deliveries are cancelled and
the drivers end their shift (they stay in the database: deliveries have an append-only audit
trail).

    .venv/bin/python bench/tracking_fanout.py --sockets 5000 --seconds 60 --fix-interval 5
    .venv/bin/python bench/tracking_fanout.py --base http://127.0.0.1:8127 --sockets 500 --seconds 20

Prints the machine state before and after, /health/ req/s, p50/p95/p99/max latency, drops,
achieved fix rate and its ratio to /health/, ETA events seen and CPU per group. Exit 1 on
drops or errors, 2 when setup failed. Needs websockets and httpx (requirements.txt).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import resource
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

import httpx
from websockets.asyncio.client import connect as ws_connect

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import ROOT, CpuMeter, gather_bounded, Server, format_cpu, health_baseline, machine_state, refuse_non_loopback  # noqa: E402
from rawhttp import HttpError, RawHttp  # noqa: E402
import tracking_setup  # noqa: E402
from tracking_setup import Pair, cleanup_run, orm_setup, orm_teardown  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

TARGET_P99_MS = 200.0


# ---------------------------------------------------------------------------- the run


def iso_now() -> str:
    # milliseconds: the event's updatedAt is matched against it as a datetime
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))
    return values[k]


class SetupFailed(Exception):
    pass


def expect(response: httpx.Response, status: int, what: str) -> dict:
    if response.status_code != status:
        raise SetupFailed(f"{what}: expected {status}, got {response.status_code}: {response.text[:300]}")
    return response.json()



# The great-circle backend's model (tracking/eta.py, tracking/routing.py): a scooter at 25 km/h
# along roads 1.3× the straight line. A driver at this straight-line pace keeps its ETA.
ROAD_FACTOR = 1.3
SCOOTER_STRAIGHT_LINE_MPS = 25 / 3.6 / ROAD_FACTOR
SPEED_SPREAD = 0.3


class Bench:
    def __init__(self, args, base: str, rng: random.Random):
        self.args, self.base, self.rng = args, base, rng
        self.run_id = f"{int(time.time()) % 1000000:06d}-{rng.randrange(1000):03d}"
        self.centre = (rng.uniform(-30, 30), rng.uniform(-120, 120))  # far from the demo city
        self.sent: dict[tuple[str, datetime], float] = {}
        self.latencies: list[float] = []
        self.post_latencies: list[float] = []
        self.late_or_unknown = 0
        self.statuses: Counter = Counter()
        self.exceptions: Counter = Counter()
        self.error_bodies: dict[int, str] = {}
        self.ignored = 0
        self.eta_events = 0
        self.other_events: Counter = Counter()
        self.socket_errors: Counter = Counter()
        self.closed_early = 0
        self.skipped = 0

    # -- setup over HTTP (`--setup api`)

    async def api_setup_pair(self, c: httpx.AsyncClient, ops: dict, n: int) -> Pair:
        body = expect(await c.post("/v2/drivers", headers=ops, json={
            "name": f"Track Bench {self.run_id} {n}", "phone": f"+1 555 {n:07d}", "vehicle": "Bench scooter",
            "vehicleType": "scooter",
        }), 201, "create driver")
        lat = self.centre[0] + self.rng.uniform(-0.03, 0.03)
        lon = self.centre[1] + self.rng.uniform(-0.03, 0.03)
        pair = Pair(n, body["id"], body["apiToken"], lat, lon)
        expect(await c.post(f"/v2/drivers/{pair.driver_id}/location", headers=pair.auth(),
                            json={"lat": lat, "lon": lon, "accuracyMeters": 10, "recordedAt": iso_now()}), 200, "first fix")
        expect(await c.post(f"/v2/drivers/{pair.driver_id}/availability/resume", headers=pair.auth()), 200, "resume")
        delivery = expect(await c.post("/v2/deliveries", headers=ops, json={
            "sellerOrderId": f"TRACK-BENCH-{self.run_id}-{n}", "storeName": "Bench store",
            "pickupLocation": {"lat": lat + 0.005, "lon": lon}, "dropoffLocation": {"lat": lat + 0.02, "lon": lon + 0.01},
            "prepTimeMinutes": 0, "autoDispatch": False,
        }), 201, "create delivery")
        pair.delivery_id = delivery["id"]
        pair.tracking_token = parse_qs(urlsplit(delivery["trackingUrl"]).query)["token"][0]
        offer = expect(await c.post(f"/v2/deliveries/{pair.delivery_id}/offers", headers=ops,
                                    json={"driverId": pair.driver_id, "expiresInSeconds": 120}), 201, "offer")
        expect(await c.post(f"/v2/drivers/{pair.driver_id}/offers/{offer['offerId']}/accept", headers=pair.auth(), json={}),
               200, "accept")
        return pair

    async def api_teardown(self, c: httpx.AsyncClient, ops: dict, pairs: list[Pair]) -> None:
        sem = asyncio.Semaphore(self.args.setup_concurrency)

        async def one(pair: Pair):
            async with sem:
                try:
                    await c.post(f"/v2/deliveries/{pair.delivery_id}/cancel", headers=ops, json={"reason": "tracking bench finished"})
                    await c.post(f"/v2/drivers/{pair.driver_id}/availability/end-shift", headers=pair.auth())
                except httpx.HTTPError:
                    pass

        await asyncio.gather(*(one(p) for p in pairs))

    # -- the measured part

    async def socket(self, pair: Pair, opened: list, ready: asyncio.Event) -> None:
        host = urlsplit(self.base).netloc
        url = f"ws://{host}/ws/track/{pair.delivery_id}/?token={pair.tracking_token}"
        loads, sent, latencies = json.loads, self.sent, self.latencies
        try:
            async with ws_connect(url, open_timeout=self.args.open_timeout, max_queue=None, ping_interval=None,
                                  compression=None) as ws:
                snapshot = loads(await asyncio.wait_for(ws.recv(), self.args.open_timeout))
                if snapshot.get("type") != "delivery_snapshot":
                    raise RuntimeError(f"first message {snapshot.get('type')}")
                opened.append(pair)
                if len(opened) == self.args.sockets:
                    ready.set()
                async for raw in ws:  # until cancelled at the end of the run
                    now = time.perf_counter()
                    msg = loads(raw)
                    kind = msg.get("type")
                    if kind == "delivery_location_updated":
                        start = sent.pop((msg["deliveryId"], parse_time(msg["updatedAt"])), None)
                        if start is None:
                            self.late_or_unknown += 1
                        else:
                            latencies.append((now - start) * 1000)
                    elif kind == "delivery_eta_updated":
                        self.eta_events += 1
                    else:
                        self.other_events[kind] += 1
                self.closed_early += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - counted and reported
            self.socket_errors[type(exc).__name__] += 1
            opened.append(None)
            if len(opened) == self.args.sockets:
                ready.set()

    async def driver_loop(self, http: RawHttp, pair: Pair, start: float, deadline: float, once: bool = False) -> None:
        interval = self.args.fix_interval
        t = start + (pair.n % max(1, self.args.sockets)) / self.args.sockets * interval
        rng = self.rng
        while t < deadline or once:
            delay = t - time.perf_counter()
            if once:
                deadline = 0  # one fix now, then out
            elif delay > 0:
                await asyncio.sleep(delay)
            elif time.perf_counter() >= deadline:
                self.skipped += 1  # the server fell behind: stop at the deadline, not after every fix
                break
            once = False
            t += interval
            speed = self.move(pair, interval)
            recorded = iso_now()
            body = json.dumps({"lat": round(pair.lat, 7), "lon": round(pair.lon, 7), "accuracyMeters": 8,
                               "speed": round(speed, 2), "heading": 0, "recordedAt": recorded}).encode()
            key = (pair.delivery_id, parse_time(recorded))
            t_start = time.perf_counter()

            def sent_now():  # the clock starts when the request is written (not while queued)
                nonlocal t_start
                t_start = self.sent[key] = time.perf_counter()

            try:
                status, data = await http.request("POST", pair.path, headers=pair.headers, body=body, on_sent=sent_now)
            except HttpError as exc:
                self.exceptions[str(exc).split(":")[0]] += 1
                self.sent.pop(key, None)
                continue
            self.post_latencies.append((time.perf_counter() - t_start) * 1000)
            self.statuses[status] += 1
            if status != 200 or b'"accepted":true' not in data:
                self.sent.pop(key, None)
                self.ignored += status == 200
                if status != 200:
                    self.error_bodies.setdefault(status, data[:300].decode(errors="replace"))


    def move(self, pair: Pair, interval: float) -> float:
        """The driver's next position (`--movement`); returns its speed in m/s.

        `route`: it rides north to its store (0.005° away, where setup put the pickup) at its own
        pace — a per-driver factor of `SPEED_SPREAD` around the great-circle backend's scooter
        speed, so some ETAs slip or gain and get announced, as a real fleet's do — then waits at
        the store with a few metres of GPS noise. `jitter` (every run before 2026-12-03): ±33 m
        of noise around where it stands, never nearer the store, so every ETA slips as fast as
        the clock (the worst case: the whole fleet stuck in traffic at once)."""
        rng = self.rng
        if self.args.movement == "jitter":
            pair.lat += rng.uniform(-0.0003, 0.0003)
            pair.lon += rng.uniform(-0.0003, 0.0003)
            return 6.5
        if pair.store is None:
            pair.store = pair.lat + 0.005
            pair.pace = SCOOTER_STRAIGHT_LINE_MPS * rng.uniform(1 - SPEED_SPREAD, 1 + SPEED_SPREAD)
        step = pair.pace * interval / 111_195.08  # degrees of latitude
        if pair.store - pair.lat > step:
            pair.lat += step
            return pair.pace * ROAD_FACTOR
        pair.lat = pair.store + rng.uniform(-0.00003, 0.00003)
        return 0.0


async def run(args, base: str, server_pids: list[int], consumer_pids: list[int]) -> int:
    rng = random.Random(args.seed)
    bench = Bench(args, base, rng)
    t0 = time.perf_counter()
    api_client = None
    pairs: list[Pair] = []
    try:
        if args.setup == "orm":
            pairs = await asyncio.to_thread(orm_setup, args.sockets, bench.centre, rng, bench.run_id, args.user,
                                            args.setup_concurrency)
        else:
            api_client = httpx.AsyncClient(base_url=base, timeout=args.timeout,
                                           limits=httpx.Limits(max_connections=args.setup_concurrency))
            r = await api_client.post("/v2/auth/token", json={"username": args.user, "password": args.password})
            ops = {"Authorization": f"Token {expect(r, 200, 'login')['token']}"}
            pairs = await gather_bounded(args.setup_concurrency,
                                         [lambda n=n: bench.api_setup_pair(api_client, ops, n) for n in range(args.sockets)])
    except Exception as exc:  # noqa: BLE001
        print(f"setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if api_client:
            await api_client.aclose()
        return 2
    print(f"setup ({args.setup}, run {bench.run_id}): {len(pairs)} drivers assigned to {len(pairs)} deliveries around "
          f"{bench.centre[0]:.3f},{bench.centre[1]:.3f} ({time.perf_counter() - t0:.1f} s); movement {args.movement}", flush=True)
    try:
        return await measure(args, bench, pairs, server_pids, consumer_pids)
    finally:
        t1 = time.perf_counter()
        if args.setup == "orm":
            failed = await asyncio.to_thread(orm_teardown, pairs, args.user, args.setup_concurrency)
        else:
            await bench.api_teardown(api_client, ops, pairs)
            await api_client.aclose()
            failed = "?"
        print(f"cleanup: {len(pairs)} deliveries cancelled, drivers' shift ended ({failed} failed; "
              f"{time.perf_counter() - t1:.1f} s)", flush=True)


async def measure(args, bench: Bench, pairs: list[Pair], server_pids: list[int], consumer_pids: list[int]) -> int:
    base = bench.base
    if args.wait_quiet:
        print(f"waiting for a quiet machine: {await asyncio.to_thread(benchlib.wait_quiet, args.wait_quiet)}", flush=True)
        machine_state("machine at the start of the measurement")
    health = await asyncio.to_thread(health_baseline, base, seconds=args.health_seconds, threads=2, connections=32)

    http = RawHttp(base, args.concurrency, timeout=args.timeout)
    await http.open()
    ready, opened = asyncio.Event(), []
    t1 = time.perf_counter()
    sockets = []
    for i, pair in enumerate(pairs):  # open them at a bounded pace
        sockets.append(asyncio.ensure_future(bench.socket(pair, opened, ready)))
        if i % args.open_batch == args.open_batch - 1:
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(ready.wait(), args.open_timeout)
    except asyncio.TimeoutError:
        pass
    connected = sum(1 for p in opened if p is not None)
    print(f"sockets: {connected}/{len(pairs)} connected with a snapshot ({time.perf_counter() - t1:.1f} s)"
          + (f", errors {dict(bench.socket_errors)}" if bench.socket_errors else ""), flush=True)

    if args.warmup:
        # One fix per driver once the sockets are open, before the measured window: the fast
        # lane then knows every driver's token, and every delivery has its first ETA, computed
        # where the driver is then (before 2026-12-03 the warm-up came before the sockets
        # opened, so at 5,000 sockets each driver's first fix of the window came ~50 s after
        # its warm-up one, with its ETA ~50 s later: 5,000 announcements in the window).
        # Without it the measured window began with S token lookups in PostgreSQL (the setup's
        # fixes go in-process, not through the fast lane), which the server would pay again
        # only when its token cache expires.
        t1 = time.perf_counter()
        warm = Bench(args, base, bench.rng)
        await gather_bounded(args.concurrency, [
            lambda p=p: warm.driver_loop(http, p, 0.0, 0.0, once=True)
            for p in pairs])
        print(f"warm-up: one fix per driver, statuses {dict(warm.statuses)} ({time.perf_counter() - t1:.1f} s)", flush=True)
        if args.setup == "orm":
            # The warm-up's fixes give every delivery its first ETA (the bench's server runs no
            # Celery worker, so the assignment computed none): a burst of S computations and
            # announcements. Wait for the consumer to finish it, so that it falls in neither the
            # measured window nor its counts.
            t1, stored = time.perf_counter(), 0
            while time.perf_counter() - t1 < 120:
                stored = await asyncio.to_thread(tracking_setup.etas_stored, pairs)
                if stored >= len(pairs):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # their events, sent after commit
            print(f"warm-up ETAs: {stored}/{len(pairs)} stored by the consumer ({time.perf_counter() - t1:.1f} s)", flush=True)

        bench.late_or_unknown, bench.eta_events = 0, 0
        bench.other_events.clear()

    meter = CpuMeter({"uvicorn": server_pids, "consume_fixes": consumer_pids, "bench (this)": [os.getpid()]})
    before = meter.snapshot()
    start = time.perf_counter()
    deadline = start + args.seconds
    await asyncio.gather(*(bench.driver_loop(http, p, start, deadline) for p in pairs))
    after = meter.snapshot()
    elapsed = time.perf_counter() - start
    grace_end = time.perf_counter() + args.grace
    while bench.sent and time.perf_counter() < grace_end:
        await asyncio.sleep(0.1)
    drops = len(bench.sent)
    await http.close()
    for task in sockets:
        task.cancel()
    await asyncio.gather(*sockets, return_exceptions=True)
    await asyncio.sleep(2)  # let the server see the sockets close
    health_after = await asyncio.to_thread(health_baseline, base, seconds=args.health_seconds, threads=2, connections=32)
    after_state = machine_state("machine after")

    lat = sorted(bench.latencies)
    accepted = len(lat) + drops
    posted = sum(bench.statuses.values())
    rate = posted / elapsed
    target_rate = args.sockets / args.fix_interval
    print()
    print(f"tracking fan-out: {connected} sockets, one fix per delivery every {args.fix_interval:g} s, {elapsed:.1f} s, against {base}")
    print(f"  fixes          {posted} posted ({rate:,.0f}/s; target {target_rate:,.0f}/s), statuses {dict(bench.statuses)}"
          + (f", exceptions {dict(bench.exceptions)}" if bench.exceptions else "")
          + (f", not accepted {bench.ignored}" if bench.ignored else "")
          + (f"; {bench.skipped} drivers still behind schedule at the deadline" if bench.skipped else ""))
    for status, sample in bench.error_bodies.items():
        print(f"    first {status}: {sample}")
    print(f"  POST → socket  p50 {pct(lat, 50):.1f}  p95 {pct(lat, 95):.1f}  p99 {pct(lat, 99):.1f}  "
          f"max {lat[-1] if lat else float('nan'):.1f} ms  (n={len(lat)}; target p99 < {TARGET_P99_MS:.0f})")
    post = sorted(bench.post_latencies)
    print(f"  POST response  p50 {pct(post, 50):.1f}  p95 {pct(post, 95):.1f}  p99 {pct(post, 99):.1f}  "
          f"max {post[-1] if post else float('nan'):.1f} ms")
    print(f"  drops          {drops} of {accepted} accepted fixes ({drops / accepted * 100 if accepted else 0:.2f} %); "
          f"unmatched events {bench.late_or_unknown}; ETA events {bench.eta_events}; other events {dict(bench.other_events) or 0}; "
          f"socket errors {dict(bench.socket_errors) or 0}; closed by the server {bench.closed_early}")
    best_health = max(health.ok_rate, health_after.ok_rate)
    print(f"  /health/       {health.ok_rate:,.0f} req/s before the sockets opened, {health_after.ok_rate:,.0f} after they closed"
          f"  →  fixes/s ÷ best health req/s = {rate / best_health if best_health else float('nan'):.2f}")
    print(f"  CPU over the run (% of one core; machine: % of all {benchlib.NPROC} cores): "
          f"{format_cpu(meter.report(before, after))}; machine time by kind: {CpuMeter.split(before, after)}")
    print(f"  load average after {after_state['loadavg']}")
    met = connected >= args.sockets and not drops and lat and pct(lat, 99) < TARGET_P99_MS and rate >= 0.98 * target_rate
    print(f"  target         {args.sockets:,} sockets, p99 < {TARGET_P99_MS:.0f} ms, 0 drops: {'met' if met else 'not met'}")
    bad = drops or bench.exceptions or bench.socket_errors or any(s != 200 for s in bench.statuses) or connected < len(pairs)
    return 1 if bad else 0


def main(args) -> int:
    if args.cleanup_run:
        return cleanup_run(args.cleanup_run, args.user, args.setup_concurrency)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.sockets + args.concurrency + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < args.sockets + args.concurrency + 64:
        print(f"warning: open files limit {want} is below what {args.sockets} sockets need", file=sys.stderr)
    benchlib.ensure_wrk()
    machine_state("machine before")
    if args.setup == "orm":
        import django

        django.setup()
    server = None
    try:
        if args.base:
            refuse_non_loopback(args.base)
            base = args.base
            port = urlsplit(base).port or 80
            server_pids = benchlib.with_descendants(args.server_pid) if args.server_pid else benchlib.uvicorn_pids(port)
        else:
            server = Server(workers=args.workers, consumers=1)
            server.start()
            base, server_pids = server.base, server.web_pids()
        consumer_pids = benchlib.running("consume_fixes")
        if not consumer_pids:
            print("warning: no `manage.py consume_fixes` running (ETA refresh and PostgreSQL follow from it)", file=sys.stderr)
        print(f"server pids {server_pids or 'not found'}; consume_fixes {consumer_pids}", flush=True)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        return runner(run(args, base, server_pids, consumer_pids))
    finally:
        if server:
            server.stop()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="a running server (loopback only); default: start one here")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers of the server started here")
    p.add_argument("--user", default="ops")
    p.add_argument("--password", default="ops", help="(--setup api)")
    p.add_argument("--setup", choices=("orm", "api"), default="orm")
    p.add_argument("--sockets", type=int, default=500, help="S: deliveries, drivers and customer sockets")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--fix-interval", type=float, default=5.0, help="seconds between two fixes of one driver")
    p.add_argument("--movement", choices=("route", "jitter"), default="route",
                   help="route: drivers ride to their store at their own pace; jitter: noise where they stand (before 2026-12-03)")
    p.add_argument("--concurrency", type=int, default=64, help="location POSTs in flight at most (connections)")
    p.add_argument("--setup-concurrency", type=int, default=6, help="threads (orm) or requests (api) while setting up")
    p.add_argument("--open-batch", type=int, default=50, help="sockets opened per 50 ms")
    p.add_argument("--open-timeout", type=float, default=300, help="seconds for all sockets to open")
    p.add_argument("--warmup", type=int, choices=(0, 1), default=1,
                   help="1: each driver posts one fix before the sockets open (the server's token cache warm)")
    p.add_argument("--health-seconds", type=float, default=10)
    p.add_argument("--grace", type=float, default=3.0, help="seconds to wait for the last events")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--server-pid", type=int, action="append", default=[], help="with --base: measure these pids (and children)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="after setup, wait up to this long for the machine to be quiet (< 10 %% busy, no pytest)")
    p.add_argument("--cleanup-run", metavar="RUN_ID", help="only clean up an interrupted run (its id is in the setup line)")
    args = p.parse_args(argv)
    if not (1 <= args.sockets <= 20_000 and 0 < args.seconds <= 600 and args.fix_interval > 0 and 1 <= args.concurrency <= 1000):
        p.error("--sockets 1..20000, --seconds 0..600, --concurrency 1..1000")
    return args


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: clean up and stop the server first
    sys.exit(main(parse_args()))
