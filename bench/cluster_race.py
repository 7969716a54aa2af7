"""The accept race across the cluster (`make cluster`): many accepts (and a few rejects) of one
offer, sent at the same instant from separate connections, split between the two web instances
directly and the load balancer. Exactly one must win (2xx), every other gets 409 with the
error body, and PostgreSQL must hold exactly what the winner said.

Each round: a new driver (first fix, resume) at a random spot far from the demo city, its
socket opened through the load balancer, a delivery (no auto-dispatch) and an offer to the
driver made through the load balancer (so the event crosses instances through Redis); the socket
must receive `offer_created`. Then `--accepts` accept requests and `--rejects` reject requests
go out together: every connection is opened first, then every request is written in the same
event-loop pass. Afterwards, read directly from PostgreSQL (not through the API): the offer's
status, the delivery's active assignments (exactly one when an accept won, none when a reject
did) and the driver's availability; when an accept won, the socket must also get
`offer_accepted`. The delivery is then cancelled and the driver's shift ended.

    make cluster DETACH=1
    .venv/bin/python bench/cluster_race.py                       # 20 rounds x (30 accepts + 4 rejects)
    .venv/bin/python bench/cluster_race.py --rounds 50 --accepts 60

Exit status 1 when any round had no winner or more than one, a status other than the winner's
2xx and 409, a 409 without the error body, or PostgreSQL disagreeing; 2 when setup failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402

from benchlib import refuse_non_loopback  # noqa: E402
from benchlib import ROOT  # noqa: E402
from cluster_client import (  # noqa: E402
    ApiError, Conn, ConnectionFailed, delivery_body, driver_create, expect, haproxy_stat, login, random_spot,
)

ERROR_KEYS = {"statusCode", "timestamp", "path", "message", "error"}


async def ws_next(ws, wanted: str, timeout: float) -> dict | None:
    """The next event of type `wanted` on the socket within `timeout` s (others are skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = json.loads(await asyncio.wait_for(ws.recv(), left))
        except asyncio.TimeoutError:
            return None
        if event.get("type") == wanted:
            return event
    return None


async def one_round(n: int, args, ops: Conn, db: psycopg.Connection, targets: list[tuple[str, str]]) -> dict:
    lat, lon = random_spot()
    drv = await driver_create(ops, lat, lon)
    ws_url = args.lb.replace("http", "ws", 1) + f"/ws/drivers/{drv['id']}/?token={drv['token']}"
    problems: list[str] = []
    async with ws_connect(ws_url, open_timeout=10) as ws:
        delivery = expect(await ops.post("/v2/deliveries", delivery_body(lat, lon, prefix="RACE")), 201)
        offer = expect(await ops.post(f"/v2/deliveries/{delivery['id']}/offers", {"driverId": drv["id"], "expiresInSeconds": 60}), 201)
        offer_id = offer["offerId"]
        created = await ws_next(ws, "offer_created", 10)
        if not created or created.get("offerId") != offer_id:
            problems.append(f"the driver's socket (through the load balancer) did not get offer_created: {created}")

        # Every connection opened first; then every request written in one pass.
        plan = []
        for i in range(args.accepts + args.rejects):
            name, base = targets[i % len(targets)]
            kind = "accept" if i < args.accepts else "reject"
            c = Conn(base, token=drv["token"], timeout=30)
            await c.connect()
            body = {} if kind == "accept" else {"reason": "other"}
            plan.append((name, kind, c, c.build("POST", f"/v2/drivers/{drv['id']}/offers/{offer_id}/{kind}", body)))
        random.shuffle(plan)  # the rejects anywhere in the pass, not always last

        async def fire(c: Conn, raw: bytes):
            try:
                return await c.send_raw(raw)
            except ConnectionFailed as exc:
                return exc

        t0 = time.perf_counter()
        results = await asyncio.gather(*(fire(c, raw) for _, _, c, raw in plan))
        elapsed = time.perf_counter() - t0
        for _, _, c, _ in plan:
            c.close()

        by_target: Counter = Counter()
        winners = []
        for (name, kind, _, _), r in zip(plan, results, strict=True):
            if isinstance(r, Exception):
                by_target[(name, "conn-error")] += 1
                problems.append(f"{kind} via {name}: no response ({r})")
                continue
            by_target[(name, r.status)] += 1
            if 200 <= r.status < 300:
                winners.append((name, kind, r.json()))
            elif r.status == 409:
                body = r.json()
                if not ERROR_KEYS <= set(body) or body.get("statusCode") != 409:
                    problems.append(f"{kind} via {name}: 409 without the error body: {body}")
            else:
                problems.append(f"{kind} via {name}: HTTP {r.status} {r.body[:200]!r}")
        if len(winners) != 1:
            problems.append(f"{len(winners)} winners: {[(w[0], w[1]) for w in winners]}")

        # PostgreSQL has the last word.
        with db.cursor() as cur:
            cur.execute("SELECT status FROM driver_offers WHERE id = %s", (offer_id,))
            offer_status = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM dispatch_assignment WHERE delivery_id = %s AND status = 'active'", (delivery["id"],))
            active = cur.fetchone()[0]
            cur.execute("SELECT id, driver_id FROM dispatch_assignment WHERE delivery_id = %s", (delivery["id"],))
            assignments = cur.fetchall()
            cur.execute("SELECT availability FROM dispatch_driver WHERE id = %s", (drv["id"],))
            availability = cur.fetchone()[0]
            cur.execute("SELECT status FROM dispatch_delivery WHERE id = %s", (delivery["id"],))
            delivery_status = cur.fetchone()[0]
        winner_kind = winners[0][1] if len(winners) == 1 else None
        if winner_kind == "accept":
            won = winners[0][2]
            expected = ("ACCEPTED", 1, "busy", "assigned")
            if [str(a[0]) for a in assignments] != [won.get("assignmentId")]:
                problems.append(f"assignments in PostgreSQL {assignments} != the winner's {won.get('assignmentId')}")
            accepted = await ws_next(ws, "offer_accepted", 10)
            if not accepted or accepted.get("assignmentId") != won.get("assignmentId"):
                problems.append(f"the driver's socket did not get offer_accepted for the winner: {accepted}")
        elif winner_kind == "reject":
            expected = ("REJECTED", 0, "available", "ready")
        else:
            expected = None
        got = (offer_status, active, availability, delivery_status)
        if expected and got != expected:
            problems.append(f"PostgreSQL (offer, active assignments, driver, delivery) = {got}, expected {expected}")

    # Leave nothing behind that the dispatch jobs would pick up.
    r = await ops.post(f"/v2/deliveries/{delivery['id']}/cancel", {"reason": "bench cleanup"})
    if r.status not in (200, 409):
        problems.append(f"cleanup cancel: HTTP {r.status} {r.body[:200]!r}")
    dc = Conn(args.lb, token=drv["token"])
    await dc.post(f"/v2/drivers/{drv['id']}/availability/end-shift")
    dc.close()
    return {"round": n, "by_target": by_target, "winner": winners[0][:2] if len(winners) == 1 else None,
            "winners": len(winners), "elapsed": elapsed, "problems": problems}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lb", default="http://127.0.0.1:8080")
    ap.add_argument("--web", default="http://127.0.0.1:8101,http://127.0.0.1:8102", help="the web instances, comma-separated")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--accepts", type=int, default=30)
    ap.add_argument("--rejects", type=int, default=4)
    ap.add_argument("--user", default="ops")
    ap.add_argument("--password", default="ops")
    ap.add_argument("--haproxy-sock", default=str(ROOT / "var/run/cluster-haproxy.sock"),
                    help="HAProxy's stats socket, to show how the load balancer split the requests")
    ap.add_argument("--dsn", default="postgresql://dispatch:dispatch@127.0.0.1:5432/dispatch",
                    help="PostgreSQL itself (not PgBouncer), read-only use")
    args = ap.parse_args()
    webs = [w.strip() for w in args.web.split(",") if w.strip()]
    for base in [args.lb, *webs]:
        refuse_non_loopback(base)
    targets = [(f"web{i + 1}", w) for i, w in enumerate(webs)] + [("lb", args.lb)]

    try:
        ops = Conn(args.lb, token=await login(args.lb, args.user, args.password))
        db = psycopg.connect(args.dsn, autocommit=True)
    except (ApiError, ConnectionFailed, psycopg.Error) as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2

    before = haproxy_stat(args.haproxy_sock)
    print(f"{args.rounds} rounds, each {args.accepts} accepts + {args.rejects} rejects of one offer, "
          f"round-robin over {', '.join(f'{n} ({b})' for n, b in targets)}")
    results = []
    for n in range(1, args.rounds + 1):
        try:
            res = await one_round(n, args, ops, db, targets)
        except (ApiError, ConnectionFailed) as exc:
            print(f"round {n}: setup failed: {exc}", file=sys.stderr)
            return 2
        results.append(res)
        status = "ok" if not res["problems"] else "FAIL"
        print(f"  round {n:>3}: winner {res['winner']}, {sum(res['by_target'].values())} requests in "
              f"{res['elapsed'] * 1000:.0f} ms, {status}")
        for p in res["problems"]:
            print(f"      {p}")
    ops.close()
    db.close()
    after = haproxy_stat(args.haproxy_sock)
    if before and after:
        split = {name: int(after[name][7]) - int(before[name][7]) for name in after if name in before and name != "BACKEND"}
        print("the load balancer sent (all requests of the run, setup included): "
              + ", ".join(f"{name} {n}" for name, n in split.items()))

    total: Counter = Counter()
    for res in results:
        total.update(res["by_target"])
    names = [n for n, _ in targets]
    statuses = sorted({s for _, s in total}, key=str)
    print()
    print(f"{'target':<8}" + "".join(f"{str(s):>12}" for s in statuses))
    for name in names:
        print(f"{name:<8}" + "".join(f"{total[(name, s)]:>12}" for s in statuses))
    wins = Counter(res["winner"] for res in results if res["winner"])
    failed = [res for res in results if res["problems"]]
    print(f"\nrounds: {len(results)}; exactly one winner: {sum(1 for r in results if r['winners'] == 1)}; "
          f"winners by (target, kind): {dict(wins)}")
    print(f"rounds with a problem: {len(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
