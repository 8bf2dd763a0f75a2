"""Evaluation of a model on a corpus: every figure present, bounded, and in the summary."""

import torch

from jin_orchestrate.evaluate import evaluate_model, format_summary, prompt_embeddings
from jin_orchestrate.model import JinModel


def test_evaluate_model_reports_zero_shot_and_retrieval(test_config, corpus_url):
    torch.manual_seed(0)
    model = JinModel(test_config.model)
    result = evaluate_model(model, corpus_url)
    assert result["test_samples"] > 0
    assert result["retrieval_pool"] >= 2
    recalls = {k: v for k, v in result.items() if k.startswith("retrieval/") and "/R" in k}
    assert len(recalls) == 8 * 3
    assert all(0.0 <= v <= 1.0 for v in recalls.values())
    summary = format_summary(result)
    assert "R@10 text→audio" in summary
    # Zero-shot needs held-out numbers in the test split: images (CLIP) and speech (CLAP).
    for prefix, what in (("zero_shot", "images"), ("zero_shot_audio", "speech")):
        if f"{prefix}_top1" in result:
            assert 0.0 <= result[f"{prefix}_top1"] <= result[f"{prefix}_top5"] <= 1.0
            assert f"zero-shot top-1, {what} of held-out numbers" in summary


def test_prompt_embeddings_are_one_normalised_vector_per_number(test_config):
    model = JinModel(test_config.model).eval()
    emb = prompt_embeddings(model, [3, 42, 99])
    assert emb.shape == (3, test_config.model.dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
