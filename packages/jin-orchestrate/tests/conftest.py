"""Fixtures: a tiny NumberWorld corpus and batches from it, generated once per session."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def corpus_url(tmp_path_factory) -> str:
    """96 NumberWorld samples (seed 0) on local disk.

    ``JIN_TEST_CORPUS`` names that corpus already written (by ``scripts/gpu_prepare.sh``), for a
    machine without espeak-ng such as a lent GPU box.
    """
    from jin_data.numberworld import generate_numberworld

    given = os.environ.get("JIN_TEST_CORPUS")
    if given:
        if not os.path.exists(os.path.join(given, "manifest.json")):
            raise FileNotFoundError(f"JIN_TEST_CORPUS={given}: no manifest.json there")
        return given
    root = tmp_path_factory.mktemp("numberworld")
    url = str(root / "nw")
    generate_numberworld(url, 96, 0, progress=False, cache_dir=str(root))
    return url


@pytest.fixture(scope="session")
def batch(corpus_url) -> dict:
    """One batch of 8 training samples with every built-in modality but custom."""
    from jin_data import ShardDataset

    data = ShardDataset(
        corpus_url,
        batch_size=8,
        shuffle=False,
        split="train",
        modalities=["text", "image", "audio", "points"],
    )
    return next(iter(data))


@pytest.fixture
def test_config():
    from jin_orchestrate.config import load_config

    torch.manual_seed(0)
    return load_config("jin-test")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A jin-test checkpoint (seed 0) with a runtime modality ``seven_segment`` of 14 features."""
    from jin_encoders import CustomEncoderConfig, CustomModalityEncoder
    from jin_orchestrate.checkpoint import save_checkpoint
    from jin_orchestrate.config import load_config
    from jin_orchestrate.model import JinModel

    torch.manual_seed(0)
    cfg = load_config("jin-test")
    model = JinModel(cfg.model)
    model.add_modality(
        "seven_segment", CustomModalityEncoder(CustomEncoderConfig(dim=cfg.model.dim, input_dim=14))
    )
    cfg.model = model.cfg
    path = tmp_path_factory.mktemp("checkpoint") / "ckpt"
    return save_checkpoint(
        path, model, config=cfg.model_dump(mode="json"), state={"global_step": 0}
    )


@pytest.fixture(scope="session")
def ray_local():
    """A private Ray on loopback for the tests that need one, shut down after the session."""
    import ray

    from jin_orchestrate.cluster import init_ray

    init_ray(None, extra_cpus=2)
    yield
    ray.shutdown()
