"""Start-up hooks: how plumbing that sits low (the user admin, the token admin) lets a higher
app react without importing it. An app registers its handler in `AppConfig.ready()`."""
from __future__ import annotations

from collections.abc import Callable

from django.db import transaction
from django.db.models.signals import post_delete
from django.utils import timezone

_login_revoked: list[Callable[[object], None]] = []


def on_login_revoked(handler: Callable[[object], None]) -> None:
    """`handler(user)` runs after a user's API token is deleted or changed, or the user is
    changed (deactivated, a role or the password changed)."""
    if handler not in _login_revoked:
        _login_revoked.append(handler)


def login_revoked(user) -> None:
    """Now, and again once the caller's transaction commits (at once outside one): a cache
    that re-read the login between the two, before the commit made the change visible, would
    otherwise keep the revoked login."""
    if transaction.get_connection().in_atomic_block:
        _run_login_revoked(user)
    transaction.on_commit(lambda: _run_login_revoked(user), robust=True)  # (at once outside a transaction)


def _run_login_revoked(user) -> None:
    for handler in _login_revoked:
        handler(user)


_user_deactivated: list[Callable[[object], None]] = []


def on_user_deactivated(handler: Callable[[object], None]) -> None:
    """`handler(user)` runs after the transaction that saved `user` inactive commits (each save
    of an inactive user: a handler acts only on what is still to do)."""
    if handler not in _user_deactivated:
        _user_deactivated.append(handler)


def user_saved(sender, instance, created, update_fields=None, **kwargs) -> None:
    """`post_save` of the user model, from any path (the admin's user and password forms,
    `changepassword`, a shell): a login changed (active or staff flag, password, ...) is
    checked again everywhere it is held. Not for a new user, nor Django's `last_login` stamp."""
    if created or kwargs.get("raw") or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return
    login_revoked(instance)
    if not instance.is_active:
        for handler in _user_deactivated:
            transaction.on_commit(lambda handler=handler: handler(instance), robust=True)


def user_deleted(sender, instance, **kwargs) -> None:
    """`post_delete` of the user model: its tokens went with it; its sockets close."""
    login_revoked(instance)


def api_token_changed(sender, instance, created=False, **kwargs) -> None:
    """`post_save` or `post_delete` of an API token, from any path (`api_tokens_revoke`, the
    admin, a shell's `token.delete()` or `QuerySet.delete()`, a user's cascade): the sockets
    open on it and the fast lane's cache check again. Deleted from a shell, a token's sockets
    stayed open until their routine check (5 minutes). A new token revokes nothing."""
    if created or kwargs.get("raw"):
        return
    update_fields = kwargs.get("update_fields")
    if update_fields is not None and not {"expires_at", "user"} & set(update_fields):
        return  # (nothing a login depends on changed)
    if kwargs.get("signal") is post_delete and instance.expires_at is not None and instance.expires_at <= timezone.now():
        return  # already expired: nothing accepts it, its sockets closed at its expiry (a login's pruning)
    from django.contrib.auth import get_user_model

    login_revoked(get_user_model()(pk=instance.user_id))  # (the handlers need only its key)


def group_deleting(sender, instance, **kwargs) -> None:
    """`pre_delete` of a group: its members, read before the rows go (the cascade sends no
    `m2m_changed`)."""
    instance._login_members = list(instance.user_set.all())


def group_changed(sender, instance, created=False, **kwargs) -> None:
    """`post_save` (a rename: roles are group names) or `post_delete` of a group: its members'
    sockets are checked again."""
    if created or kwargs.get("raw"):
        return
    members = getattr(instance, "_login_members", None)
    for user in members if members is not None else instance.user_set.all():
        login_revoked(user)


def user_groups_changed(sender, instance, action, reverse, model, pk_set, **kwargs) -> None:
    """`m2m_changed` of the user's groups, from either side (`user.groups`, `group.user_set`):
    a role given or taken away is checked again on the users' open sockets."""
    if kwargs.get("raw"):
        return
    if action == "pre_clear" and reverse:
        instance._login_users_cleared = list(instance.user_set.all())  # (post_clear has no pk_set)
        return
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    if not reverse:
        login_revoked(instance)
    elif action == "post_clear":
        for user in getattr(instance, "_login_users_cleared", ()):
            login_revoked(user)
    else:
        for user in model.objects.filter(pk__in=pk_set or ()):
            login_revoked(user)


_event_emitted: list[Callable[[dict], None]] = []


def on_event_emitted(handler: Callable[[dict], None]) -> None:
    """`handler(event)` runs for every live event a service emits (`broadcast_on_commit`), at
    the moment it is emitted: inside the emitting transaction, so what it writes commits or
    rolls back with the change (the webhook outbox)."""
    if handler not in _event_emitted:
        _event_emitted.append(handler)


def event_emitted(event: dict) -> None:
    for handler in _event_emitted:
        handler(event)
