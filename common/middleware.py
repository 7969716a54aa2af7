from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import zoneinfo
from functools import lru_cache
from urllib.parse import urlsplit

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.core.signals import setting_changed
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, JsonResponse
from django.http.request import split_domain_port, validate_host
from django.urls import Resolver404, resolve
from django.utils import timezone as dj_timezone
from whitenoise.middleware import WhiteNoiseMiddleware

from common import metrics
from common.errors import INVALID_HOST_MESSAGE, body_too_large_message, error_body, error_response, response_for_exception
from common.logfilters import new_request_id, request_id
from common.parsers import PARSED_ATTR, BodyRejected, load_json_body, unusable_charset
from common.validators import URL_UNSAFE_CHARS

logger = logging.getLogger(__name__)

API_PREFIXES = ("/v2/", "/health", "/metrics", "/proofs/")  # /proofs/: the signed proof-file links the API hands out
# Paths machines call that are not the API (no token, no JSON body: Twilio's signed form posts):
# their errors, even those refused before any view, are in the API's error body too.
HOOK_PREFIXES = ("/hooks/",)


def error_body_path(path: str) -> bool:
    """Whether an error on `path` is answered in the API's error body (not a page's text)."""
    return path.startswith(API_PREFIXES + HOOK_PREFIXES) or path == "/v2"


# The paths of pages (HTML for people); a URL that is neither under these nor the API's is
# answered in the API's error body (a client that got a path wrong, `/v3/…`, `/nope`).
PAGE_PREFIXES = ("/admin/", "/support/", "/track/", "/static/", "/media/")


def _is_api(request) -> bool:
    return request.path.startswith(API_PREFIXES) or request.path == "/v2"


