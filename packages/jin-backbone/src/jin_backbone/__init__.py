"""jin-backbone: MoE with dropless dispatch, DiT blocks and diffusion.

``import jin_backbone`` never imports cupy; the CuPy kernels load on first use on a CUDA tensor.
"""

from jin_backbone._config import StrictConfig
from jin_backbone.backbone import Backbone, BackboneConfig, BackboneOutput
from jin_backbone.diffusion import (
    Denoiser,
    DiffusionConfig,
    GaussianDiffusion,
    LossWeighting,
    cosine_betas,
    linear_betas,
)
from jin_backbone.dit import DiTBlock, KVCache, TimestepEmbedder
from jin_backbone.experts import Experts, FeedForward, feed_forward
from jin_backbone.moe import MoE, MoEAux, MoEConfig, MoEOutput
from jin_backbone.params import ParameterCount, count_parameters
from jin_backbone.router import (
    Router,
    RouterOutput,
    RouterStats,
    load_balancing_loss,
    router_z_loss,
)
from jin_backbone.samplers import ddim_sample, ddim_timesteps, ddpm_sample, guided_prediction

__version__ = "0.5.4"

__all__ = [
    "Backbone",
    "BackboneConfig",
    "BackboneOutput",
    "Denoiser",
    "DiTBlock",
    "DiffusionConfig",
    "Experts",
    "FeedForward",
    "GaussianDiffusion",
    "KVCache",
    "LossWeighting",
    "MoE",
    "MoEAux",
    "MoEConfig",
    "MoEOutput",
    "ParameterCount",
    "Router",
    "RouterOutput",
    "RouterStats",
    "StrictConfig",
    "TimestepEmbedder",
    "__version__",
    "cosine_betas",
    "count_parameters",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "feed_forward",
    "guided_prediction",
    "linear_betas",
    "load_balancing_loss",
    "router_z_loss",
]
