"""Number words and caption templates for NumberWorld's text modality."""

from __future__ import annotations

import numpy as np

__all__ = ["CAPTION_TEMPLATES", "caption", "number_words"]

_ONES = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen"),
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# Digits and words mixed on purpose: a text encoder must map "42" and "forty-two" together.
CAPTION_TEMPLATES = (
    "{words}",
    "{digits}",
    "the number {digits}",
    "the number {words}",
    "a handwritten {digits}",
    "someone wrote {words}",
    "this picture shows {words}",
    "I count {words} of them",
    "number {digits}, spelled {words}",
    "it is {digits}",
    "a noisy image of the number {words}",
    "{words}, written by hand",
)


def number_words(n: int) -> str:
    """English words for ``0 <= n <= 99``: 42 -> "forty-two"."""
    if not 0 <= n <= 99:
        raise ValueError(f"number: expected 0..99, received {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


def caption(n: int, rng: np.random.Generator) -> str:
    """One caption for ``n`` from a template drawn with ``rng``."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(digits=str(n), words=number_words(n))
