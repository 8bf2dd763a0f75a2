"""The serving config: which checkpoint, how requests are batched and bounded, how replicas scale.

The same model is the ``args`` of the application in a Serve config file (``serve run`` / ``serve
deploy``, see ``packages/jin-orchestrate/serve_config.yaml``) and what ``python -m
jin_orchestrate.serve`` builds from its flags. Unknown keys fail with their name and the allowed
keys, like every Jin config.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from jin_orchestrate._config import StrictConfig

__all__ = ["DeploymentConfig", "ServeConfig"]


class DeploymentConfig(StrictConfig):
    """Ray Serve options of one deployment (passed to ``Deployment.options``).

    ``autoscaling_config`` takes Ray Serve's keys (``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``, ...) and replaces ``num_replicas`` when given; Ray validates
    them when the application is built.
    """

    num_replicas: int = Field(1, gt=0)
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = Field(
        None, gt=0, description="requests one replica holds at once (default: derived)"
    )
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)

    def options(self, max_ongoing_requests: int, num_gpus: float = 0) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``; GPUs only where none were asked for."""
        actor = dict(self.ray_actor_options)
        if num_gpus and "num_gpus" not in actor:
            actor["num_gpus"] = num_gpus
        scale: dict[str, Any] = (
            {"autoscaling_config": self.autoscaling_config}
            if self.autoscaling_config is not None
            else {"num_replicas": self.num_replicas}
        )
        return {
            **scale,
            "max_ongoing_requests": self.max_ongoing_requests or max_ongoing_requests,
            "ray_actor_options": actor,
        }


class ServeConfig(StrictConfig):
    """Everything a serving application needs; ``checkpoint`` is the only required key."""

    checkpoint: str = Field(
        description="checkpoint directory, or an MLflow URI such as runs:/RUN_ID/final_checkpoint"
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="store of a runs:/ or models:/ checkpoint (default: $MLFLOW_TRACKING_URI, "
        "else ./mlflow.db where the replica runs)",
    )
    max_batch_size: int = Field(
        32, gt=0, description="requests merged into one forward pass by @serve.batch"
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="longest wait for a batch to fill after its first request"
    )
    max_items: int = Field(64, gt=0, description="items in one request (413 beyond)")
    max_batch_items: int | None = Field(
        None,
        gt=0,
        description="items in one forward pass: a batch holding more is embedded in consecutive "
        "passes of whole requests (default: no limit but max_batch_size x max_items)",
    )
    max_request_bytes: int = Field(16 * 2**20, gt=0, description="request body size (413 beyond)")
    max_image_pixels: int = Field(
        2048 * 2048, gt=0, description="H*W of one decoded image (413 beyond)"
    )
    max_audio_seconds: float = Field(
        60.0,
        gt=0,
        description="length of one clip, read from its header before decoding (413 beyond); "
        "its samples (frames x channels) may fill this many seconds of 8 channels at 48 kHz",
    )
    health_timeout_s: float = Field(
        2.0,
        gt=0,
        description="longest wait of /healthz for the model deployment to answer (503 beyond)",
    )
    use_gpu: bool | None = Field(
        None, description="one GPU per model replica (default: when the cluster has GPUs)"
    )
    model: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(ray_actor_options={"num_cpus": 1}),
        description="the model deployment (Embedder): batching, weights, GPU",
    )
    ingress: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(ray_actor_options={"num_cpus": 0.5}),
        description="the HTTP deployment (Ingress): validation and decoding, CPU only",
    )

    @model_validator(mode="after")
    def _check_concurrency(self) -> ServeConfig:
        if self.max_batch_items is not None and self.max_batch_items < self.max_items:
            raise ValueError(
                f"max_batch_items: {self.max_batch_items} is below max_items ({self.max_items}), "
                "so a full request could not fit in one forward pass"
            )
        # A replica that may hold fewer requests than a batch never fills one.
        limit = self.model.max_ongoing_requests
        if limit is not None and limit < self.max_batch_size:
            raise ValueError(
                f"model.max_ongoing_requests: {limit} is below max_batch_size "
                f"({self.max_batch_size}), so batches could never fill"
            )
        return self

    def model_options(self, num_gpus: float) -> dict[str, Any]:
        """``Deployment.options`` of the model deployment.

        By default a replica holds two batches (one computing, the next filling), and at least
        32 requests: Serve's router backs off before retrying a full replica, and a limit of 2 at
        ``max_batch_size=1`` cut ``benchmarks/serve.py``'s throughput ninefold (7.8 against 68.7
        requests/s with 64).
        """
        return self.model.options(max(2 * self.max_batch_size, 32), num_gpus)

    def ingress_options(self) -> dict[str, Any]:
        """``Deployment.options`` of the ingress: room to keep every model batch full."""
        return self.ingress.options(max(128, 4 * self.max_batch_size))
