"""Runtime modality extension (§3.6): only the new modality trains; nothing that existed moves."""

from __future__ import annotations

import pytest
import torch

from jin_data import ShardDataset
from jin_orchestrate.checkpoint import CheckpointError, save_checkpoint
from jin_orchestrate.data import rename_columns
from jin_orchestrate.extend import build_extension_config, trainable_parameters
from jin_orchestrate.extension import model_from_checkpoint
from jin_orchestrate.generation import GenerationConfig
from jin_orchestrate.model import JinModel
from jin_orchestrate.train import StageTrainer

MODALITIES = ["text", "image", "audio", "points"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_url):
    """A jin-test model trained 3 steps (so its EMA target differs from it), as a checkpoint."""
    from jin_orchestrate.config import load_config

    torch.manual_seed(0)
    cfg = load_config("jin-test", overrides=["train.warmup_steps=0"])
    trainer = StageTrainer.create(cfg, cfg.stages[2], JinModel(cfg.model), seed=0)
    data = ShardDataset(
        corpus_url, batch_size=8, shuffle=False, split="train", modalities=MODALITIES
    )
    for _, batch in zip(range(3), data, strict=False):
        trainer.train_step(batch)
    path = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(
        path, trainer.core, config=cfg.model_dump(mode="json"), state={"global_step": 3}
    )
    return path, cfg


def _batches(url: str, cfg, split: str = "train"):
    data = ShardDataset(
        url,
        batch_size=8,
        shuffle=False,
        split=split,
        modalities=list(cfg.data.source_columns),
    )
    return [rename_columns(b, cfg.data.columns) for b in data]


def _extension(base):
    path, cfg = base
    ext = build_extension_config(
        cfg.model_dump(mode="json"),
        modality="seven_segment",
        input_dim=14,
        column="custom",
        steps=6,
        lr=5e-3,
        overrides=["train.warmup_steps=0"],
    )
    return path, ext


def test_extension_config_records_the_modality_its_column_and_one_frozen_stage(base):
    _, ext = _extension(base)
    assert list(ext.model.extra_modalities) == ["seven_segment"]
    assert ext.model.extra_modalities["seven_segment"].input_dim == 14
    assert ext.data.modalities == (*MODALITIES, "seven_segment")
    assert ext.data.columns == {"seven_segment": "custom"}
    assert ext.data.source_columns == (*MODALITIES, "custom")
    assert [s.trainable for s in ext.stages] == [("seven_segment",)]
    # Aligned with the text hub by default; the data still carries every modality.
    assert [s.align_with for s in ext.stages] == [("text",)]
    trainable, total = trainable_parameters(ext)
    # A linear encoder 14 -> D with bias, one embedding row, a D -> R projection.
    d = ext.model.dim
    assert trainable == 14 * d + d + d + d * d
    assert 0 < trainable < total / 50


def test_extension_trains_only_the_new_modality_and_keeps_the_rest_bitwise(base, corpus_url):
    path, ext = _extension(base)
    before, _ = model_from_checkpoint(path, base[1].model)
    before.eval()
    torch.manual_seed(1)
    model, state = model_from_checkpoint(path, ext.model)
    assert state["global_step"] == 3
    assert model.modalities == [*MODALITIES, "seven_segment"]
    trainer = StageTrainer.create(ext, ext.stages[0], model, seed=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "encoder.space.encoders.seven_segment.proj.weight",
        "encoder.space.encoders.seven_segment.proj.bias",
        "encoder.space.modality_embed.4",
        "encoder.space.projections.seven_segment.weight",
    }
    trained = [p for p in model.parameters() if p.requires_grad]
    new_before = [p.detach().clone() for p in trained]
    batches = _batches(corpus_url, ext)
    losses = []
    for step in range(ext.stages[0].steps):
        result = trainer.train_step(batches[step % len(batches)])
        assert not result.skipped
        losses.append(result.metrics["align"])
        aligned = {k for k in result.metrics if k.startswith("align/")}
        assert aligned == {"align/seven_segment-text"}
        assert "cross_modal/seven_segment_to_text" in result.metrics
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(new_before, trained, strict=True))

    # Every parameter and buffer that existed is unchanged, the EMA target included.
    old = before.state_dict()
    new = model.state_dict()
    for key, value in old.items():
        if key.endswith("modality_registry"):
            assert torch.equal(new[key][: len(value)], value)
        else:
            assert torch.equal(new[key], value), key
    # And so are the embeddings of every pre-existing modality, bit for bit.
    model.eval()
    with torch.no_grad():
        for batch in _batches(corpus_url, ext, split="test")[:2]:
            got, want = model.embed(batch), before.embed(batch)
            for name in MODALITIES:
                assert torch.equal(got[name], want[name]), name
            assert got["seven_segment"].shape == want["text"].shape


def test_extension_trains_on_batches_where_samples_lack_text(base, corpus_url):
    """A sample may lack text (jin-data's columns are nullable); a batch may have none at all."""
    path, ext = _extension(base)
    model, _ = model_from_checkpoint(path, ext.model)
    trainer = StageTrainer.create(ext, ext.stages[0], model, seed=0)
    batch = _batches(corpus_url, ext)[0]
    for absent in ([0, 3], list(range(8))):
        present = batch["text_present"].clone()
        present[absent] = False
        result = trainer.train_step({**batch, "text_present": present})
        assert not result.skipped
        assert ("cross_modal/seven_segment_to_text" in result.metrics) == (len(absent) < 8)


