"""jin-zjepa: hierarchical zooming JEPA: masks, EMA targets, predictors, losses."""

from jin_zjepa._config import StrictConfig

__version__ = "0.1.0"

__all__ = ["StrictConfig", "__version__"]
