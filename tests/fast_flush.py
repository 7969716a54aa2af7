"""The flush after each transactional test (`transaction=True`, `transactional_db`, `live_server`)
with DELETE instead of one TRUNCATE of every table.

Django empties the tables after such a test with `TRUNCATE t1, t2, ...` over all ~40 tables:
PostgreSQL gives every table, index and TOAST relation a new file and drops the old ones at
commit, about 0.45 s on a quiet machine and over 1 s under load, whatever the tables hold. The
suite has over 200 of these tests. A DELETE of a table with a few rows costs well under a
millisecond, so the same emptying takes ~15 ms.

The end state is the same: every table empty, sequences not reset (neither form resets them
without `reset_sequences`), and Django then sends post_migrate as before (content types and
permissions written again). What TRUNCATE does and DELETE would not, is kept:
- row triggers do not fire on TRUNCATE; a table with a user trigger on DELETE (the append-only
  audit log refuses DELETE; the assignment counter updates drivers) is still TRUNCATEd, with
  every table that references it (PostgreSQL refuses to TRUNCATE a referenced table alone);
- the order of the DELETEs does not matter: they run in one transaction (Django's
  execute_sql_flush) with every constraint deferred, and every table ends empty, so each
  foreign key holds at commit. A foreign key that cannot be deferred puts both its tables
  in the TRUNCATE.
- the content types and permissions post_migrate writes back are left in place when they are
  exactly the rows the test database was created with (the usual case: their checksum is
  compared), and emptied like every other table otherwise. Writing them back was ~0.1 s of
  each flush, more than the rest of it.
Django's own statement is used unchanged for reset_sequences / allow_cascade (available_apps),
which this suite does not use."""
from django.db.backends.postgresql.operations import DatabaseOperations

_truncate_all = DatabaseOperations.sql_flush

# Tables with a user-defined row trigger on DELETE (tgtype bit 8), and both tables of any
# foreign key that cannot be deferred.
_MUST_TRUNCATE = """
SELECT tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal AND tgtype & 8 = 8
UNION
SELECT unnest(ARRAY[conrelid::regclass::text, confrelid::regclass::text])
FROM pg_constraint WHERE contype = 'f' AND NOT condeferrable
"""
# (referencing table, referenced table) of every foreign key.
_REFERENCES = "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint WHERE contype = 'f'"


# The rows post_migrate writes (content types, permissions): table -> checksum of its rows.
_POST_MIGRATE_TABLES = {
    "django_content_type": "concat_ws('|', id, app_label, model)",
    "auth_permission": "concat_ws('|', id, name, content_type_id, codename)",
}
_post_migrate_checksums: dict[str, str] = {}


def _checksums(connection) -> dict[str, str]:
    parts = [f"(SELECT md5(coalesce(string_agg({row}, ',' ORDER BY id), '')) FROM {table})"
             for table, row in _POST_MIGRATE_TABLES.items()]
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + ", ".join(parts))
        return dict(zip(_POST_MIGRATE_TABLES, cursor.fetchone()))


def remember_post_migrate_rows(connection) -> None:
    """Call once the test database is created (its content types and permissions written)."""
    _post_migrate_checksums.update(_checksums(connection))


def _must_truncate(connection, tables) -> set:
    with connection.cursor() as cursor:
        cursor.execute(_MUST_TRUNCATE)
        names = {row[0].strip('"') for row in cursor.fetchall()}
        cursor.execute(_REFERENCES)
        references = [(a.strip('"'), b.strip('"')) for a, b in cursor.fetchall()]
    names &= set(tables)
    # TRUNCATE of a table needs every table referencing it in the same statement.
    grew = True
    while grew:
        grew = False
        for referencing, referenced in references:
            if referenced in names and referencing not in names and referencing in tables:
                names.add(referencing)
                grew = True
    return names


def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
    if not tables or reset_sequences or allow_cascade:
        return _truncate_all(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
    truncate = _must_truncate(self.connection, tables)
    if _post_migrate_checksums and _checksums(self.connection) == _post_migrate_checksums:
        tables = [t for t in tables if t not in _POST_MIGRATE_TABLES]  # as post_migrate would write them
    statements = ["SET CONSTRAINTS ALL DEFERRED;"]
    if truncate:
        statements.append("TRUNCATE %s;" % ", ".join(self.quote_name(t) for t in sorted(truncate)))
    statements += ["DELETE FROM %s;" % self.quote_name(t) for t in tables if t not in truncate]
    return statements


def install() -> None:
    """For the test run only (tests/conftest.py): `manage.py flush` elsewhere is untouched."""
    DatabaseOperations.sql_flush = sql_flush
