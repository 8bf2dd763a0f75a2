"""jin-backbone: MoE with dropless dispatch, DiT blocks and diffusion."""

from jin_backbone._config import StrictConfig

__version__ = "0.1.0"

__all__ = ["StrictConfig", "__version__"]
