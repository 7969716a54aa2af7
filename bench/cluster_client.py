"""Shared by bench/cluster_race.py and bench/faults.py: a minimal asyncio HTTP/1.1 client that
never resends, and the API calls the two use to set up drivers, deliveries and offers.

Unlike rawhttp.py, a request that fails is never sent again (not even on a kept-alive
connection the server closed): these benches count every outcome, and a resent write could
be applied twice or hide a failure. Standard library only (plus psycopg in faults.py).
"""
from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

from rawhttp import read_chunked


class ConnectionFailed(Exception):
    """No HTTP response: refused, reset, closed before the status line, or timed out."""


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self):
        return json.loads(self.body)


class Conn:
    """One keep-alive connection to `base`, one request at a time. A request that fails closes
    the connection; the next one opens a new connection."""

    # A connection idle this long is replaced before the next request: HAProxy closes idle
    # client connections after 10 s (timeout http-keep-alive), uvicorn after 5 s by default,
    # and a request written as the server closes would fail without ever reaching it.
    MAX_IDLE = 4.0

    def __init__(self, base: str, timeout: float = 15.0, token: str | None = None):
        parts = urlsplit(base)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"plain http only: {base!r}")
        self.base = base
        self.host, self.port = parts.hostname, parts.port or 80
        self.host_header = f"{self.host}:{self.port}"
        self.timeout = timeout
        self.token = token
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._last_used = 0.0

    async def connect(self) -> None:
        if self._rw is None:
            try:
                self._rw = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                raise ConnectionFailed(f"connect: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None

    def build(self, method: str, path: str, body=None, headers: dict[str, str] | None = None) -> bytes:
        data = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(data)}"]
        if body is not None:
            head.append("Content-Type: application/json")
        if self.token:
            head.append(f"Authorization: Token {self.token}")
        for k, v in (headers or {}).items():
            head.append(f"{k}: {v}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + data

    async def send_raw(self, raw: bytes) -> Response:
        if self._rw is not None and (time.monotonic() - self._last_used > self.MAX_IDLE or self._rw[0].at_eof()):
            self.close()
        await self.connect()
        reader, writer = self._rw
        try:
            writer.write(raw)
            await writer.drain()
            status, body, headers, keep = await asyncio.wait_for(self._response(reader), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            self.close()
            raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from exc
        self._last_used = time.monotonic()
        if not keep:
            self.close()
        return Response(status, body, headers)

    async def request(self, method: str, path: str, body=None, headers: dict[str, str] | None = None) -> Response:
        return await self.send_raw(self.build(method, path, body, headers))

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    async def post(self, path: str, body=None, headers: dict[str, str] | None = None) -> Response:
        return await self.request("POST", path, {} if body is None else body, headers)

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, dict[str, str], bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        keep = "close" not in headers.get("connection", "").lower()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return status, await read_chunked(reader), headers, keep
        if "content-length" not in headers:
            return status, await reader.read(), headers, False
        return status, await reader.readexactly(int(headers["content-length"])), headers, keep


class ApiError(Exception):
    pass


def expect(r: Response, *statuses: int) -> dict:
    if r.status not in statuses:
        raise ApiError(f"HTTP {r.status}: {r.body[:300]!r}")
    return r.json() if r.body else {}


def random_spot() -> tuple[float, float]:
    """A random spot far from the demo city (and from most other runs), as the contract tests do."""
    return random.uniform(-50, 50), random.uniform(-150, 150)


def near(lat: float, lon: float, km: float = 0.5) -> dict:
    d = km / 111.0
    return {"lat": lat + random.uniform(-d, d), "lon": lon + random.uniform(-d, d)}


def iso_now(offset: float = 0.0) -> str:
    t = time.time() + offset
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


async def login(base: str, username: str, password: str) -> str:
    c = Conn(base)
    try:
        return expect(await c.post("/v2/auth/token", {"username": username, "password": password}), 200)["token"]
    finally:
        c.close()


async def driver_create(ops: Conn, lat: float, lon: float, *, available: bool = True) -> dict:
    """A new driver with a first fix at (lat, lon), available unless told otherwise:
    {"id", "token"}."""
    body = expect(await ops.post("/v2/drivers", {
        "name": f"Bench Driver {uuid.uuid4().hex[:6]}",
        "phone": f"+1555{random.randint(1000000, 9999999)}",
        "vehicle": "Bench bike",
    }), 201)
    drv = {"id": body["id"], "token": body["apiToken"]}
    c = Conn(ops.base, token=drv["token"])
    try:
        expect(await c.post(f"/v2/drivers/{drv['id']}/location",
                            {"lat": lat, "lon": lon, "accuracyMeters": 10, "recordedAt": iso_now(-1)}), 200, 201, 202)
        if available:
            expect(await c.post(f"/v2/drivers/{drv['id']}/availability/resume"), 200)
    finally:
        c.close()
    return drv


def delivery_body(lat: float, lon: float, *, auto: bool = False, prefix: str = "BENCH") -> dict:
    return {
        "sellerOrderId": f"{prefix}-{uuid.uuid4().hex[:12]}",
        "storeName": "Bench Store",
        "pickupLocation": {"lat": lat, "lon": lon},
        "dropoffLocation": near(lat, lon, km=2),
        "customerName": "Bench Customer",
        "customerPhone": "+15550001234",
        "prepTimeMinutes": 5,
        "autoDispatch": auto,
    }


def haproxy_stat(sock: str) -> dict[str, list[str]]:
    """HAProxy's `show stat` rows of backend web by server name (field 7 is stot, the requests
    or sessions sent to it; 17 its status); {} when the stats socket does not answer."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(sock)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return {}
    rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
    return {row[1]: row for row in rows if len(row) > 17 and row[0] == "web"}