def test_an_extension_of_a_checkpoint_with_averaged_weights_keeps_the_served_embeddings(
    base, corpus_url, tmp_path
):
    """A base kept ``train.weight_ema``'s average, which `load_model` serves: the extension is
    built on those weights, so every pre-existing modality embeds as the base serves it."""
    from jin_orchestrate.evaluate import load_model

    path, ext = _extension(base)
    model, _ = model_from_checkpoint(path, base[1].model)
    torch.manual_seed(2)
    average = {n: p + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    average = {n: t for n, t in average.items() if not n.startswith("target.")}
    averaged = save_checkpoint(
        tmp_path / "averaged",
        model,
        config=base[1].model_dump(mode="json"),
        state={"global_step": 3},
        ema=average,
    )
    ext = ext.model_copy(update={"train": ext.train.model_copy(update={"weight_ema": 0.5})})
    extended, _ = model_from_checkpoint(averaged, ext.model)
    trainer = StageTrainer.create(ext, ext.stages[0], extended, seed=0)
    assert not trainer.train_step(_batches(corpus_url, ext)[0]).skipped
    saved = trainer.save(tmp_path / "extended", 0, 1)

    served, after = load_model(averaged), load_model(saved)
    with torch.no_grad():
        batch = _batches(corpus_url, ext, split="test")[0]
        want, got = served.embed(batch), after.embed(batch)
    for name in MODALITIES:
        assert torch.equal(got[name], want[name]), name
    # A generation fine-tune trains everything: it continues from the last step's weights.
    gen = base[1].model.model_copy(update={"generation": GenerationConfig()})
    tuned, _ = model_from_checkpoint(averaged, gen)
    key = "encoder.backbone.blocks.0.attn.qkv.weight"
    assert torch.equal(tuned.state_dict()[key], model.state_dict()[key])


def test_a_frozen_stage_refuses_a_model_not_frozen_for_it(base, batch):
    path, ext = _extension(base)
    model, _ = model_from_checkpoint(path, ext.model)
    with pytest.raises(ValueError, match="freeze_except"):
        model(batch, stage=ext.stages[0])


def test_extension_of_another_models_checkpoint_names_what_differs(base):
    path, ext = _extension(base)
    other = ext.model.model_copy(update={"ema_momentum": (0.5, 1.0)})
    with pytest.raises(CheckpointError, match="ema_momentum"):
        model_from_checkpoint(path, other)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "text"}, "already has it"),
        ({"modality": "Bad Name"}, "lower-case identifier"),
        ({"modality": "imu\n"}, "lower-case identifier"),  # MLflow refused it after Ray started
        ({"column": "image"}, "numeric column"),
        ({"align_with": ["smell"]}, "--align-with"),
    ],
)
def test_bad_extension_requests_name_the_flag(base, kwargs, message):
    _, cfg = base
    args = {
        "modality": "seven_segment",
        "input_dim": 14,
        "column": "custom",
        "steps": 5,
        "lr": 1e-3,
    }
    with pytest.raises(ValueError, match=message):
        build_extension_config(cfg.model_dump(mode="json"), **{**args, **kwargs})


def test_an_extended_model_is_extended_again_from_the_same_column(base, corpus_url):
    path, first = _extension(base)
    once, _ = model_from_checkpoint(path, first.model)
    args = {"input_dim": 14, "column": "custom", "steps": 1, "lr": 5e-3}
    second = build_extension_config(first.model_dump(mode="json"), modality="imu", **args)
    # The custom column now feeds imu; seven_segment keeps its weights but is no longer read.
    assert list(second.model.extra_modalities) == ["seven_segment", "imu"]
    assert second.data.modalities == (*MODALITIES, "imu")
    assert second.data.columns == {"imu": "custom"}
    twice, _ = model_from_checkpoint(
        save_checkpoint(
            path.parent / "once",
            once,
            config=first.model_dump(mode="json"),
            state={"global_step": 3},
        ),
        second.model,
    )
    assert twice.modalities == [*MODALITIES, "seven_segment", "imu"]
    result = StageTrainer.create(second, second.stages[0], twice, seed=0).train_step(
        _batches(corpus_url, second)[0]
    )
    assert "align/imu-text" in result.metrics
    with pytest.raises(ValueError, match=r"--align-with \['seven_segment'\].*'custom'"):
        build_extension_config(
            first.model_dump(mode="json"), modality="imu", align_with=["seven_segment"], **args
        )


def test_an_anchor_the_data_does_not_feed_is_refused_naming_the_stage(base):
    from jin_orchestrate.config import JinConfig

    _, ext = _extension(base)
    data = ext.model_dump(mode="json")
    data["data"]["modalities"] = ["text", "seven_segment"]
    data["stages"][0]["align_with"] = ["audio"]
    with pytest.raises(ValueError, match=r"stages\.extend_seven_segment\.align_with: \['audio'\]"):
        JinConfig.model_validate(data)
    data["stages"][0].update(trainable=[], align_with=["text"])
    with pytest.raises(ValueError, match="extension stage only"):
        JinConfig.model_validate(data)
