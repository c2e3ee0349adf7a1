"""Fused LM head + cross-entropy that never materialises the full [N, V] logits.

    loss_sum, num_tokens = fused_linear_cross_entropy(hidden, weight, labels)

hidden [N, H]; weight [V_local, H] (the LM head, or this rank's vocab shard); labels [N] int64,
``ignore_index`` where there is no loss. Returns the SUM of per-token cross-entropy over the
non-ignored tokens (fp32 scalar) and their count (int64 scalar tensor): normalise by a *global*
token count upstream (over every micro-batch and data-parallel rank of the step, so gradient
accumulation and data parallelism do not change the loss), never here.

Tensor parallelism (``tp_group``): rank r holds vocab ids [r*V_local, (r+1)*V_local); labels are
global ids and hidden is replicated, identical on every rank. The log-sum-exp and the target
logit are combined across ranks (Megatron's vocab-parallel cross-entropy), so the loss is the
same on every rank. Gradient convention: the gradient returned for ``hidden`` is the FULL one,
already all-reduced (summed) over the TP group, i.e. the same on every rank; the caller must NOT
also pass hidden through megatron's ``copy_to_tensor_model_parallel_region`` (that would sum it
twice). The gradient for ``weight`` is this rank's shard only.

How (Liger-kernel style): N is processed in chunks of ``chunk_size`` rows. For each chunk the
forward computes the logits, the loss and, when a gradient is needed, the gradient of the loss
with respect to the logits (softmax - one_hot), which it immediately contracts into the hidden
and weight gradients. Only those two gradients (the size of hidden and weight) are kept for the
backward, which just scales them by the incoming gradient. Peak extra memory is a few
[chunk_size, V_local] buffers instead of several [N, V] ones. The gradient work happens in the
forward only when an input needs a gradient, so evaluation (no_grad) pays the forward only. The
incoming gradient must be a scalar multiple of the loss (it always is: the loss is a scalar).

impl:
- "reference": full [N, V] logits + F.cross_entropy under autograd (under TP the logit shards
  are all-gathered): the definition the others are tested against; also what "auto" takes on
  CPU without TP while the logits are small (see _REFERENCE_ON_CPU_MAX_LOGITS).
- "fused": chunked, torch ops; the CPU path for larger logits: the softmax of a chunk comes from
  torch.softmax's fused kernel, its log-sum-exp is read off it at the argmax.
- "triton": chunked, the softmax statistics and the logits gradient in Triton kernels that work
  in the logits' own dtype, so no fp32 copy of a bf16 chunk exists; CUDA or TRITON_INTERPRET=1.
- "auto": triton on CUDA; on CPU without TP reference up to 2M logits, else fused;
  MEGATRON_UNIHETERO_KERNELS=reference forces the reference.

Approximations: with bf16/fp16 inputs the logits are rounded to the input dtype (as in the
reference), and the hidden gradient is stored and all-reduced in the input dtype (as Megatron
does). The weight gradient is accumulated across chunks in the weight's dtype, as Liger-Kernel
does: each chunk's product is reduced in fp32 inside the GEMM and rounded once when added, so a
bf16 weight gradient is rounded once per chunk (N / chunk_size times, 4 for a 4096-token
micro-batch at V=32k on GPU) instead of once. An fp32 accumulator would cost 2 bytes more per
weight element (500 MiB at V=32k, H=4k): that and its final bf16 copy would be most of the
op's peak memory on GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_unihetero.kernels._dispatch import REFERENCE, require, resolve_impl, triton_usable

# Default chunk: about 8M logits per chunk on CPU (32 MiB in fp32), 32M on GPU -- large enough to
# keep the matmuls efficient (and, on GPU, the per-chunk weight-gradient update cheap next to them),
# small enough that the [chunk, V_local] buffers are a small fraction of the reference's [N, V].
_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 25}


# On CPU, without tensor parallelism, "auto" takes the reference up to this many logits (8 MiB
# in fp32): its fused log-softmax kernels beat the chunked path's dozen small ops on small
# logits; the two break even at about twice this size, where the chunked path's memory saving
# starts to matter (figures: docs/performance_notes.md).
_REFERENCE_ON_CPU_MAX_LOGITS = 1 << 21


def default_chunk_size(num_tokens: int, vocab_local: int, device_type: str = "cpu") -> int:
    budget = _CHUNK_ELEMENTS.get(device_type, _CHUNK_ELEMENTS["cuda"])
    rows = max(64, budget // max(1, vocab_local))
    rows = 1 << (rows.bit_length() - 1)  # power of two: friendly to matmul tiling
    return max(1, min(num_tokens, rows))


def _tp_info(tp_group) -> Tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _softmax_torch(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(softmax over this shard in fp32 [c, V], this shard's log-sum-exp [c]).

    torch.softmax is one fused, vectorised kernel; torch.logsumexp is a composite of several
    passes (several times slower on CPU). The log-sum-exp is recovered from the softmax at the
    row's argmax, where p >= 1/V so the log is accurate: lse = x_max - log(p_max).
    """
    row_max, argmax = logits.max(dim=1)
    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
    lse = row_max.float() - probs.gather(1, argmax[:, None]).squeeze(1).log()
    return probs, lse


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, tp_group, chunk_size, use_triton):
        n, _ = hidden.shape
        v_local = weight.shape[0]
        rank, world = _tp_info(tp_group)
        vocab_start = rank * v_local
        want_grad_h, want_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if use_triton:
            from megatron_unihetero.kernels import _triton_cross_entropy as tk

        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad_h else None
        # Accumulated across chunks in the weight's dtype (see the module docstring).
        grad_weight = torch.zeros_like(weight) if want_grad_w else None

        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = h @ weight.t()  # [c, V_local], input dtype (fp32 accumulation inside matmul)
            valid = y != ignore_index
            local = y - vocab_start
            in_shard = valid & (local >= 0) & (local < v_local)
            target_local = torch.where(in_shard, local, torch.full_like(local, -1))
            # This rank's contribution to the target logit (zero unless the label is in the shard).
            picked = logits.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1).float()
            target_logit = torch.where(in_shard, picked, torch.zeros_like(picked))

            if use_triton:
                row_max, sumexp = tk.row_stats(logits)
                lse_local = row_max + sumexp.log()
            else:
                probs, lse_local = _softmax_torch(logits)
            lse = lse_local
            if world > 1:
                # Combine the shards' log-sum-exps: lse = M + log(sum_r exp(lse_r - M)).
                global_max = lse_local.clone()
                dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
                sumexp = torch.exp(lse_local - global_max)
                dist.all_reduce(sumexp, group=tp_group)
                dist.all_reduce(target_logit, group=tp_group)
                lse = global_max + sumexp.log()
            loss_sum += torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()

            if not (want_grad_h or want_grad_w):
                continue
            # d(loss_sum)/d(logits) = softmax over the FULL vocab - one_hot, zero on ignored rows.
            if use_triton:
                grad_logits = tk.logits_grad_(logits, lse, target_local, valid.float())  # in place
            else:
                if world > 1:  # this shard's softmax is off by the factor exp(lse_local - lse)
                    probs.mul_((torch.exp(lse_local - lse) * valid)[:, None])
                elif not bool(valid.all()):
                    probs.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)
                rows = in_shard.nonzero().squeeze(1)
                probs.index_put_((rows, target_local[rows]), torch.tensor(-1.0, device=probs.device), accumulate=True)
                grad_logits = probs.to(hidden.dtype)
                del probs
            del logits
            if want_grad_h:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk_size])
            if want_grad_w:
                grad_weight.addmm_(grad_logits.t(), h)

        if want_grad_h and world > 1:
            # Megatron convention: hidden is replicated and each rank only saw its vocab shard,
            # so the true gradient is the sum over shards (what copy_to_tensor_model_parallel_region
            # would do in its backward).
            dist.all_reduce(grad_hidden, group=tp_group)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place: a copy would double the peak (a V x H buffer). A second backward
        # through the same graph (retain_graph) fails torch's saved-tensor version check.
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None


