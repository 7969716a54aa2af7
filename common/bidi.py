"""Text someone else wrote (a driver's name, a store's, a reason) inside a sentence or a label
of the console and the support pages, kept from reordering the words around it."""
from __future__ import annotations

import re
import unicodedata

# Bidirectional-text controls: embeddings, overrides and isolates, and the marks (LRM, RLM, ALM)
# with a strong direction of their own. Invisible, but one in a name reorders the text after it:
# a driver named "Ravi \u202eevil" turned the timeline's "The offer to Ravi … expired unanswered"
# into "…evil derewsnanu deripxe" (a page audit).
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_RIGHT_TO_LEFT = frozenset({"R", "AL"})


def bidi_isolated(text) -> str:
    """`text` for a sentence or a label: one holding bidirectional-text controls loses them, and
    one holding them or right-to-left letters (a name in Arabic or Hebrew, which drew the
    "· 1.2 km" after it to its other side) is isolated (FSI … PDI), so nothing in it reorders
    the words around it. Any other text is returned as it is."""
    text = str(text)
    stripped = _BIDI_CONTROLS.sub("", text)
    if stripped == text and not any(unicodedata.bidirectional(c) in _RIGHT_TO_LEFT for c in text if ord(c) >= 0x0590):
        return text
    return "\u2068" + stripped + "\u2069"


def bidi_controls_escaped(text: str) -> str:
    """`text` with each bidirectional-text control written as its \\u escape: for a block shown
    as it is (a JSON payload on a console page), where isolating a value is not possible and
    one RLO in a store name read the rest of the block backwards ("estimatedEarning": 104.7
    as 7.401: an audit). The evidence keeps the control, visibly."""
    return _BIDI_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", str(text))
