"""Jobs for the TP/PP parity tests (module-level so spawned workers can import them)."""

import pytest
import torch
import torch.distributed as dist

from megatron_unihetero.models.config import LLMConfig, ModelConfig, SemanticGenConfig
from megatron_unihetero.testing.sharding import rank_layout

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
                            image_token_id=cfg.image_token_id).figures()


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
    from megatron_unihetero.testing.sharding import (
        shard_state_dict, shard_tensor, to_global_name)

    ref = torch.load(path, weights_only=True)
    parallel.initialize(tp, pp, seed=11)  # another seed: the weights must come from the reference
    model = parallel.build_model(cfg)
    layout = rank_layout(model)
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


def save_sharded_job(ref_path, iter_dir, cfg, tp, pp):
    """Load the reference weights at (tp, pp) and save them in the checkpoint format."""
    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.testing.sharding import shard_state_dict

    ref = torch.load(ref_path, weights_only=True)
    parallel.initialize(tp, pp, seed=3)
    model = parallel.build_model(cfg)
    layout = rank_layout(model)
    model.load_state_dict(shard_state_dict(ref["state"], model.state_dict().keys(), layout), strict=False)
    dist_ckpt.save_weights([model], iter_dir)
    parallel.destroy()


def load_resharded_job(ref_path, iter_dir, cfg, tp, pp):
    """Load a checkpoint saved at another layout; every tensor must equal the reference's shard."""
    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.testing.sharding import shard_state_dict

    ref = torch.load(ref_path, weights_only=True)
    parallel.initialize(tp, pp, seed=5)
    model = parallel.build_model(cfg)
    layout = rank_layout(model)
    dist_ckpt.load_model([model], dist_ckpt.dist_dir(iter_dir))
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
    from megatron_unihetero.testing.sharding import shard_state_dict, to_global_name
    from megatron_unihetero.training.step import forward_backward

    ref = torch.load(path, weights_only=True)
    parallel.initialize(1, pp, seed=11, vpp=vpp)
    chunks = parallel.build_model_chunks(cfg)
    for chunk in chunks:
        local = shard_state_dict(ref["state"], chunk.state_dict().keys(), rank_layout(chunk))
        chunk.load_state_dict(local, strict=False)
    parallel.sync_semantic_targets(chunks, ema=False)
    batches = make_batches()
    batches = (batches * num_micro)[:num_micro] if num_micro != len(batches) else batches
    summary = forward_backward(chunks, batches, weights={"text": 1.0, "semantic": cfg.semantic.weight},
                               image_token_id=cfg.image_token_id).figures()
    if parallel_state.is_pipeline_last_stage():
        for key in ("text", "semantic", "loss"):
            assert abs(summary[key] - ref["summary"][key]) <= 1e-5 * abs(ref["summary"][key]), (
                key, summary[key], ref["summary"][key])
    checked = 0
    for chunk in chunks:
        offset = rank_layout(chunk).layer_offset
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


# -- activation memory (recompute, sequence parallelism) and the DDP overlap ------------------

