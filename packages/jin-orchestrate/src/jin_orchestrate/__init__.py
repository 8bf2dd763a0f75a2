"""jin-orchestrate: JinModel, Ray Train pretraining, MLflow, evaluation, Ray Serve."""

from jin_orchestrate._config import StrictConfig

__version__ = "0.23.2"

__all__ = ["StrictConfig", "__version__"]
