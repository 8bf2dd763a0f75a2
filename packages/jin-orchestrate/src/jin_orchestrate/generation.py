"""Cross-modal generation (paper §3.1 "Decoding", Table 4, §6.2): the backbone as a decoder.

# B batch, T tokens, Tc condition tokens, D width, P values per token, V vocabulary, K choices

Two decoders share the DiT-MoE backbone, the encoders and the modality output heads (ZIP-0408):

- **Diffusion over continuous tokens** for images and audio. The target is the sequence the
  modality's `RegressionHead` regresses: normalised ``P x P`` pixel patches of an image at
  ``image_size`` pixels, or pairs of log-mel frames of ``audio_frames`` frames. Noisy tokens are
  embedded (``x_embedder``, a learned position table, the target's modality embedding) and the
  backbone denoises them with the timestep and the condition entering through adaLN-Zero (DiT,
  Peebles & Xie 2023). The condition is the conditioning input's **joint embedding** (the
  L2-normalised retrieval embedding of §3.1's encode-then-process path) through
  ``cond_embedder``, as unCLIP (Ramesh et al. 2022) conditions on a CLIP embedding; the stage
  keeps that embedding discriminative with Eq. 6's InfoNCE between the generation modalities
  (``align_weight``). For classifier-free guidance (Ho & Salimans 2022) the condition is
  replaced by a learned ``null_cond`` with probability ``cond_dropout`` in training. Images
  have, by default (``image_head="conv"``), a convolutional embedder and output head instead of
  linear ones: `jin_encoders.PixelDiffusionHead` turns the noisy image into the backbone's
  tokens and the denoised tokens back into pixels through U-Net skips, so strokes can cross
  patch borders; ``audio_head="conv"`` gives audio the 1-D counterpart over its log-mel frames.
  Two conditionings were tried and dropped (``benchmarks/results/generation.md``):
  the pooled backbone representation without the InfoNCE term, and the condition's tokens in
  context; after 3,000 and 2,000 steps they drew the number asked for 4% and 1% of the time.
- **Autoregressive captions** for text: a prefix LM (Raffel et al. 2020) over the concatenation of
  the condition's encoder tokens and the caption's byte tokens, condition tokens attending to each
  other and caption tokens to the condition and the caption so far; the text LM head gives the
  next byte. Captions are trained towards ``caption_template`` filled with the sample's label (the
  canonical caption exact-match is scored against), or towards the sample's own text without one.

`generation_losses` is the objective of a generation stage (``StageConfig.generation``);
`generate` is what `JinModel.generate` and ``python -m jin_orchestrate.generate`` call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_backbone import DiffusionConfig, GaussianDiffusion, KVCache, ddim_sample
from jin_encoders import ByteTokenizer, PixelDiffusionHead
from jin_orchestrate._config import StrictConfig
from jin_orchestrate.griffin_lim import mel_to_waveform

if TYPE_CHECKING:
    from jin_orchestrate.config import StageConfig
    from jin_orchestrate.model import JinModel

__all__ = [
    "GenerationConfig",
    "GenerationHeads",
    "Target",
    "canonical_caption",
    "decode_captions",
    "fit_frames",
    "generate",
    "generation_losses",
    "sample_tokens",
]

Target = Literal["image", "audio", "text"]
TARGETS: tuple[Target, ...] = ("image", "audio", "text")


class GenerationConfig(StrictConfig):
    """What the generation heads produce and from what; sizes of the generated tokens."""

    # loss weights and sampling of the training step: no parameter depends on them, so a
    # generation checkpoint can be fine-tuned further with other values
    TRAINING_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "cond_dropout",
            "align_weight",
            "image_weight",
            "audio_weight",
            "text_weight",
            "image_repeats",
            "audio_repeats",
            "caption_template",
        }
    )

    image_from: tuple[str, ...] = Field(("text", "audio"), description="conditions of images")
    audio_from: tuple[str, ...] = Field(("image", "text"), description="conditions of audio")
    text_from: tuple[str, ...] = Field(("image", "audio"), description="conditions of captions")
    image_size: int = Field(32, gt=0, description="side of generated images in pixels")
    image_head: Literal["conv", "patch"] = Field(
        "conv",
        description="conv: PixelDiffusionHead around the backbone (U-Net skips); patch: linear "
        "patch embedding in and the image RegressionHead out (DiT's)",
    )
    image_head_channels: tuple[int, ...] | None = Field(
        None, description="conv stage widths of the conv image head (default 32, 64, 128, ...)"
    )
    audio_frames: int = Field(128, gt=1, description="log-mel frames of generated audio (10 ms)")
    audio_head: Literal["linear", "conv"] = Field(
        "linear",
        description="linear: linear embedding of frame pairs in and the audio RegressionHead out; "
        "conv: a 1-D PixelDiffusionHead over the frames (mel bins as channels, U-Net skip)",
    )
    audio_head_channels: tuple[int, ...] = Field(
        (256,), description="conv stage width of the conv audio head (one stage: 2 frames a token)"
    )
    caption_template: str | None = Field(
        "the number {digits}",
        description="caption a labelled sample is trained towards ({digits}, {words}); None: "
        "the sample's own text",
    )
    caption_max_bytes: int = Field(32, gt=0)
    cond_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="classifier-free guidance")
    align_weight: float = Field(
        1.0,
        ge=0.0,
        description="Eq. 6 InfoNCE between the generation modalities in the stage, so the joint "
        "embedding diffusion is conditioned on tells its inputs apart",
    )
    diffusion: DiffusionConfig = DiffusionConfig(prediction="v")
    image_repeats: int = Field(
        1,
        ge=1,
        description="noise levels drawn per image in a training step (MAR's diffusion batch "
        "multiplier): the condition is embedded once, the denoiser sees each image this many "
        "times at independent timesteps",
    )
    audio_repeats: int = Field(1, ge=1, description="image_repeats for audio")
    image_weight: float = Field(1.0, ge=0.0)
    audio_weight: float = Field(1.0, ge=0.0)
    text_weight: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        if self.audio_frames % 2:
            raise ValueError(
                f"generation.audio_frames: expected an even count (two frames a token), "
                f"got {self.audio_frames}"
            )
        if len(self.audio_head_channels) != 1 or self.audio_head_channels[0] <= 0:
            raise ValueError(
                f"generation.audio_head_channels: expected one positive width (two frames a "
                f"token is one conv stage), got {self.audio_head_channels}"
            )
        for target in TARGETS:
            if target in self.conditions(target):
                raise ValueError(f"generation.{target}_from: {target} cannot condition itself")
        if not any(self.conditions(t) for t in TARGETS):
            raise ValueError("generation: image_from, audio_from and text_from are all empty")
        if not self.trained_targets:
            raise ValueError(
                "generation: every generated target has loss weight 0 (image_weight, "
                "audio_weight, text_weight); a step would train nothing"
            )
        return self

    def conditions(self, target: str) -> tuple[str, ...]:
        """The modalities ``target`` is generated from (empty: not generated)."""
        return getattr(self, f"{target}_from")

    def weight(self, target: str) -> float:
        """``target``'s loss weight in a generation step (0: its loss is not computed)."""
        return float(getattr(self, f"{target}_weight"))

    @property
    def targets(self) -> list[Target]:
        return [t for t in TARGETS if self.conditions(t)]

    @property
    def trained_targets(self) -> list[Target]:
        """The targets a generation step computes a loss for: generated, with a weight above 0."""
        return [t for t in self.targets if self.weight(t) > 0]


