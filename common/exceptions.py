"""Domain errors: what services raise when a request cannot be carried out.

Services never import DRF; the API layer maps these to the SPEC's error body in one place
(`common.errors.exception_handler`), and the support views and admin show `message`.
"""
from __future__ import annotations

# The `details` key of errors not of one field (SPEC: JSON keys are camelCase); DRF's own
# serializers use it too (REST_FRAMEWORK["NON_FIELD_ERRORS_KEY"], the same value).
NON_FIELD_ERRORS = "nonFieldErrors"


class DomainError(Exception):
    status_code = 400
    default_message = "The request cannot be carried out."

    def __init__(self, message: str | None = None, *, details: dict | None = None):
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)


class InvalidInput(DomainError):
    """Bad input found by a service (a 400); `details` maps fields to their messages."""

    status_code = 400
    default_message = "Invalid input."

    def __init__(self, details: dict[str, list[str]] | str, message: str | None = None):
        if isinstance(details, str):
            details = {NON_FIELD_ERRORS: [details]}
        flat = "; ".join(f"{field}: {' '.join(msgs)}" if field != NON_FIELD_ERRORS else " ".join(msgs)
                         for field, msgs in details.items())
        super().__init__(message or flat, details=details)


class Forbidden(DomainError):
    status_code = 403
    default_message = "You do not have permission to perform this action."


class NotFound(DomainError):
    status_code = 404
    default_message = "Not found."


class Conflict(DomainError):
    status_code = 409
    default_message = "The resource is not in a state that allows this."


class PayloadTooLarge(DomainError):
    """An upload over its size limit (a 413)."""

    status_code = 413
    default_message = "The upload is too large."


class ServiceUnavailable(DomainError):
    status_code = 503
    default_message = "A backing service is unavailable."
