"""One full z-JEPA step, as orchestrate composes it, for every Table 5 row.

Adaptive zoom (or random ROIs) -> all levels encoded in one (B*L) batch -> per-level Eq. 1 with
multi-block masks -> Eq. 4 on the masked context tokens -> ``zjepa_loss`` -> backward, optimiser
step, EMA update. Checks the pieces fit and that the ROI network learns when it is on.
"""

import pytest
import torch
from toy import GRID, TinyViT, toy_images

from jin_zjepa import (
    TABLE5_ABLATIONS,
    AdaptiveZoom,
    CrossScalePredictor,
    EMAConfig,
    EMATarget,
    MultiBlockMaskGenerator,
    Predictor,
    PredictorConfig,
    gather_tokens,
    jepa_loss,
    random_roi_centers,
    zjepa_loss,
    zoom_boxes,
    zoom_pyramid,
)

B, DIM = 4, 32


@pytest.mark.parametrize("row", list(TABLE5_ABLATIONS))
def test_one_zjepa_step_per_table5_row(row):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = TABLE5_ABLATIONS[row]()
    levels = cfg.num_z_levels
    encoder = TinyViT(DIM)
    pcfg = PredictorConfig(embed_dim=DIM, predictor_dim=16, depth=1, num_heads=2)
    predictor = Predictor(pcfg)
    modules = torch.nn.ModuleList([encoder, predictor])
    zoom = AdaptiveZoom(cfg, DIM, hidden_dim=16) if cfg.adaptive_zoom else None
    cross = CrossScalePredictor(cfg, pcfg) if cfg.cross_scale else None
    modules.extend(m for m in (zoom, cross) if m is not None)
    target = EMATarget(encoder, EMAConfig(total_steps=10))
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-2)

    images = toy_images(B, gen)
    if zoom is not None:
        out = zoom(images, encoder=lambda x: encoder(x)[0])
        crops, boxes = out.crops, out.boxes
    else:
        boxes = zoom_boxes(random_roi_centers(B, gen), cfg.zoom_factors)
        crops = zoom_pyramid(images, boxes)
    flat = crops.flatten(0, 1)  # (B*L, 1, 32, 32)
    m = MultiBlockMaskGenerator()(B * levels, GRID, generator=gen)
    tokens, pos = encoder.embed(flat)
    context = encoder.encode_tokens(gather_tokens(tokens, m.context_idx), m.context_padding_mask)
    pred = predictor(
        context,
        m.context_padding_mask,
        gather_tokens(pos, m.target_idx),
        context_pos=gather_tokens(pos, m.context_idx),
    )
    ema_tokens = target(flat.detach())[0]
    pred_BL = pred.unflatten(0, (B, levels))
    tgt_BL = gather_tokens(ema_tokens, m.target_idx).unflatten(0, (B, levels))
    level_losses = [jepa_loss(pred_BL[:, i], tgt_BL[:, i])[0] for i in range(levels)]
    cross_loss = None
    if cross is not None:
        pad = m.context_padding_mask
        cross_loss, metrics = cross(
            context.unflatten(0, (B, levels)),
            ema_tokens.unflatten(0, (B, levels)),
            boxes,
            GRID,
            online_idx=m.context_idx.unflatten(0, (B, levels)),
            online_padding_mask=None if pad is None else pad.unflatten(0, (B, levels)),
        )
        assert ("cross_scale/h1" in metrics) == cfg.predict_coarse_from_fine
    loss, _ = zjepa_loss(level_losses, cross_loss)
    optimizer.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    if zoom is not None:
        assert float(zoom.roi_network[-1].weight.grad.abs().sum()) > 0
    before = [p.clone() for p in target.parameters()]
    optimizer.step()
    target.update(encoder, step=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
