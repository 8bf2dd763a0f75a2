"""Errors users can catch, each naming where the bad data lives.

Every error derives from ``ValueError`` (docs/CONVENTIONS.md, "Errors") and carries the location
as attributes as well as in its message, so a caller can log, skip or re-raise with context:
``url`` (the shard), ``row_group``, ``row`` (index inside the row group), ``column`` and ``id``.
"""

from __future__ import annotations

__all__ = ["DataError", "DecodeError", "SampleError", "SchemaError", "ShardError"]


class DataError(ValueError):
    """Bad data at a known place: a shard, a row group, a row, a column."""

    def __init__(
        self,
        problem: str,
        *,
        url: str | None = None,
        row_group: int | None = None,
        row: int | None = None,
        column: str | None = None,
        id: str | None = None,
    ) -> None:
        self.problem = problem
        self.url = url
        self.row_group = row_group
        self.row = row
        self.column = column
        self.id = id
        super().__init__(f"{self.location()}: {problem}" if self.location() else problem)

    def location(self) -> str:
        """``url=... row_group=... row=... column=... id=...``, naming only what is known."""
        parts = [
            f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"
            for name, value in (
                ("url", self.url),
                ("row_group", self.row_group),
                ("row", self.row),
                ("column", self.column),
                ("id", self.id),
            )
            if value is not None
        ]
        return " ".join(parts)


class ShardError(DataError):
    """A shard that cannot be opened or a row group that cannot be read (corrupt, truncated)."""


class SchemaError(DataError):
    """A file whose schema is not a jin-data sample schema (or of an unsupported version)."""


class DecodeError(DataError):
    """One row whose image or audio does not decode, or whose numeric field has the wrong shape."""


class SampleError(ValueError):
    """A sample handed to the writer that does not fit the schema (names the sample and key)."""
