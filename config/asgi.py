"""ASGI entry point: the location fast lane, then Django (a lean middleware stack for
token-authenticated API requests, the full one for everything else), and the sockets."""
import asyncio
import contextvars
import gc
import os
from concurrent.futures import ThreadPoolExecutor

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core import signals  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.urls import set_script_prefix  # noqa: E402

from availability.api.fastlane import LocationFastLane  # noqa: E402
from common.broadcast import bind_server_loop  # noqa: E402
from common.consumers import QueryTokenAuthMiddleware, SocketRequestId, TrackingSocketSplit, origin_validator  # noqa: E402
from common.middleware import EarlyBodyLimit  # noqa: E402
from config.routing import websocket_urlpatterns  # noqa: E402


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
    more requests in flight than that start threads of their own."""

    IDLE_EXECUTORS = 32

    def __init__(self):
        super().__init__()
        self._idle: list[ThreadPoolExecutor] = []

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
        executor = self._idle.pop() if self._idle else ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-request")
        try:
            loop = asyncio.get_running_loop()
            context = contextvars.copy_context()  # as sync_to_async: the request sees the loop's, and leaves none behind
            response = await loop.run_in_executor(executor, context.run, self._respond, scope, body_file, loop)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client went away while the response was being sent
            finally:
                if response.streaming:  # not closed on the thread: its content is read here
                    await loop.run_in_executor(executor, context.run, response.close)
        finally:
            body_file.close()
            if len(self._idle) < self.IDLE_EXECUTORS:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)

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
            return response
        finally:
            bind_server_loop(None)


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


application = ProtocolTypeRouter(
    {
        "http": LocationFastLane(EarlyBodyLimit(ApiSplit(django_asgi_app, LeanApiHandler()))),
        "websocket": origin_validator(TrackingSocketSplit(
            AuthMiddlewareStack(QueryTokenAuthMiddleware(URLRouter(websocket_urlpatterns))),
            SocketRequestId(URLRouter(websocket_urlpatterns)),
        )),
    }
)


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
