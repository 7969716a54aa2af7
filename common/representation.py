"""`PlainRepresentation`: a serializer's output without building its fields per instance.

DRF builds a serializer's fields for every instance it serializes: `Serializer.fields`
deep-copies every declared field and binds the copies to the new serializer (for the
delivery's 40 fields, most of the cost of rendering one). The output never needed those
copies: each field's `get_attribute` and `to_representation` depend on the field's own
arguments, not on the serializer it is bound to. A serializer with this mixin builds its
fields once per class (on a prototype) and renders each instance with them, calling
`SerializerMethodField` methods on the serializer at hand (they read its context). The
output is DRF's, field for field and in the same order (tests/common/test_plain_representation.py
compares the two on every kind of delivery).

Only for serializers whose fields do not depend on the instance or the context (no
`get_fields` or `__init__` that adds or drops fields) and that have no field that reads the
serializer it is bound to (nested serializers, related or file fields, `source="*"`): the
first use checks the field types and refuses the others.
"""
from __future__ import annotations

from rest_framework import serializers
from rest_framework.fields import SkipField
from rest_framework.relations import PKOnlyObject

_REFUSED = (serializers.BaseSerializer, serializers.RelatedField, serializers.ManyRelatedField, serializers.FileField,
            serializers.HiddenField)


# (A comment, not a docstring: drf-spectacular describes a serializer by the first docstring of
# its classes, and this one became the description of every serializer using the mixin.)
# The keys in `omit_when_none` are left out when they have no value instead of sent as null:
# the seed marks them optional (`responseTimeMs?: number`), and a client that checks a body
# against it refuses a null. Their fields say `required=False` (not nullable) so that the
# schema agrees.
class OmitNone:
    omit_when_none: tuple[str, ...] = ()

    def to_representation(self, instance):
        data = super().to_representation(instance)
        for key in self.omit_when_none:
            if key in data and data[key] is None:
                del data[key]
        return data


class PlainRepresentation:
    plain_representation = True

    @classmethod
    def _plain_plan(cls) -> list[tuple[str, serializers.Field | None, str | None]]:
        plan = cls.__dict__.get("_plain_plan_cache")
        if plan is None:
            plan = []
            for name, field in cls(context={}).fields.items():
                if field.write_only:
                    continue
                if isinstance(field, serializers.SerializerMethodField):
                    plan.append((name, None, field.method_name))
                elif isinstance(field, _REFUSED) or field.source == "*":
                    raise TypeError(f"{cls.__name__}.{name}: {type(field).__name__} needs its serializer; "
                                    "PlainRepresentation cannot render it")
                else:
                    plan.append((name, field, None))
            cls._plain_plan_cache = plan
        return plan

    def to_representation(self, instance):
        if not self.plain_representation:
            return super().to_representation(instance)
        ret = {}
        for name, field, method in self._plain_plan():
            if field is None:
                ret[name] = getattr(self, method)(instance)
                continue
            # as Serializer.to_representation does for each readable field
            try:
                attribute = field.get_attribute(instance)
            except SkipField:
                continue
            check_for_none = attribute.pk if isinstance(attribute, PKOnlyObject) else attribute
            ret[name] = None if check_for_none is None else field.to_representation(attribute)
        return ret
