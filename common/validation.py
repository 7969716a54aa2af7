"""`PlainValidation`: a request body's validation without building the serializer's fields anew.

DRF deep-copies every declared field for each serializer instance (`Serializer.fields`): each
copy runs the field's `__init__` again, with its validators (a regex compiled, a
`deconstructible` built). An input serializer lives for one request, so on a small body
that rebuilding costs more than the validation. A serializer with this mixin builds its fields
once per class and thread and lends them to every instance made in that thread, pointing each
field at the instance (`parent`: its `context` and `root` are the instance's) when the
instance takes them and again when it validates, so a field always reads the serializer at
hand. Per thread, because a field points at one serializer at a time; a request's view runs in
one thread. The checks, their order, `validate_<field>`, `validate` and the errors are DRF's
(tests/common/test_plain_validation.py compares both on good and bad bodies).

Only for flat input serializers: the fields must be the declared ones for every instance (no
`__init__` or `get_fields` that adds, drops or changes fields) and must keep nothing of a
validation (DRF's own fields do not). A nested serializer field keeps its last body, so a
class with one is refused at first use and builds its fields as DRF does.
"""
from __future__ import annotations

import threading

from django.utils.functional import cached_property
from rest_framework import serializers
from rest_framework.utils.serializer_helpers import BindingDict

_local = threading.local()


class PlainValidation:
    @cached_property
    def fields(self) -> BindingDict:
        prototypes = _local.__dict__.setdefault("prototypes", {})
        cls = type(self)
        try:
            lent = prototypes[cls]
        except KeyError:
            built = super().fields  # DRF's own, bound to this instance: kept for the thread
            nested = any(isinstance(f, serializers.BaseSerializer) for f in built.values())
            lent = prototypes[cls] = None if nested else list(built.items())
            return built
        if lent is None:
            return super().fields
        fields = BindingDict(self)
        for name, field in lent:
            field.parent = self  # as bound (`bind` set the name, label and source once)
            fields.fields[name] = field
        return fields

    def to_internal_value(self, data):
        for field in self.fields.values():  # another instance of this thread may have taken them
            field.parent = self
        return super().to_internal_value(data)
