"""Cross-modal generation: DDIM and caption determinism, CFG dropout, Griffin-Lim, the CLI, the
generation stage and the Table 4 metrics, on the jin-test config."""

from __future__ import annotations

import itertools
import math
import wave

import pytest
import torch

from jin_orchestrate.config import JinConfig, preset
from jin_orchestrate.generation import (
    caption_logits,
    decode_captions,
    generation_losses,
    images_from_tokens,
    prefix_lm_mask,
    sample_tokens,
)
from jin_orchestrate.griffin_lim import (
    griffin_lim,
    log_mel_ceiling,
    mel_to_waveform,
    spectral_convergence,
)
from jin_orchestrate.model import JinModel

GENERATION = {"diffusion": {"num_timesteps": 100, "prediction": "v"}}


def _config(**generation) -> JinConfig:
    data = preset("jin-test")
    data["model"]["generation"] = {**GENERATION, **generation}
    data["data"]["modalities"] = ["text", "image", "audio"]
    data["stages"] = [{"name": "generation", "steps": 4, "alpha": 0.0, "generation": 1.0}]
    return JinConfig.model_validate(data)


def _wake_adaln(model: JinModel) -> JinModel:
    """A fresh model's adaLN-Zero layers (and the conv heads' last layers) are zero, so the
    condition cannot matter yet: give them small weights, as training would, for tests that need
    the condition to act."""
    with torch.no_grad():
        for block in model.encoder.backbone.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.05)
        for target in ("image", "audio"):
            head = model.generation.conv_head(target) if model.generation is not None else None
            if head is not None:
                head.out.weight.normal_(std=0.05)
    return model


@pytest.fixture
def gen_model() -> JinModel:
    torch.manual_seed(0)
    return JinModel(_config().model).eval()


@pytest.fixture(scope="module")
def gen_checkpoint(tmp_path_factory):
    from jin_orchestrate.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = _config()
    path = tmp_path_factory.mktemp("generation") / "ckpt"
    return save_checkpoint(
        path, JinModel(cfg.model), config=cfg.model_dump(mode="json"), state={"global_step": 0}
    )


# -- sampling ------------------------------------------------------------------------------


