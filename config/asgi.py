"""ASGI entry point: the location fast lane, then Django (a lean middleware stack for
token-authenticated API requests, the full one for everything else), and the sockets."""
import asyncio
import contextvars
import gc
import os
import re
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
# A web process's statements and lock waits are cancelled past these (settings.base, where every
# other process has no limit): a request is not held without end by a stuck query or a lock.
# Only while the settings are read: not for the processes this one starts (or a test run's).
_WEB_DEFAULTS = {"DB_STATEMENT_TIMEOUT_MS": "30000", "DB_LOCK_TIMEOUT_MS": "10000"}
_set_here = [name for name in _WEB_DEFAULTS if name not in os.environ]
os.environ.update({name: _WEB_DEFAULTS[name] for name in _set_here})
try:
    django.setup(set_prefix=False)  # as get_asgi_application(); its handler is DjangoHandler below
finally:
    for _name in _set_here:
        del os.environ[_name]

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core import signals  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.db.models import Model  # noqa: E402
from django.urls import set_script_prefix  # noqa: E402
from django.utils.functional import SimpleLazyObject  # noqa: E402

from availability.api.fastlane import LocationFastLane  # noqa: E402
from common.broadcast import bind_server_loop  # noqa: E402
from common.lanes import FairLane, Seat  # noqa: E402
from common.consumers import QueryTokenAuthMiddleware, SocketRequestId, TrackingSocketSplit, origin_validator  # noqa: E402
from common.metrics import API_REQUEST_WAIT, API_REQUESTS_ABANDONED  # noqa: E402
from common.middleware import AllowedHostGuard, EarlyBodyLimit  # noqa: E402
from config import celery_app  # noqa: E402
from config.routing import websocket_urlpatterns  # noqa: E402


class DjangoHandler(ASGIHandler):
    """Django's ASGI handler, without a reference cycle per request.

    Its disconnect listener raises RequestAborted when the server says the client is gone,
    which uvicorn says as soon as the response is out: every request. `handle` reads the
    exception back from the listener's task, and from then on the exception's traceback holds
    `handle`'s frame, the frame its list of tasks, the task the exception: the whole request
    (request, response, body file, the server's receive and send, ~100 objects) stayed in a
    cycle until the next collection. Here the listener returns instead. In Django 5.2 that is
    the same to `handle`: it cancels the request's task when the listener finishes first,
    however it finishes, and drops the RequestAborted (tests/common/test_request_cycles.py
    holds both: no cycle, and a disconnect still cancels the request). And once the response
    is made, the request's own cycles are broken as on the lean path (`_release`)."""

    async def listen_for_disconnect(self, receive):
        message = await receive()
        if message["type"] != "http.disconnect":  # as Django: this should never happen
            raise AssertionError(f"Invalid ASGI message after request body: {message['type']}")

    async def run_get_response(self, request):
        response = await super().run_get_response(request)
        if not response.streaming:  # (a streaming response's content may still read the request)
            _release(request, response)
        return response


