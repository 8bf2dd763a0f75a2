"""The pre-training objectives of the Jin paper §2.1 and §4.1: Eqs. 1, 5, 6 and 7.

Every loss returns ``(scalar, metrics)``. Metrics are detached 0-dim tensors (no host sync inside
the training step); call ``.item()`` when logging. Metric names are ``<term>/<quantity>``.

Targets of the regression terms are normalised with a parameter-free ``layer_norm`` over the
feature dimension before the squared error, as I-JEPA does to the target encoder's output. The
loss scale is then fixed (unit variance per target token), so the online side cannot lower the
loss by shrinking the target network's output, one of the routes to collapse. Layer norm acts per
token, so normalising before or after gathering the target tokens is the same.

Shapes: B batch, N tokens, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from jin_zjepa._config import StrictConfig

__all__ = [
    "LogitScale",
    "LossWeights",
    "cross_modal_jepa_loss",
    "info_nce",
    "jepa_loss",
    "masked_mse",
    "total_loss",
    "zjepa_loss",
]

Metrics = dict[str, Tensor]


def masked_mse(
    pred_BND: Tensor,
    target_BND: Tensor,
    padding_mask: Tensor | None = None,
    normalize_targets: bool = True,
) -> Tensor:
    """Mean over non-padded tokens of the per-token squared error (averaged over ``D``).

    Returns a zero that still depends on ``pred`` when every token is padding, so distributed
    data-parallel training sees a gradient (of zeros) for every parameter on every rank.
    """
    if pred_BND.shape != target_BND.shape or pred_BND.dim() != 3:
        raise ValueError(
            f"prediction and target must both be (B, N, D); got {tuple(pred_BND.shape)} and "
            f"{tuple(target_BND.shape)}"
        )
    target = target_BND.detach()
    if normalize_targets:
        target = F.layer_norm(target, (target.shape[-1],))
    if padding_mask is None:
        return (pred_BND - target).pow(2).mean(dim=-1).mean()
    if padding_mask.shape != pred_BND.shape[:2] or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"padding_mask must be bool (B, N) = {tuple(pred_BND.shape[:2])}; got "
            f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    # Select the kept tokens before the error, not multiply by a keep mask: 0 * NaN is NaN, and a
    # padded token's value (or its gradient through pow) must never reach the loss.
    keep_BN = ~padding_mask
    err_K = (pred_BND[keep_BN] - target[keep_BN]).pow(2).mean(dim=-1)
    return err_K.sum() / keep_BN.sum().clamp(min=1).to(err_K.dtype)


def jepa_loss(
    pred: Tensor,
    target: Tensor,
    padding_mask: Tensor | None = None,
    normalize_targets: bool = True,
) -> tuple[Tensor, Metrics]:
    """Eq. 1: ``||g_φ(f_θ(x_vis)) - f_θ̄(x_mask)||²`` averaged over the target tokens.

    Args:
        pred: ``(B, N, D)`` predictor output at the target positions.
        target: ``(B, N, D)`` EMA target network output gathered at the targets (detached here).
        padding_mask: ``(B, N)`` bool, True at padded targets, or None.
        normalize_targets: apply I-JEPA's feature-wise layer norm to the targets.
    """
    loss = masked_mse(pred, target, padding_mask, normalize_targets)
    return loss, {"jepa/loss": loss.detach(), **_std_metrics("jepa", pred, target, padding_mask)}


def cross_modal_jepa_loss(
    pred_b: Tensor,
    target_b: Tensor,
    padding_mask: Tensor | None = None,
    present: Tensor | None = None,
    normalize_targets: bool = True,
) -> tuple[Tensor, Metrics]:
    """Eq. 5: masked targets of modality B predicted from the context of modality A.

    The predictor is the one of Eq. 1, fed modality A's context hidden states and modality B's
    target positions; this loss compares its output with B's EMA targets.

    Args:
        pred_b: ``(B, N, D)`` predictions of modality B's target tokens.
        target_b: ``(B, N, D)`` EMA targets of modality B at those tokens.
        padding_mask: ``(B, N)`` bool, True at padded targets, or None.
        present: ``(B,)`` bool, True where the sample has both modalities (``<a>_present &
            <b>_present``); absent pairs are ignored. None means all present.
        normalize_targets: as in :func:`jepa_loss`.
    """
    if present is not None:
        if present.shape != pred_b.shape[:1] or present.dtype != torch.bool:
            raise ValueError(
                f"present must be a bool tensor of shape (B,) = ({pred_b.shape[0]},); got "
                f"{present.dtype} {tuple(present.shape)}"
            )
        absent_BN = (~present)[:, None].expand(pred_b.shape[:2])
        padding_mask = absent_BN if padding_mask is None else padding_mask | absent_BN
    loss = masked_mse(pred_b, target_b, padding_mask, normalize_targets)
    metrics = {"cross_modal/loss": loss.detach()}
    metrics.update(_std_metrics("cross_modal", pred_b, target_b, padding_mask))
    return loss, metrics


def _std_metrics(prefix: str, pred: Tensor, target: Tensor, padding: Tensor | None) -> Metrics:
    """Mean per-dimension std of predictions and raw targets over valid tokens (collapse watch)."""
    keep = slice(None) if padding is None else ~padding
    out = {}
    for name, x in (("pred_std", pred), ("target_std", target)):
        tokens = x.detach()[keep].reshape(-1, x.shape[-1])
        std = tokens.float().std(dim=0).mean() if tokens.shape[0] > 1 else tokens.new_zeros(())
        out[f"{prefix}/{name}"] = std
    return out


def zjepa_loss(
    level_losses: list[Tensor], cross_scale: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """The z-JEPA image term: the mean of Eq. 1 over zoom levels plus Eq. 4's cross-scale sum.

    The paper adds no weight between the two (§3.5), so neither do we; this value is the image
    modality's ``L_JEPA`` inside Eq. 7.
    """
    if not level_losses:
        raise ValueError("zjepa_loss needs at least one level loss (level 0, the whole image)")
    within = torch.stack(level_losses).mean()
    metrics = {f"zjepa/level{i}": loss.detach() for i, loss in enumerate(level_losses)}
    metrics["zjepa/within_levels"] = within.detach()
    total = within if cross_scale is None else within + cross_scale
    metrics["zjepa/loss"] = total.detach()
    return total, metrics


class LogitScale(nn.Module):
    """CLIP's learnable inverse temperature ``1/τ``, stored as its log and clamped.

    CLIP starts at ``τ = 0.07`` and clamps the scale to at most 100 so training cannot sharpen the
    softmax without bound. ``forward`` returns the clamped value and never writes the parameter,
    so it can be called any number of times before one backward (e.g. once per aligned pair).

    Call :meth:`clamp_` after each ``optimizer.step()``, as CLIP does: ``clamp``'s gradient is
    zero outside the bounds, so a stored value the optimiser pushed past ``log(max_scale)`` would
    stop receiving gradient and stay there. Put back on the bound, it can always move back.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        # Written so that NaN fails it too; a 1/τ below 1 would start clamped to 1 in forward.
        if not (0.0 < init_temperature <= 1.0 and 1.0 / init_temperature <= max_scale):
            raise ValueError(
                f"LogitScale needs 0 < init_temperature and 1 <= 1/init_temperature <= max_scale; "
                f"got init_temperature={init_temperature}, max_scale={max_scale}"
            )
        self.max_log = math.log(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self) -> Tensor:
        """The current scale ``1/τ`` as a 0-dim tensor in ``[1, max_scale]``."""
        return self.log_scale.clamp(0.0, self.max_log).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored log-scale into ``[0, log(max_scale)]``; call after ``optimizer.step()``.

        Not inside ``forward``: an in-place write there bumps the parameter's version counter and
        breaks the backward of every earlier call in the same step.
        """
        self.log_scale.clamp_(0.0, self.max_log)


def info_nce(
    z_a: Tensor,
    z_b: Tensor,
    logit_scale: Tensor | float,
    present: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Eq. 6, symmetric: cross-entropy of matching pairs in both directions (CLIP), averaged.

    Args:
        z_a: ``(B, D)`` pooled embeddings of modality A; L2-normalised here.
        z_b: ``(B, D)`` pooled embeddings of modality B (row ``i`` pairs with row ``i`` of A).
        logit_scale: ``1/τ``, e.g. ``LogitScale()()``.
        present: ``(B,)`` bool, True where both modalities are present; other rows are dropped
            from both the positives and the negatives.

    Negatives are the other rows of this batch; gathering negatives across data-parallel ranks is
    left to the caller (pass the gathered embeddings).
    """
    if z_a.dim() != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"info_nce expects two (B, D) tensors of one shape; got {tuple(z_a.shape)} and "
            f"{tuple(z_b.shape)}"
        )
    if present is not None:
        if present.shape != z_a.shape[:1] or present.dtype != torch.bool:
            raise ValueError(
                f"present must be bool of shape ({z_a.shape[0]},); got {present.dtype} "
                f"{tuple(present.shape)}"
            )
        z_a, z_b = z_a[present], z_b[present]
    scale = torch.as_tensor(logit_scale, dtype=z_a.dtype, device=z_a.device)
    n = z_a.shape[0]
    if n < 2:
        # No negatives: contribute nothing, but keep the graph so every parameter gets a gradient.
        zero = (z_a.sum() + z_b.sum()) * 0.0 + scale * 0.0
        return zero, {"align/loss": zero.detach(), "align/pairs": torch.tensor(float(n))}
    logits_ab = scale * F.normalize(z_a, dim=-1) @ F.normalize(z_b, dim=-1).T
    labels = torch.arange(n, device=z_a.device)
    loss_ab = F.cross_entropy(logits_ab, labels)
    loss_ba = F.cross_entropy(logits_ab.T, labels)
    loss = 0.5 * (loss_ab + loss_ba)
    with torch.no_grad():
        metrics = {
            "align/loss": loss.detach(),
            "align/acc_a2b": (logits_ab.argmax(dim=1) == labels).float().mean(),
            "align/acc_b2a": (logits_ab.argmax(dim=0) == labels).float().mean(),
            "align/logit_scale": scale.detach(),
            "align/pairs": torch.tensor(float(n)),
        }
    return loss, metrics


