"""uvicorn's HTTP/1.1 protocol (httptools) with bounds on a request's head.

Every web process runs uvicorn with `--http common.httpprotocol:HttpToolsProtocol` (deploy/, the
Dockerfile, tests.processes, the benches). httptools has no limit of its own: one header of 8 MB
was taken whole, an unfinished header of 128 MB held ~218 MB of a web process until the client
closed, and a connection that never finished its first request's head stayed open for good
(uvicorn's keep-alive timeout runs only after a response). Here:

- a head (request line and headers) over HTTP_MAX_HEAD_BYTES (64 KiB) is answered 431 in the
  API's error body and the connection closed: a complete head by its exact size; one still
  arriving by the bytes received while it is incomplete (httptools holds a header line whole
  before it reports it), counting no read in which a head or a body ended (it may hold the rest
  of a body), so an endless head is cut off within the limit and one read (asyncio reads at most
  256 KiB);
- a head not complete HTTP_HEAD_TIMEOUT_SECONDS (30) after the connection opened, or after the first
  bytes of a later request arrived, closes the connection without an answer (as the keep-alive
  timeout does). A request being answered is never cut: the timer only acts between requests;
- a head over the limit pipelined behind a request still being answered gets its 431 once that
  answer is sent (written before, it would be read as that request's answer), then the
  connection closes;
- a chunked body's trailers (fields after its last chunk, which uvicorn adds to the request's
  headers) count against the same limit; over it the connection is closed;
- what httptools cannot parse (an unknown method, a target over 64 KiB, HTTP/1.2, a broken chunked
  body) is a 400 in the API's error body (uvicorn's was plain text), sent after the answers to
  the requests before it on the connection (uvicorn wrote it at once and closed, and their
  answers were lost); a request queued with a broken body never runs. So is an HTTP/1.1
  request without a Host header (RFC 9112, 3.2: uvicorn served it; HTTP/1.0 may leave it out).

A body is not bounded here: the lean API refuses one over its limit before reading it
(common.middleware), and Django's own limits apply to forms."""
from __future__ import annotations

from http import HTTPStatus

import orjson
from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as UvicornHttpToolsProtocol

PATH_ECHO = 256
REFUSED_LINGER_SECONDS = 1.0


