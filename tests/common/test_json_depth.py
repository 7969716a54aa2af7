"""common.parsers: a body that could nest deeper than PARSE_DEPTH is refused before json.loads
recurses into it; everything else parses as before (strings may hold any brackets)."""
import json

import pytest

from common import parsers
from common.parsers import MAX_DEPTH, PARSE_DEPTH, BodyRejected, load_json_body


@pytest.fixture
def recursion_seen(monkeypatch):
    seen = []
    real = json.loads

    def loads(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except RecursionError:
            seen.append(True)
            raise

    monkeypatch.setattr(parsers.json, "loads", loads)
    return seen


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b"[" * 100_000,  # never closed
    b"[" * (PARSE_DEPTH + 1) + b"]" * (PARSE_DEPTH + 1),
    b"[" * 5000 + b"}" * 5000,  # closed by the wrong bracket
])
def test_a_deep_body_is_refused_before_json_recurses_into_it(body, recursion_seen, monkeypatch):
    parsed = []
    monkeypatch.setattr(parsers, "check_json_value", parsed.append)
    with pytest.raises(BodyRejected, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_json_body(body)
    assert not recursion_seen and not parsed


def test_bodies_up_to_the_parse_depth_and_brackets_in_strings_still_parse(recursion_seen, monkeypatch):
    monkeypatch.setattr(parsers, "check_json_value", lambda data: None)  # MAX_DEPTH is its job
    deep = b"[" * PARSE_DEPTH + b"]" * PARSE_DEPTH
    assert load_json_body(deep) is not None
    ring = [[[77.5 + i / 1e4, 12.9] for i in range(2000)]]  # a polygon: 4,002 brackets, 3 levels
    assert load_json_body(json.dumps({"boundary": {"type": "Polygon", "coordinates": ring}}).encode())
    text = {"note": "[[[{{{" * 1000 + '\\"]]]', "k": ["[" * 500]}
    assert load_json_body(json.dumps(text).encode()) == text
    assert not recursion_seen


def test_a_malformed_shallow_body_keeps_the_parsers_own_message():
    with pytest.raises(BodyRejected, match="Expecting"):
        load_json_body(b"[" + b"[1]," * 200 + b"]")


def test_a_string_never_closed_ends_the_scan_where_json_stops_reading():
    # the brackets after an unclosed quote are never parsed: json's own message, not "too deep"
    with pytest.raises(BodyRejected, match="Unterminated string"):
        load_json_body(b'[[["' + b"[" * 5000)
    # an unclosed string of escaped quotes after too many openers: refused for the openers (and
    # in one pass: a pattern that needed the closing quote retried from every later quote)
    with pytest.raises(BodyRejected, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_json_body(b"[" * (PARSE_DEPTH + 1) + b'"' + b'\\"' * 20_000)