def test_ddim_image_is_deterministic_for_a_seed(gen_model):
    condition = {"text": ["the number 42", "seven"]}
    a = gen_model.generate("image", condition, steps=4, guidance=2.0, seed=3)
    b = gen_model.generate("image", condition, steps=4, guidance=2.0, seed=3)
    c = gen_model.generate("image", condition, steps=4, guidance=2.0, seed=4)
    assert a.dtype == torch.uint8 and a.shape == (2, 1, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_audio_generation_is_a_seeded_waveform(gen_model, batch):
    condition = {"image": batch["image"][:2]}
    a = gen_model.generate("audio", condition, steps=3, seed=1, griffin_lim_iterations=4)
    b = gen_model.generate("audio", condition, steps=3, seed=1, griffin_lim_iterations=4)
    assert a.shape == (2, 128 * 160) and torch.equal(a, b)
    assert float(a.abs().max()) <= 1.0


def test_the_conv_audio_head_denoises_log_mel_frames(batch):
    """audio_head="conv": a 1-D PixelDiffusionHead over the frames replaces the linear embedder
    and the RegressionHead; a step trains all of it; audio stays a seeded waveform."""
    from jin_orchestrate.generation import _signal, _tokens_of_signal, denoise

    torch.manual_seed(0)
    cfg = _config(audio_head="conv", audio_head_channels=[16], text_from=[], image_from=[])
    model = _wake_adaln(JinModel(cfg.model)).train()
    heads = model.generation
    assert heads.audio_head is not None and heads.audio_head.spatial_dims == 1
    assert "audio" not in heads.x_embedder and heads.image_head is None
    x_BTP = torch.randn(2, 64, 160)
    frames = _signal(model, "audio", x_BTP)
    assert frames.shape == (2, 80, 128)  # (B, mel bins, frames)
    assert torch.equal(frames[:, :, 3], x_BTP[:, 1, 80:])  # token 1 holds frames 2 and 3
    assert torch.equal(_tokens_of_signal(model, "audio", frames), x_BTP)
    prediction, _ = denoise(model, "audio", x_BTP, torch.tensor([5, 50]), heads.null(2))
    assert prediction.shape == x_BTP.shape
    out = generation_losses(model, batch, cfg.stages[0], torch.Generator().manual_seed(0))
    out["loss"].backward()
    untrained = [n for n, p in heads.audio_head.named_parameters() if p.grad is None]
    assert untrained == []
    model.eval()
    a = model.generate("audio", {"image": batch["image"][:2]}, steps=2, griffin_lim_iterations=2)
    b = model.generate("audio", {"image": batch["image"][:2]}, steps=2, griffin_lim_iterations=2)
    assert a.shape == (2, 128 * 160) and torch.equal(a, b)


def test_generate_rejects_a_condition_it_was_not_trained_on(gen_model, batch):
    with pytest.raises(ValueError, match="image is generated from"):
        gen_model.generate("image", {"image": batch["image"][:1]}, steps=2)
    with pytest.raises(ValueError, match="exactly one modality"):
        gen_model.generate("image", {"text": ["a"], "audio": batch["audio"][:1]}, steps=2)


def test_guidance_changes_the_sample(gen_model):
    condition = {"text": ["the number 3"]}
    _wake_adaln(gen_model)
    plain = gen_model.generate("image", condition, steps=3, guidance=1.0, seed=0)
    guided = gen_model.generate("image", condition, steps=3, guidance=4.0, seed=0)
    assert not torch.equal(plain, guided)


# -- classifier-free guidance dropout --------------------------------------------------------


def test_condition_dropout_substitutes_the_learned_null(gen_model):
    heads = gen_model.generation
    z = torch.nn.functional.normalize(torch.randn(4, gen_model.space.retrieval_dim), dim=-1)
    drop = torch.tensor([True, False, True, False])
    cond = heads.condition(z, drop)
    assert torch.equal(cond[0], heads.null_cond.detach()) and torch.equal(cond[2], cond[0])
    assert torch.allclose(cond[1], heads.cond_embedder(z[1:2])[0])


@pytest.mark.parametrize(("dropout", "trained"), [(0.0, False), (0.99, True)])
def test_null_condition_is_trained_only_through_dropout(batch, dropout, trained):
    torch.manual_seed(0)
    cfg = _config(cond_dropout=dropout, text_from=[])
    model = _wake_adaln(JinModel(cfg.model)).train()
    out = generation_losses(model, batch, cfg.stages[0], torch.Generator().manual_seed(0))
    out["loss"].backward()
    grad = model.generation.null_cond.grad
    assert (grad is not None and bool(grad.abs().sum() > 0)) is trained


def test_images_are_conditioned_on_the_joint_embedding(gen_model):
    """generate() draws from the condition of the text's retrieval embedding (model.embed)."""
    _wake_adaln(gen_model)
    condition = {"text": ["the number 42", "seven"]}
    images = gen_model.generate("image", condition, steps=3, guidance=2.0, seed=5)
    with torch.no_grad():
        cond = gen_model.generation.condition(gen_model.embed(condition)["text"])
        tokens = sample_tokens(
            gen_model,
            "image",
            cond,
            num_samples=2,
            steps=3,
            guidance=2.0,
            generator=torch.Generator().manual_seed(5),
        )
    assert torch.equal(images, images_from_tokens(gen_model, tokens))


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_stage_aligns_the_generation_modalities(batch, weight):
    """align_weight > 0 adds Eq. 6 between the generation modalities: the text projection
    learns from it, where the zero-initialised adaLN-Zero would give it no gradient yet."""
    torch.manual_seed(0)
    cfg = _config(align_weight=weight, text_from=[], audio_from=[], image_from=["text"])
    model = JinModel(cfg.model).train()
    out = generation_losses(model, batch, cfg.stages[0], torch.Generator().manual_seed(0))
    assert ("align/image-text" in out) is (weight > 0)
    out["loss"].backward()
    grad = model.space.projections["text"].weight.grad
    assert (grad is not None and bool(grad.abs().sum() > 0)) is (weight > 0)


# -- captions ------------------------------------------------------------------------------


def _image_prefix(model, batch):
    enc = model.space.encode_batch({"image": batch["image"][:3]})["image"]
    return enc.tokens, torch.zeros(enc.tokens.shape[:2], dtype=torch.bool)


def test_kv_cache_decoding_gives_the_logits_of_full_passes(gen_model, batch):
    from jin_backbone import KVCache
    from jin_encoders import ByteTokenizer
    from jin_orchestrate.generation import _next_byte_logits

    tokens, padding = _image_prefix(gen_model, batch)
    padding[1, -5:] = True  # a shorter condition in the batch: its padded keys stay unseen
    torch.manual_seed(0)
    ids = torch.randint(ByteTokenizer.NUM_SPECIAL, 200, (3, 7))
    ids[:, 0] = ByteTokenizer.BOS
    caches = [KVCache() for _ in gen_model.encoder.backbone.blocks]
    with torch.no_grad():
        for length in range(1, 8):
            cached = _next_byte_logits(gen_model, tokens, padding, ids[:, :length], caches)
            full = _next_byte_logits(gen_model, tokens, padding, ids[:, :length], None)
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    assert caches[0].length == tokens.shape[1] + 7
    assert decode_captions(gen_model, tokens, padding, max_bytes=6) == decode_captions(
        gen_model, tokens, padding, max_bytes=6, kv_cache=False
    )


def test_greedy_and_seeded_sampled_decoding_are_deterministic(gen_model, batch):
    tokens, padding = _image_prefix(gen_model, batch)
    greedy = decode_captions(gen_model, tokens, padding, max_bytes=6)
    assert greedy == decode_captions(gen_model, tokens, padding, max_bytes=6)
    assert len(greedy) == 3 and all(len(t) <= 6 for t in greedy)  # 6 bytes, some U+FFFD

    def sampled(seed: int, **kw) -> list[str]:
        g = torch.Generator().manual_seed(seed)
        return decode_captions(gen_model, tokens, padding, max_bytes=6, generator=g, **kw)

    assert sampled(1, temperature=1.0) == sampled(1, temperature=1.0)
    assert sampled(1, temperature=1.0) != sampled(2, temperature=1.0)
    assert sampled(5, temperature=1.0, top_k=1) == greedy


def test_caption_logits_are_causal_over_the_caption(gen_model, batch):
    tokens, padding = _image_prefix(gen_model, batch)
    ids = torch.randint(4, 200, (3, 6), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 4:] = 7
    a, _ = caption_logits(gen_model, tokens, padding, ids)
    b, _ = caption_logits(gen_model, tokens, padding, changed)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_prefix_lm_mask():
    padding = torch.tensor([[False, True, False, False]])
    mask = prefix_lm_mask(padding, prefix=2)[0, 0]
    expected = torch.tensor(
        [
            [True, False, False, False],
            [True, False, False, False],
            [True, False, True, False],
            [True, False, True, True],
        ]
    )
    assert torch.equal(mask, expected)


# -- training ------------------------------------------------------------------------------


def test_generation_stage_lowers_its_loss(batch):
    from jin_orchestrate.train import StageTrainer

    torch.manual_seed(0)
    cfg = _config()
    model = JinModel(cfg.model)
    trainer = StageTrainer.create(cfg, cfg.stages[0], model, seed=0)
    trainer.generator = torch.Generator().manual_seed(0)
    first = trainer.train_step(batch).metrics
    for _ in range(6):
        last = trainer.train_step(batch).metrics
    assert last["generation/text"] < first["generation/text"]
    assert {"generation/image", "generation/audio", "router_aux"} <= set(last)


def test_generation_heads_are_added_to_a_checkpoint_without_them(checkpoint):
    from jin_orchestrate.checkpoint import read_config
    from jin_orchestrate.extension import model_from_checkpoint
    from jin_orchestrate.generate import build_generation_config

    cfg = build_generation_config(read_config(checkpoint), steps=5, lr=1e-3)
    model, _ = model_from_checkpoint(checkpoint, cfg.model)
    assert model.generation is not None and model.cfg.generation == cfg.model.generation
    assert cfg.stages[0].generation == 1.0 and cfg.stages[0].alpha == 0.0
    assert cfg.model.generation.diffusion.prediction == "v"
    # overriding one diffusion field creates a partial section: it keeps v-prediction
    weighted = build_generation_config(
        read_config(checkpoint),
        steps=5,
        lr=1e-3,
        overrides=["model.generation.diffusion.loss_weighting=min_snr"],
    ).model.generation.diffusion
    assert (weighted.prediction, weighted.loss_weighting) == ("v", "min_snr")
    assert _config(diffusion={"prediction": "eps"}).model.generation.diffusion.prediction == "eps"


def test_generate_train_on_an_extended_checkpoint_keeps_the_runtime_modality_column(corpus_url):
    """The column `extend` recorded stays in the generation job's config (its checkpoint's: the
    model card, embed's custom_as and evaluate read it), and the job's batches still train."""
    from jin_data import ShardDataset
    from jin_orchestrate.config import load_config
    from jin_orchestrate.data import rename_columns
    from jin_orchestrate.extend import build_extension_config
    from jin_orchestrate.generate import build_generation_config

    ext = build_extension_config(
        load_config("jin-test").model_dump(mode="json"),
        modality="seven_segment",
        input_dim=14,
        column="custom",
        steps=2,
        lr=5e-3,
    )
    cfg = build_generation_config(ext.model_dump(mode="json"), steps=2, lr=1e-3)
    assert cfg.data.columns == {"seven_segment": "custom"}
    assert cfg.data.modalities == ("text", "image", "audio", "seven_segment")
    data = ShardDataset(
        corpus_url, batch_size=4, shuffle=False, split="train", modalities=cfg.data.source_columns
    )
    batch = rename_columns(next(iter(data)), cfg.data.columns)
    assert batch["seven_segment"].shape == (4, 14)
    torch.manual_seed(0)
    model = JinModel(cfg.model)
    losses = generation_losses(model, batch, cfg.stages[0], torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["loss"])


def test_repeats_draw_each_target_at_several_timesteps(batch, monkeypatch):
    import jin_orchestrate.generation as generation

    seen = []
    denoise = generation.denoise

    def spy(model, target, x_t, t_B, cond_BD):
        seen.append((target, x_t, t_B, cond_BD))
        return denoise(model, target, x_t, t_B, cond_BD)

    monkeypatch.setattr(generation, "denoise", spy)
    torch.manual_seed(0)
    cfg = _config(image_repeats=3, audio_repeats=2, text_from=[])
    model = JinModel(cfg.model)
    losses = generation_losses(model, batch, cfg.stages[0], torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["loss"])
    rows = len(batch["label"])
    assert sorted(t for t, *_ in seen) == ["audio", "image"]
    for target, x_t, t_B, cond_BD in seen:
        repeats = {"image": 3, "audio": 2}[target]
        assert x_t.shape[0] == t_B.shape[0] == cond_BD.shape[0] == repeats * rows
        cond = cond_BD.view(rows, repeats, -1)
        assert torch.equal(cond, cond[:, :1].expand_as(cond))  # one condition per sample
        assert len(set(t_B.tolist())) > rows  # independent timesteps within a sample's rows


def test_a_target_weighted_zero_is_not_computed(batch, monkeypatch):
    import jin_orchestrate.generation as generation

    denoised, captioned = [], []
    denoise, caption = generation.denoise, generation._caption_loss
    monkeypatch.setattr(
        generation,
        "denoise",
        lambda model, target, *a: denoised.append(target) or denoise(model, target, *a),
    )
    monkeypatch.setattr(generation, "_caption_loss", lambda *a: captioned.append(1) or caption(*a))
    torch.manual_seed(0)
    cfg = _config(audio_weight=0.0, text_weight=0.0)
    model = JinModel(cfg.model)
    losses = generation_losses(model, batch, cfg.stages[0], torch.Generator().manual_seed(0))
    assert denoised == ["image"] and not captioned
    assert "generation/image" in losses and "generation/audio" not in losses
    assert "generation/text" not in losses and torch.isfinite(losses["loss"])
    with pytest.raises(ValueError, match="every generated target has loss weight 0"):
        _config(image_weight=0.0, audio_weight=0.0, text_weight=0.0)


def _without(batch: dict, target: str) -> dict:
    """``batch`` as jin-data collates it when no row has ``target``."""
    rows = len(batch["label"])
    absent = {f"{target}_present": torch.zeros(rows, dtype=torch.bool)}
    if target == "image":
        absent["image"] = torch.zeros(rows, batch["image"].shape[1], 0, 0, dtype=torch.uint8)
        absent["image_sizes"] = torch.zeros(rows, 2, dtype=torch.long)
    if target == "audio":
        absent.update(audio=torch.zeros(rows, 0), audio_lengths=torch.zeros(rows, dtype=torch.long))
    return {**batch, **absent}


@pytest.mark.parametrize("target", ["text", "image", "audio"])
def test_a_batch_without_one_target_still_trains_the_others(batch, target):
    """jin-data's columns are nullable, so a batch may have no caption, image or audio at all:
    that target's loss is 0, not NaN (which skips the step and, batches in a row, stops the job)
    or an error on its empty canvas."""
    torch.manual_seed(0)
    cfg = _config()
    model = JinModel(cfg.model)
    losses = generation_losses(
        model, _without(batch, target), cfg.stages[0], torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(losses["loss"])
    for name in ("text", "image", "audio"):
        assert (float(losses[f"generation/{name}"]) == 0.0) == (name == target), name
    losses["loss"].backward()


def test_image_targets_are_each_images_own_pixels_in_a_batch_of_several_sizes(batch):
    """jin-data pads a smaller image at the bottom and right (``image_sizes``): its target is the
    image resized, not the image and the padding."""
    import torch.nn.functional as F

    from jin_orchestrate.generation import image_tokens

    torch.manual_seed(0)
    model = JinModel(_config().model)
    small = F.interpolate(batch["image"][1:2].float(), size=(48, 48), mode="area")
    small = small.round().to(torch.uint8)
    padded = batch["image"].clone()
    padded[1] = 0
    padded[1, :, :48, :48] = small[0]
    sizes = batch["image_sizes"].clone()
    sizes[1] = torch.tensor([48, 48])
    tokens = image_tokens(model, padded, sizes)
    assert torch.equal(tokens[1], image_tokens(model, small)[0])
    assert torch.equal(
        tokens[[0, *range(2, 8)]], image_tokens(model, batch["image"])[[0, *range(2, 8)]]
    )


def test_a_generation_checkpoint_continues_with_other_loss_weights(gen_checkpoint):
    from jin_orchestrate.checkpoint import CheckpointError
    from jin_orchestrate.extension import model_from_checkpoint

    tuned = _config(image_weight=2.0, image_repeats=2, cond_dropout=0.2)
    model, _ = model_from_checkpoint(gen_checkpoint, tuned.model)
    assert model.cfg.generation == tuned.model.generation
    with pytest.raises(CheckpointError, match="differs from this job's in \\['generation'\\]"):
        model_from_checkpoint(gen_checkpoint, _config(image_size=16).model)


def test_generation_configs_are_validated():
    data = _config().model_dump()
    data["stages"][0]["alpha"] = 1.0
    with pytest.raises(ValueError, match="trains that objective alone"):
        JinConfig.model_validate(data)
    # GenerationHeads' rules are the config's, so `generate train` refuses them before Ray starts.
    with pytest.raises(ValueError, match="image_size: expected a multiple of the patch size 16"):
        _config(image_size=40)
    with pytest.raises(ValueError, match="image_head_channels: expected 4 positive widths"):
        _config(image_head_channels=[32])
    with pytest.raises(ValueError, match="image_head_channels: expected 4 positive widths"):
        _config(image_head_channels=[8, 8, 8, 0])
    data = _config().model_dump()
    data["model"]["space"]["image"].update(patch_size=12, stem="patch", stem_channels=None)
    data["model"]["generation"]["image_size"] = 36
    conv = r"image_head=conv: space.image.patch_size: expected a power of two >= 2, got {}"
    with pytest.raises(ValueError, match=conv.format(12)):
        JinConfig.model_validate(data)
    data["model"]["generation"]["image_head"] = "patch"
    assert JinModel(JinConfig.model_validate(data).model).generation.token_shapes["image"][0] == 9
    # the conv head's own rules (PixelDiffusionHead.stage_widths): patch 1 is no power of two >= 2
    data["model"]["space"]["image"]["patch_size"] = 1
    data["model"]["generation"].update(image_head="conv", image_size=8)
    with pytest.raises(ValueError, match=conv.format(1)):
        JinConfig.model_validate(data)
    data["model"]["generation"]["image_head"] = "patch"
    assert JinModel(JinConfig.model_validate(data).model).generation.token_shapes["image"][0] == 64
    with pytest.raises(ValueError, match="cannot condition itself"):
        _config(text_from=["text"])
    with pytest.raises(ValueError, match="audio_head_channels: expected one positive width"):
        _config(audio_head_channels=[8, 16])
    data = preset("jin-test")
    data["stages"] = [{"name": "g", "steps": 1, "alpha": 0.0, "generation": 1.0}]
    with pytest.raises(ValueError, match="no generation heads"):
        JinConfig.model_validate(data)


def test_generate_train_fine_tunes_at_2e_3_unless_told():
    """The default of `generate train --lr` is the rate that met the generation targets (0.16.4);
    ``--lr`` still sets it."""
    from jin_orchestrate.generate import _train_parser, build_generation_config

    def stage_lr(*argv: str) -> float:
        args = _train_parser().parse_args(["--checkpoint", "ckpt", *argv])
        cfg = build_generation_config(preset("jin-test"), steps=args.steps, lr=args.lr)
        return cfg.stages[0].lr

    assert stage_lr() == 2e-3
    assert stage_lr("--lr", "5e-4") == 5e-4


# -- Griffin-Lim ---------------------------------------------------------------------------


def _chirp(seconds: float = 0.5, rate: int = 16000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return (
        0.5 * torch.sin(2 * torch.pi * 440 * t) + 0.3 * torch.sin(2 * torch.pi * 900 * t * (1 + t))
    )[None]


def test_log_mel_ceiling_bounds_a_full_scale_signal_and_tames_strays():
    """No [-1, 1] waveform's log-mel passes the ceiling (~1.76); a log-mel far above it (a
    diffusion sample strays to +17 at guidance 5) still inverts to a finite waveform: unclamped,
    +20 overflows float32 into NaN."""
    from jin_encoders import LogMelSpectrogram
    from jin_encoders.mel import mel_filterbank

    g = torch.Generator().manual_seed(0)
    loud = torch.cat([torch.sin(torch.arange(16000) * 0.3), torch.rand(16000, generator=g) * 2 - 1])
    log_mel, _ = LogMelSpectrogram()(loud.sign()[None])
    ceiling = log_mel_ceiling(mel_filterbank(16000, 400, 80), 400)
    assert float(log_mel.max()) < ceiling < 2.0
    stray = torch.full((1, 128, 80), 20.0)
    wave = mel_to_waveform(stray, iterations=4, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(wave).all()) and float(wave.abs().max()) <= 1.0


def test_griffin_lim_recovers_a_known_magnitude():
    signal = _chirp()
    window = torch.hann_window(400)
    magnitude = torch.stft(signal, 400, 160, window=window, return_complex=True).abs()

    def convergence(iterations: int) -> float:
        g = torch.Generator().manual_seed(0)
        wave_ = griffin_lim(magnitude, iterations=iterations, length=signal.shape[1], generator=g)
        rebuilt = torch.stft(wave_, 400, 160, window=window, return_complex=True).abs()
        return float(spectral_convergence(rebuilt, magnitude)[0])

    assert convergence(64) < 0.1 < convergence(0)


def test_mel_to_waveform_keeps_the_loud_mel_bins():
    from jin_encoders.mel import LogMelSpectrogram

    mel, _ = LogMelSpectrogram()(_chirp())
    rebuilt, _ = LogMelSpectrogram()(mel_to_waveform(mel, generator=torch.Generator()))
    loud = mel > mel.max() - 0.5  # within 2 decades of the peak
    assert float((rebuilt - mel)[loud].abs().mean()) < 0.1


# -- the CLI -------------------------------------------------------------------------------


def _cli(*argv) -> int:
    from jin_orchestrate.generate import main

    return main([str(a) for a in argv])


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_cli_writes_a_png_a_wav_and_a_caption(gen_checkpoint, tmp_path, device):
    from PIL import Image

    png, wav, txt = tmp_path / "a.png", tmp_path / "a.wav", tmp_path / "a.txt"
    common = ["--checkpoint", gen_checkpoint, "--steps", 2, "--device", device]
    assert _cli(*common, "--to", "image", "--from-text", "the number 4", "--out", png) == 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "L"
    assert _cli(*common, "--to", "audio", "--from-image", png, "--out", wav) == 0
    with wave.open(str(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert w.getnframes() == 128 * 160
    assert _cli(*common, "--to", "text", "--from-audio", wav, "--out", txt) == 0
    assert txt.read_text(encoding="utf-8").endswith("\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "image", "--from-image", "missing.png", "--out", "x.png"], "--from-image"),
        (["--to", "image", "--from-text", "4", "--out", "x.wav"], "--out"),
        (["--to", "text", "--from-audio", "garbage.wav", "--out", "x.txt"], "garbage.wav"),
        (["--to", "audio", "--from-image", "garbage.png", "--out", "x.wav"], "not a readable"),
        (["--to", "image", "--from-text", "  ", "--out", "x.png"], "--from-text"),
        (["--to", "image", "--from-text", "4", "--out", "x.png", "--device", "tpu0"], "tpu0"),
        (["--to", "image", "--from-text", "4", "--out", "x.png", "--guidance", "nan"], "guidance"),
        *(
            (["--to", "text", "--from-image", "4.png", "--out", "x.txt", "--temperature", t], "tem")
            for t in ("nan", "inf")
        ),
        (["--to", "image", "--from-text", "4", "--out", "x.png", "--seed", str(2**64)], "seed"),
        (["--to", "image", "--from-text", "4", "--out", "dir.png"], "--out dir.png: is a dir"),
    ],
)
def test_cli_errors_name_the_flag_or_file(
    gen_checkpoint, tmp_path, monkeypatch, capsys, args, message
):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "garbage.wav").write_bytes(b"not audio")
    Image.new("L", (32, 32), 128).save(tmp_path / "4.png")
    (tmp_path / "dir.png").mkdir()
    assert _cli("--checkpoint", gen_checkpoint, "--steps", 2, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.txt").exists()


# -- Table 4 metrics -------------------------------------------------------------------------


def test_frechet_distance_of_identical_and_shifted_sets():
    from jin_orchestrate.generation_eval import frechet_distance

    a = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.full((8,), 0.5)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    assert frechet_distance(a, 2 * a) > 1.0
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(a, a[:, :3])


def test_conditioning_accuracy_and_exact_match():
    from jin_orchestrate.generation_eval import conditioning_accuracy, exact_match

    assert conditioning_accuracy(torch.tensor([4, 2, 9, 9]), torch.tensor([4, 2, 9, 1])) == 0.75
    assert exact_match(["the number 4", "the number 5"], ["the number 4", "the number 6"]) == 0.5
    with pytest.raises(ValueError, match="exact_match"):
        exact_match([], [])


def test_image_probe_reads_two_digits():
    from jin_orchestrate.generation_eval import ImageProbe

    logits = torch.full((1, 20), -5.0)
    logits[0, 4] = logits[0, 12] = 5.0  # tens 4, units 2
    assert ImageProbe.predict(logits).tolist() == [42]


def test_probe_weights_do_not_depend_on_the_global_rng():
    # The probes score every generated sample: scoring a checkpoint straight after training it
    # and scoring it alone later must use the same probe.
    from jin_orchestrate.generation_eval import AudioProbe, ImageProbe, seeded

    def weights(probe: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in probe.parameters()]

    torch.manual_seed(1)
    first = weights(seeded(lambda: ImageProbe(3), seed=0))
    torch.rand(1000)  # training or loading drew numbers
    state = torch.get_rng_state()
    again = weights(seeded(lambda: ImageProbe(3), seed=0))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is left as it was
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = weights(seeded(lambda: ImageProbe(3), seed=1))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert isinstance(seeded(lambda: AudioProbe(8), seed=0), AudioProbe)


def test_train_probe_decays_its_lr_learns_for_every_seed_and_is_deterministic(monkeypatch):
    # The probe is the instrument behind every conditioning accuracy: whatever its seed, it must
    # end trained (the learning rate decays to zero), and the same seed gives the same probe.
    from jin_orchestrate.generation_eval import AudioProbe, seeded, train_probe

    g = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 16, 8, generator=g)
    labels = torch.arange(10).repeat(20)
    inputs = templates[labels] + 0.5 * torch.randn(len(labels), 16, 8, generator=g)

    def trained(seed: int) -> AudioProbe:
        probe = seeded(lambda: AudioProbe(8), seed)
        return train_probe(probe, inputs, labels, epochs=4, batch_size=32, seed=seed)

    lrs: list[float] = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    trained(0)
    assert len(lrs) == 4 * 7  # 4 epochs of ceil(200 / 32) minibatches
    assert lrs[0] == pytest.approx(3e-3)
    assert all(b <= a for a, b in itertools.pairwise(lrs))
    assert lrs[-1] < 0.01 * lrs[0]
    monkeypatch.undo()
    for seed in range(3):
        probe = trained(seed)
        assert not probe.training
        with torch.no_grad():
            assert (probe.predict(probe(inputs)[1]) == labels).float().mean() >= 0.97
    a, b = trained(1), trained(1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_evaluate_generation_scores_every_trained_direction(gen_checkpoint, corpus_url, tmp_path):
    from jin_orchestrate.evaluate import load_model
    from jin_orchestrate.generation_eval import DIRECTIONS, evaluate_generation, format_generation

    model = load_model(gen_checkpoint)
    scores = evaluate_generation(
        model, corpus_url, samples=4, steps=2, image_dir=tmp_path, log=lambda _: None
    )
    for source, target in DIRECTIONS:
        key = f"{source}_to_{target}"
        if target == "text":
            assert 0.0 <= scores[f"exact_match/{key}"] <= 1.0
        else:
            assert scores[f"probe_fd/{key}"] >= 0.0
            assert 0.0 <= scores[f"conditioning_accuracy/{key}"] <= 1.0
            assert 0.0 <= scores[f"condition_recognised/{key}"] <= 1.0
    assert len(list(tmp_path.glob("text_to_image_*.png"))) == min(4, scores["samples"])
    clips = sorted(tmp_path.glob("image_to_audio_*.wav"))
    assert len(clips) == min(4, scores["samples"])
    with wave.open(str(clips[0])) as w:
        assert w.getframerate() == 16000 and w.getnframes() == 128 * 160
    assert len(list(tmp_path.glob("text_to_audio_*_mel.png"))) == len(clips)
    table = format_generation(scores)
    assert "not Inception-FID" in table and "| condition recognised |" in table


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 1}, "samples: expected at least 2"),
        ({"samples": -1}, "samples: expected at least 2"),
        ({"steps": 0}, r"steps: expected 1..100, got 0"),
        ({"steps": 101}, r"steps: expected 1..100, got 101"),
        ({"batch": 0}, "batch: expected at least 1"),
    ],
)
def test_evaluate_generation_refuses_bad_arguments_before_reading_the_data(
    gen_model, kwargs, message, monkeypatch
):
    """``--samples 1`` (a smoke run), ``0`` or ``-1`` failed with frechet_distance's or torch's
    error, ``--ddim-steps 0`` only after the probes had trained."""
    import jin_orchestrate.generation_eval as generation_eval

    monkeypatch.setattr(generation_eval, "_split", lambda *_: pytest.fail("read the data"))
    with pytest.raises(ValueError, match=message):
        generation_eval.evaluate_generation(gen_model, "unused", **kwargs)


