"""Django's PostGIS backend, its geometry adapters registered once per psycopg connection.

With the connection pool (`DB_POOL_MAX_SIZE`), every request checks a psycopg connection out
and Django's PostGIS backend registers the geometry, geography and raster types on it again
at each checkout (`get_new_connection`: new dumper classes, the type loaders, the array
types): a few hundred microseconds of every request, for adapters the pooled connection
already has, since a psycopg connection keeps its adapters for its lifetime. Here a
connection that has them is marked and not registered again; a new connection, and
`prepare_database`'s re-registration (`clear_caches`, after it creates the extension), are
registered as Django does.
"""
from django.contrib.gis.db.backends.postgis.base import DatabaseWrapper as PostGISDatabaseWrapper

_MARK = "_dispatch_postgis_adapters"


class DatabaseWrapper(PostGISDatabaseWrapper):
    def register_geometry_adapters(self, pg_connection, clear_caches=False):
        if not clear_caches and getattr(pg_connection, _MARK, None) == self.alias:
            return
        super().register_geometry_adapters(pg_connection, clear_caches)
        setattr(pg_connection, _MARK, self.alias)