class AsyncCapableMiddleware:
    """Runs in the server's mode: under ASGI a sync-only middleware costs a thread hop per
    request on each side of it, which on the hottest endpoints was the largest single cost."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self.process(request, self.get_response(request))

    async def __acall__(self, request):
        return self.process(request, await self.get_response(request))

    def process(self, request, response):
        return response


class RequestIdMiddleware(AsyncCapableMiddleware):
    """`X-Request-ID`: taken from a trusted proxy (REQUEST_ID_TRUSTED_PROXIES), else made
    here; on every log line of the request (and the tasks it enqueues) and in the response."""

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        token = self._begin(request)
        try:
            return self.process(request, self.get_response(request))
        finally:
            request_id.reset(token)

    async def __acall__(self, request):
        token = self._begin(request)
        try:
            return self.process(request, await self.get_response(request))
        finally:
            request_id.reset(token)

    @staticmethod
    def _begin(request):
        trusted = request.META.get("REMOTE_ADDR") in settings.REQUEST_ID_TRUSTED_PROXIES
        request.request_id = new_request_id(request.headers.get("X-Request-ID") if trusted else None)
        return request_id.set(request.request_id)

    def process(self, request, response):
        response.headers["X-Request-ID"] = request.request_id
        return response


class OpsTimeZoneMiddleware:
    """The ops console (admin) and the support views show times in OPS_TIME_ZONE; the API, the
    tracking page and everything else stay UTC. Activated for the request, reset after it."""

    sync_capable = True
    async_capable = True
    PREFIXES = ("/admin/", "/support/")

    def __init__(self, get_response):
        self.get_response = get_response
        self.zone = zoneinfo.ZoneInfo(settings.OPS_TIME_ZONE)
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        if not request.path.startswith(self.PREFIXES):
            return self.get_response(request)
        dj_timezone.activate(self.zone)
        try:
            return self.get_response(request)
        finally:
            dj_timezone.deactivate()

    async def __acall__(self, request):
        if not request.path.startswith(self.PREFIXES):
            return await self.get_response(request)
        dj_timezone.activate(self.zone)
        try:
            return await self.get_response(request)
        finally:
            dj_timezone.deactivate()


class ApiHeadersMiddleware(AsyncCapableMiddleware):
    """The response headers Django's SecurityMiddleware, XFrameOptionsMiddleware and
    CommonMiddleware give an API response, without their thread hops: the lean stack for
    token-authenticated API requests (config/asgi.py) uses this in their place."""

    def process(self, request, response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if settings.SECURE_REFERRER_POLICY:
            response.headers.setdefault("Referrer-Policy", settings.SECURE_REFERRER_POLICY)
        if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
            response.headers.setdefault("Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY)
        if settings.SECURE_HSTS_SECONDS and request.is_secure():
            response.headers.setdefault("Strict-Transport-Security", f"max-age={settings.SECURE_HSTS_SECONDS}"
                                        + ("; includeSubDomains" if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS else ""))
        if not response.streaming and "Content-Length" not in response.headers:
            response.headers["Content-Length"] = str(len(response.content))
        return response


def _asset_origin(url: str) -> str | None:
    """The origin a browser fetches an absolute URL from, for a CSP source list (a tile
    template's `{s}` subdomain as `*.`); None for a path on this server."""
    if url.startswith("//"):  # scheme-relative: the page's own, https in production
        url = "https:" + url
    parts = urlsplit(url.replace("{s}", "sub"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.netloc.rsplit("@", 1)[-1]
    if "{s}" in urlsplit(url).netloc:
        host = "*." + host.split(".", 1)[1] if "." in host else host
    return f"{parts.scheme}://{host}"


@lru_cache(maxsize=64)
def _page_csp(tile_urls: tuple[str, ...], leaflet_url: str, host: str = "") -> str:
    tiles = " ".join(sorted({o for o in map(_asset_origin, tile_urls) if o}))
    leaflet = _asset_origin(leaflet_url) or ""
    return "; ".join(" ".join(part.split()) for part in [
        "default-src 'self'", f"script-src 'self' 'unsafe-inline' {leaflet}", f"style-src 'self' 'unsafe-inline' {leaflet}",
        f"img-src 'self' data: blob: {tiles} {leaflet}", "font-src 'self' data:",
        # (ws: and wss: to this host named too: older browsers did not count them as 'self')
        "connect-src 'self'" + (f" ws://{host} wss://{host}" if host else ""),
        "object-src 'none'", "base-uri 'self'", "form-action 'self'", "frame-ancestors 'none'",
    ])


def _host_of(request) -> str:
    try:
        return request.get_host()
    except Exception:  # (DisallowedHost: refused before any page; no socket to name then)
        return ""


class PageCspMiddleware(AsyncCapableMiddleware):
    """A Content-Security-Policy on every HTML page (the ops console, /support/, /track/),
    unless its view set its own (the API docs pages: config/views.py DOCS_CSP). Scripts and
    styles load from this server only (inline ones allowed: the admin's, django-leaflet's
    widget, ours), images from here and the map tile servers (OPS_MAP_TILE_URL,
    TRACKING_TILE_URL), sockets and fetches to here only; no plugins, frames or off-site form
    posts. STYLE: nothing from a CDN; the browser now refuses what a template might slip in."""

    # The customer's /track/ links hold their token: every answer there is private and refers
    # nowhere, those Django makes outside the views too (a 405, the 404 of a malformed id, a
    # request guard's 400), which came with no Cache-Control and `same-origin`.
    LINK_PATH = "/track/"
    LINK_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}

    def process(self, request, response):
        if request.path.startswith(self.LINK_PATH):
            for name, value in self.LINK_HEADERS.items():
                response.headers[name] = value
        if "Content-Security-Policy" not in response.headers and response.get("Content-Type", "").startswith("text/html"):
            response.headers["Content-Security-Policy"] = _page_csp(
                (settings.OPS_MAP_TILE_URL, settings.TRACKING_TILE_URL), settings.TRACKING_LEAFLET_URL, _host_of(request),
            )
        return response


class StaticFilesMiddleware(AsyncCapableMiddleware, WhiteNoiseMiddleware):
    """WhiteNoise (admin CSS/JS from the app server), async-capable."""

    def __init__(self, get_response):
        WhiteNoiseMiddleware.__init__(self, get_response)
        AsyncCapableMiddleware.__init__(self, get_response)

    def _static_file(self, request):
        return self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        static_file = self._static_file(request)
        return self.serve(static_file, request) if static_file is not None else self.get_response(request)

    async def __acall__(self, request):
        static_file = self._static_file(request)
        if static_file is not None:
            return self.serve(static_file, request)
        return await self.get_response(request)


_KEPT_ERROR_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


class ApiErrorMiddleware(AsyncCapableMiddleware):
    """API paths always answer in the SPEC's error body, even for errors raised outside DRF
    (unknown URLs, wrong path converters, unexpected exceptions); so does a URL that matches
    nothing outside the pages (it was Django's HTML "Not Found")."""

    def process(self, request, response):
        if (
            (_is_api(request) or (response.status_code == 404 and not (request.path + "/").startswith(PAGE_PREFIXES)))
            and response.status_code >= 400
            and not isinstance(response, JsonResponse)
            and "json" not in response.get("Content-Type", "")
        ):
            messages = {404: "Not found.", 405: f'Method "{request.method}" not allowed.', 400: "Bad request."}
            replaced = error_response(request, response.status_code, messages.get(response.status_code, "Request failed."))
            for header in _KEPT_ERROR_HEADERS:  # what the client needs to act on the error
                if header in response:
                    replaced[header] = response[header]
            return replaced
        return response

    def process_exception(self, request, exception):
        from django.contrib.admin.exceptions import DisallowedModelAdminLookup

        if isinstance(exception, DisallowedModelAdminLookup) and not _is_api(request):
            return None  # (a console list's filter: AdminListGuardMiddleware sends it back to the list)
        mapped = response_for_exception(request, exception, api=_is_api(request))
        if mapped is not None or not _is_api(request):
            return mapped
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, 500, "Internal server error.")


# In API paths and query values: common.validators.URL_UNSAFE_CHARS. The
# pages (admin, support, tracking) refuse NUL only: a tab pasted into a search box is harmless.
_BAD_API_URL_CHARS = URL_UNSAFE_CHARS
_BAD_PAGE_URL_CHARS = re.compile("\x00")
# In header values a tab is allowed (RFC 9110 field-value); other control characters are not.
_BAD_HEADER_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_CHECKED_HEADERS = {"HTTP_AUTHORIZATION": "Authorization", "HTTP_IDEMPOTENCY_KEY": "Idempotency-Key"}
# The API takes JSON bodies, and multipart on the routes that take files (`allow_larger_body`):
# a body of another type is a 415 on any endpoint that takes the method, also one that reads
# no body, before its credentials are read (as a compressed or oversized body is).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A JSON body larger than this is parsed on a worker thread, not on the event loop.
_PARSE_IN_LOOP_MAX_BYTES = 64 * 1024


# Routes that take larger multipart bodies than API_MAX_BODY_BYTES (file uploads): (path
# pattern, limit in bytes, read when a request comes). Registered by the app that owns the
# route, at start-up (`allow_larger_body`), so this module names no route of a higher layer.
_LARGER_BODIES: list[tuple[re.Pattern, object]] = []


def allow_larger_body(pattern: str, limit) -> None:
    """multipart/form-data requests whose path matches `pattern` may have a body of up to
    `limit()` bytes (any other body there keeps API_MAX_BODY_BYTES)."""
    compiled = re.compile(pattern)
    if all(p.pattern != compiled.pattern for p, _ in _LARGER_BODIES):
        _LARGER_BODIES.append((compiled, limit))


def _takes_files(path: str) -> bool:
    return any(pattern.match(path) for pattern, _ in _LARGER_BODIES)


def _endpoint_takes_method(request) -> bool:
    """The request's route is an API view with a handler for its method: elsewhere its 405 (or
    404) comes first, as it did (only asked about a body the API refuses: not on the hot path)."""
    match = _resolve(request)
    view_class = getattr(getattr(match, "func", None), "cls", None)
    return view_class is not None and hasattr(view_class, request.method.lower())


def body_limit(request) -> int:
    return body_limit_for(request.path, request.content_type)


def body_limit_for(path: str, content_type: str) -> int:
    if content_type.lower() == "multipart/form-data":
        for pattern, limit in _LARGER_BODIES:
            if pattern.match(path):
                return max(settings.API_MAX_BODY_BYTES, limit())
    return settings.API_MAX_BODY_BYTES


class EarlyBodyLimit:
    """ASGI, in front of Django for API paths: a body larger than the route takes is a 413
    before it is read. Django's handler reads the whole body (to a temporary file past 2.5 MB)
    before any middleware runs, so without this a client could make the server store 200 MB,
    or wait on a body announced but never sent, just to be told it is too large.

    A request with neither Content-Length nor chunked encoding has no body and passes untouched.
    A declared Content-Length over the limit is answered without a byte reaching Django. A body
    without Content-Length (chunked) is read up to the limit and answered 413 past it, else
    handed to Django whole, with its Content-Length (Django's handler reads no body without
    one). A malformed Content-Length is left to RequestGuardMiddleware (400).

    Before a 413 the rest of the upload is read and thrown away, up to API_BODY_DRAIN_BYTES in
    API_BODY_DRAIN_SECONDS: a server that closes with the upload unread makes the kernel reset
    the connection, and a client still sending (most do: a phone uploading a photo) then sees
    a network error, not the 413, and retries. Not for a client that sent `Expect:
    100-continue` (it waits for our answer before sending), nor a declared body over the drain
    budget (answered at once; the server closes the connection).

    Other paths (the admin, /support/, /track/): a declared Content-Length over
    PAGE_MAX_BODY_BYTES is a plain-text 413 at once, the connection closed (a 300 MB post to the
    admin's login was spooled to disk before its 403); a chunked body there is counted as it
    streams to Django and refused the same way once past the limit (it was spooled whole)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not scope["path"].startswith("/v2/"):
            return await self._page(scope, receive, send)
        declared, content_type, chunked, expects_continue = None, "", False, False
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
            elif name == b"content-type":
                content_type = value.split(b";", 1)[0].strip().decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"expect":
                expects_continue = value.strip().lower() == b"100-continue"
        if declared is None and not chunked:  # no body (most GETs): nothing to judge
            return await self.app(scope, receive, send)
        limit = body_limit_for(scope["path"], content_type)
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False
            if too_large:
                if not expects_continue and int(declared) <= settings.API_BODY_DRAIN_BYTES:
                    if not await _drain(receive, settings.API_BODY_DRAIN_BYTES):
                        return None  # the client left
                return await self._refuse(scope, send, limit)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                if message.get("more_body", False) and not await _drain(receive, settings.API_BODY_DRAIN_BYTES - size):
                    return None
                return await self._refuse(scope, send, limit)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        # Django reads only as many bytes as Content-Length says (none without it): the body
        # now has a length.
        scope = {**scope, "headers": [*scope["headers"], (b"content-length", str(len(body)).encode())]}
        return await self.app(scope, replay, send)

    async def _page(self, scope, receive, send):
        headers = dict(scope["headers"])  # (a repeated header: its last value, enough to judge)
        limit = settings.PAGE_MAX_BODY_BYTES
        if limit > 0 and b"content-length" not in headers and b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return await self.app(scope, self._page_counted(scope, receive, send, limit), send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0  # (Django answers a malformed length)
        if not declared > limit > 0:
            return await self.app(scope, receive, send)
        expects_continue = headers.get(b"expect", b"").strip().lower() == b"100-continue"
        if not expects_continue and declared <= settings.API_BODY_DRAIN_BYTES:  # as for the API, above
            if not await _drain(receive, settings.API_BODY_DRAIN_BYTES):
                return None  # the client left
        await self._page_refuse(scope, send, limit)

    def _page_counted(self, scope, receive, send, limit: int):
        """`receive` for a chunked body to a page: passed through as it comes (Django spools it),
        counted; past `limit` the rest is drained within the budget, the plain 413 sent, and
        Django told the client left (its body read ends in RequestAborted: it sends nothing)."""
        size, refused = 0, False

        async def counted():
            nonlocal size, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    refused = True
                    if not message.get("more_body", False) or await _drain(receive, settings.API_BODY_DRAIN_BYTES - size):
                        await self._page_refuse(scope, send, limit)
                    return {"type": "http.disconnect"}
            return message

        return counted

    async def _page_refuse(self, scope, send, limit: int) -> None:
        if error_body_path(scope["path"]):  # (a hook: a machine reads the answer)
            return await self._refuse(scope, send, limit)
        body = f"Request body too large: at most {settings.PAGE_MAX_BODY_BYTES:,} bytes.".encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"), (b"x-request-id", new_request_id().encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _refuse(scope, send, limit: int) -> None:
        path = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        body = json.dumps(error_body(413, path, body_too_large_message(limit))).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"), (b"x-request-id", new_request_id().encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})


class RefusedHostsLog:
    """The log lines of a process's refused Hosts: at most LINES a WINDOW (WARNING: the client's
    request, not our failure), the next line saying how many were not. Django logs each at ERROR:
    a scanner without credentials filled the log and fired ERROR alerts. Every refusal is counted
    (`http_invalid_host_total`) all the same."""

    LINES, WINDOW = 10, 60.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.logger = logging.getLogger("django.security.DisallowedHost")
        self.window_start, self.logged, self.unlogged = float("-inf"), 0, 0

    def write(self, shown: str) -> None:
        now = self.clock()
        if now - self.window_start >= self.WINDOW:
            self.window_start, self.logged = now, 0
        if self.logged >= self.LINES:
            self.unlogged += 1
            return
        self.logged += 1
        unlogged, self.unlogged = self.unlogged, 0
        self.logger.warning(
            "Invalid HTTP_HOST header: %r. The host is not in ALLOWED_HOSTS.%s", shown,
            f" ({unlogged} more refused before this, not logged: at most {self.LINES} lines in {self.WINDOW:g} s)" if unlogged else "",
        )


class AllowedHostGuard:
    """ASGI, in front of everything HTTP (the location fast lane, the lean API stack, Django)
    and of the sockets: a Host header ALLOWED_HOSTS does not name is a 400, before anything reads
    the request, in the SPEC's error body outside the pages (a socket's handshake: a 403, as for a
    foreign Origin). Django checks the host only when something asks for it
    (CommonMiddleware, the full stack), so on the lean stack a token request with any Host was
    served, and a paginated list, whose `next` link asks for it, was a 500 (DisallowedHost); on
    the full stack the 400 was Django's HTML page. As `HttpRequest.get_host()`: the Host header
    (X-Forwarded-Host with USE_X_FORWARDED_HOST), repeated headers joined by a comma (invalid);
    a request without one is left to Django (it uses the server's name; one not allowed is a 400
    there too: common.errors.response_for_exception). The answers are remembered per Host value
    (a few hundred at most, forgotten when the settings change): ~4 µs a request otherwise, in
    front of every location fix."""

    MEMO_MAX = 256
    refusals_log = RefusedHostsLog()  # (one a process: the HTTP and the socket guards share it)

    def __init__(self, app):
        self.app = app
        self._memo: dict[bytes, bool] = {}
        setting_changed.connect(self._forget, weak=False)

    def _forget(self, *, setting, **kwargs):
        if setting in ("ALLOWED_HOSTS", "DEBUG", "USE_X_FORWARDED_HOST"):
            self._memo = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = self._host(scope["headers"])
            if host is not None:
                valid = self._memo.get(host)
                if valid is None:
                    valid = self._valid(host)
                    if len(self._memo) < self.MEMO_MAX:
                        self._memo[host] = valid
                if not valid:
                    return await self._refuse(scope, receive, send, host)
        return await self.app(scope, receive, send)

    @staticmethod
    def _host(headers) -> bytes | None:
        wanted = b"x-forwarded-host" if settings.USE_X_FORWARDED_HOST else b"host"
        values = [value for name, value in headers if name == wanted]
        if not values and wanted != b"host":
            values = [value for name, value in headers if name == b"host"]
        return b",".join(values) if values else None

    @staticmethod
    def _valid(host: bytes) -> bool:
        allowed = settings.ALLOWED_HOSTS
        if settings.DEBUG and not allowed:
            allowed = [".localhost", "127.0.0.1", "[::1]"]
        domain, _port = split_domain_port(host.decode("latin-1"))
        return bool(domain) and validate_host(domain, allowed)

    @staticmethod
    def _page(path: str) -> bool:
        """Whether `path` is a page's (HTML for people: its refusal in plain text). Anything
        else, the sockets' paths (a plain GET there) and unknown URLs included, is answered in
        the error body, as their other errors are (ApiErrorMiddleware)."""
        return path == "/" or (path + "/").startswith(PAGE_PREFIXES)

    def _log_refusal(self, shown: str) -> None:
        metrics.HTTP_INVALID_HOST.inc()
        self.refusals_log.write(shown)

    async def _refuse(self, scope, receive, send, host: bytes) -> None:
        self._log_refusal(host.decode("latin-1")[:255])
        if scope["type"] == "websocket":  # a close before the accept: the server answers the handshake 403
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close"})
            return
        if not self._page(scope["path"]):
            path = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
            body = json.dumps(error_body(400, path, INVALID_HOST_MESSAGE)).encode()
            content_type = b"application/json"
        else:
            body, content_type = b"Bad Request (400): invalid Host header.", b"text/plain; charset=utf-8"
        await send({"type": "http.response.start", "status": 400, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"), (b"x-request-id", new_request_id().encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive, budget: int) -> bool:
    """Read and drop the rest of a refused upload, at most `budget` bytes and
    API_BODY_DRAIN_SECONDS; False if the client left meanwhile (nobody to answer)."""
    read = 0
    try:
        async with asyncio.timeout(settings.API_BODY_DRAIN_SECONDS):
            while read <= budget:
                message = await receive()
                if message["type"] != "http.request":
                    return False
                read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        pass
    return True  # (over the budget or too slow: answered anyway; the server closes)


class RequestGuardMiddleware(AsyncCapableMiddleware):
    """Hostile input is refused before anything reads it (SPEC "Wire conventions": bad input
    never produces a 500).

    API paths: invalid characters in the path, a query key or value, or the Authorization or
    Idempotency-Key header are a 400; a body over `API_MAX_BODY_BYTES` is a 413; a JSON body
    is read here, once, by `common.parsers.load_json_body` (malformed, nested too deep, NaN,
    NUL or lone surrogates in a string: 400), so an endpoint that reads no body refuses a
    broken one too, and DRF's parser reuses what was read. Other paths: NUL in the path or
    the query string is a 400 (plain text)."""

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        refused = self.refuse(request)
        return refused if refused is not None else self.get_response(request)

    async def __acall__(self, request):
        # Under ASGI the body is already in memory (or a spooled file): a small one is checked
        # here, a large one on a worker thread.
        if _content_length(request) > _PARSE_IN_LOOP_MAX_BYTES:
            refused = await sync_to_async(self.refuse, thread_sensitive=False)(request)
        else:
            refused = self.refuse(request)
        return refused if refused is not None else await self.get_response(request)

    def refuse(self, request):
        charset = (request.content_params or {}).get("charset")
        charset_problem = charset is not None and unusable_charset(charset) and (
            f'The request\'s charset "{charset[:40]}" is not a text encoding: send UTF-8.')
        if not _is_api(request):
            if error_body_path(request.path):  # a hook: the API's error body and URL check, none of its parsing
                problem = _url_problem(request, _BAD_API_URL_CHARS) or charset_problem
                return error_response(request, 400, problem) if problem else None
            if _url_problem(request, _BAD_PAGE_URL_CHARS):
                return HttpResponse("Invalid characters in the URL.", status=400, content_type="text/plain; charset=utf-8")
            if charset_problem:  # (a form in it: Django's parsers failed with a 500)
                return HttpResponse(charset_problem, status=400, content_type="text/plain; charset=utf-8")
            return None
        problem = _url_problem(request, _BAD_API_URL_CHARS) or _header_problem(request) or charset_problem
        if problem:
            return error_response(request, 400, problem)
        length = _content_length(request)
        if length < 0:
            return error_response(request, 400, "Content-Length must be a whole number of bytes.")
        limit = body_limit(request)
        if length > limit:
            return error_response(request, 413, body_too_large_message(limit))
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if length and encoding not in ("", "identity"):
            # (read as it came, a gzip body was "malformed JSON" and a `br` one taken as is)
            response = error_response(request, 415, f'Content-Encoding "{encoding[:40]}" is not supported: send the body uncompressed.')
            response["Accept-Encoding"] = "identity"  # (RFC 9110 15.5.16: the codings a body may have)
            return response
        content_type = request.content_type.lower()
        if length and request.method in _BODY_METHODS and not (
            content_type == "application/json" or (content_type == "multipart/form-data" and _takes_files(request.path))
        ) and _endpoint_takes_method(request):
            # (every endpoint that reads a body refused it already; one that reads none ran with it)
            return error_response(request, 415, f'Unsupported media type "{content_type[:60]}" in request.')  # (DRF's words)
        if length and content_type == "application/json":
            try:
                setattr(request, PARSED_ATTR, load_json_body(request.body, request.encoding))
            except BodyRejected as exc:
                return error_response(request, 400, exc.message, exc.details)
            except RequestDataTooBig:  # Django's own limit (DATA_UPLOAD_MAX_MEMORY_SIZE) is lower
                return error_response(request, 413, body_too_large_message())
        return None


def _content_length(request) -> int:
    """The declared body size; -1 when the header is not a whole number."""
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return -1


def _url_problem(request, pattern) -> str | None:
    if pattern.search(request.path):
        return "The path contains invalid characters (control characters or invalid UTF-8)."
    for key, values in request.GET.lists():
        if pattern.search(key) or any(pattern.search(v) for v in values):
            return "The query string contains invalid characters (control characters or invalid UTF-8)."
    return None


def _header_problem(request) -> str | None:
    for meta_key, header in _CHECKED_HEADERS.items():
        if _BAD_HEADER_CHARS.search(request.META.get(meta_key, "")):
            return f"The {header} header contains invalid characters."
    return None


class MetricsMiddleware(AsyncCapableMiddleware):
    """HTTP request count and latency by route template (never by raw path: bounded labels)."""

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        start = time.perf_counter()
        return self._observe(request, self.get_response(request), start)

    async def __acall__(self, request):
        start = time.perf_counter()
        return self._observe(request, await self.get_response(request), start)

    def _observe(self, request, response, start):
        match = getattr(request, "resolver_match", None) or _resolve(request)
        route = ("/" + match.route) if match is not None and match.route else "unmatched"
        metrics.observe_http(request.method, route, response.status_code, time.perf_counter() - start)
        return response

def _resolve(request):
    try:
        return resolve(request.path_info, getattr(request, "urlconf", None))
    except Resolver404:
        return None


# The ops console's lists and their exports: /admin/<app>/<model>/ and …/export/.
_ADMIN_LIST_PATH = re.compile(r"^/admin/(?P<app>\w+)/(?P<model>\w+)/(?P<export>export/)?\Z")


def _admin_list_model(request):
    """The model of the admin list (or export) `request` is for, or None."""
    from django.apps import apps
    from django.contrib import admin

    match = _ADMIN_LIST_PATH.match(request.path)
    if match is None:
        return None
    try:
        model = apps.get_model(match["app"], match["model"])
    except LookupError:
        return None
    return model if admin.site.is_registered(model) else None


# Fields a list's URL may not filter by (a yes/no row count reads them a character at a time):
# credentials and codes the console never shows.
_SECRET_FIELDS = frozenset({"password", "secret", "previous_secret", "digest", "token", "tracking_token", "handoff_code"})
# Lookups that fail when the query runs, on input the console never sends: a broken pattern
# (`?store_name__regex=[`), a geometry in any SRID (`?pickup_location__bbcontains=SRID=999999;…`).
_RUN_TIME_LOOKUPS = frozenset({"regex", "iregex"})


def _refused_lookup(model, params) -> str | None:
    """The first URL parameter of a list that filters by a secret field, by a pattern, or by a
    geometry (other than `__isnull`); None when there is none. Parameters that name no field
    (the page, the search, a list filter's own) pass: the admin reads them."""
    from django.contrib.gis.db.models import GeometryField
    from django.core.exceptions import FieldDoesNotExist

    for key in params:
        current, fields, rest = model, [], key.split("__")
        while rest and current is not None:
            try:
                field = current._meta.pk if rest[0] == "pk" else current._meta.get_field(rest[0])
            except FieldDoesNotExist:
                break
            fields.append(field)
            rest.pop(0)
            current = field.related_model if field.is_relation else None
        if not fields:
            continue
        if any(f.name in _SECRET_FIELDS for f in fields):
            return key
        if rest and rest[-1] in _RUN_TIME_LOOKUPS:
            return key
        if isinstance(fields[-1], GeometryField) and rest != ["isnull"]:
            return key
    return None


class AdminListGuardMiddleware(AsyncCapableMiddleware):
    """Parameters no page of the console sends (a stale bookmark, a hand-edited URL, a tampered
    form) get the console's own answers, never a 500:
    - a filter the database cannot take on a list or an export (`?created_at__year=99999`, an
      unknown field on an export, a date that is none): the list again with `?e=1`, Django's
      answer to a wacky lookup, which Django gives only when the filter fails to build, not
      when it fails to run (and django-import-export not at all). Only for reading a list
      (GET) and for an export: an error of an action is the action's, a 500 as ever;
    - an action on selected ids that are not ids of the list: nothing done, and a message
      (Django raised on them while building the action's queryset), and the same for ids of
      rows the list does not have (Django ran the action on none of them and said nothing). Checked after the CSRF
      check (`process_view`), for a staff login that may change the list; anyone else gets
      the admin's own answer;
    - a filter by a secret field (a webhook's signing secret, a token's digest: a row count
      read them a character at a time), by a pattern or by a geometry (they failed in the
      database: a 500 on every list, export and action): the list again with `?e=1`, for any
      staff login, before the list, export or action runs."""

    def process_view(self, request, view_func, view_args, view_kwargs):
        from django.contrib import admin, messages
        from django.contrib.admin import helpers
        from django.contrib.admin.views.main import ERROR_FLAG
        from django.core.exceptions import ValidationError
        from django.db import DataError, transaction
        from django.http import HttpResponseRedirect

        match = _ADMIN_LIST_PATH.match(request.path)
        if match is None:
            return None
        if request.method == "POST" and getattr(request, "csrf_processing_done", False) is not True:
            return None  # (refused by the CSRF check: its 403 stands)
        model = _admin_list_model(request)
        user = getattr(request, "user", None)
        if model is None or not (user is not None and user.is_active and user.is_staff):
            return None
        refused = _refused_lookup(model, request.GET)
        if refused is not None:
            logger.warning("admin list %s: a filter the console does not take (%s); sent back to the list",
                           request.path, refused[:100])
            return HttpResponseRedirect(f"{request.path.removesuffix('export/')}?{ERROR_FLAG}=1")
        if request.method != "POST" or "action" not in request.POST:
            return None
        if not admin.site.get_model_admin(model).has_change_permission(request):
            return None
        if set(request.GET) - {ERROR_FLAG}:
            # Filters that fail only when they run (a value the database refuses): found before
            # the action runs, not as its error half way through ("select all" included)
            try:
                with transaction.atomic():  # (a savepoint inside a transaction: the failure leaves it usable)
                    admin.site.get_model_admin(model).get_changelist_instance(request)  # (it counts the rows)
            except DataError:
                logger.warning("admin list %s: its filters fail in the database; the action was not run",
                               request.get_full_path())
                messages.error(request, "Nothing was done: the list's filters cannot be run.")
                return HttpResponseRedirect(f"{request.path}?{ERROR_FLAG}=1")
            except Exception:  # (filters the list cannot build: Django's own answer)
                return None
        bad = []
        for value in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME):
            try:
                model._meta.pk.to_python(value)
            except (ValidationError, ValueError, TypeError):
                bad.append(value)
        if bad:
            shown = ", ".join(repr(v[:40]) for v in bad[:3])
            messages.error(request, f"Nothing was done: {shown} {'is not an id' if len(bad) == 1 else 'are not ids'} of this list.")
            return HttpResponseRedirect(request.get_full_path())
        selected = set(request.POST.getlist(helpers.ACTION_CHECKBOX_NAME))
        if not selected or request.POST.get("select_across") == "1":
            return None
        # Ids, but not of rows of this list (a hand-made form, a row gone since the page was
        # drawn, or one that left the filtered list: a delivery no longer `ready` on the list of
        # ready ones): Django runs the action on the rows of the list as filtered, none of
        # these, and says nothing.
        # (the ChangeList, not get_queryset: a list may filter by default, as the unassigned
        # orders' shows the open ones with no parameter in its URL)
        try:
            listed = admin.site.get_model_admin(model).get_changelist_instance(request).get_queryset(request)
        except Exception:  # (filters the list cannot take: Django's own answer)
            return None
        found = listed.filter(pk__in=selected).count()
        if found == len(selected):
            return None
        missing = len(selected) - found
        messages.error(request, f"Nothing was done: {missing} of the selected rows {'is' if missing == 1 else 'are'} not in this list.")
        return HttpResponseRedirect(request.get_full_path())

    def process_exception(self, request, exception):
        from django.contrib.admin.exceptions import DisallowedModelAdminLookup
        from django.contrib.admin.options import IncorrectLookupParameters
        from django.contrib.admin.views.main import ERROR_FLAG
        from django.core.exceptions import FieldError, ValidationError
        from django.db import DataError
        from django.http import HttpResponseRedirect

        # (DataError: a value the database refused when the list's query ran, e.g. out of range;
        # DisallowedModelAdminLookup: a filter by a field the list offers no filter for, e.g.
        # `?zone__name__startswith=A`, was a bare "Bad Request (400)" page)
        if not isinstance(exception, (IncorrectLookupParameters, FieldError, ValidationError, ValueError, OverflowError,
                                      DataError, DisallowedModelAdminLookup)):
            return None
        match = _ADMIN_LIST_PATH.match(request.path)
        if match is None or not (request.method == "GET" or match["export"]):
            return None
        if not set(request.GET) - {ERROR_FLAG} or _admin_list_model(request) is None:
            return None  # (no parameters to drop: the list's own error; `?e=1&<bad filter>`, as any bad filter)
        # a client's error (a hand-edited URL, a stale bookmark), not the server's: no ERROR line
        # for an alert to fire on, no traceback
        logger.warning("admin list %s: parameters it cannot run (%s: %s); sent back to the list",
                       request.get_full_path(), type(exception).__name__, str(exception)[:200])
        changelist = request.path.removesuffix("export/")
        return HttpResponseRedirect(f"{changelist}?{ERROR_FLAG}=1")
