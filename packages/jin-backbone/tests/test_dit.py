"""DiT block: adaLN-Zero identity at init, additive conditioning, padding, timestep embedding."""

import pytest
import torch

from jin_backbone import DiTBlock, FeedForward, KVCache, MoE, MoEConfig, TimestepEmbedder


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


@pytest.mark.parametrize("moe", [False, True])
def test_decoding_with_a_kv_cache_equals_a_causal_pass_over_the_whole_sequence(moe):
    """A prefix of 5 tokens, then 4 tokens one at a time through the cache: the outputs of a
    full pass under the matching prefix-LM mask, to float tolerance."""
    block = _block(moe=moe).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 9, 32)
    prefix = 5
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    allowed = (j < prefix) | ((j <= i) & (i >= prefix))  # the prefix sees itself; then causal
    with torch.no_grad():
        full, _ = block(x, attn_mask=allowed[None, None])
        cache = KVCache()
        first, _ = block(x[:, :prefix], cache=cache)
        steps = [first]
        for t in range(prefix, 9):
            step, _ = block(
                x[:, t : t + 1], attn_mask=allowed[None, None, t : t + 1, : t + 1], cache=cache
            )
            steps.append(step)
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs an explicit attn_mask"):
        block(x[:, :1], cache=cache)
