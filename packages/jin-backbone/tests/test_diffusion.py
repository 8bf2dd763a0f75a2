"""Schedules, q_sample and targets, the DDPM/DDIM samplers, and classifier-free guidance."""

import pytest
import torch
from pydantic import ValidationError

from jin_backbone import (
    Backbone,
    BackboneConfig,
    DiffusionConfig,
    GaussianDiffusion,
    cosine_betas,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    guided_prediction,
    linear_betas,
)


def _diffusion(prediction="eps", schedule="cosine", steps=100) -> GaussianDiffusion:
    return GaussianDiffusion(
        DiffusionConfig(schedule=schedule, num_timesteps=steps, prediction=prediction)
    )


@pytest.mark.parametrize("betas", [linear_betas(1000), cosine_betas(1000), linear_betas(50)])
def test_schedules_are_valid_and_destroy_the_signal(betas):
    assert betas.dtype == torch.float64
    assert (betas > 0).all() and (betas <= 0.999).all()
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert alpha_bar[0] > 0.99 and alpha_bar[-1] < 0.01


def test_linear_betas_are_ho_et_al_at_1000_steps():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_config_checks():
    with pytest.raises(ValidationError, match=r"beta_start=0\.1 must be below beta_end=0\.02"):
        DiffusionConfig(beta_start=0.1)
    with pytest.raises(ValidationError, match="num_timesteps"):
        DiffusionConfig(num_timesteps=1)


def test_q_sample_has_the_forward_process_moments():
    diffusion = _diffusion()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((4000, 8), 2.0)
    t = torch.full((4000,), 60)
    noise = torch.randn(4000, 8, generator=gen)
    x_t = diffusion.q_sample(x0, t, noise)
    abar = diffusion.alphas_cumprod[60]
    assert x_t.mean().item() == pytest.approx(2.0 * abar.sqrt().item(), abs=0.02)
    assert x_t.var().item() == pytest.approx((1 - abar).item(), rel=0.05)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_targets_invert_back_to_x0_and_eps(prediction):
    diffusion = _diffusion(prediction)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, 4, generator=gen)
    noise = torch.randn(5, 3, 4, generator=gen)
    t = torch.tensor([0, 10, 50, 90, 99])
    x_t = diffusion.q_sample(x0, t, noise)
    x0_hat, eps_hat = diffusion.predict_x0_and_eps(x_t, t, diffusion.target(x0, noise, t))
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-4, atol=1e-4)


def test_loss_ignores_padded_tokens():
    target = torch.zeros(2, 3, 4)
    prediction = torch.ones(2, 3, 4)
    padding_mask = torch.tensor([[False, False, True], [False, True, True]])
    prediction[padding_mask] = 1000.0
    assert GaussianDiffusion.loss(prediction, target, padding_mask).item() == pytest.approx(1.0)
    assert GaussianDiffusion.loss(prediction, target).item() > 1.0


def test_loss_refuses_a_padding_mask_that_is_not_bool():
    """``~`` of an integer mask is ``-1``/``-2``, not a keep mask: a 0/1 ``long`` mask gave a
    negative loss and a ``uint8`` one a wrong positive one; a float mask raised a TypeError."""
    prediction, target = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    padding_mask = torch.tensor([[False, False, True], [False, True, True]])
    for dtype in (torch.long, torch.uint8, torch.float32):
        with pytest.raises(ValueError, match=rf"padding_mask: expected bool .* got {dtype}"):
            GaussianDiffusion.loss(prediction, target, padding_mask.to(dtype))


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4)], ids=["no samples", "no tokens"])
def test_an_empty_batch_has_zero_loss_not_nan(shape):
    """The mean over no elements was NaN without a padding mask (0 with one): jin-orchestrate
    takes each target's loss on the rows that have it, so a batch without any image made the
    whole step's loss NaN and the step was skipped."""
    diffusion = _diffusion("v")
    x0 = torch.randn(*shape).requires_grad_(True)
    loss = diffusion.training_loss(lambda x_t, t, c: 2 * x_t, x0, generator=torch.Generator())
    assert loss.item() == 0.0
    loss.backward()
    assert x0.grad.shape == shape


