"""Check a live event against its TypedDict (STYLE rule 6), and know which events are checked.

`assert_event_shape(event, TypedDictClass)` checks one payload and records the class in
`CHECKED` (the classes checked so far in this run). `event_typed_dicts(module)` lists the event
TypedDicts of an `<app>.events` module, and `shape_checks_in(root)` finds, in the test sources,
every TypedDict class named in an `assert_event_shape(...)` call: tests/common/test_event_registry.py
uses both to fail when an event type has no test that checks its payload.
"""
import ast
import importlib
import typing
from pathlib import Path

# TypedDict classes a test has checked a payload against in this run (recorded at assert time).
CHECKED: set = set()


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
        _assert_shape(value, hint)
        return True
    if origin in (list, typing.List):
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _assert_shape(event: dict, typed_dict) -> None:
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


def assert_event_shape(event: dict, typed_dict) -> None:
    _assert_shape(event, typed_dict)
    CHECKED.add(typed_dict)


# ------------------------------------------------------------------------ the registry


def qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def event_type_of(typed_dict) -> str | None:
    """The event type a TypedDict describes: the value of its `type: Literal["..."]` field."""
    hint = typing.get_type_hints(typed_dict).get("type")
    if typing.get_origin(hint) in (typing.NotRequired, typing.Required):
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is not typing.Literal:
        return None
    (value,) = typing.get_args(hint)
    return value


def event_typed_dicts(module) -> dict[str, type]:
    """{event type: TypedDict} for the event TypedDicts defined in `module`."""
    found = {}
    for obj in vars(module).values():
        if isinstance(obj, type) and typing.is_typeddict(obj) and obj.__module__ == module.__name__:
            event_type = event_type_of(obj)
            if event_type is not None:
                assert event_type not in found, f"{module.__name__}: two TypedDicts for {event_type!r}"
                found[event_type] = obj
    return found


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted path, from every import in the file."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def shape_checks_in_source(source: str) -> set[str]:
    """Dotted paths of the classes named as the TypedDict in `assert_event_shape(...)` calls."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name != "assert_event_shape":
            continue
        args = list(node.args[1:2]) + [k.value for k in node.keywords if k.arg == "typed_dict"]
        for arg in args:
            dotted = _dotted(arg, aliases)
            if dotted:
                found.add(dotted)
    return found


def shape_checks_in(root: Path, *, exclude: tuple[Path, ...] = ()) -> dict[str, list[str]]:
    """{dotted TypedDict path: [files]} for every `assert_event_shape` call under `root`."""
    excluded = {Path(p).resolve() for p in (Path(__file__), *exclude)}
    checks: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        if path.resolve() in excluded:
            continue
        for dotted in shape_checks_in_source(path.read_text()):
            checks.setdefault(dotted, []).append(str(path.relative_to(root)))
    return checks


def resolve(dotted: str):
    """The object a dotted path names (`pkg.module.Class`), or None if nothing is there."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None
