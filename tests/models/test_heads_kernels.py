"""Our fast paths inside the model (the heads' fused losses, the MLP's SwiGLU kernel, the
decoder's plain batch-first path) equal their plain references: outputs, losses and gradients."""

import pytest
import torch

from megatron_unihetero.kernels import regression
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
        (loss, count), _ = semantic_loss(head, h, target, kind, impl=impl)
        loss.backward()
        grads[impl] = (loss.detach(), h.grad.clone(), [p.grad.clone() for p in head.parameters()])
        assert int(count) == 12
    ref, fused = grads["reference"], grads["auto"]
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_kind", ["linear", "mlp"])
def test_semantic_loss_runs_the_kernel_on_the_head(head_kind, monkeypatch):
    """impl="reference" is the kernel's reference on head(hidden); the fused path gets the
    head's features (gelu(fc1(h)) for the mlp head) and its last linear layer."""
    head = SemanticHead(16, 8, head_kind)
    hidden, target = torch.randn(4, 16), torch.randn(4, 8)
    seen = []

    def spy(name):
        impl = regression._IMPLS[name]
        return lambda *args: seen.append((name, args[0])) or impl(*args)

    for name in ("reference", "fused"):
        monkeypatch.setitem(regression._IMPLS, name, spy(name))
    semantic_loss(head, hidden, target, "mse", impl="reference")
    semantic_loss(head, hidden, target, "mse")
    assert seen == [("reference", head), ("fused", head)]
    expected = regression.per_token_loss(head.proj(head.features(hidden)), target, "mse").sum()
    torch.testing.assert_close(semantic_loss(head, hidden, target, "mse")[0][0], expected)


def test_loss_impl_config_takes_the_kernel_names_and_explains_the_old_ones():
    from megatron_unihetero.models.config import ConfigError, LLMConfig, SemanticGenConfig

    for impl in ("auto", "reference", "fused", "triton", "megatron"):
        LLMConfig(loss_impl=impl)
    for impl in ("auto", "reference", "fused", "triton"):
        SemanticGenConfig(loss_impl=impl)
    with pytest.raises(ConfigError, match=r"llm.loss_impl: 'torch' is now 'fused'.*reference \| fused"):
        LLMConfig(loss_impl="torch")
    with pytest.raises(ConfigError, match=r"llm.loss_impl: 'naive' is now 'reference'"):
        LLMConfig(loss_impl="naive")
    with pytest.raises(ConfigError, match=r"semantic.loss_impl: 'torch' is now 'reference'"):
        SemanticGenConfig(loss_impl="torch")
    with pytest.raises(ConfigError, match=r"semantic.loss_impl must be one of .*; got 'megatron'"):
        SemanticGenConfig(loss_impl="megatron")
    with pytest.raises(ConfigError, match=r"semantic.loss must be one of mse \| smooth_l1 \| cosine"):
        SemanticGenConfig(loss="l1")


def test_fused_text_loss_matches_megatron_vocab_parallel_cross_entropy():
    run_distributed_test(jobs.text_loss_impls_job, 1)


@pytest.mark.parametrize("tp", [1, 2])
def test_mlp_swiglu_kernel_on_one_rank_equals_megatron(tp):
    run_distributed_test(jobs.swiglu_mlp_job, tp, tp)


@pytest.mark.requires_compiler
def test_compiled_decoder_layers_equal_eager_layers():
    run_distributed_test(jobs.compiled_decoder_job, 1, timeout_s=600)
