"""A web server's pub/sub connections to Redis dropped under N open sockets: how long until every
socket has been told (closed 1012), has reconnected and hears events again.

When a web process's pub/sub connection to Redis drops and comes back, what was published
meanwhile never reaches its sockets; each is closed with 1012 (common.channels._Shard), spread
at about 500 a second per process, and its client reconnects and reloads. This script starts
uvicorn (`--workers 2`, as `make run`) on a free loopback port with every Redis connection of
the server named (`client_name` in REDIS_URL), so that it kills exactly the server's pub/sub
connections (`CLIENT KILL ID`), whatever else uses the same Redis. It then

1. opens `--ops` ops sockets (`/ws/ops/?locations=0&positions=0`) and `--tracking` customer
   tracking sockets on the demo's open deliveries, in batches; checks each hears an event;
2. kills the server's pub/sub connections (one per web process and layer);
3. each client, once closed, reconnects after 1 s × U(0.75, 1.25) (the pages' first retry),
   and again with backoff if the handshake fails;
4. once all are back, sends one event to every group and counts who heard it;
5. scans the server's log for tracebacks and ERROR lines.

With `--stall` the connections are not killed but stalled: the server reaches Redis through a
TCP proxy (a thread of this process with its own event loop), and its connections that Redis
lists as pub/sub stop carrying anything either way while staying open (a Redis stuck, a half-open connection behind a proxy: no error, no
close, TCP keep-alive sees nothing). The server's probe (a PING after 5 s of silence, dropped
10 s later without an answer) finds them; new connections through the proxy work.

Prints: close codes, time to the last close (the spread), time until all are open again,
failed handshakes on the way, events heard after, and the machine state. Uses the database and
Redis of the environment (DATABASE_URL, REDIS_URL): run seed_demo there first. Exit 1 if a
socket was not closed 1012, did not come back, or missed the event after, or the log has errors.

    .venv/bin/python bench/pubsub_drop.py --ops 1000 --tracking 4000
    .venv/bin/python bench/pubsub_drop.py --ops 1000 --tracking 4000 --stall
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import sys
import threading
import time
from collections import Counter
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Server, machine_state  # noqa: E402
from socket_storm import credentials, scan_log  # noqa: E402

EVENT_WAIT = 30.0


def named(url: str, name: str) -> str:
    """`url` with every connection made from it named `name` (CLIENT LIST shows it)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode(dict(parse_qsl(parts.query), client_name=name))))


class Client:
    """One socket that, once closed, reconnects as the pages do (1 s × U(0.75, 1.25), doubling
    while the handshake fails)."""

    def __init__(self, url: str):
        self.url = url
        self.ws = None
        self.closed_code = None
        self.closed_at = None
        self.reopened_at = None
        self.failed_handshakes = 0

    async def open(self) -> None:
        self.ws = await ws_connect(self.url, open_timeout=60, max_size=2**22)

    async def follow_drop(self, dropped_at: float) -> None:
        try:
            async for _ in self.ws:
                pass
        except ConnectionClosed:
            pass
        self.closed_at = time.monotonic() - dropped_at
        self.closed_code = self.ws.close_code
        delay = 1.0
        while True:
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            try:
                await self.open()
                self.reopened_at = time.monotonic() - dropped_at
                return
            except Exception:  # noqa: BLE001 - refused or timed out: try again later
                self.failed_handshakes += 1
                delay = min(delay * 2, 30.0)

    async def hears(self, predicate) -> bool:
        deadline = time.monotonic() + EVENT_WAIT
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = await asyncio.wait_for(self.ws.recv(), left)
                if predicate(message):
                    return True
        except (asyncio.TimeoutError, ConnectionClosed):
            pass
        return False


async def open_all(clients: list[Client], batch: int) -> int:
    failures = 0
    for i in range(0, len(clients), batch):
        results = await asyncio.gather(*(c.open() for c in clients[i : i + batch]), return_exceptions=True)
        failures += sum(isinstance(r, BaseException) for r in results)
    return failures


async def send_events(links: list[tuple[str, str]], marker: str) -> None:
    from channels.layers import get_channel_layer

    await get_channel_layer().group_send("ops", {"type": "zone_health_updated",
                                                 "event": {"type": "zone_health_updated", "marker": marker}})
    tracking = get_channel_layer("tracking")
    for delivery_id, _ in links:
        await tracking.group_send(f"delivery.{delivery_id}", {
            "type": "delivery_location_updated",
            "event": {"type": "delivery_location_updated", "deliveryId": delivery_id, "marker": marker}})


async def all_hear(clients: list[Client], links, marker: str) -> int:
    waiting = [asyncio.ensure_future(c.hears(lambda m: marker in m)) for c in clients]
    await asyncio.sleep(0.5)  # (every client reading)
    await send_events(links, marker)
    return sum(await asyncio.gather(*waiting))


class StallingProxy:
    """A TCP proxy to Redis, in a thread with its own event loop (the clients' loop, busy with
    thousands of sockets, must not hold up the server's Redis traffic), that can stall the
    connections Redis lists as pub/sub (`CLIENT LIST TYPE pubsub`, by the proxy's own port to
    Redis): what they carry afterwards, either way, is read and dropped, and they stay open."""

    def __init__(self, target: str):
        parts = urlsplit(target)
        if parts.scheme != "redis":
            raise SystemExit("--stall needs a redis:// REDIS_URL (the proxy speaks plain TCP)")
        self.target_url = target
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.upstreams: dict[int, dict] = {}  # (the proxy's local port to Redis → that connection)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stalling-proxy", daemon=True)

    def start(self) -> int:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop).result()
        return self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def stall(self, client: redis.Redis, name: str) -> int:
        """Stall the server's pub/sub connections now open (named `name`, from this proxy's
        ports); returns how many."""
        ports = {int(c["addr"].rsplit(":", 1)[1]) for c in client.client_list(_type="pubsub") if c.get("name") == name}
        chosen = [c for port, c in list(self.upstreams.items()) if port in ports]
        for connection in chosen:
            connection["stalled"] = True
        return len(chosen)

    async def _serve(self, reader, writer):
        connection = {"stalled": False}
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        port = up_writer.get_extra_info("sockname")[1]
        self.upstreams[port] = connection

        async def pipe(source, sink):
            try:
                while data := await source.read(65536):
                    if connection["stalled"]:
                        continue
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.upstreams.pop(port, None)


