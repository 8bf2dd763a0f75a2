"""``ZJEPAConfig`` (paper §3.5) and the five rows of Table 5 as named configs.

The paper's listing is a dataclass with a mutable list default (``zoom_factors: List[float] =
[1.0, ...]``), which raises at class creation; here it is an immutable tuple on a validated
pydantic model.

Flag semantics (Eq. 4): ``predict_fine_from_coarse`` switches on the g_i terms (level i predicts
level i+1), ``predict_coarse_from_fine`` the h_{i+1} terms (level i+1 predicts level i).
``bidirectional_prediction`` is the paper's name for having both; it is kept, and must agree with
the two directional flags, so a config cannot say "bidirectional" while one direction is off.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from pydantic import Field, model_validator

from jin_zjepa._config import StrictConfig

__all__ = ["TABLE5_ABLATIONS", "ZJEPAConfig"]


class ZJEPAConfig(StrictConfig):
    """Hierarchical zooming JEPA: zoom levels, cross-scale prediction terms, adaptive zoom."""

    num_z_levels: int = Field(4, ge=1)
    zoom_factors: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    predict_fine_from_coarse: bool = True
    predict_coarse_from_fine: bool = True
    bidirectional_prediction: bool = True
    adaptive_zoom: bool = True
    roi_max_scale_change: float = Field(
        1.5,
        ge=1.0,
        allow_inf_nan=False,
        description="adaptive zoom may scale every crop (levels >= 1) by a factor in "
        "[1/r, r] around zoom_factors; 1.0 predicts the centre only",
    )

    @model_validator(mode="after")
    def _check(self) -> ZJEPAConfig:
        factors = self.zoom_factors
        if len(factors) != self.num_z_levels:
            raise ValueError(
                f"zoom_factors needs one factor per level: num_z_levels={self.num_z_levels}, "
                f"got {len(factors)} factors {factors}"
            )
        if factors[0] != 1.0:
            raise ValueError(
                f"zoom_factors[0] must be 1.0 (level 0 is the whole image); got {factors}"
            )
        if any(not 0.0 < f <= 1.0 for f in factors):
            raise ValueError(f"every zoom factor must lie in (0, 1]; got zoom_factors={factors}")
        if any(b >= a for a, b in itertools.pairwise(factors)):
            raise ValueError(f"zoom_factors must be strictly decreasing; got {factors}")
        both = self.predict_fine_from_coarse and self.predict_coarse_from_fine
        if self.bidirectional_prediction != both:
            raise ValueError(
                f"bidirectional_prediction={self.bidirectional_prediction} disagrees with "
                f"predict_fine_from_coarse={self.predict_fine_from_coarse} and "
                f"predict_coarse_from_fine={self.predict_coarse_from_fine}: it must be True "
                "exactly when both directions are on"
            )
        if self.num_z_levels == 1 and (self.cross_scale or self.adaptive_zoom):
            raise ValueError(
                "num_z_levels=1 has no second level: predict_fine_from_coarse, "
                "predict_coarse_from_fine and adaptive_zoom must be False"
            )
        return self

    @property
    def cross_scale(self) -> bool:
        """Whether any term of Eq. 4 is on."""
        return self.predict_fine_from_coarse or self.predict_coarse_from_fine


def single_scale() -> ZJEPAConfig:
    """Table 5 row 1: plain JEPA (Eq. 1) on the whole image."""
    return ZJEPAConfig(
        num_z_levels=1,
        zoom_factors=(1.0,),
        predict_fine_from_coarse=False,
        predict_coarse_from_fine=False,
        bidirectional_prediction=False,
        adaptive_zoom=False,
    )


def hierarchical_levels() -> ZJEPAConfig:
    """Row 2: Eq. 1 on every zoom level (crops around a random centre), no cross-scale terms."""
    return ZJEPAConfig(
        predict_fine_from_coarse=False,
        predict_coarse_from_fine=False,
        bidirectional_prediction=False,
        adaptive_zoom=False,
    )


def cross_scale_prediction() -> ZJEPAConfig:
    """Row 3: + the g_i terms of Eq. 4 (fine predicted from coarse)."""
    return ZJEPAConfig(
        predict_coarse_from_fine=False, bidirectional_prediction=False, adaptive_zoom=False
    )


def adaptive_zoom() -> ZJEPAConfig:
    """Row 4: + crops placed by the learned ROI network instead of at random."""
    return ZJEPAConfig(predict_coarse_from_fine=False, bidirectional_prediction=False)


def bidirectional_feedback() -> ZJEPAConfig:
    """Row 5, the full z-JEPA: + the h_{i+1} terms (coarse predicted from fine)."""
    return ZJEPAConfig()


# Factories, not instances, so a caller can never mutate a shared row (STYLE.md: presets).
TABLE5_ABLATIONS: dict[str, Callable[[], ZJEPAConfig]] = {
    "single_scale": single_scale,
    "hierarchical_levels": hierarchical_levels,
    "cross_scale_prediction": cross_scale_prediction,
    "adaptive_zoom": adaptive_zoom,
    "bidirectional_feedback": bidirectional_feedback,
}
