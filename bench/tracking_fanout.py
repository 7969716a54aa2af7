#!/usr/bin/env python
"""Customer tracking fan-out: S customer sockets on S active deliveries, their drivers posting
fixes at a set rate; end-to-end latency from the POST to the customer's socket.

Against a server that is already up, on this machine only (loopback targets). As ops it
creates S drivers and S deliveries around a random spot far from the demo city (so the demo's
own dispatching leaves them alone), offers delivery i to driver i, accepts as the driver, and
opens `/ws/track/<id>/?token=` for every delivery (the token from `trackingUrl`). Then each
driver posts a fix every `--fix-interval` seconds (phases spread evenly) for `--seconds`.

For every accepted fix it waits for the `delivery_location_updated` with that fix's time on
that delivery's socket: latency = socket receive − POST start (one clock, this process).
A fix whose event has not arrived `--grace` seconds after the run is a drop. CPU is read from
/proc over the measured window: the server (the uvicorn process listening on the base URL's
port and its children, or `--server-pid`), PostgreSQL, Redis, this client, and the machine.
Afterwards the deliveries are cancelled and the drivers end their shift (they stay in the DB).

    .venv/bin/python bench/tracking_fanout.py --base http://127.0.0.1:8127 --sockets 500 --seconds 20

Prints p50/p95/p99/max latency, drops, achieved fix rate, ETA events seen and CPU. Exit 1 on
drops or errors, 2 when setup failed. Standard library plus httpx and websockets.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

import httpx
from websockets.asyncio.client import connect as ws_connect

sys.path.insert(0, os.path.dirname(__file__))
from location_ingest import gather_bounded, refuse_non_loopback  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- /proc


def _proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def server_pids(port: int, explicit: list[int]) -> list[int]:
    """The uvicorn process serving `port` (`--port N` on its command line) and its descendants."""
    roots = set(explicit)
    if not roots:
        for pid in _all_pids():
            args = _cmdline(pid)
            if any("uvicorn" in a for a in args) and (
                ("--port" in args and args[args.index("--port") + 1:][:1] == [str(port)]) or f"--port={port}" in args
            ):
                roots.add(pid)
    pids = set(roots)
    changed = True
    while changed:
        changed = False
        for pid in _all_pids():
            if pid not in pids and _ppid(pid) in pids:
                pids.add(pid)
                changed = True
    return sorted(pids)


def machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class CpuMeter:
    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups

    def snapshot(self) -> dict:
        return {name: sum(_proc_ticks(p) for p in pids) for name, pids in self.groups.items()} | {
            "_machine": machine_ticks(), "_t": time.perf_counter()
        }

    def report(self, before: dict, after: dict) -> dict[str, float]:
        elapsed = after["_t"] - before["_t"]
        out = {name: (after[name] - before[name]) / CLK_TCK / elapsed * 100 for name in self.groups}
        busy = after["_machine"][0] - before["_machine"][0]
        total = after["_machine"][1] - before["_machine"][1]
        out["machine (all cores)"] = busy / total * 100 if total else float("nan")
        return out


# ---------------------------------------------------------------------------- the run


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


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


class Pair:
    def __init__(self, n: int, driver_id: str, driver_token: str, lat: float, lon: float):
        self.n, self.driver_id, self.driver_token, self.lat, self.lon = n, driver_id, driver_token, lat, lon
        self.delivery_id = ""
        self.tracking_token = ""

    def auth(self) -> dict:
        return {"Authorization": f"Token {self.driver_token}"}


class Bench:
    def __init__(self, args, client: httpx.AsyncClient, ops_token: str, rng: random.Random):
        self.args, self.client, self.rng = args, client, rng
        self.ops = {"Authorization": f"Token {ops_token}"}
        self.run_id = f"{int(time.time()) % 1000000:06d}-{rng.randrange(1000):03d}"
        self.centre = (rng.uniform(-30, 30), rng.uniform(-120, 120))  # far from the demo city
        self.sent: dict[tuple[str, datetime], float] = {}
        self.latencies: list[float] = []
        self.post_latencies: list[float] = []
        self.late_or_unknown = 0
        self.statuses: Counter = Counter()
        self.exceptions: Counter = Counter()
        self.ignored = 0
        self.eta_events = 0
        self.socket_errors: Counter = Counter()
        self.measuring = False

    async def setup_pair(self, n: int) -> Pair:
        c, ops = self.client, self.ops
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

    async def socket(self, pair: Pair, ready: asyncio.Event, opened: list, stop: asyncio.Event) -> None:
        scheme = "wss" if self.args.base.startswith("https") else "ws"
        host = urlsplit(self.args.base).netloc
        url = f"{scheme}://{host}/ws/track/{pair.delivery_id}/?token={pair.tracking_token}"
        try:
            async with ws_connect(url, open_timeout=30, max_queue=None, ping_interval=None) as ws:
                snapshot = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if snapshot.get("type") != "delivery_snapshot":
                    raise RuntimeError(f"first message {snapshot.get('type')}")
                opened.append(pair)
                if len(opened) == self.args.sockets:
                    ready.set()
                while not stop.is_set():
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.5)
                    except asyncio.TimeoutError:
                        continue
                    now = time.perf_counter()
                    msg = json.loads(raw)
                    if msg.get("type") == "delivery_location_updated":
                        start = self.sent.pop((msg["deliveryId"], parse_time(msg["updatedAt"])), None)
                        if start is None:
                            self.late_or_unknown += 1
                        else:
                            self.latencies.append((now - start) * 1000)
                    elif msg.get("type") == "delivery_eta_updated":
                        self.eta_events += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            self.socket_errors[type(exc).__name__] += 1
            opened.append(None)
            if len(opened) == self.args.sockets:
                ready.set()

    async def driver_loop(self, pair: Pair, start: float, deadline: float, sem: asyncio.Semaphore) -> None:
        interval = self.args.fix_interval
        t = start + (pair.n % max(1, self.args.sockets)) / self.args.sockets * interval
        while t < deadline:
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t += interval
            pair.lat += self.rng.uniform(-0.0003, 0.0003)
            pair.lon += self.rng.uniform(-0.0003, 0.0003)
            recorded = iso_now()
            body = {"lat": round(pair.lat, 7), "lon": round(pair.lon, 7), "accuracyMeters": 8, "speed": 6.5,
                    "heading": 90, "recordedAt": recorded}
            async with sem:
                key = (pair.delivery_id, parse_time(recorded))
                t_start = self.sent[key] = time.perf_counter()
                try:
                    r = await self.client.post(f"/v2/drivers/{pair.driver_id}/location", json=body, headers=pair.auth())
                except httpx.HTTPError as exc:
                    self.exceptions[type(exc).__name__] += 1
                    self.sent.pop(key, None)
                    continue
                self.post_latencies.append((time.perf_counter() - t_start) * 1000)
            self.statuses[r.status_code] += 1
            if r.status_code != 200 or r.json().get("accepted") is not True:
                self.sent.pop(key, None)
                self.ignored += r.status_code == 200

    async def teardown(self, pairs: list[Pair]) -> None:
        sem = asyncio.Semaphore(self.args.setup_concurrency)

        async def one(pair: Pair):
            async with sem:
                try:
                    await self.client.post(f"/v2/deliveries/{pair.delivery_id}/cancel", headers=self.ops,
                                           json={"reason": "tracking bench finished"})
                    await self.client.post(f"/v2/drivers/{pair.driver_id}/availability/end-shift", headers=pair.auth())
                except httpx.HTTPError:
                    pass

        await asyncio.gather(*(one(p) for p in pairs))


async def main(args) -> int:
    refuse_non_loopback(args.base)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.sockets + args.concurrency + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    rng = random.Random(args.seed)
    port = urlsplit(args.base).port or 80
    servers = server_pids(port, args.server_pid)
    groups = {
        "server": servers,
        "postgres": [p for p in _all_pids() if _comm(p) in ("postgres", "postmaster")],
        "redis": [p for p in _all_pids() if _comm(p) == "redis-server"],
        "bench client": [os.getpid()],
    }
    meter = CpuMeter(groups)
    limits = httpx.Limits(max_connections=args.concurrency + args.setup_concurrency,
                          max_keepalive_connections=args.concurrency + args.setup_concurrency)
    async with httpx.AsyncClient(base_url=args.base, limits=limits, timeout=args.timeout) as client:
        t0 = time.perf_counter()
        try:
            r = await client.post("/v2/auth/token", json={"username": args.user, "password": args.password})
            ops_token = expect(r, 200, "login")["token"]
            bench = Bench(args, client, ops_token, rng)
            pairs = await gather_bounded(args.setup_concurrency, [lambda n=n: bench.setup_pair(n) for n in range(args.sockets)])
        except (SetupFailed, httpx.HTTPError) as exc:
            print(f"setup failed: {exc}", file=sys.stderr)
            return 2
        print(f"setup: {len(pairs)} drivers assigned to {len(pairs)} deliveries ({time.perf_counter() - t0:.1f} s); "
              f"server pids {servers or 'not found'}")

        ready, stop, opened = asyncio.Event(), asyncio.Event(), []
        t1 = time.perf_counter()
        sockets = []
        for i, pair in enumerate(pairs):  # open them at a bounded pace
            sockets.append(asyncio.ensure_future(bench.socket(pair, ready, opened, stop)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(ready.wait(), 120)
        except asyncio.TimeoutError:
            pass
        connected = sum(1 for p in opened if p is not None)
        print(f"sockets: {connected}/{len(pairs)} connected with a snapshot ({time.perf_counter() - t1:.1f} s)"
              + (f", errors {dict(bench.socket_errors)}" if bench.socket_errors else ""))

        sem = asyncio.Semaphore(args.concurrency)
        before = meter.snapshot()
        start = time.perf_counter()
        deadline = start + args.seconds
        await asyncio.gather(*(bench.driver_loop(p, start, deadline, sem) for p in pairs))
        after = meter.snapshot()
        elapsed = time.perf_counter() - start
        grace_end = time.perf_counter() + args.grace
        while bench.sent and time.perf_counter() < grace_end:
            await asyncio.sleep(0.1)
        drops = len(bench.sent)
        stop.set()
        await asyncio.gather(*sockets, return_exceptions=True)
        await bench.teardown(pairs)

    lat = sorted(bench.latencies)
    accepted = len(lat) + drops
    print(f"fixes: {sum(bench.statuses.values())} posted in {elapsed:.1f} s "
          f"({sum(bench.statuses.values()) / elapsed:.0f}/s; target {args.sockets / args.fix_interval:.0f}/s), "
          f"statuses {dict(bench.statuses)}" + (f", exceptions {dict(bench.exceptions)}" if bench.exceptions else "")
          + (f", not accepted {bench.ignored}" if bench.ignored else ""))
    print(f"POST → customer socket (ms): p50 {pct(lat, 50):.1f}  p95 {pct(lat, 95):.1f}  p99 {pct(lat, 99):.1f}  "
          f"max {lat[-1] if lat else float('nan'):.1f}  (n={len(lat)})")
    post = sorted(bench.post_latencies)
    print(f"POST response (ms):         p50 {pct(post, 50):.1f}  p95 {pct(post, 95):.1f}  p99 {pct(post, 99):.1f}")
    print(f"drops: {drops} of {accepted} accepted fixes ({drops / accepted * 100 if accepted else 0:.2f} %); "
          f"unmatched events {bench.late_or_unknown}; ETA events {bench.eta_events}; socket errors {dict(bench.socket_errors) or 0}")
    cpu = meter.report(before, after)
    print("CPU over the run (% of one core; machine: % of all cores): "
          + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    return 1 if drops or bench.exceptions or bench.socket_errors or any(s != 200 for s in bench.statuses) else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--user", default="ops")
    p.add_argument("--password", default="ops")
    p.add_argument("--sockets", type=int, default=500, help="S: deliveries, drivers and customer sockets")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--fix-interval", type=float, default=5.0, help="seconds between two fixes of one driver")
    p.add_argument("--concurrency", type=int, default=64, help="location POSTs in flight at most")
    p.add_argument("--setup-concurrency", type=int, default=16)
    p.add_argument("--grace", type=float, default=3.0, help="seconds to wait for the last events")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--server-pid", type=int, action="append", default=[], help="measure these pids (and children)")
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