def with_port(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port` (credentials kept)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"))


def kill_pubsub(client: redis.Redis, name: str) -> int:
    return sum(client.client_kill_filter(_id=c["id"]) for c in client.client_list(_type="pubsub") if c.get("name") == name)


async def run(args, server: Server, client: redis.Redis, token: str, links: list[tuple[str, str]], name: str,
              proxy: StallingProxy | None) -> int:
    if proxy is not None:
        server.env["REDIS_URL"] = with_port(server.env["REDIS_URL"], proxy.start())
    await asyncio.to_thread(server.start)
    try:
        return await measure(args, server.base, client, token, links, name, proxy)
    finally:
        if proxy is not None:  # (the server before the proxy it reaches Redis through)
            await asyncio.sleep(1)
            await asyncio.to_thread(server.stop)
            proxy.stop()


async def measure(args, base: str, client: redis.Redis, token: str, links: list[tuple[str, str]], name: str,
                  proxy: StallingProxy | None) -> int:
    ws = base.replace("http://", "ws://")
    clients = [Client(f"{ws}/ws/ops/?token={token}&locations=0&positions=0") for _ in range(args.ops)]
    clients += [Client(f"{ws}/ws/track/{links[i % len(links)][0]}/?token={links[i % len(links)][1]}")
                for i in range(args.tracking)]
    started = time.monotonic()
    failures = await open_all(clients, args.batch)
    print(f"sockets: {len(clients) - failures} of {len(clients)} open in {time.monotonic() - started:.1f} s", flush=True)
    if failures:
        return 1
    before = await all_hear(clients, links, "before-the-drop")
    print(f"before the drop: {before} of {len(clients)} heard an event", flush=True)

    dropped_at = time.monotonic()
    following = [asyncio.ensure_future(c.follow_drop(dropped_at)) for c in clients]
    if proxy is None:
        print(f"killed {kill_pubsub(client, name)} pub/sub connections of the server", flush=True)
    else:
        stalled = proxy.stall(client, name)
        print(f"stalled {stalled} pub/sub connections of the server", flush=True)
        if not stalled:
            return 1
    done, pending = await asyncio.wait(following, timeout=args.watch)
    for task in pending:
        task.cancel()
    codes = Counter(c.closed_code for c in clients)
    closes = sorted(c.closed_at for c in clients if c.closed_at is not None)
    reopens = sorted(c.reopened_at for c in clients if c.reopened_at is not None)

    def at(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    print(f"close codes: {dict(codes)}")
    print(f"closed after the {'stall' if proxy else 'kill'}: p50 {at(closes, 0.5):.2f} s, p99 {at(closes, 0.99):.2f} s, last {closes[-1] if closes else float('nan'):.2f} s")
    print(f"open again: {len(reopens)} of {len(clients)}; p50 {at(reopens, 0.5):.2f} s, p99 {at(reopens, 0.99):.2f} s, "
          f"last {reopens[-1] if reopens else float('nan'):.2f} s; failed handshakes on the way "
          f"{sum(c.failed_handshakes for c in clients)}", flush=True)
    after = await all_hear([c for c in clients if c.reopened_at is not None], links, "after-the-drop")
    print(f"after: {after} of {len(clients)} heard the next event")
    for c in clients:
        if c.ws is not None:
            c.ws.transport.abort()
    ok = codes == Counter({1012: len(clients)}) and len(reopens) == len(clients) and after == before == len(clients)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", type=int, default=1000, help="ops sockets")
    p.add_argument("--tracking", type=int, default=4000, help="customer tracking sockets (on the demo's open deliveries)")
    p.add_argument("--batch", type=int, default=200, help="sockets opened at once")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--watch", type=float, default=120.0, help="seconds to wait for every socket to be back")
    p.add_argument("--stall", action="store_true", help="stall the pub/sub connections (through a proxy) instead of killing them")
    args = p.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, (args.ops + args.tracking) * 2 + 1024)), hard))
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    name = f"pubsub-drop-bench-{os.getpid()}"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    machine_state("machine before")
    token, links = credentials(max(1, args.tracking))
    server = Server(workers=args.workers, consumers=0, env={"REDIS_URL": named(redis_url, name),
                                                                 "LOG_LEVEL": "WARNING", "SOCKET_MAX_PER_CREDENTIAL": "0"})
    try:
        code = asyncio.run(run(args, server, client, token, links, name, StallingProxy(redis_url) if args.stall else None))
        time.sleep(1)
    finally:
        server.stop()
    log = (server.dir / "uvicorn.log").read_text(errors="replace")
    told = [int(n) for n in re.findall(r"(\d+) sockets told to reconnect", log)]
    print(f"server: {len(told)} reconnects logged, {sum(told)} sockets told")
    code |= scan_log(server.dir / "uvicorn.log")
    machine_state("machine after")
    return code


if __name__ == "__main__":
    sys.exit(main())
