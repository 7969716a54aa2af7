"""Outbound HTTP to addresses our users give us (webhook endpoints, chat webhooks), with the
SSRF checks made at send time: only http(s), and the host's resolved addresses must all be
public unless `WEBHOOK_ALLOW_PRIVATE_TARGETS` (development, tests). The connection goes to the
address that was checked (no second DNS look-up a rebinding attacker could answer
differently); TLS still verifies the certificate for the host name. Redirects are not
followed. The timeout bounds connecting and each read, and the whole attempt: a receiver that
answers a byte at a time is cut off when it runs out (`post_json`)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

import idna
from django.conf import settings

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4096


class TargetRefused(Exception):
    """The URL is not one we send to (scheme, credentials, a private address)."""


@dataclass(frozen=True)
class HttpResult:
    status: int | None
    headers: dict[str, str]
    body: bytes
    duration_ms: int
    error: str = ""
    # Whether the request may have reached the receiver: False when the attempt failed before a
    # connection was made (the name, a refused, unreachable or timed-out connect), so that a
    # retry cannot repeat it (an SMS provider's send).
    sent: bool = True
    started_at: datetime | None = None  # (set by a caller that dates its attempts)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT (RFC 7915): ::ffff:0:a.b.c.d
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # a network's own translator (RFC 8215)


def address_allowed(ip: str) -> bool:
    if settings.WEBHOOK_ALLOW_PRIVATE_TARGETS:
        return True
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one is judged as itself: mapped (::ffff:a.b.c.d),
        # compatible (::a.b.c.d), translated (::ffff:0:a.b.c.d), 6to4 (2002:…) and NAT64
        # (64:ff9b::/96, which a cloud's gateway forwards to the IPv4 address). A local NAT64
        # prefix may carry any of the network's own addresses: never.
        if address in _LOCAL_NAT64:
            return False
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in net for net in (_NAT64, _IPV4_COMPATIBLE, _IPV4_TRANSLATED)):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            address = embedded
    return address.is_global and not address.is_multicast


_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")  # (an underscore: names in the wild have them)


def _host_literal(host: str):
    """The address a host written as a number stands for, in any form a resolver takes
    (`127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`, `0`; IPv6), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fx.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _host_name_ok(host: str) -> bool:
    """A DNS name (IDNA for non-ASCII): labels of letters, digits, underscores and inner
    hyphens; no spaces or other characters a resolver would not look up."""
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return len(ascii_host) <= 253 and all(_LABEL.match(label) for label in ascii_host.split("."))


def url_check(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of an acceptable URL, or TargetRefused. Checks the form
    only (no DNS): a host given as an address, in any of the forms a resolver reads, must be
    public; so must `localhost` (a trailing dot included)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"Not a valid URL: {exc}.") from exc
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("Only http and https URLs are allowed.")
    if "@" in parts.netloc:  # (an empty user or password too: `http://@host/`)
        raise TargetRefused("URLs with credentials are not allowed.")
    if _UNSENDABLE.search(url) or not (parts.path + parts.query).isascii():
        # (http.client refuses control characters, the URL parser drops tabs and newlines,
        # a space ends the request target: the request went elsewhere or nowhere, for a day)
        raise TargetRefused("The URL may not contain spaces, control characters or non-ASCII characters in its path; percent-encode them.")
    host = parts.hostname
    if not host:
        raise TargetRefused("The URL has no host.")
    if port == 0:
        raise TargetRefused("Port 0 is not a port to send to.")
    bare = host[:-1] if host.endswith(".") else host
    if not bare.isascii() and ":" not in bare:
        bare = _ascii_host(bare, legacy=True)  # (as a resolver reads it)
    literal = _host_literal(bare)
    if literal is None and not _host_name_ok(bare):
        raise TargetRefused(f"{host!r} is not a valid host name.")
    if not settings.WEBHOOK_ALLOW_PRIVATE_TARGETS:
        if bare == "localhost" or bare.endswith(".localhost"):
            raise TargetRefused("Loopback targets are not allowed.")
        if literal is not None and not address_allowed(str(literal)):
            raise TargetRefused("Private, loopback and link-local addresses are not allowed.")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path


