"""Who did something: recorded on audit rows and availability history."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from common.roles import is_driver, is_integration, is_ops, is_support


@dataclass(frozen=True)
class Actor:
    type: str  # driver | admin | integration | support | system
    id: uuid.UUID | None = None

    @classmethod
    def system(cls) -> "Actor":
        return cls("system", None)

    @classmethod
    def for_user(cls, user) -> "Actor":
        if user is None or not user.is_authenticated:
            return cls.system()
        if is_ops(user):
            return cls("admin", user.pk)
        if is_driver(user):
            return cls("driver", user.driver.pk)
        if is_support(user):
            return cls("support", user.pk)
        if is_integration(user):
            return cls("integration", user.pk)
        return cls("system", user.pk)
