"""jin-encoders: encoders, front-ends, the joint embedding space and output heads."""

from jin_encoders._config import StrictConfig

__version__ = "0.1.0"

__all__ = ["StrictConfig", "__version__"]
