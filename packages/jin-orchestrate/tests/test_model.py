"""JinModel on real NumberWorld batches: every objective, embeddings, EMA, extension."""

import pytest
import torch

from jin_orchestrate.model import JinModel


@pytest.fixture
def model(test_config):
    torch.manual_seed(0)
    return JinModel(test_config.model)


def test_each_stage_gives_finite_weighted_losses(model, test_config, batch):
    g = torch.Generator().manual_seed(0)
    terms = {}
    for stage in test_config.stages:
        out = model(batch, stage=stage, generator=g)
        assert torch.isfinite(out["loss"])
        expected = (
            stage.alpha * out["jepa"]
            + stage.beta * out["cross_modal"]
            + stage.gamma * out["align"]
            + stage.zjepa * out["zjepa"]
            + out["router_aux"]
        )
        torch.testing.assert_close(out["loss"], expected)
        terms[stage.name] = out
    assert terms["within_modality"]["cross_modal"] == 0
    assert terms["cross_modal"]["cross_modal"] > 0
    assert terms["multimodal"]["align"] > 0
    assert terms["multimodal"]["zjepa"] > 0
    assert {"jepa/text", "jepa/image", "jepa/audio", "jepa/points"} <= set(terms["multimodal"])
    assert int(terms["multimodal"]["tokens"]) > 0


def test_gradients_reach_online_parts_and_never_the_target(model, test_config, batch):
    out = model(batch, stage=test_config.stages[2], generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("target."):
            assert not p.requires_grad and p.grad is None, name
    for part in (
        "encoder.space.encoders.image",
        "encoder.space.encoders.audio",
        "predictor",
        "encoder.space.projections.text",
        "logit_scale",
        "zoom.roi_network",
    ):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part


def test_embed_is_normalised_and_independent_of_batch_companions(model, batch):
    model.eval()
    with torch.no_grad():
        full = model.embed(batch)
        half = model.embed({k: v[:4] for k, v in batch.items()})
    for name, emb in full.items():
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)))
        torch.testing.assert_close(half[name], emb[:4], atol=1e-5, rtol=1e-5)


def test_ema_update_moves_target_towards_online(model):
    online = dict(model.encoder.named_parameters())
    target = dict(model.target.module.named_parameters())
    name = "backbone.blocks.0.attn.qkv.weight"
    with torch.no_grad():
        online[name].add_(1.0)
    before = target[name].clone()
    m = model.update_target(step=0, total_steps=10)
    assert m == pytest.approx(0.996)
    torch.testing.assert_close(target[name], m * before + (1 - m) * online[name])


def test_batch_without_known_modality_is_rejected(model, test_config):
    with pytest.raises(ValueError, match="none of the model's modalities"):
        model({"label": torch.zeros(2)}, stage=test_config.stages[0])


def _without(batch, name, rows, fill=0):
    """``batch`` with ``name`` absent from ``rows``, its data there set to ``fill``."""
    present = batch[f"{name}_present"].clone()
    present[rows] = False
    out = {**batch, f"{name}_present": present}
    if name == "image":
        out["image"] = batch["image"].clone()
        out["image"][rows] = fill
    return out


def test_samples_without_a_modality_train_on_what_they_have(model, test_config, batch):
    # jin-data's columns are nullable: a sample may lack any modality. Such a batch used to fail
    # in the span masks (an absent sample has no token); z-JEPA took blank images for images.
    partial = _without(_without(batch, "image", [4, 5, 6, 7]), "text", [0, 3])
    no_image = _without(batch, "image", list(range(8)))
    # As jin-data collates a batch in which no row has an image: an empty column.
    empty = torch.zeros(8, 1, 0, 0, dtype=torch.uint8)
    no_image_column = {
        **no_image,
        "image": empty,
        "image_sizes": torch.zeros(8, 2, dtype=torch.long),
    }
    for b in (partial, no_image, no_image_column):
        for stage in test_config.stages:
            out = model(b, stage=stage, generator=torch.Generator().manual_seed(0))
            out["loss"].backward()
            assert torch.isfinite(out["loss"]), stage.name
            for name, p in model.named_parameters():
                assert p.grad is None or torch.isfinite(p.grad).all(), name
            model.zero_grad(set_to_none=True)
    assert "jepa/image" not in out and "cross_modal/text_to_image" not in out
    assert out["zjepa"] == 0 and "jepa/text" in out
    # The collapse watch reads the samples that have the modality: none here, so no spread.
    assert out["collapse/image_std"].isnan() and out["collapse/image_content_std"].isnan()
    assert torch.isfinite(out["collapse/text_std"]) and torch.isfinite(
        out["collapse/text_content_std"]
    )
    # In eval mode samples are independent: what an absent sample holds changes no loss term.
    model.eval()
    with torch.no_grad():
        zero, full = (
            model(
                _without(batch, "image", [4, 5, 6, 7], fill),
                stage=test_config.stages[2],
                generator=torch.Generator().manual_seed(0),
            )
            for fill in (0, 255)
        )
    assert zero["zjepa"] > 0
    for key in ("loss", "jepa/image", "zjepa", "zjepa/level0", "align"):
        assert torch.equal(zero[key], full[key]), key


