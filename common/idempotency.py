"""`Idempotency-Key` on POSTs: the same key from the same caller within the TTL replays the
first response and has no second effect; the same key with another body is a 409.

The record is claimed (inserted with no response yet) before the view runs, so two
concurrent requests with one key cannot both execute: the second sees the claim and gets 409.
A response of 5xx, 429 or one of a request that never ran (401, 403, 413, 415) releases the
claim so that the caller can retry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import timedelta

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import HttpResponse
from django.utils import timezone

from common.errors import error_response, is_database_unavailable, response_for_exception
from common.models import IdempotencyRecord
from common.parsers import PARSED_ATTR
from common.tokens import api_token_live, authorization_token, token_digest

logger = logging.getLogger(__name__)

HEADER = "HTTP_IDEMPOTENCY_KEY"
MAX_KEY_LENGTH = 255
# Answers of a request that never ran (not authenticated, not allowed, a body the endpoint does
# not take) or may be retried (throttled), not stored: the retry, fixed, runs. (A 400 may have
# had an effect: a wrong handoff code is counted; it is stored.)
NOT_STORED = frozenset({401, 403, 413, 415, 429})


def _caller(request) -> str:
    """Who sent the request: the account, however it authenticates (any of its API tokens,
    the header written in any case, or its session), so that a retry is recognised. A token no
    account holds is its own caller (the view refuses it); so is an unknown scheme. Without
    credentials: the customer's tracking link (`?token=`), else the address and the path."""
    auth = request.META.get("HTTP_AUTHORIZATION")
    if auth:
        key = authorization_token(auth.encode("latin-1", "replace"))
        if key is not None:
            digest = token_digest(key)
            token = api_token_live(digest)  # an expired token, or a deactivated user's, is nobody's
            return f"user:{token.user_id}" if token is not None else f"token:{digest}"
        return _header_caller(auth)
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    link = request.GET.get("token")
    if link:  # a customer, by their tracking link: two customers behind one address shared a caller
        return "link:" + hashlib.sha256(link.encode("utf-8", "surrogatepass")).hexdigest()
    # Anyone else without credentials: per address and path. A key of a login (stored) made any
    # later call with it and no credentials a 409 on every other endpoint, not the 401. Hashed:
    # as text, a driver's step path (two ids) and an address passed the column's 128 characters,
    # and the INSERT's error was a 500 where the answer is a 401 (a fuzzer).
    where = f"{request.META.get('REMOTE_ADDR', '')} {request.path}"
    return "anon:" + hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()


# Stored responses are sealed (AES-GCM under a key derived from SECRET_KEY, bound to their
# record's caller and key): a response may carry a secret shown once (a new driver's
# `apiToken`, a login's token) or a customer's details, and a copy of the database must hold
# no usable token (common/tokens.py). Rows written before sealing are replayed as stored.
_SEALED = b"\x00seal1"
_NONCE_BYTES = 12


def _sealing_key(secret: str) -> bytes:
    return hashlib.sha256(b"dispatch.idempotency.response\0" + secret.encode("utf-8", "surrogatepass")).digest()


def _bound_to(caller: str, key: str) -> bytes:
    return f"{caller}\0{key}".encode("utf-8", "surrogatepass")


def seal_response(body: bytes, *, caller: str, key: str) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return _SEALED + nonce + AESGCM(_sealing_key(settings.SECRET_KEY)).encrypt(nonce, body, _bound_to(caller, key))


def unseal_response(stored: bytes, *, caller: str, key: str) -> bytes | None:
    """The response body as it was sent, or None when no key this server holds (SECRET_KEY,
    SECRET_KEY_FALLBACKS) opens it."""
    if not stored.startswith(_SEALED):
        return stored
    nonce, sealed = stored[len(_SEALED) : len(_SEALED) + _NONCE_BYTES], stored[len(_SEALED) + _NONCE_BYTES :]
    for secret in (settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS):
        try:
            return AESGCM(_sealing_key(secret)).decrypt(nonce, sealed, _bound_to(caller, key))
        except InvalidTag:
            continue
    return None


def _header_caller(auth: str) -> str:
    """The caller by the header's exact text: how records were keyed before callers were
    accounts (still the caller for a header that is no `Token <key>`)."""
    return "auth:" + hashlib.sha256(auth.encode("utf-8", "surrogatepass")).hexdigest()


def _caller_of_record(request, caller: str, key: str) -> str:
    """`caller`, or the header-text caller when a record of this key was stored that way (in
    the 24 h after the deploy that made callers accounts): a retry across it is replayed."""
    auth = request.META.get("HTTP_AUTHORIZATION")
    if not auth or not caller.startswith("user:"):  # (a dead token finds no older record either)
        return caller
    legacy = _header_caller(auth)
    return legacy if IdempotencyRecord.objects.filter(caller=legacy, key=key).exists() else caller


