#!/usr/bin/env python
"""The location fast lane: CPU per `POST /v2/drivers/{id}/location`, in-process.

Calls the real ASGI app (`config.asgi.application`: the fast lane in front of Django) with a
minimal HTTP scope, one request at a time, no HTTP client or server in between, and prints this
process's CPU per POST (`time.process_time()`). What it covers is the fast lane's own work:
parse and validate, the token cache, the Redis script, the answer, the metrics; not uvicorn's
HTTP parsing, and no customer send (its drivers carry no delivery). Its own Redis database
(`--redis-db`, default 14: not one another test suite flushes), the dev PostgreSQL database (its drivers, made once and kept: `--tokens`).

    .venv/bin/python bench/location_post_cpu.py --posts 4000
    … --code /tmp/other-checkout     # that checkout's fast lane (compare versions)
    … --pyspy /tmp/post.raw          # also sample the measured POSTs with py-spy (--gil)

On a shared machine one run's figure moves by tens of per cent with the neighbours' load:
compare versions by several alternating runs of each (the minimum is the steadiest figure).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def run(args, pairs) -> None:
    from config.asgi import application

    rng = random.Random(args.seed)
    import orjson

    async def post(i: int) -> None:
        driver_id, token = pairs[i % len(pairs)]
        body = orjson.dumps({"lat": round(12.97 + rng.uniform(-0.001, 0.001), 7),
                             "lon": round(77.59 + rng.uniform(-0.001, 0.001), 7),
                             "accuracyMeters": 8, "speed": 6.5, "heading": 90})
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": f"/v2/drivers/{driver_id}/location", "raw_path": b"", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"authorization", f"Token {token}".encode()), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop() if messages else {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        await application(scope, receive, send)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"HTTP {sent[0]['status']}: {sent[1].get('body', b'')[:300]!r}")

    for i in range(args.warmup):
        await post(i)
    spy = None
    if args.pyspy:
        spy = subprocess.Popen([str(ROOT / ".venv/bin/py-spy"), "record", "--gil", "--format", "raw", "-r", "200",
                                "-o", args.pyspy, "--pid", str(os.getpid())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(args.posts):
        await post(i)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    if spy:
        spy.send_signal(signal.SIGINT)
        spy.wait()
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    print(f"{args.code or ROOT}: {args.posts} POSTs, {cpu / args.posts * 1e6:.0f} µs CPU per POST, "
          f"{wall / args.posts * 1e6:.0f} µs wall; load {load_before} → {load_after}")


def main(args) -> int:
    code = Path(args.code).resolve() if args.code else ROOT
    sys.path.insert(0, str(code))
    os.chdir(code)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:6379/{args.redis_db}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
    import django

    django.setup()
    import logging

    logging.disable(logging.WARNING)
    from availability.services import driver_create

    if not os.path.exists(args.tokens):
        with open(args.tokens, "w") as f:
            for k in range(args.drivers):
                driver, token = driver_create(name=f"Post CPU Bench Driver {k}", phone=f"+1555001{k:04d}",
                                              vehicle="Bench scooter", vehicle_type="scooter")
                f.write(f"{driver.pk} {token}\n")
    with open(args.tokens) as f:
        pairs = [line.split() for line in f if line.strip()]
    asyncio.run(run(args, pairs))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--posts", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--drivers", type=int, default=20, help="made once (--tokens); the POSTs rotate over them")
    p.add_argument("--tokens", default="/tmp/location_post_cpu.tokens", help="driver id and token, one a line")
    p.add_argument("--redis-db", type=int, default=14)
    p.add_argument("--code", help="the checkout whose fast lane runs (default: this one)")
    p.add_argument("--pyspy", metavar="FILE")
    p.add_argument("--seed", type=int, default=1)
    sys.exit(main(p.parse_args()))
