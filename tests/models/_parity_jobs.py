"""Jobs for the TP/PP parity tests (module-level so spawned workers can import them)."""

import pytest
import torch
import torch.distributed as dist

from megatron_unihetero.models.config import LLMConfig, ModelConfig, SemanticGenConfig

IMAGE_TOKEN = 3
VOCAB = 256


def tiny_config(semantic_target="input_embedding", semantic_loss="mse", head="linear"):
    return ModelConfig(
        llm=LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=VOCAB, max_sequence_length=64,
                      attention_impl="reference"),
        semantic=SemanticGenConfig(weight=1.0, target=semantic_target, loss=semantic_loss,
                                   head=head, ema_decay=0.5),
        image_token_id=IMAGE_TOKEN,
    )


def make_batches(num_micro=2, batch=2, seq=48, tokens_per_image=16, seed=0):
    """Packed rows with two documents each; images at the start, middle and end of documents."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_micro):
        tokens = torch.randint(10, VOCAB, (batch, seq), generator=gen)
        segment_ids = torch.zeros(batch, seq, dtype=torch.int32)
        segment_ids[:, seq // 2:] = 1
        segment_ids[1, -3:] = -1  # padding at the end of row 1
        position_ids = torch.zeros(batch, seq, dtype=torch.long)
        for b in range(batch):
            for s in (0, 1):
                idx = (segment_ids[b] == s).nonzero().flatten()
                position_ids[b, idx] = torch.arange(len(idx))
        tokens[0, 0:tokens_per_image] = IMAGE_TOKEN  # image at the start of row 0, document 0
        tokens[1, 26:26 + tokens_per_image] = IMAGE_TOKEN  # image in the middle of row 1, doc 1
        labels = torch.roll(tokens, -1, 1)
        boundary = torch.ones_like(segment_ids, dtype=torch.bool)
        boundary[:, :-1] = segment_ids[:, 1:] != segment_ids[:, :-1]
        labels[boundary | (segment_ids < 0)] = -100
        images = torch.randn(2, 3, 32, 32, generator=gen)
        batches.append(dict(tokens=tokens, labels=labels, position_ids=position_ids,
                            segment_ids=segment_ids, images=images))
    return batches


def _run_step(model, cfg, batches):
    from megatron_unihetero.training.step import forward_backward

    return forward_backward(model, batches, weights={"text": 1.0, "semantic": cfg.semantic.weight},
                            image_token_id=cfg.image_token_id)


def reference_job(path, cfg):
    from megatron_unihetero import parallel

    parallel.initialize(1, 1, seed=7)
    model = parallel.build_model(cfg)
    summary = _run_step(model, cfg, make_batches())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"state": model.state_dict(), "summary": summary, "grads": grads}, path)
    parallel.destroy()


def parallel_job(path, cfg, tp, pp):
    from megatron.core import parallel_state

    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing.sharding import (
        shard_state_dict, shard_tensor, to_global_name)

    ref = torch.load(path, weights_only=True)
    parallel.initialize(tp, pp, seed=11)  # another seed: the weights must come from the reference
    model = parallel.build_model(cfg)
    layout = parallel.rank_layout(model)
    local = shard_state_dict(ref["state"], model.state_dict().keys(), layout)
    missing, unexpected = model.load_state_dict(local, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    parallel.sync_semantic_targets(model, ema=False)
    summary = _run_step(model, cfg, make_batches())

    if parallel_state.is_pipeline_last_stage():
        for key in ("text", "semantic", "loss"):
            assert abs(summary[key] - ref["summary"][key]) <= 1e-5 * abs(ref["summary"][key]), (
                key, summary[key], ref["summary"][key])
    checked = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        global_name = to_global_name(name, layout.layer_offset)
        expected = shard_tensor(global_name, ref["grads"][global_name], layout.tp_rank, layout.tp_size)
        err = (param.grad - expected).norm()
        assert err <= 1e-5 * expected.norm() + 1e-8, (name, float(err), float(expected.norm()))
        checked += 1
    assert checked > 0
    dist.barrier()
    parallel.destroy()


def save_sharded_job(ref_path, ckpt_model_dir, cfg, tp, pp):
    """Load the reference weights at (tp, pp) and save them in the checkpoint format."""
    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing.sharding import shard_state_dict

    ref = torch.load(ref_path, weights_only=True)
    parallel.initialize(tp, pp, seed=3)
    model = parallel.build_model(cfg)
    layout = parallel.rank_layout(model)
    model.load_state_dict(shard_state_dict(ref["state"], model.state_dict().keys(), layout), strict=False)
    parallel.save_model(model, ckpt_model_dir, cfg)
    parallel.destroy()


def load_resharded_job(ref_path, ckpt_model_dir, cfg, tp, pp):
    """Load a checkpoint saved at another layout; every tensor must equal the reference's shard."""
    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing.sharding import shard_state_dict

    ref = torch.load(ref_path, weights_only=True)
    parallel.initialize(tp, pp, seed=5)
    model = parallel.build_model(cfg)
    layout = parallel.rank_layout(model)
    parallel.load_model(model, ckpt_model_dir)
    expected = shard_state_dict(ref["state"], model.state_dict().keys(), layout)
    for name, tensor in model.state_dict().items():
        if name in expected:
            assert torch.equal(tensor, expected[name]), name
    dist.barrier()
    parallel.destroy()


