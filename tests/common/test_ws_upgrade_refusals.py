"""A socket upgrade the WebSocket library refuses (a request line or header line over 8 KiB, too
many headers) is answered at once, in the API's error body, under the real server with the
deployed protocol (common.wsprotocol). Under uvicorn's own protocol the client heard nothing
and the connection stayed open until the client gave up."""
import json
import re
import socket
from pathlib import Path

import pytest
from django.conf import settings

from tests.processes import free_port, served

PROTOCOL = "common.wsprotocol:WebSocketProtocol"
UPGRADE_HEADERS = [
    "Host: 127.0.0.1",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
]
ERROR_KEYS = {"statusCode", "timestamp", "path", "message", "error"}


@pytest.fixture
def server(transactional_db, tmp_path):
    with served(tmp_path) as port_and_log:
        yield port_and_log


def exchange(port: int, target: str, headers: list[str]) -> bytes:
    """Send an upgrade request; everything the server sends until it closes (or, for an accepted
    socket, its handshake answer). A server that never answers fails on the timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {target} HTTP/1.1\r\n{''.join(h + chr(13) + chr(10) for h in headers)}\r\n".encode())
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
            if received.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in received:
                break
        return received


def parse(answer: bytes) -> tuple[int, dict, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    fields = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:])}
    assert int(fields.get("content-length", 0)) == len(body)
    return status, fields, json.loads(body) if body else {}


def test_a_refused_upgrade_is_answered_at_once_with_the_error_body(server):
    port, log_path = server
    token = "t" * 9000

    status, fields, body = parse(exchange(port, f"/ws/track/1/?token={token}", UPGRADE_HEADERS))
    assert status == 414
    assert fields["content-type"] == "application/json"
    assert fields["connection"] == "close"
    assert ERROR_KEYS <= set(body)
    assert body["statusCode"] == 414 and body["error"] == "Request-URI Too Long"
    assert body["path"] == "/ws/track/1/"  # the query, which may hold a token, is not echoed
    assert body["message"] == "The request line is too long (at most 8192 bytes)."

    status, _, body = parse(exchange(port, "/ws/ops/", [*UPGRADE_HEADERS, "Cookie: sessionid=" + "c" * 9000]))
    assert (status, body["statusCode"], body["path"]) == (431, 431, "/ws/ops/")
    assert body["message"] == "A request header is too long (at most 8192 bytes a line)."

    many = [f"X-Extra-{n}: {n}" for n in range(130)]
    status, _, body = parse(exchange(port, "/ws/ops/", [*UPGRADE_HEADERS, *many]))
    assert (status, body["message"]) == (431, "The request has too many headers (at most 128).")

    # a request the library cannot take as an upgrade at all (a body announced on a GET upgrade)
    status, _, body = parse(exchange(port, "/ws/ops/", [*UPGRADE_HEADERS, "Transfer-Encoding: chunked"]))
    assert (status, body["message"]) == (400, "The request is not a valid WebSocket upgrade.")

    # upgrades the library parses but will not accept: its plain-text answer was sent as is
    headers = [h for h in UPGRADE_HEADERS if not h.startswith("Sec-WebSocket-Version")]
    status, fields, body = parse(exchange(port, f"/ws/track/1/?token={token[:50]}", [*headers, "Sec-WebSocket-Version: 8"]))
    assert (status, fields["content-type"], fields["connection"]) == (400, "application/json", "close")
    assert ERROR_KEYS <= set(body) and (body["statusCode"], body["error"]) == (400, "Bad Request")
    assert body["path"] == "/ws/track/1/"
    assert body["message"] == "Failed to open a WebSocket connection: invalid Sec-WebSocket-Version header: 8."
    headers = [h for h in UPGRADE_HEADERS if not h.startswith("Sec-WebSocket-Key")]
    status, _, body = parse(exchange(port, "/ws/ops/", headers))
    assert (status, body["message"]) == (400, "Failed to open a WebSocket connection: missing Sec-WebSocket-Key header.")
    headers = [h for h in UPGRADE_HEADERS if not h.startswith("Connection")]
    status, fields, body = parse(exchange(port, "/ws/ops/", [*headers, "Connection: keep-alive"]))
    assert (status, body["statusCode"], fields["upgrade"]) == (426, 426, "websocket")  # (plain HTTP: config.views)
    assert body["message"].startswith("This is a WebSocket endpoint")
    assert exchange(port, "/ws/ops/", [*headers, "Connection: keep-alive, Upgrade"]).startswith(b"HTTP/1.1 101")

    # the path is echoed, but not a huge one whole
    status, _, body = parse(exchange(port, "/ws/" + "p" * 9000, UPGRADE_HEADERS))
    assert (status, body["path"]) == (414, "/ws/" + "p" * 252)

    # An upgrade within the limits still reaches the application (which closes a socket with no
    # token with 4401 after accepting it), and nothing above was logged as an error.
    assert exchange(port, "/ws/ops/?token=" + "t" * 8000, UPGRADE_HEADERS).startswith(b"HTTP/1.1 101")
    assert "Traceback" not in log_path.read_text()
    assert token not in log_path.read_text()


@pytest.mark.parametrize("path", [
    "deploy/supervisord.conf", "deploy/cluster/supervisord.conf", "Dockerfile", "docs/operations.md",  # its systemd unit
])
def test_every_deployed_web_process_runs_both_protocols(path):
    """This one (refusals answered) and common.httpprotocol's (a request's head bounded)."""
    text = (Path(settings.BASE_DIR) / path).read_text()
    commands = [line for line in text.splitlines() if re.search(r'(bin/uvicorn|"uvicorn",) "?config\.asgi', line)]
    assert commands, f"no uvicorn command found in {path}"
    for command in commands:
        assert re.search(rf'--ws"?,? "?{re.escape(PROTOCOL)}', command), command
        assert re.search(r'--http"?,? "?common\.httpprotocol:HttpToolsProtocol', command), command


def _frames(data: bytes):
    """(opcode, payload) of the server's (unmasked) frames in `data`."""
    i = 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        yield opcode, data[i:i + length]
        i += length


