"""A minimal asyncio HTTP/1.1 client for the benches: a fixed set of keep-alive connections to
one loopback server, one request in flight on each, no redirects, no TLS, no cookies.

httpx tops out near 500 requests/s on this machine (its per-request Python cost); this one
writes a prebuilt request and parses the status line, Content-Length or chunked body, so the
client's share of the 2 cores stays small. Standard library only.
"""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


async def read_chunked(reader) -> bytes:
    """A chunked HTTP/1.1 body (after the headers), trailers skipped."""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class HttpError(Exception):
    pass


class RawHttp:
    def __init__(self, base: str, connections: int, timeout: float = 30.0):
        parts = urlsplit(base)
        if parts.scheme != "http":
            raise ValueError("plain http only")
        self.host, self.port = parts.hostname, parts.port or 80
        self.host_header = f"{self.host}:{self.port}".encode()
        self.size, self.timeout = connections, timeout
        self.pool: asyncio.Queue = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self.pool.put_nowait(await self._connect())

    async def _connect(self):
        return await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        while not self.pool.empty():
            _, w = self.pool.get_nowait()
            w.close()

    async def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                      body: bytes = b"", on_sent=None) -> tuple[int, bytes]:
        """(status, body). `on_sent()` is called right after the request is written. A kept-alive
        connection the server closed while idle (uvicorn: after 5 s) fails before any byte of
        the response: then the request is sent once more on a new connection, as browsers and
        httpx do."""
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self.host_header, b"Content-Length: %d" % len(body)]
        for k, v in (headers or {}).items():
            head.append(f"{k}: {v}".encode())
        raw = b"\r\n".join(head) + b"\r\n\r\n" + body
        conn = await self.pool.get()
        try:
            for attempt in (1, 2):
                got_head: list = []
                try:
                    reader, writer = conn
                    writer.write(raw)
                    if on_sent:
                        on_sent()
                    status, data, keep = await asyncio.wait_for(self._response(reader, got_head), self.timeout)
                    if not keep:
                        writer.close()
                        conn = await self._connect()
                    return status, data
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    conn[1].close()
                    conn = await self._connect()  # the retry goes on this new one, not another idle one
                    stale = not got_head and isinstance(exc, (ConnectionError, asyncio.IncompleteReadError))
                    if attempt == 2 or not stale:
                        raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.pool.put_nowait(conn)
        raise AssertionError("unreachable")

    @staticmethod
    async def _response(reader: asyncio.StreamReader, got_head: list) -> tuple[int, bytes, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        got_head.append(True)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, keep = None, False, True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                keep = False
        if chunked:
            return status, await read_chunked(reader), keep
        if length is None:
            return status, await reader.read(), False
        return status, await reader.readexactly(length), keep
