"""The configuration convention shared by every Jin package.

Configs are pydantic v2 models that reject unknown keys. Pydantic's own ``extra="forbid"`` names the
stray key but not the ones that were meant, so the check runs first and lists both: a typo such
as ``num_expert`` fails with ``unknown key 'num_expert' ... allowed keys: [...]`` and a hint,
``did you mean 'num_experts'?``.

A section given in part (``--set model.generation.diffusion.loss_weighting=min_snr`` on a config
without that section creates ``{"loss_weighting": "min_snr"}``) keeps what the field's own default
sets, ``DiffusionConfig(prediction="v")``'s prediction, instead of falling back to the class's.

Each package carries its own copy of this small base class on purpose: leaf packages never import
each other (see the repository's DESIGN.md), and a shared sixth package for twenty lines would cost
users another pin.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from jin_orchestrate.overrides import deep_merge

__all__ = ["StrictConfig"]


class StrictConfig(BaseModel):
    """Base of every config model: unknown keys are rejected with the allowed keys listed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        allowed = set(cls.model_fields)
        allowed |= {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = sorted(str(key) for key in data if key not in allowed)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                if close:
                    hints.append(f"did you mean {close[0]!r} for {key!r}?")
            raise ValueError(
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"for {cls.__name__}; allowed keys: {sorted(allowed)}"
                + (f"; {' '.join(hints)}" if hints else "")
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _keep_section_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if not isinstance(value, Mapping):
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel) and default.model_fields_set:
                set_by_default = default.model_dump(include=default.model_fields_set)
                out[name] = deep_merge(set_by_default, value)
        return out