class LeanApiHandler(ASGIHandler):
    """Token-authenticated API requests: settings.API_MIDDLEWARE instead of settings.MIDDLEWARE,
    and the whole request in one hop into a thread.

    Django's ASGI handler crosses from the event loop into a thread four times per request for
    a sync view (request_started, the view, the render, request_finished) and runs an async
    middleware chain and a disconnect-listener task between them. Here the body is read on the
    loop, then the request runs start to end on one thread as under WSGI (request_started, the
    sync middleware chain, the view and its render, request_finished), and the finished response
    is sent from the loop: one hop. The request's socket events still go out on the server's
    loop (`bind_server_loop`) before the response does.

    Django builds the chain from settings.MIDDLEWARE once, at start-up, in one thread: the
    setting is swapped for that moment only. The threads are one-thread executors a request
    borrows and hands back (a thread per request otherwise); at most IDLE_EXECUTORS are kept,
    more requests in flight than that start threads of their own.

    At most API_REQUEST_CONCURRENCY requests of a process run at once (0: no limit); the others
    wait on the loop, first come first served, their body already read, and one whose client
    disconnects while it waits never runs. A request holds its slot while its thread runs, not
    while its response is sent. Python runs one thread at a time: with every request in flight
    on a thread of its own, they share the interpreter and each takes as long as all of them
    together, a heavy one (a delivery created and dispatched) several times a light one. A few
    at a time still overlap one's queries with another's Python; a request waits its turn, then
    runs without sharing the interpreter with a dozen others (offer flow at 16 in flight, limit
    3 against none: flows +10 %, all requests' p99 -14 %; bench/README.md, 2026-12-04, third
    session). Proof uploads take their turns in a lane of their own (UPLOAD_PATH), fair among
    drivers rather than first come first served (common.lanes.FairLane). Only these
    requests are limited: the fast lane's fixes (but not those it hands to Django, e.g. with
    Redis down), the sockets and the full stack (admin, /support/, session-authenticated API
    calls) are not.
    """

    IDLE_EXECUTORS = 32
    # A proof upload (a photo decoded and re-encoded, up to seconds of CPU, with a wait for a
    # decode slot before it: dispatch/proofs.py) takes a turn in a lane of its own,
    # PROOF_UPLOAD_CONCURRENCY: in the API's, a driver's burst of large photos held every turn
    # and every other API call of the process waited behind it (an audit: 40 uploads of a 43 KB
    # 12-megapixel PNG, the seller's list and another driver's offers took 6-16 s). The lane is
    # fair among drivers (common.lanes.FairLane, by the driver of the path): a turn that comes free
    # goes to the waiting caller holding the fewest; in a first-come lane one driver's burst of
    # 40 photos took every turn and another driver's one photo waited behind it (3.2 s seen).
    UPLOAD_PATH = re.compile(r"/v2/drivers/(?P<driver>[^/]+)/deliveries/[^/]+/proof")

    def __init__(self):
        super().__init__()
        self._idle: list[ThreadPoolExecutor] = []
        self._concurrency = {"api": settings.API_REQUEST_CONCURRENCY, "upload": settings.PROOF_UPLOAD_CONCURRENCY}
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore | FairLane]] = (
            weakref.WeakKeyDictionary())

    def load_middleware(self, is_async=False):
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async=False)  # the sync chain: the request runs on one thread
        finally:
            settings.MIDDLEWARE = full

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            upload = self.UPLOAD_PATH.fullmatch(scope["path"]) if scope["method"] == "POST" else None
            lane = "upload" if upload else "api"
            slots = self._slots_of_running_loop(lane, upload and upload["driver"])
            if slots is not None and not await self._turn(slots, receive, lane):
                return  # the client left while the request waited: it never runs
            executor = self._idle.pop() if self._idle else ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-request")
            try:
                loop = asyncio.get_running_loop()
                context = contextvars.copy_context()  # as sync_to_async: the request sees the loop's, and leaves none behind
                try:
                    response = await self._on_thread(executor, context.run, self._respond, scope, body_file, loop)
                finally:
                    if slots is not None:
                        slots.release()  # the response is made; sending it takes no turn
                try:
                    await self.send_response(response, send)
                except asyncio.CancelledError:
                    pass  # the client went away while the response was being sent
                finally:
                    if response.streaming:  # not closed on the thread: its content is read here
                        await self._on_thread(executor, context.run, response.close)
            finally:
                if len(self._idle) < self.IDLE_EXECUTORS:
                    self._idle.append(executor)
                else:
                    executor.shutdown(wait=False)
        finally:
            body_file.close()

    def _slots_of_running_loop(self, lane: str, driver: str | None) -> asyncio.Semaphore | Seat | None:
        if not self._concurrency[lane]:
            return None
        lanes = self._slots.setdefault(asyncio.get_running_loop(), {})
        slots = lanes.get(lane)
        if slots is None:
            size = self._concurrency[lane]
            slots = lanes[lane] = FairLane(size) if lane == "upload" else asyncio.Semaphore(size)
        # (an upload's caller is the driver of its path, whom the view holds to its token: a
        # token's spellings, or a driver's several logins, are one caller)
        return slots.seat(driver) if lane == "upload" else slots

    @staticmethod
    async def _turn(slots: asyncio.Semaphore | Seat, receive, lane: str) -> bool:
        """Wait for a slot (the API's first come first served; the upload lane's fair among
        drivers). False, holding no slot, if the client
        disconnects first: a request whose client gave up (and may have retried) never runs."""
        if not slots.locked():
            await slots.acquire()  # a free slot: no wait
            return True

        async def disconnected():
            while (await receive())["type"] != "http.disconnect":
                pass

        acquire, gone = asyncio.ensure_future(slots.acquire()), asyncio.ensure_future(disconnected())
        started = time.perf_counter()
        try:
            await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while waiting
            gone.cancel()
            acquire.cancel()
            if acquire.done() and not acquire.cancelled():
                slots.release()
            raise
        gone.cancel()
        if gone.done() and not gone.cancelled():
            gone.exception()  # (retrieved: a receive that failed counts as the client gone)
        if acquire.done():
            API_REQUEST_WAIT.labels(lane).observe(time.perf_counter() - started)
            return True
        API_REQUESTS_ABANDONED.labels(lane).inc()
        acquire.cancel()  # (a Semaphore waiter cancelled after it was woken hands the slot on)
        try:
            await acquire
        except asyncio.CancelledError:
            return False
        slots.release()  # it got the slot as the client left
        return False

    @staticmethod
    async def _on_thread(executor, fn, *args):
        """`run_in_executor`, but a cancelled caller still waits for the thread to finish (the
        thread cannot be stopped): its slot and its executor are not handed on while it runs."""
        future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait({future})
            raise

    def _respond(self, scope, body_file, loop):
        """On the request's thread: what WSGIHandler does, up to a response with its content."""
        bind_server_loop(loop)
        try:
            set_script_prefix(get_script_prefix(scope))
            signals.request_started.send(sender=self.__class__, scope=scope)
            request, response = self.create_request(scope, body_file)
            if request is not None:
                response = self.get_response(request)
                response._handler_class = self.__class__
            if not response.streaming:
                response.close()  # request_finished on this thread: its connections go back to the pool
                if request is not None:
                    _release(request, response)
            return response
        finally:
            bind_server_loop(None)


