"""Ray Serve embedding endpoints: config, HTTP API models, request decoding, the application.

``build_app`` (`jin_orchestrate.serving.app`) is what a Serve config file imports; ``python -m
jin_orchestrate.serve`` runs it locally. See the package README's "Serving" section.
"""

from jin_orchestrate.serving.config import DeploymentConfig, ServeConfig

__all__ = ["DeploymentConfig", "ServeConfig"]