def _ascii_host(host: str, *, legacy: bool = False) -> str:
    """A host name in ASCII form as browsers and resolvers make it (IDNA 2008 with UTS 46:
    full-width letters and digits folded, `faß.de` is xn--fa-hia.de, not fass.de as Python's
    IDNA 2003 codec made it), or TargetRefused. `legacy`: a name IDNA 2008 refuses (a symbol,
    `☃.net`) but IDNA 2003 took is taken as that did (endpoints stored before it still send;
    a new URL must pass IDNA 2008: endpoint_url_clean)."""
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        if legacy:
            try:
                return host.encode("idna").decode("ascii")
            except UnicodeError:
                pass
        raise TargetRefused(f"{host!r} is not a valid host name.") from None


def ascii_host_url(url: str) -> str:
    """`url` with its host name in ASCII form, as url_check reads it; the rest as given.
    TargetRefused if the name has none."""
    parts = urlsplit(url)
    if parts.netloc.isascii():
        return url
    host = _ascii_host(parts.hostname or "")
    return urlunsplit(parts._replace(netloc=host if parts.port is None else f"{host}:{parts.port}"))


# Look-ups in flight, by (host, port): a name whose DNS hangs gets one thread however many
# attempts ask for it meanwhile.
_lookups: dict[tuple[str, int], concurrent.futures.Future] = {}
_lookups_lock = threading.Lock()


def _getaddrinfo_within(host: str, port: int, seconds: float | None) -> list:
    """`socket.getaddrinfo(host, port)`, given up after `seconds` (None: waited for). The
    look-up runs on a daemon thread, which a give-up leaves to end by the resolver's own
    time-outs (`getaddrinfo` cannot be interrupted): a webhook receiver whose name server does
    not answer held a sender's thread, and so the endpoints behind it in the sweep, for as long
    as the resolver kept retrying."""
    key = (host, port)
    with _lookups_lock:
        future = _lookups.get(key)
        if future is None:
            future = _lookups[key] = concurrent.futures.Future()

            def look_up() -> None:
                try:
                    future.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
                except BaseException as exc:  # noqa: BLE001 (handed to the waiters)
                    future.set_exception(exc)
                finally:
                    with _lookups_lock:
                        if _lookups.get(key) is future:
                            del _lookups[key]

            try:
                threading.Thread(target=look_up, name=f"webhook DNS {host}", daemon=True).start()
            except BaseException as exc:  # (no thread to be had: no entry left for later attempts to wait on)
                del _lookups[key]
                future.set_exception(exc)
                raise
    try:
        return future.result(timeout=None if seconds is None else max(0.0, seconds))
    except concurrent.futures.TimeoutError:
        raise ConnectionError(f"DNS lookup timed out: no answer for {host} within {seconds:g} s") from None


# What an attempt's error (which its endpoint's owner reads) says of a name that does not resolve
# and of one that resolves to a refused address alike: naming the address, or telling the two
# apart, let any integration map this network's internal names (`http://db-primary:5432/`, then
# its test event and attempts). The log has the detail.
_DNS_TEMPORARY = {socket.EAI_AGAIN, socket.EAI_FAIL}
NO_PUBLIC_ADDRESS = ("{host} has no public address: the name does not resolve, or resolves to a private, loopback or "
                     "link-local address.")


def resolve_checked(host: str, port: int, *, trusted: bool = False, timeout: float | None = None) -> str:
    """The first address of `host`, after checking that every address it resolves to is
    allowed (an attacker's name may resolve to several). `timeout`: give up the look-up after
    that many seconds (ConnectionError)."""
    try:
        infos = _getaddrinfo_within(host, port, timeout)
    except socket.gaierror as exc:
        if trusted:
            raise ConnectionError(f"DNS lookup failed: {exc}") from exc
        if exc.errno in _DNS_TEMPORARY:  # our resolver failing, not the name: says nothing about it
            logger.warning("webhook target %s: DNS lookup failed: %s", host, exc)
            raise ConnectionError("DNS lookup failed temporarily; it is tried again.") from exc
        logger.info("webhook target %s: DNS lookup failed: %s", host, exc)
        raise TargetRefused(NO_PUBLIC_ADDRESS.format(host=host)) from exc
    addresses = [info[4][0] for info in infos]
    refused = [] if trusted else [a for a in addresses if not address_allowed(a)]
    if refused or not addresses:
        logger.info("webhook target %s refused: resolves to %s", host, refused[0] if refused else "nothing")
        raise TargetRefused(NO_PUBLIC_ADDRESS.format(host=host))
    return addresses[0]


