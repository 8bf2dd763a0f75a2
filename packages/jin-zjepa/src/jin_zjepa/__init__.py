"""jin-zjepa: hierarchical zooming JEPA: masks, EMA targets, predictors, zoom, losses."""

from jin_zjepa._config import StrictConfig
from jin_zjepa.config import TABLE5_ABLATIONS, ZJEPAConfig
from jin_zjepa.cross_scale import CrossScalePredictor, map_to_frame, sincos_pos_2d, token_centers
from jin_zjepa.diagnostics import collapse_metrics, content_std, effective_rank, embedding_std
from jin_zjepa.ema import EMAConfig, EMATarget, unwrap_module
from jin_zjepa.losses import (
    LogitScale,
    LossWeights,
    cross_modal_jepa_loss,
    info_nce,
    jepa_loss,
    masked_mse,
    total_loss,
    zjepa_loss,
)
from jin_zjepa.masks import (
    BlockMasks,
    MultiBlockMaskConfig,
    MultiBlockMaskGenerator,
    SpanMaskConfig,
    SpanMaskGenerator,
    SpanMasks,
    compact_indices,
    gather_tokens,
)
from jin_zjepa.predictor import Predictor, PredictorConfig
from jin_zjepa.zoom import (
    AdaptiveZoom,
    ZoomOutput,
    crop_and_resize,
    fuse_levels,
    random_roi_centers,
    zoom_boxes,
    zoom_pyramid,
)

__version__ = "0.3.6"

__all__ = [
    "TABLE5_ABLATIONS",
    "AdaptiveZoom",
    "BlockMasks",
    "CrossScalePredictor",
    "EMAConfig",
    "EMATarget",
    "LogitScale",
    "LossWeights",
    "MultiBlockMaskConfig",
    "MultiBlockMaskGenerator",
    "Predictor",
    "PredictorConfig",
    "SpanMaskConfig",
    "SpanMaskGenerator",
    "SpanMasks",
    "StrictConfig",
    "ZJEPAConfig",
    "ZoomOutput",
    "__version__",
    "collapse_metrics",
    "compact_indices",
    "content_std",
    "crop_and_resize",
    "cross_modal_jepa_loss",
    "effective_rank",
    "embedding_std",
    "fuse_levels",
    "gather_tokens",
    "info_nce",
    "jepa_loss",
    "map_to_frame",
    "masked_mse",
    "random_roi_centers",
    "sincos_pos_2d",
    "token_centers",
    "total_loss",
    "unwrap_module",
    "zjepa_loss",
    "zoom_boxes",
    "zoom_pyramid",
]
