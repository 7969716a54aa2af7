from __future__ import annotations

import logging
import time

from django.http import JsonResponse
from django.urls import Resolver404, resolve

from common import metrics
from common.errors import error_response

logger = logging.getLogger(__name__)

API_PREFIXES = ("/v2/", "/health", "/metrics")


def _is_api(request) -> bool:
    return request.path.startswith(API_PREFIXES)


class ApiErrorMiddleware:
    """API paths always answer in the SPEC's error body, even for errors raised outside DRF
    (unknown URLs, wrong path converters, unexpected exceptions)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
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


class MetricsMiddleware:
    """HTTP request count and latency by route template (never by raw path: bounded labels)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        start = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        if match is None:  # answered by a middleware (an Idempotency-Key replay) or a 404
            match = _resolve(request)
        route = ("/" + match.route) if match is not None and match.route else "unmatched"
        metrics.observe_http(request.method, route, response.status_code, time.perf_counter() - start)
        return response


def _resolve(request):
    try:
        return resolve(request.path_info, getattr(request, "urlconf", None))
    except Resolver404:
        return None
