"""Fault scenarios against a running cluster (`make cluster`) or `make run` stack: each drives a
steady load of real writes, injects one fault, records every request's outcome, then checks
that every acknowledged (2xx) write is in PostgreSQL and measures recovery.

Scenarios (in this order by default):
  baseline      no fault (what the load does on its own)
  kill-worker   kill -9 of one Celery worker's main process (supervisord restarts it)
  kill-beat     kill -9 of celery beat
  kill-web      kill -9 of one web instance's uvicorn, load through the load balancer
  redis-pause   CLIENT PAUSE <--pause-ms> ALL on Redis              (disruptive, gated)
  pg-restart    pg_ctlcluster <version> <cluster> restart            (disruptive, gated)

The two disruptive ones stall or break every other user of this Redis / PostgreSQL (other
people's test runs), so they run only while the file --gate (/tmp/faults-allowed) exists,
checked right before each; when it is absent the script polls every 20 s for up to
--gate-wait seconds, then skips the scenario and says so. Killing the cluster's own processes
is always done.

The load (closed loop, paced to --rps requests/s in all), through --base (the load balancer):
  - deliveries: POST /v2/deliveries as an integration user (autoDispatch false), then the same
    user cancels it (POST /v2/deliveries/{id}/cancel);
  - fixes: POST /v2/drivers/{id}/location for --drivers offline drivers, each fix newer than
    the last (the fast lane: Redis, then the stream consumer writes PostgreSQL);
  - flows: ops creates a delivery at a flow driver's spot and offers it to the driver; the
    driver accepts and walks it to delivery-completed, sending a fix at the drop-off first
    (the drop-off geofence). A flow whose step fails is abandoned
    (cancelled) and the next one starts with a new driver;
  - an expiry probe: every --probe-every s an offer with expiresInSeconds=10 to a driver who
    never answers; the time from its expiresAt to EXPIRED in PostgreSQL is the expiry lag
    (the per-offer Celery task at expiresAt, or the 5 s sweep from beat).
Every driver and delivery sits at its own random spot far from the demo city, so the
dispatch engine never offers bench work to anyone else.

After the load: wait (≤ --recover-timeout s) until the killed process runs again under a new
pid, the load balancer's /health/ready and /health/jobs answer 200; then check in PostgreSQL
(directly, not through PgBouncer or the API): every 201 delivery exists, every acknowledged
cancel left it cancelled; every acknowledged
fix is in its driver's row (location_recorded_at at least the fix's recordedAt, after the
stream consumer has caught up, ≤ 30 s); every acknowledged flow step left the delivery at
least that far (an accepted offer has its assignment); every 201 offer exists.

    make cluster DETACH=1
    .venv/bin/python bench/faults.py                                   # every scenario
    .venv/bin/python bench/faults.py --scenarios kill-web,kill-worker --seconds 20
    .venv/bin/python bench/faults.py --base http://127.0.0.1:8000 \\
        --supervisor-sock var/run/supervisord-8000.sock --worker worker --web web:web-0   # make run

Prints one line per scenario: requests, 2xx, failures by status ("conn": no response),
time from the fault to the first success and to the last failure, until the killed process
ran again (and, for a web instance, until HAProxy had it back in rotation), when
/health/ready and /health/jobs (polled every 0.5 s through the load balancer) were not 200,
the worst offer expiry lag, and acknowledged writes checked / lost. Exit 1 when any
acknowledged write is lost or a 500 was seen.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402

from benchlib import ROOT, machine_state, refuse_non_loopback  # noqa: E402
from cluster_client import (  # noqa: E402
    ApiError, Conn, ConnectionFailed, delivery_body, driver_create, expect, haproxy_stat, iso_now, login, near, random_spot,
)

SCENARIOS = ["baseline", "kill-worker", "kill-beat", "kill-web", "redis-pause", "pg-restart"]
DISRUPTIVE = {"redis-pause", "pg-restart"}
FLOW_STEPS = ["pickup-started", "pickup-completed", "delivery-started", "delivery-completed"]
# delivery status after each acknowledged write of a flow, and their order
STATUS_AFTER = {"accept": "assigned", "pickup-started": "assigned", "pickup-completed": "picked_up",
                "delivery-started": "in_transit", "delivery-completed": "delivered"}
STATUS_RANK = {"ready": 0, "assigned": 1, "picked_up": 2, "in_transit": 3, "delivered": 4}


def parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Outcome:
    kind: str
    sent: float  # time.monotonic()
    done: float
    status: int | str  # HTTP status or "conn"
    error: str = ""  # what the client saw when there was no response


@dataclass
class Run:
    """Everything one scenario recorded."""
    outcomes: list[Outcome] = field(default_factory=list)
    deliveries: dict[str, str] = field(default_factory=dict)  # acknowledged: sellerOrderId -> id
    deliveries_unacked: list[str] = field(default_factory=list)  # sellerOrderIds without a 201
    fixes: dict[str, datetime] = field(default_factory=dict)  # driver id -> newest acknowledged recordedAt
    cancels: set[str] = field(default_factory=set)  # deliveries whose cancel was acknowledged
    leftovers: set[str] = field(default_factory=set)  # bench deliveries to cancel afterwards
    offers: set[str] = field(default_factory=set)  # acknowledged offer ids
    flow_steps: dict[str, tuple[str, str]] = field(default_factory=dict)  # delivery id -> (last acked step, driver id)
    probes: list[tuple[str, datetime]] = field(default_factory=list)  # (offer id, expiresAt)
    health: list[tuple[float, str, int | str]] = field(default_factory=list)  # (t, path, status)
    health_messages: Counter = field(default_factory=Counter)  # (path, status, message) of non-200s
    fault_at: float | None = None
    fault_note: str = ""
    stop: bool = False


class Load:
    def __init__(self, args, run: Run, ops_token: str, integ_token: str, fix_drivers: list[dict], probe_driver: dict):
        self.args, self.run = args, run
        self.ops_token, self.integ_token = ops_token, integ_token
        self.fix_drivers, self.probe_driver = fix_drivers, probe_driver
        self.tasks = args.delivery_tasks + args.fix_tasks + args.flow_tasks
        self.period = self.tasks / args.rps

    async def call(self, conn: Conn, kind: str, method: str, path: str, body=None):
        """One request, recorded; the Response, or None when there was none."""
        t0 = time.monotonic()
        try:
            r = await conn.request(method, path, body)
        except ConnectionFailed as exc:
            self.run.outcomes.append(Outcome(kind, t0, time.monotonic(), "conn", f"{path}: {exc}"))
            return None
        self.run.outcomes.append(Outcome(kind, t0, time.monotonic(), r.status))
        return r

    async def pace(self, next_at: float) -> float:
        now = time.monotonic()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        return max(next_at, time.monotonic() - self.period) + self.period

    async def deliveries(self):
        c = Conn(self.args.base, token=self.integ_token, timeout=self.args.timeout)
        lat, lon = random_spot()
        next_at = time.monotonic() + random.uniform(0, self.period)
        while not self.run.stop:
            next_at = await self.pace(next_at)
            body = delivery_body(lat, lon, prefix="FLT")
            r = await self.call(c, "delivery", "POST", "/v2/deliveries", body)
            if r is None or r.status != 201:
                self.run.deliveries_unacked.append(body["sellerOrderId"])
                continue
            delivery_id = r.json()["id"]
            self.run.deliveries[body["sellerOrderId"]] = delivery_id
            # then the integration cancels it: a second write to check, and nothing is left
            # behind for the escalation check (a ready delivery escalates after 5 min)
            next_at = await self.pace(next_at)
            r = await self.call(c, "cancel", "POST", f"/v2/deliveries/{delivery_id}/cancel", {"reason": "faults bench"})
            if r is not None and r.status == 200:
                self.run.cancels.add(delivery_id)
            else:
                self.run.leftovers.add(delivery_id)
        c.close()

    async def fixes(self, mine: list[dict]):
        conns = {d["id"]: Conn(self.args.base, token=d["token"], timeout=self.args.timeout) for d in mine}
        next_at = time.monotonic() + random.uniform(0, self.period)
        i = 0
        while not self.run.stop:
            next_at = await self.pace(next_at)
            d = mine[i % len(mine)]
            i += 1
            recorded = iso_now()
            r = await self.call(conns[d["id"]], "fix", "POST", f"/v2/drivers/{d['id']}/location",
                                {**near(d["lat"], d["lon"], km=0.05), "accuracyMeters": 5, "recordedAt": recorded})
            if r is not None and r.status == 200 and r.json().get("accepted", True):
                self.run.fixes[d["id"]] = parse_ts(recorded)
        for c in conns.values():
            c.close()

    async def flows(self):
        ops = Conn(self.args.base, token=self.ops_token, timeout=self.args.timeout)
        next_at = time.monotonic() + random.uniform(0, self.period)
        drv, dc = None, None
        while not self.run.stop:
            if drv is None:
                lat, lon = random_spot()
                try:
                    drv = await driver_create(ops, lat, lon) | {"lat": lat, "lon": lon}
                except (ApiError, ConnectionFailed):
                    drv = None
                    await asyncio.sleep(0.5)
                    continue
                dc = Conn(self.args.base, token=drv["token"], timeout=self.args.timeout)
            ok = await self.flow(ops, dc, drv, next_at)
            next_at = time.monotonic()
            if not ok:  # abandoned: the next flow gets a new driver
                dc.close()
                drv = None
        ops.close()
        if dc:
            dc.close()

    async def flow(self, ops: Conn, dc: Conn, drv: dict, next_at: float) -> bool:
        next_at = await self.pace(next_at)
        body = delivery_body(drv["lat"], drv["lon"], prefix="FLW")
        r = await self.call(ops, "flow", "POST", "/v2/deliveries", body)
        if r is None or r.status != 201:
            self.run.deliveries_unacked.append(body["sellerOrderId"])
            return False
        delivery_id = r.json()["id"]
        self.run.deliveries[body["sellerOrderId"]] = delivery_id
        next_at = await self.pace(next_at)
        r = await self.call(ops, "flow", "POST", f"/v2/deliveries/{delivery_id}/offers", {"driverId": drv["id"], "expiresInSeconds": 60})
        if r is None or r.status != 201:
            await self.abandon(ops, delivery_id)
            return False
        offer_id = r.json()["offerId"]
        self.run.offers.add(offer_id)
        next_at = await self.pace(next_at)
        r = await self.call(dc, "flow", "POST", f"/v2/drivers/{drv['id']}/offers/{offer_id}/accept", {})
        if r is None or r.status != 200:
            await self.abandon(ops, delivery_id)
            return False
        self.run.flow_steps[delivery_id] = ("accept", drv["id"])
        for step in FLOW_STEPS:
            if self.run.stop:
                await self.abandon(ops, delivery_id)
                return False
            next_at = await self.pace(next_at)
            if step == "delivery-completed":  # the app's fix at the door: the drop-off geofence judges by it
                r = await self.call(dc, "flow", "POST", f"/v2/drivers/{drv['id']}/location", body["dropoffLocation"])
                if r is None or r.status != 200:
                    await self.abandon(ops, delivery_id)
                    return False
                drv["lat"], drv["lon"] = body["dropoffLocation"]["lat"], body["dropoffLocation"]["lon"]  # the next pickup
            r = await self.call(dc, "flow", "POST", f"/v2/drivers/{drv['id']}/deliveries/{delivery_id}/{step}", {})
            if r is None or r.status != 200:
                await self.abandon(ops, delivery_id)
                return False
            self.run.flow_steps[delivery_id] = (step, drv["id"])
        return True

    async def abandon(self, ops: Conn, delivery_id: str) -> None:
        """Cancel a flow's delivery (frees its driver); not recorded: cleanup, not load."""
        self.run.leftovers.add(delivery_id)
        for _ in range(3):
            try:
                r = await ops.post(f"/v2/deliveries/{delivery_id}/cancel", {"reason": "faults bench: flow abandoned"})
                if r.status in (200, 409):
                    return
            except ConnectionFailed:
                pass
            await asyncio.sleep(0.5)

    async def probes(self):
        """An offer that nobody answers, every --probe-every s; its expiry is measured later."""
        ops = Conn(self.args.base, token=self.ops_token, timeout=self.args.timeout)
        d = self.probe_driver
        while not self.run.stop:
            try:
                r = await ops.post("/v2/deliveries", delivery_body(d["lat"], d["lon"], prefix="PRB"))
                if r.status == 201:
                    delivery_id = r.json()["id"]
                    self.run.leftovers.add(delivery_id)
                    r = await ops.post(f"/v2/deliveries/{delivery_id}/offers", {"driverId": d["id"], "expiresInSeconds": 10})
                    if r.status == 201:
                        self.run.probes.append((r.json()["offerId"], parse_ts(r.json()["expiresAt"])))
            except ConnectionFailed:
                pass
            for _ in range(int(self.args.probe_every * 10)):
                if self.run.stop:
                    break
                await asyncio.sleep(0.1)
        ops.close()

    def coroutines(self):
        per = max(1, len(self.fix_drivers) // max(1, self.args.fix_tasks))
        groups = [self.fix_drivers[i * per:(i + 1) * per] for i in range(self.args.fix_tasks)]
        return ([self.deliveries() for _ in range(self.args.delivery_tasks)]
                + [self.fixes(g) for g in groups if g]
                + [self.flows() for _ in range(self.args.flow_tasks)]
                + [self.probes()])


# ----------------------------------------------------------------------------- faults


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=5)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(self.unix_path)


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str):
        super().__init__()
        self.unix_path = path

    def make_connection(self, host):
        return _UnixConnection(self.unix_path)


