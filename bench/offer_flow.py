#!/usr/bin/env python
"""Offer flow load test: create a delivery, let dispatch offer it, accept it as the offered
driver, walk it through pickup and drop-off. Repeats with C flows in flight for T seconds.

Against a server that is already up, on this machine only (loopback targets). It logs in as
ops, creates K drivers around a random spot far from the demo city, gives each a fix and
resumes it, measures the same server's GET /health/ rate for a few seconds as a yardstick,
then runs the flows and prints flows/s, per-request latency percentiles by step and errors.

    .venv/bin/python bench/offer_flow.py --base http://127.0.0.1:8000 --drivers 60 --seconds 20 --concurrency 16

Standard library plus httpx.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from collections import Counter, defaultdict

import httpx

sys.path.insert(0, __import__("os").path.dirname(__file__))
from location_ingest import refuse_non_loopback  # noqa: E402

STEPS = ("pickup-started", "pickup-completed", "delivery-started", "delivery-completed")


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Run:
    def __init__(self, client: httpx.AsyncClient, ops_token: str):
        self.client = client
        self.ops = {"Authorization": f"Token {ops_token}"}
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.status: Counter = Counter()
        self.samples: dict[str, str] = {}
        self.flows = 0
        self.unassigned = 0

    async def call(self, name, method, url, headers, json=None):
        start = time.perf_counter()
        try:
            r = await self.client.request(method, url, headers=headers, json=json)
        except httpx.HTTPError as exc:
            self.status[f"{name}:{type(exc).__name__}"] += 1
            return None
        self.lat[name].append((time.perf_counter() - start) * 1000)
        self.status[f"{name}:{r.status_code}"] += 1
        if r.status_code >= 400 and name not in self.samples:
            self.samples[name] = r.text[:300]
        return r


async def setup_drivers(run: Run, k: int, centre, rng) -> dict[str, str]:
    tokens = {}
    for i in range(k):
        r = await run.client.post("/v2/drivers", headers=run.ops, json={
            "name": f"Bench Driver {i}", "phone": f"+1555{rng.randint(1000000, 9999999)}", "vehicle": "Bench Bike",
            "vehicleType": "motorbike",
        })
        r.raise_for_status()
        body = r.json()
        h = {"Authorization": f"Token {body['apiToken']}"}
        lat = centre[0] + rng.uniform(-0.01, 0.01)
        lon = centre[1] + rng.uniform(-0.01, 0.01)
        (await run.client.post(f"/v2/drivers/{body['id']}/location", headers=h, json={"lat": lat, "lon": lon})).raise_for_status()
        (await run.client.post(f"/v2/drivers/{body['id']}/availability/resume", headers=h)).raise_for_status()
        tokens[body["id"]] = body["apiToken"]
    return tokens


async def one_flow(run: Run, tokens, centre, rng) -> None:
    body = {
        "sellerOrderId": f"BENCH-{uuid.uuid4().hex[:12]}", "storeName": "Bench Store",
        "pickupLocation": {"lat": centre[0] + rng.uniform(-0.005, 0.005), "lon": centre[1] + rng.uniform(-0.005, 0.005)},
        "dropoffLocation": {"lat": centre[0] + rng.uniform(-0.02, 0.02), "lon": centre[1] + rng.uniform(-0.02, 0.02)},
        "prepTimeMinutes": 0, "autoDispatch": True,
    }
    r = await run.call("create", "POST", "/v2/deliveries", run.ops, body)
    if r is None or r.status_code != 201:
        return
    delivery = r.json()
    if not delivery.get("currentOfferId"):
        run.unassigned += 1
        await run.call("cancel", "POST", f"/v2/deliveries/{delivery['id']}/cancel", run.ops, {"reason": "bench: nobody free"})
        return
    r = await run.call("offers", "GET", f"/v2/deliveries/{delivery['id']}/offers", run.ops)
    if r is None or r.status_code != 200:
        return
    offer = next(o for o in r.json()["offers"] if o["status"] == "PENDING")
    driver_id = offer["driverId"]
    h = {"Authorization": f"Token {tokens[driver_id]}"}
    r = await run.call("accept", "POST", f"/v2/drivers/{driver_id}/offers/{offer['id']}/accept", h, {})
    if r is None or r.status_code != 200:
        return
    for step in STEPS:
        r = await run.call(step, "POST", f"/v2/drivers/{driver_id}/deliveries/{delivery['id']}/{step}", h, {})
        if r is None or r.status_code != 200:
            return
    run.flows += 1


async def health_rate(client, seconds, concurrency) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < deadline:
            r = await client.get("/health/")
            done += r.status_code == 200

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def main(args) -> None:
    refuse_non_loopback(args.base)
    rng = random.Random(args.seed)
    centre = (rng.uniform(-40, 40), rng.uniform(-140, 140))
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=args.base, timeout=30, limits=limits) as client:
        r = await client.post("/v2/auth/token", json={"username": args.user, "password": args.password})
        r.raise_for_status()
        run = Run(client, r.json()["token"])
        print(f"setting up {args.drivers} drivers around {centre[0]:.3f},{centre[1]:.3f} ...", flush=True)
        tokens = await setup_drivers(run, args.drivers, centre, rng)
        hz = await health_rate(client, args.health_seconds, args.concurrency)
        print(f"GET /health/ alone: {hz:.0f} req/s at concurrency {args.concurrency}", flush=True)

        deadline = time.perf_counter() + args.seconds

        async def worker():
            while time.perf_counter() < deadline:
                await one_flow(run, tokens, centre, rng)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start

    requests = sum(len(v) for v in run.lat.values())
    print(f"\nflows completed: {run.flows} in {elapsed:.1f}s = {run.flows / elapsed:.1f} flows/s "
          f"({requests / elapsed:.0f} req/s; {run.unassigned} deliveries found nobody free)")
    print(f"{'request':20} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    everything = []
    for name, values in run.lat.items():
        everything += values
        print(f"{name:20} {len(values):6d} {pct(values, 50):8.1f} {pct(values, 95):8.1f} {pct(values, 99):8.1f}")
    print(f"{'all':20} {len(everything):6d} {pct(everything, 50):8.1f} {pct(everything, 95):8.1f} {pct(everything, 99):8.1f}")
    errors = {k: v for k, v in run.status.items() if not k.endswith((":200", ":201"))}
    print("errors:", errors or "none")
    for name, sample in run.samples.items():
        print(f"  first {name} error: {sample}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--user", default="ops")
    p.add_argument("--password", default="ops")
    p.add_argument("--drivers", type=int, default=60)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--health-seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=None)
    asyncio.run(main(p.parse_args()))
