"""``json_text``: what the experiment tables are written with is strict JSON (no bare ``NaN``)."""

from __future__ import annotations

import json
import math

import pytest

from minivln.paths import json_text


def _strict_loads(text: str):
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_undefined_numbers_become_null_and_the_rest_is_kept():
    table = {"rows": [{"sr": 0.197, "sr_se_over_seeds": math.nan, "n": 1}],
             "comparisons": [{"se": float("inf"), "gaps": (0.1, -math.inf, 2)}], "note": "NaN stays a string"}
    text = json_text(table)
    assert text.endswith("}\n")
    assert _strict_loads(text) == {"rows": [{"sr": 0.197, "sr_se_over_seeds": None, "n": 1}],
                                   "comparisons": [{"se": None, "gaps": [0.1, None, 2]}],
                                   "note": "NaN stays a string"}
    with pytest.raises(ValueError, match="not JSON"):  # what json.dumps alone would have written
        _strict_loads(json.dumps(table))
