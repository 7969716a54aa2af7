"""Zone boundaries: parse GeoJSON polygons and refuse anything PostGIS should not store.

One validator for every way a boundary comes in (API, admin form, services), so a broken
polygon is a clear 400 or form error, never a 500 and never a stored row.
"""
from __future__ import annotations

import math

from django.contrib.gis.geos import GEOSException, GEOSGeometry, LinearRing, Polygon
from django.core.exceptions import ValidationError

from common.validators import lonlat_in_range, validate_wgs84_crs

SRID = 4326
MAX_POSITIONS = 10_000

GEOJSON_HINT = 'a GeoJSON Polygon, e.g. {"type": "Polygon", "coordinates": [[[lon, lat], [lon, lat], [lon, lat], [lon, lat]]]}'


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ring(positions, n: int) -> LinearRing:
    label = "The outer ring" if n == 0 else f"Hole {n}"
    if not isinstance(positions, list):
        raise ValidationError(f"{label} must be a list of [lon, lat] positions.")
    if len(positions) < 4:
        raise ValidationError(f"{label} needs at least 4 positions (a closed triangle), got {len(positions)}.")
    coords = []
    for i, pos in enumerate(positions, start=1):
        if not (isinstance(pos, list) and len(pos) in (2, 3) and all(_is_number(v) for v in pos)):
            raise ValidationError(f"{label}, position {i} must be [lon, lat] with finite numbers.")
        lon, lat = pos[0], pos[1]
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise ValidationError(
                f"{label}, position {i} ({lon}, {lat}) is outside lon -180..180 / lat -90..90: "
                f"coordinates must be WGS84 (SRID {SRID})."
            )
        coords.append((float(lon), float(lat)))
    if coords[0] != coords[-1]:
        raise ValidationError(f"{label} is not closed: its first and last positions must be equal.")
    return LinearRing(coords)


def polygon_from_geojson(data) -> Polygon:
    """A GeoJSON Polygon geometry object → a GEOS Polygon (SRID 4326), checked for validity."""
    if not isinstance(data, dict) or "type" not in data:
        raise ValidationError(f"Must be {GEOJSON_HINT}.")
    kind = data.get("type")
    if kind != "Polygon":
        raise ValidationError(f"Must be a Polygon, not {kind!s:.40}.")
    validate_wgs84_crs(data.get("crs"))
    rings = data.get("coordinates")
    if not isinstance(rings, list):
        raise ValidationError(f"Must be {GEOJSON_HINT}.")
    if not rings:
        raise ValidationError("The polygon is empty.")
    if sum(len(r) for r in rings if isinstance(r, list)) > MAX_POSITIONS:
        raise ValidationError(f"Too many positions (at most {MAX_POSITIONS}).")
    polygon = Polygon(*[_ring(r, n) for n, r in enumerate(rings)], srid=SRID)
    return validate_zone_polygon(polygon)


def validate_zone_polygon(geometry) -> Polygon:
    """Refuse what is not a valid, non-empty WGS84 polygon; returns the polygon.

    A geometry without an SRID is taken to be WGS84. Raises django's ValidationError.
    """
    if isinstance(geometry, str):
        try:
            geometry = GEOSGeometry(geometry)
        except (GEOSException, ValueError, TypeError) as exc:
            raise ValidationError("Not a readable geometry.") from exc
    if not isinstance(geometry, GEOSGeometry):
        raise ValidationError(f"Must be {GEOJSON_HINT}.")
    if geometry.geom_type != "Polygon":
        raise ValidationError(f"Must be a Polygon, not a {geometry.geom_type}.")
    if geometry.srid is None:
        geometry = geometry.clone()
        geometry.srid = SRID
    elif geometry.srid != SRID:
        raise ValidationError(f"Must be in WGS84 (SRID {SRID}), not SRID {geometry.srid}.")
    if geometry.empty:
        raise ValidationError("The polygon is empty.")
    if geometry.num_coords > MAX_POSITIONS:
        raise ValidationError(f"Too many positions (at most {MAX_POSITIONS}).")
    if not lonlat_in_range(geometry):
        raise ValidationError(f"Coordinates must be WGS84 lon/lat (SRID {SRID}): lon -180..180, lat -90..90.")
    if geometry.hasz:
        raise ValidationError("Must be flat: [lon, lat] positions, without a height (Z).")
    if not geometry.valid:
        raise ValidationError(f"The polygon is not valid: {_reason(geometry.valid_reason)}.")
    _check_edges(geometry)
    return geometry


def _check_edges(polygon: Polygon) -> None:
    """Zones are drawn flat (lon/lat) and measured on the globe (`::geography`): an edge that
    spans 180° of longitude or more runs the other way round the globe there (exactly 180°
    makes PostGIS raise on every zone query, so one such zone broke every order's intake)."""
    for ring in polygon:
        coords = ring.coords
        for (lon_a, lat_a), (lon_b, lat_b) in zip(coords, coords[1:]):
            if abs(lon_b - lon_a) >= 180:
                raise ValidationError(
                    f"The edge from ({lon_a}, {lat_a}) to ({lon_b}, {lat_b}) spans 180° of longitude or "
                    "more, so on the globe it would run the other way round: add points along it."
                )


def _reason(reason: str) -> str:
    """GEOS says 'Self-intersection[77.6 12.9]'; say it like a person."""
    name, _, where = reason.partition("[")
    where = where.rstrip("]").split()
    if len(where) == 2:
        return f"{name.strip().lower()} at lon {where[0]}, lat {where[1]}"
    return reason.lower()
