"""A request's head is bounded in size and in time by the web processes' HTTP protocol
(common.httpprotocol), under the real server as deployed. httptools has no limit of its own: an
8 MB header was taken whole, an unfinished 128 MB one held ~218 MB of a web process, and a
connection that never finished its head stayed open for good."""
import asyncio
import json
import logging
import select
import socket
import time

import pytest

from tests.processes import free_port, served

ERROR_KEYS = {"statusCode", "timestamp", "path", "message", "error"}


@pytest.fixture
def server(transactional_db, tmp_path):
    with served(tmp_path, HTTP_HEAD_TIMEOUT_SECONDS="1.5") as port_and_log:
        yield port_and_log


def read_all(conn: socket.socket, limit_s: float = 10) -> bytes:
    conn.settimeout(limit_s)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def read_response(conn: socket.socket) -> int:
    """One whole response (it has a Content-Length); its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, _, fields = head.partition(b"\r\n")
    length = int(next(line.split(b":")[1] for line in fields.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return int(status_line.split(b" ")[1])


def test_a_head_over_the_limit_is_a_431_in_the_error_body_before_it_is_all_sent(server):
    port, log_path = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /health/?token=secret HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent = 0
        while sent < 4 * 1024 * 1024:  # a header of 4 MB that never ends, until the server answers
            if select.select([conn], [], [], 0.005)[0]:
                break
            conn.sendall(b"a" * 16384)
            sent += 16384
        answer = read_all(conn)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), head[:200]
    assert b"connection: close" in head.lower()
    error = json.loads(body)
    assert ERROR_KEYS <= set(error) and error["statusCode"] == 431
    assert error["path"] == "/health/"  # the query, which may hold a token, is not echoed
    assert error["message"] == "The request's line and headers are too large (at most 65,536 bytes)."
    assert "Traceback" not in log_path.read_text()


def test_heads_and_bodies_within_the_limits_are_served_on_one_connection(server):
    """A large body (its chunks are not counted as a head), then a request with a 40 KB header
    and a plain one, on one kept-alive connection."""
    port, _ = server
    big = json.dumps({"username": "x", "password": "y" * 600_000}).encode()
    requests = [
        b"POST /v2/auth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(big) + big,
        b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fill: " + b"f" * 40_000 + b"\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ]
    statuses = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for request in requests:
            conn.sendall(request)
            statuses.append(read_response(conn))
    assert statuses == [400, 200, 200]  # (400: the password is too long)


def test_a_connection_that_never_completes_a_head_is_closed_after_the_timeout(server):
    port, log_path = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as dribbling:
        dribbling.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        assert read_all(idle) == b"" and read_all(dribbling) == b""  # closed without an answer
        assert time.monotonic() - start < 8
    assert "no complete request head in 1.5 s" in log_path.read_text()
    # a connection that sends its head in time is answered, and kept alive past the head timeout
    # while it waits between requests (the keep-alive timeout, 5 s, governs that)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(conn) == 200
        conn.settimeout(2.5)
        with pytest.raises(socket.timeout):  # still open after 2.5 s: nothing is sent
            conn.recv(65536)
        conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_all(conn).startswith(b"HTTP/1.1 200")


# (every deployed web process runs this protocol: tests/common/test_ws_upgrade_refusals.py,
# test_every_deployed_web_process_runs_both_protocols)


# ------------------------------------------------------------ in process, with a stub application


def serve_stub(scenario, seen: list | None = None):
    """Run `scenario(port, release)` against uvicorn with this protocol, in process, serving a
    stub application: `/slow` answers once `release` is set, anything else at once (reading
    its body first). `seen` gets the path of every request the application runs."""
    import uvicorn

    from common.httpprotocol import HttpToolsProtocol

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if seen is not None:
            seen.append(scope["path"])
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
        if message["type"] == "http.disconnect":
            return
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        nonlocal release
        release = asyncio.Event()
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=HttpToolsProtocol,
                                               lifespan="off", log_config=None, access_log=False))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            return await scenario(port, release)
        finally:
            server.should_exit = True
            await task

    release = None
    return asyncio.run(main())


async def _read_to_close(reader, limit_s: float = 5) -> bytes:
    data = b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def answers_to(raws: list[bytes]) -> list[bytes]:
    """What the stub server sends back to each raw request, each on a connection of its own,
    until it closes the connection (at most 2 s)."""
    async def scenario(port, release):
        answers = []
        for raw in raws:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            answers.append(await _read_to_close(reader, 2))
            writer.close()
        return answers

    return serve_stub(scenario)


def test_a_head_over_the_limit_behind_a_request_being_answered_gets_its_431_after_that_answer(caplog):
    """A 431 written at once would be read as the answer to the request before it (whose own
    answer then failed: write after write_eof); until 2026-12-07 it was left out (a bare close)."""
    async def scenario(port, release):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # /slow is read and waits for `release`
        writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(8):  # 128 KB of one header, in reads of their own
            writer.write(b"b" * 16384)
            await writer.drain()
            await asyncio.sleep(0.02)
        early = await _read_to_close(reader, 0.5)  # nothing may come before /slow is answered
        release.set()
        rest = await _read_to_close(reader)
        writer.close()
        return early, rest

    with caplog.at_level(logging.INFO):
        early, rest = serve_stub(scenario)
    assert early == b""
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.count(b"HTTP/1.1 ") == 2
    second = rest[rest.index(b"HTTP/1.1 ", 1):]
    assert rest[:rest.index(b"HTTP/1.1 ", 1)].endswith(b"ok") and second.startswith(b"HTTP/1.1 431 ")
    assert json.loads(second.partition(b"\r\n\r\n")[2])["path"] == "/next"
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text
    assert "its head is over 65536 bytes" in caplog.text


def test_trailers_count_against_the_head_limit(caplog):
    def chunked(trailer: bytes) -> bytes:
        return (b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nhi\r\n0\r\n" + trailer + b"\r\n")

    with caplog.at_level(logging.INFO):
        small, big = answers_to([chunked(b"X-Sum: 1\r\n"), chunked(b"X-Big: " + b"t" * 100_000 + b"\r\n")])
    assert small.startswith(b"HTTP/1.1 200 ")
    assert big == b""  # closed: 10 MB of trailers were taken whole before
    assert caplog.text.count("trailers over 65536 bytes") == 1


def test_trailers_over_the_limit_log_one_line_however_many_follow(caplog):
    async def scenario(port, release):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
                     + b"X-Big: " + b"t" * 65_600 + b"\r\n" + b"a: b\r\n" * 30_000 + b"\r\n")
        await writer.drain()
        answer = await _read_to_close(reader, 2)
        writer.close()
        return answer

    with caplog.at_level(logging.INFO):
        assert serve_stub(scenario) == b""
    assert caplog.text.count("trailers over 65536 bytes") == 1  # (one a field: ~10,000 lines)


def test_a_head_over_the_limit_in_one_read_is_a_431_too():
    """A head arriving whole (or in two reads) was not counted: up to ~128 KiB got through."""
    one_header, many_headers, fine = answers_to([
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 95) for i in range(700)) + b"\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"a" * 60_000 + b"\r\n\r\n",
    ])
    for answer in (one_header, many_headers):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 "), head[:100]
        assert json.loads(body)["path"] == "/x"
    assert fine.startswith(b"HTTP/1.1 200 ")


def test_an_unknown_method_behind_a_request_in_the_same_read_is_a_400_after_its_answer():
    """uvicorn wrote the 400 at once and closed: /first's answer never came, and the client
    read the 400 as /first's. The 400 leaves the path out: its line is not where the read began
    (no path rather than another request's)."""
    answer = answers_to([b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nFOO /second HTTP/1.1\r\nHost: x\r\n\r\n"])[0]
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 2
    second = answer[answer.index(b"HTTP/1.1 ", 1):]
    assert second.startswith(b"HTTP/1.1 400 ")
    error = json.loads(second.partition(b"\r\n\r\n")[2])
    assert error["path"] == "" and error["message"] == "The request is not valid HTTP/1.1."


def _behind_slow(first: bytes, later: bytes, seen: list | None = None) -> tuple[bytes, list[bytes]]:
    """`first` (beginning with /slow, which waits for `release`), then `later` on the same
    connection once /slow is read: what came before /slow was released (must be nothing),
    and every answer after, in order."""
    async def scenario(port, release):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(0.1)  # /slow is read and waits for `release`; what came with it waits behind it
        writer.write(later)
        await writer.drain()
        early = await _read_to_close(reader, 0.5)  # nothing may come before /slow is answered
        release.set()
        rest = await _read_to_close(reader)
        writer.close()
        return early, rest

    early, rest = serve_stub(scenario, seen=seen)
    return early, [b"HTTP/1.1 " + a for a in rest.split(b"HTTP/1.1 ")[1:]]


def test_a_bad_head_behind_a_request_being_answered_waits_for_that_answer():
    early, answers = _behind_slow(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /queued HTTP/1.1\r\nHost: x\r\n\r\n",
                                  b"GET /x HTTP/1.2\r\nHost: x\r\n\r\n")
    assert early == b""
    assert [a[9:12] for a in answers] == [b"200", b"200", b"400"]
    assert json.loads(answers[2].partition(b"\r\n\r\n")[2])["path"] == "/x"


def test_a_broken_body_is_a_400_at_once():
    answer = answers_to([b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n"])[0]
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1


def test_a_broken_body_behind_a_request_being_answered_waits_for_that_answer_and_never_runs():
    """Before: the 400 was written at once, ahead of /slow's answer (read as its answer), and
    the connection closed under /slow."""
    ran = []
    early, answers = _behind_slow(
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /queued HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /broken HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n",
        seen=ran,
    )
    assert early == b""
    assert [a[9:12] for a in answers] == [b"200", b"200", b"400"]
    assert json.loads(answers[2].partition(b"\r\n\r\n")[2])["path"] == "/broken"
    assert ran == ["/slow", "/queued"]  # the broken request never reached the application


def test_what_httptools_cannot_parse_is_a_400_in_the_error_body():
    """(A target over the head limit is a 431 with the rest of the head.)"""
    for answer in answers_to([b"FOO /x HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /x?token=secret HTTP/1.2\r\nHost: x\r\n\r\n"]):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), head[:100]
        assert b"content-type: application/json" in head.lower()
        error = json.loads(body)
        assert ERROR_KEYS <= set(error) and error["message"] == "The request is not valid HTTP/1.1."
        assert error["path"] == "/x"  # (the query left out: it may hold a token)


def test_an_http_1_1_request_without_a_host_is_a_400_and_http_1_0_may_leave_it_out():
    """RFC 9112, 3.2: a server must answer 400 to an HTTP/1.1 request without Host (uvicorn
    served it). HTTP/1.0 has no such rule. A request behind one being answered waits its turn."""
    no_host, old_http, with_host = answers_to([
        b"GET /x?token=secret HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhOsT: x\r\nConnection: close\r\n\r\n",
    ])
    head, _, body = no_host.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower(), head[:200]
    error = json.loads(body)
    assert ERROR_KEYS <= set(error) and error["path"] == "/x"
    assert error["message"] == "The request is not valid HTTP/1.1: it has no Host header."
    assert old_http.startswith(b"HTTP/1.1 200 ") and with_host.startswith(b"HTTP/1.1 200 ")
    early, answers = _behind_slow(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /later HTTP/1.1\r\n\r\n")
    assert early == b"" and [a[9:12] for a in answers] == [b"200", b"400"]


def test_a_refused_head_asking_for_a_websocket_is_answered_not_upgraded(caplog):
    """A WebSocket handshake without Host, or with a head over the limit in one read: uvicorn
    upgraded it after the refusal, with no method in its scope, and asyncio logged "Fatal error:
    protocol.data_received() call failed" with a KeyError traceback (a review)."""
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    with caplog.at_level(logging.WARNING):
        no_host, too_big = answers_to([
            b"GET /ws/ops/ HTTP/1.1\r\n" + upgrade + b"\r\n",
            b"GET /ws/ops/ HTTP/1.1\r\nHost: x\r\n" + upgrade + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        ])
    assert no_host.startswith(b"HTTP/1.1 400 ") and too_big.startswith(b"HTTP/1.1 431 "), (no_host[:80], too_big[:80])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Unsupported upgrade request" not in caplog.text
