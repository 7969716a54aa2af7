#!/usr/bin/env python
"""Offer flow: server CPU per request, in-process (the cost, not the machine's load).

Runs the offer flow of bench/offer_flow.py (create with auto-dispatch → offers → accept →
the four steps, with the fix at the door) one flow at a time through the real ASGI app
(`config.asgi.application`, over httpx.ASGITransport: the fast lane, the lean API stack, the
views, their on-commit events and enqueues), plus three `GET /health/` per flow, and prints
the CPU of this process per request (`time.process_time()`, all threads: the event loop, the
request threads, the channel-layer sends) by endpoint, with the PostgreSQL backends' CPU per
flow. On a loaded, shared machine wall-clock throughput says little; CPU per request says
what a request costs. The client's own share (httpx) is included in every figure alike.

    DATABASE_URL=… REDIS_URL=… .venv/bin/python bench/offer_flow_cpu.py --flows 40
    … --pyspy /tmp/flow.raw   # also sample this process with py-spy (--gil) over the flows

It starts one `manage.py consume_fixes` of its own (the fix stream into PostgreSQL) and stops
it after; the drivers it creates end their shift (they stay in the database, as do the
delivered deliveries). Compare two versions by alternating runs of each, never one run against
another taken at another moment.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

import httpx  # noqa: E402

from benchlib import machine_state, stop_process  # noqa: E402

sys.path.insert(0, str(ROOT))

STEPS = ("pickup-started", "pickup-completed", "delivery-started", "delivery-completed")
FLOW_REQUESTS = ("create", "offers", "accept", *STEPS[:3], "location", STEPS[3])


def pg_backend_ticks(dbname: str) -> int:
    """CPU ticks so far of the PostgreSQL backends connected to `dbname`."""
    import psycopg

    from django.conf import settings

    db = settings.DATABASES["default"]
    with psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"],
                         password=db["PASSWORD"] or None, dbname=dbname) as conn:
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", [dbname])]
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return ticks


async def run(args) -> None:
    from django.conf import settings

    from config.asgi import application

    rng = random.Random(args.seed)
    centre = (rng.uniform(-40, 40), rng.uniform(-140, 140))
    cpu: dict[str, list[float]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    measuring = False
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:

        async def call(name, method, url, headers, body=None):
            t0, w0 = time.process_time(), time.perf_counter()
            r = await client.request(method, url, headers=headers, json=body)
            if measuring:
                cpu[name].append((time.process_time() - t0) * 1000)
                wall[name].append((time.perf_counter() - w0) * 1000)
            if r.status_code >= 400:
                raise RuntimeError(f"{name}: HTTP {r.status_code} {r.text[:300]}")
            return r

        r = await call("token", "POST", "/v2/auth/token", {}, {"username": args.user, "password": args.password})
        ops = {"Authorization": f"Token {r.json()['token']}"}
        tokens = {}
        for i in range(args.drivers):
            body = (await call("setup", "POST", "/v2/drivers", ops, {
                "name": f"CPU Bench Driver {i}", "phone": f"+1555{rng.randint(1000000, 9999999)}",
                "vehicle": "Bench Bike", "vehicleType": "motorbike",
            })).json()
            h = {"Authorization": f"Token {body['apiToken']}"}
            fix = {"lat": centre[0] + rng.uniform(-0.01, 0.01), "lon": centre[1] + rng.uniform(-0.01, 0.01)}
            await call("setup", "POST", f"/v2/drivers/{body['id']}/location", h, fix)
            await call("setup", "POST", f"/v2/drivers/{body['id']}/availability/resume", h)
            tokens[body["id"]] = body["apiToken"]

        async def flow():
            body = {
                "sellerOrderId": f"CPU-{uuid.uuid4().hex[:12]}", "storeName": "Bench Store",
                "pickupLocation": {"lat": centre[0] + rng.uniform(-0.005, 0.005), "lon": centre[1] + rng.uniform(-0.005, 0.005)},
                "dropoffLocation": {"lat": centre[0] + rng.uniform(-0.02, 0.02), "lon": centre[1] + rng.uniform(-0.02, 0.02)},
                "prepTimeMinutes": 0, "autoDispatch": True,
            }
            delivery = (await call("create", "POST", "/v2/deliveries", ops, body)).json()
            offers = (await call("offers", "GET", f"/v2/deliveries/{delivery['id']}/offers", ops)).json()["offers"]
            offer = next((o for o in offers if o["status"] == "PENDING"), None)
            if offer is None:
                raise RuntimeError(f"no pending offer (is the fix stream consumed?): {delivery}")
            driver = offer["driverId"]
            h = {"Authorization": f"Token {tokens[driver]}"}
            await call("accept", "POST", f"/v2/drivers/{driver}/offers/{offer['id']}/accept", h, {})
            for step in STEPS:
                if step == "delivery-completed":
                    await call("location", "POST", f"/v2/drivers/{driver}/location", h, body["dropoffLocation"])
                await call(step, "POST", f"/v2/drivers/{driver}/deliveries/{delivery['id']}/{step}", h, {})
            for _ in range(3):
                await call("health", "GET", "/health/", {})

        spy = None
        try:
            for _ in range(args.warmup):
                await flow()
            dbname = settings.DATABASES["default"]["NAME"]
            if args.pyspy:
                spy = subprocess.Popen([args.pyspy_bin, "record", "--gil", "--nonblocking", "--format", "raw", "-r", "1000", "-o", args.pyspy,
                                        "--pid", str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.5)
            pg_before = pg_backend_ticks(dbname)
            measuring = True
            for _ in range(args.flows):
                await flow()
            measuring = False
            pg_ms = (pg_backend_ticks(dbname) - pg_before) * 1000 / os.sysconf("SC_CLK_TCK") / args.flows
        finally:  # a run that fails part-way ends its drivers' shifts too (else the next run's offers go to them)
            if spy and spy.poll() is None:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            for driver, token in tokens.items():
                try:
                    await call("teardown", "POST", f"/v2/drivers/{driver}/availability/end-shift", {"Authorization": f"Token {token}"})
                except Exception as exc:  # (not in place of the error that ended the run)
                    print(f"teardown: driver {driver} did not end its shift: {exc}", file=sys.stderr)

    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"\noffer flow CPU per request, in-process, {args.flows} flows one at a time (+{args.warmup} warm-up)")
    print(f"{'request':20} {'n':>5} {'cpu p50 ms':>11} {'cpu mean ms':>12} {'wall p50 ms':>12}")
    for name in (*FLOW_REQUESTS, "health"):
        v = cpu[name]
        print(f"{name:20} {len(v):5d} {med(v):11.2f} {sum(v) / len(v):12.2f} {med(wall[name]):12.2f}")
    flow_ms = sum(sum(cpu[n]) / len(cpu[n]) for n in FLOW_REQUESTS)
    health_ms = sum(cpu["health"]) / len(cpu["health"])
    print(f"per flow: {flow_ms:.1f} ms of this process ({flow_ms / len(FLOW_REQUESTS):.2f} per request, "
          f"{flow_ms / len(FLOW_REQUESTS) / health_ms:.1f}× a /health/), PostgreSQL backends {pg_ms:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flows", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--drivers", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--user", default="ops")
    p.add_argument("--password", default="ops")
    p.add_argument("--pyspy", default=None, metavar="PATH", help="write py-spy raw samples (--gil) of the flows here")
    p.add_argument("--pyspy-bin", default="py-spy")
    args = p.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    machine_state("machine before")
    consumer = subprocess.Popen([sys.executable, "manage.py", "consume_fixes", "--consumer", f"cpu-bench-{os.getpid()}"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(1.0)
        if consumer.poll() is not None:
            raise SystemExit("consume_fixes exited at once")
        import django

        django.setup()
        asyncio.run(run(args))
    finally:
        stop_process(consumer)
    machine_state("machine after")


if __name__ == "__main__":
    main()