def test_training_loss_is_zero_for_an_oracle_and_deterministic_for_a_seed():
    diffusion = _diffusion("x0")
    x0 = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    assert diffusion.training_loss(lambda x_t, t, c: x0, x0).item() == 0.0
    model = lambda x_t, t, c: 0.5 * x_t  # noqa: E731
    a = diffusion.training_loss(model, x0, generator=torch.Generator().manual_seed(3))
    b = diffusion.training_loss(model, x0, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


def test_training_loss_hands_the_padding_mask_to_the_model_as_a_keyword():
    diffusion = _diffusion("x0")
    x0 = torch.randn(2, 3, 4)
    padding_mask = torch.tensor([[False, False, True], [False, True, True]])
    seen = []

    def model(x_t, t, cond, **kwargs):
        seen.append(kwargs)
        return x0

    assert diffusion.training_loss(model, x0, padding_mask=padding_mask).item() == 0.0
    diffusion.training_loss(model, x0)
    assert seen[0].keys() == {"padding_mask"} and seen[0]["padding_mask"] is padding_mask
    assert seen[1] == {}  # without a mask the three-argument call of the samplers


def test_padded_content_does_not_change_a_backbone_denoisers_loss():
    """The loss masks padded positions; the padding mask handed to the model keeps the noised
    padding out of the real tokens' attention and routing, so only real content counts."""
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=16, depth=2, num_heads=2, num_experts=4, top_k=2, moe_every=1)
    backbone = Backbone(cfg)
    for block in backbone.blocks:  # past adaLN-Zero's identity init, so attention counts
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)

    def model(x_t, t, cond, padding_mask=None):
        return backbone(x_t, padding_mask, timestep=t, cond=cond).hidden

    diffusion = _diffusion()
    x0 = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(10))
    padding_mask = torch.zeros(2, 6, dtype=torch.bool)
    padding_mask[:, 4:] = True
    other_padding = x0.masked_fill(padding_mask[..., None], 100.0)
    losses = [
        diffusion.training_loss(
            model, x, padding_mask=padding_mask, generator=torch.Generator().manual_seed(0)
        )
        for x in (x0, other_padding)
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weights_the_x0_error_the_same_whatever_the_prediction(gamma):
    """One denoiser's x0 estimate, expressed as eps, v or x0: each target's min-SNR loss is
    ``mean(min(SNR_t, gamma) * (x0_hat - x0)^2)`` (before scaling the weights to mean 1), so the
    three agree."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(6, 3, 4, generator=gen)
    noise = torch.randn(6, 3, 4, generator=gen)
    x0_hat = x0 + 0.3 * torch.randn(6, 3, 4, generator=gen)
    t = torch.tensor([1, 10, 30, 50, 70, 95])
    losses = {}
    for prediction in ("eps", "v", "x0"):
        cfg = DiffusionConfig(
            num_timesteps=100, prediction=prediction, loss_weighting="min_snr", min_snr_gamma=gamma
        )
        diffusion = GaussianDiffusion(cfg)
        abar = diffusion.at(diffusion.alphas_cumprod, t, x0)
        x_t = diffusion.q_sample(x0, t, noise)
        eps_hat = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        predicted = {
            "eps": eps_hat,
            "v": abar.sqrt() * eps_hat - (1 - abar).sqrt() * x0_hat,
            "x0": x0_hat,
        }[prediction]
        target = diffusion.target(x0, noise, t)
        weight_B = diffusion.loss_weights(t) * diffusion.loss_weight_scale
        losses[prediction] = GaussianDiffusion.loss(predicted, target, weight_B=weight_B).item()
        assert diffusion.loss_weights(torch.arange(100)).mean().item() == pytest.approx(1.0)
        snr = abar / (1 - abar)
    expected = (snr.clamp_max(gamma) * (x0_hat - x0).square()).mean().item()
    assert losses == pytest.approx({"eps": expected, "v": expected, "x0": expected}, rel=1e-4)
    assert snr.min() < gamma < snr.max()  # the clamp binds for some of these timesteps


def test_min_snr_training_loss_reweights_timesteps_and_is_zero_for_an_oracle():
    x0 = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(5))
    uniform, weighted = (
        GaussianDiffusion(DiffusionConfig(num_timesteps=100, prediction="v", loss_weighting=w))
        for w in ("uniform", "min_snr")
    )
    torch.testing.assert_close(uniform.loss_weights(torch.arange(100)), torch.ones(100))
    w = weighted.loss_weights(torch.arange(100))
    # v's loss already weighs SNR + 1; min-SNR divides that out: mean 1, tiny at both ends,
    # largest where SNR = gamma
    assert w.mean().item() == pytest.approx(1.0) and w[0] < 0.05 and w[-1] < 0.05
    snr = weighted.alphas_cumprod / (1 - weighted.alphas_cumprod)
    assert (snr[w.argmax()] - 5.0).abs() < (snr[w.argmax() - 1] - snr[w.argmax() + 1]).abs()
    eps = _oracle(weighted, x0)
    oracle = lambda x_t, t, c: weighted.target(x0, eps(x_t, t, c), t)  # noqa: E731
    assert weighted.training_loss(oracle, x0).item() == pytest.approx(0.0, abs=1e-9)
    model = lambda x_t, t, c: 0.5 * x_t  # noqa: E731
    a = uniform.training_loss(model, x0, generator=torch.Generator().manual_seed(6))
    b = weighted.training_loss(model, x0, generator=torch.Generator().manual_seed(6))
    assert b.item() != pytest.approx(a.item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"weight_B: expected shape \(8,\), got \(3,\)"):
        GaussianDiffusion.loss(x0, x0, weight_B=torch.ones(3))
    with pytest.raises(ValidationError, match="min_snr_gamma"):
        DiffusionConfig(min_snr_gamma=0)
    with pytest.raises(ValidationError, match="loss_weighting"):
        DiffusionConfig(loss_weighting="p2")


def _oracle(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """A denoiser that knows x0: it returns the exact eps for any x_t."""

    def model(x_t, t, cond):
        abar = diffusion.at(diffusion.alphas_cumprod, t, x_t)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    return model


def test_ddim_one_step_with_zero_noise_returns_the_x0_prediction():
    # float64: at t = T-1 the cosine schedule's abar is ~1e-9 and recovering x0 from x_T cancels
    # catastrophically in float32.
    diffusion = _diffusion(steps=1000)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sample = ddim_sample(
        diffusion,
        _oracle(diffusion, x0),
        (2, 3, 4),
        steps=1,
        eta=0.0,
        generator=torch.Generator().manual_seed(5),
        dtype=torch.float64,
    )
    torch.testing.assert_close(sample, x0, rtol=1e-9, atol=1e-9)
    # With a model that predicts eps = 0, one step is x_T / sqrt(abar_{T-1}): documented maths.
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(6))
    zero = ddim_sample(diffusion, lambda x, t, c: torch.zeros_like(x), (2, 3, 4), steps=1, x_T=x_T)
    torch.testing.assert_close(zero, x_T / diffusion.alphas_cumprod[-1].sqrt())


def test_ddim_many_steps_with_an_oracle_lands_on_x0():
    diffusion = _diffusion(steps=200)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(7))
    sample = ddim_sample(
        diffusion,
        _oracle(diffusion, x0),
        (2, 3, 4),
        steps=20,
        generator=torch.Generator().manual_seed(8),
    )
    torch.testing.assert_close(sample, x0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_samplers_are_deterministic_for_a_seed(sampler):
    diffusion = _diffusion(steps=30)
    model = lambda x, t, c: 0.1 * x  # noqa: E731

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        if sampler == "ddpm":
            return ddpm_sample(diffusion, model, (2, 5, 3), generator=gen)
        return ddim_sample(diffusion, model, (2, 5, 3), steps=10, eta=1.0, generator=gen)

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_ddpm_with_an_oracle_recovers_x0():
    diffusion = _diffusion(steps=50)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9))
    sample = ddpm_sample(
        diffusion, _oracle(diffusion, x0), (2, 3, 4), generator=torch.Generator().manual_seed(10)
    )
    torch.testing.assert_close(sample, x0, rtol=1e-3, atol=1e-3)


def test_classifier_free_guidance_extrapolates_from_unconditional():
    calls = []

    def model(x, t, cond):
        calls.append(cond)
        return x + (0.0 if cond is None else cond)

    x = torch.zeros(2, 3)
    t = torch.zeros(2, dtype=torch.long)
    guided = guided_prediction(model, x, t, torch.tensor(1.0), None, guidance_scale=3.0)
    torch.testing.assert_close(guided, torch.full((2, 3), 3.0))
    assert calls[-1] is None
    calls.clear()
    guided_prediction(model, x, t, torch.tensor(1.0), None, guidance_scale=1.0)
    assert len(calls) == 1


def test_guided_ddim_differs_from_unguided_and_stays_deterministic():
    diffusion = _diffusion(steps=20)
    model = lambda x, t, c: 0.1 * x + (0.0 if c is None else c)  # noqa: E731
    cond = torch.full((2, 1, 1), 0.3)

    def run(scale):
        gen = torch.Generator().manual_seed(0)
        return ddim_sample(
            diffusion, model, (2, 4, 3), steps=5, cond=cond, guidance_scale=scale, generator=gen
        )

    assert torch.equal(run(4.0), run(4.0))
    assert not torch.allclose(run(4.0), run(1.0))


def test_ddim_timesteps_span_the_schedule():
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(1000, 4) == [999, 666, 333, 0]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError, match=r"steps: expected 1\.\.10, got 11"):
        ddim_timesteps(10, 11)


@pytest.mark.parametrize(
    ("sampler", "kwargs", "message"),
    [
        (ddim_sample, {"eta": -1.0}, r"eta: expected 0\.\.1, got -1\.0"),
        (ddim_sample, {"eta": 2.0}, r"eta: expected 0\.\.1, got 2\.0"),
        (ddim_sample, {"eta": float("nan")}, r"eta: expected 0\.\.1, got nan"),
        (ddim_sample, {"clip_x0": -1.0}, r"clip_x0: expected a positive bound or None, got -1"),
        (ddpm_sample, {"clip_x0": 0.0}, r"clip_x0: expected a positive bound or None, got 0"),
        (ddpm_sample, {"clip_x0": float("nan")}, r"clip_x0: .* got nan"),
    ],
)
def test_samplers_refuse_an_eta_or_clip_x0_outside_their_range(sampler, kwargs, message):
    """A negative eta added no noise while still taking sigma^2 from eps, an eta above 1 had the
    eps term clamped to 0, and a clip_x0 <= 0 set every x0 estimate to clip_x0 itself (min >
    max in clamp): each a wrong sample, silently. The model is never called."""
    diffusion = _diffusion(steps=10)

    def model(x_t, t, cond):
        raise AssertionError("called before the arguments were checked")

    extra = {"steps": 5} if sampler is ddim_sample else {}
    with pytest.raises(ValueError, match=message):
        sampler(diffusion, model, (1, 4), **extra, **kwargs)
    # The ends of the ranges are valid.
    x0 = torch.full((1, 4), 0.5)
    for ok in (
        ({"eta": 0.0}, {"eta": 1.0}, {"clip_x0": 1.0})
        if sampler is ddim_sample
        else ({"clip_x0": 1.0},)
    ):
        sample = sampler(
            _diffusion("x0", steps=10),
            lambda x_t, t, cond: x0.expand_as(x_t),
            (1, 4),
            generator=torch.Generator().manual_seed(0),
            **extra,
            **ok,
        )
        torch.testing.assert_close(sample, x0)


@pytest.mark.parametrize(("prediction", "clip_x0"), [("x0", None), ("eps", 3.0), ("v", None)])
def test_bfloat16_samplers_stay_finite_and_land_on_x0(prediction, clip_x0):
    """In bfloat16 ``abar_t`` is exactly 1 for the first timesteps: the update divided by
    ``sqrt(1 - abar) = 0`` there (NaN samples from an x0 prediction, or with ``clip_x0``), and
    the bf16 schedule was off by far more than bf16's resolution. The model still sees bf16."""
    diffusion = _diffusion(prediction, steps=100)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(11)).clamp(-2, 2)
    seen = set()

    def oracle(x_t, t, cond):
        seen.add(x_t.dtype)
        abar = diffusion.alphas_cumprod[t].view(-1, 1, 1)
        eps = (x_t.float() - abar.sqrt() * x0) / (1 - abar).sqrt()
        return diffusion.target(x0, eps, t).to(x_t.dtype)

    for sampler, kwargs in ((ddim_sample, {"steps": 10, "eta": 0.5}), (ddpm_sample, {})):
        sample = sampler(
            diffusion,
            oracle,
            (2, 3, 4),
            clip_x0=clip_x0,
            dtype=torch.bfloat16,
            generator=torch.Generator().manual_seed(12),
            **kwargs,
        )
        assert sample.dtype == torch.bfloat16
        torch.testing.assert_close(sample.float(), x0, rtol=0, atol=2e-2)
    assert seen == {torch.bfloat16}
    x_t = diffusion.q_sample(x0.bfloat16(), torch.zeros(2, dtype=torch.long), x0.bfloat16())
    assert x_t.dtype == torch.bfloat16 and not torch.equal(x_t, x0.bfloat16())  # noise added
    x0_hat, eps_hat = diffusion.predict_x0_and_eps(x_t, torch.zeros(2, dtype=torch.long), x_t)
    assert x0_hat.dtype == eps_hat.dtype == torch.bfloat16
    assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()