def _request_hash(request, *, raw_json: bool = False) -> str:
    h = hashlib.sha256()
    h.update(request.method.encode())
    h.update(b"\0")
    h.update(request.get_full_path().encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(request.body if raw_json else _comparable_body(request))
    return h.hexdigest()


def _comparable_body(request) -> bytes:
    """The body, with a multipart body's boundary replaced by a fixed one: clients pick a new
    random boundary on every retry, which must not make the same upload a different request;
    a JSON body as its value (a retry that spaces or orders its keys otherwise is the same
    request; RequestGuardMiddleware parsed it)."""
    body = request.body
    content_type, params = request.content_type.lower(), request.content_params
    if hasattr(request, PARSED_ATTR):
        return b"json\0" + json.dumps(getattr(request, PARSED_ATTR), sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=False).encode("utf-8", "surrogatepass")
    if content_type == "multipart/form-data" and params.get("boundary"):
        body = body.replace(b"--" + params["boundary"].encode("latin-1", "replace"), b"--\0boundary\0")
    return body


class IdempotencyMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    @staticmethod
    def _applies(request) -> bool:
        return request.method == "POST" and HEADER in request.META and request.path.startswith("/v2/")

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        if not self._applies(request):
            return self.get_response(request)
        early, record = self._begin(request)
        if early is not None:
            return early
        return self._finish(record, self.get_response(request))

    async def __acall__(self, request):
        if not self._applies(request):
            return await self.get_response(request)
        early, record = await sync_to_async(self._begin)(request)
        if early is not None:
            return early
        response = await self.get_response(request)
        return await sync_to_async(self._finish)(record, response)

    def _begin(self, request):
        key = request.META[HEADER].strip()
        if not key or len(key) > MAX_KEY_LENGTH:
            return error_response(request, 400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters."), None
        try:
            caller = _caller_of_record(request, _caller(request), key)
            record, replay = self._claim(request, caller, key, _request_hash(request), timezone.now())
        except Exception as exc:
            if not is_database_unavailable(exc):
                raise
            return response_for_exception(request, exc), None  # 503: the caller may retry the key
        return replay, record

    def _finish(self, record, response):
        key = record.key
        try:
            if response.status_code in NOT_STORED or response.status_code >= 500 or getattr(response, "streaming", False):
                IdempotencyRecord.objects.filter(pk=record.pk).delete()
            else:
                IdempotencyRecord.objects.filter(pk=record.pk).update(
                    status_code=response.status_code,
                    response_body=seal_response(bytes(response.content), caller=record.caller, key=record.key),
                    content_type=response.get("Content-Type", ""),
                )
        except Exception:
            logger.warning("idempotency record %s not saved", key, exc_info=True)
        return response

    def _claim(self, request, caller, key, digest, now):
        ttl = timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS)
        for _ in range(2):
            try:
                with transaction.atomic():
                    record = IdempotencyRecord.objects.create(
                        caller=caller, key=key, method=request.method, path=request.path[:500],
                        request_hash=digest, created_at=now,
                    )
                return record, None
            except IntegrityError:
                existing = IdempotencyRecord.objects.filter(caller=caller, key=key).first()
                if existing is None:
                    continue  # released between our insert and read: try again
                if existing.created_at < now - ttl:
                    IdempotencyRecord.objects.filter(pk=existing.pk, created_at=existing.created_at).delete()
                    continue
                # (raw_json: how a JSON body was hashed before 2026-12-06; records live 24 h: remove this
                # second hash once every instance has run the new code a day)
                if existing.request_hash != digest and existing.request_hash != _request_hash(request, raw_json=True):
                    return None, error_response(
                        request, 409, "This Idempotency-Key was used with a different request."
                    )
                if existing.status_code is None:
                    running = error_response(request, 409, "A request with this Idempotency-Key is still being processed.")
                    # (a claim older than any request runs was left by a process that died, or a
                    # response that could not be stored: a retry in a second would not help)
                    return None, _retry_soon(running) if existing.created_at >= now - CLAIM_RUNNING_SECONDS else running
                body = unseal_response(bytes(existing.response_body or b""), caller=caller, key=key)
                if body is None:
                    return None, error_response(
                        request, 409, "This Idempotency-Key's first response can no longer be replayed "
                        "(the server's secret key changed); send the request with a new key."
                    )
                replay = HttpResponse(
                    body,
                    status=existing.status_code,
                    content_type=existing.content_type or "application/json",
                )
                replay["Idempotent-Replayed"] = "true"
                return None, replay
        return None, _retry_soon(error_response(request, 409, "This Idempotency-Key could not be claimed; retry."))


# How long a claimed key's first request may still be running (web statement timeout 30 s, plus
# its Python): a retry of one claimed more recently is told to come back in a second.
CLAIM_RUNNING_SECONDS = timedelta(seconds=60)


def _retry_soon(response):
    """A 409 that a retry in a moment resolves (the first request is still running): says when
    (`Retry-After`), so a client backs off instead of taking it for a conflict of bodies."""
    response["Retry-After"] = "1"
    return response


def purge_expired_idempotency_records(*, now=None, batch_size: int = 5000) -> int:
    """Delete records older than the TTL, in bounded batches. Returns how many were deleted."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS)
    ids = list(IdempotencyRecord.objects.filter(created_at__lt=cutoff).values_list("pk", flat=True)[:batch_size])
    if not ids:
        return 0
    deleted, _ = IdempotencyRecord.objects.filter(pk__in=ids).delete()
    return deleted