def test_evaluate_cli_names_a_bad_generation_argument_and_exits_2(
    gen_checkpoint, corpus_url, capsys
):
    from jin_orchestrate.evaluate import main

    args = ["--checkpoint", str(gen_checkpoint), "--data", corpus_url, "--generation"]
    assert main([*args, "--samples", "1"]) == 2
    assert "error: samples" in capsys.readouterr().err


def test_evaluate_generation_of_a_split_without_held_out_numbers(corpus_url, monkeypatch):
    """A corpus whose test numbers were all seen in training (NumberWorld without held-out
    numbers) has no zero-shot captions to score: the held-out keys are left out, not an error."""
    import jin_orchestrate.generation_eval as generation_eval

    split = generation_eval._split

    def seen_only(url, name, rate):
        rows = split(url, name, rate)
        seen = set(split(url, "train", rate)["label"].tolist())
        keep = torch.tensor([int(n) in seen for n in rows["label"].tolist()])
        return generation_eval._take(rows, keep.nonzero()[:, 0])

    monkeypatch.setattr(generation_eval, "_split", seen_only)
    monkeypatch.setattr(generation_eval, "train_probe", lambda probe, *_, **__: probe.eval())
    torch.manual_seed(0)
    model = JinModel(_config(image_from=[], audio_from=[]).model)
    scores = generation_eval.evaluate_generation(
        model, corpus_url, samples=2, batch=2, log=lambda _: None
    )
    assert 0.0 <= scores["exact_match/image_to_text"] <= 1.0
    assert not [k for k in scores if k.endswith("/held_out")]
    assert "/ —" in generation_eval.format_generation(scores)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_generation_generates_on_the_gpu_and_scores_on_the_cpu(gen_checkpoint, corpus_url):
    from jin_orchestrate.evaluate import load_model
    from jin_orchestrate.generation_eval import evaluate_generation

    def scores(device):
        model = load_model(gen_checkpoint, device=device)
        return evaluate_generation(model, corpus_url, samples=4, steps=2, log=lambda _: None)

    on_cpu, on_gpu = scores("cpu"), scores("cuda")
    assert on_gpu.keys() == on_cpu.keys()
    # The probes train on the CPU on the same images either way; the real audio's mels are
    # computed by the model's encoder, on the GPU, so they may differ in the last bits.
    assert on_gpu["probe_accuracy/image"] == on_cpu["probe_accuracy/image"]
    for key, value in on_gpu.items():
        if isinstance(value, float):
            assert math.isfinite(value) and value >= 0.0, key


