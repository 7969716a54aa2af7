#!/usr/bin/env python
"""Offer flow load test: create a delivery, let dispatch offer it, accept it as the offered
driver, walk it through pickup and drop-off. Repeats with C flows in flight for T seconds.

On this machine only (loopback targets). Without `--base` it starts its own server on a free
port (uvicorn config.asgi --workers 2 and one `manage.py consume_fixes`) and stops it after;
with `--base URL` it uses a server that is already up. It prints the machine's state, logs in
as ops, creates K drivers around a random spot far from the demo city, gives each a fix and
resumes it, measures the same server's GET /health/ with wrk (`--health-seconds`), then runs
the flows and prints flows/s, requests/s and their ratio to /health/, per-request latency
percentiles by step, errors, and CPU per process group over the run.

    .venv/bin/python bench/offer_flow.py --drivers 60 --seconds 20 --concurrency 16
    .venv/bin/python bench/offer_flow.py --base http://127.0.0.1:8000
    .venv/bin/python bench/offer_flow.py --ops-sockets 2   # with two ops consoles open

The flows go through bench/rawhttp.py (a keep-alive client cheap enough that the client is not
what is measured); `--client httpx` uses httpx as before; `--client wrk` runs them in wrk with
bench/offer_flow.lua (one thread and one connection a flow in flight; ~3 % of a core, the asyncio
client ~5 %: a second client, in C, to show the figures are the server's). wrk stops at
the deadline with the flows in flight cut off (their drivers stay busy: they cannot end their
shift); the asyncio clients finish them. Drivers end their shift afterwards (they stay in the
database, as do the delivered deliveries).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from datetime import datetime
import uuid
from collections import Counter, defaultdict

import httpx
from websockets.asyncio.client import connect as ws_connect

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import CpuMeter, Server, format_cpu, health_baseline, machine_state, refuse_non_loopback  # noqa: E402
from rawhttp import HttpError, RawHttp  # noqa: E402

TARGET_RATIO, TARGET_P99_MS = 0.3, 100.0


class Response:
    """What the flows read of a response: status_code, json(), text."""

    def __init__(self, status: int, body: bytes):
        self.status_code, self.content = status, body

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def raise_for_status(self):
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.text[:300]}")


class RawClient:
    """httpx.AsyncClient's request/get/post, as far as this bench uses them, over RawHttp."""

    def __init__(self, base: str, connections: int, timeout: float = 30):
        self.http = RawHttp(base, connections, timeout=timeout)

    async def __aenter__(self):
        await self.http.open()
        return self

    async def __aexit__(self, *exc):
        await self.http.close()

    async def request(self, method, url, headers=None, json=None):
        h = dict(headers or {})
        body = b""
        if json is not None:
            body = __import__("json").dumps(json).encode()
            h["Content-Type"] = "application/json"
        try:
            status, data = await self.http.request(method, url, headers=h, body=body)
        except HttpError as exc:
            raise httpx.TransportError(str(exc)) from exc
        return Response(status, data)

    async def get(self, url, headers=None):
        return await self.request("GET", url, headers=headers)

    async def post(self, url, headers=None, json=None):
        return await self.request("POST", url, headers=headers, json=json)

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
        if step == "delivery-completed":  # the app's fix at the door: the drop-off geofence judges by it
            r = await run.call("location", "POST", f"/v2/drivers/{driver_id}/location", h, body["dropoffLocation"])
            if r is None or r.status_code != 200:
                return
        r = await run.call(step, "POST", f"/v2/drivers/{driver_id}/deliveries/{delivery['id']}/{step}", h, {})
        if r is None or r.status_code != 200:
            return
    run.flows += 1


