"""Text someone else wrote, put into the console's sentences and labels (common.bidi)."""
import pytest

from common.bidi import bidi_isolated

FSI, PDI = "\u2068", "\u2069"


@pytest.mark.parametrize("text,shown", [
    ("Ravi Kumar", "Ravi Kumar"),  # as it is: most names
    ("Zoë Ōtsuka 山田", "Zoë Ōtsuka 山田"),
    ("Ravi \u202eevil", FSI + "Ravi evil" + PDI),  # an override: dropped, and isolated
    ("Ravi\u200f", FSI + "Ravi" + PDI),  # a right-to-left mark: a strong direction of its own
    ("Ravi \u2069\u202eevil", FSI + "Ravi evil" + PDI),  # its own PDI cannot close the isolate
    ("محمد علي", FSI + "محمد علي" + PDI),  # right-to-left letters: isolated, kept
    ("שלום", FSI + "שלום" + PDI),
    (42, "42"),
], ids=["latin", "other scripts", "override", "rlm", "own pdi", "arabic", "hebrew", "not text"])
def test_text_is_isolated_only_when_it_could_reorder_its_surroundings(text, shown):
    assert bidi_isolated(text) == shown