def test_a_model_cast_to_bfloat16_keeps_the_schedule_in_float32():
    """A model holding the schedule (jin-orchestrate's generation heads) cast to bfloat16 cast
    the buffers too: ``abar_t`` became exactly 1 for the first timesteps, DDIM raised
    ``ZeroDivisionError`` and ``q_sample`` added no noise at ``t = 0`` even to float32 data."""
    model = torch.nn.Module()
    model.diffusion = _diffusion("x0", steps=100)
    model.head = torch.nn.Linear(4, 4)
    fresh = _diffusion("x0", steps=100)
    model.to(torch.bfloat16)
    assert model.head.weight.dtype == torch.bfloat16
    for name, buffer in fresh.named_buffers():
        assert torch.equal(model.diffusion.get_buffer(name), buffer), name
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(13)).clamp(-1, 1)
    sample = ddim_sample(
        model.diffusion,
        lambda x_t, t, cond: x0.to(x_t.dtype),
        (2, 3, 4),
        steps=10,
        clip_x0=1.0,
        dtype=torch.bfloat16,
        generator=torch.Generator().manual_seed(14),
    )
    torch.testing.assert_close(sample.float(), x0, rtol=0, atol=1e-2)
    x_t = model.diffusion.q_sample(x0, torch.zeros(2, dtype=torch.long), torch.ones_like(x0))
    assert not torch.equal(x_t, x0)
    model.half().double()  # any cast, and back
    assert model.diffusion.alphas_cumprod.dtype == torch.float32
