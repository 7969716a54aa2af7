"""A socket storm against a real server: N sockets open, then all drop at once.

Issue 17 asks that 2,000 sockets closing at once leave no exception in the logs and that the
server's Redis connections return to their baseline within 30 s. This script starts uvicorn
(`--workers 2`, as `make run`) on a free loopback port with every Redis connection of the
server named (`client_name` in REDIS_URL), so Redis's own `CLIENT LIST` counts exactly the
server's connections, whatever else uses the same Redis. It then

1. warms up (a tenth of the sockets open and drop), waits, and reads the baseline count;
2. opens N ops sockets (`/ws/ops/?token=`, the core channel layer) and N/4 customer tracking
   sockets (`/ws/track/<id>/?token=`, the pub/sub layer) on the demo deliveries, in batches;
3. drops every socket at once (the TCP connection is aborted: no close handshake, as when a
   cell network goes away) — or closes them cleanly with `--clean-close`;
4. polls the count every 0.5 s for `--watch` seconds and prints the curve and the time it
   took to get back within `--slack` of the baseline;
5. scans the server's log for tracebacks, ERROR lines and MaxConnectionsError.

Uses the database and Redis of the environment (DATABASE_URL, REDIS_URL): run seed_demo there
first. Exit 1 if the count does not return within the watch or the log has errors.

    .venv/bin/python bench/socket_storm.py --sockets 2000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import sys
import time
from urllib.parse import urlencode, urlsplit, urlunsplit, parse_qsl

import redis
from websockets.asyncio.client import connect as ws_connect

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import Server, machine_state  # noqa: E402

NAME = "socket-storm-bench"


def named(url: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query), client_name=NAME)
    return urlunsplit(parts._replace(query=urlencode(query)))


def server_connections(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if c.get("name") == NAME)


def credentials(n_tracking: int) -> tuple[str, list[tuple[str, str]]]:
    """An API token of the demo ops login, and (delivery id, tracking token) of open deliveries."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
    sys.path.insert(0, str(benchlib.ROOT))
    django.setup()
    from django.contrib.auth import get_user_model

    from common.tokens import api_token_create
    from dispatch.models import Delivery

    ops = get_user_model().objects.get(username="ops")
    token = api_token_create(ops, name="socket-storm bench")
    open_ones = Delivery.objects.exclude(status__in=["delivered", "failed", "cancelled"]).values_list("pk", "tracking_token")
    links = [(str(pk), t) for pk, t in open_ones[: max(n_tracking, 1)]]
    return token, links


async def open_all(ws_base: str, paths: list[str], batch: int) -> list:
    sockets, failures = [], 0
    for i in range(0, len(paths), batch):
        results = await asyncio.gather(*(ws_connect(ws_base + p, open_timeout=60, max_size=2**22) for p in paths[i : i + batch]),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                failures += 1
            else:
                sockets.append(r)
    return sockets, failures


async def storm(args, base: str, client: redis.Redis, token: str, links: list[tuple[str, str]]) -> int:
    ws_base = base.replace("http://", "ws://")
    paths = [f"/ws/ops/?token={token}"] * args.sockets
    paths += [f"/ws/track/{links[i % len(links)][0]}/?token={links[i % len(links)][1]}" for i in range(args.sockets // 4)] if links else []
    # Warm up: a tenth of the sockets open and drop, so that each web process has made its
    # pools; the baseline is what the server holds a while after that (per process: the
    # channel layer's idle cap, CHANNELS_REDIS_MAX_IDLE, and the pub/sub layer's two).
    warm, _ = await open_all(ws_base, paths[:: 10], args.batch)
    for ws in warm:
        ws.transport.abort()
    await asyncio.sleep(args.settle)
    baseline = server_connections(client)
    started = time.monotonic()
    sockets, failures = await open_all(ws_base, paths, args.batch)
    opened_in = time.monotonic() - started
    await asyncio.sleep(2)
    peak = server_connections(client)
    print(f"sockets: {len(sockets)} of {len(paths)} open in {opened_in:.1f} s ({failures} failed); "
          f"server's Redis connections: baseline {baseline}, with the sockets open {peak}", flush=True)

    dropped_at = time.monotonic()
    if args.clean_close:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    else:
        for ws in sockets:
            ws.transport.abort()
    curve, peak_after, back_after = [], (0.0, 0), None
    while time.monotonic() - dropped_at < args.watch:
        await asyncio.sleep(0.5)
        t, n = time.monotonic() - dropped_at, server_connections(client)
        curve.append((t, n))
        if n > peak_after[1]:
            peak_after, back_after = (t, n), None  # the discards still rising: not back yet
        elif back_after is None and n <= baseline + args.slack and peak_after[1] > baseline + args.slack:
            back_after = t
    marks = [c for c in curve if any(abs(c[0] - m) < 0.26 for m in (0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60))]
    print("after the drop (s → connections): " + ", ".join(f"{t:.1f} → {n}" for t, n in marks or curve), flush=True)
    print(f"peak after the drop: {peak_after[1]} at {peak_after[0]:.1f} s (the group_discard storm)")
    if peak_after[1] <= baseline + args.slack:
        print(f"the count never left the baseline {baseline} (±{args.slack})")
        return 0
    if back_after is None or curve[-1][1] > baseline + args.slack:
        print(f"NOT back within {args.slack} of the baseline {baseline} after {args.watch:.0f} s (last {curve[-1][1]})")
        return 1
    print(f"back within {args.slack} of the baseline {baseline} at {back_after:.1f} s after the drop "
          f"({back_after - peak_after[0]:.1f} s after the peak), and stayed there")
    return 0


def scan_log(path) -> int:
    text = path.read_text(errors="replace") if path.exists() else ""
    bad = [line for line in text.splitlines()
           if re.search(r"Traceback|\"levelname\": \"(ERROR|CRITICAL)\"| ERROR |MaxConnectionsError|Exception in ASGI", line)]
    print(f"server log {path}: {len(text.splitlines())} lines, {len(bad)} with errors")
    for line in bad[:10]:
        print("  " + line[:300])
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sockets", type=int, default=2000, help="ops sockets (plus a quarter as many tracking sockets)")
    p.add_argument("--batch", type=int, default=100, help="sockets opened at once")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the warm-up before the baseline is read")
    p.add_argument("--watch", type=float, default=60.0, help="seconds to watch the count after the drop")
    p.add_argument("--slack", type=int, default=2, help="connections above the baseline that count as back")
    p.add_argument("--clean-close", action="store_true", help="close with the handshake instead of dropping")
    args = p.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.sockets * 2 + 1024)), hard))
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    machine_state("machine before")
    token, links = credentials(args.sockets // 4)
    server = Server(workers=args.workers, consumers=0, env={"REDIS_URL": named(redis_url), "LOG_LEVEL": "WARNING",
                                                                 "SOCKET_MAX_PER_CREDENTIAL": "0"})  # (all on one token)
    server.start()
    try:
        code = asyncio.run(storm(args, server.base, client, token, links))
        time.sleep(1)
    finally:
        server.stop()
    code |= scan_log(server.dir / "uvicorn.log")
    machine_state("machine after")
    return code


if __name__ == "__main__":
    sys.exit(main())
