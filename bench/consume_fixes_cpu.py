#!/usr/bin/env python
"""`manage.py consume_fixes`: CPU per fix, of the consumer and of the PostgreSQL backend(s) it
talks to (the cost, not the machine's load).

Sets up `--deliveries` drivers, each with one assigned delivery (through the workflows, as
bench/tracking_fanout.py does), starts one `manage.py consume_fixes` of its own, then feeds the
fix stream for `--seconds` as the location fast lane would (its Redis script, one fix per
driver every `--fix-interval` seconds, a few metres of random walk each, the ETA throttle deciding
which fixes refresh the ETA), and prints the consumer's CPU per fix (all its threads: the
batch, the after-commit sends) and its PostgreSQL backends' CPU per fix, from /proc.

Its own Redis database (`--redis-db`, default 14, which nobody else may use: the stream, the live state, the channel
layers, the Celery broker of this run; nothing else reads it), so another consumer on the dev
stream does not take its fixes. The dev PostgreSQL database (`dispatch`), as the other benches.

    .venv/bin/python bench/consume_fixes_cpu.py --deliveries 500 --seconds 30 --keep
    … --reuse RUN_ID                  # the drivers and deliveries of an earlier --keep run
    … --code /tmp/other-checkout      # the consumer from another checkout (compare versions)
    … --cleanup-run RUN_ID            # cancel and end the shift of a kept run
    … --pyspy /tmp/consumer.raw       # also sample the consumer with py-spy (--gil) over the window

Compare two versions by alternating runs of each on the same kept run, never one run against
another taken at another moment.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import CLK_TCK, ROOT, machine_state, proc_ticks, stop_process, with_descendants  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")


def tcp_local_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of the process's TCP connections to `remote_port` (its database sockets)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[9] in inodes and int(parts[2].rsplit(":", 1)[1], 16) == remote_port:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def backend_pids(consumer_pid: int) -> list[int]:
    """The PostgreSQL backends serving the consumer's connections."""
    from django.conf import settings
    from django.db import connection

    port = int(settings.DATABASES["default"]["PORT"] or 5432)
    ports = tcp_local_ports(consumer_pid, port)
    if not ports:
        return []
    with connection.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", [list(ports)])
        return [r[0] for r in cur.fetchall()]


def load_pairs(run_id: str):
    from availability.models import Driver
    from dispatch.models import Assignment, AssignmentStatus
    from tracking_setup import Pair

    pairs = []
    rows = (Assignment.objects.filter(status=AssignmentStatus.ACTIVE,
                                      delivery__seller_order_id__startswith=f"TRACK-BENCH-{run_id}-")
            .values_list("driver_id", "delivery_id"))
    positions = dict(Driver.objects.filter(pk__in=[d for d, _ in rows]).values_list("pk", "location"))
    for n, (driver_id, delivery_id) in enumerate(rows):
        point = positions[driver_id]
        pair = Pair(n, str(driver_id), "", point.y, point.x)
        pair.delivery_id = str(delivery_id)
        pairs.append(pair)
    return pairs