class Supervisor:
    """supervisord's XML-RPC interface on its unix socket (what supervisorctl uses), polled
    in-process: a supervisorctl subprocess ten times a second would load the machine."""

    def __init__(self, sock: str):
        self.sock = sock

    def info(self, name: str) -> dict | None:
        try:
            proxy = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(self.sock))
            return proxy.supervisor.getProcessInfo(name)
        except (OSError, xmlrpc.client.Error):
            return None

    def pid(self, name: str) -> int | None:
        info = self.info(name)
        return info["pid"] if info and info["statename"] == "RUNNING" else None


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in descendants(k)]


def gate_open(args) -> bool:
    """True once the gate file exists (polling every 20 s up to --gate-wait s)."""
    deadline = time.monotonic() + args.gate_wait
    while True:
        if os.path.exists(args.gate):
            return True
        if time.monotonic() >= deadline:
            return False
        print(f"    waiting for {args.gate} (disruptive scenario) ...", flush=True)
        time.sleep(min(20, max(0.0, deadline - time.monotonic())))


async def wait_until(check, timeout: float, every: float = 0.2) -> float | None:
    """Seconds until `await check()` is true, or None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await check():
            return time.monotonic() - t0
        await asyncio.sleep(every)
    return None


@dataclass
class FaultResult:
    skipped: str = ""
    process: str = ""
    old_pid: int | None = None
    respawned: float | None = None  # s from the fault until supervisord started a new process
    process_back: float | None = None  # s from the fault until the process RUNNING under a new pid
    lb_back: float | None = None  # kill-web: s from the fault until HAProxy has the instance UP again


async def inject(name: str, args, sup: Supervisor, run: Run) -> FaultResult:
    res = FaultResult()
    if name in ("kill-worker", "kill-beat", "kill-web"):
        proc = {"kill-worker": args.worker, "kill-beat": args.beat, "kill-web": args.web}[name]
        pid = sup.pid(proc)
        if pid is None:
            res.skipped = f"{proc} is not RUNNING"
            return res
        kids = descendants(pid)
        run.fault_at = time.monotonic()
        os.kill(pid, 9)
        res.process, res.old_pid = proc, pid
        run.fault_note = f"kill -9 {proc} (pid {pid}; {len(kids)} child processes left to exit on their own)"
    elif name == "redis-pause":
        run.fault_at = time.monotonic()
        rc, out = await command("redis-cli", "-h", args.redis_host, "-p", str(args.redis_port), "CLIENT", "PAUSE", str(args.pause_ms), "ALL")
        run.fault_note = f"CLIENT PAUSE {args.pause_ms} ALL: {out}"
    elif name == "pg-restart":
        run.fault_at = time.monotonic()
        rc, out = await command("pg_ctlcluster", "--skip-systemctl-redirect", args.pg_version, args.pg_cluster, "restart")
        took = time.monotonic() - run.fault_at
        run.fault_note = f"pg_ctlcluster restart exit {rc} in {took:.1f} s {out[:200]}"
    return res


async def command(*argv: str) -> tuple[int, str]:
    """Run a command without blocking the event loop (the load keeps going meanwhile)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(errors="replace").strip()


