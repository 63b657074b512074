"""Reading a recipe key's value as a recipe file (TOML) or the command line (text) gives it: one of some words, or a
number in a range. Each error is one line that names the key, where the value came from, and what it takes."""
from __future__ import annotations

import math

from fastft.errors import UsageError


def number_or_word(key: str, value, source: str, low: float, high: float, words: tuple, meaning: str,
                   below_high: bool = False) -> float | str:
    """One of `words`, or a number from `low` to `high` (below it with `below_high`)."""
    if value in words:
        return value
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (low <= number < high if below_high else low <= number <= high):  # nan too
        raise UsageError(f"'{key}' in {source} must be {meaning}; got {value!r}")
    return number
