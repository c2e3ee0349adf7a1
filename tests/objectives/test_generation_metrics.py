"""Scores of generated text (eval/generation_metrics.py) against hand-computed values, the
sampler's filters (generation/text.py) and the generation prompt (data/conversation.py).
Model-level generation (KV cache against full recompute, evaluate --generate) runs in
_jobs.generation_job / evaluate_cli_job; the export's generate in tests/hf/test_hf_export.py."""

import math

import pytest
import torch

from megatron_unihetero.eval import generation_metrics as gm


@pytest.mark.parametrize("text, normal", [
    ("The Cat!", "cat"), ("red-blue", "red blue"), ("3.5 apples.", "3.5 apples"),
    ("Two dogs", "2 dogs"), ("yes, it is", "yes it is"), ("1,000", "1000"),
    ("  an  Orange\n", "orange"), ("none", "0"),
])
def test_answers_are_normalised_like_vqa(text, normal):
    assert gm.normalize_answer(text) == normal


def test_exact_match_vqa_accuracy_and_anls_by_hand():
    assert gm.exact_match("The circle.", ["circle"]) == 1.0
    assert gm.exact_match("a circle at the top", ["circle"]) == 0.0
    assert gm.exact_match("two", ["3", "2"]) == 1.0
    # Several references: min(#matching / 3, 1).
    refs = ["2", "2", "two", "3", "3"]
    assert gm.vqa_accuracy("2", refs) == 1.0
    assert gm.vqa_accuracy("3", refs) == pytest.approx(2 / 3)
    assert gm.vqa_accuracy("4", refs) == 0.0
    assert gm.vqa_accuracy("Blue", ["blue"]) == 1.0  # one reference: exact match
    # ANLS: 1 - edit distance / longer length, 0 below 0.5, the best reference.
    assert gm.levenshtein("kitten", "sitting") == 3
    assert gm.anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)
    assert gm.anls("Hello ", ["xyz", "HELLO"]) == 1.0
    assert gm.anls("abcdef", ["abcxyz"]) == pytest.approx(0.5)
    assert gm.anls("abcdef", ["abwxyz"]) == 0.0  # 1 - 4/6 < 0.5
    scores = gm.answer_scores(["circle", "helo"], [["circle"], ["hello"]])
    assert scores == pytest.approx({"exact_match": 0.5, "vqa_accuracy": 0.5, "anls": (1 + 0.8) / 2})
    with pytest.raises(ValueError, match="no references"):
        gm.exact_match("x", [])


def test_the_option_a_generated_answer_names():
    letters, options = ["A", "B", "C"], ["red circle", "blue square", "green"]
    assert gm.parse_choice("B", letters, options) == 1
    assert gm.parse_choice("(C) green", letters, options) == 2
    assert gm.parse_choice("A. red circle", letters, options) == 0
    assert gm.parse_choice("the blue square", letters, options) == 1  # by text, articles dropped
    assert gm.parse_choice("it is green", letters, options) == 2  # the one option it contains
    assert gm.parse_choice("Apple", letters, options) is None  # "A" not followed by a break
    assert gm.parse_choice("D", letters, options) is None  # not an option's letter
    assert gm.parse_choice("green or blue square", letters, options) is None  # names two


def test_bleu_against_hand_computed_values():
    # Hypothesis 8 words, reference 9: n-gram precisions 8/8, 6/7, 5/6, 4/5; brevity penalty
    # exp(1 - 9/8).
    hyp = "The quick brown fox jumps over the dog."
    scores = gm.caption_scores([hyp], [["the quick brown fox jumps over the lazy dog"]])
    bp = math.exp(1 - 9 / 8)
    assert scores["bleu_1"] == pytest.approx(bp, abs=1e-6)
    assert scores["bleu_2"] == pytest.approx(bp * (6 / 7) ** 0.5, abs=1e-6)
    assert scores["bleu_4"] == pytest.approx(bp * (6 / 7 * 5 / 6 * 4 / 5) ** 0.25, abs=1e-6)
    # Corpus BLEU over two images (counts summed; the closest reference length per image):
    # 1-grams 5/5 + 3/5, 2-grams 4/4 + 2/4, 3-grams 3/3 + 1/3, 4-grams 2/2 + 0/2; c = r = 10.
    scores = gm.caption_scores(["a red circle on top", "blue square at the left"],
                               [["a red circle on top", "one red circle"], ["green square at the right"]])
    assert scores["bleu_1"] == pytest.approx(0.8, abs=1e-6)
    assert scores["bleu_2"] == pytest.approx((0.8 * 0.75) ** 0.5, abs=1e-6)
    assert scores["bleu_3"] == pytest.approx((0.8 * 0.75 * 4 / 6) ** (1 / 3), abs=1e-6)
    assert scores["bleu_4"] == pytest.approx((0.8 * 0.75 * 4 / 6 * 0.5) ** 0.25, abs=1e-6)


def test_cider_of_perfect_and_unrelated_captions():
    refs = [["a red circle on top"], ["blue square at the left"]]
    # CIDEr-D: each n-gram order's cosine 1, no length penalty, times 10.
    assert gm.caption_scores(["A red circle, on top!", "blue square at the left"], refs)["cider"] == pytest.approx(10.0)
    assert gm.caption_scores(["green star", "yellow thing"], refs)["cider"] == 0.0
    mixed = gm.caption_scores(["a red circle on top", "green star"], refs)["cider"]
    assert mixed == pytest.approx(5.0)  # one perfect, one unrelated: the mean


def test_sampling_filters_and_params():
    from megatron_unihetero.generation.text import SamplingParams, filter_logits, pick

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: torch.isfinite(filter_logits(logits, p)).tolist()  # noqa: E731
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.8)) == [True, True, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.81)) == [True, True, True, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.1)) == [True, False, False, False]
    hot = filter_logits(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(hot, logits / 2)
    assert pick(logits, SamplingParams(), None) == 0  # greedy
    draws = [pick(logits, SamplingParams(temperature=1.0, top_k=2, seed=0),
                  torch.Generator().manual_seed(s)) for s in range(50)]
    assert set(draws) == {0, 1}
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_generation_refuses_a_pipeline_stage():
    from megatron_unihetero.generation.text import check_model

    class Stage:
        pre_process, post_process = True, False

    with pytest.raises(ValueError, match="PP=1"):
        check_model(Stage())


def test_generation_prompt_is_the_chat_up_to_answer():
    from megatron_unihetero.data import conversation

    segments = conversation.generation_prompt(conversation.question_messages(b"img", "what is it?"))
    assert segments == [("image", b"img"), ("text", "Question: what is it?", False), ("text", " Answer:", False)]
    full = conversation.render(conversation.qa_messages(b"img", "what is it?", "a cat"))
    assert full[:len(segments)] == segments  # the training document starts with the prompt
    with pytest.raises(conversation.ConversationError, match="ends with a user turn"):
        conversation.generation_prompt(conversation.qa_messages(b"img", "q", "a"))