def haproxy_server_status(sock: str, server: str) -> str | None:
    """HAProxy's status of `server` in backend web ("UP", "DOWN", "UP 1/2", ...)."""
    row = haproxy_stat(sock).get(server)
    return row[17] if row else None


async def process_back(sup: Supervisor, res: FaultResult, fault_at: float, timeout: float, args) -> None:
    if not res.process:
        return

    async def respawned():
        info = await asyncio.to_thread(sup.info, res.process)
        return bool(info and info["pid"] and info["pid"] != res.old_pid)

    async def running():
        pid = await asyncio.to_thread(sup.pid, res.process)
        return pid is not None and pid != res.old_pid

    if await wait_until(respawned, timeout, every=0.1) is not None:
        res.respawned = time.monotonic() - fault_at
    if await wait_until(running, timeout, every=0.1) is not None:
        res.process_back = time.monotonic() - fault_at
    if res.process == args.web and os.path.exists(args.haproxy_sock):
        server = args.web.split(":")[-1]

        async def up():
            return await asyncio.to_thread(haproxy_server_status, args.haproxy_sock, server) == "UP"

        if await wait_until(up, timeout, every=0.1) is not None:
            res.lb_back = time.monotonic() - fault_at


# ----------------------------------------------------------------------------- checks


def verify(run: Run, dsn: str, drain_timeout: float) -> dict:
    """Acknowledged writes missing from PostgreSQL, by kind; and unacknowledged ones applied."""
    lost: Counter = Counter()
    checked: Counter = Counter()
    with psycopg.connect(dsn, autocommit=True) as db, db.cursor() as cur:
        acked = list(run.deliveries.items())
        cur.execute("SELECT seller_order_id, id::text FROM dispatch_delivery WHERE seller_order_id = ANY(%s)",
                    ([s for s, _ in acked],))
        found = dict(cur.fetchall())
        for seller_order_id, delivery_id in acked:
            checked["delivery"] += 1
            if found.get(seller_order_id) != delivery_id:
                lost["delivery"] += 1
        cur.execute("SELECT count(*) FROM dispatch_delivery WHERE seller_order_id = ANY(%s)", (run.deliveries_unacked,))
        unacked_applied = cur.fetchone()[0]

        ids = list(run.cancels)
        cur.execute("SELECT count(*) FROM dispatch_delivery WHERE id::text = ANY(%s) AND status = 'cancelled'", (ids,))
        checked["cancel"] += len(ids)
        lost["cancel"] += len(ids) - cur.fetchone()[0]

        ids = list(run.offers)
        cur.execute("SELECT count(*) FROM driver_offers WHERE id::text = ANY(%s)", (ids,))
        checked["offer"] += len(ids)
        lost["offer"] += len(ids) - cur.fetchone()[0]

        for delivery_id, (step, driver_id) in run.flow_steps.items():
            checked["flow step"] += 1
            cur.execute("SELECT status FROM dispatch_delivery WHERE id = %s", (delivery_id,))
            row = cur.fetchone()
            cur.execute("SELECT count(*) FROM dispatch_assignment WHERE delivery_id = %s AND driver_id = %s", (delivery_id, driver_id))
            assigned = cur.fetchone()[0]
            want = STATUS_AFTER[step]
            status = row[0] if row else None
            # an abandoned flow is cancelled afterwards: then only the assignment row tells
            if not assigned or (status != "cancelled" and STATUS_RANK.get(status, -1) < STATUS_RANK[want]):
                lost["flow step"] += 1

        # Fixes reach PostgreSQL through the stream consumer: wait for it to catch up.
        pending = dict(run.fixes)
        deadline = time.monotonic() + drain_timeout
        while pending:
            cur.execute("SELECT id::text, location_recorded_at FROM dispatch_driver WHERE id::text = ANY(%s)", (list(pending),))
            for driver_id, recorded in cur.fetchall():
                if recorded is not None and recorded >= pending[driver_id]:
                    del pending[driver_id]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        checked["fix (newest per driver)"] += len(run.fixes)
        lost["fix (newest per driver)"] += len(pending)

        lags = []
        never = 0
        for offer_id, expires_at in run.probes:
            cur.execute("SELECT status, expired_at FROM driver_offers WHERE id = %s", (offer_id,))
            row = cur.fetchone()
            if row and row[0] == "EXPIRED" and row[1] is not None:
                lags.append((row[1] - expires_at).total_seconds())
            elif row and row[0] == "PENDING":
                never += 1
    return {"lost": lost, "checked": checked, "unacked_applied": unacked_applied, "expiry_lags": lags, "never_expired": never}