def text_loss_impls_job():
    """The fused LM-head cross-entropy equals megatron's output layer + vocab-parallel CE."""
    from megatron.core import tensor_parallel

    from megatron_unihetero import parallel
    from megatron_unihetero.models.heads import text_loss
    from megatron_unihetero.models.llm import transformer_config

    parallel.initialize(1, 1, seed=0)
    cfg = tiny_config()
    tconfig = transformer_config(cfg.llm)
    layer = tensor_parallel.ColumnParallelLinear(cfg.llm.hidden_size, cfg.llm.vocab_size, config=tconfig,
                                                 init_method=tconfig.init_method, bias=False,
                                                 gather_output=False, skip_bias_add=True)
    hidden = torch.randn(40, cfg.llm.hidden_size)
    labels = torch.randint(0, VOCAB, (40,))
    labels[:5] = -100
    labels[5:9] = IMAGE_TOKEN
    results = {}
    for impl in ("megatron", "fused", "reference"):
        h = hidden.clone().requires_grad_(True)
        layer.weight.grad = None
        loss, count = text_loss(layer, h, labels, IMAGE_TOKEN, impl=impl)
        loss.backward()
        results[impl] = (loss.detach(), int(count), h.grad.clone(), layer.weight.grad.clone())
    ref = results["megatron"]
    assert ref[1] == 31
    for impl in ("fused", "reference"):
        loss, count, h_grad, w_grad = results[impl]
        assert count == ref[1]
        torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_grad, ref[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w_grad, ref[3], rtol=1e-5, atol=1e-6)
    parallel.destroy()


def too_long_job():
    import pytest

    from megatron_unihetero import parallel
    from megatron_unihetero.models.interleaver import InterleaveError

    parallel.initialize(1, 1, seed=0)
    cfg = tiny_config()
    model = parallel.build_model(cfg)
    seq = cfg.llm.max_sequence_length + 1
    tokens = torch.randint(10, VOCAB, (1, seq))
    with pytest.raises(InterleaveError, match=f"batch rows are {seq} tokens long"):
        model(tokens, torch.arange(seq)[None], labels=tokens)
    parallel.destroy()


def interleaved_job(path, cfg, pp, vpp, num_micro):
    """Interleaved 1F1B over virtual stages: the losses and gradients of PP=1."""
    from megatron.core import parallel_state

    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing.sharding import shard_state_dict, to_global_name
    from megatron_unihetero.training.step import forward_backward

    ref = torch.load(path, weights_only=True)
    parallel.initialize(1, pp, seed=11, vpp=vpp)
    chunks = parallel.build_model_chunks(cfg)
    for chunk in chunks:
        local = shard_state_dict(ref["state"], chunk.state_dict().keys(), parallel.rank_layout(chunk))
        chunk.load_state_dict(local, strict=False)
    parallel.sync_semantic_targets(chunks, ema=False)
    batches = make_batches()
    batches = (batches * num_micro)[:num_micro] if num_micro != len(batches) else batches
    summary = forward_backward(chunks, batches, weights={"text": 1.0, "semantic": cfg.semantic.weight},
                               image_token_id=cfg.image_token_id)
    if parallel_state.is_pipeline_last_stage():
        for key in ("text", "semantic", "loss"):
            assert abs(summary[key] - ref["summary"][key]) <= 1e-5 * abs(ref["summary"][key]), (
                key, summary[key], ref["summary"][key])
    checked = 0
    for chunk in chunks:
        offset = parallel.rank_layout(chunk).layer_offset
        for name, param in chunk.named_parameters():
            if param.grad is None:
                continue
            expected = ref["grads"][to_global_name(name, offset)]
            err = (param.grad - expected).norm()
            assert err <= 1e-5 * expected.norm() + 1e-8, (name, float(err))
            checked += 1
    assert checked > 0
    dist.barrier()
    parallel.destroy()


