"""Small SQL helpers the ORM has no single call for: INSERT … ON CONFLICT DO NOTHING that says
whether the row went in, several of them (or one and an UPDATE) in one statement; the rows of
several tables in one statement (`insert_many`); `save(update_fields=…)` without compiling
its UPDATE each time (`save_fields`)."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.contrib.gis.db.models.fields import BaseSpatialField
from django.db import DatabaseError, connections, router
from django.db.models import Model, QuerySet, signals
from django.db.models.constants import OnConflict
from django.db.models.expressions import DatabaseDefault
from django.db.models.sql import InsertQuery, UpdateQuery
from django.utils import timezone


def _insert_sql(obj: Model, using: str) -> tuple[str, tuple]:
    """`INSERT … ON CONFLICT DO NOTHING` of the unsaved `obj`, its fields prepared as `save()`
    prepares them (defaults, `auto_now_add`)."""
    model = type(obj)
    fields = [f for f in model._meta.local_concrete_fields if not f.generated]
    sql, params = _insert_rows_sql(model, fields, [obj], using, on_conflict=OnConflict.IGNORE)
    return sql, tuple(params)


def _saved(obj: Model, using: str) -> None:
    obj._state.adding = False
    obj._state.db = using


def insert_unless_conflict(obj: Model, *, then_update: tuple[QuerySet, dict[str, Any]] | None = None) -> bool:
    """INSERT the unsaved `obj` unless a unique constraint (partial ones included) already
    holds a row like it: `INSERT … ON CONFLICT DO NOTHING`. True when the row went in. A
    conflict is not an error, so the transaction stays usable without a savepoint, and the
    database keeps the last word on the constraint. Nothing is read back, so give the primary
    key a Python default.

    `then_update=(queryset, values)`: when the row went in, `queryset.update(**values)` in the
    same statement (a data-modifying WITH); not at all when it did not."""
    using = router.db_for_write(type(obj), instance=obj)
    sql, params = _insert_sql(obj, using)
    if then_update is None:
        sql = f"{sql} RETURNING 1"
    else:
        queryset, values = then_update
        query = queryset.query.chain(UpdateQuery)
        query.add_update_values(values)
        update_sql, update_params = query.get_compiler(using=using).as_sql()
        assert " WHERE " in update_sql, update_sql
        sql = f"WITH inserted AS ({sql} RETURNING 1) {update_sql} AND EXISTS (SELECT 1 FROM inserted) RETURNING 1"
        params = params + tuple(update_params)
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        inserted = cursor.fetchone() is not None
    if inserted:
        _saved(obj, using)
    return inserted


def insert_many_unless_conflict(objs: list[Model]) -> list[bool]:
    """`insert_unless_conflict` of several unsaved rows of one model in ONE multi-row
    `INSERT … VALUES (…), (…) ON CONFLICT DO NOTHING RETURNING pk`; one True/False per row, in
    the order given. The primary keys need a Python default (they say which rows went in)."""
    if not objs:
        return []
    model = type(objs[0])
    using = router.db_for_write(model, instance=objs[0])
    fields = [f for f in model._meta.local_concrete_fields if not f.generated]
    query = InsertQuery(model, on_conflict=OnConflict.IGNORE)
    query.insert_values(fields, objs)
    ((sql, params),) = query.get_compiler(using=using).as_sql()
    pk_column = connections[using].ops.quote_name(model._meta.pk.column)
    with connections[using].cursor() as cursor:
        cursor.execute(f"{sql} RETURNING {pk_column}", params)
        went_in = {row[0] for row in cursor.fetchall()}
    inserted = [obj.pk in went_in for obj in objs]
    for obj, ok in zip(objs, inserted, strict=True):
        if ok:
            _saved(obj, using)
    return inserted


def insert_all_unless_conflict(*objs: Model) -> list[bool]:
    """`insert_unless_conflict` of several unsaved rows (of any models) in one statement, in
    the order given; one True/False per row."""
    using = router.db_for_write(type(objs[0]), instance=objs[0])
    ctes, params = [], []
    for i, obj in enumerate(objs):
        sql, p = _insert_sql(obj, using)
        ctes.append(f"i{i} AS ({sql} RETURNING 1)")
        params.extend(p)
    counts = ", ".join(f"(SELECT count(*) FROM i{i})" for i in range(len(objs)))
    with connections[using].cursor() as cursor:
        cursor.execute(f"WITH {', '.join(ctes)} SELECT {counts}", params)
        inserted = [bool(n) for n in cursor.fetchone()]
    for obj, went_in in zip(objs, inserted, strict=True):
        if went_in:
            _saved(obj, using)
    return inserted


_insert_texts: dict[tuple, str] = {}
_INSERT_ROWS_CACHED, _INSERT_SHAPES_MAX = 8, 512  # a request's few rows; larger batches compile


def _insert_rows_sql(model, fields: list, rows: list, using: str, on_conflict=None) -> tuple[str, list]:
    """The multi-row INSERT of `rows` as InsertQuery compiles it, its text compiled once per
    shape (model, fields, number of rows, which values are DEFAULT, the placeholders of the
    geometries) and its parameters prepared as the compiler prepares them (`pre_save(add=True)`,
    `get_db_prep_save`). A value that is another expression, or another field with a
    placeholder of its own, compiles."""
    connection = connections[using]
    params, shape = [], []  # shape: (row, field, "DEFAULT" or a geometry's placeholder)
    for i, obj in enumerate(rows):
        for j, field in enumerate(fields):
            value = field.pre_save(obj, add=True)
            if isinstance(value, DatabaseDefault):
                shape.append((i, j, "DEFAULT"))
                continue
            if hasattr(value, "resolve_expression") or (
                    hasattr(field, "get_placeholder") and not isinstance(field, BaseSpatialField)):
                return _insert_compiled(model, fields, rows, using, on_conflict)
            value = field.get_db_prep_save(value, connection=connection)
            if isinstance(field, BaseSpatialField):  # "%s", or ST_Transform(%s, srid) for another SRID
                shape.append((i, j, field.get_placeholder(value, None, connection)))
            params.append(value)
    key = (model, tuple(fields), len(rows), tuple(shape), on_conflict, using)
    sql = _insert_texts.get(key)
    if sql is not None:
        return sql, params
    # compiled (pre_save again: the compiler's values are the ones the rows now hold)
    sql, compiled = _insert_compiled(model, fields, rows, using, on_conflict)
    if len(rows) <= _INSERT_ROWS_CACHED and len(_insert_texts) < _INSERT_SHAPES_MAX \
            and [type(p) for p in compiled] == [type(p) for p in params]:  # else not the shape we think
        _insert_texts[key] = sql
    return sql, compiled


def _insert_compiled(model, fields: list, rows: list, using: str, on_conflict=None) -> tuple[str, list]:
    query = InsertQuery(model, on_conflict=on_conflict)
    query.insert_values(fields, rows)
    ((sql, params),) = query.get_compiler(using=using).as_sql()
    return sql, list(params)


def insert_many(*batches) -> None:
    """Several multi-row INSERTs (one list of unsaved rows of one model each) in one statement:
    `WITH i0 AS (INSERT … VALUES (…), (…) RETURNING …), i1 AS (…) SELECT …`. Rows are
    prepared as `bulk_create` prepares them (defaults, `auto_now_add`, `db_default` as
    DEFAULT), and what the database generates (an auto primary key, a `db_default` such as a
    sequence) is set on each row from RETURNING, in the order given, as `bulk_create` does.
    No ON CONFLICT: a constraint violation is an error, as it is for `bulk_create`."""
    batches = [list(rows) for rows in batches if rows]
    if not batches:
        return
    if len(batches) == 1:  # one table: the plain multi-row INSERT
        type(batches[0][0]).objects.bulk_create(batches[0])
        return
    using = router.db_for_write(type(batches[0][0]), instance=batches[0][0])
    ctes, params, selects, returned = [], [], [], []
    for i, rows in enumerate(batches):
        model = type(rows[0])
        opts = model._meta
        # a database-generated primary key (AutoField) is left out and read back, with every
        # `db_default` field (written as DEFAULT)
        fields = [f for f in opts.local_concrete_fields if not f.generated and not (f.primary_key and f.db_returning)]
        back = list(opts.db_returning_fields)
        sql, p = _insert_rows_sql(model, fields, rows, using)
        columns = ", ".join(connections[using].ops.quote_name(f.column) for f in back)
        ctes.append(f"i{i} AS ({sql} RETURNING {columns})" if back else f"i{i} AS ({sql})")
        params.extend(p)
        for f in back:
            selects.append(f"ARRAY(SELECT {connections[using].ops.quote_name(f.column)} FROM i{i})")
            returned.append((rows, f))
    select = ", ".join(selects) if selects else "1"
    with connections[using].cursor() as cursor:
        cursor.execute(f"WITH {', '.join(ctes)} SELECT {select}", params)
        values = cursor.fetchone()
    for (rows, field), column in zip(returned, values if selects else (), strict=True):
        for row, value in zip(rows, column, strict=True):
            setattr(row, field.attname, value)
    for rows in batches:
        for row in rows:
            _saved(row, using)


_updates: dict[tuple, tuple[str, list] | None] = {}


def _update_of(model, fields: tuple, using: str) -> tuple[str, list] | None:
    """(the UPDATE's text, its fields) for `save_fields`, or None where `save()` must do it."""
    opts = model._meta
    targets = [opts.get_field(name) for name in fields]  # an unknown name raises FieldDoesNotExist
    if opts.parents or any(f.primary_key or not f.concrete or f.generated or hasattr(f, "get_placeholder")
                           for f in targets):
        return None
    quote = connections[using].ops.quote_name
    sql = (f"UPDATE {quote(opts.db_table)} SET " + ", ".join(f"{quote(f.column)} = %s" for f in targets)
           + f" WHERE {quote(opts.db_table)}.{quote(opts.pk.column)} = %s")
    return sql, targets


def save_fields(obj: Model, fields) -> None:
    """`obj.save(update_fields=fields)` for a row that exists, by an UPDATE whose text is built
    once per (model, fields, database) instead of compiled on every save: the same statement
    (`UPDATE … SET f = %s, … WHERE pk = %s`), the values prepared as `save()` prepares them
    (`pre_save`, so an `auto_now` field in `fields` gets the time; `get_db_prep_save`), the
    unsaved-related-object check, and "did not affect any rows" as a DatabaseError. With a
    pre_save/post_save receiver, an unsaved `obj`, a value the SQL would have to compile (an
    expression) or a field with a placeholder of its own (a geometry), it is `obj.save(…)`.
    A model whose `save()` does more must do that itself before calling this."""
    fields = tuple(fields)
    if not fields:
        return  # as save(update_fields=[])
    model = type(obj)
    using = router.db_for_write(model, instance=obj)
    key = (model, fields, using)
    try:
        update = _updates[key]
    except KeyError:
        update = _updates[key] = _update_of(model, fields, using)
    if (update is None or obj._state.adding or signals.pre_save.has_listeners(model)
            or signals.post_save.has_listeners(model)):
        return obj.save(update_fields=fields)
    sql, targets = update
    obj._prepare_related_fields_for_save(operation_name="save")  # as save() does, on every relation
    connection = connections[using]
    params = []
    for field in targets:
        value = field.pre_save(obj, False)
        if hasattr(value, "resolve_expression") or hasattr(value, "prepare_database_save"):
            return obj.save(update_fields=fields)
        params.append(field.get_db_prep_save(value, connection=connection))
    params.append(model._meta.pk.get_db_prep_value(obj.pk, connection))
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            if cursor.rowcount < 1:
                raise DatabaseError("Save with update_fields did not affect any rows.")
    except Exception:
        if connection.in_atomic_block:  # as save()'s `transaction.mark_for_rollback_on_error`
            connection.needs_rollback = True
        raise
    obj._state.db = using


def locked_now(now: datetime | None, *previous: datetime | None) -> datetime:
    """The time of a change made under the locks just taken: `now` when the caller gave one;
    else the clock read now, after the locks (a change this one waited for has committed, its
    times read before its commit), and past the latest of `previous` (the locked rows' last
    change, e.g. `updated_at`: another machine's clock may run a little ahead). Read before
    the locks, a change that waited was stamped before the one it waited for: an assignment
    ended before it started, "cancelled, then picked up" in the audit trail."""
    return now if now is not None else after_previous(timezone.now(), *previous)


def after_previous(now: datetime, *previous: datetime | None) -> datetime:
    """`now`, or just after the latest of `previous` when that is later (the same instant is
    left alone: a clock frozen in a test, or the changes of one transaction)."""
    latest = max((p for p in previous if p is not None), default=None)
    if latest is not None and now < latest:
        return latest + timedelta(microseconds=1)
    return now
