"""uvicorn's WebSocket protocol, answering the upgrades it refuses before the application sees them.

Every web process runs uvicorn with `--ws common.wsprotocol:WebSocketProtocol` (deploy/, the
Dockerfile, tests.processes). uvicorn 0.54's default protocol (websockets-sansio) hands the
upgrade request to the websockets library, which refuses a request line or a header line over
8 KiB (a long `?token=`, a large cookie) or more than 128 headers, and queues its refusal (414 or
431); uvicorn writes the library's output only when the library reports an event, and a refusal
is none. The client heard nothing until its own timeout and the connection stayed open until
the client closed it. Here the refusal is answered at once, in the API's error body, and the
connection is closed.

A client that leaves the server's keepalive ping unanswered for its timeout (20 s: it stopped
reading, its events piling up in the kernel's buffers before they reach the socket's queue) is
closed with 1013, as a socket that falls behind its queue is (common.channels._SocketQueue):
reconnect and reload. uvicorn closed it with 1011 ("internal error"), which the API documents as
a check that could not run.

An upgrade the library parses but will not accept (no `Sec-WebSocket-Key`, a version other than
13, a method other than GET) and the answers uvicorn builds itself (a 500 when the application
fails before accepting) go through the library's `reject`, which wrote a plain-text body; here
`reject` writes the API's error body too."""
from __future__ import annotations

from http import HTTPStatus

import orjson
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.datastructures import Headers
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from common.httpprotocol import PATH_ECHO, raw_error_response



def _refusal(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, RequestLineTooLong):
        return 414, f"The request line is too long (at most {MAX_LINE_LENGTH} bytes)."
    if isinstance(exc, HeaderLineTooLong):
        return 431, f"A request header is too long (at most {MAX_LINE_LENGTH} bytes a line)."
    if isinstance(exc, TooManyHeaders):
        return 431, f"The request has too many headers (at most {MAX_NUM_HEADERS})."
    return 400, "The request is not a valid WebSocket upgrade."


def _echo(target: str) -> str:
    return target.split("?", 1)[0][:PATH_ECHO]


def _path(request: bytes) -> str:
    """The request target's path (no query: it may carry a token; at most PATH_ECHO characters),
    from the request line uvicorn rebuilt from what it parsed: `METHOD SP target SP HTTP/1.1`."""
    parts = request.split(b"\r\n", 1)[0].split(b" ")
    target = parts[1] if len(parts) > 2 else b""
    return _echo(target.decode("latin1"))


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._target = ""
        self.conn.reject = self._reject

    def handle_connect(self, event) -> None:
        self._target = event.path
        super().handle_connect(event)

    def _reject(self, status, text: str) -> Response:
        """The library's refusal (status, headers such as `Allow` or `Upgrade` that the caller adds
        afterwards), with the API's error body in place of its text."""
        from common.errors import error_body

        response = ServerProtocol.reject(self.conn, status, text)
        message = " ".join(text.split()) or HTTPStatus(response.status_code).phrase + "."
        body = orjson.dumps(error_body(response.status_code, _echo(self._target), message))
        headers = Headers([(k, v) for k, v in response.headers.raw_items() if k.lower() not in ("content-type", "content-length")])
        headers["Content-Length"] = str(len(body))
        headers["Content-Type"] = "application/json"
        return Response(response.status_code, response.reason_phrase, headers, body)

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, but a text message that is not UTF-8 (the client's fault: closed with 1007
        as before) is one WARNING line, not an ERROR with a traceback that anyone holding a
        tracking link could fill the logs with."""
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            try:
                data.decode()
            except UnicodeDecodeError:
                self.frames = []
                self.logger.warning("WebSocket %s: a text message that is not UTF-8; closed (1007).", _echo(self._target))
                if self.conn.state is State.OPEN:  # (a close frame read with it: the handshake is under way)
                    self.conn.send_close(1007)
                    self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def keepalive_timeout(self) -> None:
        """uvicorn's, closing with 1013 (see above) rather than 1011."""
        self.pong_timer = None
        self.pending_ping_payload = None
        if self.close_sent or self.transport.is_closing():
            return
        self.conn.fail(1013, "keepalive ping timeout: the client is not reading")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None and not self.transport.is_closing():
            self._refuse(self.conn.handshake_exc, data)

    async def send(self, message) -> None:
        """uvicorn's, but
        - an HTTP answer to the handshake (`websocket.http.response.*`: the consumers' 503 when
          the channel layer fails) completes it: uvicorn logged "ASGI callable returned without
          completing handshake" as an ERROR for each such answer;
        - an accept for a client that left meanwhile raises ClientDisconnected, as any other
          send to it does: uvicorn dropped the accept, and the consumer's next send raised
          RuntimeError ("Expected ASGI message 'websocket.accept' … but got 'websocket.send'")
          with a traceback (a socket audit: handshakes taking seconds under overload)."""
        if message["type"] == "websocket.accept" and not self.handshake_complete and self.transport.is_closing():
            raise ClientDisconnected()
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True

    def _refuse(self, exc: Exception, request: bytes) -> None:
        status, message = _refusal(exc)
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(raw_error_response(status, _path(request), message, self.default_headers))
        self.transport.close()