def canonical_caption(label: int, template: str) -> str:
    """``template`` filled with the number: ``{digits}`` and ``{words}`` (NumberWorld's words)."""
    from jin_data.numberworld.text import number_words

    return template.format(digits=str(label), words=number_words(label))


class GenerationHeads(nn.Module):
    """What generation adds to a model: for each diffused target a token embedder and a learned
    position table; the condition embedder and the null condition. The output heads are the
    joint embedding space's own (``space.heads``), except for images with ``image_head="conv"``,
    whose embedder and output head are one `PixelDiffusionHead`, and for audio with
    ``audio_head="conv"``, a 1-D one over the log-mel frames."""

    def __init__(self, cfg: GenerationConfig, space: Any, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_shapes = token_shapes(cfg, space)  # target -> (tokens T, values per token P)
        self.diffusion = GaussianDiffusion(cfg.diffusion)
        self.image_head: PixelDiffusionHead | None = None
        if cfg.image_from and cfg.image_head == "conv":
            vision = space.encoders["image"]
            self.image_head = PixelDiffusionHead(
                vision.in_channels, dim, vision.patch_size, cfg.image_head_channels
            )
        self.audio_head: PixelDiffusionHead | None = None
        if cfg.audio_from and cfg.audio_head == "conv":
            n_mels = space.encoders["audio"].n_mels
            self.audio_head = PixelDiffusionHead(
                n_mels, dim, 2, cfg.audio_head_channels, spatial_dims=1
            )
        self.x_embedder = nn.ModuleDict(
            {
                name: nn.Linear(values, dim)
                for name, (_, values) in self.token_shapes.items()
                if self.conv_head(name) is None
            }
        )
        self.pos_embed = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
                for name, (tokens, _) in self.token_shapes.items()
            }
        )
        # unit-norm embeddings in, so std 1 gives the condition the timestep embedding's scale
        self.cond_embedder = nn.Linear(space.retrieval_dim, dim)
        nn.init.normal_(self.cond_embedder.weight, std=1.0)
        nn.init.zeros_(self.cond_embedder.bias)
        self.null_cond = nn.Parameter(torch.randn(dim))

    def conv_head(self, target: str) -> PixelDiffusionHead | None:
        """``target``'s convolutional embedder and output head, if it has one."""
        return self.image_head if target == "image" else self.audio_head

    def condition(self, z_BR: Tensor, drop_B: Tensor | None = None) -> Tensor:
        """``cond_embedder(z)`` of joint embeddings ``(B, R)``, the learned null condition where
        ``drop_B`` is True -> ``(B, D)``."""
        cond_BD = self.cond_embedder(z_BR)
        if drop_B is None:
            return cond_BD
        return torch.where(drop_B[:, None], self.null_cond.to(cond_BD.dtype), cond_BD)

    def null(self, batch: int) -> Tensor:
        """The null condition for ``batch`` samples ``(B, D)`` (the unconditional branch)."""
        return self.null_cond[None].expand(batch, -1)


