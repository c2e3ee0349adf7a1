"""The _foreach stand-ins for megatron-core's local multi-tensor fallbacks compute what those do."""

import torch

from megatron_unihetero import platform
from megatron_unihetero.platform import megatron_fastpaths as fb


def _tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in ((7, 3), (5,), (2, 2, 2))]


def test_scale_matches_megatron_local_fallback_in_place_and_copying():
    platform.prepare_megatron()
    from megatron.core import utils

    for scale in (0.37, 1.0):
        ours, theirs = _tensors(), _tensors()
        fb.foreach_scale(0, None, [ours, ours], scale)
        utils.local_multi_tensor_scale(0, None, [theirs, theirs], scale)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        src, dst = _tensors(1), [torch.zeros(t.shape, dtype=torch.bfloat16) for t in _tensors(1)]
        fb.foreach_scale(0, None, [src, dst], scale)
        for s, d in zip(src, dst):
            torch.testing.assert_close(d, (s * scale).bfloat16(), rtol=0, atol=0)


def test_l2_norm_matches_megatron_local_fallback():
    platform.prepare_megatron()
    from megatron.core import utils

    lists = [_tensors(2), _tensors(3)]
    ours, _ = fb.foreach_l2_norm(0, None, lists, False)
    theirs, _ = utils.local_multi_tensor_l2_norm(0, None, lists, False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.to(ours.device), rtol=1e-6, atol=0)
    # 16-bit tensors: accumulated in fp32 (megatron's loop rounds each norm to bf16 first).
    half, _ = fb.foreach_l2_norm(0, None, [[t.bfloat16() for t in _tensors(3)]], False)
    exact = torch.cat([t.bfloat16().float().flatten() for t in _tensors(3)]).norm()
    torch.testing.assert_close(half, exact.reshape(1), rtol=1e-6, atol=0)
    empty, _ = fb.foreach_l2_norm(0, None, [[]], False)
    assert float(empty) == 0.0


def test_installed_where_megatron_fell_back():
    platform.prepare_megatron()
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    if platform.has_module("transformer_engine") or platform.has_module("amp_C"):
        return  # megatron-core uses TE's / apex's kernels: nothing to replace
    assert clip_grads.multi_tensor_scale_impl is fb.foreach_scale
    assert clip_grads.l2_norm_impl is fb.foreach_l2_norm
    assert optimizer.multi_tensor_scale_impl is fb.foreach_scale


class _Group:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def test_self_exchange_on_one_rank_is_skipped_and_nothing_else():
    calls = []
    collective = fb._skip_self_exchange(lambda out, inp, *a, **k: calls.append((out, inp)) or "work")
    buffer = torch.zeros(8)
    assert collective(buffer, buffer[:8], group=_Group(1), async_op=False) is None
    assert calls == []
    # A real exchange: another group size, or distinct memory, or a shard of the buffer.
    assert collective(buffer, buffer, group=_Group(2)) == "work"
    assert collective(buffer, torch.zeros(8), group=_Group(1)) == "work"
    assert collective(buffer, buffer[:4], group=_Group(1)) == "work"
    assert len(calls) == 3


def test_grad_norm_on_one_rank_is_local_and_equals_megatron():
    platform.prepare_megatron()
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    assert clip_grads.get_grad_norm_fp32.local_when_alone and optimizer.get_grad_norm_fp32.local_when_alone
    calls = []
    megatron_norm = lambda grads, norm_type=2, group=None: calls.append(norm_type) or -1.0  # noqa: E731
    norm = fb._local_norm_when_alone(megatron_norm)
    grads = _tensors(4)
    exact = float(torch.cat([g.flatten() for g in grads]).norm())
    assert abs(norm(grads, 2, _Group(1)) - exact) <= 1e-6 * exact
    assert abs(norm(grads[0], 2.0, _Group(1)) - float(grads[0].norm())) <= 1e-6 * exact
    assert calls == []
    # Anything else is megatron-core's: more ranks, no group (the default group), inf norm.
    assert norm(grads, 2, _Group(2)) == norm(grads, 2, None) == norm(grads, float("inf"), _Group(1)) == -1.0
    assert len(calls) == 3