def test_add_modality_keeps_existing_embeddings_and_extends_the_target(model, batch):
    from jin_encoders import CustomEncoderConfig, CustomModalityEncoder

    model.eval()
    with torch.no_grad():
        before = model.embed(batch)
    new_id = model.add_modality(
        "sensor", CustomModalityEncoder(CustomEncoderConfig(dim=32, input_dim=14))
    )
    assert new_id == len(model.modalities) - 1
    assert model.cfg.extra_modalities["sensor"].input_dim == 14
    assert model.target.module.space.modalities == model.space.modalities
    with torch.no_grad():
        after = model.embed({**batch, "sensor": torch.randn(8, 14)})
    for name, emb in before.items():
        assert torch.equal(after[name], emb), name
    assert after["sensor"].shape == (8, 32)
    model.update_target(step=1, total_steps=10)  # parameter names of online and target match


def test_zoom_crop_size_sets_the_token_budget_of_every_zoom_level(test_config, batch):
    """z-JEPA's levels are resampled to ``zoom_crop_size``: fewer tokens than the full image."""
    seen: dict[int, list[int]] = {}
    for side in (None, 48):
        cfg = test_config.model.model_copy(update={"zoom_crop_size": side})
        torch.manual_seed(0)
        model = JinModel(cfg)
        calls: list[tuple[int, int]] = []
        process = model.encoder.process

        def spy(tokens, padding_mask, process=process, calls=calls):
            calls.append(tuple(tokens.shape[:2]))
            return process(tokens, padding_mask)

        model.encoder.process = spy
        out = model(batch, stage=test_config.stages[2], generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out["zjepa"])
        levels = test_config.model.zjepa.num_z_levels
        seen[side or 0] = [t for b, t in calls if b == len(batch["label"]) * levels]
    patch = test_config.model.space.image.patch_size
    assert max(seen[0]) == (64 // patch) ** 2  # NumberWorld's 64-pixel canvas, whole
    assert max(seen[48]) == (48 // patch) ** 2


class _Stop(Exception):
    pass


def test_forward_and_embed_move_a_host_batch_to_the_models_device(
    model, test_config, batch, monkeypatch
):
    # Ray Train leaves jin-data batches (they hold lists of str) on the host, whatever device the
    # model is on. The meta device stands in for a GPU: host tensors reaching a meta model fail
    # as they would reaching a GPU one. What reaches the encoders is recorded, then stopped.
    model.to("meta")
    seen = []

    def record(received):
        seen.append(received)
        raise _Stop

    monkeypatch.setattr(model.space, "encode_batch", record)
    with pytest.raises(_Stop):
        model(batch, stage=test_config.stages[0], generator=torch.Generator().manual_seed(0))
    with pytest.raises(_Stop):
        model.embed(batch)
    assert len(seen) == 2
    for received in seen:
        tensors = {k: v.device for k, v in received.items() if isinstance(v, torch.Tensor)}
        assert {"image", "audio", "points", "text_bytes"} <= set(tensors)
        assert set(tensors.values()) == {torch.device("meta")}
        assert received["id"] == batch["id"]  # lists pass through
    assert batch["image"].device == torch.device("cpu")  # the caller's batch is not changed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_trains_and_embeds_from_a_host_batch(model, test_config, batch):
    model.to("cuda")
    out = model(batch, stage=test_config.stages[2], generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].device.type == "cuda"
    emb = model.embed(batch)
    assert {e.device.type for e in emb.values()} == {"cuda"}


def test_a_non_finite_padded_token_stays_out_of_the_pooled_mean_and_the_error():
    from jin_orchestrate.model import _masked_mean, _per_sample_mse

    g = torch.Generator().manual_seed(0)
    x, pred, target = (torch.randn(2, 4, 3, generator=g) for _ in range(3))
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    # No padding is the plain mean over tokens.
    full = _per_sample_mse(pred, target, torch.zeros_like(pad))
    torch.testing.assert_close(_per_sample_mse(pred, target, None), full, rtol=0, atol=0)
    clean = (_masked_mean(x, pad), _per_sample_mse(pred, target, pad))
    x[0, 3], target[0, 2] = float("nan"), float("inf")
    pred = pred.clone().requires_grad_()
    pred.data[0, 3] = float("nan")
    torch.testing.assert_close(_masked_mean(x, pad), clean[0], rtol=0, atol=0)
    err = _per_sample_mse(pred, target, pad)
    torch.testing.assert_close(err, clean[1], rtol=0, atol=0)
    err.sum().backward()
    assert torch.isfinite(pred.grad).all() and not pred.grad[0, 2:].any()