def main(args) -> int:
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:6379/{args.redis_db}"
    import django

    django.setup()
    import logging

    from availability import live
    from common.redis import get_redis
    from tracking_setup import cleanup_run, orm_setup

    if args.cleanup_run:
        return cleanup_run(args.cleanup_run, args.user, args.setup_concurrency)
    logging.getLogger("common.broadcast").setLevel(logging.ERROR)
    rng = random.Random(args.seed)
    r = get_redis()
    if args.reuse:
        run_id = args.reuse
        pairs = load_pairs(run_id)
        print(f"run {run_id}: {len(pairs)} drivers with an assigned delivery (reused)")
    else:
        run_id = f"{int(time.time()) % 1000000:06d}-{rng.randrange(1000):03d}"
        centre = (rng.uniform(-40, 40), rng.uniform(-140, 140))
        t0 = time.perf_counter()
        pairs = orm_setup(args.deliveries, centre, rng, run_id, args.user, args.setup_concurrency)
        print(f"run {run_id}: {len(pairs)} drivers with an assigned delivery, set up in {time.perf_counter() - t0:.0f} s")
    # The live state the fast lane would have: each driver's status and its delivery.
    for p in pairs:
        live.active_delivery_set(p.driver_id, p.delivery_id)
    r.delete(live.STREAM_KEY)

    env = dict(os.environ)
    code = Path(args.code).resolve() if args.code else ROOT
    consumer = subprocess.Popen([str(ROOT / ".venv/bin/python"), "manage.py", "consume_fixes", "--consumer",
                                 f"cpu-bench-{os.getpid()}"], cwd=code, env=env)
    try:
        time.sleep(3)
        if consumer.poll() is not None:
            raise SystemExit("consume_fixes exited at once")
        script = r.register_script(live._FIX_SCRIPT)

        def feed(until: float) -> int:
            """One fix per driver every fix-interval seconds, spread evenly, sent each 20 ms."""
            sent = 0
            n = len(pairs)
            start = time.monotonic()
            nxt = 0
            while time.monotonic() < until:
                due = int((time.monotonic() - start) / args.fix_interval * n)
                pipe = r.pipeline(transaction=False)
                batch = 0
                while nxt < due:
                    p = pairs[nxt % n]
                    nxt += 1
                    p.lat += rng.uniform(-0.0003, 0.0003)
                    p.lon += rng.uniform(-0.0003, 0.0003)
                    fix = live.Fix(driver_id=p.driver_id, lat=round(p.lat, 7), lon=round(p.lon, 7), recorded_at=time.time(),
                                   accuracy_m=8.0, speed=6.5, heading=90.0)
                    keys, argv = live._script_call(fix, token_digest_="", throttle_key="x", limit=0, period=1, append=True)
                    script(keys=keys, args=argv, client=pipe)
                    batch += 1
                if batch:
                    pipe.execute()
                    sent += batch
                time.sleep(0.02)
            return sent

        feed(time.monotonic() + args.warmup)
        pgs = backend_pids(consumer.pid)
        machine_state("before")
        spy = None
        if args.pyspy:
            spy = subprocess.Popen([str(ROOT / ".venv/bin/py-spy"), "record", "--gil", "--format", "raw", "-r", "100",
                                    "-o", args.pyspy, "--pid", str(consumer.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pids = with_descendants([consumer.pid])
        c0 = sum(proc_ticks(p) for p in pids)
        g0 = sum(proc_ticks(p) for p in pgs)
        w0 = time.perf_counter()
        sent = feed(time.monotonic() + args.seconds)
        # let the consumer catch up with what was sent, then read its CPU
        for _ in range(100):
            info = {g["name"]: g for g in r.xinfo_groups(live.STREAM_KEY)}[live.STREAM_GROUP]
            if not info["lag"] and not info["pending"]:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - w0
        c1 = sum(proc_ticks(p) for p in pids)
        g1 = sum(proc_ticks(p) for p in pgs)
        if spy:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        machine_state("after")
        ms = 1000 / CLK_TCK
        print(f"code {code} (git {git_head(code)}), {len(pairs)} deliveries, fix every {args.fix_interval:g} s, "
              f"{sent} fixes in {args.seconds:g} s ({sent / args.seconds:.0f}/s), drained after {wall:.1f} s")
        print(f"consume_fixes: {(c1 - c0) * ms / sent:.3f} ms CPU per fix ({(c1 - c0) * ms / wall / 10:.0f} % of a core); "
              f"PostgreSQL backend(s) {pgs}: {(g1 - g0) * ms / sent:.3f} ms CPU per fix "
              f"({(g1 - g0) * ms / wall / 10:.0f} % of a core); together {((c1 - c0) + (g1 - g0)) * ms / sent:.3f} ms per fix")
    finally:
        stop_process(consumer)
    if args.keep:
        print(f"kept: reuse with --reuse {run_id}; clean up with --cleanup-run {run_id}")
    else:
        from tracking_setup import orm_teardown

        failed = orm_teardown(pairs, args.user, args.setup_concurrency)
        print(f"teardown: {len(pairs)} deliveries cancelled, drivers' shift ended ({failed} failed)")
    return 0


def git_head(code: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return (code / "REVISION").read_text().strip() if (code / "REVISION").exists() else "?"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deliveries", type=int, default=500)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--fix-interval", type=float, default=5.0, help="seconds between two fixes of one driver")
    p.add_argument("--redis-db", type=int, default=14)
    p.add_argument("--code", help="the checkout whose consume_fixes runs (default: this one)")
    p.add_argument("--keep", action="store_true", help="leave the drivers and deliveries for --reuse")
    p.add_argument("--reuse", metavar="RUN_ID")
    p.add_argument("--cleanup-run", metavar="RUN_ID")
    p.add_argument("--user", default="ops")
    p.add_argument("--setup-concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--pyspy", metavar="FILE", help="also sample the consumer with py-spy (--gil, raw) over the window")
    sys.exit(main(p.parse_args()))