def _url_parts(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("Only http and https URLs are allowed.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), path


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, port, *, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, *, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post_json(url: str, body: bytes, headers: dict[str, str], *, timeout: float, trusted: bool = False) -> HttpResult:
    """POST `body` to `url`. Raises TargetRefused before sending anything to a refused target
    (a name that does not resolve, too, unless `trusted`: NO_PUBLIC_ADDRESS); a network failure
    or timeout comes back as a result with `status=None` and the error.
    `trusted`: a URL from our own settings (the ops chat webhook), which may be private.

    `timeout` bounds connecting and each read, and the attempt as a whole from its start: a
    receiver trickling its answer (a byte every few seconds) kept an attempt, and its worker,
    for minutes. A look-up that used up the time sends nothing; so does a connection that did;
    once connected, a watchdog shuts the socket at the deadline. The DNS look-up is given up
    at the deadline too (its thread left to the resolver's own time-outs)."""
    scheme, host, port, path = url_check(url) if not trusted else _url_parts(url)
    started = time.monotonic()
    deadline = started + timeout

    connected = False

    def timed_out() -> HttpResult:
        if not connected:
            return HttpResult(status=None, headers={}, body=b"", duration_ms=int((time.monotonic() - started) * 1000),
                              error=f"timeout: could not connect within {timeout:g} s", sent=False)
        return HttpResult(status=None, headers={}, body=b"", duration_ms=int((time.monotonic() - started) * 1000),
                          error=f"timeout: no complete answer within {timeout:g} s")

    try:
        address = resolve_checked(host, port, trusted=trusted, timeout=timeout)
    except ConnectionError as exc:
        return HttpResult(status=None, headers={}, body=b"", duration_ms=int((time.monotonic() - started) * 1000),
                          error=str(exc)[:500], sent=False)
    if time.monotonic() >= deadline:
        return timed_out()
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    connection = cls(host, port, address=address, timeout=timeout)
    watchdog = _Watchdog(connection, deadline - time.monotonic())
    try:
        connection.connect()
        if watchdog.cut:  # (the time ran out while connecting: nothing is sent)
            return timed_out()
        connected = True  # (a TLS handshake included: nothing of the request is written before it)
        connection.request("POST", path, body=body, headers={
            "Content-Type": "application/json", "User-Agent": "dispatch-webhooks/1", **headers,
        })
        response = connection.getresponse()
        data = response.read(MAX_RESPONSE_BYTES)
        if watchdog.finish():  # (a read the shutdown ended early looks like a short answer)
            return timed_out()
        return HttpResult(
            status=response.status, headers={k.lower(): v for k, v in response.getheaders()}, body=data,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
    except (OSError, http.client.HTTPException, ValueError) as exc:  # (ValueError: an SSL socket shut under a read)
        if watchdog.finish():
            return timed_out()
        if not connected and isinstance(exc, (TimeoutError, socket.timeout)):
            return timed_out()
        kind = "timeout" if isinstance(exc, (TimeoutError, socket.timeout)) else type(exc).__name__
        return HttpResult(
            status=None, headers={}, body=b"", duration_ms=int((time.monotonic() - started) * 1000),
            error=f"{kind}: {exc}"[:500], sent=connected,
        )
    finally:
        watchdog.finish()
        connection.close()


class _Watchdog:
    """Ends an attempt at its deadline by shutting its connection's socket, which ends the read
    or write blocked on it. `finish()` stops it and says whether it fired first."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float):
        self._connection = connection
        self._lock = threading.Lock()
        self._finished = False
        self.cut = False
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.cut = True
            sock = self._connection.sock  # (None while connecting: `post_json` checks `cut` after)
        if sock is not None:
            with contextlib.suppress(OSError):  # (closed meanwhile: nothing left to end)
                # the plain socket's shutdown: an SSL socket's own would drop its state under a read
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def finish(self) -> bool:
        self._timer.cancel()
        with self._lock:
            self._finished = True
            return self.cut