class HttpToolsProtocol(UvicornHttpToolsProtocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0
        self._head_moved = False  # a head or a message ended in the chunk being fed
        self._refused = False
        self._has_host = False
        self._trailer_bytes = 0
        self._head_size = 0
        self._head_started = False
        self._head_timer = None
        self._chunk_starts_head = False  # the chunk being fed began a request's head: its first line is the request line
        self._chunk = b""
        self._deferred_answer = None  # a 400 waiting for the answers to the requests before it
        self._running = None  # the request whose application runs (uvicorn's `cycle` is the last one read)
        self._max_head_bytes = settings.HTTP_MAX_HEAD_BYTES
        self._head_timeout = settings.HTTP_HEAD_TIMEOUT_SECONDS
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self._head_timeout > 0:
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head behind a request still being answered: later
            return
        self.logger.info("HTTP connection closed: no complete request head in %g s.", self._head_timeout)
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    # Parser callbacks. Once refused, the rest of what the parser already holds is ignored.

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._head_size = 0  # the request line's target and the headers, exactly
        self._head_started = True
        self._has_host = False
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        if not self._in_head and self._max_head_bytes > 0:  # a trailer, after a chunked body
            self._trailer_bytes += len(name) + len(value)
            if self._trailer_bytes > self._max_head_bytes:
                self.logger.warning("HTTP connection closed: trailers over %d bytes.", self._max_head_bytes)
                self._refused = True
                self.transport.close()
                return
        self._head_size += len(name) + len(value) + 4
        if self._in_head and name.lower() == b"host":
            self._has_host = True
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if not self._has_host and self.parser.get_http_version() == "1.1" and not self._head_size > self._max_head_bytes > 0:
            self._answer_400("The request is not valid HTTP/1.1: it has no Host header.", linger=True)
            return
        self._in_head, self._head_moved, self._trailer_bytes, self._head_started = False, True, 0, False
        self._disarm_head_timer()
        if self._head_size > self._max_head_bytes > 0:  # a head that came whole in one or two reads
            self._refuse_head()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_head, self._head_bytes, self._head_moved = True, 0, True
        self._chunk_starts_head = False  # a later head in this chunk starts somewhere inside it

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what httptools cannot parse (a method it does not know, a target
        over 64 KiB, HTTP/1.2, a folded header, a broken chunked body): in the API's error body,
        not plain text. A request that came behind requests still being answered gets it after
        their answers (uvicorn wrote it at once and closed: the answer before it was lost, and
        the client read the 400 as that request's); one with a broken body is then taken off
        the queue, never run. A broken body of the request being run: at once (its application
        sees the connection close)."""
        self._answer_400("The request is not valid HTTP/1.1.")

    def _answer_400(self, message: str, *, linger: bool = False) -> None:
        """`linger`: no application runs for this request (its body may still be coming)."""
        self._disarm_head_timer()
        self._refused = True
        path = bytes(getattr(self, "url", b"") or b"").decode("latin1") or self._target_of_chunk()
        answer = raw_error_response(400, path, message, self.server_state.default_headers)
        # (a broken body of the request being run is answered at once: it is the one answering)
        if (self._in_head or self._unqueue(self.cycle)) and self._answering():
            self.flow.pause_reading()
            self._deferred_answer = answer
            return
        self.transport.write(answer)
        if linger:
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """After a refusal's answer: a close with the client's bytes unread (a body still
        coming) sends a reset, which can make the client lose the answer: end the sending side,
        drop what still comes for a moment, then close."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(REFUSED_LINGER_SECONDS, self.transport.close)

    def _should_upgrade(self) -> bool:
        # (a refused head asking for a WebSocket: uvicorn upgraded it anyway, with no method in
        # its scope, and logged a traceback for it)
        return not self._refused and super()._should_upgrade()

    def _unsupported_upgrade_warning(self) -> None:
        if not self._refused:
            super()._unsupported_upgrade_warning()

    def _start_asgi_task(self, cycle, app) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _unqueue(self, cycle) -> bool:
        """Take a request read behind others (queued, not started) off the connection's queue;
        False when it is not queued (it runs)."""
        if cycle is None or cycle is self._running:
            return False
        kept = [entry for entry in self.pipeline if entry[0] is not cycle]
        self.pipeline.clear()
        self.pipeline.extend(kept)
        self.cycle = kept[0][0] if kept else self._running  # (the last one read: the newest is on the left)
        return True

    def _answering(self) -> bool:
        """Requests read on this connection are still being answered (one running, more queued)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred_answer is not None and not self.transport.is_closing() and not self._answering():
            answer, self._deferred_answer = self._deferred_answer, None
            self.transport.write(answer)
            self._linger()

    def _target_of_chunk(self) -> str:
        """The target in the request line of a head httptools refused before it reported one (a
        method it does not know): read from the chunk being fed when that head began it, else ""."""
        if not self._chunk_starts_head:
            return ""
        parts = self._chunk.split(b"\r\n", 1)[0].split(b" ")
        return parts[1].decode("latin1") if len(parts) == 3 and parts[1].startswith(b"/") else ""

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client sends after the 431 is dropped until the connection closes
        self._chunk_starts_head = self._in_head and self._head_bytes == 0 and not self._head_started
        self._chunk = data[:PATH_ECHO + 64] if self._chunk_starts_head else b""  # (the request line's start only)
        self._head_moved = False
        super().data_received(data)
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # refused, or now a socket
            return
        if self._head_started:  # a head begun and not complete: timed (a whole one costs no timer)
            self._arm_head_timer()
        if self._in_head and not self._head_moved:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head_bytes > 0:
                self._refuse_head()

    def _refuse_head(self) -> None:
        self._disarm_head_timer()
        self._refused = True  # what the client sends from now on is dropped
        self.logger.warning("HTTP request refused: its head is over %d bytes.", self._max_head_bytes)
        path = bytes(getattr(self, "url", b"") or b"").decode("latin1")
        message = f"The request's line and headers are too large (at most {self._max_head_bytes:,} bytes)."
        answer = raw_error_response(431, path, message, self.server_state.default_headers)
        if self._answering():
            # pipelined behind requests still being answered: their answers first, then this one
            self.flow.pause_reading()
            self._deferred_answer = answer
            return
        self.transport.write(answer)
        self._linger()


def raw_error_response(status: int, target: str, message: str, default_headers=()) -> bytes:
    """A whole HTTP/1.1 response in the API's error body, written by a protocol before any
    application runs: the path of `target` without its query (it may hold a token), at most
    PATH_ECHO characters; `Connection: close`."""
    from common.errors import error_body  # Django is set up once the application is loaded

    body = orjson.dumps(error_body(status, target.split("?", 1)[0][:PATH_ECHO], message))
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in default_headers]
    head += [b"content-type: application/json", b"content-length: " + str(len(body)).encode(), b"connection: close",
             b"x-content-type-options: nosniff"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body
