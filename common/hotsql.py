"""Fixed hot statements compiled once per connection instead of once per call.

A locking read such as "the offer of this driver with its delivery and driver, FOR NO KEY
UPDATE OF …" has the same SQL text on every call; only its parameters (ids, a time) change.
Building its queryset and compiling it costs more CPU than the round trip it makes.
`cached_instances` builds and compiles the queryset once per database connection with stand-in
values for the parameters, remembers the SQL, where each stand-in landed in the parameter list
and the compiler (its select list, converters and `select_related` layout), and from then on
only runs the SQL with the call's values and builds the instances as Django's `ModelIterable`
does (`Model.from_db`, the related populators, the field converters). The statement, its locks
(`select_for_update`, `of`, `no_key`, `skip_locked`) and the rows are those of the queryset.

Only for querysets whose shape is fixed: every value that changes between calls must be one of
the parameters (a UUID, an aware datetime, or a GEOS geometry such as a Point); everything else
(statuses, lookups, ordering, slicing, `select_related`) belongs to the key. A geometry's SRID
joins the key by itself (another SRID compiles to another statement: `ST_Transform`).
Annotations are set on the instances as the ORM sets them; no prefetches or deferred fields.
"""
from __future__ import annotations

import operator
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable

from django.contrib.gis.geos import GEOSGeometry, Point
from django.db import connections, models, router
from django.db.models.query import ModelIterable, ValuesListIterable, get_related_populators
from django.db.transaction import TransactionManagementError

_UUID = models.UUIDField()
_MAX_ENTRIES = 256  # per connection; more distinct keys run uncached (a caller folding a value into its key)


class _Compiled:
    __slots__ = ("sql", "slots", "compiler", "model", "start", "end", "init_list", "populators", "for_update", "reorder",
                 "annotations")

    def __init__(self, queryset, stand_ins: list, alias: str, rows: bool) -> None:
        compiler = queryset.query.get_compiler(using=alias)
        sql, params = compiler.as_sql()
        if queryset._known_related_objects or queryset._prefetch_related_lookups:
            raise ValueError("cached_instances: known related objects and prefetches are not supported")
        positions = {id(s): i for i, s in enumerate(stand_ins)}
        # (True, index of the call's argument, None or how the lookup wraps it) or (False, a constant, None)
        slots = []
        seen = set()
        for p in params:
            i, wrap = positions.get(id(p)), None
            if i is None:  # the field's preparation may have copied the stand-in: compare by value
                i = next((j for j, s in enumerate(stand_ins) if type(s) is type(p) and s == p), None)
            if i is None:  # a geometry reaches the statement as the backend's adapter of it
                i = next((j for j, s in enumerate(stand_ins) if isinstance(s, GEOSGeometry)
                          and getattr(p, "ewkb", None) == bytes(s.ewkb)), None)
                if i is not None:
                    wrap = _adapter_of(p)
            if i is None:
                slots.append((False, p, None))
            else:
                slots.append((True, i, wrap))
                seen.add(i)
        if len(seen) != len(stand_ins):
            raise ValueError("cached_instances: a parameter does not reach the statement")
        self.sql, self.slots, self.compiler = sql, tuple(slots), compiler
        self.for_update = queryset.query.select_for_update
        klass_info, select = compiler.klass_info, compiler.select
        self.reorder = None
        if rows:  # values_list(): rows, not instances, in its order (as ValuesListIterable)
            self.model = None
            query = queryset.query
            names = [*query.extra_select, *query.values_select, *query.annotation_select]
            fields = [*queryset._fields, *(f for f in query.annotation_select if f not in queryset._fields)]
            if queryset._fields and fields != names:
                index = {name: i for i, name in enumerate(names)}
                self.reorder = operator.itemgetter(*[index[f] for f in fields])
            return
        self.annotations = tuple(compiler.annotation_col_map.items())
        self.model = klass_info["model"]
        select_fields = klass_info["select_fields"]
        self.start, self.end = select_fields[0], select_fields[-1] + 1
        self.init_list = [f[0].target.attname for f in select[self.start:self.end]]
        self.populators = get_related_populators(klass_info, select, alias)


