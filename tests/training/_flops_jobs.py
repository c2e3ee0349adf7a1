"""Job for the FLOPs test (module-level so the spawned worker can import it)."""

import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.models import _parity_jobs as parity


def _sdpa_cpu_flops(q, k, v, dropout_p=0.0, is_causal=False, *, out_shape=None, **kwargs):
    """FlopCounterMode has no formula for the CPU SDPA kernel (it counts 0): torch's own SDPA
    count (two [s, s] matmuls per head, kv heads broadcast to the query heads), halved under
    is_causal, as the CPU flash kernel skips the key blocks past each query block's diagonal."""
    b, heads, s_q, d = q
    s_k = k[2]
    return 4 * b * heads * s_q * s_k * d // (2 if is_causal else 1)


def _sdpa_cpu_backward_flops(grad_out, q, k, v, out, logsumexp, dropout_p=0.0, is_causal=False, *,
                             out_shape=None, **kwargs):
    """torch's SDPA backward count: four [s, s] matmuls (dP, dQ, dK, dV), halved under causality."""
    return 2 * _sdpa_cpu_flops(q, k, v, is_causal=is_causal)


_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def _counter():
    return FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)


def flops_config():
    """The parity tests' tiny model with semantic generation and the hetero pixel head."""
    from megatron_unihetero.models.config import PixelGenConfig

    cfg = parity.tiny_config()
    cfg.pixel = PixelGenConfig(weight=1.0, routing="hetero", decoder_layers=1, decoder_heads=4,
                               denoiser_width=32, denoiser_depth=2, diffusion_batch_mul=2,
                               latent_source="batch", latent_channels=4)
    return cfg


def flop_count_job(report_path):
    """One training step (forward + backward) of the tiny model under FlopCounterMode vs
    training/flops.py; and the last stage's encoder copy (PP > 1) vs the encoder and projector
    forwards it adds. One document per row (the causal kernel then computes exactly the
    causal documents the formula counts) and the reference kernels (the model's arithmetic,
    not a fused kernel's schedule)."""
    os.environ["MEGATRON_UNIHETERO_KERNELS"] = "reference"
    from megatron_unihetero import parallel
    from megatron_unihetero.training.flops import flop_terms, step_flops
    from megatron_unihetero.training.step import forward_backward

    parallel.initialize(1, 1, seed=3)
    cfg = flops_config()
    model = parallel.build_model(cfg)
    batch = parity.make_batches(num_micro=1)[0]
    batch["segment_ids"].zero_()  # one document per row, no padding
    batch["position_ids"] = torch.arange(batch["tokens"].shape[1]).repeat(batch["tokens"].shape[0], 1)
    batch["labels"] = torch.roll(batch["tokens"], -1, 1)
    batch["labels"][:, -1] = -100
    batch["image_latents"] = torch.randn(2, 16, 4)
    weights = {"text": 1.0, "semantic": 1.0, "pixel": 1.0}
    with _counter() as counter:
        forward_backward(model, [batch], weights=weights, image_token_id=cfg.image_token_id)
    measured = counter.get_total_flops()
    formula = step_flops(cfg, batch, **flop_terms(cfg))

    # PP > 1: the last stage runs the encoder and the target projector (a mirror) once more.
    with _counter() as counter, torch.no_grad():
        model.projector(model.vision(batch["images"]))
    measured_copy = counter.get_total_flops()
    formula_copy = step_flops(cfg, batch, **flop_terms(cfg, pipeline_parallel=2)) - formula
    # Staged training: the LLM frozen with the projector training (its gradient goes back
    # through the LLM: input gradients only), and with only the heads training (the LLM
    # forward only).
    frozen = []
    for projector_frozen in (False, True):
        frozen_cfg = flops_config()
        frozen_cfg.freeze_llm, frozen_cfg.projector.frozen = True, projector_frozen
        frozen_model = parallel.build_model(frozen_cfg)
        with _counter() as counter:
            forward_backward(frozen_model, [batch], weights=weights, image_token_id=cfg.image_token_id)
        frozen += [counter.get_total_flops(), step_flops(frozen_cfg, batch, **flop_terms(frozen_cfg))]
    with open(report_path, "w") as handle:
        handle.write(" ".join(str(v) for v in [measured, formula, measured_copy, formula_copy, *frozen]) + "\n")
    parallel.destroy()
