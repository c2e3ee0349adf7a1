"""Jobs that need megatron's process groups (module-level so spawned workers can import them)."""

import torch

from megatron_unihetero.models.config import LLMConfig, ModelConfig, PixelGenConfig, SemanticGenConfig

IMAGE_TOKEN = 3
VOCAB = 128
TOKENS_PER_IMAGE = 16  # the default tiny Dinov2: 32px images, 8px patches, CLS dropped


def tiny_config(*, semantic_target="input_embedding", ema_decay=0.9, pixel_weight=0.0,
                routing="hetero", semantic_weight=1.0):
    return ModelConfig(
        llm=LLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      vocab_size=VOCAB, max_sequence_length=64, attention_impl="reference"),
        semantic=SemanticGenConfig(weight=semantic_weight, target=semantic_target,
                                   ema_decay=ema_decay),
        pixel=PixelGenConfig(weight=pixel_weight, routing=routing, decoder_layers=1,
                             decoder_heads=4, denoiser_width=32, denoiser_depth=2,
                             num_diffusion_steps=100, num_sampling_steps=5),
        image_token_id=IMAGE_TOKEN,
    )


def make_batch(seed=0, batch=2, seq=40):
    """Two rows, one image each (at the start of row 0, in the middle of row 1)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, VOCAB, (batch, seq), generator=gen)
    tokens[0, 1:1 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    tokens[1, 12:12 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    position_ids = torch.arange(seq)[None].expand(batch, seq).contiguous()
    images = torch.randn(2, 3, 32, 32, generator=gen)
    return dict(tokens=tokens, labels=labels, position_ids=position_ids, images=images)


def _llm_grad_norm(model):
    total = 0.0
    for name, param in model.named_parameters():
        if name.startswith(("llm.", "projector.")) and param.grad is not None:
            total += float(param.grad.norm()) ** 2
    return total ** 0.5


def _unzero(module):
    """adaLN-Zero starts the denoiser's output at exactly zero, which blocks every gradient
    upstream of its output layer; one optimizer step would lift that, random values do here."""
    with torch.no_grad():
        for param in module.parameters():
            if not param.abs().sum():
                param.normal_(0.0, 0.1)


def routing_job():
    """hetero: the pixel loss alone sends no gradient to the LLM (nor the projector); shared does."""
    from megatron_unihetero import parallel

    parallel.initialize(1, 1, seed=3)
    for routing in ("hetero", "shared"):
        model = parallel.build_model(tiny_config(pixel_weight=1.0, routing=routing))
        _unzero(model.pixel_head)
        out = model(**make_batch())
        assert set(out.objectives) == {"text", "semantic", "pixel"}, out.objectives.keys()
        assert set(out.stats) == {"semantic", "pixel", "embedding"}, out.stats.keys()
        loss_sum, count = out.objectives["pixel"]
        assert int(count) == 2 * TOKENS_PER_IMAGE, count  # every image token has a predecessor
        assert torch.isfinite(loss_sum) and float(loss_sum) > 0
        loss_sum.backward()
        head_grad = sum(float(p.grad.detach().norm()) for p in model.pixel_head.parameters() if p.grad is not None)
        assert head_grad > 0, routing
        llm_grad = _llm_grad_norm(model)
        if routing == "hetero":
            assert llm_grad == 0.0, llm_grad
            assert model.pixel_head.decoder.layers[0].linear1.weight.grad.norm() > 0
        else:
            assert llm_grad > 0.0, llm_grad
    # Through the training step: the pixel objective is normalised by its own token count.
    from megatron_unihetero.training.step import forward_backward

    batch = make_batch()
    torch.manual_seed(21)
    with torch.no_grad():
        loss_sum, count = model(**batch).objectives["pixel"]
    torch.manual_seed(21)  # the same noise draws in the step's forward
    summary = forward_backward(model, [batch], weights={"text": 1.0, "semantic": 1.0, "pixel": 0.5},
                               image_token_id=IMAGE_TOKEN, forward_only=True)
    assert summary.counts["pixel"] == int(count) == 2 * TOKENS_PER_IMAGE
    summary = summary.figures()
    assert abs(summary["pixel"] - float(loss_sum) / float(count)) < 1e-5 * float(loss_sum), summary
    expected = summary["text"] + summary["semantic"] + 0.5 * summary["pixel"]
    assert abs(summary["loss"] - expected) < 1e-5, summary
    # The pixel-only arm (no semantic head): no vision encoder on the last stage is needed.
    model = parallel.build_model(tiny_config(pixel_weight=1.0, routing="shared", semantic_weight=0.0))
    assert model.semantic_head is None
    out = model(**make_batch())
    assert set(out.objectives) == {"text", "pixel"}, out.objectives.keys()
    assert set(out.stats) == {"pixel", "embedding"}, out.stats.keys()
    assert int(out.objectives["pixel"][1]) == 2 * TOKENS_PER_IMAGE
    parallel.destroy()


def ema_job():
    """sync_semantic_targets moves the EMA projector: ema = decay * ema + (1 - decay) * projector."""
    from megatron_unihetero import parallel

    parallel.initialize(1, 1, seed=5)
    decay = 0.9
    model = parallel.build_model(tiny_config(semantic_target="ema_input_embedding", ema_decay=decay))
    pairs = list(zip(model.target_projector.parameters(), model.projector.parameters()))
    for target, source in pairs:  # building resets the EMA copy to the projector
        torch.testing.assert_close(target, source, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.target_projector.parameters())
    old = [t.detach().clone() for t, _ in pairs]
    with torch.no_grad():
        for _, source in pairs:
            source.add_(torch.randn_like(source))
    parallel.sync_semantic_targets(model)
    for (target, source), before in zip(pairs, old):
        expected = decay * before + (1 - decay) * source.detach()
        torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(target, source)
    # The loss reads its targets from the EMA copy, not from the projector.
    batch = make_batch()
    features = model.vision(batch["images"])
    torch.testing.assert_close(model.semantic_targets(features, model.projector(features)),
                               model.target_projector(features))
    parallel.destroy()


def _text_samples():
    from megatron_unihetero.eval.runners import TextSample

    gen = torch.Generator().manual_seed(4)
    samples = []
    for length in (24, 30):
        tokens = torch.randint(10, VOCAB, (length,), generator=gen)
        tokens[2:2 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
        mask = torch.zeros(length, dtype=torch.bool)
        mask[2 + TOKENS_PER_IMAGE:] = True
        samples.append(TextSample(images=torch.randn(1, 3, 32, 32, generator=gen),
                                  tokens=tokens.tolist(), target_mask=mask.tolist()))
    return samples


class _Fixed(torch.nn.Module):
    """A stand-in semantic head that returns fixed predictions."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, hidden):
        assert hidden.shape[0] == self.value.shape[0]
        return self.value