def _adapter_of(param):
    """How the call's geometry becomes the parameter the stand-in became (PostGISAdapter)."""
    adapter, geography = type(param), getattr(param, "geography", False)
    return lambda geometry: adapter(geometry, geography=geography)


def _stand_in(i: int, value):
    if isinstance(value, datetime):
        return datetime(1901, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=i + 1)
    if isinstance(value, GEOSGeometry):  # a point whatever the call's geometry: the SQL is the same
        return Point(0.000_123_457 + i, -0.000_765_431, srid=value.srid)
    return uuid.UUID(int=0x5EED_0000_0000_0000_0000_0000_0000_0000 + i + 1)


def _prepare(value):
    if isinstance(value, datetime):
        return value
    if isinstance(value, GEOSGeometry):
        if value.srid is None:
            raise ValueError("cached_instances: a geometry without an SRID")
        return value
    return _UUID.to_python(value)  # as the lookup would: a UUID, ValidationError on bad text


def cached_instances(key: tuple, model: type[models.Model], build: Callable[..., models.QuerySet], *args) -> list:
    """The instances `build(*args)` would return (evaluated as a list), by the SQL compiled
    once per connection for `key`. `args` are UUIDs (or their text) and aware datetimes, each
    reaching the statement as a parameter; `build` must depend on nothing else but the key."""
    return _run(key, model, build, args, ModelIterable)


def cached_rows(key: tuple, model: type[models.Model], build: Callable[..., models.QuerySet], *args) -> list[tuple]:
    """`cached_instances` for a `values_list()` queryset (not flat, not named): its tuples."""
    return _run(key, model, build, args, ValuesListIterable)


def _run(key, model, build, args, iterable) -> list:
    alias = router.db_for_write(model) if iterable is ModelIterable else router.db_for_read(model)
    connection = connections[alias]
    cache = connection.__dict__.setdefault("_hot_sql", {})
    values = [_prepare(a) for a in args]
    srids = tuple(v.srid for v in values if isinstance(v, GEOSGeometry))
    if srids:
        key = (*key, srids)
    compiled = cache.get(key)
    if None in values or (compiled is None and len(cache) >= _MAX_ENTRIES):
        # `= NULL` is not `IS NULL`; too many keys: the queryset's own statement
        return list(build(*values).using(alias))
    if compiled is None:
        stand_ins = [_stand_in(i, v) for i, v in enumerate(values)]
        queryset = build(*stand_ins).using(alias)
        if queryset._iterable_class is not iterable:
            raise ValueError(f"cached_instances/cached_rows: {queryset._iterable_class.__name__} is not {iterable.__name__}")
        compiled = cache[key] = _Compiled(queryset, stand_ins, alias, rows=iterable is ValuesListIterable)
    if compiled.for_update and connection.get_autocommit():
        raise TransactionManagementError("select_for_update cannot be used outside of a transaction.")
    params = [(values[v] if wrap is None else wrap(values[v])) if is_arg else v for is_arg, v, wrap in compiled.slots]
    with connection.cursor() as cursor:
        cursor.execute(compiled.sql, params)
        rows = cursor.fetchall()
    if not rows:
        return []
    if compiled.model is None:
        if compiled.reorder is not None:
            return list(map(compiled.reorder, compiled.compiler.results_iter([rows])))
        return list(compiled.compiler.results_iter([rows], tuple_expected=True))
    start, end, init_list, populators = compiled.start, compiled.end, compiled.init_list, compiled.populators
    annotations = compiled.annotations
    from_db = compiled.model.from_db
    out = []
    for row in compiled.compiler.results_iter([rows]):
        obj = from_db(alias, init_list, row[start:end])
        for populator in populators:
            populator.populate(row, obj)
        for name, position in annotations:
            setattr(obj, name, row[position])
        out.append(obj)
    return out


def cached_first(key: tuple, model: type[models.Model], build: Callable[..., models.QuerySet], *args):
    """`build(*args).first()` by `cached_instances` (the model's ordering, else the primary key)."""
    def first(*values):
        qs = build(*values)
        return (qs if qs.ordered else qs.order_by("pk"))[:1]
    found = cached_instances(key, model, first, *args)
    return found[0] if found else None
