"""The one error body of the API: {statusCode, timestamp, path, message, error, details?}."""
from __future__ import annotations

import logging
from datetime import timezone as dt_timezone
from http import HTTPStatus

import psycopg
from django.conf import settings
from django.core.exceptions import DisallowedHost, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpResponse, JsonResponse
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from common.exceptions import NON_FIELD_ERRORS, DomainError, InvalidInput
from common.logfilters import RedactTokensFilter

logger = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "The database is unavailable."
DATABASE_TIMED_OUT = "The database did not answer in time."
BODY_TOO_LARGE = "The request body is too large (at most {limit} bytes)."
# The connection is gone or cannot be had (server restarted or shut down, network, pool
# exhausted): Django's wrappers of psycopg's errors and, should one escape them, psycopg's own
# (psycopg.errors.AdminShutdown is an OperationalError).
_UNAVAILABLE = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)
# A statement cancelled by the connection's statement_timeout or lock_timeout (settings
# DB_STATEMENT_TIMEOUT_MS, DB_LOCK_TIMEOUT_MS), also operational errors: the same 503, told
# apart (QueryCanceled is also a cancel by hand, pg_cancel_backend: "due to user request").
_CANCELLED = (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)


def iso_now() -> str:
    return iso(timezone.now())


def error_body(status_code: int, path: str, message: str, details=None) -> dict:
    try:
        reason = HTTPStatus(status_code).phrase
    except ValueError:
        reason = "Error"
    if "token=" in path.lower():  # a tracking link's credential is not echoed (nor cached with a 404)
        path = RedactTokensFilter.redact_text(path)
    body = {
        "statusCode": status_code,
        "timestamp": iso_now(),
        "path": path,
        "message": message,
        "error": reason,
    }
    if details is not None:
        body["details"] = details
    return body


def error_response(request, status_code: int, message: str, details=None) -> JsonResponse:
    return JsonResponse(error_body(status_code, request.get_full_path(), message, details), status=status_code)


# An error message (or field name) is cut to this many characters: a field error may echo the
# input, and a 5 MB invalid choice came back twice in full, a 10 MB answer to a 5 MB request
# (an audit).
MAX_ERROR_TEXT = 1000


def _text(value) -> str:
    """Field errors may echo the input (a choice, a UUID): cut to MAX_ERROR_TEXT characters in
    the middle, and a lone surrogate there, which cannot be encoded as UTF-8 and would turn a
    400 into a 500 when the body is rendered, escaped."""
    text = str(value)
    if len(text) > MAX_ERROR_TEXT:  # (its middle: the echo, keeping what the message says of it)
        half = (MAX_ERROR_TEXT - 1) // 2
        text = text[:half] + "…" + text[-half:]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _flatten_message(detail) -> str:
    """A readable one-line message from DRF's nested error detail."""
    if isinstance(detail, dict):
        parts = []
        for field, value in detail.items():
            text = _flatten_message(value)
            parts.append(text if field in (NON_FIELD_ERRORS, "detail") else f"{_text(field)}: {text}")
        return "; ".join(parts)
    if isinstance(detail, list):
        return " ".join(_flatten_message(v) for v in detail)
    return _text(detail)


def _plain(detail):
    if isinstance(detail, dict):
        return {_text(k): _plain(v) for k, v in detail.items()}
    if isinstance(detail, list):
        return [_plain(v) for v in detail]
    return _text(detail)


def exception_handler(exc, context):
    request = context.get("request")
    path = request.get_full_path() if request is not None else ""
    if isinstance(exc, DomainError):
        exc = api_exception_for(exc)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    elif is_database_unavailable(exc):
        logger.warning("database %s: %s", "timed out" if is_database_timeout(exc) else "unavailable", exc)
        exc = exceptions.APIException(database_unavailable_message(exc))
        exc.status_code = 503
    elif isinstance(exc, RequestDataTooBig):
        exc = exceptions.APIException(body_too_large_message())
        exc.status_code = 413

    if not isinstance(exc, exceptions.APIException):
        return None

    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = "%d" % exc.wait

    details = None
    if isinstance(exc, exceptions.ValidationError):
        details = _plain(exc.detail if isinstance(exc.detail, dict) else {NON_FIELD_ERRORS: exc.detail})
        message = "Validation failed: " + _flatten_message(exc.detail)
    else:
        message = _flatten_message(exc.detail)
        details = getattr(exc, "domain_details", None)
    set_rollback()
    return Response(error_body(exc.status_code, path, message, details), status=exc.status_code, headers=headers)


def api_exception_for(exc: DomainError) -> exceptions.APIException:
    """The one mapping of domain errors to DRF's exceptions (and so to the error body)."""
    if isinstance(exc, InvalidInput):
        return exceptions.ValidationError(exc.details)
    api = exceptions.APIException(exc.message)
    api.status_code = exc.status_code
    api.domain_details = exc.details  # e.g. a 409 naming what it measured (the geofence's distance)
    return api


def is_database_unavailable(exc: BaseException) -> bool:
    """A database error that says nothing about the request: the answer is 503, not 500."""
    return isinstance(exc, _UNAVAILABLE)


def is_database_timeout(exc: BaseException) -> bool:
    """A statement cancelled by the statement or lock timeout."""
    cause = exc if isinstance(exc, _CANCELLED) else exc.__cause__
    return isinstance(cause, _CANCELLED) and "timeout" in (cause.diag.message_primary or "")


def database_unavailable_message(exc: BaseException) -> str:
    """What a 503 for a database error says: a statement ran out of time, or the database could
    not be reached. (Not that nothing changed: a request may have committed before.)"""
    return DATABASE_TIMED_OUT if is_database_timeout(exc) else DATABASE_UNAVAILABLE


def body_too_large_message(limit: int | None = None) -> str:
    return BODY_TOO_LARGE.format(limit=settings.API_MAX_BODY_BYTES if limit is None else limit)


INVALID_HOST_MESSAGE = "Invalid Host header: the host is not served here."


def response_for_exception(request, exc: BaseException, *, api: bool = True) -> HttpResponse | None:
    """The answer to an exception raised outside DRF (middleware, plain Django views): 503 when
    the database is unavailable, 413 for a body over the limit; None for anything else. `api`:
    the SPEC's error body; otherwise plain text (the admin, the support and tracking pages)."""
    if is_database_unavailable(exc):
        logger.warning("database %s on %s %s: %s", "timed out" if is_database_timeout(exc) else "unavailable",
                       request.method, request.path, exc)
        status, message = 503, database_unavailable_message(exc)
    elif isinstance(exc, RequestDataTooBig):
        status, message = 413, body_too_large_message()
    elif isinstance(exc, DisallowedHost):  # (a request with no Host: the server's own name, not allowed)
        status, message = 400, INVALID_HOST_MESSAGE
    elif isinstance(exc, SuspiciousOperation):  # Django's 400 for what it refuses to touch
        status, message = 400, "Bad request."
    else:
        return None
    if api:
        return error_response(request, status, message)
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


def iso(dt) -> str | None:
    """ISO 8601 UTC with a Z, as on the wire."""
    if dt is None:
        return None
    value = dt.astimezone(dt_timezone.utc).isoformat() if dt.tzinfo else dt.isoformat()
    return value[:-6] + "Z" if value.endswith("+00:00") else value
