"""Our fast paths inside the model (the heads' fused losses, the MLP's SwiGLU kernel, the
decoder's plain batch-first path) equal their plain references: outputs, losses and gradients."""

import pytest
import torch

from megatron_unihetero.models.heads import SemanticHead, semantic_loss
from megatron_unihetero.testing import run_distributed_test

from tests.models import _parity_jobs as jobs


@pytest.mark.parametrize("head_kind", ["linear", "mlp"])
@pytest.mark.parametrize("kind", ["mse", "cosine", "smooth_l1"])
def test_fused_semantic_loss_matches_reference(head_kind, kind):
    torch.manual_seed(0)
    head = SemanticHead(16, 8, head_kind)
    hidden = torch.randn(12, 16)
    target = torch.randn(12, 8)
    grads = {}
    for impl in ("reference", "auto"):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        loss, count = semantic_loss(head, h, target, kind, impl=impl)
        loss.backward()
        grads[impl] = (loss.detach(), h.grad.clone(), [p.grad.clone() for p in head.parameters()])
        assert int(count) == 12
    ref, fused = grads["reference"], grads["auto"]
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_text_loss_matches_megatron_vocab_parallel_cross_entropy():
    run_distributed_test(jobs.text_loss_impls_job, 1)


@pytest.mark.parametrize("tp", [1, 2])
def test_mlp_swiglu_kernel_on_one_rank_equals_megatron(tp):
    run_distributed_test(jobs.swiglu_mlp_job, tp, tp)


@pytest.mark.parametrize("tp", [1, 2])
def test_plain_decoder_on_one_rank_equals_megatron_block(tp):
    run_distributed_test(jobs.plain_decoder_job, tp, tp)


@pytest.mark.requires_compiler
@pytest.mark.parametrize("tp", [1, 2])
def test_compiled_decoder_layers_equal_eager_layers(tp):
    run_distributed_test(jobs.compiled_decoder_job, tp, tp, timeout_s=600)