def wrk_flows(run: Run, base: str, tokens: dict[str, str], centre, args) -> tuple[float, float]:
    """The flows through wrk and bench/offer_flow.lua: one connection a thread, one flow in
    flight a connection. Fills `run` as `one_flow` does; returns (seconds, wrk's CPU seconds)."""
    with tempfile.NamedTemporaryFile("w", prefix="offer-flow-", suffix=".txt", delete=False) as f:
        f.write(f"run {uuid.uuid4().hex[:12]}\nops {run.ops['Authorization'][6:]}\ncentre {centre[0]!r} {centre[1]!r}\n")
        f.writelines(f"driver {driver_id} {token}\n" for driver_id, token in tokens.items())
    try:
        result, _ = benchlib.run_wrk(base, seconds=args.seconds, threads=args.concurrency, connections=args.concurrency,
                                     lua_args=[f.name], timeout_s=30, script=benchlib.BENCH / "offer_flow.lua")
    finally:
        os.unlink(f.name)
    data = result.raw
    order = ["create", "cancel", "offers", "accept", *STEPS[:-1], "location", STEPS[-1]]
    for name in sorted(data["steps"], key=lambda n: order.index(n) if n in order else len(order)):
        run.lat[name] = [v / 1000 for v in data["steps"][name]]
    run.flows, run.unassigned = data["flows"], data["unassigned"]
    for key, count in data["unexpected"].items():
        run.status[key] += count
    if data["bad_bodies"]:
        run.samples["wrk"] = data["bad_bodies"][:600]
    for kind, count in result.socket_errors.items():
        run.status[f"socket:{kind}"] += count
    return result.seconds, result.cpu_s


