"""Django's PostGIS backend, its geometry adapters registered once per psycopg connection.

With the connection pool (`DB_POOL_MAX_SIZE`), every request checks a psycopg connection out
and Django's PostGIS backend registers the geometry, geography and raster types on it again
at each checkout (`get_new_connection`: new dumper classes, the type loaders, the array
types): a few hundred microseconds of every request, for adapters the pooled connection
already has, since a psycopg connection keeps its adapters for its lifetime. Here a
connection that has them is marked and not registered again; a new connection, and
`prepare_database`'s re-registration (`clear_caches`, after it creates the extension), are
registered as Django does.

Django caches the types' OIDs per alias for the process, whatever database the alias points
at. The simulation sandbox points `default` at another database for a run and back after it,
so those OIDs would be another database's: harmless while parameters were bound client-side,
an error ("cache lookup failed for type") once the server binds them with their OIDs. The
cache is dropped whenever the alias's connection is to another database than the one it was
filled from.

With server-side binding (config/settings/base.py) a statement takes at most 65,535
parameters (the protocol's 16-bit count), where client-side binding had no limit: bulk_create,
bulk_update and the deletion collector split their batches to fit, as Django does for SQLite.
"""
from django.contrib.gis.db.backends.postgis.base import DatabaseWrapper as PostGISDatabaseWrapper
from django.contrib.gis.db.backends.postgis.features import DatabaseFeatures as PostGISFeatures
from django.contrib.gis.db.backends.postgis.operations import PostGISOperations
from django.db import models

_MARK = "_dispatch_postgis_adapters"
# alias -> (host, port, database) of the connection the cached type OIDs were read from
_TYPES_READ_FROM: dict[str, tuple] = {}
MAX_SERVER_BOUND_PARAMS = 65535


class DatabaseFeatures(PostGISFeatures):
    @property
    def max_query_params(self):
        if self.connection.settings_dict.get("OPTIONS", {}).get("server_side_binding"):
            return MAX_SERVER_BOUND_PARAMS
        return None


class DatabaseOperations(PostGISOperations):
    def bulk_batch_size(self, fields, objs):
        limit = self.connection.features.max_query_params
        if not limit or not fields:
            return super().bulk_batch_size(fields, objs)
        width = [len(f.fields) if isinstance(f, models.CompositePrimaryKey) else 1 for f in fields]
        if len(fields) > 2 and fields[0] is fields[1] and getattr(fields[0], "primary_key", False):
            # bulk_update's [pk, pk, *fields]: each field is `WHEN pk = %s THEN %s` per object,
            # and the pk once more in the WHERE
            per_object = width[0] + sum(width[0] + w for w in width[2:])
        else:
            per_object = sum(width)
        return max(1, min(len(objs), limit // per_object))


class DatabaseWrapper(PostGISDatabaseWrapper):
    features_class = DatabaseFeatures
    ops_class = DatabaseOperations

    def register_geometry_adapters(self, pg_connection, clear_caches=False):
        if not clear_caches and getattr(pg_connection, _MARK, None) == self.alias:
            return
        info = getattr(pg_connection, "info", None)
        database = (info.host, info.port, info.dbname) if info is not None else None
        if database != _TYPES_READ_FROM.get(self.alias, database):
            clear_caches = True
        super().register_geometry_adapters(pg_connection, clear_caches)
        _TYPES_READ_FROM[self.alias] = database
        setattr(pg_connection, _MARK, self.alias)
