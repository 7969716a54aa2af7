"""Every live event has a test that checks its payload against its TypedDict (STYLE rule 6).

The registry is built from the code: each local app's `<app>.events` module lists its event
types in `EVENT_TYPES` and describes each one with a TypedDict whose `type` field is
`Literal["<event type>"]`. The checks are found in the test sources: a test checks an event
when it calls `assert_event_shape(payload, <that TypedDict>)` (tests/typecheck.py), naming
the class directly or through its module (`from offers.events import OfferCreatedEvent`,
`from escalation import events as ev` ... `ev.SupportTicketCreatedEvent`). Reading the
sources, rather than recording what ran, keeps this test independent of which tests run
and in what order.
"""
import importlib
import importlib.util
import typing
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

import pytest
from django.apps import apps
from django.conf import settings

import tests
from tests import typecheck
from tests.typecheck import assert_event_shape, event_typed_dicts, qualname, resolve, shape_checks_in

TESTS_ROOT = Path(tests.__file__).parent
# The apps that publish live events today; any other local app with an `events` module is
# picked up too (see local_event_modules).
EVENT_APPS = ("common", "audit", "availability", "dispatch", "zones", "offers", "escalation", "tracking", "analytics")


def local_event_modules():
    names = list(EVENT_APPS)
    for app in apps.get_app_configs():
        if Path(app.path).resolve().is_relative_to(Path(settings.BASE_DIR).resolve()) and app.name not in names:
            names.append(app.name)
    modules = []
    for name in names:
        if importlib.util.find_spec(name) is None or importlib.util.find_spec(f"{name}.events") is None:
            continue
        modules.append(importlib.import_module(f"{name}.events"))
    return modules


def registry():
    """{event type: (events module, TypedDict or None)} for every event type of every app."""
    found = {}
    for module in local_event_modules():
        typed = event_typed_dicts(module)
        for event_type in (*getattr(module, "EVENT_TYPES", ()), *typed):
            assert found.get(event_type, (module,))[0] is module, f"{event_type!r} is defined by two apps"
            found[event_type] = (module, typed.get(event_type))
    return found


def checked_classes() -> dict[type, list[str]]:
    """{TypedDict: [test files that check a payload against it]}."""
    checked = {}
    for dotted, files in shape_checks_in(TESTS_ROOT, exclude=(Path(__file__),)).items():
        obj = resolve(dotted)
        if isinstance(obj, type) and typing.is_typeddict(obj):
            checked.setdefault(obj, []).extend(files)
    return checked


def test_the_registry_finds_the_event_modules_and_their_event_types():
    modules = {m.__name__ for m in local_event_modules()}
    events = registry()

    assert {"availability.events", "dispatch.events", "offers.events", "escalation.events"} <= modules
    assert {"availability_changed", "delivery_created", "offer_created", "support_ticket_created"} <= set(events)


@pytest.mark.parametrize("module", local_event_modules(), ids=lambda m: m.__name__)
def test_event_types_and_typed_dicts_agree(module):
    listed = getattr(module, "EVENT_TYPES", None)
    typed = event_typed_dicts(module)

    assert isinstance(listed, tuple), f"{module.__name__} has no EVENT_TYPES tuple"
    assert len(set(listed)) == len(listed), f"{module.__name__}.EVENT_TYPES lists an event twice"
    assert set(listed) - set(typed) == set(), f"{module.__name__}: event types without a TypedDict"
    assert set(typed) - set(listed) == set(), f"{module.__name__}: TypedDicts missing from EVENT_TYPES"


def test_every_event_type_has_a_test_that_checks_its_payload_against_its_typed_dict():
    checked = checked_classes()

    unchecked = sorted(
        f"{event_type} ({qualname(typed_dict) if typed_dict else f'no TypedDict in {module.__name__}'})"
        for event_type, (module, typed_dict) in registry().items()
        if typed_dict is None or typed_dict not in checked
    )

    assert unchecked == [], (
        "No test checks these events' payloads; add `assert_event_shape(payload, <TypedDict>)` "
        f"where a test receives them: {unchecked}"
    )


# -------------------------------------------------------------- the checker of the checks


class _PingEvent(TypedDict):
    type: Literal["ping"]
    at: str
    note: NotRequired[str]


def test_the_scan_resolves_classes_named_directly_through_a_module_alias_or_a_dotted_module():
    source = (
        "from offers.events import OfferCreatedEvent\n"
        "from offers.events import OfferAcceptedEvent as Accepted\n"
        "from escalation import events as ev\n"
        "import zones.events\n"
        "import tracking.events as tracking_events\n"
        "def test_x(e):\n"
        "    assert_event_shape(e, OfferCreatedEvent)\n"
        "    assert_event_shape(e, Accepted)\n"
        "    assert_event_shape(e, ev.SupportTicketCreatedEvent)\n"
        "    typecheck.assert_event_shape(e, typed_dict=zones.events.ZoneHealthUpdatedEvent)\n"
        "    assert_event_shape(e, tracking_events.DeliveryEtaUpdatedEvent)\n"
        "    assert_shape_of_something_else(e, tracking_events.DeliveryLocationUpdatedEvent)\n"
    )

    found = typecheck.shape_checks_in_source(source)

    assert found == {
        "offers.events.OfferCreatedEvent", "offers.events.OfferAcceptedEvent",
        "escalation.events.SupportTicketCreatedEvent", "zones.events.ZoneHealthUpdatedEvent",
        "tracking.events.DeliveryEtaUpdatedEvent",
    }
    assert resolve("escalation.events.SupportTicketCreatedEvent") is importlib.import_module(
        "escalation.events"
    ).SupportTicketCreatedEvent
    assert resolve("escalation.events.NoSuchEvent") is None


def test_a_typed_dict_is_an_event_when_its_type_field_is_a_literal():
    class NotAnEvent(TypedDict):
        type: str

    assert typecheck.event_type_of(_PingEvent) == "ping"
    assert typecheck.event_type_of(NotAnEvent) is None


def test_assert_event_shape_records_the_typed_dicts_it_checked():
    typecheck.CHECKED.discard(_PingEvent)
    with pytest.raises(AssertionError):
        assert_event_shape({"type": "ping"}, _PingEvent)  # `at` is missing
    assert _PingEvent not in typecheck.CHECKED

    assert_event_shape({"type": "ping", "at": "2026-02-01T10:00:00Z"}, _PingEvent)

    assert _PingEvent in typecheck.CHECKED
