"""Start-up hooks: how plumbing that sits low (the user admin, the token admin) lets a higher
app react without importing it. An app registers its handler in `AppConfig.ready()`."""
from __future__ import annotations

from collections.abc import Callable

_login_revoked: list[Callable[[object], None]] = []


def on_login_revoked(handler: Callable[[object], None]) -> None:
    """`handler(user)` runs after a user's API token is deleted or the user is deactivated."""
    if handler not in _login_revoked:
        _login_revoked.append(handler)


def login_revoked(user) -> None:
    for handler in _login_revoked:
        handler(user)