# ----------------------------------------------------------------------------- setup


def bench_integration_user(args) -> tuple[str, str]:
    """A login in the integrations group for the bench (created or its password reset)."""
    password = secrets.token_urlsafe(16)
    code = (
        "from django.contrib.auth import get_user_model; from django.contrib.auth.models import Group; "
        "from common.roles import INTEGRATIONS_GROUP; "
        f"u, _ = get_user_model().objects.get_or_create(username={args.integration_user!r}); "
        f"u.set_password({password!r}); u.save(); "
        "u.groups.add(Group.objects.get_or_create(name=INTEGRATIONS_GROUP)[0])"
    )
    env = {**os.environ, "DATABASE_URL": args.django_database_url, "DB_BEHIND_PGBOUNCER": "false"}
    subprocess.run([str(ROOT / ".venv/bin/python"), "manage.py", "shell", "-c", code], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    return args.integration_user, password


async def setup(args) -> tuple[str, str, list[dict], dict]:
    ops_token = await login(args.base, args.user, args.password)
    user, password = bench_integration_user(args)
    integ_token = await login(args.base, user, password)
    ops = Conn(args.base, token=ops_token)
    fix_drivers = []
    for _ in range(args.drivers):
        lat, lon = random_spot()
        fix_drivers.append(await driver_create(ops, lat, lon, available=False) | {"lat": lat, "lon": lon})
    lat, lon = random_spot()
    probe = await driver_create(ops, lat, lon) | {"lat": lat, "lon": lon}
    ops.close()
    return ops_token, integ_token, fix_drivers, probe


async def refresh_driver(args, d: dict) -> None:
    """A fresh fix and resume for the probe driver: after 10 min without a fix (a long wait for
    the gate) the stale-driver job has set it offline, and offers to it would be refused."""
    c = Conn(args.base, token=d["token"])
    try:
        await c.post(f"/v2/drivers/{d['id']}/location", {"lat": d["lat"], "lon": d["lon"], "accuracyMeters": 10, "recordedAt": iso_now()})
        await c.post(f"/v2/drivers/{d['id']}/availability/resume")
    except ConnectionFailed:
        pass
    finally:
        c.close()


async def cancel_leftovers(args, ops_token: str, run: Run) -> None:
    """Cancel what a scenario left open (probe deliveries, abandoned flows, failed cancels), so
    the escalation check does not turn them into support tickets later."""
    with psycopg.connect(args.dsn, autocommit=True) as db, db.cursor() as cur:
        cur.execute("SELECT id::text FROM dispatch_delivery WHERE id::text = ANY(%s) AND status NOT IN ('delivered', 'failed', 'cancelled')",
                    (list(run.leftovers),))
        ids = [r[0] for r in cur.fetchall()]
    ops = Conn(args.base, token=ops_token)
    for delivery_id in ids:
        try:
            await ops.post(f"/v2/deliveries/{delivery_id}/cancel", {"reason": "faults bench cleanup"})
        except ConnectionFailed:
            pass
    ops.close()


async def cleanup(args, ops_token: str) -> None:
    """End the shift of the bench's available drivers (the probe and flow drivers), so the
    demo database keeps no bench drivers that the stale-driver job would have to handle."""
    with psycopg.connect(args.dsn, autocommit=True) as db, db.cursor() as cur:
        cur.execute("SELECT id::text FROM dispatch_driver WHERE name LIKE 'Bench Driver %%' AND availability = 'available'")
        ids = [r[0] for r in cur.fetchall()]
    ops = Conn(args.base, token=ops_token)
    for driver_id in ids:
        try:
            await ops.post(f"/v2/drivers/{driver_id}/availability/end-shift")
        except ConnectionFailed:
            pass
    ops.close()


# ----------------------------------------------------------------------------- main


async def monitor(base: str, run: Run, done: asyncio.Event) -> None:
    """/health/ready and /health/jobs through the load balancer every 0.5 s (not counted as
    load), until `done`."""
    conns = {path: Conn(base, timeout=3) for path in ("/health/ready", "/health/jobs")}
    while not done.is_set():
        for path, c in conns.items():
            try:
                r = await c.get(path)
                status: int | str = r.status
                if r.status != 200:
                    try:
                        run.health_messages[(path, r.status, str(r.json().get("message", ""))[:300])] += 1
                    except ValueError:
                        run.health_messages[(path, r.status, r.body[:160].decode(errors="replace"))] += 1
            except ConnectionFailed as exc:
                status = "conn"
                run.health_messages[(path, "conn", str(exc)[:160])] += 1
            run.health.append((time.monotonic(), path, status))
        try:
            await asyncio.wait_for(done.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    for c in conns.values():
        c.close()


def health_window(run: Run, path: str, since: float) -> str:
    """How `path` did from `since` on: "200" throughout, or "<first>-<last> s" of its failures
    relative to the fault (or the start), and "never 200" when it did not recover."""
    seen = [(t, st) for t, p, st in run.health if p == path and t >= since]
    bad = [t for t, st in seen if st != 200]
    if not bad:
        return "200"
    ref = run.fault_at if run.fault_at is not None else since
    back = [t for t, st in seen if st == 200 and t > bad[-1]]
    out = f"{bad[0] - ref:+.1f}..{bad[-1] - ref:+.1f}"
    return out if back else out + " never 200"


async def scenario(name: str, args, sup: Supervisor, tokens) -> dict:
    ops_token, integ_token, fix_drivers, probe = tokens
    if name in DISRUPTIVE and not await asyncio.to_thread(gate_open, args):
        return {"name": name, "skipped": f"{args.gate} absent for {args.gate_wait:.0f} s"}
    run = Run()
    await refresh_driver(args, probe)
    load = Load(args, run, ops_token, integ_token, fix_drivers, probe)
    t_start = time.monotonic()
    done = asyncio.Event()
    watcher = asyncio.create_task(monitor(args.base, run, done))
    workers = [asyncio.create_task(c) for c in load.coroutines()]
    seconds = args.seconds if name != "baseline" else args.baseline_seconds
    await asyncio.sleep(args.fault_after if name != "baseline" else seconds)
    fault = FaultResult()
    back_task = None

    async def stop(reason: str) -> dict:
        run.stop = True
        await asyncio.gather(*workers)
        done.set()
        await watcher
        await cancel_leftovers(args, ops_token, run)
        return {"name": name, "skipped": reason}

    if name != "baseline":
        if name in DISRUPTIVE and not os.path.exists(args.gate):
            return await stop(f"{args.gate} disappeared before the fault")
        fault = await inject(name, args, sup, run)
        if fault.skipped:
            return await stop(fault.skipped)
        back_task = asyncio.create_task(process_back(sup, fault, run.fault_at, args.recover_timeout + seconds, args))
        await asyncio.sleep(max(0.0, t_start + seconds - time.monotonic()))
    run.stop = True
    await asyncio.gather(*workers)
    load_end = time.monotonic()

    # Recovery: the killed process again, then readiness and job liveness through the load
    # balancer (the monitor keeps recording).
    if back_task:
        await back_task

    async def healthy() -> bool:
        last = {}
        for _, path, status in run.health:
            last[path] = status
        return last.get("/health/ready") == 200 and last.get("/health/jobs") == 200

    recovered = await wait_until(healthy, args.recover_timeout, every=0.5) is not None
    done.set()
    await watcher
    # The last probe offer may still be pending: let it expire before checking.
    if run.probes:
        last_expiry = max(e for _, e in run.probes)
        wait = (last_expiry - datetime.now(timezone.utc)).total_seconds() + args.expiry_grace
        if wait > 0:
            await asyncio.sleep(min(wait, 60))
    checks = await asyncio.to_thread(verify, run, args.dsn, args.drain_timeout)
    await cancel_leftovers(args, ops_token, run)

    fault_at = run.fault_at
    failures = Counter(o.status for o in run.outcomes if not (isinstance(o.status, int) and 200 <= o.status < 300))
    first_ok = last_fail = None
    if fault_at is not None:
        oks = [o.done for o in run.outcomes if isinstance(o.status, int) and 200 <= o.status < 300 and o.sent >= fault_at]
        fails = [o.done for o in run.outcomes if o.done >= fault_at and not (isinstance(o.status, int) and 200 <= o.status < 300)]
        first_ok = (min(oks) - fault_at) if oks else None
        last_fail = (max(fails) - fault_at) if fails else 0.0
    by_kind = Counter((o.kind, o.status) for o in run.outcomes)
    return {
        "name": name, "note": run.fault_note, "requests": len(run.outcomes),
        "ok": sum(1 for o in run.outcomes if isinstance(o.status, int) and 200 <= o.status < 300),
        "failures": failures, "by_kind": by_kind, "first_ok": first_ok, "last_fail": last_fail,
        "respawned": fault.respawned, "process_back": fault.process_back, "lb_back": fault.lb_back,
        "process": fault.process, "ready_window": health_window(run, "/health/ready", t_start),
        "jobs_window": health_window(run, "/health/jobs", t_start),
        "latency": sorted(o.done - o.sent for o in run.outcomes),
        "health_messages": run.health_messages,
        "conn_errors": [(o.sent - (fault_at or t_start), o.done - (fault_at or t_start), o.error)
                        for o in run.outcomes if o.status == "conn"],
        "recovered": recovered, "seconds": load_end - t_start, **checks,
    }


def fmt_s(v: float | None, missing: str = "-") -> str:
    return missing if v is None else f"{v:.1f}"


def print_table(results: list[dict]) -> None:
    print()
    head = (f"{'scenario':<12} {'requests':>8} {'2xx':>6} {'failures by status':<22} {'1st ok':>6} {'last fail':>9} "
            f"{'running':>7} {'LB up':>6} {'ready non-200':>14} {'jobs non-200':>14} {'expiry lag':>11} {'acked':>6} {'lost':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        if r.get("skipped"):
            print(f"{r['name']:<12} skipped: {r['skipped']}")
            continue
        fails = ", ".join(f"{k}: {v}" for k, v in sorted(r["failures"].items(), key=lambda kv: str(kv[0]))) or "none"
        lags = r["expiry_lags"]
        lag = f"{max(lags):.1f} s" if lags else "-"
        if r["never_expired"]:
            lag += f" +{r['never_expired']}!"
        print(f"{r['name']:<12} {r['requests']:>8} {r['ok']:>6} {fails:<22} {fmt_s(r['first_ok']):>6} {fmt_s(r['last_fail']):>9} "
              f"{fmt_s(r['process_back']):>7} {fmt_s(r['lb_back']):>6} {r['ready_window']:>14} {r['jobs_window']:>14} {lag:>11} "
              f"{sum(r['checked'].values()):>6} {sum(r['lost'].values()):>5}")
    print()
    print("Times in s from the fault. 1st ok: first 2xx of a request sent after the fault; last fail: last failed")
    print("response (0: none after the fault); running: the killed process RUNNING again under a new pid (after")
    print("supervisord's startsecs); LB up: the killed web instance back in HAProxy's rotation; ready/jobs non-200:")
    print("first..last non-200 of /health/ready and /health/jobs through the load balancer (polled every 0.5 s);")
    print("expiry lag: worst expiresAt -> EXPIRED of the probe offers (+N!: never expired); acked: acknowledged")
    print("writes checked in PostgreSQL; lost: those missing. failures: 'conn' = no HTTP response at all.")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="http://127.0.0.1:8080", help="where the load goes (the load balancer)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--seconds", type=float, default=25.0, help="load per scenario")
    ap.add_argument("--baseline-seconds", type=float, default=15.0)
    ap.add_argument("--fault-after", type=float, default=6.0, help="s into the load")
    ap.add_argument("--rps", type=float, default=120.0, help="requests/s of the whole load (paced, closed loop)")
    ap.add_argument("--delivery-tasks", type=int, default=4)
    ap.add_argument("--fix-tasks", type=int, default=4)
    ap.add_argument("--flow-tasks", type=int, default=4)
    ap.add_argument("--drivers", type=int, default=24, help="drivers sending fixes")
    ap.add_argument("--probe-every", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=15.0, help="per request")
    ap.add_argument("--recover-timeout", type=float, default=90.0)
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--expiry-grace", type=float, default=8.0)
    ap.add_argument("--user", default="ops")
    ap.add_argument("--password", default="ops")
    ap.add_argument("--integration-user", default="bench-integration")
    ap.add_argument("--dsn", default="postgresql://dispatch:dispatch@127.0.0.1:5432/dispatch", help="PostgreSQL itself, for the checks")
    ap.add_argument("--django-database-url", default="postgis://dispatch:dispatch@127.0.0.1:5432/dispatch")
    ap.add_argument("--supervisor-sock", default=str(ROOT / "var/run/cluster-supervisord.sock"),
                    help="supervisord's socket (make run: var/run/supervisord-<PORT>.sock)")
    ap.add_argument("--worker", default="worker1")
    ap.add_argument("--beat", default="beat")
    ap.add_argument("--web", default="web:web1")
    ap.add_argument("--haproxy-sock", default=str(ROOT / "var/run/cluster-haproxy.sock"))
    ap.add_argument("--redis-host", default="127.0.0.1")
    ap.add_argument("--redis-port", type=int, default=6379)
    ap.add_argument("--pause-ms", type=int, default=5000)
    ap.add_argument("--pg-version", default="15")
    ap.add_argument("--pg-cluster", default="main")
    ap.add_argument("--gate", default="/tmp/faults-allowed")
    ap.add_argument("--gate-wait", type=float, default=900.0)
    args = ap.parse_args()
    refuse_non_loopback(args.base)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenarios: {sorted(unknown)}; known: {SCENARIOS}")

    state = machine_state("machine before")
    try:
        tokens = await setup(args)
    except (ApiError, ConnectionFailed, subprocess.CalledProcessError) as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    sup = Supervisor(args.supervisor_sock)
    print(f"load: {args.rps:.0f} req/s paced over {args.delivery_tasks} delivery + {args.fix_tasks} fix + "
          f"{args.flow_tasks} flow tasks, {args.drivers} fix drivers, {args.seconds:.0f} s a scenario, fault at "
          f"{args.fault_after:.0f} s; target {args.base}; load average {state['loadavg']}")
    results = []
    for name in names:
        print(f"\n== {name}", flush=True)
        res = await scenario(name, args, sup, tokens)
        results.append(res)
        if res.get("skipped"):
            print(f"   skipped: {res['skipped']}")
            continue
        print(f"   {res['note'] or 'no fault'}")
        print(f"   {res['requests']} requests in {res['seconds']:.1f} s, by kind and status: "
              + ", ".join(f"{k}/{s}: {n}" for (k, s), n in sorted(res["by_kind"].items(), key=str)))
        lat = res["latency"]
        if lat:
            print(f"   latency of all requests: p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms, "
                  f"max {lat[-1] * 1000:.0f} ms")
        for sent, done_, error in res["conn_errors"][:12]:
            print(f"   no response: sent {sent:+.2f} s, failed {done_:+.2f} s after the fault: {error[:150]}")
        if res["lb_back"] is not None:
            print(f"   {res['process']} back in HAProxy's rotation (UP) {res['lb_back']:.1f} s after the fault")
        print(f"   acknowledged writes checked: {dict(res['checked'])}; lost: {dict(+res['lost']) or 0}; "
              f"unacknowledged deliveries found applied: {res['unacked_applied']}")
        if res["expiry_lags"]:
            print(f"   probe offers expired {len(res['expiry_lags'])}, lag after expiresAt: "
                  + ", ".join(f"{x:.1f}" for x in res["expiry_lags"]) + " s")
        if res["respawned"] is not None:
            print(f"   {res['process']} respawned by supervisord {res['respawned']:.1f} s after the fault, RUNNING at {fmt_s(res['process_back'])} s")
        shapes: dict = {}
        for (path, st, message), n in sorted(res["health_messages"].items(), key=str):
            key = (path, st, re.sub(r"\d+(\.\d+)?", "#", message))
            count, example = shapes.get(key, (0, message))
            shapes[key] = (count + n, example)
        for (path, st, _), (n, example) in shapes.items():
            print(f"   {path} {st} x{n}, e.g.: {example}")
        print(f"   /health/ready non-200: {res['ready_window']}; /health/jobs non-200: {res['jobs_window']}; "
              f"both 200 again: {res['recovered']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    await cleanup(args, tokens[0])
    print_table(results)
    after = machine_state("machine after")
    print(f"\nmachine: {os.cpu_count()} cores; load average before {state['loadavg']}, after {after['loadavg']}")
    bad = any(sum(r.get("lost", Counter()).values()) for r in results) or any(
        500 in r.get("failures", {}) for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