def swiglu_mlp_job(tp):
    """At TP=1 every layer's MLP takes kernels.swiglu_linear and equals megatron-core's MLP
    forward and backward on the same module; at TP>1 it is megatron-core's path."""
    from megatron.core.transformer.mlp import MLP as MegatronMLP

    from megatron_unihetero import parallel

    parallel.initialize(tp, 1, seed=0)
    model = parallel.build_model(tiny_config())
    layers = model.llm.decoder.layers
    assert len(layers) == 4 and all(layer.mlp.swiglu_on_one_rank == (tp == 1) for layer in layers)
    mlp = layers[0].mlp
    x = torch.randn(6, 2, 64, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(6, 2, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for forward in (type(mlp).forward, MegatronMLP.forward):
        inputs = x.clone().requires_grad_(True)
        mlp.zero_grad(set_to_none=True)
        out, bias = forward(mlp, inputs)
        assert bias is None
        out.backward(grad)
        results.append((out.detach(), inputs.grad, mlp.linear_fc1.weight.grad, mlp.linear_fc2.weight.grad))
    for name, ours, megatron in zip(("out", "grad x", "grad fc1", "grad fc2"), *results):
        torch.testing.assert_close(ours, megatron, rtol=1e-5, atol=1e-6, msg=name)
    parallel.destroy()


def compiled_decoder_job():
    """``apply_compile`` (train.compile: megatron-core's layers, torch.compiled from outside)
    computes what the eager layers compute, outputs and every gradient, over batches whose
    attention layouts differ (a dense mask with padding, plain causal, the documents gathered
    into a padded batch), and in evaluation (no grad)."""
    import importlib

    from megatron_unihetero import parallel

    # The module, not the function of the same name that kernels/__init__ exports.
    attention_module = importlib.import_module("megatron_unihetero.kernels.attention")
    parallel.initialize(1, 1, seed=0)
    eager = parallel.build_model(tiny_config()).llm
    compiled = parallel.build_model(tiny_config(), compile_layers=True).llm
    compiled.load_state_dict(eager.state_dict())
    gen = torch.Generator().manual_seed(0)
    s, b = 12, 2
    batches = [  # (segment ids, position ids)
        (torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [-1] * 3], dtype=torch.int32),
         torch.tensor([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3])),
        (torch.zeros(b, s, dtype=torch.int32), torch.arange(s).repeat(b, 1)),
        (torch.tensor([[0] * 4 + [1] * 4 + [2] * 4, [0] * 6 + [1] * 6], dtype=torch.int32),
         torch.tensor([list(range(4)) * 3, list(range(6)) * 2])),
    ]
    expected_plans = [attention_module.DenseMask, type(None), attention_module.DocumentBatch]
    for (segment_ids, position_ids), expected_plan in zip(batches, expected_plans):
        if expected_plan is attention_module.DocumentBatch:  # short rows never pay otherwise
            attention_module._documents_pay = lambda *args: True
        layout = attention_module.attention_layout(segment_ids, dtype=torch.float32,
                                                   device=torch.device("cpu"), impl="reference")
        assert isinstance(layout.plan, expected_plan)
        x = torch.randn(s, b, 64, generator=gen)
        grad = torch.randn(s, b, 64, generator=gen)
        results = []
        for llm in (compiled, eager):
            hidden = x.clone().requires_grad_(True)
            llm.zero_grad(set_to_none=True)
            out = llm(hidden, position_ids, segment_ids)
            out.backward(grad)
            with torch.no_grad():
                evaluated = llm(x, position_ids, segment_ids)
            results.append([out.detach(), evaluated, hidden.grad] + [p.grad for p in llm.decoder.parameters()])
        for index, (ours, reference) in enumerate(zip(*results)):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6, msg=f"tensor {index}")
    parallel.destroy()


def decoder_layout_once_job():
    """The decoder builds the batch's attention layout once per forward, for all its layers,
    and hands it down explicitly (no cache inside the kernel)."""
    from megatron_unihetero import parallel
    from megatron_unihetero.models import llm as llm_module

    parallel.initialize(1, 1, seed=0)
    model = parallel.build_model(tiny_config())
    calls = []
    real = llm_module.attention_layout

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    llm_module.attention_layout = counting
    try:
        batch = make_batches(num_micro=1)[0]
        model(**{k: batch[k] for k in ("tokens", "position_ids", "segment_ids", "labels", "images")})
    finally:
        llm_module.attention_layout = real
    assert len(model.llm.decoder.layers) == 4 and len(calls) == 1
    parallel.destroy()
