"""Request and response models of the HTTP API (they also make its OpenAPI page, ``/docs``).

An item is ``{"modality": NAME, "data": ...}``: text as a string; images and audio as base64 of
their encoded files (PNG, JPEG, ... / WAV, FLAC, ...); points as a list of ``[x, y, z, ...]`` rows;
``custom`` and modalities added at run time as a flat list of numbers. ``data`` is parsed for its
JSON shape here; whether it fits the named modality is checked against the loaded model in
`jin_orchestrate.serving.items`, so each error names the item and the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, ValidationInfo

from jin_orchestrate.inference import ModelCard

__all__ = [
    "EmbedRequest",
    "EmbedResponse",
    "Embedding",
    "ErrorDetail",
    "ErrorResponse",
    "Health",
    "Item",
    "Limits",
    "ServiceCard",
    "SimilarityRequest",
    "SimilarityResponse",
    "TooManyItems",
    "set_max_items",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Strict numbers: pydantic's lax mode read "1.5" and true as 1.5 and 1.0; JSON integers stay
# numbers. A list stops at its first bad number: pydantic reports every one, under every member of
# ``Item.data``'s union, and a 15.7 MiB list of strings made 6.6 million errors (4.8 GiB).
_Numbers = Annotated[list[StrictFloat], Field(fail_fast=True)]
_Rows = Annotated[list[_Numbers], Field(fail_fast=True)]


class Item(_Strict):
    """One input: a modality name (``GET /v1/modalities`` lists them) and its data."""

    modality: str = Field(examples=["text", "image", "audio", "points", "custom"])
    data: str | _Numbers | _Rows = Field(
        description="text: a string; image/audio: base64 of the encoded file; points: "
        "[[x, y, z, ...], ...]; custom and runtime modalities: [f1, f2, ...]",
        examples=["the number 42"],
    )


class TooManyItems(Exception):
    """A list of items longer than the service's ``max_items``, found before its items validate.

    Not a ValueError, so pydantic lets it through at once instead of validating, and reporting,
    every item of a body of millions (16 MiB of ``{}`` items made 11 million errors and ran out of
    memory); the app answers 413.
    """

    def __init__(self, field: str, count: int, limit: int) -> None:
        super().__init__(field, count, limit)
        self.field, self.count, self.limit = field, count, limit


# The ingress's max_items, read while a request validates (one ingress per process, as the body
# limit BodyLimit reads from the app's state); None: no bound before validation.
_max_items: int | None = None


def set_max_items(limit: int | None) -> None:
    """Bound every list of items to ``limit`` before its items validate (the Ingress sets it)."""
    global _max_items
    _max_items = limit


def _bounded(items: Any, info: ValidationInfo) -> Any:
    if _max_items is not None and isinstance(items, list) and len(items) > _max_items:
        raise TooManyItems(str(info.field_name), len(items), _max_items)
    return items


# Each list alone is bounded here; a request's total (queries and candidates) is checked after.
_Items = Annotated[list[Item], BeforeValidator(_bounded), Field(min_length=1)]


class EmbedRequest(_Strict):
    """Items to embed, in any mix of modalities."""

    items: _Items


class Embedding(_Strict):
    """The L2-normalised embedding of ``items[index]``."""

    index: int
    modality: str
    embedding: list[float]


class EmbedResponse(_Strict):
    """One embedding per item, in request order."""

    model_version: str
    dim: int
    data: list[Embedding]


class SimilarityRequest(_Strict):
    """Two lists of items to compare, every query against every candidate."""

    queries: _Items
    candidates: _Items


class SimilarityResponse(_Strict):
    """``scores[i][j]``: cosine similarity of query i and candidate j (in [-1, 1])."""

    model_version: str
    scores: list[list[float]]


class Limits(_Strict):
    """What one request may hold."""

    max_items: int
    max_request_bytes: int
    max_image_pixels: int
    max_audio_seconds: float


class ServiceCard(_Strict):
    """The loaded model, its modalities and what they take, and the request limits."""

    model: ModelCard
    limits: Limits


class Health(_Strict):
    """The service is up and its model is loaded."""

    status: Literal["ok"]
    model_version: str


class ErrorDetail(_Strict):
    """Where (``["body", "items", 3, "data"]``) and what."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(_Strict):
    """Body of every 4xx answer."""

    detail: list[ErrorDetail]
