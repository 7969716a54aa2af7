"""`common.broadcast._distinct`: a transaction's batch drops an event identical to the last
one it sent to the same groups, and only that."""
from common.broadcast import _distinct


def test_a_repeat_of_the_last_event_to_the_same_groups_goes_once_but_a_state_that_returns_is_kept():
    a, b = {"type": "t", "state": "A"}, {"type": "t", "state": "B"}
    assert _distinct([(["g"], a), (["g"], dict(a))]) == [(["g"], a)]
    assert _distinct([(["g"], a), (["g"], b), (["g"], dict(a))]) == [(["g"], a), (["g"], b), (["g"], a)]
    assert _distinct([(["g"], a), (["h"], a), (["g", "h"], a)]) == [(["g"], a), (["h"], a), (["g", "h"], a)]
