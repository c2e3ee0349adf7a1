"""Job for the memory-planner test (module-level so the spawned worker can import it)."""

import torch


def _saved_activation_bytes(layer, batch_call) -> int:
    """Bytes of the distinct storages one decoder layer's forward saves for its backward,
    parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def pre(module, args, kwargs):
        module._saved_hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        module._saved_hooks.__enter__()

    def post(module, args, kwargs, out):
        module._saved_hooks.__exit__(None, None, None)

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True),
               layer.register_forward_hook(post, with_kwargs=True)]
    batch_call()
    for handle in handles:
        handle.remove()
    return sum(seen.values())


def planner_job(paper_config):
    """The planner's per-layer activations against what a decoder layer of the model really
    saves (no recompute and selective), and its command line on the paper's config."""
    from megatron_unihetero import parallel, plan
    from megatron_unihetero.models.config import LLMConfig
    from megatron_unihetero.training.config import DataConfig, RunConfig, TrainConfig
    from tests.models import _parity_jobs as parity

    parallel.initialize(1, 1, seed=0)
    batch = parity.make_batches(num_micro=1, batch=2, seq=64)[0]
    batch["segment_ids"].zero_()  # one document per row: plain causal attention
    batch["position_ids"] = torch.arange(64).repeat(2, 1)
    for recompute in ("none", "selective"):
        model_cfg = parity.tiny_config()
        model_cfg.llm = LLMConfig(num_layers=2, hidden_size=256, num_attention_heads=4,
                                  num_query_groups=2, ffn_hidden_size=704, vocab_size=parity.VOCAB,
                                  max_sequence_length=64, attention_impl="reference")
        cfg = RunConfig(model=model_cfg, data=DataConfig(seq_length=64, micro_batch_size=2),
                        train=TrainConfig(dtype="fp32", recompute=recompute))
        model = parallel.build_model(model_cfg, memory=cfg.activation_memory())
        inputs = {k: batch[k] for k in ("tokens", "position_ids", "segment_ids", "labels", "images")}
        measured = _saved_activation_bytes(model.llm.decoder.layers[1], lambda: model(**inputs))
        planned, _ = plan.layer_activation_bytes(cfg, recompute)
        print(f"one layer, {recompute} recompute: planned {planned / 2**20:.2f} MB, saved "
              f"{measured / 2**20:.2f} MB")
        assert abs(planned - measured) <= 0.15 * measured, (recompute, planned, measured)

    # The command line on the paper's layout: one line per kind of rank, and the verdict.
    plans = plan.main(["--config", paper_config, "--world-size", "64", "--model.vision.path=null",
                       "--model.vision.hf_config={hidden_size: 1024, num_hidden_layers: 24, "
                       "num_attention_heads: 16, mlp_ratio: 4, image_size: 224, patch_size: 14}"])
    (rank,) = plans
    # Llama-2-7B (6.74 B) over TP=2 (norms replicated) plus DINOv2-L (0.30 B, replicated).
    assert 3.6e9 < rank.params < 3.8e9 and rank.params - rank.trainable > 3.0e8, rank
    parallel.destroy()
