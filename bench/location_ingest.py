#!/usr/bin/env python
"""Location ingestion load test: N simulated drivers post fixes for T seconds.

Runs against a server that is already up (`make run`, or uvicorn by hand), on this machine
only: the target must be a loopback address. It logs in as ops, creates N drivers, gives each
a first fix and resumes it (so fixes also go through the GEO index), then keeps C requests in
flight for T seconds: each request is the next driver's next fix, a few metres from its last,
and no driver ever has two fixes in flight. It stops by itself and prints throughput, latency
percentiles and errors by status. See bench/README.md.

    .venv/bin/python bench/location_ingest.py --base http://127.0.0.1:8000 --drivers 200 --seconds 20 --concurrency 64

Standard library plus httpx (already in requirements.txt).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import gather_bounded, refuse_non_loopback  # noqa: E402

CENTRE = (12.9716, 77.5946)  # the demo city (seed_demo)
SPREAD_KM = 8.0


@dataclass
class SimDriver:
    id: str
    token: str
    lat: float
    lon: float
    heading: float

    def move(self, rng: random.Random) -> None:
        """A few metres on, turning a little; stay within SPREAD_KM of the centre."""
        self.heading = (self.heading + rng.uniform(-30, 30)) % 360
        step_m = rng.uniform(5, 60)
        self.lat += step_m * math.cos(math.radians(self.heading)) / 111_320
        self.lon += step_m * math.sin(math.radians(self.heading)) / (111_320 * math.cos(math.radians(self.lat)))
        if abs(self.lat - CENTRE[0]) > SPREAD_KM / 111 or abs(self.lon - CENTRE[1]) > SPREAD_KM / 108:
            self.heading = (self.heading + 180) % 360


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    exceptions: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)  # status -> first error body seen
    ignored: int = 0  # 200 but accepted=false (should stay 0: every fix is newer than the last)



def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def fix_body(d: SimDriver, rng: random.Random) -> dict:
    return {
        "lat": round(d.lat, 7), "lon": round(d.lon, 7), "accuracyMeters": round(rng.uniform(3, 25), 1),
        "speed": round(rng.uniform(0, 14), 2), "heading": round(d.heading, 1) % 360, "recordedAt": iso_now(),
    }


class SetupFailed(Exception):
    pass


async def expect(response: httpx.Response, status: int, what: str) -> dict:
    if response.status_code != status:
        raise SetupFailed(f"{what}: expected {status}, got {response.status_code}: {response.text[:300]}")
    return response.json()


async def login(client: httpx.AsyncClient, user: str, password: str) -> str:
    r = await client.post("/v2/auth/token", json={"username": user, "password": password})
    return (await expect(r, 200, "login"))["token"]


async def create_driver(client: httpx.AsyncClient, ops_token: str, n: int, run_id: str, rng: random.Random) -> SimDriver:
    r = await client.post(
        "/v2/drivers",
        json={"name": f"Bench Driver {run_id}-{n}", "phone": f"+1 555 {n:07d}", "vehicle": "Bench scooter",
              "vehicleType": "scooter" if n % 2 else "car"},
        headers={"Authorization": f"Token {ops_token}"},
    )
    body = await expect(r, 201, "create driver")
    dist_km, bearing = SPREAD_KM * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
    lat = CENTRE[0] + dist_km * math.cos(bearing) / 111
    lon = CENTRE[1] + dist_km * math.sin(bearing) / 108
    driver = SimDriver(body["id"], body["apiToken"], lat, lon, rng.uniform(0, 360))
    auth = {"Authorization": f"Token {driver.token}"}
    await expect(await client.post(f"/v2/drivers/{driver.id}/location", json=fix_body(driver, rng), headers=auth), 200, "first fix")
    await expect(await client.post(f"/v2/drivers/{driver.id}/availability/resume", headers=auth), 200, "resume")
    return driver



async def post_fixes(client: httpx.AsyncClient, queue: asyncio.Queue, deadline: float, stats: Stats, rng: random.Random) -> None:
    while time.perf_counter() < deadline:
        driver: SimDriver = await queue.get()
        driver.move(rng)
        body = fix_body(driver, rng)
        start = time.perf_counter()
        try:
            r = await client.post(f"/v2/drivers/{driver.id}/location", json=body,
                                  headers={"Authorization": f"Token {driver.token}"})
        except httpx.HTTPError as exc:
            stats.exceptions[type(exc).__name__] += 1
        else:
            stats.latencies_ms.append((time.perf_counter() - start) * 1000)
            stats.statuses[r.status_code] += 1
            if r.status_code != 200:
                stats.samples.setdefault(r.status_code, f"{body} -> {r.text[:300]}")
            if r.status_code == 200 and r.json().get("accepted") is not True:
                stats.ignored += 1
        finally:
            queue.put_nowait(driver)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


async def main(args: argparse.Namespace) -> int:
    refuse_non_loopback(args.base)
    rng = random.Random(args.seed)
    run_id = f"{int(time.time()) % 100000:05d}"
    limits = httpx.Limits(max_connections=max(args.concurrency, args.setup_concurrency),
                          max_keepalive_connections=max(args.concurrency, args.setup_concurrency))
    async with httpx.AsyncClient(base_url=args.base, limits=limits, timeout=args.timeout) as client:
        t0 = time.perf_counter()
        try:
            ops_token = await login(client, args.user, args.password)
            drivers = await gather_bounded(
                args.setup_concurrency,
                [lambda n=n: create_driver(client, ops_token, n, run_id, rng) for n in range(args.drivers)],
            )
        except (SetupFailed, httpx.HTTPError) as exc:
            print(f"setup failed: {exc}", file=sys.stderr)
            return 2
        print(f"setup: {len(drivers)} drivers created, first fix posted, resumed ({time.perf_counter() - t0:.1f} s)")

        queue: asyncio.Queue = asyncio.Queue()
        for d in drivers:
            queue.put_nowait(d)
        stats = Stats()
        workers = min(args.concurrency, len(drivers))  # never two fixes of one driver in flight
        start = time.perf_counter()
        deadline = start + args.seconds
        await asyncio.gather(*(post_fixes(client, queue, deadline, stats, random.Random(rng.random())) for _ in range(workers)))
        elapsed = time.perf_counter() - start

        if not args.keep_online:
            await gather_bounded(args.setup_concurrency, [
                lambda d=d: client.post(f"/v2/drivers/{d.id}/availability/end-shift", headers={"Authorization": f"Token {d.token}"})
                for d in drivers
            ])

    lat = sorted(stats.latencies_ms)
    ok = stats.statuses.get(200, 0)
    errors = {str(k): v for k, v in sorted(stats.statuses.items()) if k != 200}
    errors.update(stats.exceptions)
    print(f"load: {len(drivers)} drivers, concurrency {workers}, {elapsed:.1f} s against {args.base}")
    print(f"  requests     {len(lat) + sum(stats.exceptions.values())}")
    print(f"  fixes/s      {ok / elapsed:,.0f}   (200 responses per second)")
    print(f"  latency ms   p50 {percentile(lat, 50):.1f}   p95 {percentile(lat, 95):.1f}   "
          f"p99 {percentile(lat, 99):.1f}   max {lat[-1] if lat else float('nan'):.1f}")
    print(f"  errors       {errors or 'none'}")
    for status, sample in sorted(stats.samples.items()):
        print(f"    first {status}: {sample}")
    print(f"  ignored      {stats.ignored} (200 with accepted=false)")
    target_ok = ok / elapsed >= 2500 and percentile(lat, 99) < 50
    print(f"  target       2,500 fixes/s with p99 < 50 ms: {'met' if target_ok else 'not met'}")
    return 0 if not errors else 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="http://127.0.0.1:8000", help="server URL (loopback only)")
    p.add_argument("--user", default="ops", help="ops username (creates the drivers)")
    p.add_argument("--password", default="ops")
    p.add_argument("--drivers", type=int, default=200, help="simulated drivers (N)")
    p.add_argument("--seconds", type=float, default=20, help="how long to post fixes (T)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (C)")
    p.add_argument("--setup-concurrency", type=int, default=16, help="requests in flight while creating drivers")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep-online", action="store_true", help="leave the drivers available afterwards (default: end their shift)")
    args = p.parse_args(argv)
    if not (1 <= args.drivers <= 100_000 and 0 < args.seconds <= 3600 and 1 <= args.concurrency <= 2_000):
        p.error("--drivers 1..100000, --seconds 0..3600, --concurrency 1..2000")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
