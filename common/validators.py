"""Value rules that a model's form (the admin) and the API's field both apply, written once."""
import math
import re
import unicodedata

from django.core.exceptions import ValidationError

NOT_POSITIVE = "Must be greater than 0."


def validate_positive(value) -> None:
    """Greater than 0 (a radius, a distance). None passes: the field's own null rule decides."""
    if value is not None and not value > 0:
        raise ValidationError(NOT_POSITIVE, code="not_positive")


# What the API refuses in any path or query value (common.middleware, 400): control characters
# (C0, DEL, C1; NUL first: PostgreSQL refuses it in text), lone surrogates, and U+FFFD, which a
# percent-escape that is not UTF-8 decodes to.
URL_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
# The same as a pattern of text a URL can carry, for the schema and regex fields (lone
# surrogates left out: JSON Schema tools cannot write them, and the JSON parser refuses them).
URL_TEXT_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f\ufffd]+$"
URL_UNSAFE_MESSAGE = "Must not contain control characters or U+FFFD: it is looked up by URL."
# What str.strip() (DRF's trim_whitespace) takes for whitespace, as a regex character class body
# (Python's and JSON Schema's alike): Python's isspace() set, which is not ECMA's \s (\x1c-\x1f
# and \x85 are Python's only; \ufeff is ECMA's only).
PY_WHITESPACE = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def trimmed_text_pattern(excluded: str, *, non_blank: bool) -> str:
    """The pattern of a text field DRF trims (leading and trailing whitespace dropped) and then
    refuses if what is left holds a character of `excluded` (a character class body), or is
    empty (`non_blank`). Without `non_blank` the pattern is of a non-empty text (drf-spectacular
    adds "" as a branch of its own: oneOf [pattern, maxLength 0])."""
    core = f"[^{excluded}]*[^{excluded}{PY_WHITESPACE}][^{excluded}]*"
    if non_blank:
        return f"^[{PY_WHITESPACE}]*{core}[{PY_WHITESPACE}]*$"
    return f"^(?:[{PY_WHITESPACE}]+|[{PY_WHITESPACE}]*{core}[{PY_WHITESPACE}]*)$"


# An identifier people read (a seller's order id, on the console, the support pages, the customer's
# page): URL-safe, not blank once trimmed, and none of the characters that make one id pass for
# another: controls, format characters (bidirectional-text controls: "ORD-\u202e9e06" shows as
# "ORD-60e9"; zero-width and invisible operators: "ORD-1\u200b" as "ORD-1"), line and paragraph
# separators, U+FFFD and the invisible fillers. The pattern lists those of the Basic Multilingual
# Plane (a JSON Schema pattern cannot name the others portably); `validate_order_id_chars` holds
# the other planes to the same rule.
_INVISIBLE_FILLERS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0\ufffd")
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _order_id_refuses(char: str) -> bool:
    return char in _INVISIBLE_FILLERS or unicodedata.category(char) in _REFUSED_CATEGORIES


def _class_body(refused, last: int = 0xFFFF) -> str:
    """A regex character class body (\\uXXXX ranges) of the code points up to `last` that
    `refused` names, surrogates left out (no JSON string holds one alone)."""
    ranges, start = [], None
    for code in range(last + 2):
        hit = code <= last and not 0xD800 <= code <= 0xDFFF and refused(chr(code))
        if hit and start is None:
            start = code
        elif not hit and start is not None:
            ranges.append(f"\\u{start:04x}" if code - 1 == start else f"\\u{start:04x}-\\u{code - 1:04x}")
            start = None
    return "".join(ranges)


ORDER_ID_PATTERN = trimmed_text_pattern(_class_body(_order_id_refuses), non_blank=True)


def validate_order_id_chars(value) -> None:
    """Those beyond the Basic Multilingual Plane (the pattern refuses the others, with the same
    message: both said it twice for one character)."""
    if value and any(c > "\uffff" and _order_id_refuses(c) for c in value):
        raise ValidationError(ORDER_ID_MESSAGE, code="invisible")


ORDER_ID_MESSAGE = ("Must not contain control characters, bidirectional-text controls, invisible characters or "
                    "U+FFFD: it is shown to people and looked up by URL.")


def validate_url_safe_text(value) -> None:
    """Text the API is later asked for by path or query (a seller's order id:
    `/v2/orders/{sellerOrderId}/…`, `?sellerOrderId=`): nothing such a URL could not carry."""
    if value and URL_UNSAFE_CHARS.search(value):
        raise ValidationError(URL_UNSAFE_MESSAGE, code="url_unsafe")


# GeoJSON's `crs` member, where a client sends one: only the names of WGS84 (lon, lat) pass.
WGS84_CRS_NAMES = frozenset({
    "EPSG:4326",
    "urn:ogc:def:crs:EPSG::4326",
    "urn:ogc:def:crs:EPSG:6.6:4326",
    "urn:ogc:def:crs:OGC:1.3:CRS84",
    "urn:ogc:def:crs:OGC::CRS84",
    "CRS84",
})


def validate_wgs84_crs(crs) -> None:
    """A GeoJSON `crs` member: absent, or a name of WGS84 (SRID 4326, lon/lat)."""
    if crs is None:
        return
    name = crs.get("properties", {}).get("name") if isinstance(crs, dict) else None
    if name not in WGS84_CRS_NAMES:
        raise ValidationError(f"Only WGS84 coordinates (SRID 4326, lon/lat) are accepted; got crs {name or crs!r}.")


def geometry_positions(geom):
    """Every position (x, y[, z]) of a GEOS geometry, however nested (GEOS's `extent` skips NaN
    in a polygon and raises on it in a point: no use for checking values)."""
    def walk(coords):
        if coords and not isinstance(coords[0], tuple):
            yield coords
            return
        for inner in coords:
            yield from walk(inner)

    coords = geom.coords
    yield from walk(coords if isinstance(coords, tuple) else tuple(coords))


def lonlat_in_range(geom) -> bool:
    """Every position a finite WGS84 lon/lat: lon -180..180, lat -90..90."""
    return all(
        math.isfinite(x) and math.isfinite(y) and -180 <= x <= 180 and -90 <= y <= 90
        for x, y, *_ in geometry_positions(geom)
    )