def _reference(hidden, weight, labels, ignore_index, tp_group, chunk_size):
    """Full [N, V] logits, autograd through F.cross_entropy; under TP the shards are all-gathered
    (simple and obviously right, the point of a reference; it costs V/V_local times the memory).
    ``chunk_size`` is unused: one chunk of N rows."""
    _, world = _tp_info(tp_group)
    if world == 1:
        logits = (hidden @ weight.t()).float()
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    # The hidden gradient through this shard is partial: _AllReduceGrad sums it over the group,
    # giving the full gradient the module docstring promises. Then a differentiable all-gather
    # of the vocab shards and the TP=1 formula.
    logits = (_AllReduceGrad.apply(hidden, tp_group) @ weight.t()).float()
    full_logits = _GatherVocab.apply(logits, tp_group)
    return F.cross_entropy(full_logits, labels, ignore_index=ignore_index, reduction="sum")


class _GatherVocab(torch.autograd.Function):
    """All-gather along the vocab dim; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, logits, group):
        world = dist.get_world_size(group)
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        ctx.rank, ctx.width, ctx.group = dist.get_rank(group), logits.shape[1], group
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        # Every rank computes the same full loss, so the gradient of the gathered logits is the
        # same everywhere: this rank keeps its own slice (no scaling by the world size).
        return grad[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient in backward (Megatron's
    copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _chunked(hidden, weight, labels, ignore_index, tp_group, chunk_size, use_triton):
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0 + weight.sum() * 0).float()
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device.type)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, tp_group, chunk, use_triton)


def _fused(hidden, weight, labels, ignore_index, tp_group, chunk_size):
    return _chunked(hidden, weight, labels, ignore_index, tp_group, chunk_size, use_triton=False)


def _triton(hidden, weight, labels, ignore_index, tp_group, chunk_size):
    require(triton_usable(hidden.device), "fused_linear_cross_entropy", "triton",
            "needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    return _chunked(hidden, weight, labels, ignore_index, tp_group, chunk_size, use_triton=True)


# impl name -> implementation, looked up at call time (tests swap entries to see which ran).
_IMPLS = {REFERENCE: _reference, "fused": _fused, "triton": _triton}
IMPLS = tuple(_IMPLS)


def auto_order(hidden: torch.Tensor, weight: torch.Tensor, tp_group=None) -> list:
    """What "auto" may pick for these tensors, best first."""
    order = ["triton"] if hidden.is_cuda and triton_usable(hidden.device) else []
    if (not hidden.is_cuda and _tp_info(tp_group)[1] == 1
            and hidden.shape[0] * weight.shape[0] <= _REFERENCE_ON_CPU_MAX_LOGITS):
        order.append(REFERENCE)
    return order + ["fused"]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    tp_group: Optional["dist.ProcessGroup"] = None,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of non-ignored tokens); see the module docstring."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H], weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N]={hidden.shape[0]}, got {tuple(labels.shape)}")
    num_tokens = (labels != ignore_index).sum()
    impl = resolve_impl("fused_linear_cross_entropy", impl, IMPLS, auto_order(hidden, weight, tp_group))
    return _IMPLS[impl](hidden, weight, labels, ignore_index, tp_group, chunk_size), num_tokens
