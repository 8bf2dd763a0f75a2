"""DiT block: adaLN-Zero identity at init, additive conditioning, padding, timestep embedding."""

import pytest
import torch

from jin_backbone import DiTBlock, FeedForward, MoE, MoEConfig, TimestepEmbedder


def _block(conditioning: str = "adaln_zero", moe: bool = False) -> DiTBlock:
    torch.manual_seed(0)
    ffn = (
        MoE(MoEConfig(dim=32, hidden_dim=48, num_experts=4, top_k=2))
        if moe
        else FeedForward(32, 48)
    )
    return DiTBlock(32, 4, ffn, conditioning)


@pytest.mark.parametrize("moe", [False, True])
def test_fresh_adaln_zero_block_is_the_identity(moe):
    block = _block(moe=moe)
    x = torch.randn(2, 6, 32)
    c = torch.randn(2, 32)
    y, aux = block(x, c)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert (aux is not None) == moe


def test_adaln_block_leaves_identity_after_a_step_and_depends_on_c():
    block = _block()
    x = torch.randn(2, 6, 32)
    c = torch.randn(2, 32)
    y, _ = block(x, c)
    y.square().sum().backward()
    with torch.no_grad():
        for p in block.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    after_a, _ = block(x, c)
    after_b, _ = block(x, c + 1)
    assert not torch.allclose(after_a, x)
    assert not torch.allclose(after_a, after_b)


def test_without_timestep_it_is_a_plain_transformer_block():
    block = _block()
    x = torch.randn(2, 6, 32)
    y, _ = block(x)
    assert not torch.allclose(y, x)
    attn_out = block.attn(block.norm1(x))
    h = x + attn_out
    torch.testing.assert_close(y, h + block.ffn(block.norm2(h)))


def test_fresh_additive_block_ignores_the_timestep():
    block = _block("additive")
    x = torch.randn(2, 6, 32)
    y_plain, _ = block(x)
    y_cond, _ = block(x, torch.randn(2, 32))
    torch.testing.assert_close(y_cond, y_plain)


@pytest.mark.parametrize("moe", [False, True])
def test_padded_keys_do_not_change_valid_outputs(moe):
    block = _block(moe=moe)
    x = torch.randn(2, 6, 32)
    padding_mask = torch.zeros(2, 6, dtype=torch.bool)
    padding_mask[0, 4:] = True
    padding_mask[1, :] = True  # a sample that is all padding stays finite
    noisy = x.clone()
    noisy[padding_mask] = 100 * torch.randn(int(padding_mask.sum()), 32)
    y, _ = block(x, None, padding_mask)
    y_noisy, _ = block(noisy, None, padding_mask)
    torch.testing.assert_close(y[0, :4], y_noisy[0, :4])
    assert torch.isfinite(y).all()


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="num_heads=5 does not divide dim=32"):
        DiTBlock(32, 5, FeedForward(32, 8))


def test_timestep_embedder_distinguishes_timesteps_and_takes_floats():
    torch.manual_seed(0)
    embedder = TimestepEmbedder(16, frequency_dim=33)
    emb = embedder(torch.tensor([0, 1, 999]))
    assert emb.shape == (3, 16)
    assert not torch.allclose(emb[1], emb[2])
    torch.testing.assert_close(embedder(torch.tensor([0.5])), embedder(torch.tensor([0.5])))
    sinusoid = embedder.sinusoidal(torch.tensor([0.0]))
    assert sinusoid.shape == (1, 33)
    torch.testing.assert_close(sinusoid[0, :16], torch.ones(16))  # cos(0)
