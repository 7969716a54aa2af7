"""API tokens (common.models.ApiToken): only a SHA-256 of each key is stored, so a copy of
the database holds no usable token. A key is 40 random hex characters (as DRF's were, so
clients see no change) and is shown once, when created. SHA-256 without a salt is enough
for 160 random bits: nothing is guessable, and it keeps the lookup one indexed equality
(the hot paths, availability.api.authentication and the location fast lane, look up by
digest in SQL)."""
from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.utils import timezone

from common.models import ApiToken

KEY_BYTES = 20
PREFIX_LENGTH = 8


def authorization_token(value: bytes) -> str | None:
    """The key of an `Authorization: Token <key>` header value, by DRF's TokenAuthentication
    rules (the scheme in any case, then exactly one key), else None. The location fast lane and
    the sockets read the raw header with it; the API's views go through DRF itself."""
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != b"token":
        return None
    try:
        return parts[1].decode()
    except UnicodeDecodeError:
        return None


def token_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def api_token_issue(user, *, name: str = "", ttl: timedelta | None = None) -> tuple[str, ApiToken]:
    """A new API token for `user`: (its key, shown once and never stored; the token)."""
    token = ApiToken(user=user, name=name, expires_at=timezone.now() + ttl if ttl else None)
    key = api_token_new_key(token)
    token.save()
    return key, token


def api_token_new_key(token: ApiToken) -> str:
    """Gives the unsaved `token` a new random key; returns the key (shown once)."""
    key = secrets.token_hex(KEY_BYTES)
    token.prefix, token.digest = key[:PREFIX_LENGTH], token_digest(key)
    return key


def api_token_create(user, *, name: str = "", ttl: timedelta | None = None) -> str:
    """A new API token for `user`; returns its key."""
    return api_token_issue(user, name=name, ttl=ttl)[0]


def api_token_live(digest: str) -> ApiToken | None:
    """The live (unexpired) token with this digest, of an active user (loaded with it), or None."""
    token = ApiToken.objects.select_related("user").filter(digest=digest).first()
    if token is None or not token.user.is_active or api_token_expired(token.expires_at):
        return None
    return token


def api_token_expired(expires_at) -> bool:
    return expires_at is not None and expires_at <= timezone.now()


def api_tokens_revoke(user, *, token_id: int | None = None, name: str | None = None) -> int:
    """Revokes `user`'s token `token_id` (or all its tokens named `name`, or all of them) and
    tells the caches (the location fast lane) at once. Returns how many were revoked."""
    tokens = ApiToken.objects.filter(user=user)
    if token_id is not None:
        tokens = tokens.filter(pk=token_id)
    if name is not None:
        tokens = tokens.filter(name=name)
    count, _ = tokens.delete()  # (its post_delete tells the caches and sockets: hooks.api_token_changed)
    return count


def api_tokens_prune(user) -> int:
    """Deletes `user`'s expired tokens (logins pile them up)."""
    count, _ = ApiToken.objects.filter(user=user, expires_at__lte=timezone.now()).delete()
    return count
