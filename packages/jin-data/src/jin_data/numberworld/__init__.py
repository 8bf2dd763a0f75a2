"""NumberWorld: a small multimodal corpus of the numbers 0..99 built from real sources.

``python -m jin_data.numberworld --out URL --samples N --seed S`` or `generate_numberworld`.
"""

from jin_data.numberworld.corpus import (
    DEFAULT_HELD_OUT,
    NumberWorldConfig,
    generate_numberworld,
    numberworld_samples,
)
from jin_data.numberworld.speech import DEFAULT_VOICES, EspeakNotFoundError, SpeechCache, Voice
from jin_data.numberworld.text import number_words

__all__ = [
    "DEFAULT_HELD_OUT",
    "DEFAULT_VOICES",
    "EspeakNotFoundError",
    "NumberWorldConfig",
    "SpeechCache",
    "Voice",
    "generate_numberworld",
    "number_words",
    "numberworld_samples",
]