class LossWeights(StrictConfig):
    """The weights α, β, γ of Eq. 7 (the paper gives no values; 1.0 each by default)."""

    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(1.0, ge=0.0)
    gamma: float = Field(1.0, ge=0.0)


def total_loss(
    jepa: Tensor | None = None,
    cross_modal: Tensor | None = None,
    align: Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """Eq. 7: ``α L_JEPA + β L_cross-modal + γ L_align``; a term left None is absent (curriculum
    stages 1-2 of §4.2 train without some of them)."""
    terms = (("jepa", jepa, alpha), ("cross_modal", cross_modal, beta), ("align", align, gamma))
    present = [(name, value, weight) for name, value, weight in terms if value is not None]
    if not present:
        raise ValueError("total_loss needs at least one of jepa, cross_modal, align")
    for name, value, weight in present:
        if not weight >= 0.0 or value.dim() != 0:  # NaN included
            raise ValueError(
                f"total_loss: term {name!r} needs a non-negative weight and a 0-dim loss; got "
                f"weight {weight}, shape {tuple(value.shape)}"
            )
    loss = sum(weight * value for _, value, weight in present)
    metrics = {
        f"total/{name}_weighted": (weight * value).detach() for name, value, weight in present
    }
    metrics["total/loss"] = loss.detach()
    return loss, metrics
