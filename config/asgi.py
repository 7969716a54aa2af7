"""ASGI entry point: the location fast lane, then Django (a lean middleware stack for
token-authenticated API requests, the full one for everything else), and the sockets."""
import os
from concurrent.futures import ThreadPoolExecutor

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
django_asgi_app = get_asgi_application()

from asgiref.sync import ThreadSensitiveContext  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402

from availability.api.fastlane import LocationFastLane  # noqa: E402
from common.consumers import QueryTokenAuthMiddleware, SocketRequestId, TrackingSocketSplit, origin_validator  # noqa: E402
from common.middleware import EarlyBodyLimit  # noqa: E402
from config.routing import websocket_urlpatterns  # noqa: E402


class LeanApiHandler(ASGIHandler):
    """Django's ASGI handler with settings.API_MIDDLEWARE instead of settings.MIDDLEWARE.
    Django builds the chain from settings.MIDDLEWARE once, at start-up, in one thread: the
    setting is swapped for that moment only."""

    def load_middleware(self, is_async=False):
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async=is_async)
        finally:
            settings.MIDDLEWARE = full

    # Django runs each request's sync code (signals, the DRF view) on a thread of its own: a
    # new one-thread executor per request, i.e. a thread started and joined per request. Here
    # a request borrows an idle one-thread executor instead and hands it back when it ends
    # (its thread's state is what Django leaves between requests, as on a WSGI server's
    # threads: connections closed or returned to the pool by request_finished). At most
    # IDLE_EXECUTORS are kept; more requests in flight than that start threads as before.
    IDLE_EXECUTORS = 32

    def __init__(self):
        super().__init__()
        self._idle: list[ThreadPoolExecutor] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        executor = self._idle.pop() if self._idle else ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-request")
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            if len(self._idle) < self.IDLE_EXECUTORS:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)


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
