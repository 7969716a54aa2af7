"""Map fields of the ops console (django-leaflet's widget, GeoDjango's form fields), refusing
what they cannot handle safely before they parse, transform or redraw it.

GeoDjango's fields transform any SRID they are given to the column's (an unknown SRID raises
a GDAL error, a 500; Web Mercator values far off the map spin PROJ in a loop, a CPU held for
good), and its widget redraws a refused value in the map's SRID the same way. A value with a
height (Z) reaches PostGIS and fails there, a NaN point is stored as an empty one. The
Leaflet editor submits GeoJSON in WGS84; EWKT and Web Mercator still come from scripts and
old forms, and are checked here first."""
from __future__ import annotations

import json
import math

from django import forms
from django.contrib.admin.widgets import AutocompleteSelect
from django.contrib.gis import forms as gis_forms
from django.contrib.gis.gdal import GDALException
from django.contrib.gis.geos import GEOSGeometry
from django.core.exceptions import ValidationError
from leaflet.admin import LeafletAdminWidget

from common.validators import geometry_positions, lonlat_in_range, validate_wgs84_crs

WGS84, WEB_MERCATOR = 4326, 3857
WEB_MERCATOR_LIMIT_M = 20037508.35  # the square Web Mercator map, in metres


def off_web_mercator(geom) -> bool:
    """Web Mercator values off the map (or not numbers): PROJ can spin on them."""
    if (geom.srid or WGS84) != WEB_MERCATOR:
        return False
    return not all(
        math.isfinite(x) and math.isfinite(y) and abs(x) <= WEB_MERCATOR_LIMIT_M and abs(y) <= WEB_MERCATOR_LIMIT_M
        for x, y, *_ in geometry_positions(geom)
    )


def map_geometry_problem(geom) -> str | None:
    """Why a parsed geometry may not be transformed, stored or redrawn; None if it may. No
    SRID is WGS84 (the map's, as GeoDjango's fields take it). Every position is checked (NaN
    anywhere refuses it)."""
    srid = geom.srid or WGS84
    if srid not in (WGS84, WEB_MERCATOR):
        return f"Must be in WGS84 (SRID {WGS84}) or the map's SRID {WEB_MERCATOR}, not SRID {srid}."
    if geom.hasz:
        return "Must be flat: positions without a height (Z)."
    if geom.empty:
        return "Must not be empty."
    if off_web_mercator(geom):
        return f"Coordinates are off the map (Web Mercator, SRID {WEB_MERCATOR})."
    if srid == WGS84 and not lonlat_in_range(geom):
        return f"Coordinates must be WGS84 lon/lat (SRID {WGS84}): lon -180..180, lat -90..90."
    return None


class MapGeometryFieldMixin:
    """For GeoDjango's form fields: parse, then refuse (`map_geometry_problem`) before the
    field transforms the value to the column's SRID; a GeoJSON `crs` other than WGS84 is
    refused, not ignored."""

    def to_python(self, value):
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                data = json.loads(value)
            except ValueError:
                data = None
            except RecursionError:  # nested thousands deep: GeoDjango's own json.loads would raise it too
                raise forms.ValidationError(self.error_messages["invalid_geom"], code="invalid_geom") from None
            if isinstance(data, dict) and "crs" in data:
                validate_wgs84_crs(data["crs"])
        return super().to_python(value)

    def clean(self, value):
        geom = forms.Field.clean(self, value)  # parse only
        if geom is None:
            return None
        if problem := map_geometry_problem(geom):
            raise forms.ValidationError(problem, code="invalid_geom")
        try:
            return super().clean(geom)
        except GDALException:
            raise forms.ValidationError(f"Could not be converted to WGS84 (SRID {WGS84}).", code="transform_error")

    def has_changed(self, initial, data):
        # GeoDjango compares by transforming the new value: not one that may not be.
        try:
            geom = self.to_python(data)
        except forms.ValidationError:
            return True
        if geom is not None and map_geometry_problem(geom):
            return True
        return super().has_changed(initial, data)


class MapPolygonField(MapGeometryFieldMixin, gis_forms.PolygonField):
    pass


class MapPointField(MapGeometryFieldMixin, gis_forms.PointField):
    pass


class SafeMapWidget(LeafletAdminWidget):
    """django-leaflet's admin widget, which redraws a refused value on the map: a value that
    cannot be read, or may not be transformed (`map_geometry_problem`), is not redrawn."""

    def get_context(self, name, value, attrs):
        if isinstance(value, str) and value:
            try:
                value = self.deserialize(value)
            except (GDALException, RecursionError):  # (GeoDjango lets these out: a 500)
                value = None
        if isinstance(value, GEOSGeometry) and map_geometry_problem(value):
            value = None
        return super().get_context(name, value, attrs)


class SafeAutocompleteSelect(AutocompleteSelect):
    """Django's autocomplete select, which redraws a refused value by looking it up: a value
    that is no key of the related model (`notauuid`) raised there, a 500 in place of the form
    error. Such a value is not looked up (nothing is shown selected)."""

    def optgroups(self, name, value, attr=None):
        key = self.field.remote_field.model._meta.get_field(self.field.remote_field.field_name)

        def is_key(v) -> bool:
            try:
                key.to_python(v)
            except (ValidationError, ValueError, TypeError):
                return False
            return True

        return super().optgroups(name, [v for v in value if v in (None, "") or is_key(v)], attr)


class SafeAutocompleteMixin:
    """For a ModelAdmin or an inline: its `autocomplete_fields` use SafeAutocompleteSelect
    (`?user=notauuid` on an add page, or posted, was a 500)."""

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name in self.get_autocomplete_fields(request) and "widget" not in kwargs:
            kwargs["widget"] = SafeAutocompleteSelect(db_field, self.admin_site, using=kwargs.get("using"))
        return super().formfield_for_foreignkey(db_field, request, **kwargs)