def runners_job():
    """The runners agree with the model's own loss, ignore padding, and index retrieval right."""
    from megatron_unihetero import parallel
    from megatron_unihetero.eval import runners
    from megatron_unihetero.eval.runners import QuestionSample
    from megatron_unihetero.models import interleaver

    parallel.initialize(1, 1, seed=13)
    model = parallel.build_model(tiny_config())
    model.eval()
    samples = _text_samples()
    batched = runners.sequence_logprobs(model, samples)
    for i, sample in enumerate(samples):
        alone = runners.sequence_logprobs(model, [sample])
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)  # padding is inert
        # Summed log-probs = minus the text loss over the same targets.
        tokens = torch.tensor(sample.tokens)[None]
        labels = torch.full_like(tokens, -100)
        mask = torch.tensor(sample.target_mask)
        labels[0, :-1] = torch.where(mask[1:], tokens[0, 1:], torch.tensor(-100))
        with torch.no_grad():
            out = model(tokens, torch.arange(tokens.shape[1])[None], labels=labels,
                        images=sample.images)
        torch.testing.assert_close(float(alone[0]), -float(out.objectives["text"][0]), rtol=1e-5, atol=1e-4)

    scores = batched.tolist()
    best, worst = max(range(2), key=lambda i: scores[i]), min(range(2), key=lambda i: scores[i])
    assert runners.answer_accuracy(model, [QuestionSample(samples, best)])["accuracy"] == 1.0
    assert runners.answer_accuracy(model, [QuestionSample(samples, worst)])["accuracy"] == 0.0

    result = runners.caption_perplexity(model, samples)
    count = sum(sum(s.target_mask[1:]) for s in samples)
    assert result["num_tokens"] == count
    torch.testing.assert_close(result["nll_per_token"], -float(batched.sum()) / count)

    means = runners.visual_hidden_means(model, samples)
    assert means.shape == (2, 32)

    # Retrieval with an oracle head (returns the true next targets) is perfect; one that returns
    # the target of the position itself (off by one) essentially never is.
    sample = samples[0]
    tokens = torch.tensor(sample.tokens)[None]
    layout = model._layout(tokens, None, 1)
    features = model.vision(sample.images)
    truth = interleaver.semantic_targets(model.semantic_targets(features, model.projector(features)), layout)
    real_head = model.semantic_head
    model.semantic_head = _Fixed(truth)
    oracle = runners.semantic_retrieval(model, [sample])
    assert oracle["top1"] == 1.0 and oracle["num_predictions"] == TOKENS_PER_IMAGE, oracle
    assert abs(oracle["chance"] - 1.0 / TOKENS_PER_IMAGE) < 1e-9
    assert oracle["top5"] == 1.0 and abs(oracle["chance_top5"] - 5.0 / TOKENS_PER_IMAGE) < 1e-9
    assert abs(oracle["r2"] - 1.0) < 1e-9 and abs(oracle["cos"] - 1.0) < 1e-6, oracle
    shifted = torch.cat([truth[1:], truth[:1]])
    model.semantic_head = _Fixed(shifted)
    assert runners.semantic_retrieval(model, [sample])["top1"] == 0.0
    # The mean of the held-out targets: R² 0 and its cosine equals the baseline's (high: the
    # cosine alone is fooled); one fixed ranking of the candidates, each the truth once: chance.
    model.semantic_head = _Fixed(truth.mean(0, keepdim=True).expand_as(truth))
    mean = runners.semantic_retrieval(model, [sample])
    assert abs(mean["r2"]) < 1e-5 and abs(mean["cos"] - mean["baseline_cos"]) < 1e-5, mean
    assert mean["top1"] == mean["chance"] and mean["top5"] == mean["chance_top5"], mean
    model.semantic_head = real_head
    real = runners.semantic_retrieval(model, samples)
    assert 0.0 <= real["top1"] <= 1.0 and real["num_predictions"] == 2 * TOKENS_PER_IMAGE
    parallel.destroy()