def _release(request, response) -> None:
    """Break the reference cycles a request leaves, once its response is rendered (only its
    status, headers and content are read after this; the lean path has also closed it), so
    that the request's objects are freed when it ends instead of waiting for the garbage
    collector (tests/common/test_request_cycles.py; 120-170 objects a token API request and 40
    a request through the full stack before):

    - DRF's renderer context holds the response, which holds the context, and the view (whose
      request and response hold it back; Django's View.setup also stores `head`, a bound
      method of the view, on the view); the DRF request's parser context holds the request:
      the contexts and the view are emptied;
    - a serializer and its bound fields hold each other (`field.parent`): the serializers
      whose data make the response (the response's data, or one of its values: a page) drop
      their fields, nested ones too;
    - the authenticated user and its driver hold each other (the token authentication caches
      both directions of the one-to-one, as select_related does): the user's cache is
      dropped;
    - on Django's full stack, the request holds the lazy user (a closure over the request),
      `auser` (a partial of it) and the messages storage (which holds the request): the
      request's attributes are dropped.

    What is left is per view: a serializer that only validated the query (its fields and
    itself, a dozen objects)."""
    context = getattr(response, "renderer_context", None)
    if context:
        view, drf_request = context.get("view"), context.get("request")
        context.clear()
        if view is not None:
            vars(view).clear()
        if getattr(drf_request, "parser_context", None):
            drf_request.parser_context.clear()
    data = getattr(response, "data", None)
    for part in [data, *(data.values() if isinstance(data, dict) else ())]:
        serializer = getattr(part, "serializer", None)  # ReturnDict, ReturnList
        if serializer is not None:
            _unbind(serializer)
    user = vars(request).get("user")
    if type(user) is SimpleLazyObject:
        # The full stack's lazy session user, only if a view evaluated it: isinstance() would
        # evaluate it here (a session read, from the event loop: SynchronousOnlyOperation).
        user = vars(user).get("_wrapped")
    if isinstance(user, Model):
        user._state.fields_cache.clear()
    vars(request).clear()


def _unbind(field) -> None:
    """A DRF serializer's bound fields (its `fields`, cached on it) and a list serializer's
    `child`, recursively: each holds its parent."""
    for child in vars(field).pop("fields", {}).values():
        _unbind(child)
    child = vars(field).get("child")
    if child is not None:
        child.parent = None
        _unbind(child)


class ApiSplit:
    """`/v2/…` with `Authorization: Token …` → the lean handler; the rest → the full one
    (the admin, /support/, the docs in a browser, session-authenticated API calls)."""

    def __init__(self, full, lean):
        self.full, self.lean = full, lean

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v2/"):
            for name, value in scope["headers"]:
                if name == b"authorization":
                    if value[:6].lower() == b"token ":
                        return await self.lean(scope, receive, send)
                    break
        return await self.full(scope, receive, send)


django_asgi_app = DjangoHandler()

application = ProtocolTypeRouter(
    {
        "http": AllowedHostGuard(LocationFastLane(EarlyBodyLimit(ApiSplit(django_asgi_app, LeanApiHandler())))),
        # (the customer's socket from any origin: its link's token is its only credential, no
        # cookie, so another site's page gains nothing a copied link does not give; a tracker
        # embedded on a seller's site, or a TRACKING_BASE_URL on another host, was refused)
        "websocket": AllowedHostGuard(TrackingSocketSplit(
            origin_validator(AuthMiddlewareStack(QueryTokenAuthMiddleware(URLRouter(websocket_urlpatterns)))),
            SocketRequestId(URLRouter(websocket_urlpatterns)),
        )),
    }
)


# The apps' Celery task modules, loaded now rather than by the first request that enqueues a
# task: outside a worker Celery imports them lazily (`common.broadcast._registered_task`), ~170
# modules and 0.4 s of one request's time, and a fresh worker's first burst of requests queued
# behind the import lock (the first 16 deliveries created at 16 in flight took 0.45-3 s;
# bench/README.md). Before the freeze below, so they are frozen with the rest.
celery_app.loader.import_default_modules()
celery_app.finalize(auto=True)

# The collector in a process holding thousands of sockets. CPython collects its youngest
# generation every 700 net allocations; at a thousand fixes a second, the objects of messages in
# flight for a few milliseconds outlive two such collections, are promoted to the oldest
# generation, and make full collections frequent: each walks every socket's objects, 0.5-1 s
# with 5,000 sockets open (measured: 41 full collections averaging 500 ms in one 5,000-socket
# run), a stall of every socket and request of the worker. Collecting the youngest generation
# every GC_YOUNG_THRESHOLD allocations instead lets such objects die young (freed by their
# reference counts, as before), and the start-up objects (Django, the apps, the URL patterns)
# are frozen out of every collection (`gc.freeze`). Cyclic garbage is still collected.
gc.freeze()
gc.set_threshold(settings.GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
