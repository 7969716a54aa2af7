"""Socket plumbing shared by consumers: token auth (`?token=` or an `Authorization: Token`
header), closing a socket whose login is revoked, origin checks."""
from __future__ import annotations

import asyncio
import logging
import random
from importlib import import_module
from urllib.parse import parse_qsl, urlparse

import orjson
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.security.websocket import OriginValidator, WebsocketDenier
from django.conf import settings
from redis.exceptions import RedisError
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone as django_timezone
from django.utils.crypto import constant_time_compare
from django.utils.http import is_same_domain

from common.logfilters import new_request_id, request_id

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_BEHIND = 1013  # (try again later) its events overflowed its queue in the process: reconnect, reload
CLOSE_RESTART = 1012  # (service restart) its process's pub/sub connection to Redis dropped: reconnect, reload
CLOSE_TOO_MANY = 4429  # (as HTTP 429) SOCKET_MAX_PER_CREDENTIAL of this login's sockets are open here

# This process's open sockets by credential (RelayConsumer.join_and_accept).
_open_sockets: dict[str, int] = {}


def query_param(scope, name: str) -> str | None:
    """The query parameter as the HTTP side reads it (Django's `QueryDict.get`): UTF-8, the last
    of repeated values, an empty value kept as ""."""
    query = scope.get("query_string", b"").decode("utf-8", "replace")
    value = None
    for key, item in parse_qsl(query, keep_blank_values=True):
        if key == name:
            value = item
    return value


async def _refuse_unavailable(scope, send) -> None:
    """Answer the handshake 503 with the API's error body and Retry-After (where the server can
    send an HTTP answer to a WebSocket handshake), else close it (an HTTP 403)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": CLOSE_BEHIND})
        return
    from common.errors import error_body

    body = orjson.dumps(error_body(503, scope.get("path", ""), "Live updates are unavailable for a moment: try again shortly."))
    await send({"type": "websocket.http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "websocket.http.response.body", "body": body})


@database_sync_to_async
def _live_token(digest: str):
    from common.tokens import api_token_live

    return api_token_live(digest)


@database_sync_to_async
def _login_check(scope, allowed) -> tuple[int | None, object]:
    """Whether the socket's credentials still hold: its API token live and still the same
    user's, or (a session's socket) its session still there, still this user's, with the
    user active and the password it was made with; and whether that user, read afresh, may
    still have this socket (`allowed(user)`: a staff flag or a group taken away). Returns the
    close code (None: stays open) and the token's expiry."""
    from common.tokens import api_token_live

    user, digest = scope.get("user"), scope.get("api_token_digest")
    if digest:
        token = api_token_live(digest)
        fresh = token.user if token is not None and token.user_id == user.pk else None
        expires_at = getattr(token, "expires_at", None)
    else:
        fresh = _session_user(getattr(scope.get("session"), "session_key", None), user.pk)
        expires_at = None
    if fresh is None:
        return CLOSE_UNAUTHENTICATED, None
    return (None if allowed(fresh) else CLOSE_FORBIDDEN), expires_at


def _session_user(session_key: str | None, user_id):
    """The session's user as `django.contrib.auth.get_user` decides, read afresh (the socket's
    session object holds what it read at connect): None if logged out, deactivated or the
    password changed."""
    from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model

    if not session_key:
        return None
    stored = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    if str(stored.get(SESSION_KEY)) != str(user_id):
        return None
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return None
    given = stored.get(HASH_SESSION_KEY) or ""
    valid = any(
        constant_time_compare(given, expected)
        for expected in (user.get_session_auth_hash(), *user.get_session_auth_fallback_hash())
    )
    return user if valid else None


def login_group(user_id) -> str:
    """Every open socket of one login (ops, driver, support; not the customers')."""
    return f"login.{user_id}"


def sockets_recheck_login(user) -> None:
    """`hooks.on_login_revoked`: the user's open sockets check their credentials again: those
    whose token was revoked or expired, or whose login was deactivated or its password changed,
    close with 4401; those whose user lost the role the socket needs close with 4403.
    Only once the change is committed (the hook also runs inside the transaction, for caches:
    a check then would read the old state). Never raises (a channel-layer failure is logged)."""
    from django.db import transaction

    from common.broadcast import send_now

    if transaction.get_connection().in_atomic_block:
        return
    send_now([login_group(user.pk)], {"type": "login.revoked", "userId": str(user.pk)})


