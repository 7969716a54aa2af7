from __future__ import annotations

import logging
import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import JsonResponse
from django.urls import Resolver404, resolve
from whitenoise.middleware import WhiteNoiseMiddleware

from common import metrics
from common.errors import error_response

logger = logging.getLogger(__name__)

API_PREFIXES = ("/v2/", "/health", "/metrics")


def _is_api(request) -> bool:
    return request.path.startswith(API_PREFIXES)


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
        if not response.streaming and "Content-Length" not in response.headers:
            response.headers["Content-Length"] = str(len(response.content))
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


class ApiErrorMiddleware(AsyncCapableMiddleware):
    """API paths always answer in the SPEC's error body, even for errors raised outside DRF
    (unknown URLs, wrong path converters, unexpected exceptions)."""

    def process(self, request, response):
        if (
            _is_api(request)
            and response.status_code >= 400
            and not isinstance(response, JsonResponse)
            and "json" not in response.get("Content-Type", "")
        ):
            messages = {404: "Not found.", 405: f'Method "{request.method}" not allowed.', 400: "Bad request."}
            return error_response(request, response.status_code, messages.get(response.status_code, "Request failed."))
        return response

    def process_exception(self, request, exception):
        if not _is_api(request):
            return None
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, 500, "Internal server error.")


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