def test_evaluate_generation_on_the_val_split(
    gen_checkpoint, corpus_url, tmp_path, monkeypatch, capsys
):
    import json

    import jin_orchestrate.generation_eval as generation_eval
    from jin_data import ShardDataset
    from jin_orchestrate.evaluate import load_model, main

    generated = []
    generate = generation_eval._generate

    def spy(model, source, target, data, *args):
        generated.extend(data["id"])
        return generate(model, source, target, data, *args)

    monkeypatch.setattr(generation_eval, "_generate", spy)
    out = tmp_path / "val.json"
    argv = ["--checkpoint", str(gen_checkpoint), "--data", corpus_url, "--generation"]
    assert (
        main([*argv, "--split", "val", "--samples", "2", "--ddim-steps", "1", "--json", str(out)])
        == 0
    )
    val = {i for b in ShardDataset(corpus_url, batch_size=256, split="val") for i in b["id"]}
    assert generated and set(generated) <= val
    assert json.loads(out.read_text())["generation"]["split"] == "val"
    assert "2 val samples of numbers seen in training" in capsys.readouterr().out
    with pytest.raises(ValueError, match="split: expected 'val' or 'test', got 'train'"):
        generation_eval.evaluate_generation(load_model(gen_checkpoint), corpus_url, split="train")