def test_a_text_message_that_is_not_utf8_closes_with_1007_and_one_warning_line(server):
    from tests.api import token_for
    from tests.factories import OpsUserFactory

    port, log_path = server
    token = token_for(OpsUserFactory())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        head = f"GET /ws/ops/?token={token} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in UPGRADE_HEADERS) + "\r\n"
        conn.sendall(head.encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += conn.recv(65536)
        assert received.startswith(b"HTTP/1.1 101")
        received = received.partition(b"\r\n\r\n")[2]
        conn.sendall(masked(0x81, b"\xc3\x28"))  # a text frame, not UTF-8
        while chunk := conn.recv(65536):
            received += chunk
    closes = [payload for opcode, payload in _frames(received) if opcode == 0x8]
    assert closes and int.from_bytes(closes[0][:2], "big") == 1007
    # the same frame and the client's own close in one read: the close handshake is under way
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head.encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += conn.recv(65536)
        conn.sendall(masked(0x81, b"\xc3\x28") + masked(0x88, (1000).to_bytes(2, "big")))
        while chunk := conn.recv(65536):
            received += chunk
    log = log_path.read_text()
    assert "Traceback" not in log and "Fatal error" not in log and token not in log
    assert log.count("WebSocket /ws/ops/: a text message that is not UTF-8; closed (1007).") == 2


def masked(first_byte: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes([first_byte, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_socket_whose_channel_layer_fails_is_answered_503_and_logged_once(transactional_db, tmp_path):
    """Redis unreachable while a socket connects: uvicorn answered 500 with a traceback ("Exception
    in ASGI application"); then, with the consumers' 503, still logged "ASGI callable returned
    without completing handshake" as an ERROR for each. Now a 503 in the error body with
    Retry-After, and one warning line."""
    from tests.api import token_for
    from tests.factories import OpsUserFactory

    token = token_for(OpsUserFactory())
    with served(tmp_path, TEST_REDIS_URL="redis://127.0.0.1:1/15") as (port, log_path):  # (nothing listens on port 1)
        status, fields, body = parse(exchange(port, f"/ws/ops/?token={token}", UPGRADE_HEADERS))
    assert status == 503 and fields["retry-after"] == "1" and fields["content-type"] == "application/json"
    assert set(body) >= ERROR_KEYS and body["path"] == "/ws/ops/"
    log = log_path.read_text()
    assert "Traceback" not in log and '"ERROR"' not in log and " ERROR " not in log, log[-3000:]
    assert log.count("OpsConsumer refused (503)") == 1


def test_a_client_that_answers_no_ping_is_closed_1013_to_reload():
    """A client that stopped reading leaves the keepalive ping unanswered: uvicorn closed it with
    1011 ("internal error", documented as a check that could not run) before its queue of 1,000
    events could fill (a socket audit: the kernel's buffers held ~1,900 events). Now 1013, as a
    socket that falls behind: reconnect and reload. (uvicorn in process, pings every 0.2 s.)"""
    import asyncio
    import struct

    import uvicorn

    from common.wsprotocol import WebSocketProtocol

    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (await receive())["type"] != "websocket.disconnect":
                pass

    async def scenario(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(("GET /ws/x/ HTTP/1.1\r\n" + "".join(h + "\r\n" for h in UPGRADE_HEADERS) + "\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        frames = []
        while True:  # (reads what comes, answers nothing)
            first, second = await asyncio.wait_for(reader.readexactly(2), 10)
            payload = await reader.readexactly(second & 0x7F)
            frames.append((first & 0x0F, payload))
            if first & 0x0F == 0x8:
                writer.close()
                return frames

    async def main():
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ws=WebSocketProtocol, lifespan="off",
                                               log_config=None, ws_ping_interval=0.2, ws_ping_timeout=0.2))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            return await scenario(port)
        finally:
            server.should_exit = True
            await task

    frames = asyncio.run(main())
    assert [opcode for opcode, _ in frames] == [0x9, 0x8], frames  # one ping, then the close
    code, reason = struct.unpack("!H", frames[-1][1][:2])[0], frames[-1][1][2:].decode()
    assert (code, reason) == (1013, "keepalive ping timeout: the client is not reading")
