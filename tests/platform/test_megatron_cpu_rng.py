"""The CPU layer covers megatron-core's RNG handling under activation recompute."""

import torch

from megatron_unihetero import platform


def test_checkpoint_restores_the_rng_for_the_recomputed_forward():
    """megatron-core's checkpoint (train.recompute) on CPU: the recomputed forward draws the
    same dropout mask as the first one, so the gradients equal those without recompute; and
    its RNG-state sets run at once instead of queueing for a CUDA that never initialises."""
    platform.prepare_megatron()
    from megatron.core import tensor_parallel

    weight = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(8, 16, requires_grad=True)

    def block(inputs):
        return torch.nn.functional.dropout(inputs @ weight, p=0.5, training=True)

    grads = []
    queued = len(torch.cuda._queued_calls)
    for checkpointed in (False, True):
        torch.manual_seed(0)
        weight.grad = x.grad = None
        out = tensor_parallel.checkpoint(block, False, x) if checkpointed else block(x)
        out.sum().backward()
        grads.append((weight.grad.clone(), x.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert len(torch.cuda._queued_calls) == queued
