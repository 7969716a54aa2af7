"""The two channel layers side by side, in one process, on the same Redis: what one web
process pays to deliver group messages to many sockets.

S receivers (as S customer sockets of one web process: each its own channel, each in its own
group `delivery.<n>`, each awaiting `receive` as a consumer does) and M messages, one per
group in turn, sent from a second event loop in another thread (as the fast lane of another
process would). It reports the time from the first send until every message was received,
messages/s and per-message latency percentiles, for channels_redis's core layer (the
`default` of settings.CHANNEL_LAYERS) and the Redis pub/sub layer (`tracking`), alternating
rounds so both see the same machine load. Both layers' CPU time is from the process's own
clock (time.process_time), so a loaded machine inflates the wall times of both alike.

    .venv/bin/python bench/channel_layers.py --receivers 2000 --messages 4000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from channels.layers import channel_layers  # noqa: E402

from benchlib import machine_state  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def one_round(alias: str, receivers: int, messages: int, tag: str, timeout: float) -> dict:
    layer = channel_layers.make_backend(alias)  # a fresh instance: no state from an earlier round
    sender_layer = channel_layers.make_backend(alias)
    groups = [f"delivery.bench-{tag}-{i}" for i in range(receivers)]
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    ready = threading.Event()

    async def receive_side():
        channels = [await layer.new_channel() for _ in range(receivers)]
        for group, channel in zip(groups, channels):
            await layer.group_add(group, channel)
        done = asyncio.Event()
        remaining = [messages]

        async def consumer(channel):
            while True:
                message = await layer.receive(channel)
                latencies.append(time.perf_counter() - sent_at[message["n"]])
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        tasks = [asyncio.ensure_future(consumer(c)) for c in channels]
        await asyncio.sleep(0.5)  # subscriptions settled
        cpu0 = time.process_time()
        ready.set()
        started = time.perf_counter()
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for group, channel in zip(groups, channels):
            await layer.group_discard(group, channel)
        return elapsed, cpu

    def send_side():
        async def go():
            ready.wait()
            for n in range(messages):
                sent_at[n] = time.perf_counter()
                await sender_layer.group_send(groups[n % receivers], {"type": "delivery_location_updated", "n": n})
        asyncio.run(go())

    sender = threading.Thread(target=send_side)
    sender.start()
    elapsed, cpu = asyncio.run(receive_side())
    sender.join()
    got = len(latencies)
    return {"alias": alias, "received": got, "elapsed": elapsed, "rate": got / elapsed if elapsed else 0.0, "cpu": cpu,
            "p50": pct(latencies, 50) * 1000, "p99": pct(latencies, 99) * 1000}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--receivers", type=int, default=2000)
    p.add_argument("--messages", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    machine_state("machine before")
    rows = []
    for r in range(args.rounds):
        for alias in ("default", "tracking"):
            row = one_round(alias, args.receivers, args.messages, f"{os.getpid()}-{r}", args.timeout)
            rows.append(row)
            print(f"round {r + 1} {alias:8}: {row['received']}/{args.messages} received in {row['elapsed']:.2f} s "
                  f"({row['rate']:.0f}/s), process CPU {row['cpu']:.2f} s ({1000 * row['cpu'] / max(row['received'], 1):.3f} ms a message), "
                  f"latency p50 {row['p50']:.1f} ms p99 {row['p99']:.1f} ms", flush=True)
    for alias in ("default", "tracking"):
        mine = [r for r in rows if r["alias"] == alias]
        print(f"{alias:8}: best {max(r['rate'] for r in mine):.0f} messages/s, "
              f"CPU {min(1000 * r['cpu'] / max(r['received'], 1) for r in mine):.3f} ms a message")
    core = max(r["rate"] for r in rows if r["alias"] == "default")
    pubsub = max(r["rate"] for r in rows if r["alias"] == "tracking")
    print(f"pub/sub ÷ core: {pubsub / core:.1f}× the messages/s with {args.receivers} receivers")
    machine_state("machine after")
    return 0 if all(r["received"] == args.messages for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