def generation_job():
    """Generation with megatron-core's KV cache equals full recompute at every step, token for
    token: greedy and sampled (top-k / top-p, one seed), with an image and text only; the
    cache's step logits equal the full forward's; misuse is refused by name."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_unihetero import parallel
    from megatron_unihetero.generation.text import SamplingParams, generate

    parallel.initialize(1, 1, seed=29)
    model = parallel.build_model(tiny_config()).eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 32, 32, generator=gen)
    with_image = [1, 5, 6] + [IMAGE_TOKEN] * TOKENS_PER_IMAGE + [7, 8, 9]
    text_only = [1, 40, 41, 42]
    runs = [(with_image, image, SamplingParams(max_new_tokens=16)),
            (text_only, None, SamplingParams(max_new_tokens=16)),
            (with_image, image, SamplingParams(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.9, seed=4)),
            (text_only, None, SamplingParams(max_new_tokens=16, temperature=0.7, seed=5))]
    for prompt, images, params in runs:
        cached = generate(model, prompt, images, eos_id=2, params=params)
        full = generate(model, prompt, images, eos_id=2, params=params, use_cache=False)
        assert cached.tokens == full.tokens, (params, cached.tokens, full.tokens)
        assert len(set(cached.tokens)) > 1 and IMAGE_TOKEN not in cached.tokens, cached.tokens
    # The hidden states of prefill + one-token steps equal one forward over the whole sequence.
    tokens = torch.tensor([with_image + [10, 11, 12]])
    n = len(with_image)
    with torch.no_grad():
        whole = model(tokens, torch.arange(tokens.shape[1])[None], images=image)
        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=tokens.shape[1])
        parts = [model(tokens[:, :n], torch.arange(n)[None], images=image, inference_context=context)]
        context.increment_sequence_len_offset(n)
        for i in range(3):
            parts.append(model(tokens[:, n + i:n + i + 1], torch.tensor([[n + i]]), inference_context=context))
            context.increment_sequence_len_offset(1)
        torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)
        # Position ids that do not continue the cache are refused.
        try:
            model(tokens[:, :1], torch.tensor([[0]]), inference_context=context)
        except ValueError as exc:
            assert "continue the cache" in str(exc), exc
        else:
            raise AssertionError("a step at the wrong position was accepted")
    try:
        generate(model, [1] * 64, None, eos_id=2)
    except ValueError as exc:
        assert "max_sequence_length" in str(exc), exc
    else:
        raise AssertionError("a prompt longer than the model was accepted")
    parallel.destroy()


def evaluate_cli_job(workdir, tokenizer_path):
    """Save a checkpoint the way training does, then run the evaluate CLI on demo data."""
    import json
    import os

    from megatron_unihetero import evaluate, parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.config_io import save_config
    from megatron_unihetero.data.demo_world import write_demo_data
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.training.config import DataConfig, RunConfig

    tokenizer = build_tokenizer(tokenizer_path)
    model_cfg = tiny_config()
    model_cfg.llm.vocab_size = tokenizer.vocab_size
    model_cfg.image_token_id = tokenizer.image_token_id
    model_cfg.llm.max_sequence_length = 128  # a TSV question with its options listed (--generate)
    run_cfg = RunConfig(model=model_cfg, data=DataConfig(tokenizer=tokenizer_path))
    data_dir = os.path.join(workdir, "data")
    write_demo_data(data_dir, 24, seed=5, image_size=32, valid_fraction=0.5)

    parallel.initialize(1, 1, seed=17)
    model = parallel.build_model(model_cfg)
    iteration = os.path.join(workdir, "ckpt", "iter_0000003")
    dist_ckpt.save_weights([model], iteration)
    save_config(run_cfg, os.path.join(iteration, "config.yaml"))
    with open(os.path.join(workdir, "ckpt", "latest"), "w") as handle:
        handle.write("iter_0000003\n")
    parallel.destroy()

    output = os.path.join(workdir, "metrics.json")
    assert evaluate.main(["--load", os.path.join(workdir, "ckpt"), "--data", data_dir,
                          "--max-samples", "12", "--output", output]) == 0
    with open(output) as handle:
        results = json.load(handle)
    assert results["num_samples"] == 12
    assert 0.0 <= results["answer_accuracy"] <= 1.0
    assert results["caption_perplexity"] > 1.0 and results["caption_num_tokens"] > 0
    assert set(results["probes"]) == {"shape", "colour", "position", "size"}
    assert results["semantic_retrieval"]["num_predictions"] == 12 * TOKENS_PER_IMAGE

    # --generate adds the generative figures and leaves the others as they were.
    generated = os.path.join(workdir, "metrics_generate.json")
    assert evaluate.main(["--load", os.path.join(workdir, "ckpt"), "--data", data_dir,
                          "--max-samples", "4", "--output", generated, "--generate",
                          "--max-new-tokens", "6"]) == 0
    with open(generated) as handle:
        gen_results = json.load(handle)
    figures = gen_results.pop("generation")
    plain_output = os.path.join(workdir, "metrics_plain.json")
    assert evaluate.main(["--load", os.path.join(workdir, "ckpt"), "--data", data_dir,
                          "--max-samples", "4", "--output", plain_output]) == 0
    with open(plain_output) as handle:
        plain = json.load(handle)
    assert gen_results == plain
    assert set(figures["qa"]) == {"exact_match", "vqa_accuracy", "anls", "num_questions"}
    assert figures["qa"]["num_questions"] == 4 and 0.0 <= figures["qa"]["anls"] <= 1.0
    assert {"bleu_1", "bleu_4", "cider"} <= set(figures["caption"]) and figures["caption"]["num_captions"] == 4
    assert 0 < figures["generated_tokens"] <= 8 * 6 and figures["tokens_per_s"] > 0
    assert figures["settings"]["temperature"] == 0.0 and len(figures["examples"]) == 6

    # A VLMEvalKit TSV: the option the generated answer names, sampled.
    import base64
    import csv
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="PNG")
    tsv = os.path.join(workdir, "mc.tsv")
    with open(tsv, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "image", "question", "A", "B", "answer"])
        writer.writerow(["1", base64.b64encode(buffer.getvalue()).decode(), "colour?", "red", "blue", "A"])
        writer.writerow(["2", "1", "dark?", "yes", "no", "B"])
    choice = os.path.join(workdir, "metrics_tsv.json")
    assert evaluate.main(["--load", os.path.join(workdir, "ckpt"), "--data", tsv, "--output", choice,
                          "--generate", "--max-new-tokens", "3", "--temperature", "0.8", "--top-p", "0.9"]) == 0
    with open(choice) as handle:
        figures = json.load(handle)["generation"]
    assert figures["choice"]["num_questions"] == 2 and 0.0 <= figures["choice"]["accuracy"] <= 1.0
    assert figures["skipped_long_prompts"] == 0 and "qa" not in figures and "caption" not in figures


def diagnostics_job():
    """The diagnostics' statistics through the model and the step: detached, outside the loss
    and its gradients, and exact for any micro-batch split."""
    from megatron_unihetero import parallel
    from megatron_unihetero.training.step import forward_backward

    parallel.initialize(1, 1, seed=23)
    model = parallel.build_model(tiny_config())
    batch = make_batch(seed=3)
    out = model(**batch)
    assert set(out.stats) == {"semantic", "embedding"}, out.stats.keys()
    assert not any(v.requires_grad for v in out.stats.values())
    # The gradients of the step are those of the objectives alone.
    weights = {"text": 1.0, "semantic": 1.0}
    text, sem = out.objectives["text"], out.objectives["semantic"]
    (text[0] / text[1] + sem[0] / sem[1]).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    whole = forward_backward(model, [batch], weights=weights, image_token_id=IMAGE_TOKEN)
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7)
    model.zero_grad()
    rows = [{k: v[i:i + 1] for k, v in batch.items() if k != "images"} for i in range(2)]
    for i, row in enumerate(rows):
        row["images"] = batch["images"][i:i + 1]  # row i holds image i
    split = forward_backward(model, rows, weights=weights, image_token_id=IMAGE_TOKEN, forward_only=True)
    a, b = whole.figures(), split.figures()
    for key in ("semantic_r2", "semantic_cos", "semantic_baseline_cos", "semantic_baseline_mse",
                "semantic_pred_var", "embed_norm_visual", "embed_norm_text"):
        assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert a["semantic_r2"] < 1.0 and a["embed_norm_visual"] > 0 and a["embed_norm_text"] > 0
    # R² over the step is not the mean of the micro-batches' R².
    per_row = [forward_backward(model, [r], weights=weights, image_token_id=IMAGE_TOKEN,
                                forward_only=True).figures()["semantic_r2"] for r in rows]
    assert abs(sum(per_row) / 2 - a["semantic_r2"]) > 1e-4, (per_row, a["semantic_r2"])
    # The pixel statistics: present with the pixel head; the baseline depends on the data only.
    model = parallel.build_model(tiny_config(pixel_weight=1.0))
    p_whole = forward_backward(model, [batch], weights={"text": 1.0, "pixel": 1.0},
                               image_token_id=IMAGE_TOKEN, forward_only=True).figures()
    p_split = forward_backward(model, rows, weights={"text": 1.0, "pixel": 1.0},
                               image_token_id=IMAGE_TOKEN, forward_only=True).figures()
    assert abs(p_whole["pixel_baseline"] - p_split["pixel_baseline"]) < 1e-6 * p_whole["pixel_baseline"]
    assert 0.0 < p_whole["pixel_baseline"] < 1.0 and p_whole["pixel_baseline_zero"] == 1.0
    assert abs(p_whole["pixel_loss_mean"] - p_whole["pixel"]) < 1e-5 * p_whole["pixel"]
    parallel.destroy()


def all_model_jobs(result_path, workdir, tokenizer_path):
    """Run every job in one spawned process (megatron's import costs ~20 s per process) and
    record each one's traceback, so each test reports its own failure."""
    import json
    import os
    import traceback

    jobs = {"routing": routing_job, "ema": ema_job,
            "runners": runners_job, "diagnostics": diagnostics_job, "generation": generation_job,
            "evaluate_cli": lambda: evaluate_cli_job(workdir, tokenizer_path)}
    results = {}
    for name, job in jobs.items():
        try:
            job()
            results[name] = None
        except BaseException:  # record and go on: the other jobs still run
            results[name] = traceback.format_exc()
            from megatron_unihetero import parallel
            parallel.destroy()
    with open(result_path, "w") as handle:
        json.dump(results, handle)