MEMORY_VARIANTS = {  # name: train.recompute* and parallel.sequence_parallel settings
    "plain": dict(),
    "selective": dict(recompute="selective"),  # megatron's default: core_attn
    # (layernorm recompute needs TransformerEngine in megatron-core 0.16: training/config.py)
    "selective_mlp": dict(recompute="selective", recompute_modules=("core_attn", "mlp")),
    "full_uniform": dict(recompute="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block": dict(recompute="full", recompute_method="block", recompute_num_layers=1),
    "sp": dict(sequence_parallel=True),
    "sp_selective": dict(sequence_parallel=True, recompute="selective"),
    "sp_full": dict(sequence_parallel=True, recompute="full", recompute_num_layers=1),
}


def _memory_engine(model, cfg, overlap_grad_reduce=False, distributed=True):
    from megatron_unihetero.training.config import ParallelConfig, RunConfig, TrainConfig
    from megatron_unihetero.training.engine_megatron import MegatronEngine

    run = RunConfig(model=cfg, parallel=ParallelConfig(distributed_optimizer=distributed,
                                                       overlap_grad_reduce=overlap_grad_reduce),
                    # No clipping: it would scale main_grad in place before the check.
                    train=TrainConfig(lr=1e-3, warmup_steps=0, clip_grad=0.0, dtype="fp32"))
    return MegatronEngine(model, run)


class _Counter:
    """Counts calls of a module's forward (as a forward pre-hook) and records input shapes."""

    def __init__(self):
        self.calls, self.shapes = 0, []

    def __call__(self, module, args, kwargs):
        self.calls += 1
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if torch.is_tensor(hidden):
            self.shapes.append(tuple(hidden.shape))


def _memory_variant_step(ref, cfg, name):
    """One engine step of ``MEMORY_VARIANTS[name]`` from the reference weights at this TP:
    (summary, {global name: main_grad}, {what: forward calls}, layer-input shapes, model).""" 
    from megatron_unihetero import parallel
    from megatron_unihetero.testing.sharding import shard_state_dict, to_global_name
    from megatron_unihetero.training.config import ParallelConfig, RunConfig, TrainConfig

    train = dict(MEMORY_VARIANTS[name])
    sequence_parallel = train.pop("sequence_parallel", False)
    train["recompute_modules"] = list(train.get("recompute_modules", ("core_attn",)))
    run = RunConfig(train=TrainConfig(**train), parallel=ParallelConfig(sequence_parallel=sequence_parallel))
    model = parallel.build_model(cfg, memory=run.activation_memory())
    layout = rank_layout(model)
    model.load_state_dict(shard_state_dict(ref["state"], model.state_dict().keys(), layout), strict=False)
    parallel.sync_semantic_targets(model, ema=False)
    layers = model.llm.decoder.layers
    counters = {what: _Counter() for what in ("attention", "layer0", "mlp0", "norm0")}
    hooks = [layer.self_attention.core_attention.register_forward_pre_hook(
        counters["attention"], with_kwargs=True) for layer in layers]
    for what, module in (("layer0", layers[0]), ("mlp0", layers[0].mlp),
                         ("norm0", layers[0].input_layernorm)):
        hooks.append(module.register_forward_pre_hook(counters[what], with_kwargs=True))
    engine = _memory_engine(model, cfg)
    summary = engine.train_step(make_batches(), {"text": 1.0, "semantic": cfg.semantic.weight}).figures()
    for hook in hooks:
        hook.remove()
    grads = {to_global_name(n, layout.layer_offset): p.main_grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    calls = {what: counter.calls for what, counter in counters.items()}
    return summary, grads, calls, counters["layer0"].shapes, model


def _expected_calls(settings: dict, num_layers: int, num_micro: int) -> dict:
    """Forward calls per step: once per micro-batch, again in the backward where recomputed."""
    recompute = settings.get("recompute", "none")
    modules = settings.get("recompute_modules", ("core_attn",)) if recompute == "selective" else ()
    full = recompute == "full"
    if full and settings.get("recompute_method", "uniform") == "block":
        recomputed_layers = settings["recompute_num_layers"]  # the first layers of the stage
    else:
        recomputed_layers = num_layers if (full or "core_attn" in modules) else 0
    return dict(attention=num_micro * (num_layers + recomputed_layers),
                layer0=num_micro * (2 if full else 1),  # layer 0 is recomputed by every full setting
                mlp0=num_micro * (2 if full or "mlp" in modules else 1),
                norm0=num_micro * (2 if full or "layernorm" in modules else 1))


def memory_parity_job(path, cfg):
    """On 2 ranks. TP=2: megatron-core's recompute (selective: core attention, also MLP and
    norms; full: uniform and block) and sequence parallelism (alone and with recompute) give
    the losses and the finalised gradients (main_grad, after the engine's grad sync) of the
    plain TP=2 run, which gives the TP=1 reference's; and each setting does what it says
    (recomputed forwards counted, the decoder's input split along the sequence, the norms
    marked for megatron's TP all-reduce). Then DP=2: ``parallel.overlap_grad_reduce`` reduces
    in the backward and gives the same losses and gradients."""
    from megatron.core import parallel_state

    from megatron_unihetero import parallel
    from megatron_unihetero.testing.sharding import shard_tensor

    ref = torch.load(path, weights_only=True)
    parallel.initialize(2, 1, seed=11)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    num_micro, seq, batch, num_layers = 2, 48, 2, cfg.llm.num_layers
    results = {name: _memory_variant_step(ref, cfg, name) for name in MEMORY_VARIANTS}
    plain_summary, plain_grads = results["plain"][:2]
    for key in ("text", "semantic", "loss"):
        assert abs(plain_summary[key] - ref["summary"][key]) <= 1e-5 * abs(ref["summary"][key]), key
    for name, expected in plain_grads.items():
        reference = shard_tensor(name, ref["grads"][name], tp_rank, 2)
        assert (expected - reference).norm() <= 1e-5 * reference.norm() + 1e-8, name

    for name, (summary, grads, calls, shapes, model) in results.items():
        for key in ("text", "semantic", "loss"):
            assert abs(summary[key] - plain_summary[key]) <= 1e-6 * abs(plain_summary[key]), (
                name, key, summary[key], plain_summary[key])
        assert grads.keys() == plain_grads.keys()
        for param, grad in grads.items():
            expected = plain_grads[param]
            err = (grad - expected).norm()
            assert err <= 1e-5 * expected.norm() + 1e-8, (name, param, float(err), float(expected.norm()))
        settings = MEMORY_VARIANTS[name]
        assert calls == _expected_calls(settings, num_layers, num_micro), (name, calls)
        sequence = seq // 2 if settings.get("sequence_parallel") else seq
        assert shapes and all(shape == (sequence, batch, cfg.llm.hidden_size) for shape in shapes), (
            name, shapes)
        norms = [p for n, p in model.llm.named_parameters() if n.endswith("layernorm.weight")]
        assert len(norms) == 2 * num_layers + 1
        assert all(p.sequence_parallel == bool(settings.get("sequence_parallel")) for p in norms)

    tp2_params = sum(p.numel() for p in results["plain"][-1].parameters())
    tp2_trainable = sum(p.numel() for p in results["plain"][-1].parameters() if p.requires_grad)

    # DP=2: overlap_grad_reduce, every DP rank its own data, two steps (golden counts, then
    # the buckets reduce in the backward of the last micro-batch).
    parallel.initialize(1, 1, seed=11)
    # The memory planner's parameter count of one TP=2 rank, from its meta build at TP=1 and
    # megatron-core's tensor-parallel marks, is what a TP=2 rank holds.
    from megatron_unihetero import plan
    from megatron_unihetero.training.config import ParallelConfig, RunConfig

    planned = plan.count_parameters(RunConfig(model=cfg, parallel=ParallelConfig(tensor_parallel=2)),
                                    pre_process=True, post_process=True)
    assert planned == (tp2_params, tp2_trainable), (planned, tp2_params, tp2_trainable)
    dp_rank = parallel_state.get_data_parallel_rank()
    weights = {"text": 1.0, "semantic": cfg.semantic.weight}
    runs = {}
    for overlap in (False, True):
        model = parallel.build_model(cfg)
        model.load_state_dict(ref["state"], strict=False)
        parallel.sync_semantic_targets(model, ema=False)
        engine = _memory_engine(model, cfg, overlap_grad_reduce=overlap)
        wrapped = engine.wrapped[0]
        launched = []
        real_finish = wrapped.finish_grad_sync

        def finish(*args, real_finish=real_finish, wrapped=wrapped, **kwargs):
            launched.append([group.grad_reduce_handle is not None for group in wrapped.bucket_groups])
            return real_finish(*args, **kwargs)

        wrapped.finish_grad_sync = finish
        steps = []
        for step in range(2):
            summary = engine.train_step(make_batches(seed=100 * step + dp_rank), weights).figures()
            grads = [p.main_grad.detach().clone() for p in model.parameters() if p.requires_grad]
            steps.append((summary, grads))
        runs[overlap] = steps, launched
    (plain_steps, plain_launched), (overlap_steps, overlap_launched) = runs[False], runs[True]
    assert not any(flag for flags in plain_launched for flag in flags)
    # Step 1 records which gradients each bucket waits for; from step 2 on the reduction is
    # already in flight when the backward ends.
    assert not any(overlap_launched[0]) and all(overlap_launched[1]), overlap_launched
    for (a, grads_a), (b, grads_b) in zip(plain_steps, overlap_steps):
        for key in ("text", "semantic", "loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a[key], b[key])
        for ga, gb in zip(grads_a, grads_b):
            assert torch.equal(ga, gb)
    dist.barrier()
    parallel.destroy()
