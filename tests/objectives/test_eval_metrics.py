"""Evaluation metrics on hand-made cases: candidate scoring, perplexity, probes, retrieval, and
the demo eval sets built with the training templates."""

import math

import torch

from megatron_unihetero.eval import metrics, probes, retrieval


def test_target_logprobs_sums_the_masked_next_token_logprobs():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    tokens = torch.tensor([[2, 0, 1]])
    mask = torch.tensor([[True, True, True]])  # position 0 is never scored
    expected = math.log(0.5) + math.log(0.8)  # token 0 given pos 0, token 1 given pos 1
    assert abs(float(metrics.target_logprobs(logits, tokens, mask)[0]) - expected) < 1e-6
    mask = torch.tensor([[False, False, True]])
    assert abs(float(metrics.target_logprobs(logits, tokens, mask)[0]) - math.log(0.8)) < 1e-6


def test_candidate_choice_accuracy_and_perplexity():
    assert metrics.pick_candidate([-3.0, -1.0, -2.0]) == 1
    assert metrics.pick_candidate([-1.0, -1.0]) == 0
    assert metrics.accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    assert abs(metrics.perplexity(2 * math.log(4), 2) - 4.0) < 1e-12
    assert math.isnan(metrics.perplexity(0.0, 0))


def test_probe_reads_a_linearly_coded_attribute_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    labels = [["red", "green", "blue"][i % 3] for i in range(90)]
    code = torch.eye(3)[[["red", "green", "blue"].index(x) for x in labels]]
    features = torch.cat([code * 3.0, torch.randn(90, 5, generator=gen)], dim=1)
    result = probes.probe_accuracy(features, labels, seed=1)
    assert result["test_accuracy"] == 1.0 and result["num_classes"] == 3
    noise = probes.probe_accuracy(torch.randn(90, 8, generator=gen), labels, seed=1)
    assert noise["test_accuracy"] < 0.7


def test_split_is_disjoint_and_seeded():
    train, test = probes.split_indices(10, 0.3, seed=3)
    assert len(test) == 3 and len(train) == 7
    assert set(train.tolist()).isdisjoint(test.tolist())
    again = probes.split_indices(10, 0.3, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])


def test_retrieval_is_by_cosine_not_distance():
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    predictions = torch.tensor([[5.0, 0.1], [0.05, 0.2], [1.0, 1.1]])
    assert retrieval.nearest_by_cosine(predictions, candidates).tolist() == [0, 1, 2]
    hits = retrieval.top1_hits(predictions, candidates, torch.tensor([0, 2, 2]))
    assert hits.tolist() == [True, False, True]


def test_demo_eval_sets_use_the_training_layout(tmp_path):
    from megatron_unihetero.data.demo_world import write_demo_data
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.eval.data import build_eval_sets, read_rows

    tokenizer = build_tokenizer(train_tiny_tokenizer(str(tmp_path / "tok")))
    write_demo_data(str(tmp_path / "data"), 20, seed=1, image_size=32, valid_fraction=0.25)
    rows = read_rows(str(tmp_path / "data" / "valid.parquet"), max_samples=4)
    sets = build_eval_sets(rows, tokenizer, tokens_per_image=16, image_size=32)
    assert len(sets.questions) == len(sets.captions) == 4
    for row, question, caption in zip(rows, sets.questions, sets.captions):
        assert len(question.candidates) == len(row["candidates"])
        assert row["candidates"][question.answer] == row["answer"]
        right = question.candidates[question.answer]
        assert right.tokens.count(tokenizer.image_token_id) == 16
        assert right.images.shape == (1, 3, 32, 32)
        # The scored tokens are the answer (" " + answer) and EOS, nothing of the question.
        scored = [t for t, m in zip(right.tokens, right.target_mask) if m]
        assert scored[-1] == tokenizer.eos_id
        assert tokenizer.decode(scored[:-1]).strip() == row["answer"]
        caption_text = [t for t, m in zip(caption.tokens[1:], caption.target_mask[1:]) if m]
        assert tokenizer.decode(caption_text[:-1]).strip() == row["caption"]
    assert sets.attributes["colour"] == [r["colour"] for r in rows]
