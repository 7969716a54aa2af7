"""Check a live event against its TypedDict (STYLE rule 6)."""
import typing


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.is_typeddict(hint):
        assert_event_shape(value, hint)
        return True
    if origin in (list, typing.List):
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def assert_event_shape(event: dict, typed_dict) -> None:
    hints = typing.get_type_hints(typed_dict)
    required = typed_dict.__required_keys__
    missing = required - set(event)
    extra = set(event) - set(hints)
    assert not missing, f"{typed_dict.__name__}: missing {missing} in {event}"
    assert not extra, f"{typed_dict.__name__}: unexpected {extra} in {event}"
    for key, value in event.items():
        hint = hints[key]
        if typing.get_origin(hint) in (typing.NotRequired, typing.Required):
            hint = typing.get_args(hint)[0]
        assert _matches(value, hint), f"{typed_dict.__name__}.{key}={value!r} is not {hint}"