def session_logged_out(sender, request, user, **kwargs) -> None:
    """`user_logged_out`: Django flushes the session after this signal; the sockets of that
    session must find it gone, so it is flushed first (flushing again is harmless)."""
    if user is None:
        return
    session = getattr(request, "session", None)
    if session is not None:
        session.flush()
    sockets_recheck_login(user)


def _set_request_id(scope) -> None:
    # The socket's log lines, for as long as it lives, carry one id (a trusted proxy's).
    headers = dict(scope.get("headers") or ())
    client = (scope.get("client") or ("",))[0]
    given = headers.get(b"x-request-id", b"").decode("latin1") if client in settings.REQUEST_ID_TRUSTED_PROXIES else None
    request_id.set(new_request_id(given))


class SocketRequestId:
    """Gives the socket its request id, and nothing else: the stack of customers' tracking
    sockets, which a tracking link's token authenticates (no user, session or API token)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        _set_request_id(scope)
        return await self.app(scope, receive, send)


class TrackingSocketSplit:
    """`/ws/track/…` → `tracking` (no session, no user lookup: per frame, channels' session
    wrapper inspected the session on every message sent, and per connect the tracking token
    was looked up as an API token in a worker thread); every other socket → `full`."""

    def __init__(self, full, tracking):
        self.full, self.tracking = full, tracking

    async def __call__(self, scope, receive, send):
        if scope["path"].startswith("/ws/track/"):
            return await self.tracking(scope, receive, send)
        return await self.full(scope, receive, send)


def _header_token(scope) -> str | None:
    """The key of an `Authorization: Token <key>` header (the REST API's scheme), for clients
    that can set headers on an upgrade (apps, servers; browsers cannot)."""
    from common.tokens import authorization_token

    for name, value in scope.get("headers") or ():
        if name == b"authorization" and (key := authorization_token(value)) is not None:
            return key
    return None


class QueryTokenAuthMiddleware:
    """Sets scope["user"] from `?token=<api token>`, or else an `Authorization: Token <key>`
    header, when present (else keeps the session user)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        _set_request_id(scope)
        key = query_param(scope, "token") or _header_token(scope)
        if key:
            from common.tokens import token_digest

            # A key is 40 characters; a longer one is nobody's, and not worth a lookup. A bad
            # token never falls back to the session's user.
            digest = token_digest(key)
            token = await _live_token(digest) if len(key) <= 64 else None
            scope = dict(scope, user=token.user if token else AnonymousUser(), token_invalid=token is None,
                         api_token_digest=digest if token else None,
                         api_token_expires_at=token.expires_at if token else None)
        return await self.app(scope, receive, send)


_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _origin_key(scheme: str, netloc: str) -> str:
    """host[:port] of an origin or a Host header, lower case, without the scheme's default port."""
    netloc = netloc.lower()
    default = _DEFAULT_PORTS.get(scheme)
    return netloc.removesuffix(f":{default}") if default else netloc


class ApiOriginValidator(OriginValidator):
    """Browsers must come from an allowed host, and from this very origin (scheme aside: port
    included) or one in CSRF_TRUSTED_ORIGINS: a page on another port of the same host (another
    app on the box) carries the console's session cookie too (cookies do not tell ports apart)
    and could open `/ws/ops/` as the logged-in dispatcher. Clients that send no Origin (apps,
    servers) are let through and must authenticate with a token like any API client."""

    async def __call__(self, scope, receive, send):
        origin = host = forwarded_host = None
        for name, value in scope.get("headers", []):
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
            elif name == b"x-forwarded-host":
                forwarded_host = value.decode("latin-1")
        if settings.USE_X_FORWARDED_HOST and forwarded_host:  # (as the HTTP side: AllowedHostGuard)
            host = forwarded_host
        if origin is not None and host is not None and not self._same_or_trusted(origin, host):
            return await WebsocketDenier()(scope, receive, send)
        return await super().__call__(scope, receive, send)

    @staticmethod
    def _same_or_trusted(origin: str, host: str) -> bool:
        """As Django's CSRF check reads CSRF_TRUSTED_ORIGINS: an exact origin, or `scheme://*.domain`."""
        parsed = urlparse(origin)
        if not parsed.netloc:
            return False
        for trusted in settings.CSRF_TRUSTED_ORIGINS:
            t = urlparse(trusted)
            if t.scheme == parsed.scheme and (
                t.netloc.lower() == parsed.netloc.lower()
                or (t.netloc.startswith("*.") and is_same_domain(parsed.netloc.lower(), t.netloc[1:].lower()))
            ):
                return True
        return _origin_key(parsed.scheme, parsed.netloc) == _origin_key(parsed.scheme, host)

    def valid_origin(self, parsed_origin):
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)


