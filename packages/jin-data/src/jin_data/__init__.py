"""jin-data: multimodal Parquet over fsspec, streaming loader, NumberWorld."""

from jin_data._config import StrictConfig

__version__ = "0.1.0"

__all__ = ["StrictConfig", "__version__"]