def token_shapes(cfg: GenerationConfig, space: Any) -> dict[str, tuple[int, int]]:
    """``(tokens, values per token)`` of each diffused target of ``cfg`` in ``space``."""
    shapes = {}
    if cfg.image_from:
        vision = space.encoders["image"]
        shapes["image"] = (image_grid(cfg.image_size, vision.patch_size) ** 2, vision.target_dim)
    if cfg.audio_from:
        shapes["audio"] = (cfg.audio_frames // 2, space.encoders["audio"].target_dim)
    return shapes


def image_grid(image_size: int, patch_size: int) -> int:
    """Tokens per side of a generated image: ``generation.image_size`` over the vision encoder's
    patch, which must divide it (`JinModelConfig` checks this rule with the config)."""
    if image_size % patch_size:
        raise ValueError(
            f"generation.image_size: expected a multiple of the patch size {patch_size} "
            f"(space.image.patch_size), got {image_size}"
        )
    return image_size // patch_size


# -- targets as token sequences and back ---------------------------------------------------


def image_tokens(model: JinModel, images: Tensor, sizes: Tensor | None = None) -> Tensor:
    """uint8 images ``(B, C, H, W)`` resized to ``image_size`` -> normalised patches ``(B, T, P)``.

    With ``sizes`` ``(B, 2)`` (jin-data's ``image_sizes``: a batch of several sizes is padded at
    the bottom and right) each image is its own ``(H_i, W_i)`` top-left corner, not the padding.
    The layout is the image `RegressionHead`'s (`VisionEncoder.regression_targets`).
    """
    side = _generation(model).cfg.image_size
    if sizes is None:
        sizes = torch.tensor(images.shape[2:], device=images.device).expand(images.shape[0], 2)
    sizes = sizes.to(images.device)
    small = images.new_zeros((*images.shape[:2], side, side), dtype=torch.float32)
    for height, width in sizes.unique(dim=0).tolist():  # one resize per size in the batch
        rows = (sizes == torch.tensor([height, width], device=sizes.device)).all(dim=1)
        if height and width:  # (0, 0): no image
            small[rows] = F.interpolate(
                images[rows, :, :height, :width].float(), size=(side, side), mode="area"
            )
    tokens, _ = model.space.encoders["image"].regression_targets(
        small.round().clamp(0, 255).to(torch.uint8)
    )
    return tokens


def patches_to_pixels(tokens_BTP: Tensor, patch_size: int) -> Tensor:
    """Square images' patch tokens ``(B, T, P)`` (`VisionEncoder.regression_targets`' layout)
    -> ``(B, C, side, side)``."""
    grid = round(tokens_BTP.shape[1] ** 0.5)
    return rearrange(
        tokens_BTP, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, p=patch_size, q=patch_size
    )


def pixels_to_patches(pixels_BCHW: Tensor, patch_size: int) -> Tensor:
    """The inverse of `patches_to_pixels`."""
    return rearrange(pixels_BCHW, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def images_from_tokens(model: JinModel, tokens_BTP: Tensor) -> Tensor:
    """Normalised patches ``(B, T, P)`` back to uint8 images ``(B, C, side, side)``."""
    vision = model.space.encoders["image"]
    pixels = patches_to_pixels(tokens_BTP.float(), vision.patch_size)
    mean, std = vision.config.channel_stats()
    m = torch.tensor(mean, device=pixels.device)[:, None, None]
    s = torch.tensor(std, device=pixels.device)[:, None, None]
    return ((pixels * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)


def audio_tokens(model: JinModel, batch: Mapping[str, Any]) -> Tensor:
    """The batch's audio as ``audio_frames`` log-mel frames in pairs ``(B, T, 2M)``, the layout
    the audio `RegressionHead` regresses (`AudioEncoder.regression_targets`)."""
    encoder = model.space.encoders["audio"]
    mel, frame_mask = encoder.mel_frames(**encoder.batch_inputs(batch, "audio"))
    return mel_to_tokens(fit_frames(mel, frame_mask, _generation(model).cfg.audio_frames))


def fit_frames(mel_BTM: Tensor, padding_mask_BT: Tensor | None, frames: int) -> Tensor:
    """Log-mel frames padded or cut to ``frames``: padding takes each clip's own quietest value
    (its silence floor), so every generated clip has one length and ends in silence."""
    if padding_mask_BT is None:
        padding_mask_BT = torch.zeros(mel_BTM.shape[:2], dtype=torch.bool, device=mel_BTM.device)
    floor_B = mel_BTM.masked_fill(padding_mask_BT[..., None], float("inf")).amin(dim=(1, 2))
    mel_BTM = torch.where(padding_mask_BT[..., None], floor_B[:, None, None], mel_BTM)
    if mel_BTM.shape[1] < frames:
        pad = floor_B[:, None, None].expand(-1, frames - mel_BTM.shape[1], mel_BTM.shape[2])
        mel_BTM = torch.cat([mel_BTM, pad], dim=1)
    return mel_BTM[:, :frames]


def mel_from_tokens(tokens_BTP: Tensor, n_mels: int) -> Tensor:
    """Frame-pair tokens ``(B, T, 2M)`` to log-mel frames ``(B, 2T, M)``."""
    return tokens_BTP.reshape(tokens_BTP.shape[0], -1, n_mels)


def mel_to_tokens(mel_BTM: Tensor) -> Tensor:
    """The inverse of `mel_from_tokens`: log-mel frames ``(B, 2T, M)`` to ``(B, T, 2M)``."""
    return mel_BTM.reshape(mel_BTM.shape[0], -1, 2 * mel_BTM.shape[-1])


def caption_ids(texts: list[str], max_bytes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Teacher-forcing pairs ``(inputs (B, L), targets (B, L))``: ``BOS + bytes`` and ``bytes +
    EOS`` in the byte tokenizer's ids, cut at ``max_bytes`` bytes; padded targets are -100."""
    rows = [
        [ByteTokenizer.BOS]
        + [b + ByteTokenizer.NUM_SPECIAL for b in t.encode("utf-8")[:max_bytes]]
        + [ByteTokenizer.EOS]
        for t in texts
    ]
    length = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), length), ByteTokenizer.PAD, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, : len(row) - 1] = torch.tensor(row[1:])
    return inputs.to(device), targets.to(device)


# -- the two decoders ----------------------------------------------------------------------


def denoise(
    model: JinModel, target: str, x_t_BTP: Tensor, t_B: Tensor, cond_BD: Tensor
) -> tuple[Tensor, Tensor]:
    """The backbone as ``target``'s denoiser: prediction ``(B, T, P)`` and the MoE aux loss.

    The timestep and the condition ``(B, D)`` (`GenerationHeads.condition`, or ``null``) enter
    through adaLN-Zero."""
    heads, space, backbone = _generation(model), model.space, model.encoder.backbone
    conv = heads.conv_head(target)
    if conv is not None:
        embedded, skips = conv.encode(_signal(model, target, x_t_BTP))
    else:
        embedded = heads.x_embedder[target](x_t_BTP)
    tokens = (
        embedded
        + heads.pos_embed[target][:, : x_t_BTP.shape[1]]
        + space.modality_embed[space.modality_ids[target]]
    )
    c_BD = backbone.condition(x_t_BTP.shape[0], t_B, cond_BD)  # once for the blocks and the head
    out = backbone(tokens, cond=c_BD)
    if model.encoder.router_log is not None:
        model.encoder.router_log.append(out)
    if conv is not None:
        signal = conv.decode(out.hidden, skips, c_BD)
        return _tokens_of_signal(model, target, signal), out.aux_loss
    return space.heads[target](out.hidden), out.aux_loss


def _signal(model: JinModel, target: str, tokens_BTP: Tensor) -> Tensor:
    """Target tokens as the conv head's input: pixels ``(B, C, H, W)`` or frames ``(B, M, L)``."""
    if target == "image":
        return patches_to_pixels(tokens_BTP, model.space.encoders["image"].patch_size)
    return mel_from_tokens(tokens_BTP, model.space.encoders["audio"].n_mels).transpose(1, 2)


def _tokens_of_signal(model: JinModel, target: str, signal: Tensor) -> Tensor:
    """The inverse of `_signal`."""
    if target == "image":
        return pixels_to_patches(signal, model.space.encoders["image"].patch_size)
    return mel_to_tokens(signal.transpose(1, 2))


def joint_embedding(model: JinModel, name: str, encoded: Any) -> tuple[Tensor, Tensor]:
    """The retrieval embedding ``(B, R)`` of one encoded modality (encoder, backbone, pooled
    projection: `JinModel.embed`'s path) and the backbone's router aux loss."""
    hidden, aux = model.encoder.process(encoded.tokens, encoded.padding_mask)
    return model.space.project(name, hidden, encoded.padding_mask), aux


def prefix_lm_mask(padding_mask_BT: Tensor, prefix: int) -> Tensor:
    """``(B, 1, T, T)`` attention mask (True = attend) of a prefix LM: the first ``prefix``
    tokens see each other, every later token sees the prefix and the tokens up to itself."""
    tokens = padding_mask_BT.shape[1]
    i = torch.arange(tokens, device=padding_mask_BT.device)[:, None]
    j = torch.arange(tokens, device=padding_mask_BT.device)[None, :]
    allowed_TT = (j < prefix) | ((j <= i) & (i >= prefix))
    return (allowed_TT[None] & ~padding_mask_BT[:, None, :])[:, None]


def caption_logits(
    model: JinModel, cond_BTcD: Tensor, cond_padding_BTc: Tensor, ids_BL: Tensor
) -> tuple[Tensor, Tensor]:
    """Next-byte logits ``(B, L, V)`` after each caption input id, and the MoE aux loss.

    Runs the backbone's blocks under `prefix_lm_mask` (the backbone's own ``forward`` only takes
    a padding mask), without a timestep, so the blocks are the plain transformer of §3.1.
    """
    hidden, aux = _caption_blocks(
        model, *_prefix_lm_inputs(model, cond_BTcD, cond_padding_BTc, ids_BL)
    )
    return model.space.heads["text"](hidden[:, cond_BTcD.shape[1] :]), aux


def _prefix_lm_inputs(
    model: JinModel, cond_BTcD: Tensor, cond_padding_BTc: Tensor, ids_BL: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``[condition; caption]`` tokens, their padding mask and their `prefix_lm_mask`."""
    text_BLD, ids_padding = _caption_tokens(model, ids_BL)
    padding_BT = torch.cat([cond_padding_BTc, ids_padding], dim=1)
    x_BTD = torch.cat([cond_BTcD, text_BLD], dim=1)
    return x_BTD, padding_BT, prefix_lm_mask(padding_BT, cond_BTcD.shape[1])


def _caption_tokens(model: JinModel, ids_BL: Tensor) -> tuple[Tensor, Tensor]:
    """The text encoder's tokens ``(B, L, D)`` of caption ids, and their padding mask."""
    ids_padding = ids_BL == ByteTokenizer.PAD
    text = model.space.encode({"text": {"x": ids_BL, "padding_mask": ids_padding}})["text"]
    return text.tokens, ids_padding


def _caption_blocks(
    model: JinModel,
    x_BTD: Tensor,
    padding_BT: Tensor | None,
    attn_mask: Tensor,
    caches: list[KVCache] | None = None,
) -> tuple[Tensor, Tensor]:
    """The backbone's blocks (no timestep) and final norm over ``x``, and the MoE aux loss;
    with ``caches`` (one per block) ``x`` is the new tokens only."""
    blocks = model.encoder.backbone.blocks
    aux = x_BTD.new_zeros((), dtype=torch.float32)
    for block, cache in zip(blocks, caches or [None] * len(blocks), strict=True):
        x_BTD, block_aux = block(x_BTD, None, padding_BT, attn_mask, cache)
        if block_aux is not None:
            aux = aux + block_aux.weighted(block.ffn.cfg)
    return model.encoder.backbone.norm_final(x_BTD), aux


def _next_byte_logits(
    model: JinModel,
    cond_BTcD: Tensor,
    cond_padding_BTc: Tensor,
    ids_BL: Tensor,
    caches: list[KVCache] | None,
) -> Tensor:
    """Logits ``(B, V)`` of the byte after ``ids`` under the prefix-LM attention of
    `caption_logits`. With ``caches`` filled, only the newest id is run, attending to the cached
    keys; otherwise the prefix and every id are (filling ``caches`` when given)."""
    if caches is not None and caches[0].length:
        x_BTD = _caption_tokens(model, ids_BL)[0][:, -1:]
        keys_BT = torch.cat([~cond_padding_BTc, ids_BL != ByteTokenizer.PAD], dim=1)
        padding_BT, attn_mask = None, keys_BT[:, None, None, :]
    else:
        x_BTD, padding_BT, attn_mask = _prefix_lm_inputs(model, cond_BTcD, cond_padding_BTc, ids_BL)
    hidden, _ = _caption_blocks(model, x_BTD, padding_BT, attn_mask, caches)
    return model.space.heads["text"](hidden[:, -1:])[:, 0]


@torch.no_grad()
def decode_captions(
    model: JinModel,
    cond_BTcD: Tensor,
    cond_padding_BTc: Tensor,
    *,
    max_bytes: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
) -> list[str]:
    """Autoregressive byte decoding: greedy (``temperature=0``) or sampled from the softmax at
    ``temperature``, restricted to the ``top_k`` likeliest bytes when given, seeded by
    ``generator``. Stops at EOS or after ``max_bytes`` bytes. With ``kv_cache`` each step runs
    the newest byte only, against the blocks' cached keys and values (`KVCache`); without, it
    runs the whole prefix and caption again (the same result, to float rounding)."""
    if not 0 <= temperature < math.inf:  # NaN too
        raise ValueError(f"temperature: expected a finite value >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    batch, device = cond_BTcD.shape[0], cond_BTcD.device
    ids = torch.full((batch, 1), ByteTokenizer.BOS, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    never = [ByteTokenizer.PAD, ByteTokenizer.BOS, ByteTokenizer.MASK]
    caches = [KVCache() for _ in model.encoder.backbone.blocks] if kv_cache else None
    for _ in range(max_bytes):
        logits_BV = _next_byte_logits(model, cond_BTcD, cond_padding_BTc, ids, caches).float()
        logits_BV[:, never] = float("-inf")
        if temperature == 0:
            next_B = logits_BV.argmax(dim=-1)
        else:
            logits_BV = logits_BV / temperature
            if top_k is not None:
                kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
            probs = logits_BV.softmax(dim=-1).cpu()
            next_B = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
        next_B = torch.where(done, ByteTokenizer.EOS, next_B)
        ids = torch.cat([ids, next_B[:, None]], dim=1)
        done |= next_B == ByteTokenizer.EOS
        if bool(done.all()):
            break
    texts = []
    for row in ids[:, 1:].tolist():
        row = row[: row.index(ByteTokenizer.EOS)] if ByteTokenizer.EOS in row else row
        texts.append(bytes(i - ByteTokenizer.NUM_SPECIAL for i in row).decode("utf-8", "replace"))
    return texts


@torch.no_grad()
def sample_tokens(
    model: JinModel,
    target: str,
    cond_BD: Tensor | None,
    *,
    num_samples: int,
    steps: int = 50,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (``eta=0``) samples of ``target``'s tokens ``(B, T, P)`` given the condition
    ``(B, D)`` (``None``: unconditional), with classifier-free guidance against the null
    condition."""
    heads = _generation(model)
    if target not in heads.token_shapes:
        raise ValueError(f"target {target!r}: this model diffuses {sorted(heads.token_shapes)}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance: expected a finite scale, got {guidance}")
    tokens, values = heads.token_shapes[target]
    null_BD = heads.null(num_samples)

    def denoiser(x_t: Tensor, t_B: Tensor, c_BD: Tensor) -> Tensor:
        return denoise(model, target, x_t, t_B, c_BD)[0]

    return ddim_sample(
        heads.diffusion,
        denoiser,
        (num_samples, tokens, values),
        steps=steps,
        cond=null_BD if cond_BD is None else cond_BD,
        uncond=null_BD,
        guidance_scale=guidance,
        generator=generator,
        clip_x0=_clip(model, target),
        device=null_BD.device,
        dtype=null_BD.dtype,
    )


# -- training ------------------------------------------------------------------------------


def generation_losses(
    model: JinModel,
    batch: Mapping[str, Any],
    stage: StageConfig,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """Loss terms of a generation step: the diffusion losses of the image and audio tokens, the
    caption cross-entropy, Eq. 6's alignment between the modalities, the router aux loss;
    ``loss`` is their weighted sum."""
    from jin_orchestrate.model import _present, _router_metrics

    heads = _generation(model)
    cfg = heads.cfg
    needed = {m for t in cfg.targets for m in (t, *cfg.conditions(t))}
    missing = sorted(m for m in needed if m not in batch and f"{m}_bytes" not in batch)
    if missing:
        raise ValueError(
            f"stage {stage.name!r}: generation needs {missing} in the batch; keys: {sorted(batch)}"
        )
    encoded = model.space.encode_batch({k: v for k, v in batch.items() if _belongs(k, needed)})
    present = {n: _present(batch, n, e.tokens) for n, e in encoded.items()}
    out: dict[str, Tensor] = {}
    terms: list[Tensor] = []
    aux_terms: list[Tensor] = []
    # a target weighted 0 is not computed at all (a fine-tune that trains only some heads)
    diffused = [t for t in cfg.trained_targets if t != "text"]
    conditions = {m for t in diffused for m in cfg.conditions(t)}
    aligned = cfg.align_weight > 0 and len(encoded) > 1
    hidden: dict[str, Tensor] = {}
    for name in sorted(encoded if aligned else conditions):
        hidden[name], aux = model.encoder.process(encoded[name].tokens, encoded[name].padding_mask)
        aux_terms.append(aux)
    if aligned:
        terms.append(cfg.align_weight * model.alignment(hidden, encoded, present, out))
    z = {n: model.space.project(n, hidden[n], encoded[n].padding_mask) for n in conditions}
    for target in diffused:
        names = cfg.conditions(target)
        choice_B, any_B = _choose([present[n] for n in names], generator)
        z_BR = torch.stack([z[n] for n in names], dim=1)[_rows(choice_B), choice_B]
        drop_B = (_uniform(any_B.shape[0], generator, any_B) < cfg.cond_dropout) | ~any_B
        cond_BD = heads.condition(z_BR, drop_B)
        rows = present[target].nonzero()[:, 0]
        x0 = _target_tokens(model, target, batch, rows)
        loss, aux = _diffusion_loss(model, target, x0, cond_BD[rows], generator)
        aux_terms.append(aux)
        out[f"generation/{target}"] = loss.detach()
        terms.append(cfg.weight(target) * loss)
    if "text" in cfg.trained_targets:
        loss, accuracy, aux = _caption_loss(model, batch, encoded, present, generator)
        out["generation/text"] = loss.detach()
        out["generation/text_byte_accuracy"] = accuracy
        terms.append(cfg.text_weight * loss)
        aux_terms.append(aux)
    out["router_aux"] = torch.stack(aux_terms).mean()
    out.update(_router_metrics(model.encoder.router_log or []))
    out["loss"] = torch.stack(terms).sum() + out["router_aux"]
    out["tokens"] = torch.tensor(sum(int(e.valid_mask.sum()) for e in encoded.values()))
    return out


def _target_tokens(
    model: JinModel, target: str, batch: Mapping[str, Any], rows_N: Tensor
) -> Tensor:
    """``target``'s tokens ``(N, T, P)`` of the batch's ``rows`` (those that have it): none of a
    batch without any, whose image is ``(B, C, 0, 0)`` and audio ``(B, 0)`` in jin-data."""
    if rows_N.numel() == 0:
        tokens, values = _generation(model).token_shapes[target]
        return torch.zeros(0, tokens, values, device=rows_N.device)
    if target == "image":
        sizes = batch.get("image_sizes")
        return image_tokens(model, batch["image"][rows_N], None if sizes is None else sizes[rows_N])
    audio = {
        k: v[rows_N.to(v.device)] if isinstance(v, Tensor) and v.dim() else v
        for k, v in batch.items()
        if k == "audio" or k.startswith("audio_")
    }
    return audio_tokens(model, audio)


def _diffusion_loss(
    model: JinModel, target: str, x0_BTP: Tensor, cond_BD: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """One denoising loss of ``target``'s tokens (`GaussianDiffusion.training_loss`, each sample
    ``image_repeats`` or ``audio_repeats`` times), and the denoiser's MoE aux loss."""
    aux: list[Tensor] = []

    def denoiser(x_t: Tensor, t_B: Tensor, c_BD: Tensor) -> Tensor:
        prediction, aux_loss = denoise(model, target, x_t, t_B, c_BD)
        aux.append(aux_loss)
        return prediction

    repeats = getattr(_generation(model).cfg, f"{target}_repeats")
    if repeats > 1:  # each sample at `repeats` independent timesteps and noises
        x0_BTP = x0_BTP.repeat_interleave(repeats, dim=0)
        cond_BD = cond_BD.repeat_interleave(repeats, dim=0)
    loss = _generation(model).diffusion.training_loss(
        denoiser, x0_BTP, cond_BD, generator=generator
    )
    return loss, aux[0]


def _caption_loss(
    model: JinModel,
    batch: Mapping[str, Any],
    encoded: Mapping[str, Any],
    present: Mapping[str, Tensor],
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy of the captions given each sample's condition (one of ``text_from``)."""
    cfg = _generation(model).cfg
    cond_BTcD, cond_padding_BTc, any_B = _context(encoded, present, cfg.text_from, generator)
    texts = captions_of(batch, cfg)
    inputs, targets = caption_ids(texts, cfg.caption_max_bytes, cond_BTcD.device)
    targets = targets.masked_fill(~(any_B & present["text"])[:, None], -100)
    logits, aux = caption_logits(model, cond_BTcD, cond_padding_BTc, inputs)
    counted = targets != -100
    # the mean over the bytes counted, 0 (not NaN, which skips the whole step) with none: a batch
    # may have no caption or no condition of one
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    loss = total / counted.sum().clamp(min=1)
    accuracy = ((logits.argmax(dim=-1) == targets) & counted).sum() / counted.sum().clamp(min=1)
    return loss, accuracy.detach().float(), aux


def captions_of(batch: Mapping[str, Any], cfg: GenerationConfig) -> list[str]:
    """The captions a batch is trained towards: the canonical caption of each label, or the
    batch's own text where there is no template or no label (-1)."""
    texts = list(batch.get("text") or [""] * len(batch["label"]))
    if cfg.caption_template is None or "label" not in batch:
        return texts
    return [
        canonical_caption(int(label), cfg.caption_template) if int(label) >= 0 else text
        for label, text in zip(batch["label"].tolist(), texts, strict=True)
    ]


# -- the user-facing entry -----------------------------------------------------------------


@torch.no_grad()
def generate(
    model: JinModel,
    target: Target,
    condition: Mapping[str, Any] | None = None,
    *,
    num_samples: int | None = None,
    steps: int = 50,
    guidance: float = 3.0,
    seed: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    griffin_lim_iterations: int = 64,
) -> Tensor | list[str]:
    """Generate ``target`` from one conditioning modality, deterministically for a ``seed``.

    Args:
        model: a `JinModel` with generation heads (``cfg.generation``).
        target: ``image`` (uint8 ``(B, C, side, side)``), ``audio`` (float waveforms ``(B, S)``
            at the audio encoder's sample rate, via Griffin-Lim) or ``text`` (``list[str]``).
        condition: one modality in jin-data batch form: ``{"text": [str, ...]}``,
            ``{"image": uint8 (B, C, H, W)}`` or ``{"audio": float (B, S), "audio_lengths": (B,)}``;
            ``None`` generates ``num_samples`` unconditional images or audio.
        steps: DDIM steps (images, audio).
        guidance: classifier-free guidance scale (1: none).
        seed: seeds the initial noise, Griffin-Lim's phase and caption sampling.
        temperature, top_k: caption decoding (``temperature=0``: greedy).
    """
    heads = _generation(model)
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {list(TARGETS)}, got {target!r}")
    if not heads.cfg.conditions(target):
        raise ValueError(f"target {target!r}: this model was not trained to generate it")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [-2**63, 2**64), got {seed}")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    encoded = None
    if condition is not None:
        encoded = model.space.encode_batch(condition)
        if len(encoded) != 1:
            raise ValueError(
                f"condition: expected exactly one modality, got {sorted(encoded) or 'none'} "
                f"from keys {sorted(condition)}"
            )
        ((name, enc),) = encoded.items()
        if name not in heads.cfg.conditions(target):
            allowed = list(heads.cfg.conditions(target))
            raise ValueError(f"condition {name!r}: {target} is generated from {allowed}")
        num_samples = enc.tokens.shape[0]
    elif target == "text":
        raise ValueError("target 'text': captions need a condition (image or audio)")
    elif num_samples is None:
        raise ValueError("num_samples: needed when there is no condition")
    if target == "text":
        assert encoded is not None
        (enc,) = encoded.values()
        return decode_captions(
            model,
            enc.tokens,
            _padding(enc),
            max_bytes=heads.cfg.caption_max_bytes,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
        )
    cond_BD = None
    if encoded is not None:
        ((name, enc),) = encoded.items()
        cond_BD = heads.condition(joint_embedding(model, name, enc)[0])
    tokens = sample_tokens(
        model,
        target,
        cond_BD,
        num_samples=num_samples,
        steps=steps,
        guidance=guidance,
        generator=generator,
    )
    if target == "image":
        return images_from_tokens(model, tokens)
    audio = model.space.encoders["audio"]
    return mel_to_waveform(
        mel_from_tokens(tokens, audio.n_mels),
        sample_rate=audio.config.sample_rate,
        n_fft=audio.log_mel.n_fft,
        hop_length=audio.config.hop_length,
        iterations=griffin_lim_iterations,
        generator=generator,
    )


# -- helpers -------------------------------------------------------------------------------


def _generation(model: JinModel) -> GenerationHeads:
    heads = getattr(model, "generation", None)
    if heads is None:
        raise ValueError(
            "this model has no generation heads (model.generation is unset): fine-tune it with "
            "python -m jin_orchestrate.generate train --checkpoint ..."
        )
    return heads


def _belongs(key: str, names: set[str]) -> bool:
    return any(key == n or key.startswith(f"{n}_") for n in names) or key == "label"


def _rows(index_B: Tensor) -> Tensor:
    return torch.arange(index_B.shape[0], device=index_B.device)


def _uniform(batch: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(batch, generator=generator, device=device).to(like.device)


def _choose(present: list[Tensor], generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One option per sample, uniformly among those present: ``(index (B,), any present (B,))``."""
    present_BK = torch.stack(present, dim=1)
    device = generator.device if generator is not None else present_BK.device
    scores = torch.rand(present_BK.shape, generator=generator, device=device)
    scores = scores.to(present_BK.device).masked_fill(~present_BK, -1.0)
    return scores.argmax(dim=1), present_BK.any(dim=1)


def _padding(enc: Any) -> Tensor:
    if enc.padding_mask is not None:
        return enc.padding_mask
    return torch.zeros(enc.tokens.shape[:2], dtype=torch.bool, device=enc.tokens.device)


def _context(
    encoded: Mapping[str, Any],
    present: Mapping[str, Tensor],
    names: tuple[str, ...],
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample, the encoder tokens of one of ``names`` drawn among those present, right-padded
    to a common length ``(B, Tc, D)``, their padding mask ``(B, Tc)`` and whether any was
    present ``(B,)``."""
    choice_B, any_B = _choose([present[n] for n in names], generator)
    options = [encoded[n] for n in names]
    length = max(o.tokens.shape[1] for o in options)
    tokens = torch.stack(
        [F.pad(o.tokens, (0, 0, 0, length - o.tokens.shape[1])) for o in options], dim=1
    )
    padding = torch.stack(
        [F.pad(_padding(o), (0, length - o.tokens.shape[1]), value=True) for o in options], dim=1
    )
    rows = _rows(choice_B)
    return tokens[rows, choice_B], padding[rows, choice_B], any_B


def _clip(model: JinModel, target: str) -> float | None:
    """Images: the normalised pixel range, so DDIM's x0 estimates stay valid pixels."""
    if target != "image":
        return None
    mean, std = model.space.encoders["image"].config.channel_stats()
    return max(max(abs((0 - m) / s), abs((1 - m) / s)) for m, s in zip(mean, std, strict=True))