def origin_validator(app):
    hosts = list(settings.ALLOWED_HOSTS)
    return ApiOriginValidator(app, ["*"] if "*" in hosts else hosts)


class RelayConsumer(AsyncJsonWebsocketConsumer):
    """A consumer that only relays group events to its socket (STYLE rule 7).

    `relays` lists the event types sent on verbatim (no database, so no per-message thread
    hop); a consumer may define a handler method for types that need more; anything else that
    reaches its groups is dropped, never allowed to crash the socket.
    """

    relays: frozenset[str] = frozenset()
    groups_to_join: list[str]

    async def __call__(self, scope, receive, send):
        """The consumer's whole life: its login timer goes with it however it ends. An
        application cancelled mid-handler (a server shutting down, a client gone while a
        handler awaited) never reaches `disconnect`, and its timer kept it alive, checking
        its login every few minutes."""
        answered = False

        async def answering(message):
            nonlocal answered
            answered = True
            await send(message)

        try:
            return await super().__call__(scope, receive, answering)
        except RedisError as error:
            if answered:
                raise
            # Redis away (or a subscription not confirmed in time: channels.LayerUnavailable)
            # before the handshake was answered: refused as unavailable, with one line in the
            # log, instead of uvicorn's 500 and a traceback per attempt. The client retries.
            logger.warning("%s refused (503): the channel layer failed while it connected: %r", type(self).__name__, error)
            await _refuse_unavailable(scope, send)
        finally:
            self._stop_checks()
            self._uncount()
            forget = getattr(self.channel_layer, "forget_channel", None)
            if forget is not None and getattr(self, "channel_name", None):
                await asyncio.shield(forget(self.channel_name))

    @classmethod
    async def encode_json(cls, content) -> str:
        # orjson: the same JSON, compact, several times faster than json.dumps per frame.
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS).decode()

    async def dispatch(self, message):
        kind = message.get("type", "")
        if kind in self.relays and "event" in message:
            await self.send_json(message["event"])
        elif kind.startswith("websocket.") or hasattr(self, get_handler_name(message)):
            await super().dispatch(message)
        else:
            logger.debug("%s dropped an event of type %s", type(self).__name__, kind)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        """Clients have nothing to say on these sockets (events go one way): any frame, JSON or
        not, text or binary, is ignored. Channels' JSON consumer decoded it and a frame that was
        not JSON (an app's keep-alive "ping") or was binary raised out of the consumer: the
        socket dropped without a close code and the server logged an error."""
        logger.debug("%s ignored a %s frame from its client", type(self).__name__,
                     "binary" if text_data is None else "text")

    async def deny(self, code: int) -> None:
        """Refuse the socket with an application close code (4401, 4403). The handshake is
        accepted first: a close before accept becomes a bare HTTP 403 at the server, and the
        client would never see the code."""
        await self.accept()
        await self.close(code=code)

    async def relay(self, message):
        await self.send_json(message["event"])

    async def join_and_accept(self, groups: list[str], *, credential: str | None = None) -> bool:
        """Join the groups, then accept. In this order an event committed after the client
        sees the socket open always reaches it; accepting first leaves a window in which the
        client believes it is live while the group does not yet hold this channel.

        At most SOCKET_MAX_PER_CREDENTIAL sockets of this kind per credential (the API token,
        else the session's user, or `credential`: a customer's link) in this process; one more
        is refused with 4429 and False returned (one leaked token held hundreds of sockets, each
        a group member every event is sent to).

        A logged-in socket also joins its login's group, and its login is checked again once
        it has (`_login_check`; refused 4401/4403 and False): a revoked token or a deactivated
        login closes it (`login_revoked`), and it closes when its token expires. It also checks
        again every SOCKET_LOGIN_RECHECK_SECONDS (jittered), for changes no hook sees (a bulk
        `QuerySet.update`, SQL)."""
        user = self.scope.get("user")
        logged_in = getattr(user, "is_authenticated", False)
        if credential is None and logged_in:
            # by token when there is one: a leaked token filling the cap leaves its user's
            # session and other tokens their own places
            digest = self.scope.get("api_token_digest")
            credential = f"token:{digest}" if digest else f"user:{user.pk}"
        if credential is not None and not await self._count(f"{type(self).__name__}:{credential}"):
            return False
        if logged_in:
            groups = [*groups, login_group(user.pk)]
        self.groups_to_join = groups
        try:
            for group in groups:
                await self.channel_layer.group_add(group, self.channel_name)
        except BaseException:
            # (Redis away, or its confirmation late: the socket is refused, and leaves the
            # groups it joined; a refused socket never reaches `disconnect`)
            await self._leave_groups()
            raise
        expires_at = self.scope.get("api_token_expires_at")
        if logged_in:
            # Checked again once in the login's group: a revocation committed between the
            # look-up on connect and the join told a group this socket was not yet in, and the
            # socket stayed open on a dead token until its routine check, minutes later (an
            # audit: 22 of 60 driver sockets opened while their token was deleted). From here
            # on, a revocation's message reaches it.
            try:
                code, expires_at = await _login_check(self.scope, self.allowed)
            except Exception:  # noqa: BLE001 - (the database away) refused as a failed check closes: the client retries
                logger.warning("%s refused: its login could not be checked", type(self).__name__, exc_info=True)
                code = 1011
            if code is not None:
                logger.info("%s refused (%s): its login was revoked while it connected", type(self).__name__, code)
                await self.deny(code)
                return False
        await self.accept()
        self._close_at(expires_at)
        return True

    async def _count(self, key: str) -> bool:
        cap = settings.SOCKET_MAX_PER_CREDENTIAL
        if cap > 0 and _open_sockets.get(key, 0) >= cap:
            logger.info("%s refused (%s): %d sockets of this credential already open here", type(self).__name__,
                        CLOSE_TOO_MANY, cap)
            await self.deny(CLOSE_TOO_MANY)
            return False
        _open_sockets[key] = _open_sockets.get(key, 0) + 1
        self._counted_as = key
        return True

    def _uncount(self) -> None:
        key = getattr(self, "_counted_as", None)
        if key is None:
            return
        self._counted_as = None
        left = _open_sockets.get(key, 0) - 1
        if left > 0:
            _open_sockets[key] = left
        else:
            _open_sockets.pop(key, None)

    def allowed(self, user) -> bool:
        """Whether `user` may have this socket; checked again, in a worker thread, on a
        fresh read of the user whenever the login changes (`login_revoked`)."""
        return True

    async def socket_behind(self, message):
        """This socket's queue in the process overflowed (common.channels._SocketQueue): events
        were dropped, so what the client shows is out of date. Close with 1013: it reconnects
        and reloads (the live map its state, a driver's app its snapshot)."""
        await self.close(code=CLOSE_BEHIND)

    async def layer_reconnected(self, message):
        """This socket's process lost its pub/sub connection to Redis and has it back
        (common.channels._Shard): what was published meanwhile never reached it. Close with
        1012 after the message's `delay` (the closes of a process's sockets spread): it
        reconnects and reloads. (Once: a login check may have closed it during the delay.)"""
        delay = message.get("delay", 0)
        if delay <= 0:
            await self._close_once(CLOSE_RESTART)
            return
        # (a timer, not a sleep in the handler: the socket's events and its client's leaving
        # are handled meanwhile)
        self._restart = asyncio.get_running_loop().call_later(delay, self._restart_now)

    def _restart_now(self) -> None:
        # The task is kept: the loop holds tasks only weakly.
        self._restart_close = asyncio.ensure_future(self._close_once(CLOSE_RESTART))

    async def login_revoked(self, message):
        """A login of this user was revoked or changed: close if this socket's credentials no
        longer hold (another of the user's tokens may have gone; this one may stay), 4401, or
        if its user may no longer have it (a role taken away), 4403. If the check itself
        fails (the database away), close with 1011: the client reconnects, and its connect
        decides."""
        if getattr(self, "_closing", False):
            return
        try:
            code, expires_at = await _login_check(self.scope, self.allowed)
        except Exception:  # noqa: BLE001 - never left open unchecked
            expires_at = getattr(self, "_expires_at", None)
            expired = expires_at is not None and expires_at <= django_timezone.now()
            if message.get("routine") and not expired:  # nothing changed that we know of: try again later
                logger.warning("%s: its routine login check failed; trying again later", type(self).__name__, exc_info=True)
                self._close_at(expires_at)
                return
            logger.warning("%s: its login could not be checked again; closing", type(self).__name__, exc_info=True)
            await self._close_once(1011)
            return
        if code is not None:
            logger.info("%s closed (%s): its login was revoked or its role changed", type(self).__name__, code)
            await self._close_once(code)
            return
        self._close_at(expires_at)  # (an expiry moved by the admin)

    async def _close_once(self, code: int) -> None:
        if getattr(self, "_closing", False):
            return
        self._closing = True
        self._close_at(None)
        try:
            await self.close(code=code)
        except Exception:  # noqa: BLE001 - the client left meanwhile: nothing to close
            logger.debug("%s was gone before its close", type(self).__name__)

    def _close_at(self, expires_at) -> None:
        """Check the credentials again when the token expires (and close then), or at the next
        routine check if that comes first (a logged-in socket only; 0 turns it off)."""
        timer = getattr(self, "_expiry", None)
        if timer is not None:
            timer.cancel()
        self._expiry = None
        if getattr(self, "_closing", False):
            return
        self._expires_at = expires_at  # (the latest a check read: an expiry the admin moved)
        delays = []
        if expires_at is not None:
            delays.append(max(0.0, (expires_at - django_timezone.now()).total_seconds()))
        every = settings.SOCKET_LOGIN_RECHECK_SECONDS
        if every > 0 and getattr(self.scope.get("user"), "is_authenticated", False):
            delays.append(every * random.uniform(0.8, 1.0))  # (spread: not every socket at once)
        if delays:
            self._expiry = asyncio.get_running_loop().call_later(min(delays), self._expired)

    def _expired(self) -> None:
        # The task is kept: the loop holds tasks only weakly.
        self._expiry_check = asyncio.ensure_future(self.login_revoked({"type": "login.revoked", "routine": True}))

    def _stop_checks(self) -> None:
        self._closing = True
        self._close_at(None)
        restart = getattr(self, "_restart", None)
        if restart is not None:
            restart.cancel()
        check = getattr(self, "_expiry_check", None)
        if check is not None and not check.done():
            check.cancel()

    async def disconnect(self, code):
        self._stop_checks()
        await self._leave_groups()

    async def _leave_groups(self) -> None:
        for group in getattr(self, "groups_to_join", []):
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception as exc:  # noqa: BLE001 - the socket is gone either way
                # A storm of closing sockets can outwait the pool, or Redis be away: the group
                # keeps a dead channel (pub/sub: this process stays subscribed, its queue gone;
                # CHANNELS_LAYER=core: its messages expire unread, and channels_redis drops it
                # from the group after group_expiry). Nothing for the client to see.
                logger.warning("socket left group %s without group_discard: %s", group, type(exc).__name__)


class UnknownPathConsumer(RelayConsumer):
    """A socket path no route knows: closed with 4404, the way the others refuse (4401, 4403)."""

    async def connect(self):
        await self.deny(4404)
