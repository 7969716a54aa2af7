"""JSON request bodies, read once and refused when hostile (SPEC "Wire conventions": bad input
never produces a 500).

`load_json_body` is the one reading: UTF-8 (or the declared charset), strict JSON (no NaN or
Infinity), at most `MAX_DEPTH` levels of nesting, no NUL and no lone
surrogate in any string or key (PostgreSQL cannot store the one, UTF-8 cannot encode the
other). `common.middleware.RequestGuardMiddleware` applies it to every API request with a JSON
body, before any view, so endpoints that read no body refuse a broken one too, and leaves the
result on the request; DRF's parser (`JSONParser`, the REST_FRAMEWORK default) hands that
result to the view instead of parsing again.
"""
from __future__ import annotations

import codecs
import json
import re
from functools import lru_cache
from itertools import accumulate

from django.conf import settings
from rest_framework import exceptions, parsers

from common.exceptions import NON_FIELD_ERRORS

MAX_DEPTH = 32
PARSED_ATTR = "_api_json_body"
# json.loads recurses once per level of nesting. A body that could nest deeper than this is
# refused before it is parsed: deep in the recursion a garbage collection runs other objects'
# finalizers on a nearly full stack, where they fail ("Exception ignored in ...",
# RecursionError) and leave what they should have closed.
PARSE_DEPTH = 100
# A string, or one never closed: to the end of the text (json stops there; and a match that
# needed the closing quote would be retried from every later quote, quadratic in the body).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class BodyRejected(Exception):
    """The body is not acceptable JSON: `message` and, for bad strings, field `details`."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details


# Codecs Python knows as text encodings that fail on some input with a bare UnicodeError
# rather than UnicodeDecodeError (even with errors="replace", as Django's form parsers decode)
_FAILING_TEXT_CODECS = frozenset({"undefined", "punycode", "idna"})


@lru_cache(maxsize=64)
def unusable_charset(charset: str) -> bool:
    """Whether a request declaring this charset cannot be read as text: a codec that is not a
    text encoding (base64, zlib, rot13: LookupError when decoding) or one of
    _FAILING_TEXT_CODECS. A name Python does not know is not unusable: Django ignores it and
    reads the body as UTF-8."""
    try:
        info = codecs.lookup(charset)
    except (LookupError, ValueError):  # (ValueError: a name with a NUL)
        return False
    return not getattr(info, "_is_text_encoding", True) or info.name in _FAILING_TEXT_CODECS


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def load_json_body(raw: bytes, charset: str | None = None):
    """The parsed body, or BodyRejected."""
    try:
        text = raw.decode(charset or settings.DEFAULT_CHARSET)
    except (UnicodeError, LookupError) as exc:  # (UnicodeError: a codec such as punycode on bytes it cannot take)
        raise BodyRejected(f"JSON parse error - {exc}") from exc
    if _may_nest_deeper(text, PARSE_DEPTH):
        raise BodyRejected(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:  # not reached past the scan above; a 400 all the same
        raise BodyRejected(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.") from None
    except ValueError as exc:
        raise BodyRejected(f"JSON parse error - {exc}") from exc
    check_json_value(data)
    return data


def _may_nest_deeper(text: str, limit: int) -> bool:
    """Whether `text`, parsed, could nest deeper than `limit` levels: the deepest point of its
    brackets outside strings (a running count, in C iterators). A body with no more openers
    than the limit is not scanned."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0) > limit


_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_string(value: str) -> str | None:
    if "\x00" in value:
        return "Null characters are not allowed."
    if _SURROGATE.search(value):
        return "Surrogate characters are not allowed."
    return None


def check_json_value(data) -> None:
    """Depth, NUL and lone surrogates, walked without recursion. Errors name the top-level
    field the bad value sits in (as DRF's field errors do), or `nonFieldErrors` (common.exceptions.NON_FIELD_ERRORS)."""
    stack = [(data, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, str):
            problem = _bad_string(value)
            if problem:
                raise BodyRejected(
                    f"Validation failed: {field + ': ' if field else ''}{problem}",
                    {_safe(field) if field else NON_FIELD_ERRORS: [problem]},
                )
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise BodyRejected(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.")
        if isinstance(value, dict):
            for key, item in value.items():
                problem = _bad_string(key)
                if problem:
                    raise BodyRejected(f"Validation failed: a key: {problem}", {NON_FIELD_ERRORS: [f"A key: {problem}"]})
                stack.append((item, depth + 1, field if depth > 1 else key))
        else:
            stack.extend((item, depth + 1, field) for item in value)


def _safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser with the rules above; the body the guard middleware has already read
    and checked is not parsed twice."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        request = parser_context.get("request")
        django_request = getattr(request, "_request", None)
        if django_request is not None and hasattr(django_request, PARSED_ATTR):
            return getattr(django_request, PARSED_ATTR)
        raw = stream.read() if stream is not None else b""
        try:
            return load_json_body(raw, parser_context.get("encoding"))
        except BodyRejected as exc:
            if exc.details is not None:
                raise exceptions.ValidationError(exc.details) from exc
            raise exceptions.ParseError(exc.message) from exc
