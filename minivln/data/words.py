"""Content words of an instruction or an object name, for the training-free word-overlap rules.

``content_words("Go to the bedroom and pick up the pillows")`` is ``{"bedroom", "pick", "pillow"}``:
lower-cased letters only, navigation filler words dropped (:data:`STOP_WORDS`), plurals crudely
singularised.  Used by the navigation probe's word-overlap baselines
(:mod:`minivln.features.probe`) and by the REVERIE name-overlap object picker
(:func:`minivln.data.reverie.name_overlap_pick`).
"""

from __future__ import annotations

import re

STOP_WORDS = frozenset(
    "a an the and or of to in on at by for with from into onto up down out off over under past "
    "through toward towards between left right straight forward ahead back around turn walk go "
    "stop wait continue take make head enter exit until when then you your it its is are be this "
    "that there here near next end side room way".split()
)


def stem(word: str) -> str:
    """``pillows`` -> ``pillow``, ``shelves`` stays, ``libraries`` -> ``library``, ``glass`` stays."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def content_words(text: str) -> set[str]:
    """Content words of a text, lower-cased and crudely singularised (``#`` in REVERIE's object
    names such as ``picture#frame`` separates words)."""
    return {stem(w) for w in re.findall(r"[a-z]+", text.lower().replace("#", " ")) if w not in STOP_WORDS}