def test_spectrogram_image_puts_low_frequencies_at_the_bottom():
    from jin_orchestrate.generation_eval import spectrogram_image

    mel = torch.full((6, 4), -1.0)
    mel[:, 0] = 1.5  # loud lowest bin
    picture = spectrogram_image(mel)
    assert picture.shape == (1, 4, 6) and picture.dtype == torch.uint8
    assert picture[0, -1].tolist() == [255] * 6 and picture[0, 0].tolist() == [0] * 6


def test_evaluate_generation_flag_needs_generation_heads(checkpoint, corpus_url, capsys):
    from jin_orchestrate.evaluate import main

    assert main(["--checkpoint", str(checkpoint), "--data", corpus_url, "--generation"]) == 2
    assert "no generation heads" in capsys.readouterr().err


def test_condition_recognised_compares_conditions_with_the_train_split_of_the_target(monkeypatch):
    import jin_orchestrate.generation_eval as generation_eval

    train = {"label": torch.tensor([3, 5, 3, 5])}
    data = {"label": torch.tensor([5, 3, 5])}
    calls = []

    def fake(model, modality, rows, batch):  # one-hot of the label; audio's swaps 3 and 5
        calls.append((modality, len(rows["label"])))
        labels = 8 - rows["label"] if modality == "audio" else rows["label"]
        return torch.nn.functional.one_hot(labels, 8).float()

    monkeypatch.setattr(generation_eval, "_joint_embeddings", fake)
    keys: dict = {}
    recognised = generation_eval._condition_recognised
    assert recognised(None, "text", "image", data, train, keys, 2) == 1.0
    assert recognised(None, "audio", "image", data, train, keys, 2) == 0.0
    # the train embeddings of the target are computed once
    assert calls == [("image", 4), ("text", 3), ("audio", 3)]