async def main(args, base: str, server_pids: list[int], consumer_pids: list[int]) -> int:
    rng = random.Random(args.seed)
    centre = (rng.uniform(-40, 40), rng.uniform(-140, 140))
    if args.client in ("raw", "wrk"):  # (wrk: the set-up goes through rawhttp)
        client_cm = RawClient(base, args.concurrency * 2)
    else:
        limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
        client_cm = httpx.AsyncClient(base_url=base, timeout=30, limits=limits)
    async with client_cm as client:
        r = await client.post("/v2/auth/token", json={"username": args.user, "password": args.password})
        r.raise_for_status()
        run = Run(client, r.json()["token"])
        print(f"setting up {args.drivers} drivers around {centre[0]:.3f},{centre[1]:.3f} ...", flush=True)
        tokens = await setup_drivers(run, args.drivers, centre, rng)
        if args.wait_quiet:
            print(f"waiting for a quiet machine: {await asyncio.to_thread(benchlib.wait_quiet, args.wait_quiet)}", flush=True)
            machine_state("machine at the start of the measurement")
        health = await asyncio.to_thread(health_baseline, base, seconds=args.health_seconds, threads=min(2, args.concurrency),
                                         connections=args.concurrency)

        ops_events, ops_lag = [0], []
        ops_sockets, readers = [], []
        if args.ops_sockets:
            ws_base = base.replace("http", "ws", 1)
            ops_sockets = [await ws_connect(f"{ws_base}/ws/ops/?token={run.ops['Authorization'][6:]}", max_size=2**22)
                           for _ in range(args.ops_sockets)]

            async def read(sock):
                async for frame in sock:
                    ops_events[0] += 1
                    event = json.loads(frame)
                    if event.get("type") == "delivery_status_changed":  # (same clock: the server is here)
                        changed = datetime.fromisoformat(event["changedAt"].replace("Z", "+00:00")).timestamp()
                        ops_lag.append((time.time() - changed) * 1000)

            readers = [asyncio.create_task(read(sock)) for sock in ops_sockets]

        # (the stream consumer this bench started is a child of it: a group of its own, named first)
        meter = CpuMeter({"uvicorn": server_pids, "consume_fixes": consumer_pids, "bench (this)": [os.getpid()]})
        extra_cpu = {}
        if args.client == "wrk":
            meter.add("wrk", [])  # (its CPU comes from rusage once it has ended)
            before = meter.snapshot()
            elapsed, extra_cpu["wrk"] = await asyncio.to_thread(wrk_flows, run, base, tokens, centre, args)
            after = meter.snapshot()
        else:
            deadline = time.perf_counter() + args.seconds

            async def worker():
                while time.perf_counter() < deadline:
                    await one_flow(run, tokens, centre, rng)

            before = meter.snapshot()
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            elapsed = time.perf_counter() - start
            after = meter.snapshot()
        for sock in ops_sockets:
            await sock.close()
        await asyncio.gather(*readers, return_exceptions=True)

        ended = 0
        for driver_id, token in tokens.items():
            r = await client.post(f"/v2/drivers/{driver_id}/availability/end-shift", headers={"Authorization": f"Token {token}"})
            ended += r.status_code == 200
    after_state = machine_state("machine after")

    requests = sum(len(v) for v in run.lat.values())
    rate = requests / elapsed
    ratio = rate / health.ok_rate if health.ok_rate else float("nan")
    print(f"\noffer flow: {args.concurrency} flows in flight, {args.drivers} drivers, {elapsed:.1f} s, {args.client} client, against {base}")
    print(f"flows completed: {run.flows} = {run.flows / elapsed:.1f} flows/s ({rate:.0f} req/s; "
          f"{run.unassigned} deliveries found nobody free)")
    print(f"GET /health/: {health.ok_rate:,.0f} req/s (wrk -t{min(2, args.concurrency)} -c{args.concurrency})  →  offer-flow req/s ÷ health req/s = {ratio:.2f}"
          f"  (target ≥ {TARGET_RATIO})")
    print(f"{'request':20} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    everything = []
    for name, values in run.lat.items():
        everything += values
        print(f"{name:20} {len(values):6d} {pct(values, 50):8.1f} {pct(values, 95):8.1f} {pct(values, 99):8.1f}")
    print(f"{'all':20} {len(everything):6d} {pct(everything, 50):8.1f} {pct(everything, 95):8.1f} {pct(everything, 99):8.1f}")
    if args.ops_sockets:
        print(f"ops consoles: {args.ops_sockets} sockets on /ws/ops/ open through the run, {ops_events[0]:,} events received")
        print(f"  delivery_status_changed, its changedAt → the ops socket (ms, n={len(ops_lag)}): p50 {pct(ops_lag, 50):.1f}  "
              f"p95 {pct(ops_lag, 95):.1f}  p99 {pct(ops_lag, 99):.1f}  max {max(ops_lag, default=float('nan')):.1f}")
    errors = {k: v for k, v in run.status.items() if not k.endswith((":200", ":201"))}
    print("errors:", errors or "none")
    for name, sample in run.samples.items():
        print(f"  first {name} error: {sample}")
    print(f"CPU over the run (% of one core; machine: % of all {benchlib.NPROC} cores): {format_cpu(meter.report(before, after, extra_cpu))}")
    print(f"machine time by kind: {CpuMeter.split(before, after)}")
    print(f"load average after {after_state['loadavg']}; {ended}/{len(tokens)} bench drivers ended their shift")
    worst = max((pct(v, 99) for v in run.lat.values()), default=float("nan"))
    met = ratio >= TARGET_RATIO and worst < TARGET_P99_MS
    print(f"target: ≥ {TARGET_RATIO} of /health/, every request's p99 < {TARGET_P99_MS:.0f} ms at {args.concurrency} in flight: "
          f"{'met' if met else 'not met'} (worst p99 {worst:.1f} ms)")
    return 1 if errors else 0


def entry(args) -> int:
    benchlib.ensure_wrk()
    machine_state("machine before")
    server = None
    try:
        if args.base:
            refuse_non_loopback(args.base)
            base = args.base
            server_pids = benchlib.uvicorn_pids(int(base.rsplit(":", 1)[1].split("/")[0]))
        else:
            server = Server(workers=args.workers, consumers=1)
            server.start()
            base, server_pids = server.base, server.web_pids()
        consumers = [p.pid for p in server.consumer_procs] if server else []
        return asyncio.run(main(args, base, server_pids, consumers))
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: clean up and stop the server first
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="a running server (loopback only); default: start one here")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers of the server started here")
    p.add_argument("--user", default="ops")
    p.add_argument("--password", default="ops")
    p.add_argument("--drivers", type=int, default=60)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--health-seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--client", choices=("raw", "httpx", "wrk"), default="raw",
                   help="raw: bench/rawhttp.py (asyncio); wrk: bench/offer_flow.lua, one wrk thread and connection a flow")
    p.add_argument("--ops-sockets", type=int, default=0,
                   help="ops console sockets (/ws/ops/) kept open through the flows: the ops group's events then go out")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="after setup, wait up to this long for the machine to be quiet (< 10 %% busy, no pytest)")
    a = p.parse_args()
    if not (0 < a.seconds <= 600 and 1 <= a.concurrency <= 256 and 1 <= a.drivers <= 2000):
        p.error("--seconds 0..600, --concurrency 1..256, --drivers 1..2000")
    sys.exit(entry(a))
